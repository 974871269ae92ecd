"""The HTTP side of the model server: handler threads, routing, replies and small endpoints.

:class:`HTTPServer` is a ``ThreadingHTTPServer`` whose accept loop is the
:class:`~edgepack.runtime.server.intake.Intake`: connections are collected there, without a
thread, until their request has arrived (headers and body within their deadlines), so idle or
dripping clients cannot hold the handlers (slowloris). A complete request gets a handler thread
unless ``max_connections`` requests are already being handled (then a fixed 503 at once).
:class:`Handler` answers one request (HTTP/1.1): it routes by method and path
(:data:`ROUTES`), checks the Host header and the API key
(:mod:`~edgepack.runtime.server.request`), answers ``/health``, ``/metrics`` and
``/v1/models`` itself and hands generation to
:class:`~edgepack.runtime.server.stream.Generation`. Every error becomes an OpenAI-style JSON
body, counted once in ``/metrics``.

Keep-alive: a reply with a ``Content-Length`` to a client that keeps the connection (HTTP/1.1
without ``Connection: close``, or HTTP/1.0 with ``Connection: keep-alive``) whose request was
read whole (no unread body, nothing pipelined after it) says ``Connection: keep-alive``, and the
socket goes back to the intake (:meth:`~edgepack.runtime.server.intake.Intake.keep`) to wait
for its next request under the same deadlines as a new connection, plus an idle timeout; no
thread waits on it. Streams, errors before the body was read and a stopping server close it.
"""

from __future__ import annotations

import io
import json
import os
import socket
import socketserver
import threading
import traceback
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from edgepack.errors import UsageError
from edgepack.runtime.server.api import MAX_N, HttpReject, error_body
from edgepack.runtime.server.intake import (DRAIN_LIMIT_BYTES, Arrival, Intake, IntakeLimits, PrefixedReader,
                                            SocketWriter, canned_reply, send_and_close)
from edgepack.runtime.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edgepack.runtime.server.request import body_length, check_auth, check_host, declared_length, parse_json_body
from edgepack.runtime.server.stream import Generation

if TYPE_CHECKING:
    from edgepack.runtime.server.serve import ModelServer

LOGPROB_BASIS = ("mean natural-log probability of the generated tokens under the model's own "
                 "distribution (temperature 1, before sampling filters)")
SAMPLING = ("temperature 0 = greedy; above 0 llama.cpp samples with top-k 40, top-p 0.95, min-p 0.05 unless "
            "the request sets top_k/top_p/min_p; repeat_penalty, presence_penalty and frequency_penalty are "
            "llama.cpp's, over the last 64 tokens of prompt and answer")
# (method, path) -> handler method; the endpoint label in /metrics is the path.
ROUTES = {
    ("GET", "/health"): "_health",
    ("GET", "/metrics"): "_metrics",
    ("GET", "/v1/models"): "_models",
    ("POST", "/v1/chat/completions"): "_chat",
    ("POST", "/v1/completions"): "_completion",
}
_PATHS = {path for _, path in ROUTES}


def request_path(target: str) -> str:
    """The decoded path of a request target; ``""`` when the target is not a URL at all
    (``urlsplit`` refuses an unclosed ``[`` as a bad IPv6 host)."""
    try:
        return unquote(urlsplit(target).path)
    except ValueError:
        return ""


class HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound for one :class:`~edgepack.runtime.server.serve.ModelServer`,
    fed by an :class:`~edgepack.runtime.server.intake.Intake` instead of a blocking accept."""

    daemon_threads = True
    request_queue_size = 128

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
        config = app.config
        self.intake = Intake(self.socket, IntakeLimits(header_timeout_s=config.header_timeout_s,
                                                       body_timeout_s=config.body_timeout_s,
                                                       max_pending=config.max_pending,
                                                       max_pending_per_client=config.max_pending_per_client,
                                                       max_buffered_bytes=2 * config.max_body_bytes,
                                                       keepalive_idle_s=config.keepalive_s),
                             app.metrics, self.body_to_collect, self.dispatch, config.max_connections)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.intake.serve(poll_interval)

    def shutdown(self) -> None:
        self.intake.stop()

    def server_close(self) -> None:
        super().server_close()
        self.intake.close()

    def body_to_collect(self, method: str, target: str, headers: Message) -> int:
        """Bytes of body the intake collects before handing the request over: the declared
        length of a POST to a generation endpoint that passes the Host, key, type and size
        checks; 0 (hand over now, the handler refuses it) for anything else."""
        if method != "POST" or ROUTES.get(("POST", request_path(target))) not in ("_chat", "_completion"):
            return 0
        try:
            check_host(headers, self.app)
            check_auth(headers, self.app.config.api_key)
            return body_length(headers, self.app.config.max_body_bytes)
        except HttpReject:
            return 0

    def dispatch(self, arrival: Arrival) -> None:
        """A handler thread for ``arrival``, or a fixed 503 when ``max_connections`` are busy
        (called by the intake's thread: nothing here may block)."""
        with self._open_lock:
            full = self._open >= self.app.config.max_connections
            if not full:
                self._open += 1
        if full:
            self.app.metrics.reject("too_many_connections")
            self.app.metrics.request("other", 503)
            send_and_close(arrival.sock, canned_reply(503, "Service Unavailable",
                                                      "too many requests are being handled; retry later",
                                                      "too_many_connections", retry=True))
            return
        self.app.metrics.gauges(connections_delta=1)
        try:
            self.process_request(arrival, arrival.address)
        except Exception:  # noqa: BLE001 - no thread to be had (the intake must go on)
            self._closed_one()
            self.app.metrics.reject("too_many_connections")
            self.app.metrics.request("other", 503)
            send_and_close(arrival.sock, canned_reply(503, "Service Unavailable", "no handler thread is available; "
                                                      "retry later", "too_many_connections", retry=True))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def shutdown_request(self, request: Any) -> None:
        """Close the connection, or give it back to the intake: to wait for the next request
        (keep-alive), or to discard an unread body."""
        if request.keep:
            self.intake.keep(request)
        elif request.drain_left > 0:
            self.intake.drain(request)
        else:
            try:
                request.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            request.sock.close()

    def _closed_one(self) -> None:
        with self._open_lock:
            self._open -= 1
        self.app.metrics.gauges(connections_delta=-1)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if os.environ.get("EDGEPACK_DEBUG") == "1":
            traceback.print_exc()


class Handler(BaseHTTPRequestHandler):
    """One request per handler thread; every error is an OpenAI-style JSON body."""

    server: HTTPServer
    server_version = "edgepack"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # The intake has read the request already; rfile serves those bytes, then the socket.
        arrival: Arrival = self.request
        self.connection = arrival.sock
        self.connection.settimeout(self.server.app.config.read_timeout_s)
        self.rfile = io.BufferedReader(PrefixedReader(arrival.data, self.connection))
        self.wfile = SocketWriter(self.connection)
        # What server_stream.Generation reads and sets besides the reply methods below:
        self.endpoint = "other"  # the /metrics label: the path when it is a known one
        self.status: int | None = None  # the status sent (499: the client went away); None: nothing sent
        self.streaming = False  # an SSE reply has begun: an error becomes the stream's last event
        self._recorded = False
        self._body_read = True
        self._consumed = arrival.head_end  # bytes of arrival.data this request used
        self.keep_alive = False  # decided per request in _dispatch; start_reply may still say close
        self.reply_headers: dict[str, str] = {}  # added to every reply (X-Edgepack-Ignored-Fields)

    def handle(self) -> None:
        """One request; a kept-alive connection's next one arrives through the intake again."""
        self.close_connection = True
        self.handle_one_request()

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
        path = request_path(self.path)
        model_path = path.startswith("/v1/models/")
        self.keep_alive = not self.close_connection and not self.app.closing  # what the client asked
        self.endpoint = path if path in _PATHS else ("/v1/models" if model_path else "other")
        # A body the handler never reads is drained after the reply (see _drain).
        self._body_read = method != "POST" and not self.headers.get("Content-Length") \
            and not self.headers.get("Transfer-Encoding")
        try:
            check_host(self.headers, self.app)
            if not path.startswith("/"):
                raise HttpReject(400, f"the request target {self.path[:200]!r} is not a path on this server",
                                 reason="invalid_request")
            route = ROUTES.get((method, path)) or ("_model" if method == "GET" and model_path else None)
            if route is None:
                if path in _PATHS or model_path:
                    allowed = ", ".join(sorted(m for m, p in ROUTES if p == path) or ["GET"])
                    raise HttpReject(405, f"{method} is not allowed on {path}", reason="method_not_allowed",
                                     headers={"Allow": allowed})
                raise HttpReject(404, f"no such endpoint: {path}", reason="not_found")
            if path != "/health":
                check_auth(self.headers, self.app.config.api_key)
            getattr(self, route)()
        except HttpReject as rej:
            self.app.metrics.reject(rej.reason)
            self.fail(rej.status, rej.body(), rej.headers)
            self._drain()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.app.metrics.reject("client_disconnect")
            self.status = 499
        except Exception as exc:  # noqa: BLE001 - one reply for anything unexpected, never a dead socket
            if os.environ.get("EDGEPACK_DEBUG") == "1":
                traceback.print_exc()
            self.app.metrics.reject("internal_error")
            self.fail(500, error_body(f"internal error: {type(exc).__name__}", "server_error",
                                      code="internal_error"))
            self._drain()
        finally:
            self.record()
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, oversized headers) as JSON too."""
        self.endpoint = "other"
        self.keep_alive = False
        self.app.metrics.reject("invalid_request" if code < 500 else
                                "method_not_allowed" if code == 501 else "internal_error")
        self.close_connection = True
        self._try_send_json(code, error_body(message or "bad request", "invalid_request_error", code=str(code)))

    # --- checks and the body -------------------------------------------------------------
    def read_json(self) -> Any:
        """The request body as JSON, after the type and size checks (415, 411, 413, 400)."""
        length = body_length(self.headers, self.app.config.max_body_bytes)
        raw = self.rfile.read(length)
        self._body_read = True
        self._consumed += length
        return parse_json_body(raw, length)

    def _drain(self) -> None:
        """Leave an unread body to the intake, which discards it (bounded) after the reply, so
        the client reads the reply, not a reset (:meth:`~edgepack.runtime.server.intake.Intake.drain`)."""
        if self._body_read:
            return
        self._body_read = True
        arrival: Arrival = self.request
        declared = None if self.headers.get("Transfer-Encoding") else declared_length(self.headers)
        received = len(arrival.data) - arrival.head_end
        arrival.drain_left = DRAIN_LIMIT_BYTES if declared is None else max(0, declared - received)

    # --- writing ------------------------------------------------------------------------
    def record(self) -> None:
        """Count this request once, before its last bytes go out (a client reading a
        Content-Length reply may otherwise see /metrics before the count)."""
        if not self._recorded:
            self._recorded = True
            self.app.metrics.request(self.endpoint, self.status or 499)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        try:
            data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (bodies holding one are refused): escape it
            data = json.dumps(obj).encode("ascii")
        self.start_reply(status, "application/json", headers, length=len(data))
        self.record()
        self.wfile.write(data)

    def _try_send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        if self.status is not None:
            return
        try:
            self.send_json(status, obj, headers)
        except OSError:
            pass

    def fail(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """An error reply; once a stream has begun the status line is gone, so it becomes the
        stream's last event (no ``[DONE]`` follows, as with OpenAI)."""
        if self.status is None:
            self._try_send_json(status, body, headers)
        elif self.streaming:
            self.record()
            try:
                self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            except OSError:
                pass

    def start_reply(self, status: int, content_type: str, headers: dict[str, str] | None = None,
                    length: int | None = None) -> None:
        """Status line and headers (no CORS headers, ever); whether the connection stays open
        is decided here, once the reply's framing is known (see the module docstring)."""
        self.status = status
        self.streaming = content_type == "text/event-stream"
        arrival: Arrival = self.request
        keep = (self.keep_alive and length is not None and self._body_read and not self.app.closing
                and self._consumed == len(arrival.data))
        arrival.keep = keep
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "keep-alive" if keep else "close")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in {**self.reply_headers, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()

    # --- small endpoints ----------------------------------------------------------------
    def _health(self) -> None:
        if self.app.ready:
            self.send_json(200, {"status": "ok", "model": self.app.model_id})
        else:
            state = "stopping" if self.app.closing else "loading"
            self.send_json(503, {"status": state}, {"Retry-After": "1"})

    def _metrics(self) -> None:
        data = self.app.metrics.render().encode("utf-8")
        self.start_reply(200, METRICS_CONTENT_TYPE, length=len(data))
        self.record()
        self.wfile.write(data)

    def _model_card(self) -> dict[str, Any]:
        app = self.app
        meta = dict(app.identity, n_ctx=app.n_ctx, max_queue=app.config.max_queue,
                    timeout_s=app.config.timeout_s, default_max_tokens=app.config.default_max_tokens,
                    sampling=SAMPLING, logprob_basis=LOGPROB_BASIS, chat_available=app.chat_problem is None,
                    constrains_json=bool(app.backend.constrains_json), max_n=MAX_N,
                    logprobs=bool(app.backend.serves_logprobs),
                    sampling_options=sorted(app.backend.sampling_options),
                    fallback=app.config.fallback.describe() if app.config.fallback else None,
                    fallback_min_logprob=app.config.fallback_min_logprob)
        return {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "edgepack",
                "edgepack": meta}

    def _models(self) -> None:
        with self.app.using_model():
            self.send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self) -> None:
        wanted = request_path(self.path)[len("/v1/models/"):]
        with self.app.using_model():
            if wanted != self.app.model_id:
                raise HttpReject(404, f"model {wanted!r} is not served here; this server serves "
                                      f"{self.app.model_id!r}", reason="not_found")
            self.send_json(200, self._model_card())

    # --- generation ---------------------------------------------------------------------
    def _chat(self) -> None:
        Generation(self, "chat").run()

    def _completion(self) -> None:
        Generation(self, "completion").run()
