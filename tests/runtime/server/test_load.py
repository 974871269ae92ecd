"""Load: bursts answered or refused at once (429), FIFO queue, deadlines (504), client
disconnects that free the slot, shutdown with work in flight, and /metrics counts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

from edgepack.runtime.server.engine import Scheduler, Stop
from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, Reply, USER, chat, local, metrics, port, proc_server)


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
