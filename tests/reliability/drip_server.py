"""A hostile HTTP server for the endpoint-teacher tests: replies scripted byte by byte, with pauses.

An endpoint teacher (``openai:URL#MODEL``) is a server the user named, but not one they
control: a proxy or a broken server can send its answer a byte at a time, stall and resume,
or send far more than a chat completion. :class:`DripServer` is a real TCP server (a thread
per connection) whose reply to every connection is a list of steps ``(pause_s, bytes)``,
possibly endless, built by the helpers below. Used by tests/reliability/test_endpoint_drip.py
and bench/reliability/endpoint_drip.py.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Steps = Iterable[tuple[float, bytes]]


class DripServer:
    """Accepts connections on 127.0.0.1 and answers the n-th one (n from 0) with ``plan(n, body)``,
    ``body`` being that connection's request body (the JSON the client sent)."""

    def __init__(self, plan: Callable[[int, bytes], Steps]) -> None:
        self.plan = plan
        self.connections = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def spec(self, scheme: str = "http") -> str:
        return f"openai:{scheme}://127.0.0.1:{self.port}/v1#drip"

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()

    def __enter__(self) -> DripServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                n = self.connections
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            try:
                body = _read_request(conn)
                for pause, data in self.plan(n, body):
                    if self.stopped.wait(pause):
                        return
                    if data:
                        conn.sendall(data)
            except OSError:
                return  # the client gave up (what the tests want)
            try:
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                conn.recv(1)
            except OSError:
                pass


def _read_request(conn: socket.socket) -> bytes:
    """Read one request (head and Content-Length body); return the body."""
    conn.settimeout(10)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    conn.settimeout(None)
    return body


# --- replies --------------------------------------------------------------------------------------

def completion(text: str = "Category: thermal\nAction: Check the cooling fan.",
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An OpenAI chat.completion body; ``logprobs`` is the ``logprobs.content`` list, if any."""
    return {"id": "x", "object": "chat.completion", "model": "drip",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None if logprobs is None else {"content": logprobs}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def body_bytes(obj: Any) -> bytes:
    """JSON as Python writes it by default: NaN and Infinity stay bare (invalid JSON, as a server may send)."""
    return json.dumps(obj).encode()


def head(length: int | None = None, *, chunked: bool = False, status: str = "200 OK",
         extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def whole(body: bytes, **kwargs: Any) -> list[tuple[float, bytes]]:
    """The reply at once."""
    return [(0.0, head(len(body), **kwargs) + body)]


def drip(data: bytes, every: float, start: float = 0.0) -> Iterator[tuple[float, bytes]]:
    """``data`` one byte at a time, a pause of ``every`` seconds before each."""
    for i in range(len(data)):
        yield (start if i == 0 else every, data[i:i + 1])


def forever(data: bytes, every: float, first: bytes = b"") -> Iterator[tuple[float, bytes]]:
    """``first`` at once, then ``data`` repeated one byte at a time without end (a generator:
    never unpack it into a list)."""
    if first:
        yield (0.0, first)
    for byte in itertools.cycle(data):
        yield (every, bytes([byte]))


def chunked(body: bytes, size: int, every: float) -> Iterator[tuple[float, bytes]]:
    """``body`` as HTTP chunks of ``size`` bytes, a pause before each."""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        yield (every, f"{len(part):x}\r\n".encode() + part + b"\r\n")
    yield (every, b"0\r\n\r\n")
