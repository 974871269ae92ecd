"""Limits and validation: invalid parameters and bodies (400/411/415), malformed HTTP, body
size (413), prompt beyond the context (400) and the connection cap (503).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.runtime.server_helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, call, chat, local, port, proc_server, reference)


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"top_p": 0.5}, "top_p"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
def test_invalid_parameters_are_400(port: int, body: dict[str, Any], field: str) -> None:
    reply = chat(port, **body)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and error["message"]


@pytest.mark.parametrize("raw, content_type, status", [
    (b"{not json", "application/json", 400),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[" * 100_00 + b"]" * 100_00, "application/json", 400),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "text/plain", 415),
])
def test_bad_bodies(port: int, raw: bytes, content_type: str, status: int) -> None:
    reply = call(port, "POST", "/v1/chat/completions", raw=raw, headers={"Content-Type": content_type})
    assert reply.status == status and "error" in reply.json()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
     b"Content-Length: -5\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
     b"Content-Length: \xb2\r\n\r\n", 411),  # a superscript two: str.isdigit() but not int()
    (b"TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    (b"GARBAGE\r\n\r\n", 400),
])
def test_malformed_http_gets_a_json_error(port: int, request_bytes: bytes, status: int) -> None:
    reply = raw_request(port, request_bytes)
    if not reply.startswith(b"HTTP/"):  # http.server answers an unparseable line as HTTP/0.9: body only
        assert json.loads(reply)["error"]["code"] == str(status)
        return
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), head
    assert "error" in json.loads(body)


def test_oversized_body_is_413(port: int) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (100 * 1024)}]}
    reply = chat(port, **big)
    assert reply.status == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_a_64_mib_body_is_413_not_a_reset(port: int) -> None:
    # http.client sends the whole body before reading: the server must not close on the unread
    # part (the client would see a reset, not the 413), as it did past 16 MiB (issue #9).
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * (64 << 20) + b'"}]}'
    reply = call(port, "POST", "/v1/chat/completions", raw=body)
    assert reply.status == 413 and reply.json()["error"]["code"] == "body_too_large"
    assert reply.headers["connection"] == "close"
    assert chat(port, max_tokens=2).status == 200


@pytest.mark.parametrize("declared", [str(1 << 40), "9" * 5000])
def test_any_declared_length_is_413_before_the_body(port: int, declared: str) -> None:
    # A 1 TiB (or 5000-digit) Content-Length and a client that waits, write side open: the 413
    # comes before the body, followed by EOF (the server shuts its side down before it drains).
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + declared.encode() + b"\r\n\r\n")
    start = time.monotonic()
    reply = raw_request(port, head + b'{"messages": [')
    assert time.monotonic() - start < 8
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"413", reply[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"


def test_a_large_chunked_body_gets_411_not_a_reset(port: int) -> None:
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 8 MiB the server never asked for
            sock.sendall(b"100000\r\n" + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert reply.split(b" ")[1] == b"411", reply[:200]
    assert "error" in json.loads(reply.partition(b"\r\n\r\n")[2])


def test_prompt_beyond_context_is_400(port: int, reference: Any) -> None:
    long_text = "Pump P-101 " * 2000  # about 10k tokens, within the 64 KiB body limit
    assert len(reference.backend.tokenize(long_text)) > CTX
    reply = chat(port, messages=[{"role": "user", "content": long_text}])
    assert reply.status == 400 and reply.json()["error"]["code"] == "context_overflow"
    assert f"context holds {CTX}" in reply.json()["error"]["message"]
    reply = chat(port, max_tokens=CTX)  # the prompt plus max_tokens would not fit
    assert reply.status == 400 and reply.json()["error"]["param"] == "max_tokens"
    reply = call(port, "POST", "/v1/completions", {"prompt": long_text})
    assert reply.status == 400 and reply.json()["error"]["code"] == "context_overflow"


def test_connection_cap(local: Any) -> None:
    server = local(max_connections=2, read_timeout_s=5.0)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        reply = call(server.port, "GET", "/health")
        assert reply.status == 503 and reply.json()["error"]["code"] == "too_many_connections"
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while call(server.port, "GET", "/health").status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("seconds, limit", [(0.5, 1 << 40), (30.0, 1 << 20)])
def test_the_drain_is_bounded(monkeypatch: pytest.MonkeyPatch, seconds: float, limit: int) -> None:
    """A client that never stops sending holds the handler for DRAIN_SECONDS or
    DRAIN_LIMIT_BYTES, whichever comes first, not for its declared 1 TiB."""
    from email.message import Message

    from edgepack.runtime import server_request

    monkeypatch.setattr(server_request, "DRAIN_SECONDS", seconds)
    monkeypatch.setattr(server_request, "DRAIN_LIMIT_BYTES", limit)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_side = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    headers = Message()
    headers["Content-Length"] = str(1 << 40)
    sent = [0]

    def flood() -> None:
        try:
            while True:
                sent[0] += client_side.send(b"x" * 65536)
        except OSError:
            pass

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    start = time.monotonic()
    with server_side, client_side, server_side.makefile("rb") as rfile:
        discarded = server_request.drain(headers, rfile, server_side)
        took = time.monotonic() - start
    writer.join(5)
    assert took < seconds + 2 and 0 < discarded <= min(limit, sent[0])
    if limit < 1 << 40:
        assert discarded == limit
    else:
        assert took > seconds - 0.1
