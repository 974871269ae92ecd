"""The OpenAI-compatible server, end to end over real sockets on the tiny GGUF.

One server runs as a real subprocess through ``serve()`` for the whole module (and must exit
0 on SIGTERM); tests needing other settings (a key, a short deadline, a bundle, a fallback)
start their own in-process server with :func:`start_server`. Generation is the real
llama.cpp on the tiny random model: its text is gibberish, but greedy text is deterministic,
so the server's answers are compared with the in-process session's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
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

from edgepack.errors import UnsafeModelError, UsageError
from edgepack.runtime.server import ModelServer, ServeConfig, make_server, read_api_key, serve, start_server
from edgepack.runtime.server_engine import Scheduler, Stop
from edgepack.runtime.session import open_model

CTX = 4096
USER = [{"role": "user", "content": "Compressor C-12 tripped on high vibration."}]
LAUNCH = r"""
import json, os, sys
from pathlib import Path
from edgepack.runtime.server import serve

url_file = Path(sys.argv[3])

def ready(url):
    tmp = url_file.with_name(url_file.name + ".tmp")
    tmp.write_text(url)
    os.replace(tmp, url_file)

serve(Path(sys.argv[1]), port=0, on_ready=ready, **json.loads(sys.argv[2]))
"""


# --- helpers ---------------------------------------------------------------------------------

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


# --- basics ----------------------------------------------------------------------------------

def test_health_models_and_identity(port: int, tiny_gguf: Path) -> None:
    assert call(port, "GET", "/health").json() == {"status": "ok", "model": "tiny-F16"}
    (card,) = call(port, "GET", "/v1/models").json()["data"]
    assert card["id"] == "tiny-F16" and card["object"] == "model"
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert card["edgepack"]["model_sha256"] == sha and card["edgepack"]["n_ctx"] == CTX
    assert call(port, "GET", "/v1/models/tiny-F16").json()["id"] == "tiny-F16"
    assert call(port, "GET", "/v1/models/other").status == 404


def test_chat_equals_in_process_greedy(port: int, reference: Any) -> None:
    expected = reference.complete(USER, max_tokens=24)
    prompt_tokens = len(reference.backend.chat_tokens(USER))
    reply = chat(port, max_tokens=24)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-F16"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24,
                             "total_tokens": prompt_tokens + 24}
    meta = body["edgepack"]
    assert meta["served_by"] == "student" and meta["bundle"] is None
    assert -20 < meta["mean_token_logprob"] < 0  # a random 400-token vocab: about -log(400) = -6
    assert meta["timings"]["generate_ms"] > 0


def test_streaming_equals_in_process_greedy(port: int, reference: Any) -> None:
    expected = reference.complete(USER, max_tokens=24)
    reply = chat(port, max_tokens=24, stream=True)
    assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream"
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected and len(chunks) > 3  # streamed in pieces, not one blob
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 24 and last["edgepack"]["mean_token_logprob"] < 0

    with_usage = chat(port, max_tokens=8, stream=True, stream_options={"include_usage": True}).events()
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 8
    assert with_usage[-3]["choices"][0]["finish_reason"] == "length"


def test_completions_equal_in_process(port: int, reference: Any) -> None:
    prompt = "Pump P-101 discharge pressure"
    expected = "".join(reference.backend.stream(prompt, max_tokens=12))
    body = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    assert body["usage"]["completion_tokens"] == 12
    events = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stream": True}).events()
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected and events[-1] == "[DONE]"


def test_stop_strings_cut_the_answer(port: int, reference: Any) -> None:
    full = reference.complete(USER, max_tokens=24)
    stop = full[6:9]
    cut = full.index(stop)
    for stream in (False, True):
        reply = chat(port, max_tokens=24, stop=[stop, "never-in-the-text"], stream=stream)
        if stream:
            events = reply.events()[:-1]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = reply.json()["choices"][0]["message"]["content"], reply.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (full[:cut], "stop")


# --- limits and validation --------------------------------------------------------------------

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


def test_openai_argument_variants(port: int) -> None:
    body = chat(port, max_completion_tokens=3, n=1, top_p=1, presence_penalty=0, user="u1", seed=7).json()
    assert body["usage"]["completion_tokens"] == 3
    parts = [{"type": "text", "text": "Compressor C-12 tripped"}, {"type": "text", "text": "on high vibration."}]
    assert chat(port, messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": parts}], max_tokens=2).status == 200
    sampled = [chat(port, max_tokens=8, temperature=1.0, seed=11).json()["choices"][0]["message"]["content"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_unknown_paths_methods_and_models(port: int) -> None:
    assert call(port, "GET", "/v1/nothing").status == 404
    assert call(port, "GET", "/v1/chat/completions").status == 405
    assert chat(port, model="gpt-4o").status == 404
    assert chat(port, model="tiny-F16", max_tokens=2).status == 200


def test_no_cors_and_loopback_host_check(port: int) -> None:
    pre = call(port, "OPTIONS", "/v1/chat/completions",
               headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status == 405 and not any(k.startswith("access-control-") for k in pre.headers)
    ok = chat(port, max_tokens=2, headers={"Origin": "http://evil.example"})
    assert ok.status == 200 and not any(k.startswith("access-control-") for k in ok.headers)
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host header.
    rebound = chat(port, max_tokens=2, headers={"Host": "evil.example:8000"})
    assert rebound.status == 403
    assert chat(port, max_tokens=2, headers={"Host": f"localhost:{port}"}).status == 200


# --- load, disconnects, deadlines -------------------------------------------------------------

def answer_text(reply: Reply, stream: bool) -> str:
    if not stream:
        return reply.json()["choices"][0]["message"]["content"]
    events = reply.events()
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])


@pytest.mark.parametrize("n, stream", [(12, False), (32, True)])
def test_burst_completes_or_is_refused_fast(port: int, n: int, stream: bool) -> None:
    """n concurrent requests, one model slot and a queue of 2: each is answered or refused at
    once with 429; the answered ones equal the serial greedy answer."""
    serial = chat(port, max_tokens=1500).json()["choices"][0]["message"]["content"]
    barrier = threading.Barrier(n)
    replies: list[Reply | BaseException] = [None] * n  # type: ignore[list-item]

    def worker(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = chat(port, max_tokens=1500, stream=stream)
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
            replies[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert all(isinstance(r, Reply) for r in replies), replies
    statuses = sorted(r.status for r in replies)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in replies:
        if r.status == 429:
            assert r.elapsed < 1.0 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        else:
            assert answer_text(r, stream) == serial
    assert metrics(port)["edgepack_queue_depth"] == 0


def test_many_sequential_requests_leave_nothing_behind(port: int) -> None:
    for i in range(100):
        reply = chat(port, max_tokens=2, stream=bool(i % 2))
        assert reply.status == 200
    # A handler thread counts its connection closed just after the client saw the socket close.
    deadline = time.monotonic() + 5
    while (m := metrics(port))["edgepack_open_connections"] != 1:  # 1: this /metrics request
        assert time.monotonic() < deadline, m["edgepack_open_connections"]
        time.sleep(0.02)
    assert m["edgepack_queue_depth"] == 0 and m["edgepack_generations_running"] == 0


def test_close_cancels_running_work_after_the_grace(local: Any) -> None:
    server = local(n_ctx=CTX, shutdown_grace_s=0.1)
    result: dict[str, Reply] = {}
    worker = threading.Thread(target=lambda: result.update(reply=chat(server.port, max_tokens=4000, stream=True)))
    worker.start()
    deadline = time.monotonic() + 10
    while metrics(server.port)["edgepack_generations_running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 3
    worker.join(10)
    events = result["reply"].events()
    assert events[-1]["error"]["code"] == "shutting_down"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_client_disconnect_stops_generation_and_frees_the_slot(port: int) -> None:
    before = metrics(port)
    body = json.dumps({"messages": USER, "max_tokens": 3000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while b'"delta": {"content": ' not in seen:  # the first text chunk: generation is under way
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    sock.close()
    started = time.monotonic()
    follow = chat(port, max_tokens=4)
    assert follow.status == 200 and time.monotonic() - started < 5
    after = metrics(port)
    assert after['edgepack_rejections_total{reason="client_disconnect"}'] \
        == before['edgepack_rejections_total{reason="client_disconnect"}'] + 1
    assert after['edgepack_requests_total{endpoint="/v1/chat/completions",code="499"}'] \
        == before.get('edgepack_requests_total{endpoint="/v1/chat/completions",code="499"}', 0) + 1
    generated = after["edgepack_completion_tokens_total"] - before["edgepack_completion_tokens_total"] - 4
    assert 1 <= generated < 1500, generated  # stopped early, not run to max_tokens


def test_deadline_ends_the_request_and_frees_the_slot(local: Any) -> None:
    server = local(n_ctx=CTX, timeout_s=0.25)
    reply = chat(server.port, max_tokens=4000)
    assert reply.status == 504 and reply.json()["error"]["code"] == "deadline"
    assert reply.elapsed < 2.0
    stream = chat(server.port, max_tokens=4000, stream=True)
    events = stream.events()
    assert stream.status == 200 and events[-1] != "[DONE]" and events[-1]["error"]["code"] == "deadline"
    assert chat(server.port, max_tokens=4).status == 200
    m = metrics(server.port)
    assert m['edgepack_rejections_total{reason="deadline"}'] == 2 and m["edgepack_generations_running"] == 0


def test_scheduler_is_fifo_bounded_and_honours_deadlines() -> None:
    sched = Scheduler(max_queue=1)
    never_gone = lambda: False  # noqa: E731
    sched.acquire(time.monotonic() + 5, never_gone)
    order: list[str] = []
    waiter = threading.Thread(target=lambda: (sched.acquire(time.monotonic() + 5, never_gone),
                                              order.append("waiter"), sched.release()))
    waiter.start()
    time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(Stop) as full:
        sched.acquire(time.monotonic() + 5, never_gone)
    assert full.value.reason == "queue_full" and time.monotonic() - start < 0.1
    sched.release()
    waiter.join(5)
    assert order == ["waiter"]
    sched.acquire(time.monotonic() + 5, never_gone)
    with pytest.raises(Stop) as late:
        sched.acquire(time.monotonic() + 0.3, never_gone)
    assert late.value.reason == "deadline"
    with pytest.raises(Stop) as gone:
        sched.acquire(time.monotonic() + 5, lambda: True)
    assert gone.value.reason == "client_disconnect"
    sched.release()
    assert sched.wait_idle(1)


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


# --- metrics ----------------------------------------------------------------------------------

def test_metrics_count_requests_tokens_and_rejections(port: int) -> None:
    before = metrics(port)
    ok = chat(port, max_tokens=5).json()
    assert chat(port, max_tokens=-5).status == 400
    after = metrics(port)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('edgepack_requests_total{endpoint="/v1/chat/completions",code="200"}') == 1
    assert delta('edgepack_requests_total{endpoint="/v1/chat/completions",code="400"}') == 1
    assert delta('edgepack_rejections_total{reason="invalid_request"}') == 1
    assert delta("edgepack_completion_tokens_total") == 5
    assert delta("edgepack_prompt_tokens_total") == ok["usage"]["prompt_tokens"]
    assert delta('edgepack_request_duration_seconds_count{endpoint="/v1/chat/completions"}') == 1
    assert delta('edgepack_request_duration_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}') == 1
    assert after["edgepack_model_loaded"] == 1 and after["edgepack_queue_depth"] == 0
    buckets = [v for k, v in after.items() if k.startswith("edgepack_request_duration_seconds_bucket{endpoint"
                                                            '="/v1/chat/completions"')]
    assert buckets == sorted(buckets)  # cumulative


# --- exposure ---------------------------------------------------------------------------------

def test_api_key_is_required_when_set(local: Any) -> None:
    server = local(api_key="s3cret-key")
    assert call(server.port, "GET", "/health").status == 200  # probes need no key
    assert chat(server.port, max_tokens=2).status == 401
    wrong = chat(server.port, max_tokens=2, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert call(server.port, "GET", "/metrics").status == 401
    assert call(server.port, "GET", "/v1/models").status == 401
    good = {"Authorization": "Bearer s3cret-key"}
    assert chat(server.port, max_tokens=2, headers=good).status == 200
    assert metrics(server.port, good)['edgepack_rejections_total{reason="unauthorized"}'] == 4


def test_non_loopback_bind_needs_a_key(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(UsageError, match="without an API key"):
            make_server(tiny_gguf, ServeConfig(host=host, port=0))
    with pytest.raises(UsageError, match="without an API key"):
        serve(tiny_gguf, host="0.0.0.0", port=0)
    monkeypatch.delenv("EDGEPACK_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="EDGEPACK_TEST_KEY is not set"):
        serve(tiny_gguf, host="0.0.0.0", port=0, api_key_env="EDGEPACK_TEST_KEY")
    monkeypatch.setenv("EDGEPACK_TEST_KEY", "k" * 32)
    with make_server(tiny_gguf, ServeConfig(host="0.0.0.0", port=0,
                                            api_key=read_api_key("EDGEPACK_TEST_KEY"))) as server:
        assert server.port > 0 and not server.host_check
    with make_server(tiny_gguf, ServeConfig(port=0)) as server:  # the default is loopback
        assert server.url.startswith("http://127.0.0.1:") and server.host_check


def test_health_is_503_until_the_model_has_loaded(tiny_gguf: Path) -> None:
    with make_server(tiny_gguf, ServeConfig(port=0, threads=1)) as server:
        server.start()
        loading = call(server.port, "GET", "/health")
        assert loading.status == 503 and loading.json() == {"status": "loading"}
        assert chat(server.port, max_tokens=2).json()["error"]["code"] == "not_ready"
        server.load()
        assert call(server.port, "GET", "/health").status == 200
        assert chat(server.port, max_tokens=2).status == 200


def test_hostile_chat_template_refuses_to_serve(tiny_gguf: Path, tmp_path: Path) -> None:
    from tests.runtime.helpers import rewrite_gguf

    marker = tmp_path / "pwned"
    payload = ("{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
               "{% for m in messages %}{{ m.content }}{% endfor %}")
    evil = rewrite_gguf(tiny_gguf, tmp_path / "evil.gguf", {"tokenizer.chat_template": payload})
    with pytest.raises(UnsafeModelError):
        start_server(evil, ServeConfig(port=0, threads=1))
    assert not marker.exists()


def test_serves_a_verified_bundle(tiny_gguf: Path, tmp_path: Path, cache_dir: Path, local: Any) -> None:
    from edgepack.runtime.bundle import BundleFile, write_bundle
    from edgepack.runtime.gguf_header import read_gguf
    from edgepack.runtime.memory import estimate_gguf_memory

    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16",
                "profile": {"name": "tiny-ok"}, "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": 256, "threads": 1,
                            "memory_estimate": estimate_gguf_memory(read_gguf(tiny_gguf), 256)}}
    bundle = tmp_path / "tiny-tiny-ok-gguf-F16.edgepack"
    write_bundle(bundle, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    server = local(bundle)
    card = call(server.port, "GET", "/v1/models").json()["data"][0]
    assert card["id"] == "tiny-tiny-ok-gguf-F16" and card["edgepack"]["n_ctx"] == 256
    meta = chat(server.port, max_tokens=3).json()["edgepack"]
    assert meta["bundle"] == bundle.name and meta["gate_status"] == "PASS" and meta["profile"] == "tiny-ok"
    assert meta["model_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()


# --- logprobs and the teacher fallback --------------------------------------------------------

def test_token_logprobs_match_transformers(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with open_model(tiny_gguf, threads=1) as session:
        backend = session.backend
        prompt = backend.chat_tokens(USER)
        tokens, logprobs = [], []
        for tok in backend.generate(prompt, max_tokens=16):
            tokens.append(tok)
            logprobs.append(backend.last_token_logprob(tok))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    ref = torch.log_softmax(logits, -1)
    expected = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
    assert max(abs(a - b) for a, b in zip(logprobs, expected)) < 0.02  # F16 weights vs float32


def test_fallback_to_a_teacher_server(port: int, local: Any) -> None:
    """The module's server process is the teacher; an in-process server is the student."""
    from edgepack.runtime.server_fallback import parse_fallback

    teacher = parse_fallback(f"openai:http://127.0.0.1:{port}/v1#tiny-F16")
    teacher_count = metrics(port).get('edgepack_requests_total{endpoint="/v1/chat/completions",code="200"}', 0)
    always = local(n_ctx=CTX, model_id="student", fallback=teacher, fallback_min_logprob=0.0)
    direct = chat(port, max_tokens=10).json()["choices"][0]["message"]["content"]
    reply = chat(always.port, max_tokens=10, model="student").json()
    meta = reply["edgepack"]
    assert meta["served_by"] == "teacher" and meta["fallback"]["used"] is True
    assert meta["fallback"]["teacher_model"] == "tiny-F16" and meta["fallback"]["student_mean_token_logprob"] < 0
    assert reply["choices"][0]["message"]["content"] == direct
    assert reply["usage"]["completion_tokens"] == 10
    events = chat(always.port, max_tokens=10, stream=True).events()
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == direct
    assert events[-2]["edgepack"]["served_by"] == "teacher" and events[-2]["edgepack"]["fallback"]["stream_buffered"]
    teacher_after = metrics(port)['edgepack_requests_total{endpoint="/v1/chat/completions",code="200"}']
    assert teacher_after == teacher_count + 3  # direct + two forwarded
    assert metrics(always.port)['edgepack_fallback_total{outcome="teacher"}'] == 2

    never = local(n_ctx=CTX, fallback=teacher, fallback_min_logprob=-1000.0)
    meta = chat(never.port, max_tokens=10).json()["edgepack"]
    assert meta["served_by"] == "student" and meta["fallback"]["used"] is False
    assert metrics(never.port)['edgepack_fallback_total{outcome="student"}'] == 1

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    down = local(n_ctx=CTX, fallback=parse_fallback(f"openai:http://127.0.0.1:{dead_port}/v1#t"),
                 fallback_min_logprob=0.0)
    reply = chat(down.port, max_tokens=10).json()
    assert reply["edgepack"]["served_by"] == "student" and "unreachable" in reply["edgepack"]["fallback"]["error"]
    assert metrics(down.port)['edgepack_fallback_total{outcome="teacher_error"}'] == 1


def test_fallback_spec_is_checked() -> None:
    from edgepack.runtime.server_fallback import parse_fallback

    for bad in ("openai:localhost#m", "openai:http://h/v1", "ollama:http://h#m", "http://h/v1#m"):
        with pytest.raises(UsageError):
            parse_fallback(bad)
    with pytest.raises(UsageError, match="fallback_min_logprob"):
        ServeConfig(fallback=parse_fallback("openai:http://127.0.0.1:1/v1#m"))


# --- the openai client ------------------------------------------------------------------------

def test_openai_client(port: int, reference: Any) -> None:
    openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra)")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    expected = reference.complete(USER, max_tokens=12)
    assert [m.id for m in client.models.list()] == ["tiny-F16"]
    done = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=12)
    assert done.choices[0].message.content == expected and done.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=-1)
