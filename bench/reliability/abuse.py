"""Abuse categories of bench/reliability/run.py: the server under load and bad requests, and
mutated GGUF files passed through edgepack's header check to llama.cpp.

Imported by run.py (which owns the command line and the report); not run on its own.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUN_SCRIPT = Path(__file__).resolve().with_name("run.py")


# ----------------------------------------------------------------------------- server

def server_category(fx: dict[str, Any], work: Path) -> dict[str, Any]:
    import psutil

    from tests.runtime.server.helpers import USER, call, chat, launch, metrics

    model = fx["gated"] / "artifacts" / "student-F16.gguf"
    folder = work / "server"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    n_ctx, body_limit = 512, 64 * 1024
    t0 = time.monotonic()
    server = launch(model, folder, n_ctx=n_ctx, threads=1, max_queue=32, timeout_s=120.0, max_body_bytes=body_limit)
    port = server.port
    proc = psutil.Process(server.proc.pid)
    counts: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    def tally(name: str, status: int, ok: bool, detail: str = "") -> None:
        c = counts.setdefault(name, {"tried": 0, "statuses": {}, "failures": 0})
        c["tried"] += 1
        c["statuses"][str(status)] = c["statuses"].get(str(status), 0) + 1
        if not ok:
            c["failures"] += 1
            failures.append(f"{name}: status {status} {detail}")

    try:
        for _ in range(5):
            chat(port, max_tokens=8)
        baseline = proc.memory_info().rss

        # 32 concurrent streams
        replies: list[Any] = [None] * 32
        barrier = threading.Barrier(32)

        def worker(i: int) -> None:
            barrier.wait()
            try:
                replies[i] = chat(port, max_tokens=48, stream=True)
            except BaseException as exc:  # noqa: BLE001
                replies[i] = exc

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, r in enumerate(replies):
            if threads[i].is_alive():
                tally("concurrent streams", 0, False, "hung past 300 s")
            elif isinstance(r, BaseException):
                tally("concurrent streams", 0, False, repr(r))
            else:
                done = r.status == 200 and r.events()[-1] == "[DONE]"
                refused_fast = r.status in (429, 503) and r.elapsed < 1.0
                tally("concurrent streams", r.status, done or refused_fast)

        for i in range(100):
            r = chat(port, max_tokens=4, stream=bool(i % 2))
            tally("sequential requests", r.status, r.status == 200)

        for size in (body_limit + 1, 2 * body_limit, 1 << 20, 8 << 20, 64 << 20):
            try:
                r = call(port, "POST", "/v1/chat/completions",
                         raw=json.dumps({"messages": [{"role": "user", "content": "x" * size}]}).encode())
                tally("oversize bodies", r.status, r.status == 413 and r.json()["error"]["code"] == "body_too_large")
            except OSError as exc:  # a reset instead of the 413 is a failure (issue #9)
                tally("oversize bodies", 0, False, repr(exc))

        for words in (600, 1000, 3000, 6000, 12000):
            r = chat(port, messages=[{"role": "user", "content": "pump " * words}], max_tokens=4)
            tally("prompts beyond the context", r.status, r.status == 400)

        bad = [{"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": 10 ** 12}, {"max_tokens": "5"},
               {"max_tokens": True}, {"temperature": -0.1}, {"temperature": 1e308}, {"temperature": "hot"},
               {"seed": -1}, {"seed": 2 ** 70}, {"stream": "yes"}, {"stop": [""]}, {"n": 2}, {"messages": []},
               {"messages": "hi"}, {"messages": [{"role": "wizard", "content": "x"}]},
               {"messages": [{"role": "user", "content": 5}]}, {"max_tokens": -(2 ** 63)}]
        for body in bad:
            r = chat(port, **body)
            tally("bad parameters", r.status, r.status == 400, json.dumps(body))

        for _ in range(10):
            before = time.monotonic()
            data = json.dumps({"messages": USER, "max_tokens": 3000, "stream": True}).encode()
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
            seen = b""
            while b'"content": ' not in seen and time.monotonic() - before < 30:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                seen += chunk
            sock.close()
            follow = chat(port, max_tokens=4)
            tally("mid-stream disconnects", follow.status, follow.status == 200 and follow.elapsed < 5,
                  f"follow-up took {follow.elapsed:.1f} s")

        deadline = time.monotonic() + 10
        while True:
            m = metrics(port)
            if (m["edgepack_queue_depth"] == 0 and m["edgepack_generations_running"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if m["edgepack_queue_depth"] or m["edgepack_generations_running"]:
            failures.append(f"work left after the load: {m}")
        time.sleep(1.0)
        after = proc.memory_info().rss
        rss_ok = after <= baseline * 1.25 + (32 << 20)
        if not rss_ok:
            failures.append(f"RSS {after >> 20} MiB after the load vs {baseline >> 20} MiB before")
        health = call(port, "GET", "/health").status
        if health != 200:
            failures.append(f"/health is {health} after the load")
    finally:
        code = server.stop()
    if code != 0:
        failures.append(f"server exited {code} on SIGTERM")
    tried = sum(c["tried"] for c in counts.values())
    return {"category": "server", "inputs_tried": tried, "faults_injected": tried - counts["sequential requests"]["tried"],
            "failures": len(failures), "failure_details": failures[:30], "per_check": counts,
            "rss_mb": {"baseline": round(baseline / 2 ** 20, 1), "after_load": round(after / 2 ** 20, 1)},
            "server_exit_code": code, "seconds": round(time.monotonic() - t0, 1)}


# ----------------------------------------------------------------------------- gguf through llama.cpp

def native_loader(listing: Path, journal: Path) -> None:
    """Load each listed GGUF through edgepack's gguf backend and generate 2 tokens.

    Writes ``start <i>`` before and ``end <i> <outcome>`` after each file to ``journal``, so
    the parent can name the file a crash happened on and restart after it.
    """
    from edgepack.errors import EdgepackError
    from edgepack.runtime.backends.base import get_backend

    backend = get_backend("gguf")
    paths = json.loads(listing.read_text())
    done = {int(line.split()[1]) for line in journal.read_text().splitlines() if line.startswith("end")} \
        if journal.exists() else set()
    with open(journal, "a") as log:
        for i, path in enumerate(paths):
            if i in done:
                continue
            log.write(f"start {i}\n")
            log.flush()
            try:
                model = backend.load(Path(path), threads=1, n_ctx=64)
                try:
                    list(model.generate(model.tokenize("pump alarm"), max_tokens=2))
                finally:
                    model.close()
                outcome = "loaded"
            except EdgepackError as exc:
                outcome = f"refused:{type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - an untyped error is a finding
                outcome = f"UNTYPED:{type(exc).__name__}:{str(exc)[:80].replace(' ', '_')}"
            log.write(f"end {i} {outcome}\n")
            log.flush()


def random_mutation(data: bytes, header_end: int, rng: random.Random) -> bytes:
    """1-3 header-focused mutations (the same kinds the hypothesis fuzzer uses)."""
    import struct

    buf = bytearray(data)
    hostile = [0, 1, 2, 31, 33, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 62, 1 << 63,
               (1 << 64) - 1]
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(0, header_end if rng.random() < 0.9 else len(buf))
        op = rng.choice(["flip", "u64", "u32", "truncate", "insert", "delete"])
        if op == "flip":
            buf[pos] ^= rng.randint(1, 255)
        elif op in ("u64", "u32"):
            fmt = "<Q" if op == "u64" else "<I"
            value = rng.choice(hostile) % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, buf, min(pos, len(buf) - struct.calcsize(fmt)), value)
        elif op == "truncate":
            del buf[rng.randrange(24, len(buf)):]
        elif op == "insert":
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del buf[pos:pos + rng.randint(1, 64)]
    return bytes(buf)


def native_category(fx: dict[str, Any], work: Path, files: int, rng: random.Random) -> dict[str, Any]:
    """Mutated GGUFs: edgepack's header check first; what it accepts goes to llama.cpp in a child."""
    from edgepack.errors import InvalidModelFile
    from edgepack.gguf_header import read_gguf

    src = fx["gated"] / "artifacts" / "student-Q8_0.gguf"
    data = src.read_bytes()
    header_end = read_gguf(src).data_offset
    folder = work / "gguf-native"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    t0 = time.monotonic()
    header_refused: dict[str, int] = {}
    accepted: list[str] = []
    failures: list[str] = []
    for i in range(files):
        path = folder / f"m{i:04d}.gguf"
        path.write_bytes(random_mutation(data, header_end, rng))
        try:
            read_gguf(path)
            accepted.append(str(path))
        except InvalidModelFile:
            header_refused["InvalidModelFile"] = header_refused.get("InvalidModelFile", 0) + 1
            path.unlink()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{path.name}: header reader raised {type(exc).__name__}: {exc}")
    listing, journal = folder / "accepted.json", folder / "journal.txt"
    listing.write_text(json.dumps(accepted))
    crashes: list[str] = []
    while True:
        proc = subprocess.Popen([sys.executable, str(RUN_SCRIPT), "--child", "gguf-load", str(listing), str(journal)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            code = proc.wait(timeout=30 + 5 * len(accepted))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            crashes.append("the loader hung")
        lines = journal.read_text().splitlines() if journal.exists() else []
        ended = {line.split()[1] for line in lines if line.startswith("end")}
        open_ = [line.split()[1] for line in lines if line.startswith("start") and line.split()[1] not in ended]
        if code == 0 or not open_:
            break
        crashes.append(f"{Path(accepted[int(open_[-1])]).name}: loader died with code {code}")
        with open(journal, "a") as fh:  # mark it done so the restarted child moves on
            fh.write(f"end {open_[-1]} CRASH:{code}\n")
    outcomes: dict[str, int] = {}
    for line in journal.read_text().splitlines() if journal.exists() else []:
        if line.startswith("end"):
            key = line.split()[2].split(":")[0] if line.split()[2].startswith(("UNTYPED", "CRASH")) else line.split()[2]
            outcomes[key] = outcomes.get(key, 0) + 1
            if key in ("UNTYPED", "CRASH"):
                failures.append(f"{Path(accepted[int(line.split()[1])]).name}: {line.split()[2]}")
    failures += [c for c in crashes if "hung" in c]
    return {"category": "gguf-native", "inputs_tried": files, "faults_injected": files,
            "refused_by_header_check": header_refused, "passed_to_llama_cpp": len(accepted),
            "llama_cpp_outcomes": outcomes, "failures": len(failures), "failure_details": failures[:30],
            "seconds": round(time.monotonic() - t0, 1)}
