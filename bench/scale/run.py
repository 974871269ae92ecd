"""Cost vs model size on this CPU: random-init Llama students at SmolLM2 widths (issue #18, item 5).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/scale/run.py --sizes 135m,360m,1b

writes ``bench/scale/results.json`` and ``results.md``. Nothing is downloaded: each size is a
random-init ``LlamaForCausalLM`` with SmolLM2's tokenizer (vocab 49152, tied embeddings), copied
from a run's teacher folder (``--tokenizer-from``, default ``runs/workorders/teacher``). Per size,
in a scratch run folder ``runs/scale/<size>/`` (``--scratch``; gitignored, big files removed when
the size is done) built from a copy of ``--run``'s data (the first ``--rows`` training rows):

1. **teacher** = a random-init model of that size (seed 0), **student** = another (seed 1); both
   are the same shape, so the soft-label cost grows with size as the training cost does.
2. **soft labels**: ``distill.softlabels.cache_soft_labels`` (top-32 + tail, no samples) in a
   fresh process: wall time (model load included), the teacher forward / sparsify / write split,
   bytes on disk and per answer token, time per 1k answer tokens.
3. **training**: ``edgepack distill train RUN --student <init> --soft-labels --steps N --profile P``
   (the real CLI, a fresh process): tokens/s, the planner's choice (full / LoRA, micro-batch,
   checkpointing), its planned peak and the measured peak RSS, from train_report.json.
4. **export**: ``export.api.export_gguf_artifacts`` (what ``edgepack export --format gguf --quant
   Q4_K_M`` runs): HF → F16 GGUF time, F16 → Q4_K_M time, file sizes, tensor types.
5. **gate decode**: ``export.gate.measure.measure_artifact`` (the gate's child-process measurement:
   the profile's prompt length and threads, 64 decoded tokens with end-of-sequence ignored) and
   ``bandwidth.artifact_efficiency`` against ``machine_bandwidth()``.
6. **per-token cost split** (``--worker overhead``): the same prompt and greedy chain as the gate,
   timing separately ``Llama.eval([token])`` (llama_decode + llama-cpp-python's logits copy),
   llama.cpp's own decode time (``llama_perf_context``) and ``llama_sampler_sample``; against the
   bandwidth bound ``bytes per token / read GB/s``. Also run on the 78M demo student
   (``--demo-gguf``) so its 0.41 efficiency can be explained from measured parts.

A size already in ``--out`` is kept (the script is resumable per size); ``--redo`` recomputes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclass(frozen=True)
class Shape:
    """A Llama shape at SmolLM2's widths (vocab and tied embeddings come with the tokenizer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    reference: str
    """The released model whose widths these are."""


SIZES: dict[str, Shape] = {
    "135m": Shape(576, 30, 9, 3, 1536, "SmolLM2-135M"),
    "360m": Shape(960, 32, 15, 5, 2560, "SmolLM2-360M"),
    # SmolLM2-1.7B's width with 14 of its 24 layers: about 1.0B parameters.
    "1b": Shape(2048, 14, 32, 32, 8192, "SmolLM2-1.7B width, 14 layers"),
}
# A tiny shape for the script's own test (tests/bench/test_scale.py); not in the plots.
TEST_SIZES: dict[str, Shape] = {"tiny": Shape(64, 2, 4, 2, 128, "test only")}


def parse_sizes(text: str, known: dict[str, Shape]) -> list[str]:
    """``135m,360m,1b`` → names in SIZES; ValueError naming the unknown ones and the known ones."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"unknown size(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return names


def param_count(shape: Shape, vocab: int) -> int:
    """Parameters of a Llama with tied embeddings (no biases): embedding + per-layer + final norm."""
    head_dim = shape.hidden // shape.heads
    attn = shape.hidden * shape.heads * head_dim * 2 + shape.hidden * shape.kv_heads * head_dim * 2
    mlp = 3 * shape.hidden * shape.intermediate
    norms = 2 * shape.hidden
    return vocab * shape.hidden + shape.layers * (attn + mlp + norms) + shape.hidden


def llama_config(shape: Shape, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a SmolLM2 config.json: vocab, special ids, rope) with ``shape``'s widths."""
    return {**base, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "intermediate_size": shape.intermediate, "head_dim": shape.hidden // shape.heads,
            "tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "_model_name_or_path": f"random-init {shape.reference}"}


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def available_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_mb() -> float:
    from edgepack.export.gate.measure import _peak_rss_mb

    return round(_peak_rss_mb(), 1)


# ------------------------------------------------------------------ models and the scratch run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def make_model(folder: Path, shape: Shape, *, seed: int, tokenizer_from: Path, dtype: str) -> int:
    """A random-init model of ``shape`` saved in ``folder`` (``dtype`` on disk) with the tokenizer; its params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_from / "config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in llama_config(shape, base).items() if not k.startswith("_")})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    return n


def make_run(run: Path, shape: Shape, *, data_from: Path, rows: int, tokenizer_from: Path,
             dtype: str) -> dict[str, Any]:
    """RUN/data (first ``rows`` training rows of ``data_from``), RUN/teacher (seed 0), RUN/../init (seed 1)."""
    from edgepack.hashing import sha256_file

    if run.exists():
        shutil.rmtree(run)
    data = run / "data"
    data.mkdir(parents=True)
    lines = (data_from / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if (data_from / "data" / "teacher_context.json").is_file():
        shutil.copy2(data_from / "data" / "teacher_context.json", data / "teacher_context.json")
    t0 = time.perf_counter()
    teacher = run / "teacher"
    n = make_model(teacher, shape, seed=0, tokenizer_from=tokenizer_from, dtype=dtype)
    sha = sha256_file(teacher / "model.safetensors")
    (teacher / "source.json").write_text(json.dumps({
        "spec": f"random-init:{shape.reference}", "kind": "hf", "name": f"random-init-{shape.hidden}x{shape.layers}",
        "sha256": sha, "path": None, "url": None, "model": None, "allow_pickle": False,
        "trust_remote_code": False, "files": sorted(p.name for p in teacher.iterdir())}, indent=2))
    (teacher / ".complete").write_text("ok\n")
    # The copied data report, pointing at this teacher (the source run's may name teacher-corrected).
    report = json.loads((data_from / "data" / "report.json").read_text())
    report["teacher_dir"] = "teacher"
    report.setdefault("teacher", {})["sha256"] = sha
    (data / "report.json").write_text(json.dumps(report, indent=2))
    (data / ".complete").write_text("ok\n")
    init = run.parent / "init"
    if init.exists():
        shutil.rmtree(init)
    make_model(init, shape, seed=1, tokenizer_from=tokenizer_from, dtype=dtype)
    return {"params": n, "params_formula": param_count(shape, json.loads(
        (tokenizer_from / "config.json").read_text())["vocab_size"]), "rows": len(lines),
        "init_s": round(time.perf_counter() - t0, 1), "weights_on_disk_dtype": dtype}


# ------------------------------------------------------------------ workers (fresh processes)

def worker_cache(run: Path) -> dict[str, Any]:
    """Soft-label caching exactly as training's first use builds it (k=32, no samples)."""
    from edgepack.distill.softlabels import cache_soft_labels

    t0 = time.perf_counter()
    index = cache_soft_labels(run, k=32, samples=0, max_length=256)
    wall = time.perf_counter() - t0
    t = index["timing"]
    busy = t["forward_s"] + t["sparsify_s"] + t["write_s"]
    return {"rows": index["rows"], "answer_tokens": index["tokens"], "bytes": index["bytes"],
            "bytes_per_token": index["bytes_per_token"], "wall_s_incl_load": round(wall, 2),
            "busy_s": round(busy, 2), "forward_s": t["forward_s"], "sparsify_s": t["sparsify_s"],
            "write_s": t["write_s"], "teacher_input_tokens": t.get("teacher_input_tokens"),
            "teacher_prefix_tokens": t.get("teacher_prefix_tokens"),
            "s_per_1k_answer_tokens": round(1000 * busy / index["tokens"], 2),
            "s_per_1k_answer_tokens_incl_load": round(1000 * wall / index["tokens"], 2),
            "tokens_per_s": round(index["tokens"] / busy, 2),
            "peak_rss_mb": peak_rss_mb()}


def worker_export(run: Path) -> dict[str, Any]:
    """HF → F16 GGUF, then Q4_K_M, with the time of each (export_gguf_artifacts' progress marks)."""
    from edgepack.export.api import export_gguf_artifacts

    marks: dict[int, float] = {}

    def progress(stage: str, done: int, total: int | None = None) -> None:
        if stage == "export":
            marks[done] = time.perf_counter()

    out = run / "artifacts"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    artifacts, notes = export_gguf_artifacts(run / "student", "student", out, ["Q4_K_M"], progress)
    end = time.perf_counter()
    by = {a["quant"]: a for a in artifacts}
    q = by["Q4_K_M"]
    return {"convert_f16_s": round(marks[1] - t0, 2), "quantize_q4_k_m_s": round(end - marks[1], 2),
            "total_s": round(end - t0, 2), "f16_bytes": by["F16"]["bytes"], "q4_k_m_bytes": q["bytes"],
            "q4_k_m_tensor_types": q.get("tensor_types"), "fallback_tensors": q.get("fallback_tensors"),
            "weight_matrices": q.get("weight_matrices"), "notes": notes, "peak_rss_mb": peak_rss_mb()}


def worker_overhead(gguf: Path, threads: int, prompt_tokens: int, decode_tokens: int, rounds: int) -> dict[str, Any]:
    """Per decoded token: eval (llama_decode + the Python wrapper), llama.cpp's own decode time, sampling."""
    import statistics

    import llama_cpp

    from edgepack.export.gate.measure import exact_prompt
    from edgepack.runtime.backends.base import get_backend

    backend_cls = get_backend("gguf")
    backend_cls.prepare()
    backend = backend_cls.load(gguf, threads=threads, n_ctx=2048)
    llm, lib = backend._llm, backend._lib
    prompt = exact_prompt(backend, prompt_tokens)
    evals, samples, inside, totals = [], [], [], []
    for r in range(rounds + 1):  # round 0 warms up
        chain = backend._sampler_chain(prompt, 0.0, None, 1.0, None, _sampling())
        try:
            llm.reset()
            llm.eval(prompt)
            tok = int(lib.llama_sampler_sample(chain, llm.ctx, -1))
            llama_cpp.llama_perf_context_reset(llm.ctx)
            e_s = s_s = 0.0
            start = time.perf_counter()
            for _ in range(decode_tokens - 1):
                t0 = time.perf_counter()
                llm.eval([tok])
                t1 = time.perf_counter()
                tok = int(lib.llama_sampler_sample(chain, llm.ctx, -1))
                t2 = time.perf_counter()
                e_s += t1 - t0
                s_s += t2 - t1
            total = time.perf_counter() - start
            perf = llama_cpp.llama_perf_context(llm.ctx)
        finally:
            backend._free(chain)
        if r == 0:
            continue
        n = decode_tokens - 1
        evals.append(1000 * e_s / n)
        samples.append(1000 * s_s / n)
        inside.append(perf.t_eval_ms / max(perf.n_eval, 1))
        totals.append(1000 * total / n)
    backend.close()
    med = statistics.median
    return {"artifact": str(gguf), "threads": threads, "prompt_tokens": len(prompt), "decode_tokens": decode_tokens,
            "rounds": rounds, "ms_per_token": round(med(totals), 3),
            "eval_ms": round(med(evals), 3), "llama_decode_ms": round(med(inside), 3),
            "wrapper_ms": round(med(evals) - med(inside), 3), "sample_ms": round(med(samples), 3),
            "loop_ms": round(med(totals) - med(evals) - med(samples), 3),
            "samples": {"total": [round(x, 3) for x in totals], "eval": [round(x, 3) for x in evals],
                        "llama_decode": [round(x, 3) for x in inside], "sample": [round(x, 3) for x in samples]}}


def _sampling() -> Any:
    from edgepack.runtime.backends.llamacpp import Sampling

    return Sampling()


def run_worker(args: list[str], *, threads: int, timeout_s: float = 3600) -> dict[str, Any]:
    """``run.py --worker ...`` in a fresh process (its own peak RSS); its last stdout line is JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([PYTHON, str(Path(__file__).resolve()), "--worker", *args], capture_output=True,
                          text=True, env=env, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ stages run by the parent

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
            "plan": {k: plan[k] for k in ("method", "micro_batch", "grad_accumulation", "checkpointing",
                                          "optimizer", "budget_mb", "baseline_mb", "rejected")},
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


def replan(result: dict[str, Any], profile_name: str, tokenizer_from: Path) -> dict[str, Any]:
    """What the planner of the checked-out code plans for a recorded size, from the same inputs as
    training's ``plan_for`` (shapes, recorded baseline, profile budget, batch 4 / micro-batch 2 /
    256 tokens, cached soft labels, default optimizer): sizes measured before a planner change
    are compared with today's estimate too."""
    import subprocess as sp

    from edgepack.distill.optim import candidates
    from edgepack.distill.plan import plan_training
    from edgepack.profiles import load_profile
    from edgepack.profiles.fit import shape_from_config

    base = json.loads((tokenizer_from / "config.json").read_text())
    config = llama_config(Shape(**result["shape"]), base)
    shape = shape_from_config(config, params=result["params"])
    profile = load_profile(profile_name)
    plan = plan_training(shape, teacher=shape, teacher_mode="cached", budget_mb=profile.train_memory_mb,
                         baseline_mb=result["train"]["plan"]["baseline_mb"], batch_size=4, micro_batch=2, seq_len=256,
                         profile_name=profile.name, optimizers=candidates("auto", "cpu", False))
    head = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"commit": head, "method": plan.method, "micro_batch": plan.micro_batch,
            "checkpointing": plan.checkpointing, "planned_peak_mb": plan.planned_peak_mb,
            "measured_over_replanned": round(result["train"]["measured_peak_mb"] / plan.planned_peak_mb, 3)}


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
    need = args.min_available_mb if made["params"] > 700e6 else 0
    while need and available_mb() < need:
        log(f"{name}: {available_mb()} MB available < {need} MB; waiting 60 s")
        time.sleep(60)
    result["available_mb_before_train"] = available_mb()
    result["load_average"]["before_train"] = load_average()
    log(f"{name}: distill train ({args.steps} steps, profile {args.profile})")
    result["train"] = train(run, folder / "init", profile=args.profile, steps=args.steps, threads=args.threads)
    log(f"{name}: {result['train']['tokens_per_s']} tokens/s, planned {result['train']['planned_peak_mb']} MB, "
        f"measured {result['train']['measured_peak_mb']} MB, plan {result['train']['plan']['method']}")
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


def findings(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers (results.md and BENCHMARKS.md show them as they are)."""
    sizes = sorted(results["sizes"].values(), key=lambda r: r["params"])
    out = []
    for r in sizes:
        t = r["train"]
        ratio = t["measured_over_planned"]
        out.append(f"- {r['size']} ({r['params']:,} parameters): the planner chose {t['plan']['method']} "
                   f"(micro-batch {t['plan']['micro_batch']}{', checkpointing' if t['plan']['checkpointing'] else ''}"
                   f"; rejected first: {'; '.join(t['plan']['rejected']) or 'nothing'}) under the "
                   f"{t['plan']['budget_mb']:.0f} MB budget of {results['profile']}; measured peak {t['measured_peak_mb']} "
                   f"MB = {ratio}× the planned {t['planned_peak_mb']} MB "
                   f"({'within' if abs(ratio - 1) <= 0.15 else 'outside'} ±15%"
                   + (f"; over the {t['plan']['budget_mb']:.0f} MB budget the plan was chosen to fit"
                      if t["measured_peak_mb"] > t["plan"]["budget_mb"] else "")
                   + f"). The excess, {t['measured_peak_mb'] - t['planned_peak_mb']:.0f} MB, is less than the "
                   f"teacher's fp32 weights ({r['params'] * 4 / 2**20:.0f} MB), which setup (train_setup.build_training) "
                   "loads beside the student even with cached soft labels while the planner counts no teacher for "
                   "them: consistent with that transient, not isolated here."
                   + (f" The planner at {t['replanned']['commit']} plans {t['replanned']['method']} at "
                      f"{t['replanned']['planned_peak_mb']} MB for the same inputs." if t.get("replanned") else ""))
    out.append("- Soft labels (teacher = a random-init model of the same size): "
               + ", ".join(f"{r['size']} {r['softlabels']['s_per_1k_answer_tokens']} s" for r in sizes)
               + " per 1k answer tokens, the teacher forward "
               + ", ".join(f"{100 * r['softlabels']['forward_s'] / r['softlabels']['busy_s']:.0f}%" for r in sizes)
               + f" of it; {sizes[0]['softlabels']['bytes_per_token']} bytes per answer token at every size (the top-32 "
               "layout does not depend on the model).")
    out.append("- Training: " + ", ".join(
        f"{r['size']} {r['train']['tokens_per_s']} tokens/s ({r['train']['tokens_per_s'] * r['params'] / 1e9:.1f} G "
        "parameter-tokens/s)" for r in sizes) + f" over {results['steps']} steps, {results['threads']} torch thread(s).")
    out.append("- Q4_K_M: " + ", ".join(
        f"{r['size']} {8 * r['export']['q4_k_m_bytes'] / r['params']:.2f} bits/weight ({r['export']['fallback_tensors']} "
        f"of {r['export']['weight_matrices']} weight matrices in llama.cpp's fallback types)" for r in sizes)
        + ": widths that are not a multiple of 256 (576, 960) cannot take the k-quants, so most matrices fall back "
        "to Q5_0/Q8_0.")
    judged = [(r["size"], d) for r in sizes if r["params"] >= 300e6
              for d in (r.get("decode"), r.get("decode_1_thread")) if d and d.get("ok", True)]
    if judged:
        out.append(f"- Decode efficiency target ≥ {TARGET_EFFICIENCY} at ≥ 360M: " + "; ".join(
            f"{n} on {d['threads']} thread(s) {d['efficiency']:.2f} ({'met' if d['efficiency'] >= TARGET_EFFICIENCY else 'not met'}; "
            f"{d['decode_tokens_per_s']} tok/s, {d['bandwidth_gb_s']:.1f} GB/s measured after it)" for n, d in judged)
            + ". Each figure carries the load of its moment: the same file gives very different rates as other jobs "
            "come and go (decode_load_average_start/end in results.json).")
    for key, label in (("per_token_1_thread", "1 thread"), ("per_token", f"{results['gate_threads']} threads")):
        rows = [(r["size"], r[key]) for r in sizes if r.get(key)]
        if not rows:
            continue
        out.append(f"- Per decoded token on {label}: " + "; ".join(
            f"{n} {p['ms_per_token_gate']} ms against a bandwidth bound of {p['bandwidth_bound_ms']} ms "
            f"(llama.cpp's decode beyond the bound {p['llama_decode_over_bound_ms']} ms, Python eval wrapper "
            f"{p['wrapper_ms']} ms, sampling {p['sample_ms']} ms)" for n, p in rows) + ".")
    both = [(r.get("size", "78M demo"), r["per_token"], r["per_token_1_thread"])
            for r in sizes + ([results["demo"]] if "demo" in results else [])
            if r.get("per_token") and r.get("per_token_1_thread")]
    if both:
        out.append("- Outside llama_decode (llama-cpp-python's eval wrapper + sampling) a token costs at most "
                   f"{max(p['wrapper_ms'] + p['sample_ms'] for _, a, b in both for p in (a, b)):.2f} ms on any model; "
                   "the rest is inside llama_decode. Two llama.cpp threads against one: "
                   + ", ".join(f"{n} {a['llama_decode_ms'] / b['llama_decode_ms']:.1f}× the 1-thread llama_decode time"
                               for n, a, b in both)
                   + " — with other jobs on both cores the two threads wait for each other at every barrier of the "
                   "graph (load averages in results.json).")
    demo = results.get("demo") or {}
    ref = _quiet_reference()
    if ref and demo.get("per_token_1_thread") and demo.get("per_token"):
        outside = max(demo[k]["wrapper_ms"] + demo[k]["sample_ms"] for k in ("per_token", "per_token_1_thread"))
        ms, bound = 1000 / ref["decode_tokens_per_s"], 1000 / ref["bound_tokens_per_s"]
        out.append(f"- The demo's {ref['efficiency']:.2f} ({ref['source']}: the same kind of 78M Q4_K_M student, quiet "
                   f"{ref['cpu']}, 2 threads, {ref['bandwidth_gb_s']:.1f} GB/s): {ms:.2f} ms per token against a "
                   f"bound of {bound:.2f} ms, {ms - bound:.2f} ms over it. Measured here, the eval wrapper + sampling "
                   f"take at most {outside:.2f} ms, so at least {ms - bound - outside:.2f} ms of that per-token "
                   "overhead is inside llama_decode: work that does not shrink with the bytes read — a graph of every "
                   "layer's ops per token, each op ending at a barrier of the 2 threads, and matrices stored in "
                   "the Q5_0/Q8_0 fallback types at width 576 (see the Q4_K_M line above). This run does not split "
                   "llama_decode itself further; the 2-vs-1-thread ratios above show how much of it is the barrier "
                   "when the cores are contended.")
    for pkey, dkey in (("per_token", "decode"), ("per_token_1_thread", "decode_1_thread")):
        p, d = demo.get(pkey), demo.get(dkey)
        if not p:
            continue
        out.append(f"- The 78M demo student (Q4_K_M, {d['bytes_per_token'] / 2**20:.1f} MiB read per token, "
                   f"{d['threads']} llama.cpp thread(s)): {p['ms_per_token_gate']} ms per token in the gate against "
                   f"a bandwidth bound of {p['bandwidth_bound_ms']} ms (efficiency {d['efficiency']:.2f}); of the "
                   f"rest, llama_decode beyond the bound {p['llama_decode_over_bound_ms']} ms, llama-cpp-python's "
                   f"eval wrapper {p['wrapper_ms']} ms, sampling (greedy chain with the repetition-penalty stage "
                   f"over {VOCAB} logits) {p['sample_ms']} ms.")
    return out


VOCAB = 49152
TARGET_EFFICIENCY = 0.6  # issue #18: decode efficiency at >= 360M, where bandwidth dominates


def _quiet_reference() -> dict[str, Any] | None:
    """The demo student's llama.cpp Q4_K_M efficiency on a quiet machine (bench/gate/results.json), if there."""
    path = ROOT / "bench" / "gate" / "results.json"
    if not path.is_file():
        return None
    g = json.loads(path.read_text())
    e = (g.get("c") or {}).get("llama.cpp Q4_K_M")
    if not e:
        return None
    return {**e, "source": "bench/gate/results.json", "cpu": (g.get("machine") or {}).get("cpu", "?")}


def render(results: dict[str, Any]) -> str:
    """results.md: the command, the machine, one table, the per-token split, the findings."""
    m = results["machine"]
    lines = ["# Cost vs model size on this CPU (random-init SmolLM2-shaped students)", "",
             f"Command: `{results.get('command')}`", "",
             *(line for c in results.get("decode_commands", []) for line in (f"Decode measured again: `{c}`", "")),
             *(line for r in results["sizes"].values() if r.get("command") not in (None, results.get("command"))
               for line in (f"{r['size']}: `{r['command']}`", "")),
             f"Machine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {m.get('memory_mb')} MB; torch {results['torch']}, "
             f"{results['threads']} torch thread(s) for caching/training/export, {results['gate_threads']} llama.cpp "
             f"threads for the gate's decode measurement (profile {results['profile']}) and 1 thread beside it. "
             "Other jobs shared the two cores: load averages are recorded per size in results.json.", "",
             f"Teacher for the soft labels: a random-init model of the same size (seed 0); student: another (seed 1). "
             f"Data: the first {results['rows']} rows of runs/workorders/data/train.jsonl; {results['steps']} "
             "optimizer steps of 4 rows, KD against the cached top-32 soft labels.", "",
             "| size | params | soft labels: s / 1k answer tokens | bytes / token | train tokens/s | plan "
             "| planned peak MB | measured peak MB | measured / planned | HF→F16 s | F16→Q4_K_M s | Q4_K_M MB "
             "| decode tok/s | efficiency | decode tok/s (1 thread) | efficiency (1 thread) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sizes = sorted(results["sizes"].values(), key=lambda r: r["params"])
    for r in sizes:
        t, s, e, d = r["train"], r["softlabels"], r["export"], r.get("decode") or {}
        d1 = r.get("decode_1_thread") or {}
        plan = t["plan"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {s['s_per_1k_answer_tokens']} | {s['bytes_per_token']} | "
            f"{t['tokens_per_s']} | {plan['method']}, micro-batch {plan['micro_batch']}"
            f"{', checkpointing' if plan['checkpointing'] else ''} | {t['planned_peak_mb']} | {t['measured_peak_mb']} | "
            f"{t['measured_over_planned']} | {e['convert_f16_s']} | {e['quantize_q4_k_m_s']} | "
            f"{e['q4_k_m_bytes'] / 1e6:.0f} | {d.get('decode_tokens_per_s', 'failed')} | {d.get('efficiency')} | "
            f"{d1.get('decode_tokens_per_s', 'failed')} | {d1.get('efficiency')} |")
    lines += ["", "Per decoded token (ms, median over rounds; bound = bytes read per token / read bandwidth measured "
              "right after the gate's runs; llama_decode = llama.cpp's own decode time, llama_perf_context):", "",
              "| model | threads | total (gate) | bandwidth bound | llama_decode | llama_decode − bound "
              "| Python eval wrapper | sampling | efficiency |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(r["size"], r) for r in sizes] + ([("78M demo", results["demo"])] if "demo" in results else [])
    for n, r in rows:
        for key, dkey in (("per_token", "decode"), ("per_token_1_thread", "decode_1_thread")):
            p, d = r.get(key), r.get(dkey)
            if not p or "bandwidth_bound_ms" not in p or not d or "efficiency" not in d:
                continue
            lines.append(f"| {n} | {d['threads']} | {p['ms_per_token_gate']} | {p['bandwidth_bound_ms']} | "
                         f"{p['llama_decode_ms']} | {p['llama_decode_over_bound_ms']} | {p['wrapper_ms']} | "
                         f"{p['sample_ms']} | {d['efficiency']} |")
    failed = [f"- {n}, {d['threads']} llama.cpp thread(s): the decode measurement failed: {d['error']}"
              for n, r in rows for d in (r.get("decode"), r.get("decode_1_thread")) if d and d.get("ok") is False]
    lines += ["", "## Findings", "", *findings(results), *failed, *results.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="135m,360m,1b")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale" / "results.json")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "workorders", help="run whose data is copied")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "runs" / "workorders" / "teacher")
    parser.add_argument("--scratch", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--rows", type=int, default=12, help="training rows copied (steps × batch 4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", default="cpu-x86-2c")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads for caching, training, export")
    parser.add_argument("--gate-threads", type=int, default=2, help="llama.cpp threads (the profile's)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="the profile's [latency] prompt_tokens")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the per-token split")
    parser.add_argument("--decode-timeout", type=float, default=600, help="seconds per decode measurement")
    parser.add_argument("--dtype", default="bfloat16", help="on-disk dtype of the random-init folders")
    parser.add_argument("--min-available-mb", type=int, default=19000, help="wait for this much before ~1B training")
    parser.add_argument("--demo-gguf", type=Path, default=Path("/work/tmp/m1/runs/demo/artifacts/student-Q4_K_M.gguf"))
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json")
    parser.add_argument("--replan", action="store_true",
                        help="add the checked-out planner's estimate for every recorded size (no training)")
    parser.add_argument("--decode-only", action="store_true",
                        help="measure decode again on the kept Q4_K_M files (and the demo's); keep the rest")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--test-sizes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "cache":
            out = worker_cache(Path(rest[0]))
        elif kind == "export":
            out = worker_export(Path(rest[0]))
        elif kind == "overhead":
            out = worker_overhead(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            raise SystemExit(f"unknown worker {kind!r}")
        print(json.dumps(out))
        return

    known = TEST_SIZES if args.test_sizes else SIZES
    try:
        sizes = parse_sizes(args.sizes, known)
    except ValueError as exc:
        parser.error(str(exc))

    import torch

    from edgepack.provenance import machine_info

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("sizes", {})
    command = f"OMP_NUM_THREADS={args.threads} nice -n 5 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.render_only:
        write_results(args.out, results)
        return
    if args.replan:
        for r in results["sizes"].values():
            r["train"]["replanned"] = replan(r, results.get("profile", args.profile), args.tokenizer_from)
        write_results(args.out, results)
        return
    if args.decode_only:
        results["decode_commands"] = [*results.get("decode_commands", []), command]
    else:
        results["command"] = command
    results.update({"machine": machine_info(), "torch": torch.__version__, "threads": args.threads,
                    "gate_threads": args.gate_threads, "profile": args.profile, "steps": args.steps,
                    "rows": args.rows, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens})
    if args.decode_only:
        for name in sizes:
            gguf = args.scratch / name / "run" / "artifacts" / "student-Q4_K_M.gguf"
            if name in results["sizes"] and gguf.is_file():
                results["sizes"][name].update(measure_decode(name, gguf, args))
                write_results(args.out, results)
        if args.demo_gguf and args.demo_gguf.is_file():
            results["demo"] = demo_overhead(args.demo_gguf, args)
        write_results(args.out, results)
        return
    for name in sizes:
        if name in results["sizes"] and not args.redo:
            log(f"{name}: kept from {args.out}")
            continue
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        results["sizes"][name] = {**measure_size(name, known[name], args), "started": started,
                                  "took_s": round(time.perf_counter() - t0, 1), "command": command}
        write_results(args.out, results)
    if args.demo_gguf and args.demo_gguf.is_file() and ("demo" not in results or args.redo):
        log("demo: gate decode and per-token split")
        results["demo"] = demo_overhead(args.demo_gguf, args)
    write_results(args.out, results)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def write_results(out: Path, results: dict[str, Any]) -> None:
    from edgepack.atomic import write_json, write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    if results.get("sizes"):
        results["findings"] = findings(results)
        # The provenance line of BENCHMARKS.md: the first size's start and load average.
        first = min(results["sizes"].values(), key=lambda r: r.get("started", ""))
        results["started"] = first.get("started")
        results["load_average"] = {"start": first["load_average"]["start"]}
    write_json(out, results)
    write_text(out.with_suffix(".md"), render(results))


if __name__ == "__main__":
    main()
