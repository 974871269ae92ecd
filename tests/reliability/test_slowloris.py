"""Slowloris and friends against ``edgepack serve`` (issue #20, defect 4).

Connections that never finish their request (idle, half a header, a header dripped a byte at a
time, a body dripped a byte at a time) must neither hold a handler thread nor deny service: a
real request is answered while 200 of them are held, a drip is cut at the header (or body)
deadline however often it sends, one client address can only crowd out its own connections,
and a wrong API key is refused as soon as the headers are complete. The long run with several
hundred connections is ``bench/reliability/slowloris.py``.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest

from tests.runtime.server.helpers import CTX, SlowClients, call, chat, local  # noqa: F401

KEY = "k" * 32


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def closed_by_server(sock: socket.socket, within: float) -> tuple[float | None, bytes]:
    """Seconds until the server closed ``sock`` (None: still open after ``within``) and what it sent."""
    start, got = time.monotonic(), b""
    while time.monotonic() - start < within:
        if select.select([sock], [], [], 0.05)[0]:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return time.monotonic() - start, got
            if not chunk:
                return time.monotonic() - start, got
            got += chunk
    return None, got


def can_bind(source: str) -> bool:
    try:
        connect_probe = socket.socket()
        connect_probe.bind((source, 0))
        connect_probe.close()
        return True
    except OSError:
        return False


def drip_until_closed(sock: socket.socket, pieces: Iterable[bytes]) -> tuple[float | None, bytes]:
    """Send ``pieces`` one at a time, each followed by a 0.2 s look for the server closing:
    seconds until it did (None: never) and what it sent."""
    start, got = time.monotonic(), b""
    for piece in pieces:
        try:
            sock.send(piece)
        except OSError:
            return time.monotonic() - start, got
        took, got = closed_by_server(sock, 0.2)
        if took is not None:
            return time.monotonic() - start, got
    return None, got


def test_a_request_is_answered_while_200_slow_connections_are_held(local: Any) -> None:
    server = local(n_ctx=CTX)
    with SlowClients(server.port, interval=0.5) as crowd:
        crowd.open(idle=60, half_header=50, drip=50, slow_body=40).start()
        time.sleep(1.0)
        # None was refused: 200 pending connections are within every limit and deadline...
        assert crowd.closed() == 0
        # ...and none of them holds a thread (the test's own and the server's few do).
        assert threading.active_count() < 40, threading.active_count()
        reply = chat(server.port, max_tokens=4)
        assert reply.status == 200, reply.body[:300]
        assert reply.elapsed < 30
        assert call(server.port, "GET", "/health").status == 200


def test_a_drip_is_cut_at_the_header_deadline(local: Any) -> None:
    # A byte every 0.2 s never lets a 30 s per-read timeout fire; the total deadline must.
    server = local(n_ctx=CTX, header_timeout_s=1.5, read_timeout_s=30.0)
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 200
    with connect(server.port) as sock:
        gone, got = drip_until_closed(sock, (bytes([byte]) for byte in request))
        assert gone is not None, "still connected after dripping the whole header for 40 s"
        assert 1.0 < gone < 6.0, gone
        if got:
            assert got.split(b" ")[1] == b"408", got[:200]


def test_a_slow_body_is_cut_at_the_body_deadline(local: Any) -> None:
    server = local(n_ctx=CTX, body_timeout_s=1.5, read_timeout_s=30.0)
    with connect(server.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        gone, got = drip_until_closed(sock, (b" " for _ in range(100)))
        assert gone is not None and 1.0 < gone < 6.0, gone
        if got:
            assert got.split(b" ")[1] == b"408", got[:200]
    assert chat(server.port, max_tokens=2).status == 200


def test_a_wrong_key_is_refused_as_soon_as_the_headers_are_complete(local: Any) -> None:
    server = local(n_ctx=CTX, api_key=KEY, body_timeout_s=30.0)
    with connect(server.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer wrong\r\nContent-Length: 100000\r\n\r\n")  # the body never comes
        took, got = closed_by_server(sock, 10.0)
    assert took is not None and took < 3.0 and got.split(b" ")[1] == b"401", (took, got[:200])
    # With the right key, the same held connections do not stop a real request.
    with SlowClients(server.port, headers=f"Authorization: Bearer {KEY}\r\n".encode()) as crowd:
        crowd.open(half_header=20, slow_body=20).start()
        reply = chat(server.port, max_tokens=2, headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status == 200


@pytest.mark.skipif(not (can_bind("127.0.0.2") and can_bind("127.0.0.3")),
                    reason="this system cannot use 127.0.0.2/3 as client addresses")
def test_one_client_only_crowds_out_its_own_connections(local: Any) -> None:
    server = local(n_ctx=CTX, max_pending_per_client=4, max_pending=8)
    a = [connect(server.port, "127.0.0.2") for _ in range(4)]
    b = [connect(server.port, "127.0.0.3") for _ in range(3)]
    try:
        time.sleep(0.3)
        a.append(connect(server.port, "127.0.0.2"))  # one past 127.0.0.2's cap: its oldest goes
        took, got = closed_by_server(a[0], 5.0)
        assert took is not None and took < 3.0
        if got:
            assert got.split(b" ")[1] == b"503", got[:200]
        assert all(closed_by_server(s, 0.1)[0] is None for s in a[1:] + b)
        # Total cap (8): 4 of .2 and 3 of .3 are pending; a ninth from a third address displaces
        # the oldest of all (127.0.0.2's second).
        extra = [connect(server.port, "127.0.0.1") for _ in range(2)]
        b.extend(extra)
        took, _ = closed_by_server(a[1], 5.0)
        assert took is not None, "the oldest pending connection was not displaced at the total cap"
        reply = chat(server.port, max_tokens=2)  # a complete request always gets through
        assert reply.status == 200
    finally:
        for s in a + b:
            s.close()


def test_handler_threads_past_the_cap_get_503_at_once(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_connections`` caps requests being handled (a thread each); the next gets 503 at once."""
    server = local(n_ctx=CTX, max_connections=2, timeout_s=3.0)
    real = server.backend.chat_tokens

    def slow_chat_tokens(messages: Any) -> Any:
        time.sleep(2.0)
        return real(messages)

    monkeypatch.setattr(server.backend, "chat_tokens", slow_chat_tokens)
    busy = [threading.Thread(target=chat, args=(server.port,), kwargs={"max_tokens": 2}) for _ in range(2)]
    for t in busy:
        t.start()
    time.sleep(0.5)
    reply = call(server.port, "GET", "/health")
    assert reply.status == 503 and reply.json()["error"]["code"] == "too_many_connections"
    assert reply.elapsed < 2.0
    for t in busy:
        t.join(30)


def test_slow_uploads_cannot_fill_memory(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bodies are collected before a thread sees them, within one budget for all pending
    # connections (here 512 KiB): past it the oldest upload still in progress is closed (503).
    from edgepack.runtime.server import intake as server_intake

    monkeypatch.setattr(server_intake, "MIN_BUFFERED_BYTES", 512 * 1024)
    server = local(n_ctx=CTX, max_body_bytes=256 * 1024)
    uploads = [connect(server.port) for _ in range(3)]
    try:
        for sock in uploads:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + str(256 * 1024).encode() + b"\r\n\r\n" + b" " * (200 * 1024))
            time.sleep(0.2)
        took, got = closed_by_server(uploads[0], 5.0)
        assert took is not None and got.split(b" ")[1] == b"503", got[:200]
        assert all(closed_by_server(s, 0.2)[0] is None for s in uploads[1:])
        assert chat(server.port, max_tokens=2).status == 200
    finally:
        for sock in uploads:
            sock.close()
