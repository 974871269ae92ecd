"""Shared by the server tests: HTTP helpers, a real server subprocess, and fixtures.

Test modules import the fixtures they use by name. ``proc_server`` is module-scoped: each
test module runs one ``serve()`` subprocess on the tiny GGUF, and it must exit 0 on SIGTERM.
Tests needing other settings (a key, a short deadline, a bundle, a fallback) start their own
in-process server through ``local``. Generation is the real llama.cpp on the tiny random
model: its text is gibberish, but greedy text is deterministic, so the server's answers are
compared with the in-process session's (``reference``).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack.runtime.server.serve import ModelServer, ServeConfig, start_server
from edgepack.runtime.session import open_model

CTX = 4096
USER = [{"role": "user", "content": "Compressor C-12 tripped on high vibration."}]
LAUNCH = r"""
import json, os, sys
from pathlib import Path
from edgepack.runtime.server.serve import serve

url_file = Path(sys.argv[3])

def ready(url):
    tmp = url_file.with_name(url_file.name + ".tmp")
    tmp.write_text(url)
    os.replace(tmp, url_file)

serve(Path(sys.argv[1]), port=0, on_ready=ready, **json.loads(sys.argv[2]))
"""


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> None:
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """SSE ``data:`` payloads, decoded; ``[DONE]`` kept as the string."""
        out = []
        for block in self.body.decode("utf-8").split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


def call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    start = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload, time.monotonic() - start)
    finally:
        conn.close()


def chat(port: int, **body: Any) -> Reply:
    body.setdefault("messages", USER)
    headers = body.pop("headers", None)
    return call(port, "POST", "/v1/chat/completions", body, headers=headers)


def metrics(port: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Metric samples as {'name{labels}': value}."""
    reply = call(port, "GET", "/metrics", headers=headers)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.port = int(url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop within 15 s of SIGTERM")
        return self.proc.returncode


def launch(model: Path, folder: Path, **options: Any) -> ServerProcess:
    """``serve()`` in a fresh Python process on a free port; returns once /health is 200."""
    url_file, log = folder / "url.txt", folder / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(model), json.dumps(options), str(url_file)],
                                stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 90
    while not url_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    server = ServerProcess(proc, url_file.read_text(), log)
    assert call(server.port, "GET", "/health").status == 200
    return server


@pytest.fixture(scope="module")
def proc_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = launch(tiny_gguf, tmp_path_factory.mktemp("server"), n_ctx=CTX, threads=1, max_queue=2,
                    timeout_s=30.0, max_body_bytes=64 * 1024)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def port(proc_server: ServerProcess) -> int:
    return proc_server.port


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> Iterator[Any]:
    """The in-process session the server's answers must equal (same context length)."""
    with open_model(tiny_gguf, threads=1, n_ctx=CTX) as session:
        yield session


@pytest.fixture()
def local(tiny_gguf: Path) -> Iterator[Any]:
    """Factory for in-process servers on the tiny GGUF, closed after the test."""
    servers: list[ModelServer] = []

    def make(model: Path = tiny_gguf, **options: Any) -> ModelServer:
        options.setdefault("threads", 1)
        server = start_server(model, ServeConfig(port=0, **options))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# --- hostile clients (slowloris) --------------------------------------------------------------

SLOW_KINDS = ("idle", "half_header", "drip", "slow_body")


class SlowClients:
    """Connections that never finish their request, of four kinds, held open from one thread.

    ``idle``: connects and sends nothing; ``half_header``: a request line and some headers but
    never the blank line; ``drip``: a request line one byte per ``interval``; ``slow_body``:
    complete headers announcing a 4 KiB body, then one body byte per ``interval``. ``source``
    picks the client address (any 127.x.y.z works on Linux loopback), ``headers`` extra header
    lines (an API key). :meth:`closed` tells how many the server has closed.
    """

    def __init__(self, port: int, *, source: str = "127.0.0.1", headers: bytes = b"",
                 interval: float = 0.5) -> None:
        self.port, self.source, self.headers, self.interval = port, source, headers, interval
        self.socks: list[tuple[str, Any, bytearray]] = []  # (kind, socket, bytes still to drip)
        self.gone: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)

    def open(self, **counts: int) -> SlowClients:
        for kind, n in counts.items():
            assert kind in SLOW_KINDS, kind
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                                source_address=(self.source, 0))
                head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/json\r\n" + self.headers)
                todo = bytearray()
                if kind == "half_header":
                    sock.sendall(head)
                elif kind == "drip":
                    todo = bytearray(head)
                elif kind == "slow_body":
                    sock.sendall(head + b"Content-Length: 4096\r\n\r\n")
                    todo = bytearray(b'{"messages": [' + b" " * 4080)
                self.socks.append((kind, sock, todo))
        return self

    def start(self) -> SlowClients:
        self._thread.start()
        return self

    def _drip(self) -> None:
        while not self._stop.wait(self.interval):
            for i, (_, sock, todo) in enumerate(self.socks):
                if todo and i not in self.gone:
                    try:
                        sock.send(bytes(todo[:1]))
                        del todo[:1]
                    except OSError:
                        self.gone.add(i)

    def closed(self, kind: str | None = None) -> int:
        """How many (of ``kind``) the server has closed: EOF, a reset, or a reply then EOF."""
        for i, (_, sock, _) in enumerate(self.socks):
            if i in self.gone:
                continue
            poll = select.poll()  # not select.select: descriptors past 1024 are common here
            poll.register(sock, select.POLLIN)
            try:
                if poll.poll(0):
                    sock.settimeout(1.0)
                    while sock.recv(65536):
                        pass
                    self.gone.add(i)
            except OSError:
                self.gone.add(i)
        return sum(1 for i, (k, _, _) in enumerate(self.socks) if i in self.gone and kind in (None, k))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for _, sock, _ in self.socks:
            sock.close()

    def __enter__(self) -> SlowClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
