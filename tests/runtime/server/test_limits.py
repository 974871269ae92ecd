"""Limits and validation: invalid parameters and bodies (400/411/415), malformed HTTP, body
size (413), prompt beyond the context (400), the pending-connection cap (503), the bounded drain,
prompts refused by size before tokenizing, tokenizing under the deadline (504) and strings that
are not valid Unicode (400). Slow and idle clients: tests/reliability/test_slowloris.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, call, chat, local, metrics, port, proc_server, reference)


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
    ({"stop": [str(i) for i in range(17)]}, "stop"),  # 16 at most
    ({"n": 9}, "n"),
    ({"top_p": 1.5}, "top_p"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": 3}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
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
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
     b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n{}", 400),  # conflicting lengths (request smuggling)
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


def test_idle_connections_past_the_pending_cap_displace_the_oldest(local: Any) -> None:
    # Connections that have not sent a request hold no thread; past max_pending the oldest is
    # closed with 503 and the new one is served (it was refused while the idle ones stayed).
    server = local(max_pending=2, read_timeout_s=5.0)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        assert call(server.port, "GET", "/health").status == 200
        reply = idle[0].recv(65536)
        assert reply.split(b" ")[1] == b"503" and b"too_many_connections" in reply, reply[:200]
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("seconds, limit", [(3.0, 1 << 40), (30.0, 1 << 20)])
def test_the_drain_is_bounded(local: Any, monkeypatch: pytest.MonkeyPatch, seconds: float, limit: int) -> None:
    """A client that keeps sending after its 413 is cut after DRAIN_SECONDS or DRAIN_LIMIT_BYTES,
    whichever comes first, not after its declared 1 TiB, and holds no handler thread meanwhile."""
    from edgepack.runtime.server import intake as server_intake

    monkeypatch.setattr(server_intake, "DRAIN_SECONDS", seconds)
    monkeypatch.setattr(server_intake, "DRAIN_LIMIT_BYTES", limit)
    server = local(max_body_bytes=1024)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(1 << 40).encode() + b"\r\n\r\n")
    sent, ended = [0], [0.0]

    def flood() -> None:
        try:
            while True:
                sent[0] += sock.send(b"x" * 65536)
        except OSError:
            ended[0] = time.monotonic()

    start = time.monotonic()
    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    with sock:
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.split(b" ")[1] == b"413", reply[:200]
        if limit == 1 << 40:
            time.sleep(1.0)  # mid-drain: the connection is back with the intake, not on a thread
            m = metrics(server.port)
            assert m["edgepack_open_connections"] == 1 and m["edgepack_pending_connections"] == 1, m
        writer.join(seconds + 10)
    took = ended[0] - start
    assert ended[0] and took < seconds + 3, took
    if limit < 1 << 40:
        assert sent[0] < limit + (32 << 20)  # what the server read, plus the sockets' buffers
    else:
        assert took > seconds - 0.5


# --- issue #20: input size before tokenizing, tokenizing under the deadline, clean 400s ------

SPECIAL_TEXT = "<|im_start|>" * (1_000_000 // len("<|im_start|>"))  # 1 MB of special-token text


def spy_tokenizer(backend: Any, monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[str]:
    """Record (and optionally slow down) every call into the backend's tokenizer."""
    calls: list[str] = []
    for name in ("tokenize", "chat_tokens"):
        real = getattr(backend, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            if delay_s:
                time.sleep(delay_s)
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, name, spy)
    return calls


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SPECIAL_TEXT}]}),
    ("/v1/completions", {"prompt": SPECIAL_TEXT}),
])
def test_a_1mb_special_token_prompt_is_400_before_tokenizing(local: Any, monkeypatch: pytest.MonkeyPatch,
                                                              path: str, body: dict[str, Any]) -> None:
    server = local(n_ctx=CTX)  # the default 1 MiB body limit lets the 1 MB prompt through
    calls = spy_tokenizer(server.backend, monkeypatch)
    reply = call(server.port, "POST", path, body)
    assert reply.status == 400, reply.body[:300]
    error = reply.json()["error"]
    assert error["code"] == "context_overflow" and "bytes" in error["message"], error
    assert calls == [], "the server tokenized a prompt it could have refused by its size"
    assert reply.elapsed < 10


def test_tokenizing_counts_against_the_request_deadline(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = local(n_ctx=CTX, timeout_s=1.0)
    spy_tokenizer(server.backend, monkeypatch, delay_s=4.0)
    reply = chat(server.port, max_tokens=2)
    assert reply.status == 504 and reply.json()["error"]["code"] == "deadline", reply.body[:300]
    assert reply.elapsed < 3.5


@pytest.mark.parametrize("path, raw", [
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "pump \ud800 trip"}]}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x", "name": "\ud83d"}]}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x"}], "stop": ["\udc00"]}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x"}], "model": "\ud800"}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x"}], "user": "\ud800"}'),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "x"}], "\ud800": 1}'),
    ("/v1/completions", rb'{"prompt": "\ud800"}'),
    ("/v1/completions", rb'{"prompt": ["\udbff\udbff"]}'),
])
def test_a_lone_surrogate_is_400(port: int, path: str, raw: bytes) -> None:
    reply = call(port, "POST", path, raw=raw)
    assert reply.status == 400, reply.body[:300]
    error = reply.json()["error"]
    assert error["code"] == "invalid_request" and "surrogate" in error["message"], error


@pytest.mark.parametrize("request_bytes", [
    b"GET //[ HTTP/1.0\r\n\r\n",
    b"GET http://[::1/health HTTP/1.0\r\n\r\n",
    b"POST //[x/v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
])
def test_odd_request_targets_are_4xx_not_500(port: int, request_bytes: bytes) -> None:
    reply = raw_request(port, request_bytes)
    status = int(reply.split(b" ")[1])
    assert 400 <= status < 500, reply[:300]
    assert "error" in json.loads(reply.partition(b"\r\n\r\n")[2])
