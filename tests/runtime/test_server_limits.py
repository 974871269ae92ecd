"""Limits and validation: invalid parameters and bodies (400/411/415), malformed HTTP, body
size (413), prompt beyond the context (400) and the connection cap (503).
"""

from __future__ import annotations

import json
import socket
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
