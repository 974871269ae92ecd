"""Teacher answers from an OpenAI-compatible endpoint (``openai:URL#MODEL``).

vLLM, llama-server, TGI, ``edgepack serve`` or a hosted API: the teacher has no local weights,
so answers come over HTTP (``POST URL/chat/completions``, the standard library's urllib only,
so proxies configured in the environment apply).
:func:`open_endpoint` is the generator registered for kind ``openai`` in
``generate.GENERATORS``; it yields an :class:`EndpointTeacher`, callable per prompt like the
local generators, with :meth:`EndpointTeacher.generate_many` for a batch in order. Its HTTP
plumbing, :class:`EndpointClient`, also carries the endpoint scorer's requests (score_endpoint.py).

What makes it safe to point at a remote service:

- the API key comes from an environment variable (``EDGEPACK_TEACHER_API_KEY`` unless told
  otherwise) and travels only in the ``Authorization`` header; it is never logged, cached or
  written to a report, and redirects are not followed, so it only reaches the configured host;
- at most ``concurrency`` requests are in flight (a thread pool);
- each try has one total deadline (``timeout_s``, ``--timeout``) from connect through the TLS
  handshake, the request, the headers and the last byte of the body; a server that sends its
  answer a byte at a time is cut off at the deadline, not kept alive by each byte (see
  edgepack/http_deadline.py); answers larger than :func:`response_cap` (from the tokens asked for, at
  most ``MAX_RESPONSE_BYTES``) are refused as soon as that is known, and not retried;
- connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and full
  jitter (``Retry-After`` honoured, capped) for at most ``max_attempts`` tries; any other
  status, or the last failed try, raises :class:`~edgepack.errors.TeacherEndpointError`
  (one line naming URL and status, exit 2);
- every answer is stored as one JSON file under the cache folder (``RUN/cache/teacher``,
  see answer_cache.py), named by the sha256 of teacher identity, decoding parameters and
  messages, and written atomically: a rerun never pays twice, and answers finished before a
  crash are kept.

Stop strings (``distill data --stop``) are sent as the request's ``stop``; the answer's logprobs
are cut with its text, so each kept position is a token of the kept text (:func:`_cut_at_stop`).

Per-token logprobs are asked for (``logprobs: true, top_logprobs: K``). An endpoint that
refuses them (a 400 naming ``logprobs``, as ``edgepack serve`` does) or answers without them
gives response-only answers, each carrying ``no_logprobs_reason`` so the data report can say
so; it is never silent. Logprobs that are there are checked as they are parsed: a logprob
that is not a finite number ≤ 0 (NaN, ±Infinity, a string, a boolean), a token that is not
text or longer than ``MAX_TOKEN_CHARS``, or more positions than tokens asked for make the
answer invalid, and so does text holding a lone surrogate (``"\\ud800"`` is valid JSON but not
Unicode text, and cannot be written as UTF-8): its logprobs are not kept, lone surrogates
become U+FFFD, and the answer is marked (see :func:`is_invalid_answer`) so that
``distill data`` refuses the row with a counted reason.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from edgepack.constants import TEACHER_API_KEY_ENV
from edgepack.distill.answer_cache import AnswerCache, answer_key
from edgepack.http_deadline import BodyTooLarge, Deadline, deadline_opener, read_body
from edgepack.errors import TeacherEndpointError, UsageError

if TYPE_CHECKING:
    from edgepack.distill.generate import DecodeParams, Generation, Messages
    from edgepack.distill.teachers import TeacherSource

DEFAULT_API_KEY_ENV = TEACHER_API_KEY_ENV
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs; vLLM's default max_logprobs is 20 too
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""Largest answer body read, whatever the request. Parsing 16 MiB of the smallest JSON items
peaks near 140 MB of Python objects, so the cap per request is usually far lower (response_cap)."""
RESPONSE_BASE_BYTES = 64 * 1024
RESPONSE_BYTES_PER_TOKEN = 32 * 1024
"""Per token asked for: the text, the chosen token and 20 alternatives with their ``bytes``
arrays take ~2-10 KB for real vocabularies (tokens of at most ~100-200 bytes)."""
MAX_TOKEN_CHARS = 1024
"""Longest token text accepted in logprobs (real vocabularies' longest tokens are ~100-200 bytes)."""
INVALID_ANSWER = "the endpoint's answer is invalid"
"""Start of ``no_logprobs_reason`` for an answer refused as invalid (see is_invalid_answer)."""
_RETRY_STATUSES = frozenset({408, 429})  # plus every 5xx


@dataclass(frozen=True)
class EndpointConfig:
    """How an endpoint teacher is called (none of it changes the answers but ``top_logprobs``)."""

    concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 120.0
    """Total deadline of one try (``--timeout``): connect, TLS handshake, request, headers and the
    whole body, however slowly the bytes arrive. A try past it is retried like a connection error."""
    api_key_env: str = DEFAULT_API_KEY_ENV
    """Environment variable holding the key (sent as ``Authorization: Bearer``). Unset is fine
    for the default name (a local server needs none); a name given explicitly must be set."""
    max_attempts: int = 5
    """Tries per request (connection errors, timeouts, 408, 429, 5xx are retried)."""
    backoff_s: float = 0.5
    """Wait bound before the second try; it doubles per try (full jitter: uniform 0..bound)."""
    backoff_max_s: float = 30.0
    """Cap of one wait, ``Retry-After`` included."""
    top_logprobs: int = MAX_TOP_LOGPROBS
    """Alternatives per token asked for (0: do not ask for logprobs at all)."""

    def check(self) -> None:
        """UsageError naming the first setting out of range."""
        if self.concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout must be a positive number of seconds (got {self.timeout_s})")
        if self.max_attempts < 1:
            raise UsageError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS} (got {self.top_logprobs})")
        if not self.api_key_env or not self.api_key_env.replace("_", "").isalnum():
            raise UsageError(f"--api-key-env must be an environment variable name (got {self.api_key_env!r})")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def read_api_key(env_name: str) -> str | None:
    """The key held by ``env_name``; None when the default variable is unset."""
    value = os.environ.get(env_name, "").strip()
    if not value and env_name != DEFAULT_API_KEY_ENV:
        raise UsageError(f"the API key variable {env_name} is not set or empty",
                         hint=f"export {env_name}=<key>, or leave out --api-key-env for a server without a key")
    return value or None


def cache_key(source: TeacherSource, params: DecodeParams, top_logprobs: int, messages: Messages) -> str:
    """sha256 of what decides an answer: teacher identity, decoding parameters, messages."""
    return answer_key(f"{source.url}#{source.model}", params.describe(), messages, top_logprobs=top_logprobs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the key to another host; refuse it (urllib raises HTTPError 3xx)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Retryable(Exception):
    """Internal: one try failed in a way worth another (``wait_s`` from Retry-After, if any)."""

    def __init__(self, detail: str, wait_s: float | None = None, hint: str | None = None) -> None:
        super().__init__(detail)
        self.wait_s, self.hint = wait_s, hint


class Refused(Exception):
    """A 4xx answer the caller's ``refused`` test picked out (the message: status and the server's
    words, redacted): the caller asks otherwise (the teacher: without logprobs) or explains."""


RefusalTest = Callable[[int, str, "str | None"], bool]
"""``(status, error message, error param) → True``: raise :class:`Refused` instead of failing."""


def _names_logprobs(status: int, message: str, param: str | None) -> bool:
    """A 400/422 about logprobs (``edgepack serve`` names the param; others say it in words)."""
    return status in (400, 422) and (param in ("logprobs", "top_logprobs") or "logprob" in message.lower())


class EndpointTeacher:
    """Answers chat prompts through one OpenAI-compatible endpoint; see the module docstring."""

    def __init__(self, source: TeacherSource, cache_dir: Path, params: DecodeParams,
                 config: EndpointConfig | None = None) -> None:
        if source.url is None or source.model is None:
            raise UsageError(f"teacher {source.spec!r} is not an endpoint")
        self.source, self.params = source, params
        self.config = config or EndpointConfig()
        self.config.check()
        self.cache = AnswerCache(cache_dir)
        self.url = f"{source.url}/chat/completions"
        self.client = EndpointClient(self.url, source.model, self.config, too_large_hint=(
            "a chat completion is far smaller; check that the URL is the API base of a chat-completions "
            "server (e.g. http://host:8000/v1)"))
        self.response_cap = response_cap(params.max_new_tokens)
        self._lock = threading.Lock()
        self._logprobs_refused: str | None = None  # sticky: the endpoint said no once
        self.stats = {"cache_hits": 0}

    # --- public -------------------------------------------------------------------------

    def __call__(self, messages: Messages) -> Generation:
        """One answer (from the cache when this exact request was answered before)."""
        key = cache_key(self.source, self.params, self.config.top_logprobs, messages)
        cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.stats["cache_hits"] += 1
            return cached
        body = {"model": self.source.model, "messages": messages, "max_tokens": self.params.max_new_tokens,
                "temperature": self.params.temperature, "seed": self.params.seed, "stream": False}
        if self.params.stop:  # absent without --stop: the request as before the option
            body["stop"] = list(self.params.stop)
        answer, refused = self._ask(body)
        gen = self._generation(answer, refused)
        # The request is stored without headers: the key never reaches the disk.
        self.cache.put(key, gen, teacher=f"{self.source.url}#{self.source.model}", request=body)
        return gen

    def generate_many(self, batch: list[Messages], on_done: Callable[[int], None] | None = None) -> list[Generation]:
        """Answers for ``batch`` in order, ``concurrency`` requests at a time.

        ``on_done(n)`` is called from the calling thread as answers arrive. On the first
        failure no new request starts, the ones in flight finish (and are cached), and the
        error is raised.
        """
        first: dict[str, int] = {}  # identical prompts are asked once
        for i, m in enumerate(batch):
            first.setdefault(json.dumps(m, sort_keys=True), i)
        answers: dict[int, Generation] = {}
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="teacher") as pool:
            futures: dict[Future[Generation], int] = {pool.submit(self, batch[i]): i for i in first.values()}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    error = fut.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        wait(pending)
                        raise error
                    answers[futures[fut]] = fut.result()
                if on_done is not None and finished:
                    on_done(len(answers))
        return [answers[first[json.dumps(m, sort_keys=True)]] for m in batch]

    def describe(self) -> dict[str, Any]:
        """Settings and counters for the data report (the key's variable name, never its value)."""
        with self._lock:
            stats = dict(self.stats)
        client = self.client.counters()
        return {"url": self.url, "model": self.source.model, **self.config.describe(),
                "api_key_sent": self.client.key_sent, "logprobs_refused": self._logprobs_refused,
                "requests": client["requests"], **stats, "retries": client["retries"],
                "max_in_flight": client["max_in_flight"]}

    # --- one request ----------------------------------------------------------------------

    def _ask(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The endpoint's JSON answer, and why logprobs were not asked for (None: they were)."""
        with self._lock:
            refused = self._logprobs_refused
        if refused is None and self.config.top_logprobs > 0:
            try:
                return self._post({**body, "logprobs": True, "top_logprobs": self.config.top_logprobs},
                                  refused=_names_logprobs), None
            except Refused as exc:
                with self._lock:
                    self._logprobs_refused = self._logprobs_refused or f"the endpoint refused logprobs: {exc}"
                    refused = self._logprobs_refused
        elif self.config.top_logprobs == 0:
            refused = "top_logprobs is 0: logprobs were not asked for"
        return self._post(body), refused

    def _post(self, body: dict[str, Any], refused: RefusalTest | None = None) -> dict[str, Any]:
        return self.client.post(body, cap=self.response_cap, cap_for=f"{self.params.max_new_tokens} new tokens",
                                refused=refused)

    # --- answers ----------------------------------------------------------------------------

    def _generation(self, answer: dict[str, Any], refused: str | None) -> Generation:
        from edgepack.distill.generate import Generation

        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherEndpointError(f"teacher endpoint {self.url}: HTTP 200 but no chat completion in the "
                                       "answer (choices[0].message missing)") from None
        if not isinstance(text, str):
            raise TeacherEndpointError(f"teacher endpoint {self.url}: the answer's content is not text")
        try:
            chosen, top = _logprobs(choice.get("logprobs"), self.config.top_logprobs,
                                    max_positions=self.params.max_new_tokens + 1)
            if _has_surrogate(text):
                text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
                raise BadAnswer("the text holds a lone UTF-16 surrogate (not Unicode text)")
        except BadAnswer as exc:
            # Not kept as training data: the mark lets `distill data` refuse the row with a
            # counted reason (the holdout keeps the text, surrogates replaced).
            chosen, top, refused = None, None, f"{INVALID_ANSWER}: {exc}"
        stopped = False
        if self.params.stop:
            text, stopped, chosen, top, refused = _cut_at_stop(text, self.params.stop, chosen, top, refused)
        reason = None
        if chosen is None:
            reason = refused or "the endpoint answered without per-token logprobs (it ignored logprobs: true)"
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= 1 << 31:
            tokens = len(chosen) if chosen is not None else 0
        if self.params.stop and chosen is not None:
            tokens = len(chosen)  # the usage counts a stop string's tokens too; the kept positions do not
        return Generation(text=text, tokens=tokens, finished=finish == "stop" or stopped, token_logprobs=chosen,
                          top_logprobs=top, no_logprobs_reason=reason)


Chosen = list[tuple[str, float]]
Top = list[list[tuple[str, float]]]


def _cut_at_stop(text: str, stop: tuple[str, ...], chosen: Chosen | None, top: Top | None,
                 refused: str | None) -> tuple[str, bool, Chosen | None, Top | None, str | None]:
    """(text, whether a stop string was cut here, chosen, top, why there are no logprobs) of an
    answer asked with ``stop``.

    The server cuts the text before the stop string; one that ignored ``stop`` left it in, and it
    is cut here. Logprobs are kept for the positions whose tokens spell the kept text: a server
    may return the stop string's tokens too (``edgepack serve`` does), and those are dropped so
    that each position stays the token of the text (endpoint_targets.py aligns them with the
    student's tokens). When the tokens do not spell the kept text (the stop string begins inside
    a token) the logprobs are not used, and the reason says so.
    """
    from edgepack.stop import cut_at_stop

    text, hit = cut_at_stop(text, stop)
    if chosen is None or top is None:
        return text, hit, None, None, refused
    spelled, n = "", 0
    while n < len(chosen) and len(spelled) < len(text) and text.startswith(spelled + chosen[n][0]):
        spelled += chosen[n][0]
        n += 1
    if spelled != text:
        at = f" (token {n}, {chosen[n][0]!r}, runs past it)" if n < len(chosen) else ""
        return text, hit, None, None, (f"the endpoint's logprobs do not spell the answer cut before the stop "
                                       f"string{at}; they are not used")
    return text, hit, chosen[:n], top[:n], refused


class EndpointClient:
    """POSTs JSON to one endpoint URL with the safety the module docstring lists: the key only in
    the ``Authorization`` header, no redirects, one total deadline per try, a size cap, retries
    with backoff and jitter, errors redacted to one line naming the URL. Thread-safe; shared by
    the endpoint teacher (chat answers) and the endpoint scorer (score_endpoint.py)."""

    def __init__(self, url: str, model: str, config: EndpointConfig, *, too_large_hint: str) -> None:
        self.url, self.model, self.config = url, model, config
        self.too_large_hint = too_large_hint
        self._key = read_api_key(config.api_key_env)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.stats = {"requests": 0, "retries": 0, "max_in_flight": 0}

    @property
    def key_sent(self) -> bool:
        return self._key is not None

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def post(self, body: dict[str, Any], *, cap: int, cap_for: str,
             refused: RefusalTest | None = None) -> dict[str, Any]:
        """The endpoint's JSON object answer to ``body``, retried as the module docstring says.

        ``cap``: the largest body read (``cap_for`` says what it was sized for, in the error).
        ``refused(status, message, param)``: a 4xx it is true for raises :class:`Refused` (the
        caller asks otherwise or explains); any other failure is a TeacherEndpointError.
        """
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last, hint = "", None
        for attempt in range(1, self.config.max_attempts + 1):
            if attempt > 1:
                with self._lock:
                    self.stats["retries"] += 1
            try:
                return self._try(data, cap, cap_for, refused)
            except _Retryable as exc:
                last, hint = str(exc), exc.hint
                if attempt == self.config.max_attempts:
                    break
                bound = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
                delay = random.uniform(0, bound)
                if exc.wait_s is not None:
                    delay = max(delay, min(exc.wait_s, self.config.backoff_max_s))
                time.sleep(delay)
        raise TeacherEndpointError(f"teacher endpoint {self.url}: {last} (gave up after "
                                   f"{self.config.max_attempts} attempts)", hint=hint)

    def _try(self, data: bytes, cap: int, cap_for: str, refused: RefusalTest | None) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Accept": "application/json"})
        if self._key is not None:
            request.add_header("Authorization", f"Bearer {self._key}")
        with self._lock:
            self.stats["requests"] += 1
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
        deadline = Deadline(self.config.timeout_s)
        try:
            with deadline:
                try:
                    # An opener per try: its handlers carry this try's deadline to the connection.
                    with deadline_opener(deadline, _NoRedirect()).open(request, timeout=self.config.timeout_s) as resp:
                        raw = read_body(resp, deadline, cap)
                except urllib.error.HTTPError as exc:
                    self._http_error(exc, refused)  # reads the error body under the deadline too
        except (TeacherEndpointError, _Retryable, Refused):
            raise
        except BodyTooLarge as exc:  # not retried: a retry would not shrink it
            raise TeacherEndpointError(
                f"teacher endpoint {self.url}: the answer is more than {_mib(exc.cap)} ({exc.detail}; the cap for "
                f"{cap_for})", hint=self.too_large_hint) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            # At the deadline the socket is shut down: that surfaces as EOF, IncompleteRead, an
            # SSL error or a timeout, whichever read noticed; the deadline is what happened.
            reason = getattr(exc, "reason", exc)
            if deadline.expired or isinstance(reason, (TimeoutError, socket.timeout)):
                t = self.config.timeout_s
                raise _Retryable(f"no complete answer within {t:g} s (timeout: one deadline covers connect, "
                                 "headers and body)",
                                 hint=f"raise --timeout (now {t:g} s) if the teacher is slow to answer; a server "
                                      "that sends its answer a few bytes at a time is cut off at it") from None
            raise _Retryable(f"unreachable ({self._redact(str(reason))})") from None
        finally:
            with self._lock:
                self._in_flight -= 1
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise TeacherEndpointError(f"teacher endpoint {self.url}: HTTP 200 but the body is not JSON "
                                       f"({self._redact(raw[:80].decode('utf-8', 'replace'))!r})") from None
        if not isinstance(answer, dict):
            raise TeacherEndpointError(f"teacher endpoint {self.url}: HTTP 200 but the body is not a JSON object")
        return answer

    def _http_error(self, exc: urllib.error.HTTPError, refused: RefusalTest | None) -> NoReturn:
        status = exc.code
        try:
            raw = exc.read(64 * 1024)
        except (OSError, ValueError):
            raw = b""
        message, param = _error_message(raw)
        detail = f"HTTP {status}" + (f" ({self._redact(message)})" if message else "")
        if status in _RETRY_STATUSES or status >= 500:
            raise _Retryable(detail, _retry_after(exc.headers.get("Retry-After") if exc.headers else None))
        if refused is not None and refused(status, message, param):
            raise Refused(detail)
        hint = None
        if status in (401, 403):
            hint = (f"set the endpoint's API key in ${self.config.api_key_env} (or name another variable with "
                    "--api-key-env)")
        elif status == 404:
            hint = f"check the URL (the API base, usually ending in /v1) and that the server serves {self.model!r}"
        raise TeacherEndpointError(f"teacher endpoint {self.url}: {detail}", hint=hint)

    def _redact(self, text: str) -> str:
        """One line, at most 200 characters, with the key (should a server echo it) masked."""
        text = " ".join(text.split())
        if self._key:
            text = text.replace(self._key, "***")
        return text[:200]


def response_cap(max_new_tokens: int) -> int:
    """The largest answer accepted for a request of ``max_new_tokens`` (at most MAX_RESPONSE_BYTES)."""
    return min(MAX_RESPONSE_BYTES, RESPONSE_BASE_BYTES + max(max_new_tokens, 1) * RESPONSE_BYTES_PER_TOKEN)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB"


def _error_message(raw: bytes) -> tuple[str, str | None]:
    """(message, param) of an OpenAI-style error body, or the body's start."""
    text = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()[:200], None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        param = err.get("param")
        return (message if isinstance(message, str) else ""), (param if isinstance(param, str) else None)
    if isinstance(err, str):  # TGI and some proxies: {"error": "..."}
        return err, None
    return text.strip()[:200], None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class BadAnswer(ValueError):
    """The answer's logprobs or text are there but unusable (the message says where; the scorer reads it too)."""


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _logprobs(obj: Any, k: int, *, max_positions: int) -> tuple[list[tuple[str, float]] | None,
                                                              list[list[tuple[str, float]]] | None]:
    """(chosen token and logprob per position, top-k alternatives per position) or (None, None).

    Reads the chat format ``{"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}``;
    without a ``content`` list there are no logprobs. A content list that is malformed, longer
    than ``max_positions``, or holds a bad token or logprob raises :class:`BadAnswer`. Only
    the first ``k`` alternatives per position are read.
    """
    content = obj.get("content") if isinstance(obj, dict) else None
    if not isinstance(content, list) or not content:
        return None, None
    if len(content) > max_positions:
        raise BadAnswer(f"logprobs for {len(content)} token positions for at most {max_positions - 1} tokens asked for")
    chosen: list[tuple[str, float]] = []
    top: list[list[tuple[str, float]]] = []
    for i, item in enumerate(content):
        if not isinstance(item, dict):
            raise BadAnswer(f"logprobs of token {i} is not an object")
        chosen.append(token_logprob(item, i))
        alts = item.get("top_logprobs") or []
        if not isinstance(alts, list):
            raise BadAnswer(f"logprobs of token {i}: top_logprobs is not a list")
        top.append([token_logprob(a, i) for a in alts[:k]])
    return chosen, top


def token_logprob(item: Any, i: int) -> tuple[str, float]:
    """(token, logprob) of one entry: text of at most MAX_TOKEN_CHARS, a finite number ≤ 0."""
    if not isinstance(item, dict):
        raise BadAnswer(f"logprobs of token {i}: an alternative is not an object")
    token, lp = item.get("token"), item.get("logprob")
    if not isinstance(token, str):
        raise BadAnswer(f"logprobs of token {i}: the token is not text")
    if len(token) > MAX_TOKEN_CHARS:  # before anything that reads the whole token
        raise BadAnswer(f"logprobs of token {i}: a token of {len(token):,} characters (at most {MAX_TOKEN_CHARS})")
    if _has_surrogate(token):
        raise BadAnswer(f"logprobs of token {i}: the token holds a lone UTF-16 surrogate (not Unicode text)")
    if isinstance(lp, bool) or not isinstance(lp, (int, float)):  # bool is an int in Python
        raise BadAnswer(f"logprobs of token {i}: logprob {_show(lp)} is not a number")
    try:
        value = float(lp)  # an integer of 400 digits does not fit a float
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):  # json.loads reads NaN, Infinity and 1e999 as such floats
        raise BadAnswer(f"logprobs of token {i}: logprob {_show(lp)} is not a finite number")
    if value > 1e-3:  # a probability above 1; tiny positive values are rounding and are clamped later
        raise BadAnswer(f"logprobs of token {i}: logprob {value:g} is above 0")
    return token, value


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float)) else json.dumps(value)[:40]
    return text if len(text) <= 20 else text[:20] + "…"


def is_invalid_answer(gen: Generation) -> bool:
    """True when an endpoint's answer was refused as invalid (logprobs that are NaN, ±Infinity or not
    numbers, giant tokens, too many positions; text with lone surrogates); ``distill data`` drops
    such rows as ``invalid_answer``."""
    return (gen.no_logprobs_reason or "").startswith(INVALID_ANSWER)


@contextmanager
def open_endpoint(source: TeacherSource, cache_dir: Path, params: DecodeParams,
                  endpoint: EndpointConfig | None = None) -> Iterator[EndpointTeacher]:
    """The generator for ``openai`` teachers (``cache_dir``: where answers are kept)."""
    yield EndpointTeacher(source, cache_dir, params, endpoint)
