"""An OpenAI-compatible HTTP server for one bundle or GGUF, on the standard library only.

``edgepack serve BUNDLE`` calls :func:`serve`; code that embeds a server (tests, a
supervisor) uses :func:`make_server` / :func:`start_server` and :meth:`ModelServer.close`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole answers, or
Server-Sent Events ``data: {...}`` chunks ending in ``data: [DONE]`` with ``stream: true``),
``GET /v1/models``, ``GET /health`` (503 until the model has loaded, then 200) and
``GET /metrics`` (Prometheus text). Every answer carries ``usage`` and an ``edgepack`` object:
the model's sha256 and bundle, the gate status, the mean token log-probability and timings.

A bundle's task applies to every chat request by default (:meth:`ModelServer.apply_task`, through
:meth:`~edgepack.runtime.session.ModelSession.apply_task`): its system prompt unless the request
sends its own system message (``ServeConfig.system`` replaces the task's prompt), its decoding
unless the request sets a field, and a ``json`` task's schema. ``ServeConfig.no_task`` serves the
raw model.

Exposure defaults follow llama-server's README and the faults listed in THREATS.md #10:

- binds 127.0.0.1; any other address is refused unless an API key is configured, and then
  every endpoint but ``/health`` wants ``Authorization: Bearer <key>`` (else 401);
- no CORS headers at all, POST bodies must be ``application/json`` (so a web page cannot
  send a "simple" cross-origin request without a preflight that fails), and a loopback
  server without a key only answers ``Host: localhost / 127.0.0.1 / ::1`` (DNS rebinding);
- limits: a request's headers must arrive within ``header_timeout_s`` of connecting and its
  body within ``body_timeout_s`` (408; slowloris), connections still sending are capped per
  client and in all (the oldest is displaced, 503), requests being handled are capped (503),
  body size (413), a prompt over ``n_ctx`` x ``MAX_PROMPT_BYTES_PER_TOKEN`` (32) bytes is
  refused before it is tokenized and one beyond the context after (400), invalid
  parameters and strings that are not valid Unicode (400), one generation at a time plus
  ``max_queue`` waiters, counted from before tokenizing (429 when full), a per-request deadline
  covering tokenizing, queue and generation (504), and a client that goes away stops its
  generation at the next token.

The server is ``http.server.ThreadingHTTPServer`` with HTTP/1.0 responses (one request per
connection) fed by a selector-based intake: no dependency beyond the standard library and
llama-cpp-python. This module holds the configuration and the lifecycle; the pieces live beside
it: ``server_intake`` (accepting, header/body deadlines, pending-connection caps, draining),
``server_http`` (handler cap, routing, replies, small endpoints), ``server_request`` (Host,
key, body, size and context checks, tokenizing under the deadline), ``server_stream`` (one
generation request: queue, SSE stream or whole answer), ``server_api`` (the OpenAI wire
format), ``server_engine`` (the model queue and its places, one generation),
``server_metrics`` (Prometheus text) and ``server_fallback`` (the teacher fallback).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.constants import BUNDLE_SUFFIX, M_ENTRYPOINT, M_FILES, M_GATE_STATUS, M_PROFILE, M_QUANT
from edgepack.errors import InvalidModelFile, UsageError
from edgepack.progress import ProgressFn, null_progress
from edgepack.runtime.server.api import HttpReject
from edgepack.runtime.server.decoding import announce_unconstrained
from edgepack.runtime.server.engine import Scheduler
from edgepack.runtime.server.fallback import FallbackTarget, parse_fallback
from edgepack.runtime.server.http import HTTPServer
from edgepack.runtime.server.metrics import Metrics

if TYPE_CHECKING:
    from edgepack.runtime.session import ModelSession
    from edgepack.task import Decoding


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens, what it accepts and how long a request may take."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """Bearer token every endpoint but /health requires; required for a non-loopback host."""
    max_queue: int = 16
    """Requests that may wait while one generates; the next is refused with 429."""
    timeout_s: float = 300.0
    """Per-request deadline (queue + generation); past it the request ends with 504."""
    max_body_bytes: int = 1 << 20
    max_connections: int = 64
    """Requests being handled at once (a handler thread each); the next gets 503 at once."""
    max_pending: int = 512
    """Connections still sending their request (no thread); past it the oldest is closed (503)."""
    max_pending_per_client: int = 256
    """The same, per client address: one client's new connection displaces only its own oldest."""
    header_timeout_s: float = 10.0
    """Total time from connecting to the end of the request headers, however often bytes arrive (408)."""
    body_timeout_s: float = 30.0
    """Total time from the end of the headers to the end of the body (408)."""
    keepalive_s: float = 5.0
    """How long a kept-alive connection may sit idle between requests (then closed, no reply)."""
    default_max_tokens: int = 512
    """max_tokens when a request gives none (capped by what is left of the context)."""
    n_ctx: int | None = None
    """Context length to load with; None: the bundle's (or the GGUF's trained length, max 2048)."""
    threads: int | None = None
    model_id: str | None = None
    """The id clients send as ``model``; None: the file name without its suffix."""
    fallback: FallbackTarget | None = None
    fallback_min_logprob: float | None = None
    """Mean token log-probability below which the teacher answers (required with fallback)."""
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    read_timeout_s: float = 30.0
    """Socket timeout for each write to a slow reader (reading a request has the deadlines above)."""
    shutdown_grace_s: float = 5.0
    """On stop: how long running and queued requests may finish before being cancelled."""
    public_key: Path | None = None
    """Ed25519 public key (PEM): serve a bundle only when it is signed by this key."""
    no_task: bool = False
    """Serve the raw model: no task system prompt, decoding or schema (``--no-task``)."""
    system: str | None = None
    """System prompt for requests without one, instead of the task's (``--system``)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not 0-65535")
        for name in ("max_queue", "max_body_bytes", "max_connections", "max_pending", "max_pending_per_client",
                     "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                problems.append(f"{name} must be a {'non-negative' if name == 'max_queue' else 'positive'} integer")
        for name in ("timeout_s", "read_timeout_s", "header_timeout_s", "body_timeout_s", "keepalive_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        if self.fallback is not None and self.fallback_min_logprob is None:
            problems.append("a fallback needs fallback_min_logprob (the mean token logprob below which it is used)")
        if self.fallback_min_logprob is not None and self.fallback is None:
            problems.append("fallback_min_logprob given without a fallback")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("the API key is empty")
        if problems:
            raise UsageError("cannot serve: " + "; ".join(problems))


def read_api_key(env_name: str | None) -> str | None:
    """The key held by environment variable ``env_name`` (None when no name is given)."""
    if env_name is None:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise UsageError(f"the API key variable {env_name} is not set or empty",
                         hint=f"export {env_name}=<a long random secret> before starting the server")
    return value.strip()


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def require_safe_exposure(host: str, api_key: str | None) -> None:
    """UsageError for a non-loopback bind without an API key."""
    if api_key is None and not is_loopback(host):
        raise UsageError(f"refusing to listen on {host or 'all interfaces'} without an API key: anyone who can "
                         "reach it could use the model",
                         hint="put a secret in an environment variable and pass --api-key-env VAR, "
                              "or keep the default --host 127.0.0.1")


class ModelServer:
    """A bound HTTP server and the model it serves; see the module docstring.

    ``make_server`` binds (so the port is known), :meth:`start` answers HTTP in a background
    thread (``/health`` says 503 meanwhile), :meth:`load` loads the model, :meth:`close`
    stops everything. Usable as a context manager (close on exit).
    """

    def __init__(self, model: Path, config: ServeConfig) -> None:
        require_safe_exposure(config.host, config.api_key)
        self.model_path = Path(model)
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.max_queue, on_change=self._queue_changed)
        self.model_id = config.model_id or self.model_path.name.removesuffix(BUNDLE_SUFFIX).removesuffix(".gguf")
        self.identity: dict[str, Any] = {}
        self.backend: Any = None
        self.session: ModelSession | None = None
        self.n_ctx = 0
        self.chat_problem: str | None = None
        self.created = int(time.time())
        self.cancel = threading.Event()
        self._stack = ExitStack()
        self._ready = threading.Event()
        self._closing = False
        self._users = 0
        self._users_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.host_check = config.api_key is None and is_loopback(config.host)
        try:
            self._httpd = HTTPServer((config.host, config.port), self)
        except OSError as exc:
            raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                             hint="pick another --port, or stop what is using it") from exc

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else (host or "0.0.0.0")
        return f"http://{shown}:{self.port}"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Answer HTTP in a background thread (the model need not be loaded yet)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="edgepack-http", daemon=True)
            self._thread.start()

    def load(self, progress: ProgressFn = null_progress, warn: Callable[[str], None] | None = None) -> None:
        """Verify and load the model, check its chat template and logprobs, then report ready.

        ``warn`` gets each loading warning (a signature not checked, a context capped)."""
        from edgepack.runtime.session import open_model

        progress("load model", 0, 1)
        session = self._stack.enter_context(open_model(self.model_path, threads=self.config.threads,
                                                       n_ctx=self.config.n_ctx, key=self.config.public_key,
                                                       warn=warn, no_task=self.config.no_task))
        backend = session.backend
        self.identity = _identity(self.model_path, session.manifest)
        probe: list[int] | None = None
        try:  # a hostile template raises UnsafeModelError here, and the server never starts
            probe = backend.chat_tokens([{"role": "user", "content": "ping"}])
        except (InvalidModelFile, UsageError) as exc:
            if isinstance(exc, InvalidModelFile) and backend.chat_template:
                raise  # a template that cannot render a plain chat is refused like a bomb (exit 2)
            self.chat_problem = str(exc)  # no template: completions still work; chat answers 500 with this
        # One real token: a decode failure shows now, not on the first request, and the
        # fallback is refused up front on a backend that gives no logprobs.
        tokens = backend.generate(probe or backend.tokenize("ping", add_special=True), max_tokens=1,
                                  stop_at_eos=False)
        first = next(iter(tokens), None)
        logprob = None if first is None else backend.last_token_logprob(first)
        getattr(tokens, "close", lambda: None)()
        if self.config.fallback is not None and logprob is None:
            raise UsageError(f"a fallback needs token logprobs, which the {backend.format} backend does not give")
        self.backend, self.session, self.n_ctx = backend, session, backend.n_ctx
        announce_unconstrained(backend, warn)
        self._ready.set()
        self.metrics.gauges(model_loaded=True)
        progress("load model", 1, 1)

    def close(self) -> None:
        """Stop accepting, let work finish for ``shutdown_grace_s``, cancel the rest, unload."""
        if self._closing:
            return
        self._closing = True
        self._ready.clear()
        self.metrics.gauges(model_loaded=False)
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        if not self._wait_users(self.config.shutdown_grace_s):
            self.cancel.set()
            self.scheduler.close()
            self._wait_users(self.config.read_timeout_s + 1.0)
        with self._users_cond:
            idle = self._users == 0
        if idle:
            self._stack.close()
        # else: a handler still holds the model (a write stuck past every timeout); freeing
        # llama.cpp under it would crash, so the process exit frees it instead.

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- used by the request handler -----------------------------------------------------
    def apply_task(self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None,
                   temperature: float | None = None, repeat_penalty: float | None = None,
                   default_max_tokens: int | None = None) -> tuple[list[dict[str, Any]], Decoding, dict[str, Any] | None]:
        """(messages, decoding, JSON schema) of one chat request: the session's task with this
        server's ``--system`` (see :meth:`~edgepack.runtime.session.ModelSession.apply_task`)."""
        if self.session is None:
            raise HttpReject(503, "the model is still loading", reason="not_ready", error_type="server_error",
                             headers={"Retry-After": "1"})
        return self.session.apply_task(messages, system=self.config.system, max_tokens=max_tokens,
                                       temperature=temperature, repeat_penalty=repeat_penalty,
                                       default_max_tokens=default_max_tokens)

    def _queue_changed(self, queued: int, running: int) -> None:
        self.metrics.gauges(queue_depth=queued, running=running)

    @contextmanager
    def using_model(self) -> Iterator[Any]:
        """Hold the model against unloading while a handler tokenizes or generates."""
        with self._users_cond:
            if self._closing:
                raise HttpReject(503, "the server is shutting down", reason="shutting_down",
                                 error_type="server_error")
            if not self.ready:
                raise HttpReject(503, "the model is still loading", reason="not_ready", error_type="server_error",
                                 headers={"Retry-After": "1"})
            self._users += 1
        try:
            yield self.backend
        finally:
            with self._users_cond:
                self._users -= 1
                self._users_cond.notify_all()

    def _wait_users(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        with self._users_cond:
            while self._users:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._users_cond.wait(min(remaining, 0.2))
        return True


def _identity(path: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What every response says about the served model."""
    if manifest is not None:
        entry = next(e for e in manifest[M_FILES] if e["path"] == manifest[M_ENTRYPOINT])
        profile = manifest.get(M_PROFILE)
        return {"model_sha256": entry["sha256"], "model_file": entry["path"], "bundle": path.name,
                "gate_status": manifest.get(M_GATE_STATUS), "quant": manifest.get(M_QUANT),
                "profile": profile.get("name") if isinstance(profile, dict) else profile}
    # An ONNX folder is identified by its graph file, as a bundle's entrypoint is (folder/model.onnx).
    target = path / "model.onnx" if path.is_dir() else path
    with open(target, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    name = f"{path.name}/{target.name}" if target != path else path.name
    return {"model_sha256": digest, "model_file": name, "bundle": None, "gate_status": None,
            "quant": None, "profile": None}


def make_server(model: Path, config: ServeConfig | None = None) -> ModelServer:
    """Bind a server for ``model`` (port 0 picks a free one); nothing is loaded yet."""
    return ModelServer(Path(model), config or ServeConfig())


def start_server(model: Path, config: ServeConfig | None = None,
                 progress: ProgressFn = null_progress) -> ModelServer:
    """Bind, start answering HTTP, load the model; the caller must :meth:`~ModelServer.close` it."""
    server = make_server(model, config)
    try:
        server.start()
        server.load(progress)
    except BaseException:
        server.close()
        raise
    return server


def serve(model: Path, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_queue: int = 16, timeout_s: float = 300.0, max_body_bytes: int = 1 << 20,
          n_ctx: int | None = None, threads: int | None = None, fallback: str | None = None,
          fallback_min_logprob: float | None = None, fallback_api_key_env: str | None = None,
          public_key: Path | None = None, on_ready: Callable[[str], None] | None = None, progress: ProgressFn = null_progress,
          on_warning: Callable[[str], None] | None = None, no_task: bool = False, system: str | None = None) -> None:
    """Serve ``model`` (a .edgepack bundle or a .gguf) until SIGINT or SIGTERM, then stop cleanly.

    Refuses a non-loopback ``host`` unless ``api_key_env`` names a set variable; with
    ``public_key`` serves a bundle only if it is signed by that Ed25519 key. The bundle's task
    applies to chat requests unless ``no_task``; ``system`` replaces its system prompt. ``on_ready``
    gets the base URL once the model has loaded; ``on_warning`` each loading warning (a
    signature not checked, a context capped). Call from the main thread (signals); to
    embed a server elsewhere use :func:`start_server`.
    """
    target = parse_fallback(fallback, read_api_key(fallback_api_key_env)) if fallback else None
    config = ServeConfig(host=host, port=port, api_key=read_api_key(api_key_env), max_queue=max_queue,
                         timeout_s=timeout_s, max_body_bytes=max_body_bytes, n_ctx=n_ctx, threads=threads,
                         fallback=target, fallback_min_logprob=fallback_min_logprob, public_key=public_key,
                         no_task=no_task, system=system)
    stop = threading.Event()
    with make_server(model, config) as server:
        server.start()
        server.load(progress, warn=on_warning)
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
        try:
            if on_ready is not None:
                on_ready(server.url)
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
