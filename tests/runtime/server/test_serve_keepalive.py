"""HTTP/1.1 keep-alive through the intake, and 429 with a Retry-After that clients honour.

A kept-alive socket goes back to the intake between requests (no thread waits on it) and is
closed quietly after its idle timeout; ``Connection: close`` and HTTP/1.0 still close. Eight
openai-SDK clients at once (lm-eval's ``num_concurrent=8``) all complete on the default queue.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.server.helpers import CTX, USER, chat, local  # noqa: F401 - fixtures are requested by name

BODY = json.dumps({"messages": USER, "max_tokens": 2}).encode()
HEADERS = {"Content-Type": "application/json"}


def _post(conn: http.client.HTTPConnection, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn.request("POST", "/v1/chat/completions", body=BODY, headers={**HEADERS, **(headers or {})})
    reply = conn.getresponse()
    reply.read()
    return reply


def test_keep_alive_reuses_the_socket(local: Any) -> None:
    server = local(n_ctx=CTX)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    first = _post(conn)
    sock = conn.sock
    assert first.status == 200 and first.version == 11 and first.getheader("Connection") == "keep-alive"
    second = _post(conn)
    assert second.status == 200 and conn.sock is sock  # the same socket answered again
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert json.loads(health.read())["status"] == "ok" and conn.sock is sock
    conn.close()
    for request in (b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                    b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n"):  # HTTP/1.0 closes by default
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        raw.sendall(request)
        data = b""
        while chunk := raw.recv(65536):  # a kept connection would time out here instead of ending
            data += chunk
        assert b"Connection: close" in data and data.endswith(b'"tiny-F16"}')
        raw.close()


def test_idle_kept_connection_is_closed_quietly(local: Any) -> None:
    server = local(n_ctx=CTX, keepalive_s=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert _post(conn).status == 200
    sock = conn.sock
    start = time.monotonic()
    sock.settimeout(5)
    assert sock.recv(1024) == b""  # closed without a 408: it asked for nothing
    assert 0.3 < time.monotonic() - start < 3
    conn.close()


def test_slow_next_request_on_a_kept_connection_times_out(local: Any) -> None:
    server = local(n_ctx=CTX, header_timeout_s=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert _post(conn).status == 200
    sock = conn.sock
    start = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # the next request's headers never finish
    sock.settimeout(3)  # the idle timeout (5 s) must not stand in for the header deadline (0.5 s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.0 408") and time.monotonic() - start < 2
    conn.close()


def test_queue_full_is_429_with_retry_after(local: Any) -> None:
    openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra)")
    server = local(n_ctx=CTX, max_queue=0)
    busy = threading.Thread(target=lambda: chat(server.port, max_tokens=3000))
    busy.start()
    try:
        time.sleep(0.3)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=2)
        retry = caught.value.response.headers["retry-after"]
        assert retry.isdigit() and 1 <= int(retry) <= 30
    finally:
        busy.join(60)


def test_eight_concurrent_sdk_clients_complete(local: Any, tiny_gguf: Path) -> None:
    """lm-eval's num_concurrent=8 on the default queue, with the SDK's default retries."""
    openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra)")
    server = local(n_ctx=CTX)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    results: list[Any] = []

    def one(i: int) -> None:
        try:
            done = client.completions.create(model="tiny-F16", prompt=f"Line {i}: pump", max_tokens=32)
            results.append(done.usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            results.append(exc)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert len(results) == 8 and all(isinstance(r, int) and r > 0 for r in results), results
