"""Benchmark of `edgepack serve` on the embedded teacher (SmolLM2-135M-Instruct, Q4_1 GGUF).

    nice -n 5 .venv/bin/python bench/serve/run.py --out bench/serve/results.json

writes ``results.json`` and ``results.md`` (machine, load averages, the exact command). The
server is a real ``python -m edgepack serve MODEL --port 0 ...`` subprocess; the client is
``http.client`` from this process, one thread per request.

(a) Bursts: 16 chat requests released together by a barrier, greedy, against a server with
    the default queue (one generating + ``--max-queue 4`` waiting: the rest must get
    429/503 at once) and against one whose queue holds all 16 (every request must complete).
    Per request: status, latency, error code, whether the text equals the serial answer.
    Targets: every request completes (200) or is refused (429/503) within 1 s, none hangs
    (a thread still waiting after ``--hang-s`` counts as hung), and every completed greedy
    answer equals the one the same prompt got when sent alone (serial reference).
(b) Overhead: end-to-end completion tokens/s of a whole (non-streamed) request through the
    server (HTTP, JSON, template, tokenization, prefill, decode, per-token logprob) vs the
    same prompt token ids generated in this process by llama-cpp-python directly (same
    file, threads, n_ctx, greedy, same token budget; timed from the generate call to the last
    token, detokenizing as it goes). Rounds alternate server / direct (ABBA) so both see
    the same machine load; medians are compared. Target: server ≥ 90% of direct.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.atomic import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess  # noqa: E402

PROMPTS = [
    "Compressor C-12 tripped on high vibration. What should the operator check first?",
    "Pump P-101 discharge pressure is low. List three likely causes.",
    "Write a short paragraph about why bearings fail in centrifugal pumps.",
    "Explain what a lockout-tagout procedure is, in two sentences.",
]
OVERHEAD_PROMPT = "Write a detailed paragraph about preventive maintenance of industrial pumps."


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


# --- the server process ------------------------------------------------------------------------
def Server(model: Path, log_path: Path, *, threads: int, n_ctx: int, max_queue: int, timeout_s: float) -> ServeProcess:
    """``edgepack serve`` with the benchmark's threads, context, queue and timeout."""
    return ServeProcess(model, log_path, ["--threads", str(threads), "--ctx", str(n_ctx), "--max-queue", str(max_queue),
                                          "--timeout", str(timeout_s)], start_timeout_s=180.0)


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 600.0) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    start = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, payload, time.perf_counter() - start
    finally:
        conn.close()


def chat(port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    status, payload, elapsed = request(port, "POST", "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                        "temperature": 0})
    out: dict[str, Any] = {"status": status, "latency_s": round(elapsed, 4)}
    body = json.loads(payload)
    if status == 200:
        out.update(text=body["choices"][0]["message"]["content"], finish=body["choices"][0]["finish_reason"],
                   prompt_tokens=body["usage"]["prompt_tokens"], completion_tokens=body["usage"]["completion_tokens"],
                   server_timings=body["edgepack"]["timings"])
    else:
        out.update(error_code=body.get("error", {}).get("code"))
    return out


def metrics(port: int) -> dict[str, float]:
    _, payload, _ = request(port, "GET", "/metrics")
    out = {}
    for line in payload.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --- (a) bursts -----------------------------------------------------------------------------------
def burst(server: Server, n: int, max_tokens: int, serial: dict[str, str], hang_s: float) -> dict[str, Any]:
    barrier = threading.Barrier(n)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]

    def worker(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        rows[i] = {"request": i, "prompt": i % len(PROMPTS)}
        barrier.wait()
        try:
            rows[i].update(chat(server.port, prompt, max_tokens))
        except Exception as exc:  # noqa: BLE001 - recorded per request
            rows[i].update(status=None, error=f"{type(exc).__name__}: {exc}")
        if rows[i].get("status") == 200:
            rows[i]["equals_serial"] = rows[i]["text"] == serial[prompt]

    before = metrics(server.port)
    load_start = load_average()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    deadline = started + hang_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    wall = time.monotonic() - started
    after = metrics(server.port)
    done = [r for r in rows if r.get("status") == 200]
    refused = [r for r in rows if r.get("status") in (429, 503)]
    other = [r for r in rows if r.get("status") not in (200, 429, 503)]
    for r in rows:
        r.pop("text", None)  # kept out of the results file (it is in serial_reference)
    rejections = {k.split('"')[1]: v - before.get(k, 0.0) for k, v in after.items()
                  if k.startswith("edgepack_rejections_total{") and v - before.get(k, 0.0)}
    return {
        "requests": rows, "wall_s": round(wall, 2), "hung": hung, "completed": len(done), "refused": len(refused),
        "other": len(other), "refused_max_latency_s": max((r["latency_s"] for r in refused), default=None),
        "refused_within_1s": all(r["latency_s"] < 1.0 for r in refused),
        "completed_equal_serial": sum(1 for r in done if r["equals_serial"]),
        "rejections_in_metrics": rejections, "queue_depth_after": after.get("edgepack_queue_depth"),
        "load_average": {"start": load_start, "end": load_average()},
        "ok": not hung and not other and all(r["latency_s"] < 1.0 for r in refused)
              and all(r["equals_serial"] for r in done),
    }


def section_a(model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    serial: dict[str, str] | None = None
    for name, queue in (("default_queue", args.max_queue), ("queue_holds_all", args.n - 1)):
        log(f"(a) {name}: server with --max-queue {queue}")
        server = Server(model, work / f"server-{name}.log", threads=args.threads, n_ctx=args.n_ctx, max_queue=queue,
                        timeout_s=args.timeout)
        result: dict[str, Any] = {}
        try:
            if serial is None:
                log("(a) serial reference: each prompt alone")
                serial = {p: chat(server.port, p, args.max_tokens)["text"] for p in PROMPTS}
            chat(server.port, PROMPTS[0], 4)  # warm-up
            log(f"(a) {name}: {args.n} concurrent requests")
            result.update(burst(server, args.n, args.max_tokens, serial, args.hang_s))
            result.update(max_queue=queue, server_start_s=round(server.start_s, 2))
        finally:
            result["server_exit_code"] = server.stop()
        out[name] = result
    out["serial_reference"] = serial
    return out


# --- (b) overhead -----------------------------------------------------------------------------------
def direct_prompt_ids(llm: Any, prompt: str) -> list[int]:
    """The prompt's token ids as the server builds them: the GGUF's chat template rendered in
    edgepack's sandbox (pure Jinja, no llama.cpp), tokenized by llama-cpp-python."""
    from edgepack.runtime.chat.template import render_chat

    meta = llm.metadata
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if llm.token_bos() >= 0 else ""
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    text = render_chat(meta["tokenizer.chat_template"], [{"role": "user", "content": prompt}],
                       add_generation_prompt=True, bos_token=bos, eos_token=eos)
    return list(llm.tokenize(text.encode(), add_bos=not (bos and text.startswith(bos)), special=True))


def direct_run(llm: Any, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy generation in this process, the way edgepack's backend drives llama-cpp-python."""
    eos = llm.token_eos()
    llm.reset()
    pieces: list[bytes] = []
    start = time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if tok == eos:
            break
        pieces.append(llm.detokenize([tok]))
        if len(pieces) >= max_tokens:
            break
    elapsed = time.perf_counter() - start
    return {"tokens": len(pieces), "elapsed_s": elapsed, "tokens_per_s": len(pieces) / elapsed,
            "text": b"".join(pieces).decode("utf-8", errors="replace")}


def section_b(model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import llama_cpp

    log("(b) loading llama-cpp-python in this process")
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    ids = direct_prompt_ids(llm, OVERHEAD_PROMPT)
    server = Server(model, work / "server-overhead.log", threads=args.threads, n_ctx=args.n_ctx,
                    max_queue=args.max_queue, timeout_s=args.timeout)
    rounds: list[dict[str, Any]] = []
    try:
        served, direct = chat(server.port, OVERHEAD_PROMPT, args.overhead_tokens), \
            direct_run(llm, ids, args.overhead_tokens)  # warm-ups, and the equality check
        same = {"prompt_tokens": [served["prompt_tokens"], len(ids)],
                "completion_tokens": [served["completion_tokens"], direct["tokens"]],
                "text_equal": served["text"] == direct["text"]}
        for i in range(args.rounds):
            order = ("server", "direct") if i % 2 == 0 else ("direct", "server")
            row: dict[str, Any] = {"order": list(order), "load_average": load_average()}
            for who in order:
                if who == "server":
                    r = chat(server.port, OVERHEAD_PROMPT, args.overhead_tokens)
                    row["server_tokens_per_s"] = r["completion_tokens"] / r["latency_s"]
                    row["server_tokens"] = r["completion_tokens"]
                    row["server_inside_generate_ms"] = r["server_timings"]["generate_ms"]
                    row["server_latency_s"] = r["latency_s"]
                else:
                    d = direct_run(llm, ids, args.overhead_tokens)
                    row["direct_tokens_per_s"] = d["tokens_per_s"]
                    row["direct_tokens"] = d["tokens"]
                    row["direct_elapsed_s"] = d["elapsed_s"]
            log(f"(b) round {i + 1}/{args.rounds}: server {row['server_tokens_per_s']:.1f} tok/s, "
                f"direct {row['direct_tokens_per_s']:.1f} tok/s")
            rounds.append(row)
    finally:
        code = server.stop()
    srv = stats([r["server_tokens_per_s"] for r in rounds])
    dct = stats([r["direct_tokens_per_s"] for r in rounds])
    paired = [r["server_tokens_per_s"] / r["direct_tokens_per_s"] for r in rounds]
    ratio = srv["median"] / dct["median"]
    return {"rounds": rounds, "server": srv, "direct": dct, "server_over_direct": ratio,
            "paired_ratio": stats(paired), "overhead_percent": 100 * (1 - ratio), "same_work": same,
            "target": "server tokens/s >= 90% of direct (overhead <= 10%)", "within_target": ratio >= 0.90,
            "server_exit_code": code}


# --- report -------------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m, a, b, s = res["machine"], res["a"], res["b"], res["settings"]
    lines = ["# Server benchmark (`edgepack serve`, SmolLM2-135M-Instruct Q4_1)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_mb']} MB, {m['system']} {m['release']}; "
             f"Python {m['python']}, llama-cpp-python {m['llama-cpp-python']}.",
             f"Load average (1/5/15 min): start {m['load_average_start']}, end {res['load_average_end']}. "
             "Other processes (other agents' tests and builds) shared these 2 cores, so every timing here is "
             "noisy; the pass/fail checks on statuses and outputs do not depend on speed.", "",
             f"Settings: model `{s['model']}`; threads {s['threads']}, n_ctx {s['n_ctx']}, greedy; bursts of "
             f"{s['n']} requests of max_tokens {s['max_tokens']} over {len(PROMPTS)} prompts; overhead: "
             f"{s['rounds']} alternating rounds of max_tokens {s['overhead_tokens']}. Started {res['started']}, "
             f"took {res['elapsed_s']:.0f} s.", "",
             f"## (a) {s['n']} concurrent chat requests", ""]
    for name, title in (("default_queue", "default queue"), ("queue_holds_all", "queue holds all")):
        r = a[name]
        lines += [f"### {title} (`--max-queue {r['max_queue']}`)", "",
                  f"{r['completed']} completed (200), {r['refused']} refused (429/503), {r['other']} other, "
                  f"{len(r['hung'])} hung; burst wall time {r['wall_s']} s; slowest refusal "
                  f"{r['refused_max_latency_s'] if r['refused_max_latency_s'] is not None else '-'} s; completed "
                  f"answers equal to the serial greedy answer: {r['completed_equal_serial']}/{r['completed']}; "
                  f"/metrics rejections {r['rejections_in_metrics'] or '{}'}, queue depth after "
                  f"{r['queue_depth_after']:.0f}; server exit code on SIGTERM {r['server_exit_code']}; "
                  f"load average {r['load_average']}. **{'PASS' if r['ok'] else 'FAIL'}**.", "",
                  "| request | prompt | status | latency s | error | equals serial |", "|---:|---:|---:|---:|---|---|"]
        for q in sorted(r["requests"], key=lambda q: q["latency_s"] if q.get("latency_s") is not None else 1e9):
            eq = {True: "yes", False: "**no**"}.get(q.get("equals_serial"), "")
            lines.append(f"| {q['request']} | {q['prompt']} | {q.get('status')} | {q.get('latency_s')} | "
                         f"{q.get('error_code') or q.get('error') or ''} | {eq} |")
        lines.append("")
    same = b["same_work"]
    lines += ["## (b) Server overhead vs in-process llama-cpp-python", "",
              "| round | order | server tok/s | direct tok/s | server / direct | load avg |", "|---:|---|---:|---:|---:|---|"]
    for i, r in enumerate(b["rounds"], 1):
        lines.append(f"| {i} | {' then '.join(r['order'])} | {r['server_tokens_per_s']:.2f} | "
                     f"{r['direct_tokens_per_s']:.2f} | {r['server_tokens_per_s'] / r['direct_tokens_per_s']:.3f} | "
                     f"{r['load_average']} |")
    lines += ["", f"Medians: server {b['server']['median']:.2f} tok/s, direct {b['direct']['median']:.2f} tok/s; "
                  f"server / direct = {b['server_over_direct']:.3f} (overhead {b['overhead_percent']:+.1f}%); "
                  f"median of per-round ratios {b['paired_ratio']['median']:.3f} "
                  f"(min {b['paired_ratio']['min']:.3f}, max {b['paired_ratio']['max']:.3f}). "
                  f"Target {b['target']}: **{'met' if b['within_target'] else 'not met'}**.",
              f"Same work: prompt tokens server/direct {same['prompt_tokens']}, completion tokens "
              f"{same['completion_tokens']}, identical text: {same['text_equal']}.", "",
              "Server tok/s is completion tokens over the client-side wall time of one whole request (HTTP, JSON, "
              "chat template, tokenization, prefill, decode, per-token logprob); direct tok/s is the same token "
              "count over the time from llama-cpp-python's `generate` call to the last token in this process.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/serve/results.json"))
    parser.add_argument("--model", type=Path, default=None, help="GGUF to serve (default: the embedded teacher)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n", type=int, default=16, help="concurrent requests per burst")
    parser.add_argument("--max-queue", type=int, default=4, help="the server's default --max-queue")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0, help="the server's per-request deadline")
    parser.add_argument("--hang-s", type=float, default=900.0, help="a request still open after this has hung")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--overhead-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from edgepack.distill.teachers import builtin_teacher_path
    from edgepack.export.gate.gate import machine_info

    model = args.model or builtin_teacher_path("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-serve-"))  # server logs, named in errors
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    machine = machine_info() | {"load_average_start": load_average()}
    command = "nice -n 5 .venv/bin/python bench/serve/run.py" + (f" {shlex.join(argv)}" if argv else
                                                                  f" {shlex.join(sys.argv[1:])}" if sys.argv[1:] else "")
    res: dict[str, Any] = {"command": command, "started": started.isoformat(timespec="seconds"), "machine": machine,
                           "settings": {"model": str(model.name), "threads": args.threads, "n_ctx": args.n_ctx,
                                        "n": args.n, "max_queue": args.max_queue, "max_tokens": args.max_tokens,
                                        "rounds": args.rounds, "overhead_tokens": args.overhead_tokens,
                                        "timeout_s": args.timeout, "hang_s": args.hang_s}}
    res["a"] = section_a(model, args, work)
    res["b"] = section_b(model, args, work)
    res["load_average_end"] = load_average()
    res["elapsed_s"] = time.monotonic() - t0
    write_json(args.out, res)
    write_text(args.out.with_suffix(".md"), markdown(res))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')} (server logs in {work})")
    ok = res["a"]["default_queue"]["ok"] and res["a"]["queue_holds_all"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
