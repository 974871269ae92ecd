"""Teacher answers from an OpenAI-compatible endpoint (``openai:URL#MODEL``).

vLLM, llama-server, TGI, ``edgepack serve`` or a hosted API: the teacher has no local weights,
so answers come over HTTP (``POST URL/chat/completions``, the standard library's urllib only).
:func:`open_endpoint` is the generator registered for kind ``openai`` in
``generate.GENERATORS``; it yields an :class:`EndpointTeacher`, callable per prompt like the
local generators, with :meth:`EndpointTeacher.generate_many` for a batch in order.

What makes it safe to point at a remote service:

- the API key comes from an environment variable (``EDGEPACK_TEACHER_API_KEY`` unless told
  otherwise) and travels only in the ``Authorization`` header; it is never logged, cached or
  written to a report, and redirects are not followed, so it only reaches the configured host;
- at most ``concurrency`` requests are in flight (a thread pool);
- connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and full
  jitter (``Retry-After`` honoured, capped) for at most ``max_attempts`` tries; any other
  status, or the last failed try, raises :class:`~edgepack.errors.TeacherEndpointError`
  (one line naming URL and status, exit 2);
- every answer is stored as one JSON file under the cache folder (``RUN/cache/teacher``,
  see answer_cache.py), named by the sha256 of teacher identity, decoding parameters and
  messages, and written atomically: a rerun never pays twice, and answers finished before a
  crash are kept.

Per-token logprobs are asked for (``logprobs: true, top_logprobs: K``). An endpoint that
refuses them (a 400 naming ``logprobs``, as ``edgepack serve`` does) or answers without them
gives response-only answers, each carrying ``no_logprobs_reason`` so the data report can say
so; it is never silent.
"""

from __future__ import annotations

import http.client
import json
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
from edgepack.errors import TeacherEndpointError, UsageError

if TYPE_CHECKING:
    from edgepack.distill.generate import DecodeParams, Generation, Messages
    from edgepack.distill.teachers import TeacherSource

DEFAULT_API_KEY_ENV = TEACHER_API_KEY_ENV
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs; vLLM's default max_logprobs is 20 too
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_RETRY_STATUSES = frozenset({408, 429})  # plus every 5xx


@dataclass(frozen=True)
class EndpointConfig:
    """How an endpoint teacher is called (none of it changes the answers but ``top_logprobs``)."""

    concurrency: int = 4
    """Requests in flight at once."""
    timeout_s: float = 120.0
    """Per request: connect, and every read of the answer (urllib's socket timeout), and the
    whole answer must arrive within this from the first byte sent."""
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

    def __init__(self, detail: str, wait_s: float | None = None) -> None:
        super().__init__(detail)
        self.wait_s = wait_s


class _LogprobsRefused(Exception):
    """Internal: a 400 whose error names logprobs; ask again without them."""


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
        self._key = read_api_key(self.config.api_key_env)
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._lock = threading.Lock()
        self._logprobs_refused: str | None = None  # sticky: the endpoint said no once
        self._in_flight = 0
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "max_in_flight": 0}

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
        return {"url": self.url, "model": self.source.model, **self.config.describe(),
                "api_key_sent": self._key is not None, "logprobs_refused": self._logprobs_refused, **stats}

    # --- one request ----------------------------------------------------------------------

    def _ask(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The endpoint's JSON answer, and why logprobs were not asked for (None: they were)."""
        with self._lock:
            refused = self._logprobs_refused
        if refused is None and self.config.top_logprobs > 0:
            try:
                return self._post({**body, "logprobs": True, "top_logprobs": self.config.top_logprobs}), None
            except _LogprobsRefused as exc:
                with self._lock:
                    self._logprobs_refused = self._logprobs_refused or str(exc)
                    refused = self._logprobs_refused
        elif self.config.top_logprobs == 0:
            refused = "top_logprobs is 0: logprobs were not asked for"
        return self._post(body), refused

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        last = ""
        for attempt in range(1, self.config.max_attempts + 1):
            if attempt > 1:
                with self._lock:
                    self.stats["retries"] += 1
            try:
                return self._try(data, logprobs="logprobs" in body)
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.config.max_attempts:
                    break
                bound = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (attempt - 1))
                delay = random.uniform(0, bound)
                if exc.wait_s is not None:
                    delay = max(delay, min(exc.wait_s, self.config.backoff_max_s))
                time.sleep(delay)
        raise TeacherEndpointError(f"teacher endpoint {self.url}: {last} (gave up after "
                                   f"{self.config.max_attempts} attempts)")

    def _try(self, data: bytes, *, logprobs: bool) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Accept": "application/json"})
        if self._key is not None:
            request.add_header("Authorization", f"Bearer {self._key}")
        with self._lock:
            self.stats["requests"] += 1
            self._in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
        deadline = time.monotonic() + self.config.timeout_s
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as resp:
                raw = _read_until(resp, deadline, self.config.timeout_s)
        except TeacherEndpointError:
            raise  # an oversized answer: retrying would not shrink it
        except urllib.error.HTTPError as exc:
            self._http_error(exc, logprobs=logprobs)
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within {self.config.timeout_s:g} s (timeout)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within {self.config.timeout_s:g} s (timeout)") from None
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

    def _http_error(self, exc: urllib.error.HTTPError, *, logprobs: bool) -> NoReturn:
        status = exc.code
        try:
            raw = exc.read(64 * 1024)
        except (OSError, ValueError):
            raw = b""
        message, param = _error_message(raw)
        detail = f"HTTP {status}" + (f" ({self._redact(message)})" if message else "")
        if status in _RETRY_STATUSES or status >= 500:
            raise _Retryable(detail, _retry_after(exc.headers.get("Retry-After") if exc.headers else None))
        if logprobs and status in (400, 422) and (param in ("logprobs", "top_logprobs") or "logprob" in message.lower()):
            raise _LogprobsRefused(f"the endpoint refused logprobs: {detail}")
        hint = None
        if status in (401, 403):
            hint = (f"set the endpoint's API key in ${self.config.api_key_env} (or name another variable with "
                    "--api-key-env)")
        elif status == 404:
            hint = f"check the URL (the API base, usually ending in /v1) and that the server serves {self.source.model!r}"
        raise TeacherEndpointError(f"teacher endpoint {self.url}: {detail}", hint=hint)

    def _redact(self, text: str) -> str:
        """One line, at most 200 characters, with the key (should a server echo it) masked."""
        text = " ".join(text.split())
        if self._key:
            text = text.replace(self._key, "***")
        return text[:200]

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
        chosen, top = _logprobs(choice.get("logprobs"), self.config.top_logprobs)
        reason = None
        if chosen is None:
            reason = refused or "the endpoint answered without per-token logprobs (it ignored logprobs: true)"
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            tokens = len(chosen) if chosen is not None else 0
        return Generation(text=text, tokens=tokens, finished=finish == "stop", token_logprobs=chosen,
                          top_logprobs=top, no_logprobs_reason=reason)


def _read_until(resp: Any, deadline: float, timeout_s: float) -> bytes:
    """The body, refusing more than MAX_RESPONSE_BYTES or a trickle past the deadline."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = resp.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TeacherEndpointError(f"the teacher endpoint sent more than {MAX_RESPONSE_BYTES} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"answer not complete within {timeout_s:g} s")
        chunks.append(chunk)


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


def _logprobs(obj: Any, k: int) -> tuple[list[tuple[str, float]] | None, list[list[tuple[str, float]]] | None]:
    """(chosen token and logprob per position, top-k alternatives per position) or (None, None).

    Reads the chat format ``{"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}``;
    anything else counts as no logprobs.
    """
    content = obj.get("content") if isinstance(obj, dict) else None
    if not isinstance(content, list) or not content:
        return None, None
    chosen: list[tuple[str, float]] = []
    top: list[list[tuple[str, float]]] = []
    try:
        for item in content:
            chosen.append((str(item["token"]), float(item["logprob"])))
            alts = item.get("top_logprobs") or []
            top.append([(str(a["token"]), float(a["logprob"])) for a in alts][:k])
    except (KeyError, TypeError, ValueError):
        return None, None
    return chosen, top


@contextmanager
def open_endpoint(source: TeacherSource, cache_dir: Path, params: DecodeParams,
                  endpoint: EndpointConfig | None = None) -> Iterator[EndpointTeacher]:
    """The generator for ``openai`` teachers (``cache_dir``: where answers are kept)."""
    yield EndpointTeacher(source, cache_dir, params, endpoint)
