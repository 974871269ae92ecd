"""bench/scale's measurements that need a fresh process of their own (their own peak RSS): soft-label
caching, GGUF export and the per-token decode split, each run as ``run.py --worker KIND ...``
(:func:`run_worker`), which prints its JSON as the last stdout line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scale_machine import peak_rss_mb

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = Path(__file__).resolve().parent / "run.py"


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
    proc = subprocess.run([sys.executable, str(RUN_PY), "--worker", *args], capture_output=True,
                          text=True, env=env, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
