"""Slowloris and oversized prompts (issue #20, defects 4 and 10, the server part of 12).

Imported by run.py (category ``slowloris``); also runnable on its own::

    nice -n 5 .venv/bin/python bench/reliability/slowloris.py

The real server runs in a subprocess (``tests.runtime.server.helpers.launch``) with its default
connection limits (header deadline 10 s, body deadline 30 s, 512 pending connections, 256 per
client address, 1 MiB bodies) on the tiny test GGUF (random weights, a byte-level BPE
vocabulary with the ChatML special tokens, ``tests/tiny.py``), n_ctx 2048. Phases:

1. crowd: 400 connections from four client addresses (127.0.0.2-5), 100 of each kind: idle,
   half a header, a request line dripped a byte a second, a body dripped a byte a second.
   While they are held, 20 chats and 20 ``/health`` from 127.0.0.1 must each be answered within
   30 s. The header kinds must all be closed by the server by the header deadline + 3 s, none
   of the slow bodies before it, and all of those by the body deadline + 3 s.
2. one address floods: 300 idle connections from one address beside 50 from another. The
   flooding address loses exactly its own oldest 44 (per-client cap 256), the other none, and
   chats are still answered.
3. total cap: 100 idle connections from each of six addresses: the 88 oldest are displaced
   (cap 512), chats are still answered. Then 80 uploads that stop 24 KiB short of a 1 MiB
   body: the oldest are shed past the 64 MiB buffer budget, the server's RSS grows by less
   than 112 MiB, chats are still answered.
4. API key (a second server, with a key): half headers, drips and slow bodies with the right
   key, a wrong key and none, 30 of each. A complete header with a wrong or missing key is
   closed (401) within 2 s without its body; keyed chats are answered while the rest is held.
5. oversized tokenization and odd inputs: 1 MB of special-token text (chat, completion), 1 MB
   of plain text and of emoji, special-token prompts just under and over the byte bound
   (n_ctx x 32), lone surrogates in every field, targets ``urlsplit`` refuses, NULs, deep
   nesting: each must be answered without a 5xx within 5 s and cost the server at most 2 CPU-s.

``tried`` counts hostile connections and requests; ``faults`` the same (all are hostile);
``failures`` every check above that did not hold, each listed.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HEADER_DEADLINE_S, BODY_DEADLINE_S = 10.0, 30.0  # ServeConfig's defaults, which serve() uses
PER_CLIENT, TOTAL = 256, 512
N_CTX = 2048
KEY_ENV = "EDGEPACK_SLOWLORIS_KEY"
KEY = "slowloris-bench-" + "k" * 24
SPECIAL = "<|im_start|>"


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def _addresses(n: int, first: int = 2) -> list[str]:
    """``n`` distinct loopback client addresses (all 127.0.0.1 where the system allows no other)."""
    wanted = [f"127.0.0.{first + i}" for i in range(n)]
    return wanted if all(_can_bind(a) for a in wanted) else ["127.0.0.1"] * n


class _Run:
    """Counts and failures of one category run."""

    def __init__(self) -> None:
        self.tried = 0
        self.faults = 0
        self.failures: list[str] = []
        self.details: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok


def _legit(run: _Run, port: int, n: int, label: str, headers: dict[str, str] | None = None) -> list[float]:
    """``n`` chats and ``n`` /health calls that must be answered (200) within 30 s each; the
    times of those that were."""
    from tests.runtime.server.helpers import call, chat

    times = []
    for _ in range(n):
        for name, send in (("chat", lambda: chat(port, max_tokens=4, headers=headers)),
                           ("/health", lambda: call(port, "GET", "/health"))):
            try:
                reply = send()
                ok = reply.status == 200 and reply.elapsed < 30
                if run.check(ok, f"{label}: {name} got {reply.status} after {reply.elapsed:.1f} s"):
                    times.append(reply.elapsed)
            except OSError as exc:
                run.check(False, f"{label}: {name} failed: {exc!r}")
    return times


def _pending_drains(port: int, run: _Run, label: str) -> None:
    """After the clients close, the server must hold no pending connection (nothing leaks)."""
    from tests.runtime.server.helpers import metrics

    deadline = time.monotonic() + 5
    while (left := metrics(port).get("edgepack_pending_connections", 0)) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.check(not left, f"{label}: {left:g} pending connections left after the clients closed")


def _crowd(run: _Run, port: int) -> None:
    from tests.runtime.server.helpers import SlowClients

    kinds = ("idle", "half_header", "drip", "slow_body")
    crowds = {kind: SlowClients(port, source=src, interval=1.0) for kind, src in zip(kinds, _addresses(4))}
    opened: dict[str, float] = {}  # when each kind's last connection was made (deadlines count from there)
    try:
        for kind, crowd in crowds.items():
            crowd.open(**{kind: 100}).start()
            opened[kind] = time.monotonic()
        run.tried += 400
        run.faults += 400
        times = _legit(run, port, 20, "crowd of 400")
        held = {kind: 100 - c.closed() for kind, c in crowds.items()}
        run.details.append(f"crowd of 400 (idle, half-header, 1 B/s header drip, 1 B/s body drip; 4 addresses): "
                           f"{len(times)} of 40 requests answered while held, "
                           f"median {statistics.median(times or [0]):.2f} s, "
                           f"max {max(times, default=0):.2f} s; still held after them: {held}")
        time.sleep(max(0.0, max(opened[k] for k in kinds[:3]) + HEADER_DEADLINE_S + 3 - time.monotonic()))
        cut = {kind: crowds[kind].closed() for kind in kinds}
        for kind in kinds[:3]:
            run.check(cut[kind] == 100, f"crowd: {100 - cut[kind]} of 100 {kind} connections still open "
                                        f"{HEADER_DEADLINE_S + 3:g} s after connecting (header deadline)")
        run.check(cut["slow_body"] == 0, f"crowd: {cut['slow_body']} slow bodies closed before the body deadline")
        time.sleep(max(0.0, opened["slow_body"] + BODY_DEADLINE_S + 3 - time.monotonic()))
        bodies = crowds["slow_body"].closed()
        run.check(bodies == 100, f"crowd: {100 - bodies} of 100 slow bodies still open "
                                 f"{BODY_DEADLINE_S + 3:g} s after their headers (body deadline)")
        run.details.append(f"header kinds closed by {HEADER_DEADLINE_S + 3:g} s: "
                           f"{sum(cut[k] for k in kinds[:3])}/300; slow bodies closed by "
                           f"{BODY_DEADLINE_S + 3:g} s: {bodies}/100 (none before the body deadline: "
                           f"{cut['slow_body'] == 0})")
    finally:
        for crowd in crowds.values():
            crowd.close()
    _pending_drains(port, run, "crowd")


def _flood(run: _Run, port: int) -> None:
    from tests.runtime.server.helpers import SlowClients

    flooder, other = _addresses(2, first=10)
    if flooder == other:
        run.details.append("per-client flood skipped: this system gives loopback clients one address only")
        return
    big, small = SlowClients(port, source=flooder), SlowClients(port, source=other)
    try:
        big.open(idle=PER_CLIENT + 44)
        small.open(idle=50)
        run.tried += PER_CLIENT + 94
        run.faults += PER_CLIENT + 94
        time.sleep(0.5)
        big.closed()
        lost = sorted(big.gone)
        run.check(lost == list(range(44)), f"one-address flood: it lost {len(lost)} connections "
                                                   f"(expected its own oldest 44), first {lost[:5]}")
        run.check(small.closed() == 0, f"one-address flood: the other address lost {small.closed()} of 50")
        times = _legit(run, port, 5, "one-address flood")
        run.details.append(f"one address with {PER_CLIENT + 44} idle connections beside another with 50: it lost "
                           f"its own oldest {len(lost)}, the other {small.closed()}; {len(times)} requests "
                           f"answered, max {max(times, default=0):.2f} s")
    finally:
        big.close()
        small.close()
    _pending_drains(port, run, "one-address flood")

    crowds = [SlowClients(port, source=a) for a in _addresses(6, first=20)]
    try:
        for crowd in crowds:
            crowd.open(idle=100)
        run.tried += 600
        run.faults += 600
        time.sleep(0.5)
        lost = [c.closed() for c in crowds]
        run.check(sum(lost) == 600 - TOTAL and lost[0] == 600 - TOTAL,
                  f"total cap: displaced {lost} per address (expected the oldest {600 - TOTAL}, all of the first)")
        times = _legit(run, port, 5, "600 idle connections")
        run.details.append(f"600 idle connections from 6 addresses: {sum(lost)} displaced (the oldest), "
                           f"{len(times)} requests answered, max {max(times, default=0):.2f} s")
    finally:
        for crowd in crowds:
            crowd.close()
    _pending_drains(port, run, "total cap")


def _uploads(run: _Run, port: int, pid: int) -> None:
    """80 uploads each stopping 24 KiB short of a 1 MiB body: the server buffers at most its
    budget (64 MiB), shedding the oldest, and stays answerable."""
    import psutil

    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(1 << 20).encode() + b"\r\n\r\n")
    socks = []
    source = _addresses(1, 40)[0]
    try:
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
            sock.sendall(head + b" " * ((1 << 20) - 24 * 1024))
            socks.append(sock)
        run.tried += 80
        run.faults += 80
        time.sleep(1.0)
        grown = (proc.memory_info().rss - before) / 2 ** 20
        shed = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                shed += sock.recv(16).startswith(b"HTTP/1.0 503")
            except BlockingIOError:
                pass
        run.check(grown < 64 + 48, f"slow uploads: server RSS grew {grown:.0f} MiB for 80 x 1000 KiB held")
        fit = (64 << 20) // ((1 << 20) - 24 * 1024)  # bodies the budget holds
        run.check(shed >= 80 - fit, f"slow uploads: {shed} of 80 shed past the 64 MiB budget (expected "
                                    f"{80 - fit})")
        times = _legit(run, port, 3, "80 slow uploads")
        run.details.append(f"80 uploads held 24 KiB short of 1 MiB: {shed} oldest shed (503) past the 64 MiB "
                           f"buffer budget, server RSS +{grown:.0f} MiB, {len(times)} requests answered")
    finally:
        for sock in socks:
            sock.close()
    _pending_drains(port, run, "slow uploads")


def _keyed(run: _Run, model: Path, folder: Path) -> None:
    from tests.runtime.server.helpers import SlowClients, chat, launch

    os.environ[KEY_ENV] = KEY
    server = launch(model, folder, n_ctx=N_CTX, threads=1, max_queue=4, timeout_s=60.0, api_key_env=KEY_ENV)
    port = server.port
    variants = {"right key": f"Authorization: Bearer {KEY}\r\n".encode(),
                "wrong key": b"Authorization: Bearer not-the-key\r\n", "no key": b""}
    crowds = {name: SlowClients(port, source=source, headers=hdr, interval=1.0)
              for (name, hdr), source in zip(variants.items(), _addresses(3, first=30))}
    try:
        for crowd in crowds.values():
            crowd.open(half_header=30, drip=30, slow_body=30).start()
        run.tried += 270
        run.faults += 270
        time.sleep(2.0)
        for name, crowd in crowds.items():
            refused = crowd.closed("slow_body")
            expected = 0 if name == "right key" else 30
            run.check(refused == expected, f"API key, {name}: {refused} of 30 complete headers closed within 2 s "
                                           f"(expected {expected}: a bad key is refused before the body)")
            early = crowd.closed("half_header") + crowd.closed("drip")
            run.check(early == 0, f"API key, {name}: {early} incomplete headers closed before the deadline")
        times = _legit(run, port, 10, "API-key server", headers={"Authorization": f"Bearer {KEY}"})
        try:
            status: Any = chat(port, max_tokens=2).status
        except OSError as exc:
            status = repr(exc)
        run.check(status == 401, f"API key: a chat without the key got {status}")
        run.details.append(f"API-key server, 270 held (right/wrong/no key x half-header/drip/slow body): wrong and "
                           f"missing keys with complete headers refused within 2 s without their bodies; "
                           f"{len(times)} keyed requests answered, max {max(times, default=0):.2f} s")
    finally:
        for crowd in crowds.values():
            crowd.close()
        code = server.stop()
        os.environ.pop(KEY_ENV, None)
    run.check(code == 0, f"API-key server exited {code} on SIGTERM")


def _odd_inputs() -> list[tuple[str, str, bytes, Callable[[int], bool]]]:
    """(label, path, raw body or a whole raw request, accepted statuses)."""
    def body(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def chat_of(text: str) -> bytes:
        return body({"messages": [{"role": "user", "content": text}], "max_tokens": 2})

    bound = N_CTX * 32
    four_xx: Callable[[int], bool] = lambda s: 400 <= s < 500  # noqa: E731
    not_5xx: Callable[[int], bool] = lambda s: 0 < s < 500  # noqa: E731
    mb_special = SPECIAL * (1_000_000 // len(SPECIAL))
    cases: list[tuple[str, str, bytes, Callable[[int], bool]]] = [
        ("chat, 1 MB of special-token text", "/v1/chat/completions", chat_of(mb_special), four_xx),
        ("completion, 1 MB of special-token text", "/v1/completions", body({"prompt": mb_special}), four_xx),
        ("chat, 1 MB of special-token text, streamed", "/v1/chat/completions",
         body({"messages": [{"role": "user", "content": mb_special}], "stream": True}), four_xx),
        ("chat, 1 MB of plain text", "/v1/chat/completions", chat_of("Pump P-101 " * 90_000), four_xx),
        ("chat, 1 MB of emoji", "/v1/chat/completions", chat_of("\U0001F525" * 250_000), four_xx),
        ("completion, special text at the byte bound", "/v1/completions",
         body({"prompt": (SPECIAL * (bound // len(SPECIAL) + 1))[:bound]}), four_xx),
        ("completion, special text 1 byte over the bound", "/v1/completions",
         body({"prompt": (SPECIAL * (bound // len(SPECIAL) + 1))[:bound + 1]}), four_xx),
        ("chat, special text at the byte bound", "/v1/chat/completions",
         chat_of((SPECIAL * (bound // len(SPECIAL) + 1))[:bound]), four_xx),
        ("chat, 100 messages of 640 B special text", "/v1/chat/completions",
         body({"messages": [{"role": "user", "content": SPECIAL * 53}] * 100}), four_xx),
        ("chat, NUL characters", "/v1/chat/completions", chat_of("\u0000" * 1000), not_5xx),
        ("chat, 100k-deep nesting", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, four_xx),
    ]
    surrogates = [
        ("content", rb'{"messages": [{"role": "user", "content": "pump \ud800 trip"}]}'),
        ("text part", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}'),
        ("name", rb'{"messages": [{"role": "user", "content": "x", "name": "\ud83d"}]}'),
        ("stop", rb'{"messages": [{"role": "user", "content": "x"}], "stop": ["\udc00"]}'),
        ("model", rb'{"messages": [{"role": "user", "content": "x"}], "model": "\ud800"}'),
        ("user", rb'{"messages": [{"role": "user", "content": "x"}], "user": "\ud800"}'),
        ("key", rb'{"messages": [{"role": "user", "content": "x"}], "\ud800": 1}'),
        ("role", rb'{"messages": [{"role": "\ud800", "content": "x"}]}'),
        ("high pair reversed", rb'{"messages": [{"role": "user", "content": "\udc00\ud800"}]}'),
    ]
    cases += [(f"lone surrogate in {where}", "/v1/chat/completions", raw, four_xx) for where, raw in surrogates]
    cases += [("lone surrogate in prompt", "/v1/completions", rb'{"prompt": "\ud800"}', four_xx),
              ("lone surrogates in a prompt list", "/v1/completions", rb'{"prompt": ["\udbff\udbff"]}', four_xx)]
    targets = [b"GET //[ HTTP/1.0\r\n\r\n", b"GET http://[::1/health HTTP/1.0\r\n\r\n",
               b"GET //[x/v1/models HTTP/1.0\r\n\r\n", b"GET * HTTP/1.0\r\n\r\n",
               b"POST //[x/v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
               b"Content-Length: 2\r\n\r\n{}",
               b"GET /v1/models/%ff%fe HTTP/1.0\r\n\r\n", b"GET /%00 HTTP/1.0\r\n\r\n"]
    cases += [(f"request target {raw.split(b' ')[1].decode()!r}", "", raw, four_xx) for raw in targets]
    return cases


def _raw_status(port: int, data: bytes) -> tuple[int, float]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    try:
        return int(reply.split(b" ")[1]), time.monotonic() - start
    except (IndexError, ValueError):
        return 0, time.monotonic() - start


def _inputs(run: _Run, port: int, pid: int) -> None:
    import psutil

    from tests.runtime.server.helpers import call

    proc = psutil.Process(pid)

    def cpu() -> float:
        t = proc.cpu_times()
        return t.user + t.system

    for label, path, raw, accepted in _odd_inputs():
        run.tried += 1
        run.faults += 1
        before = cpu()
        try:
            if path:
                reply = call(port, "POST", path, raw=raw, timeout=120)
                status, took = reply.status, reply.elapsed
            else:
                status, took = _raw_status(port, raw)
        except OSError as exc:
            run.check(False, f"{label}: {exc!r}")
            continue
        spent = cpu() - before
        run.check(accepted(status) and took < 5 and spent < 2,
                  f"{label}: status {status} after {took:.2f} s, {spent:.2f} CPU-s of the server")
        if "1 MB of special" in label or "at the byte bound" in label:
            run.details.append(f"{label}: {status} in {took:.2f} s, {spent:.2f} CPU-s of the server")


def slowloris_category(work: Path) -> dict[str, Any]:
    """Run every phase (see the module docstring) and return the counts."""
    sys.path.insert(0, str(ROOT))
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from tests.runtime.server.helpers import launch
    from tests.tiny import build_tiny_llama

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < want:  # ~1,500 sockets on each side at the peak
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    t0 = time.monotonic()
    run = _Run()
    folder = work / "slowloris"
    folder.mkdir(parents=True, exist_ok=True)
    model = convert_hf_to_gguf(build_tiny_llama(folder / "llama"), folder / "tiny-F16.gguf", outtype="F16")
    try:
        (folder / "open").mkdir(exist_ok=True)
        server = launch(model, folder / "open", n_ctx=N_CTX, threads=1, max_queue=4, timeout_s=60.0)
        try:
            _crowd(run, server.port)
            _flood(run, server.port)
            _uploads(run, server.port, server.proc.pid)
            _inputs(run, server.port, server.proc.pid)
            _legit(run, server.port, 3, "after everything")
        finally:
            code = server.stop()
        run.check(code == 0, f"server exited {code} on SIGTERM")
        (folder / "keyed").mkdir(exist_ok=True)
        _keyed(run, model, folder / "keyed")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"category": "slowloris", "tried": run.tried, "faults": run.faults, "failures": len(run.failures),
            "failure_list": run.failures, "details": run.details, "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(slowloris_category(Path(tempfile.mkdtemp())), indent=1))
