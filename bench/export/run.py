"""Export benchmark on the embedded 135M teacher: conversion, quantization, imatrix, fidelity.

    .venv/bin/python bench/export/run.py --out bench/export/results.json

1. materialise the embedded SmolLM2-135M-Instruct (Q4_1 GGUF) as an HF dir (float32
   safetensors, edgepack's tokenizer) with ``materialize_teacher``: this is the reference;
2. convert it to an F16 GGUF and quantize that to Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 and
   IQ4_XS (each timed);
3. compute an importance matrix from the demo domain's training prompts (the seed file,
   chat-templated with the demo system prompt, seed answer as the response) and quantize
   Q4_K_M, Q4_0 and IQ4_XS again with it;
4. export ONNX int4 and int8;
5. run the fidelity report over every artifact on the demo holdout (prompts the imatrix
   never saw): KLD vs the F16 GGUF (GGUF) or vs transformers (ONNX), top-1, size, bits per
   weight, tokenizer agreement, greedy agreement.

Writes ``results.json`` (everything, including the full fidelity report) and ``results.md``
beside it. The targets are reported, not asserted. Timings depend on the machine's load,
which is sampled at each stage and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GGUF_QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS"]
IMATRIX_QUANTS = ["Q4_K_M", "Q4_0", "IQ4_XS"]
ONNX_QUANTS = ["int4", "int8"]
TARGETS = {  # the export issue's targets (reported against, never asserted)
    "top1_f16_min": 0.995,
    "kld_q8_0_max": 0.005,
    "kld_q4_k_m_max": 0.08,
    "imatrix_q4_k_m_kld_reduction_min": 0.10,
    "convert_plus_gguf_quantize_seconds_max": 180.0,
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}


class Timer:
    """Wall time per stage and the 1-minute load average seen at each stage's end."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.load: list[tuple[str, float]] = [("start", os.getloadavg()[0])]

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        _log(f"{name} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.stages[name] = round(time.perf_counter() - t0, 2)
        self.load.append((name, os.getloadavg()[0]))
        _log(f"{name}: {self.stages[name]} s (load {self.load[-1][1]:.2f})")
        return result


def _demo_rows(path: Path, system: str) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            rows.append({"id": obj["id"], "messages": [{"role": "system", "content": system},
                                                       {"role": "user", "content": obj["prompt"]}],
                         "response": obj.get("reference")})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _onnx_initializers(folder: Path) -> dict[str, Any]:
    """MB of weights per ONNX data type, and the largest initializer (what dominates the size)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    by_type: dict[str, int] = {}
    largest = ("", 0)
    for t in model.graph.initializer:
        n = len(t.raw_data) or next((int(e.value) for e in t.external_data if e.key == "length"), 0)
        kind = onnx.TensorProto.DataType.Name(t.data_type)
        by_type[kind] = by_type.get(kind, 0) + n
        largest = max(largest, (t.name, n), key=lambda x: x[1])
    return {"mb_by_type": {k: round(v / 1e6, 1) for k, v in sorted(by_type.items())},
            "largest": {"name": largest[0], "mb": round(largest[1] / 1e6, 1)}}


def benchmark(work: Path, *, max_prompts: int, max_tokens: int, threads: int | None, command: str) -> dict[str, Any]:
    from edgepack.distill.data import DEMO_HOLDOUT, DEMO_SEED, DEMO_SYSTEM_PROMPT
    from edgepack.distill.teachers import materialize_teacher, resolve_teacher
    from edgepack.export.fidelity import fidelity_report
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.export.gguf.imatrix import build_imatrix
    from edgepack.export.gguf.quantize import quant_report, quantize_gguf
    from edgepack.export.onnx.convert import export_onnx

    timer = Timer()
    source = resolve_teacher("builtin:smollm2-135m-instruct")
    hf_dir = timer.run("materialize teacher (GGUF Q4_1 -> HF float32)", materialize_teacher, source, work / "teacher")
    calibration = _write_jsonl(work / "calibration.jsonl", _demo_rows(DEMO_SEED, DEMO_SYSTEM_PROMPT))
    holdout = _write_jsonl(work / "holdout.jsonl", _demo_rows(DEMO_HOLDOUT, DEMO_SYSTEM_PROMPT))

    arts = work / "artifacts"
    arts.mkdir()
    produced: list[dict[str, Any]] = []
    f16 = timer.run("convert F16", convert_hf_to_gguf, hf_dir, arts / "teacher-F16.gguf", "F16")
    produced.append({"path": f16, "quant": "F16", "imatrix": False, "stage": "convert F16"})
    for q in GGUF_QUANTS:
        stage = f"quantize {q}"
        path = timer.run(stage, quantize_gguf, f16, arts / f"teacher-{q}.gguf", q, threads)
        produced.append({"path": path, "quant": q, "imatrix": False, "stage": stage, "quant_report": quant_report(path, q)})
    imatrix_path = arts / "teacher.imatrix.gguf"
    imatrix = timer.run("imatrix (transformers hooks over the calibration rows)", build_imatrix, hf_dir, imatrix_path,
                        calibration, threads=threads)
    for q in IMATRIX_QUANTS:
        stage = f"quantize {q} + imatrix"
        path = timer.run(stage, quantize_gguf, f16, arts / f"teacher-{q}-imatrix.gguf", q, threads, imatrix_path)
        produced.append({"path": path, "quant": q, "imatrix": True, "stage": stage, "quant_report": quant_report(path, q)})
    for q in ONNX_QUANTS:
        stage = f"onnx {q}"
        info = timer.run(stage, export_onnx, hf_dir, arts / f"teacher-onnx-{q}", q)
        produced.append({"path": info["path"], "quant": q, "imatrix": False, "stage": stage, "onnx_parity": info["parity"],
                         "onnx_ops": info["ops"], "onnx_initializers": _onnx_initializers(info["path"])})

    fid = timer.run("fidelity report", fidelity_report, hf_dir, [p["path"] for p in produced], holdout, work / "report",
                    max_prompts=max_prompts, max_tokens=max_tokens, threads=threads, command=command,
                    progress=lambda task, done, total=None: _log(f"  {task} {done}/{total}"))
    by_path = {a["path"]: a for a in fid["artifacts"]}
    rows = []
    for p in produced:
        a = by_path[str(p["path"])]
        row = {"artifact": a["name"], "format": a["format"], "quant": p["quant"], "imatrix": p["imatrix"],
               "size_mb": round(a["size_mb"], 3), "bits_per_weight": round(a["bits_per_weight"], 3),
               "kld": a["kld"], "kld_reference": a["kld_reference"], "kld_p99": (a.get("vs_reference_gguf")
                                                                                 or a["vs_transformers"])["kld_p99"],
               "top1": a["top1"], "top1_vs_transformers": a["vs_transformers"]["top1_agreement"],
               "max_abs_diff_vs_transformers": a["vs_transformers"]["max_abs_diff"],
               "tokenizer_ok": a["tokenizer"]["ok"], "greedy_exact_match_rate": a["greedy"].get("exact_match_rate"),
               "seconds": timer.stages[p["stage"]]}
        for key in ("quant_report", "onnx_parity", "onnx_ops", "onnx_initializers"):
            if key in p:
                row[key] = p[key]
        rows.append(row)

    def kld(quant: str, with_imatrix: bool) -> float:
        return next(r["kld"] for r in rows if r["format"] == "gguf" and r["quant"] == quant and r["imatrix"] == with_imatrix)

    gguf_seconds = timer.stages["convert F16"] + sum(timer.stages[f"quantize {q}"] for q in GGUF_QUANTS)
    reduction = {q: 1 - kld(q, True) / kld(q, False) for q in IMATRIX_QUANTS}
    f16 = next(r for r in rows if r["quant"] == "F16")
    targets = [
        {"target": "top-1@F16 vs transformers >= 99.5%", "measured": f16["top1_vs_transformers"],
         "met": f16["top1_vs_transformers"] >= TARGETS["top1_f16_min"]},
        {"target": "KLD@Q8_0 <= 0.005", "measured": kld("Q8_0", False), "met": kld("Q8_0", False) <= TARGETS["kld_q8_0_max"]},
        {"target": "KLD@Q4_K_M <= 0.08", "measured": kld("Q4_K_M", False), "met": kld("Q4_K_M", False) <= TARGETS["kld_q4_k_m_max"]},
        {"target": "imatrix lowers Q4_K_M KLD by >= 10%", "measured": reduction["Q4_K_M"],
         "met": reduction["Q4_K_M"] >= TARGETS["imatrix_q4_k_m_kld_reduction_min"]},
        {"target": "conversion + all GGUF quantizations <= 180 s", "measured": gguf_seconds,
         "met": gguf_seconds <= TARGETS["convert_plus_gguf_quantize_seconds_max"]},
    ]
    return {
        "benchmark": "edgepack export: SmolLM2-135M-Instruct (embedded teacher)",
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": _machine(),
        "load_average_1min_by_stage": timer.load,
        "settings": {"threads": threads or os.cpu_count(),
                     "threads_note": "llama.cpp and torch threads; onnxruntime sessions (onnx_logits) use their default", "max_prompts": max_prompts, "max_tokens": max_tokens,
                     "calibration": "distill/demo/seed.jsonl (demo system prompt + prompt + seed answer)",
                     "held_out": "distill/demo/holdout.jsonl (same format; never seen by the imatrix)"},
        "reference": {"source": source.describe(), "parameters": fid["reference"]["parameters"],
                      "note": "the embedded teacher ships as Q4_1; the reference is its dequantized float32 weights"},
        "results": rows,
        "imatrix": imatrix,
        "imatrix_kld_reduction": reduction,
        "timing_seconds": {**timer.stages, "convert_plus_gguf_quantizations": round(gguf_seconds, 2)},
        "targets": targets,
        "fidelity": fid,
    }


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# {results['benchmark']}", "",
        f"Command: `{results['command']}`  ",
        f"Created {results['created']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['memory_gb']} GB), "
        f"{m['platform']}.  ",
        "1-minute load average by stage: " + ", ".join(f"{s.split(' (')[0]} {v:.2f}"
                                                       for s, v in results["load_average_1min_by_stage"]) + ".  ",
        "Other agents shared the machine's CPUs during the run, so the timings are pessimistic.", "",
        f"Reference: {results['reference']['parameters']:,} parameters; {results['reference']['note']}. "
        f"Held-out text: {results['fidelity']['prompts']['sequences']} sequences, "
        f"{results['fidelity']['prompts']['tokens']} tokens. GGUF KLD is vs the F16 GGUF (llama.cpp); ONNX KLD vs "
        "transformers float32.", "",
        "| artifact | quant | imatrix | size MB | bits/weight | KLD mean | KLD p99 | top-1 | top-1 vs transformers "
        "| greedy exact | tokenizer | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results["results"]:
        greedy = "–" if r["greedy_exact_match_rate"] is None else f"{100 * r['greedy_exact_match_rate']:.0f}%"
        lines.append(
            f"| {r['artifact']} | {r['quant']} | {'yes' if r['imatrix'] else 'no'} | {r['size_mb']:.1f} "
            f"| {r['bits_per_weight']:.2f} | {r['kld']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1']:.2f}% "
            f"| {100 * r['top1_vs_transformers']:.2f}% | {greedy} | {'pass' if r['tokenizer_ok'] else 'FAIL'} "
            f"| {r['seconds']} |")
    lines += ["", "## Targets (reported, not asserted)", "", "| target | measured | met |", "|---|---:|---|"]
    for t in results["targets"]:
        value = t["measured"]
        shown = f"{100 * value:.2f}%" if "%" in t["target"] else f"{value:.4g}"
        lines.append(f"| {t['target']} | {shown} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "imatrix KLD reduction by type: " + ", ".join(f"{q} {100 * v:.1f}%"
                                                               for q, v in results["imatrix_kld_reduction"].items()),
              "", "## Stage timings (s)", ""]
    lines += [f"- {k}: {v}" for k, v in results["timing_seconds"].items()]
    notes = []
    for r in results["results"]:
        qr = r.get("quant_report")
        if qr and qr["fallback_tensors"]:
            notes.append(f"{r['artifact']}: {qr['fallback_tensors']} of {qr['weight_matrices']} weight matrices have rows "
                         f"not a multiple of {qr['block_size']} (hidden size 576), stored as "
                         f"{', '.join(f'{k} x{v}' for k, v in qr['tensor_types'].items())}")
    if notes:
        lines += ["", "## What llama.cpp actually stored", ""] + [f"- {n}" for n in notes]
    onnx = [(r["artifact"], r["onnx_initializers"]) for r in results["results"] if "onnx_initializers" in r]
    if onnx:
        lines += ["", "## What the ONNX files hold (MB of initializers by type)", ""]
        lines += [f"- {name}: {', '.join(f'{k} {v}' for k, v in info['mb_by_type'].items())}; largest "
                  f"`{info['largest']['name']}` {info['largest']['mb']} MB" for name, info in onnx]
    lines += ["", "## Top-1 disagreements with transformers", "",
              "Reference top-1/top-2 logit margin where the artifact's top-1 differs (small = near-tie).", ""]
    for a in results["fidelity"]["artifacts"]:
        vt = a["vs_transformers"]
        med, mx = vt.get("top1_flip_reference_margin_median"), vt.get("top1_flip_reference_margin_max")
        lines.append(f"- {a['name']}: {vt['top1_flips']} of {vt['tokens']} positions; margin median "
                     f"{'–' if med is None else f'{med:.3g}'}, max {'–' if mx is None else f'{mx:.3g}'}")
    if results["fidelity"]["notes"]:
        lines += ["", "## Fidelity notes", ""] + [f"- {n}" for n in results["fidelity"]["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/export/results.json"))
    parser.add_argument("--max-prompts", type=int, default=24, help="held-out sequences compared")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per sequence at most")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp and torch threads (default 1: on this shared 2-core machine a second "
                             "thread made a 200-token forward 10-15x slower, both in torch and llama.cpp)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifacts in this folder")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/export/run.py", *sys.argv[1:]])
    import torch

    torch.set_num_threads(args.threads)  # the materialiser, imatrix, ONNX export and reference all run torch
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-export-"))
    try:
        results = benchmark(work, max_prompts=args.max_prompts, max_tokens=args.max_tokens, threads=args.threads,
                            command=command)
        if args.keep is not None:
            shutil.copytree(work / "artifacts", args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render(results), encoding="utf-8")
    _log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
