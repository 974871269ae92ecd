"""bench/scale's stages run by the parent process: training through the CLI, the gate's decode
measurement and its per-token split, the planner's estimate for recorded sizes, and one size end to end."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scale_machine import available_mb, load_average, log
from scale_runs import make_run
from scale_shapes import Shape, llama_config
from scale_workers import run_worker

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def train(run: Path, init: Path, *, profile: str, steps: int, threads: int) -> dict[str, Any]:
    """``edgepack distill train`` (the CLI) against the cached soft labels; train_report.json's cost fields."""
    cmd = [PYTHON, "-m", "edgepack", "distill", "train", str(run), "--profile", profile, "--student", str(init),
           "--soft-labels", "--steps", str(steps), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distill train failed ({proc.returncode}): {proc.stderr[-3000:]}")
    r = json.loads((run / "student" / "train_report.json").read_text())
    plan = r["plan"]
    return {"command": "edgepack " + " ".join(shlex.quote(c) for c in cmd[3:]),
            "steps": r["steps"], "tokens": r["tokens"], "train_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"],
            "process_wall_s": round(wall, 1), "params": r["params"], "mode": r["mode"],
            "plan": {k: plan.get(k) for k in ("method", "micro_batch", "grad_accumulation", "checkpointing",
                                              "optimizer", "budget_mb", "baseline_mb", "rejected", "transients_mb")},
            "planned_peak_mb": plan["planned_peak_mb"], "measured_peak_mb": r["peak_rss_mb"],
            "measured_over_planned": r["measured_over_planned_peak"], "peak_scope": r["peak_rss_scope"],
            "torch_threads": r["torch_threads"], "first_loss": r["first_loss"], "final_loss": r["final_loss"]}


def gate_decode(gguf: Path, *, threads: int, prompt_tokens: int, decode_tokens: int,
                timeout_s: float | None = None) -> dict[str, Any]:
    """The gate's own measurement and decode efficiency for one GGUF."""
    from edgepack.export.gate.bandwidth import artifact_efficiency, gguf_traffic, machine_bandwidth, measure_bandwidth
    from edgepack.export.gate.measure import measure_artifact

    m = measure_artifact(gguf, fmt="gguf", threads=threads, n_ctx=2048, prompt_tokens=prompt_tokens,
                         decode_tokens=decode_tokens, timeout_s=timeout_s)
    if not m.get("ok"):
        raise RuntimeError(f"gate measurement of {gguf} failed: {m.get('error')}")
    # The gate divides by the machine's cached figure; a fresh one, taken right after the
    # decode runs under the same load, is what the efficiency here uses (both are recorded).
    cached = machine_bandwidth()
    bw = measure_bandwidth(threads=threads)
    eff = artifact_efficiency(gguf, "gguf", m, bw)
    traffic = gguf_traffic(gguf)
    return {"decode_tokens_per_s": round(m["decode_tokens_per_s"]["p50"], 2),
            "decode_tokens_per_s_p95": round(m["decode_tokens_per_s"]["p95"], 2),
            "ttft_p95_ms": round(m["ttft_ms"]["p95"], 1), "runs": m["runs"], "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "threads": threads, "prompt_tokens": m["prompt_tokens"], "decode_tokens": m["decode_tokens"],
            "efficiency": round(eff["efficiency"], 4), "achieved_gb_s": round(eff["achieved_gb_s"], 3),
            "bandwidth_gb_s": round(eff["bandwidth_gb_s"], 3), "bytes_per_token": eff["bytes_per_token"],
            "bound_tokens_per_s": round(eff["bound_tokens_per_s"], 1), "basis": eff["basis"],
            "weight_bytes_total": traffic["weight_bytes_total"],
            "bandwidth_fresh": {k: bw[k] for k in ("read_gb_s", "read", "method", "load_average")},
            "bandwidth_gate_cache_gb_s": round(cached["read_gb_s"], 3),
            "efficiency_vs_gate_cache": round(eff["achieved_gb_s"] / cached["read_gb_s"], 4)}


def split_overhead(decode: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """Per-token time vs the bandwidth bound, and what the rest is made of (ms per token)."""
    bound_ms = 1000 * decode["bytes_per_token"] / (decode["bandwidth_gb_s"] * 1e9)
    return {"ms_per_token_gate": round(1000 / decode["decode_tokens_per_s"], 3),
            "ms_per_token_split_run": parts["ms_per_token"],
            "bandwidth_bound_ms": round(bound_ms, 3),
            "llama_decode_ms": parts["llama_decode_ms"],
            "llama_decode_over_bound_ms": round(parts["llama_decode_ms"] - bound_ms, 3),
            "wrapper_ms": parts["wrapper_ms"], "sample_ms": parts["sample_ms"], "loop_ms": parts["loop_ms"],
            "efficiency_of_llama_decode_alone": round(bound_ms / parts["llama_decode_ms"], 4)}


def data_lengths(data_from: Path, tokenizer_from: Path, rows: int, max_length: int = 256) -> dict[str, Any]:
    """The rows training reads (the first ``rows`` of ``data_from``, tokenized as training does): the
    longest student sequence and each row's answer tokens, what the planner can be given."""
    from transformers import AutoTokenizer

    from edgepack.distill.batching import tokenize_rows

    data = data_from / "data"
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    context = json.loads((data / "teacher_context.json").read_text())["messages"] \
        if (data / "teacher_context.json").is_file() else []
    examples, _ = tokenize_rows(AutoTokenizer.from_pretrained(tokenizer_from), [json.loads(x) for x in lines],
                                context, max_length)
    return {"longest_row": max(len(e.student_ids) for e in examples),
            "answer_lengths": [e.answer_tokens for e in examples]}


def replan(result: dict[str, Any], profile_name: str, tokenizer_from: Path,
           lengths: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the planner of the checked-out code plans for a recorded size, from the same inputs as
    training's ``plan_for`` (shapes, recorded baseline, profile budget, batch 4 / micro-batch 2 /
    256 tokens, cached soft labels, default optimizer): sizes measured before a planner change
    are compared with today's estimate too. With ``lengths`` (:func:`data_lengths`) also the plan
    given the data: the longest row as the sequence length and the rows' answer lengths."""
    import subprocess as sp

    from edgepack.distill.optim import candidates
    from edgepack.distill.plan import plan_training
    from edgepack.profiles import load_profile
    from edgepack.profiles.fit import shape_from_config

    base = json.loads((tokenizer_from / "config.json").read_text())
    config = llama_config(Shape(**result["shape"]), base)
    shape = shape_from_config(config, params=result["params"])
    profile = load_profile(profile_name)

    def plan(seq_len: int = 256, answer_lengths: list[int] | None = None) -> Any:
        return plan_training(shape, teacher=shape, teacher_mode="cached", budget_mb=profile.train_memory_mb,
                             baseline_mb=result["train"]["plan"]["baseline_mb"], batch_size=4, micro_batch=2,
                             seq_len=seq_len, profile_name=profile.name, optimizers=candidates("auto", "cpu", False),
                             answer_lengths=answer_lengths)

    measured = result["train"]["measured_peak_mb"]
    now = plan()
    head = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = {"commit": head, "method": now.method, "micro_batch": now.micro_batch,
           "checkpointing": now.checkpointing, "planned_peak_mb": now.planned_peak_mb, "transients_mb": now.transients_mb,
           "measured_over_replanned": round(measured / now.planned_peak_mb, 3)}
    if lengths:
        known = plan(lengths["longest_row"], lengths["answer_lengths"])
        out["given_the_data"] = {"seq_len": lengths["longest_row"], "method": known.method,
                                 "micro_batch": known.micro_batch, "checkpointing": known.checkpointing,
                                 "planned_peak_mb": known.planned_peak_mb, "transients_mb": known.transients_mb,
                                 "measured_over_planned": round(measured / known.planned_peak_mb, 3)}
    return out


def measure_training(name: str, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    """Stages 1-3 alone (models, soft labels, training): the fields they write; the rest of a size stays."""
    folder = args.scratch / name
    run = folder / "run"
    made = make_run(run, shape, data_from=args.run, rows=args.rows, tokenizer_from=args.tokenizer_from,
                    dtype=args.dtype)
    result: dict[str, Any] = {"size": name, "shape": asdict(shape), **made,
                              "train_load_average": {"start": load_average()},
                              "train_available_mb_at_start": available_mb()}
    log(f"{name}: soft-label cache")
    result["softlabels"] = run_worker(["cache", str(run)], threads=args.threads)
    _train_when_memory_allows(name, run, folder, made, args, result, result["train_load_average"])
    result["train_load_average"]["end"] = load_average()
    if not args.keep:
        shutil.rmtree(folder)
    return result


def _train_when_memory_allows(name: str, run: Path, folder: Path, made: dict[str, Any], args: argparse.Namespace,
                              result: dict[str, Any], loads: dict[str, Any]) -> None:
    """``distill train`` of one size into ``result["train"]``, first waiting for
    ``--min-available-mb`` before a ~1B student; the load before training goes into ``loads``."""
    need = args.min_available_mb if made["params"] > 700e6 else 0
    while need and available_mb() < need:
        log(f"{name}: {available_mb()} MB available < {need} MB; waiting 60 s")
        time.sleep(60)
    result["available_mb_before_train"] = available_mb()
    loads["before_train"] = load_average()
    log(f"{name}: distill train ({args.steps} steps, profile {args.profile})")
    result["train"] = train(run, folder / "init", profile=args.profile, steps=args.steps, threads=args.threads)
    log(f"{name}: {result['train']['tokens_per_s']} tokens/s, planned {result['train']['planned_peak_mb']} MB, "
        f"measured {result['train']['measured_peak_mb']} MB, plan {result['train']['plan']['method']}")


def measure_size(name: str, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.scratch / name
    run = folder / "run"
    log(f"{name}: random-init teacher and student ({shape.reference})")
    made = make_run(run, shape, data_from=args.run, rows=args.rows, tokenizer_from=args.tokenizer_from,
                    dtype=args.dtype)
    log(f"{name}: {made['params']:,} parameters (formula {made['params_formula']:,})")
    result: dict[str, Any] = {"size": name, "shape": asdict(shape), **made, "load_average": {"start": load_average()},
                              "available_mb_at_start": available_mb()}
    log(f"{name}: soft-label cache")
    result["softlabels"] = run_worker(["cache", str(run)], threads=args.threads)
    log(f"{name}: {result['softlabels']}")
    _train_when_memory_allows(name, run, folder, made, args, result, result["load_average"])
    shutil.rmtree(run / "teacher")  # disk: the rest needs only the student
    shutil.rmtree(folder / "init")
    log(f"{name}: export")
    result["export"] = run_worker(["export", str(run)], threads=args.threads)
    log(f"{name}: {result['export']['convert_f16_s']} s F16, {result['export']['quantize_q4_k_m_s']} s Q4_K_M")
    gguf = run / "artifacts" / "student-Q4_K_M.gguf"
    (run / "artifacts" / "student-F16.gguf").unlink()
    shutil.rmtree(run / "student")
    result.update(measure_decode(name, gguf, args))
    result["load_average"]["end"] = load_average()
    if not args.keep:  # the Q4_K_M stays (small), so --decode-only can measure it again on a quieter machine
        for path in folder.rglob("*"):
            if path.is_file() and path != gguf:
                path.unlink()
    return result


def measure_decode(name: str, gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The gate's decode measurement and the per-token split, on 1 llama.cpp thread and on the profile's.

    One thread first: on two cores shared with other jobs, two threads wait on each other at every
    graph barrier and a run can outlast the gate's timeout; such a failure is recorded, not raised.
    """
    out: dict[str, Any] = {"decode_load_average_start": load_average(),
                           "decode_measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for threads, dkey, pkey in ((1, "decode_1_thread", "per_token_1_thread"), (args.gate_threads, "decode", "per_token")):
        log(f"{name}: gate decode, {threads} thread(s)")
        try:
            out[dkey] = gate_decode(gguf, threads=threads, prompt_tokens=args.prompt_tokens,
                                    decode_tokens=args.decode_tokens, timeout_s=args.decode_timeout)
            parts = run_worker(["overhead", str(gguf), str(threads), str(args.prompt_tokens), str(args.decode_tokens),
                                str(args.rounds)], threads=args.threads, timeout_s=args.decode_timeout)
            out[pkey] = {**split_overhead(out[dkey], parts), "raw": parts}
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            out.setdefault(dkey, {"ok": False, "threads": threads, "error": str(exc)[-500:]})
            out[pkey] = None  # a split from an earlier measurement must not sit beside this failure
            log(f"{name}: {threads} thread(s) failed: {str(exc)[-200:]}")
            continue
        log(f"{name}: {threads} thread(s): {out[dkey]['decode_tokens_per_s']} tok/s, "
            f"efficiency {out[dkey]['efficiency']}")
    out["decode_load_average_end"] = load_average()
    return out


def demo_overhead(gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The 78M demo student's Q4_K_M through the same gate measurement and split."""
    return {"artifact": str(gguf), "bytes": gguf.stat().st_size, **measure_decode("demo", gguf, args)}
