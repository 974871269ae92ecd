"""The HTTP side of the model server: connection cap, routing, checks, answers and SSE.

:class:`HTTPServer` is a ``ThreadingHTTPServer`` (one thread per connection) that refuses
connections past ``max_connections`` with a fixed 503 before spawning a thread.
:class:`Handler` answers one request per connection (HTTP/1.0): it checks the Host header,
the API key, the content type and the body size before parsing JSON, validates the request
(:mod:`edgepack.runtime.server_api`), tokenizes it outside the model lock to refuse an
over-long prompt at once, then waits for the model (:class:`~.server_engine.Scheduler`) and
generates (:func:`~.server_engine.run_job`), streaming SSE chunks or answering once.

While a generation runs, the handler polls its socket before every token: a client that
closed the connection ends the generation (recorded as status 499) and frees the model.
"""

from __future__ import annotations

import hmac
import json
import os
import select
import socket
import socketserver
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from edgepack.errors import InvalidModelFile, RuntimeFailure, UnsafeModelError, UsageError
from edgepack.runtime.server_api import (GenerationRequest, HttpReject, chunk_body, completion_body, error_body,
                                         new_id, parse_request, usage)
from edgepack.runtime.server_engine import Job, Outcome, Stop, run_job
from edgepack.runtime.server_fallback import consult_teacher, teacher_text, teacher_usage
from edgepack.runtime.server_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from edgepack.runtime.server import ModelServer

DRAIN_LIMIT_BYTES = 16 * 1024 * 1024  # unread body swallowed after an early error reply
LOGPROB_BASIS = ("mean natural-log probability of the generated tokens under the model's own "
                 "distribution (temperature 1, before sampling filters)")
SAMPLING = "temperature 0 = greedy; above 0 llama.cpp samples with top-k 40, top-p 0.95, min-p 0.05"
_STOP_REPLY = {  # Stop reason -> (status, OpenAI error type)
    "queue_full": (429, "rate_limit_error"),
    "deadline": (504, "timeout_error"),
    "shutting_down": (503, "server_error"),
}
# (method, path) -> handler method; the endpoint label in /metrics is the path.
ROUTES = {
    ("GET", "/health"): "_health",
    ("GET", "/metrics"): "_metrics",
    ("GET", "/v1/models"): "_models",
    ("POST", "/v1/chat/completions"): "_chat",
    ("POST", "/v1/completions"): "_completion",
}
_PATHS = {path for _, path in ROUTES}


class HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound for one :class:`~edgepack.runtime.server.ModelServer`."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: ModelServer) -> None:
        self.app = app
        self._open = 0
        self._open_lock = threading.Lock()
        try:
            self.address_family = socket.getaddrinfo(address[0] or None, address[1], type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE)[0][0]
        except OSError as exc:
            raise UsageError(f"cannot listen on {address[0]!r}: {exc}") from exc
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = self._open >= self.app.config.max_connections
            if not full:
                self._open += 1
        if full:
            self.app.metrics.reject("too_many_connections")
            self.app.metrics.request("other", 503)
            body = json.dumps(error_body("too many open connections; retry later", "server_error",
                                         code="too_many_connections")).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.app.metrics.gauges(connections_delta=1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._open_lock:
            self._open -= 1
        self.app.metrics.gauges(connections_delta=-1)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if os.environ.get("EDGEPACK_DEBUG") == "1":
            traceback.print_exc()


class _PeerWatch:
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


class Handler(BaseHTTPRequestHandler):
    """One request per connection; every error is an OpenAI-style JSON body."""

    server: HTTPServer
    server_version = "edgepack"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.app.config.read_timeout_s
        super().setup()
        self._endpoint = "other"
        self._status: int | None = None
        self._streaming = False
        self._recorded = False
        self._body_read = True

    @property
    def app(self) -> ModelServer:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: /metrics counts requests; library code does not print."""

    # --- dispatch -----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")  # no CORS: a browser preflight gets 405 and no Allow-Origin

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        model_path = path.startswith("/v1/models/")
        self._endpoint = path if path in _PATHS else ("/v1/models" if model_path else "other")
        self._body_read = method != "POST"
        try:
            self._check_host()
            route = ROUTES.get((method, path)) or ("_model" if method == "GET" and model_path else None)
            if route is None:
                if path in _PATHS or model_path:
                    allowed = ", ".join(sorted(m for m, p in ROUTES if p == path) or ["GET"])
                    raise HttpReject(405, f"{method} is not allowed on {path}", reason="method_not_allowed",
                                     headers={"Allow": allowed})
                raise HttpReject(404, f"no such endpoint: {path}", reason="not_found")
            if path != "/health":
                self._check_auth()
            getattr(self, route)()
        except HttpReject as rej:
            self.app.metrics.reject(rej.reason)
            self._fail(rej.status, rej.body(), rej.headers)
            self._drain()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.app.metrics.reject("client_disconnect")
            self._status = 499
        except Exception as exc:  # noqa: BLE001 - one reply for anything unexpected, never a dead socket
            if os.environ.get("EDGEPACK_DEBUG") == "1":
                traceback.print_exc()
            self.app.metrics.reject("internal_error")
            self._fail(500, error_body(f"internal error: {type(exc).__name__}", "server_error",
                                       code="internal_error"))
        finally:
            self._record()
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, oversized headers) as JSON too."""
        self._endpoint = "other"
        self.app.metrics.reject("invalid_request" if code < 500 else
                                "method_not_allowed" if code == 501 else "internal_error")
        self.close_connection = True
        self._try_send_json(code, error_body(message or "bad request", "invalid_request_error", code=str(code)))

    # --- checks -------------------------------------------------------------------------
    def _check_host(self) -> None:
        if not self.app.host_check:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        if not host:
            return  # HTTP/1.0 clients may omit it
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name not in self.app.config.allowed_hosts and name != self.app.config.host.lower():
            raise HttpReject(403, f"Host {host!r} is not allowed on this loopback server",
                             reason="forbidden_host", error_type="permission_error")

    def _check_auth(self) -> None:
        key = self.app.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise HttpReject(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                             reason="unauthorized", error_type="authentication_error",
                             headers={"WWW-Authenticate": 'Bearer realm="edgepack"'})

    def _read_json(self) -> Any:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpReject(415, "send the body as JSON with Content-Type: application/json",
                             reason="unsupported_media_type")
        if self.headers.get("Transfer-Encoding"):
            raise HttpReject(411, "chunked request bodies are not supported; send Content-Length",
                             reason="invalid_request")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            raise HttpReject(411, "a Content-Length header is required", reason="invalid_request")
        length = int(raw_length)
        limit = self.app.config.max_body_bytes
        if length > limit:
            raise HttpReject(413, f"request body is {length} bytes; the limit is {limit}", reason="body_too_large")
        raw = self.rfile.read(length)
        self._body_read = True
        if len(raw) < length:
            raise ConnectionResetError("the client closed the connection mid-body")

        def reject_constant(name: str) -> None:
            raise ValueError(f"{name} is not valid JSON")

        try:
            return json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
        except (ValueError, RecursionError) as exc:
            raise HttpReject(400, f"the body is not valid JSON: {exc}", reason="invalid_request") from None

    def _drain(self) -> None:
        """Swallow an unread body (bounded) so the client reads our reply, not a reset."""
        if self._body_read:
            return
        self._body_read = True
        try:
            left = min(int(self.headers.get("Content-Length") or 0), DRAIN_LIMIT_BYTES)
            self.connection.settimeout(2.0)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    # --- writing ------------------------------------------------------------------------
    def _record(self) -> None:
        """Count this request once, before its last bytes go out (a client reading a
        Content-Length reply may otherwise see /metrics before the count)."""
        if not self._recorded:
            self._recorded = True
            self.app.metrics.request(self._endpoint, self._status or 499)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._start(status, "application/json", headers, length=len(data))
        self._record()
        self.wfile.write(data)

    def _try_send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        if self._status is not None:
            return
        try:
            self._send_json(status, obj, headers)
        except OSError:
            pass

    def _fail(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """An error reply; once a stream has begun the status line is gone, so it becomes the
        stream's last event (no ``[DONE]`` follows, as with OpenAI)."""
        if self._status is None:
            self._try_send_json(status, body, headers)
        elif self._streaming:
            self._record()
            try:
                self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            except OSError:
                pass

    def _start(self, status: int, content_type: str, headers: dict[str, str] | None = None,
               length: int | None = None) -> None:
        self._status = status
        self._streaming = content_type == "text/event-stream"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _sse(self, obj: Any) -> None:
        try:
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
        except (OSError, ValueError) as exc:
            gone = isinstance(exc, TimeoutError) and time.monotonic() >= self._deadline
            raise Stop("deadline" if gone else "client_disconnect", f"stream write failed: {exc}") from None

    # --- small endpoints ----------------------------------------------------------------
    def _health(self) -> None:
        if self.app.ready:
            self._send_json(200, {"status": "ok", "model": self.app.model_id})
        else:
            state = "stopping" if self.app.closing else "loading"
            self._send_json(503, {"status": state}, {"Retry-After": "1"})

    def _metrics(self) -> None:
        data = self.app.metrics.render().encode("utf-8")
        self._start(200, METRICS_CONTENT_TYPE, length=len(data))
        self._record()
        self.wfile.write(data)

    def _model_card(self) -> dict[str, Any]:
        app = self.app
        meta = dict(app.identity, n_ctx=app.n_ctx, max_queue=app.config.max_queue,
                    timeout_s=app.config.timeout_s, default_max_tokens=app.config.default_max_tokens,
                    sampling=SAMPLING, logprob_basis=LOGPROB_BASIS, chat_available=app.chat_problem is None,
                    fallback=app.config.fallback.describe() if app.config.fallback else None,
                    fallback_min_logprob=app.config.fallback_min_logprob)
        return {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "edgepack",
                "edgepack": meta}

    def _models(self) -> None:
        with self.app.using_model():
            self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self) -> None:
        wanted = unquote(urlsplit(self.path).path)[len("/v1/models/"):]
        with self.app.using_model():
            if wanted != self.app.model_id:
                raise HttpReject(404, f"model {wanted!r} is not served here; this server serves "
                                      f"{self.app.model_id!r}", reason="not_found")
            self._send_json(200, self._model_card())

    # --- generation ---------------------------------------------------------------------
    def _chat(self) -> None:
        self._generate("chat")

    def _completion(self) -> None:
        self._generate("completion")

    def _generate(self, kind: str) -> None:
        app = self.app
        t0 = time.monotonic()
        self._deadline = t0 + app.config.timeout_s
        with app.using_model() as backend:
            req = parse_request(self._read_json(), kind)
            if req.model is not None and req.model != app.model_id:
                raise HttpReject(404, f"model {req.model!r} is not served here; this server serves "
                                      f"{app.model_id!r}", reason="not_found", param="model")
            job = self._job(backend, req)
            watch = _PeerWatch(self.connection)
            # With a fallback the answer is only known once complete, so a stream is buffered.
            live = req.stream and app.config.fallback is None
            try:
                app.scheduler.acquire(self._deadline, watch.gone)
            except Stop as stop:
                self._count_stop(stop, 0)
                self._reply_stop(stop)
                return
            stopped: Stop | None = None
            try:
                queued_s = time.monotonic() - t0
                if live:
                    self._open_stream(req)
                outcome = self._run(backend, job, watch, req if live else None)
            except Stop as stop:
                stopped = stop
                self._count_stop(stop, len(job.prompt_tokens))  # counted before the next request runs
            finally:
                app.scheduler.release()
            if stopped is not None:
                self._reply_stop(stopped)
                return
            if live:
                self._finish_stream(req, job, outcome, queued_s, t0, None)
                return
        self._answer(req, job, outcome, queued_s, t0)

    def _job(self, backend: Any, req: GenerationRequest) -> Job:
        app = self.app
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

    def _should_stop(self, watch: _PeerWatch) -> str | None:
        if self.app.cancel.is_set():
            return "shutting_down"
        if time.monotonic() >= self._deadline:
            return "deadline"
        if watch.gone():
            return "client_disconnect"
        return None

    def _run(self, backend: Any, job: Job, watch: _PeerWatch, stream: GenerationRequest | None) -> Outcome:
        """Generate (the caller holds the model); with ``stream``, send each piece as an SSE chunk."""
        emit = None
        if stream is not None:
            kind, (rid, created), model = stream.kind, self._stream_ids, self.app.model_id

            def emit(text: str) -> None:
                self._sse(chunk_body(kind, rid, created, model, text=text))
        self._gen_started = time.monotonic()
        try:
            outcome = run_job(backend, job, should_stop=lambda: self._should_stop(watch), emit=emit)
        except RuntimeFailure as exc:
            self.app.metrics.tokens(len(job.prompt_tokens), 0)
            raise HttpReject(500, str(exc), reason="model_error", error_type="server_error") from None
        self.app.metrics.tokens(len(job.prompt_tokens), outcome.completion_tokens)
        return outcome

    def _count_stop(self, stop: Stop, prompt_tokens: int) -> None:
        self.app.metrics.reject(stop.reason)
        if prompt_tokens:
            self.app.metrics.tokens(prompt_tokens, stop.completion_tokens)
        if stop.reason == "client_disconnect":
            self._status = 499  # nginx's "client closed request", also when a stream had begun
            self._record()

    def _reply_stop(self, stop: Stop) -> None:
        """Tell a client whose request ended early why (nobody to tell after a disconnect)."""
        if stop.reason == "client_disconnect":
            return
        status, error_type = _STOP_REPLY[stop.reason]
        message = str(stop)
        if stop.reason == "deadline":
            message = f"the request ran past its {self.app.config.timeout_s:g} s deadline ({stop})"
        if self._streaming:  # a reader that stalled the stream must not stall this too
            self.connection.settimeout(1.0)
        self._fail(status, error_body(message, error_type, code=stop.reason),
                   {"Retry-After": "1"} if status in (429, 503) else None)

    def _open_stream(self, req: GenerationRequest) -> None:
        """Status line, headers and the opening chunk of an SSE reply."""
        self._stream_ids = (new_id(req.kind), int(time.time()))
        rid, created = self._stream_ids
        remaining = max(0.05, self._deadline - time.monotonic())
        self.connection.settimeout(min(self.app.config.read_timeout_s, remaining))
        self._start(200, "text/event-stream", {"X-Accel-Buffering": "no"})
        self._sse(chunk_body(req.kind, rid, created, self.app.model_id, role=True))

    def _finish_stream(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float, t0: float,
                       decided: dict[str, Any] | None) -> None:
        rid, created = self._stream_ids
        if decided is None:  # live stream: the text went out already
            text, finish = None, outcome.finish_reason
            use, meta = usage(len(job.prompt_tokens), outcome.completion_tokens), self._meta(outcome, queued_s)
        else:
            text, finish, use, meta = decided["text"], decided["finish"], decided["usage"], decided["meta"]
        try:
            if text:
                self._sse(chunk_body(req.kind, rid, created, self.app.model_id, text=text))
            last = chunk_body(req.kind, rid, created, self.app.model_id, finish_reason=finish)
            if req.include_usage:
                self._sse(last)
                last = dict(chunk_body(req.kind, rid, created, self.app.model_id), choices=[])
            last.update(usage=use, edgepack=meta)
            self._sse(last)
            self._observe(t0, outcome)
            self._record()
            self.wfile.write(b"data: [DONE]\n\n")
        except (Stop, OSError):
            self.app.metrics.reject("client_disconnect")
            self._status = 499

    def _answer(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float, t0: float) -> None:
        """Reply with the student's answer, or the teacher's when the fallback takes over."""
        decided = self._decide(req, job, outcome, queued_s, t0)
        if req.stream:  # fallback configured: the stream was buffered to decide first
            try:
                self._open_stream(req)
            except Stop:
                self.app.metrics.reject("client_disconnect")
                self._status = 499
                return
            self._finish_stream(req, job, outcome, queued_s, t0, decided)
            return
        body = completion_body(req.kind, new_id(req.kind), self.app.model_id, decided["text"], decided["finish"],
                               decided["usage"], decided["meta"])
        self._observe(t0, outcome)
        self._send_json(200, body)

    def _observe(self, t0: float, outcome: Outcome) -> None:
        ttft = None if outcome.first_token_s is None else self._gen_started - t0 + outcome.first_token_s
        self.app.metrics.timing(self._endpoint, time.monotonic() - t0, ttft)

    def _meta(self, outcome: Outcome, queued_s: float) -> dict[str, Any]:
        decode_s = outcome.generate_s - (outcome.first_token_s or 0.0)
        timings = {"queued_ms": round(queued_s * 1000, 2),
                   "first_token_ms": None if outcome.first_token_s is None
                   else round(outcome.first_token_s * 1000, 2),
                   "generate_ms": round(outcome.generate_s * 1000, 2),
                   "decode_tokens_per_s": round((outcome.completion_tokens - 1) / decode_s, 2)
                   if outcome.completion_tokens > 1 and decode_s > 0 else None}
        return dict(self.app.identity, served_by="student",
                    mean_token_logprob=None if outcome.mean_logprob is None else round(outcome.mean_logprob, 6),
                    fallback=None, timings=timings)

    def _decide(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float,
                t0: float) -> dict[str, Any]:
        """Student or teacher: text, finish reason, usage and metadata of the reply."""
        app = self.app
        student_usage = usage(len(job.prompt_tokens), outcome.completion_tokens)
        meta = self._meta(outcome, queued_s)
        student = {"text": outcome.text, "finish": outcome.finish_reason, "usage": student_usage, "meta": meta}
        if app.config.fallback is None or app.config.fallback_min_logprob is None:
            return student
        verdict = consult_teacher(app.config.fallback, app.config.fallback_min_logprob, req,
                                  max_tokens=job.max_tokens, mean_logprob=outcome.mean_logprob,
                                  remaining_s=self._deadline - time.monotonic())
        app.metrics.fallback(verdict.outcome)
        meta["fallback"] = verdict.info
        if verdict.answer is None:
            return student
        text, finish = teacher_text(verdict.answer, req.kind)
        t_usage = teacher_usage(verdict.answer)
        verdict.info.update(student_usage=student_usage, teacher_usage_missing=t_usage is None)
        return {"text": text, "finish": finish, "usage": t_usage, "meta": dict(meta, served_by="teacher")}
