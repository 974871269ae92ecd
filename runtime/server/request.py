"""What a request must pass before it reaches the model: Host, API key, body, size, context.

Each check is a function of the request's headers (and the server's settings) that raises
:class:`~edgepack.runtime.server.api.HttpReject` with the status to answer:

- :func:`check_host` — a loopback server without a key answers only ``Host: localhost /
  127.0.0.1 / ::1`` (DNS rebinding; 403);
- :func:`check_auth` — ``Authorization: Bearer <key>`` when a key is set (401);
- :func:`body_length` — ``Content-Type: application/json`` (415), one ``Content-Length`` (400
  when several disagree) and no chunked body (411), at most ``max_body_bytes`` (413), all
  before a byte is read;
- :func:`parse_json_body` — strict JSON (no NaN/Infinity, bounded nesting) whose strings are
  valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"`` decodes in Python but cannot be
  encoded for the tokenizer; 400);
- :func:`check_prompt_size` — a prompt of more than ``n_ctx`` x
  :data:`MAX_PROMPT_BYTES_PER_TOKEN` bytes cannot fit the context, and is refused before it is
  tokenized (llama.cpp takes quadratic time on text dense in special tokens: 1 MB cost tens of
  CPU-seconds, issue #20 defect 10; 400);
- :func:`tokenize_within` — tokenize on a worker thread under the request's deadline (504);
- :func:`fit_job` — refuse a prompt (or prompt plus ``max_tokens``) beyond the context (400)
  and build the job from the request as :mod:`~edgepack.runtime.server.decoding` resolved it.

:class:`PeerWatch` tells, without blocking, whether the client has gone (a queued or
generating request then frees its slot).
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from email.message import Message
from typing import TYPE_CHECKING, Any

from edgepack.errors import InvalidModelFile, UnsafeModelError, UsageError
from edgepack.runtime.server.api import GenerationRequest, HttpReject
from edgepack.runtime.server.engine import Job, Reservation, Stop

if TYPE_CHECKING:
    from edgepack.runtime.server.decoding import Plan
    from edgepack.runtime.server.serve import ModelServer

# Text runs about 2-6 bytes per token; 32 is far above any real prompt that fits the context,
# and low enough that the largest prompt tokenized at n_ctx 4096 (128 KiB) takes well under a
# second even when it is nothing but special-token text.
MAX_PROMPT_BYTES_PER_TOKEN = 32
TOKENIZE_POLL_S = 0.1  # how often a request waiting for its tokens checks its client and shutdown


def check_host(headers: Message, app: ModelServer) -> None:
    """403 unless the Host header names this loopback server (when the host check is on)."""
    if not app.host_check:
        return
    host = (headers.get("Host") or "").strip().lower()
    if not host:
        return  # HTTP/1.0 clients may omit it
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if name not in app.config.allowed_hosts and name != app.config.host.lower():
        raise HttpReject(403, f"Host {host!r} is not allowed on this loopback server",
                         reason="forbidden_host", error_type="permission_error")


def check_auth(headers: Message, api_key: str | None) -> None:
    """401 unless ``Authorization: Bearer <api_key>`` (constant-time compare); no key, no check."""
    if api_key is None:
        return
    given = headers.get("Authorization") or ""
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise HttpReject(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                         reason="unauthorized", error_type="authentication_error",
                         headers={"WWW-Authenticate": 'Bearer realm="edgepack"'})


def declared_length(headers: Message) -> int | None:
    """``Content-Length`` as a number; None when absent or not plain ASCII digits."""
    raw = (headers.get("Content-Length") or "").strip()
    if not (raw.isascii() and raw.isdigit()):  # "²".isdigit(), but int("²") fails
        return None
    return int(raw) if len(raw) < 40 else 10 ** 40  # past any limit; int() refuses 4300+ digits


def body_length(headers: Message, limit: int) -> int:
    """The body's length in bytes, once its type and size are acceptable (nothing read yet)."""
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HttpReject(415, "send the body as JSON with Content-Type: application/json",
                         reason="unsupported_media_type")
    if headers.get("Transfer-Encoding"):
        raise HttpReject(411, "chunked request bodies are not supported; send Content-Length",
                         reason="invalid_request")
    if len({v.strip() for v in headers.get_all("Content-Length") or []}) > 1:  # a request-smuggling shape
        raise HttpReject(400, "the request has conflicting Content-Length headers; send one",
                         reason="invalid_request")
    length = declared_length(headers)
    if length is None:
        raise HttpReject(411, "a Content-Length header is required", reason="invalid_request")
    if length > limit:
        raise HttpReject(413, f"request body is {length} bytes; the limit is {limit}", reason="body_too_large")
    return length


def parse_json_body(raw: bytes, length: int) -> Any:
    """The JSON document in ``raw``; ConnectionResetError when the client sent less than ``length``."""
    if len(raw) < length:
        raise ConnectionResetError("the client closed the connection mid-body")

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpReject(400, f"the body is not valid JSON: {exc}", reason="invalid_request") from None
    where = lone_surrogate(body)
    if where is not None:
        raise HttpReject(400, f"{where[0]} holds a lone UTF-16 surrogate ({where[1]}), which is not valid Unicode "
                              "text; send each character whole (a surrogate pair, or the UTF-8 bytes)",
                         reason="invalid_request")
    return body


def _surrogate(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"


def lone_surrogate(body: Any) -> tuple[str, str] | None:
    """(where, which) for a string of ``body`` (a key or a value) holding a lone surrogate,
    e.g. ``("messages[0].content", "\\ud800")``; None when every string is valid Unicode."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:  # iterative: the body may nest as deep as the JSON parser allowed
        value, where = stack.pop()
        if isinstance(value, str):
            found = _surrogate(value)
            if found is not None:
                return where or "the body", found
        elif isinstance(value, dict):
            for key, item in value.items():
                found = _surrogate(key)
                if found is not None:
                    return f"a key of {where or 'the body'}", found
                name = key if len(key) <= 40 else key[:40] + "..."  # a 1 MB key is no name for a message
                stack.append((item, f"{where}.{name}" if where else name))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def prompt_bytes(req: GenerationRequest) -> int:
    """UTF-8 size of the text a request asks the model to read (the largest of its prompts)."""
    if req.kind == "chat":
        return sum(len(m["content"].encode("utf-8", "surrogatepass"))
                   + len(m.get("name", "").encode("utf-8", "surrogatepass")) for m in req.messages or [])
    return max((len(p.encode("utf-8", "surrogatepass")) for p in req.prompts if isinstance(p, str)), default=0)


def check_prompt_size(req: GenerationRequest, n_ctx: int) -> None:
    """400 for a prompt too large to fit ``n_ctx`` tokens at any plausible density, before
    anything tokenizes it."""
    limit = n_ctx * MAX_PROMPT_BYTES_PER_TOKEN
    size = prompt_bytes(req)
    if size > limit:
        raise HttpReject(400, f"the prompt is {size} bytes; this model's context of {n_ctx} tokens takes at most "
                              f"{limit} bytes of prompt ({MAX_PROMPT_BYTES_PER_TOKEN} per token), so it was "
                              "refused before tokenizing (shorten the prompt)", reason="context_overflow",
                         param="messages" if req.kind == "chat" else "prompt")


def prompt_tokens(backend: Any, req: GenerationRequest, app: ModelServer) -> list[int]:
    """Token ids of ``req``'s prompt (chat: rendered by the model's template)."""
    try:
        if req.kind == "chat":
            if app.chat_problem is not None:
                raise HttpReject(500, f"this model cannot chat: {app.chat_problem}", reason="model_error",
                                 error_type="server_error")
            return list(backend.chat_tokens(req.messages))
        return list(backend.tokenize(req.prompt, add_special=True, parse_special=True))
    except UsageError as exc:
        raise HttpReject(400, str(exc), reason="invalid_request", param="messages") from None
    except (UnsafeModelError, InvalidModelFile) as exc:
        # The template rendered a plain chat at start-up (ModelServer.load), so what fails here
        # failed on these messages: the request is refused, the server carries on.
        raise HttpReject(400, f"the model's chat template failed on these messages: {exc}",
                         reason="invalid_request", param="messages") from None


def tokenize_within(app: ModelServer, req: GenerationRequest, reservation: Reservation, deadline: float,
                    gone: Callable[[], bool]) -> list[int]:
    """:func:`prompt_tokens` on a worker thread, waited for until ``deadline`` (time.monotonic).

    A llama.cpp call cannot be interrupted, so a request past its deadline (or whose client
    left, or whose server is stopping) ends with :class:`Stop` while the worker finishes in the
    background; the worker then holds the model and the request's queue place (it takes
    ``reservation`` over) until it returns, so its CPU time stays counted against the queue.
    """
    done = threading.Event()
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def work() -> None:
        try:
            with app.using_model() as backend:
                state["tokens"] = prompt_tokens(backend, req, app)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            state["error"] = exc
        finally:
            with lock:
                state["finished"] = True
                kept = state.get("kept")
            if kept is not None:
                kept.release()
            done.set()

    threading.Thread(target=work, name="edgepack-tokenize", daemon=True).start()
    while not done.wait(max(0.0, min(TOKENIZE_POLL_S, deadline - time.monotonic()))):
        reason = ("shutting_down" if app.cancel.is_set() else "deadline" if time.monotonic() >= deadline
                  else "client_disconnect" if gone() else None)
        if reason is None:
            continue
        with lock:
            if not state.get("finished"):
                state["kept"] = reservation.transfer()
                raise Stop(reason, "the request ended while its prompt was being tokenized"
                           + (" (its deadline passed)" if reason == "deadline" else ""))
        break
    if "error" in state:
        raise state["error"]
    return state["tokens"]


def fit_job(tokens: list[int], plan: Plan, app: ModelServer) -> Job:
    """The :class:`Job` for ``plan``'s ``tokens``, once they (and an explicit ``max_tokens``) fit
    the context; a default ``max_tokens`` (the task's or the server's) is capped to what is left."""
    req = plan.request
    room = app.n_ctx - len(tokens)
    if room <= 0:
        raise HttpReject(400, f"the prompt has {len(tokens)} tokens; this model's context holds {app.n_ctx} "
                              "(shorten the prompt)", reason="context_overflow",
                         param="messages" if req.kind == "chat" else "prompt")
    if req.max_tokens is not None and req.max_tokens > room:
        raise HttpReject(400, f"max_tokens {req.max_tokens} plus the prompt's {len(tokens)} tokens exceeds "
                              f"this model's context of {app.n_ctx} tokens", reason="context_overflow",
                         param="max_tokens")
    max_tokens = req.max_tokens if req.max_tokens is not None else min(plan.default_max_tokens, room)
    return Job(prompt_tokens=tokens, max_tokens=max_tokens, temperature=float(req.temperature or 0.0), seed=req.seed,
               stop=req.stop or (), repeat_penalty=plan.repeat_penalty, json_schema=plan.json_schema,
               sampling=req.sampling, logprobs=req.logprobs)


def check_token_ids(ids: tuple[int, ...], vocab_size: int | None) -> list[int]:
    """A token-id prompt as sent, once every id is in the vocabulary (400)."""
    if vocab_size is None:
        raise HttpReject(400, "this backend does not take token-id prompts; send text", reason="invalid_request",
                         param="prompt")
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise HttpReject(400, f"prompt token id {bad[0]} is outside this model's vocabulary (0-{vocab_size - 1})",
                         reason="invalid_request", param="prompt")
    return list(ids)


class PeerWatch:
    """Tells, without blocking, whether the client closed its side of the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._poll = select.poll() if hasattr(select, "poll") else None
        if self._poll is not None:
            self._poll.register(sock, select.POLLIN | select.POLLPRI)

    def gone(self) -> bool:
        try:
            if self._poll is not None:
                events = self._poll.poll(0)
                if not events:
                    return False
                if any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in events):
                    return True
            elif not select.select([self._sock], [], [], 0)[0]:
                return False
            # Readable: either more bytes (a pipelined request; the client is still there) or EOF.
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True
