"""What a request must pass before it reaches the model: Host, API key, body, context.

Each check is a function of the request's headers (and the server's settings) that raises
:class:`~edgepack.runtime.server_api.HttpReject` with the status to answer:

- :func:`check_host` — a loopback server without a key answers only ``Host: localhost /
  127.0.0.1 / ::1`` (DNS rebinding; 403);
- :func:`check_auth` — ``Authorization: Bearer <key>`` when a key is set (401);
- :func:`body_length` — ``Content-Type: application/json`` (415), a ``Content-Length`` and
  no chunked body (411), at most ``max_body_bytes`` (413), all before a byte is read;
- :func:`parse_json_body` — strict JSON (no NaN/Infinity, bounded nesting; 400);
- :func:`build_job` — tokenize outside the model lock and refuse a prompt (or prompt plus
  ``max_tokens``) beyond the context at once (400).

:func:`drain` discards a bounded unread body after an early error reply (413, 411, 401, ...)
so the client reads the reply instead of a reset; :class:`PeerWatch` tells, without blocking,
whether the client has gone (a queued or generating request then frees its slot).
"""

from __future__ import annotations

import hmac
import io
import json
import select
import socket
import time
from email.message import Message
from typing import TYPE_CHECKING, Any

from edgepack.errors import InvalidModelFile, UnsafeModelError, UsageError
from edgepack.runtime.server_api import GenerationRequest, HttpReject
from edgepack.runtime.server_engine import Job

if TYPE_CHECKING:
    from edgepack.runtime.server import ModelServer

# An unread body after an early error reply is read and discarded until the client has sent
# it all, closes, or pauses DRAIN_IDLE_S, but at most DRAIN_LIMIT_BYTES or DRAIN_SECONDS: a
# bounded cost per connection (connections are capped) that covers a 64 MiB upload at ~15 MB/s.
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024
DRAIN_SECONDS = 5.0
DRAIN_IDLE_S = 1.0


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
        return json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpReject(400, f"the body is not valid JSON: {exc}", reason="invalid_request") from None


def drain(headers: Message, rfile: io.BufferedIOBase, connection: socket.socket) -> int:
    """Discard the request body after the reply has gone out; the number of bytes discarded.

    Closing a socket with unread bytes makes the kernel answer with a reset, and a client still
    sending its body (``http.client`` sends it all before it reads) then fails on the send and
    never reads the reply. So: ``shutdown(SHUT_WR)`` first (the reply is complete and a client
    that reads while it sends sees it with EOF at once), then read and discard up to the declared
    ``Content-Length`` (until EOF when chunked or undeclared), within the bounds above. A body
    beyond them still ends in a reset, after the reply and its EOF were sent.
    """
    declared = None if headers.get("Transfer-Encoding") else declared_length(headers)
    left = DRAIN_LIMIT_BYTES if declared is None else min(declared, DRAIN_LIMIT_BYTES)
    deadline = time.monotonic() + DRAIN_SECONDS
    done = 0
    try:
        connection.shutdown(socket.SHUT_WR)
        while left > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            connection.settimeout(min(DRAIN_IDLE_S, remaining))
            chunk = rfile.read1(min(left, 1 << 16))  # what has arrived, without waiting for more
            if not chunk:
                break
            left -= len(chunk)
            done += len(chunk)
    except (OSError, ValueError):
        pass  # timed out, reset by the client, or already closed: nothing more to discard
    return done


def build_job(backend: Any, req: GenerationRequest, app: ModelServer) -> Job:
    """Tokenize ``req`` and check it fits the context; the :class:`Job` to run."""
    try:
        if req.kind == "chat":
            if app.chat_problem is not None:
                raise HttpReject(500, f"this model cannot chat: {app.chat_problem}", reason="model_error",
                                 error_type="server_error")
            tokens = backend.chat_tokens(req.messages)
        else:
            tokens = backend.tokenize(req.prompt, add_special=True, parse_special=True)
    except UsageError as exc:
        raise HttpReject(400, str(exc), reason="invalid_request", param="messages") from None
    except (UnsafeModelError, InvalidModelFile) as exc:
        raise HttpReject(500, str(exc), reason="model_error", error_type="server_error") from None
    room = app.n_ctx - len(tokens)
    if room <= 0:
        raise HttpReject(400, f"the prompt has {len(tokens)} tokens; this model's context holds {app.n_ctx} "
                              "(shorten the prompt)", reason="context_overflow",
                         param="messages" if req.kind == "chat" else "prompt")
    if req.max_tokens is not None and req.max_tokens > room:
        raise HttpReject(400, f"max_tokens {req.max_tokens} plus the prompt's {len(tokens)} tokens exceeds "
                              f"this model's context of {app.n_ctx} tokens", reason="context_overflow",
                         param="max_tokens")
    max_tokens = req.max_tokens or min(app.config.default_max_tokens, room)
    return Job(prompt_tokens=tokens, max_tokens=max_tokens, temperature=req.temperature, seed=req.seed,
               stop=req.stop)


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
