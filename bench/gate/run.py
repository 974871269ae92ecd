"""Benchmark of edgepack's gate and runtimes on a model's GGUF and ONNX artifacts.

    .venv/bin/python bench/gate/run.py --out bench/gate/results.json      # --model runs/demo/student

The model is the distilled demo student (``runs/demo/student``, from ``make demo``) by default,
or any HF folder, or ``builtin:smollm2-135m-instruct`` (the embedded teacher). It

writes ``results.json`` and ``results.md`` (machine, load averages, the exact command) with:

(a) gate overhead: decode tok/s of the gate's measurement child vs raw llama-cpp-python on the
    same Q4_K_M file and settings (threads, n_ctx, prompt, token count), pairs of fresh
    processes in ABBA order; then both generate loops alternating in one process on the same
    loaded model, which isolates edgepack's own overhead from process-to-process noise
    (target: within 5%);
(b) ONNX int4 (MatMulNBits with edgepack's export defaults) vs llama.cpp Q4_K_M of the same
    model, side by side;
(c) decode efficiency of both against this machine's measured memory bandwidth (target for the
    GGUF: ≥ 0.6);
(d) stability: the Q4_K_M gated three times with the profile, spread of TTFT p95 and decode
    tok/s (target: every run within ±10% of the mean).

Artifacts are built once per model and export defaults and cached in ``--work`` (default
``$EDGEPACK_CACHE/bench-gate/<key>`` or ``~/.cache/edgepack/bench-gate/<key>``, the key a hash of
the weights and of the ONNX quantization defaults): converted to F16 GGUF and quantized to
Q4_K_M by ``edgepack.export.gguf``, and exported to ONNX int4 by ``edgepack.export.onnx.convert``
(the builtin teacher is first materialised to HF). The first run spends a few minutes building
them; later runs only measure. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgepack.atomic import write_json, write_text

DEFAULT_MODEL = "runs/demo/student"
EFFICIENCY_TARGET = 0.6
RAW_LLAMA = r"""
import json, sys, time
import llama_cpp
from edgepack.export.gate.measure import FILLER
path, threads, n_ctx, prompt_tokens, decode_tokens, runs = sys.argv[1], *map(int, sys.argv[2:7])
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
text = FILLER
while len(llm.tokenize(text.encode(), add_bos=True)) < prompt_tokens:
    text += FILLER
prompt = llm.tokenize(text.encode(), add_bos=True)[:prompt_tokens]
rates, ttft = [], []
for i in range(runs + 1):
    llm.reset()
    start = time.perf_counter()
    stamps = []
    for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) >= decode_tokens:
            break
    if i:
        ttft.append((stamps[0] - start) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
print(json.dumps({"decode_tokens_per_s": rates, "ttft_ms": ttft, "llama_cpp_python": llama_cpp.__version__}))
"""


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stats(values: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(values)
    return {"mean": mean, "median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "max_dev_from_mean_percent": 100 * max(abs(v - mean) for v in values) / mean if mean else None,
            "samples": [round(v, 3) for v in values]}


# --- artifacts -------------------------------------------------------------------------------
def model_key(model: str) -> str:
    """What the cached artifacts were built from: the HF folder's weights (sha256 of its
    safetensors) or the builtin teacher's name, and edgepack's export defaults."""
    import hashlib

    from edgepack.export.onnx.quantize import OnnxQuantOptions

    h = hashlib.sha256(json.dumps(OnnxQuantOptions().describe(4), sort_keys=True).encode())
    if model.startswith("builtin:"):
        h.update(model.encode())
    else:
        for f in sorted(Path(model).glob("*.safetensors")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_artifacts(work: Path, model: str) -> dict[str, Any]:
    """``model`` (an HF folder, or the builtin teacher materialised to one) → F16 + Q4_K_M GGUF and
    ONNX int4 with edgepack's export defaults; built once per model and defaults (kept in ``work``)."""
    from edgepack.atomic import is_complete

    work = work / model_key(model)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    hf = Path(model)
    if model.startswith("builtin:"):
        from edgepack.distill.teachers import materialize_teacher, resolve_teacher

        hf = work / "model-hf"
        if not is_complete(hf):
            log("materialising the teacher as an HF folder (transformers dequantizes the GGUF)")
            t = time.perf_counter()
            materialize_teacher(resolve_teacher(model), hf)
            timings["materialize_s"] = time.perf_counter() - t
    f16, q4 = work / "model-F16.gguf", work / "model-Q4_K_M.gguf"
    if not q4.is_file():
        from edgepack.export.gguf.convert import convert_hf_to_gguf
        from edgepack.export.gguf.quantize import quantize_gguf

        log("converting to F16 GGUF and quantizing to Q4_K_M")
        t = time.perf_counter()
        convert_hf_to_gguf(hf, f16, outtype="F16")
        quantize_gguf(f16, q4, "Q4_K_M")
        timings["gguf_s"] = time.perf_counter() - t
    onnx = work / "model-onnx-int4"
    onnx_info_path = work / "onnx-export.json"
    if not is_complete(onnx) or not onnx_info_path.is_file():
        from edgepack.export.onnx.convert import export_onnx

        log("exporting ONNX int4 (optimum + MatMulNBits, edgepack's defaults); this takes a few minutes")
        t = time.perf_counter()
        info = export_onnx(hf, onnx, quant="int4")
        timings["onnx_s"] = time.perf_counter() - t
        write_json(onnx_info_path, {k: v for k, v in info.items() if k != "files"})
    from edgepack.export.gguf.quantize import quant_report

    return {"hf": hf, "q4_k_m": q4, "onnx_int4": onnx, "build_timings_s": timings,
            "q4_k_m_report": quant_report(q4, "Q4_K_M"),
            "onnx_export": json.loads(onnx_info_path.read_text())}


def zero_point_types(folder: Path) -> dict[str, int]:
    """MatMulNBits nodes by zero-point storage: onnxruntime's packed CPU kernels need uint8 ones."""
    from edgepack.runtime.onnx_graph import scan_onnx

    info = scan_onnx(folder / "model.onnx")
    dtypes = {t.name: t.data_type for t in info.initializers}
    names = {1: "float", 10: "float16", 2: "uint8"}
    out: dict[str, int] = {}
    for op, inputs, _ in info.nodes:
        if op == "MatMulNBits":
            kind = names.get(dtypes.get(inputs[3]), "other") if len(inputs) > 3 and inputs[3] else "none (default)"
            out[kind] = out.get(kind, 0) + 1
    return out


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return path.stat().st_size / 2**20


# --- sections --------------------------------------------------------------------------------
def measure(path: Path, fmt: str, args: argparse.Namespace, *, timeout_s: float | None = None,
            runs: int | None = None, decode_tokens: int | None = None, required: bool = True) -> dict[str, Any]:
    from edgepack.export.gate.measure import measure_artifact

    r = measure_artifact(path, fmt=fmt, threads=args.threads, n_ctx=args.n_ctx, prompt_tokens=args.prompt_tokens,
                         decode_tokens=decode_tokens or args.decode_tokens, runs=runs or args.runs,
                         timeout_s=timeout_s)
    if required and not r.get("ok"):
        raise RuntimeError(f"measuring {path.name} failed: {r.get('error')} {r.get('stderr_tail')}")
    return r


def raw_llama(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-c", RAW_LLAMA, str(path), str(args.threads), str(args.n_ctx), str(args.prompt_tokens),
           str(args.decode_tokens), str(args.runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


WRAPPER_VS_RAW = r"""
import json, sys, time
from edgepack.runtime.backends.base import get_backend
from edgepack.export.gate.measure import exact_prompt
path, threads, n_ctx, prompt_tokens, decode_tokens, rounds = sys.argv[1], *map(int, sys.argv[2:7])
backend = get_backend("gguf").load(path, threads=threads, n_ctx=n_ctx)
prompt = exact_prompt(backend, prompt_tokens)
llm = backend._llm  # the same llama_cpp.Llama, driven directly

def rate(tokens):
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter())
        if len(stamps) >= decode_tokens:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])

def wrapper():
    return rate(backend.generate(prompt, max_tokens=decode_tokens, stop_at_eos=False))

def raw():
    llm.reset()
    return rate(llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True))

wrapper(); raw()  # warm-up
out = {"wrapper": [], "raw": []}
for i in range(rounds):  # alternate the order so drift in machine load cancels
    for name in (("wrapper", "raw") if i % 2 == 0 else ("raw", "wrapper")):
        out[name].append(wrapper() if name == "wrapper" else raw())
print(json.dumps(out))
"""


def section_a(arts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Gate measurement child vs raw llama-cpp-python child, in ABBA order; then both loops in one process."""
    gate, raw, pairs = [], [], []
    for i in range(args.pairs):
        order = ("gate", "raw") if i % 2 == 0 else ("raw", "gate")
        log(f"(a) pair {i + 1}/{args.pairs}: {order[0]} first")
        got: dict[str, Any] = {}
        for which in order:
            got[which] = measure(arts["q4_k_m"], "gguf", args) if which == "gate" else raw_llama(arts["q4_k_m"], args)
        g, r = got["gate"], got["raw"]
        g_med, r_med = g["decode_tokens_per_s"]["p50"], statistics.median(r["decode_tokens_per_s"])
        gate.append(g_med)
        raw.append(r_med)
        pairs.append({"order": list(order), "gate_decode_p50": g_med, "raw_decode_median": r_med,
                      "gate_ttft_p50": g["ttft_ms"]["p50"], "raw_ttft_median": statistics.median(r["ttft_ms"]),
                      "gate_samples": g["decode_tokens_per_s"]["samples"],
                      "raw_samples": [round(x, 3) for x in r["decode_tokens_per_s"]], "load_average": load_average()})
    ratio = statistics.median(gate) / statistics.median(raw)
    log("(a) edgepack's generate loop vs llama-cpp-python's, alternating in one process")
    cmd = [sys.executable, "-c", WRAPPER_VS_RAW, str(arts["q4_k_m"]), str(args.threads), str(args.n_ctx),
           str(args.prompt_tokens), str(args.decode_tokens), str(2 * args.runs)]
    same = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout.strip()
                      .splitlines()[-1])
    same_ratio = statistics.median(same["wrapper"]) / statistics.median(same["raw"])
    return {"pairs": pairs, "gate_decode_median": statistics.median(gate), "raw_decode_median": statistics.median(raw),
            "gate_over_raw": ratio, "difference_percent": 100 * (ratio - 1), "target": "within 5%",
            "within_target": abs(ratio - 1) <= 0.05,
            "same_process": {"wrapper": stats(same["wrapper"]), "raw": stats(same["raw"]),
                             "wrapper_over_raw": same_ratio, "difference_percent": 100 * (same_ratio - 1),
                             "within_target": abs(same_ratio - 1) <= 0.05}}


def section_b(arts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """ONNX int4 and llama.cpp Q4_K_M of the same model, measured alike, side by side.

    A measurement that runs past ``--timeout`` is recorded as such, then the artifact is
    probed with 1 run of 16 tokens so the table still has a (labelled) number.
    """
    rows = {}
    for name, path, fmt in (("llama.cpp Q4_K_M", arts["q4_k_m"], "gguf"), ("onnxruntime int4", arts["onnx_int4"], "onnx")):
        log(f"(b) measuring {name}")
        m = measure(path, fmt, args, timeout_s=args.timeout, required=False)
        note = None
        if not m.get("ok"):
            note = f"full measurement failed ({m.get('error')}); numbers are from a probe: 1 run of 16 tokens"
            log(f"(b) {name}: {note}")
            m = measure(path, fmt, args, timeout_s=args.timeout, runs=1, decode_tokens=16)
        rows[name] = {"artifact": path.name, "size_mb": size_mb(path), "load_s": m["load_s"], "note": note,
                      "ttft_ms": {k: m["ttft_ms"][k] for k in ("p50", "p95", "stdev", "min", "max")},
                      "decode_tokens_per_s": {k: m["decode_tokens_per_s"][k] for k in ("p50", "p95", "stdev", "min", "max")},
                      "peak_rss_mb": m["peak_rss_mb"], "backend": m["backend"], "load_average": load_average(),
                      "_measurement": m}
    g, o = rows["llama.cpp Q4_K_M"], rows["onnxruntime int4"]
    return {"rows": rows, "onnx_over_llama_decode": o["decode_tokens_per_s"]["p50"] / g["decode_tokens_per_s"]["p50"],
            "onnx_over_llama_ttft": o["ttft_ms"]["p50"] / g["ttft_ms"]["p50"],
            "onnx_parity_vs_torch": arts["onnx_export"].get("parity")}


def section_c(arts: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Decode efficiency of both artifacts against bandwidth measured now."""
    from edgepack.export.gate.bandwidth import artifact_efficiency, machine_bandwidth

    log("(c) measuring memory bandwidth")
    bw = machine_bandwidth(refresh=True)
    out = {"bandwidth": {k: bw[k] for k in ("read_gb_s", "read", "read_single_thread", "copy_gb_s", "threads",
                                            "array_mb", "repeats", "method", "load_average")}}
    for name, path, fmt in (("llama.cpp Q4_K_M", arts["q4_k_m"], "gguf"), ("onnxruntime int4", arts["onnx_int4"], "onnx")):
        out[name] = artifact_efficiency(path, fmt, b["rows"][name]["_measurement"], bw)
    gguf = out["llama.cpp Q4_K_M"]["efficiency"]
    out["gguf_target"] = {"target": EFFICIENCY_TARGET, "efficiency": gguf, "met": gguf >= EFFICIENCY_TARGET}
    return out


def section_d(arts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The same artifact through run_gate three times; spread of its latency numbers."""
    from edgepack.profiles import load_profile
    from edgepack.export.gate.gate import run_gate

    import dataclasses

    profile = load_profile(args.profile)
    if args.threads != profile.threads:  # --threads overrides the profile here too, and says so
        profile = dataclasses.replace(profile, threads=args.threads)
    runs = []
    for i in range(args.stability_runs):
        log(f"(d) gate {i + 1}/{args.stability_runs} on {profile.name}")
        r = run_gate(artifact=arts["q4_k_m"], profile=profile, holdout=None)
        m = r["measurements"]
        runs.append({"verdict": r["verdict"], "ttft_p95_ms": m["ttft_ms"]["p95"],
                     "decode_p50": m["decode_tokens_per_s"]["p50"], "peak_rss_mb": m["peak_rss_mb"],
                     "efficiency": (r.get("efficiency") or {}).get("efficiency"),
                     "load_average_at_start": r["host"]["load_average_at_start"]})
    ttft, dec = stats([r["ttft_p95_ms"] for r in runs]), stats([r["decode_p50"] for r in runs])
    return {"profile": profile.name, "threads": profile.threads, "runs": runs, "ttft_p95_ms": ttft,
            "decode_tokens_per_s": dec, "target": "every run within ±10% of the mean",
            "within_target": max(ttft["max_dev_from_mean_percent"], dec["max_dev_from_mean_percent"]) <= 10.0,
            "verdicts": sorted({r["verdict"] for r in runs})}


def machine() -> dict[str, Any]:
    from edgepack.export.gate.gate import machine_info

    info = machine_info()
    info["load_average_start"] = load_average()
    return info


# --- report ----------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m, a, b, c, d = res["machine"], res["a"], res["b"], res["c"], res["d"]
    s = res["settings"]
    lines = [f"# Gate and runtime benchmark ({res.get('model', 'builtin:smollm2-135m-instruct')})", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_mb']} MB, {m['system']} {m['release']}; "
             f"Python {m['python']}, llama-cpp-python {m['llama-cpp-python']}, onnxruntime {m['onnxruntime']}.",
             f"Load average (1/5/15 min): start {m['load_average_start']}, end {res['load_average_end']}"
             + (". Other processes shared these cores; numbers from a busy machine are noisy." if
                max(m["load_average_start"][0], res["load_average_end"][0]) > 2.5 else
                " (no other heavy job: the measurements themselves keep the 1-minute load near 2)."), "",
             f"Settings: threads {s['threads']}, n_ctx {s['n_ctx']}, prompt {s['prompt_tokens']} tokens, "
             f"{s['decode_tokens']} decoded tokens, {s['runs']} timed runs after 1 warm-up per measurement; "
             f"each measurement in a fresh process. Started {res['started']}, took {res['elapsed_s']:.0f} s "
             f"(artifact builds: {res['build_timings_s'] or 'cached'}).", "",
             "## (a) Gate measurement vs raw llama-cpp-python (Q4_K_M)", "",
             "| pair | order | gate decode tok/s (p50) | raw decode tok/s (median) | gate TTFT ms | raw TTFT ms | load avg |",
             "|---|---|---:|---:|---:|---:|---|"]
    for i, p in enumerate(a["pairs"], 1):
        lines.append(f"| {i} | {' then '.join(p['order'])} | {p['gate_decode_p50']:.1f} | {p['raw_decode_median']:.1f} | {p['gate_ttft_p50']:.1f} | "
                     f"{p['raw_ttft_median']:.1f} | {p['load_average']} |")
    sp = a["same_process"]
    lines += ["", f"Gate / raw (separate processes, median of pair medians) = {a['gate_over_raw']:.3f} "
                  f"({a['difference_percent']:+.1f}%); target {a['target']}: "
                  f"**{'met' if a['within_target'] else 'not met'}**.",
              f"Same process, same loaded model, {len(sp['raw']['samples'])} alternating runs each: edgepack's "
              f"`generate` {sp['wrapper']['median']:.1f} tok/s vs llama-cpp-python's {sp['raw']['median']:.1f} tok/s "
              f"(medians), ratio {sp['wrapper_over_raw']:.3f} ({sp['difference_percent']:+.1f}%): "
              f"**{'within' if sp['within_target'] else 'outside'} 5%**.", "",
              "## (b) ONNX int4 vs llama.cpp Q4_K_M", "",
              "| runtime | artifact | size MB | load s | TTFT p50 ms | TTFT p95 ms | decode p50 tok/s | decode stdev | "
              "peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in b["rows"].items():
        lines.append(f"| {name} | {r['artifact']} | {r['size_mb']:.1f} | {r['load_s']:.2f} | {r['ttft_ms']['p50']:.1f} | "
                     f"{r['ttft_ms']['p95']:.1f} | {r['decode_tokens_per_s']['p50']:.1f} | "
                     f"{r['decode_tokens_per_s']['stdev']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += [f"\nNote ({name}): {r['note']}." for name, r in b["rows"].items() if r.get("note")]
    parity = b.get("onnx_parity_vs_torch") or {}
    zps = res["artifacts"]["onnx_int4"]["matmulnbits_zero_points"]
    lines += ["", f"ONNX / llama.cpp: decode {b['onnx_over_llama_decode']:.2f}×, TTFT {b['onnx_over_llama_ttft']:.2f}×. "
                  f"ONNX int4 parity vs PyTorch at export: top-1 agreement {parity.get('top1_agreement_vs_torch')}, "
                  f"max |logit diff| {parity.get('max_abs_diff_vs_torch')}. MatMulNBits zero points by storage: "
                  f"{zps} (onnxruntime's packed 4-bit CPU GEMM takes uint8 zero points; with float ones it "
                  "would dequantize the whole weight to fp32 on every call).", "",
              "## (c) Decode efficiency vs measured memory bandwidth", "",
              f"Bandwidth: {c['bandwidth']['read_gb_s']:.2f} GB/s read ({c['bandwidth']['method']}); single thread "
              f"{c['bandwidth']['read_single_thread']['best']:.2f} GB/s; copy {c['bandwidth']['copy_gb_s']:.2f} GB/s. "
              f"Samples: {c['bandwidth']['read']['samples']}.", "",
              "| runtime | decode tok/s | MiB read per token | achieved GB/s | efficiency | bandwidth bound tok/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in b["rows"]:
        e = c[name]
        lines.append(f"| {name} | {e['decode_tokens_per_s']:.1f} | {e['bytes_per_token'] / 2**20:.1f} | "
                     f"{e['achieved_gb_s']:.2f} | {100 * e['efficiency']:.1f}% | {e['bound_tokens_per_s']:.0f} |")
    target = c.get("gguf_target")
    lines += ["", "Bytes per token: " + "; ".join(f"{n}: {c[n]['basis']}" for n in b["rows"]) + "."]
    if target:
        lines += ["", f"GGUF decode efficiency {100 * target['efficiency']:.1f}% of the measured bandwidth; target "
                      f"≥ {100 * target['target']:.0f}%: **{'met' if target['met'] else 'not met'}**."]
    lines += ["",
              f"## (d) Gate stability: Q4_K_M gated {len(d['runs'])} times on {d['profile']} "
              f"({d['threads']} threads)", "",
              "| run | verdict | TTFT p95 ms | decode p50 tok/s | peak RSS MB | efficiency | load avg at start |",
              "|---|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(d["runs"], 1):
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] is not None else "n/a"
        lines.append(f"| {i} | {r['verdict']} | {r['ttft_p95_ms']:.1f} | {r['decode_p50']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{eff} | {r['load_average_at_start']} |")
    lines += ["", f"TTFT p95: mean {d['ttft_p95_ms']['mean']:.1f} ms, stdev {d['ttft_p95_ms']['stdev']:.1f}, "
                  f"min {d['ttft_p95_ms']['min']:.1f}, max {d['ttft_p95_ms']['max']:.1f}, largest deviation "
                  f"{d['ttft_p95_ms']['max_dev_from_mean_percent']:.1f}%.",
              f"Decode p50: mean {d['decode_tokens_per_s']['mean']:.1f} tok/s, stdev {d['decode_tokens_per_s']['stdev']:.1f}, "
              f"min {d['decode_tokens_per_s']['min']:.1f}, max {d['decode_tokens_per_s']['max']:.1f}, largest deviation "
              f"{d['decode_tokens_per_s']['max_dev_from_mean_percent']:.1f}%.",
              f"Target {d['target']}: **{'met' if d['within_target'] else 'not met'}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from edgepack.profiles import load_profile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/gate/results.json"))
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="HF model folder, or builtin:smollm2-135m-instruct (default: the demo's student)")
    parser.add_argument("--work", type=Path, default=None, help="artifact cache (default $EDGEPACK_CACHE/bench-gate)")
    parser.add_argument("--profile", default="cpu-x86-2c", help="profile for (d) and the default settings")
    parser.add_argument("--threads", type=int, default=None, help="default: the profile's threads")
    parser.add_argument("--n-ctx", type=int, default=None, help="default: the profile's context_length")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: the profile's prompt_tokens")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=4, help="interleaved gate/raw pairs for (a)")
    parser.add_argument("--stability-runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per measurement in (b); past it, a 16-token probe stands in")
    args = parser.parse_args(argv)
    if not args.model.startswith("builtin:") and not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model} is not an HF model folder (run `make demo` for runs/demo/student, "
                     "or pass --model)")
    profile = load_profile(args.profile)
    args.threads = args.threads or profile.threads
    args.n_ctx = args.n_ctx or profile.context_length
    args.prompt_tokens = args.prompt_tokens or profile.prompt_tokens
    if args.work is None:
        from edgepack.runtime.session import cache_root

        args.work = cache_root() / "bench-gate"
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    command = " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable), *sys.argv])
    res: dict[str, Any] = {"command": command, "started": started, "machine": machine(),
                           "settings": {k: getattr(args, k) for k in ("threads", "n_ctx", "prompt_tokens",
                                                                       "decode_tokens", "runs", "pairs",
                                                                       "stability_runs", "profile")},
                           "model": args.model}
    arts = build_artifacts(args.work, args.model)
    res["build_timings_s"] = arts["build_timings_s"]
    res["artifacts"] = {"q4_k_m": {"path": str(arts["q4_k_m"]), "size_mb": size_mb(arts["q4_k_m"]),
                                   "tensor_types": arts["q4_k_m_report"].get("tensor_types")},
                        "onnx_int4": {"path": str(arts["onnx_int4"]), "size_mb": size_mb(arts["onnx_int4"]),
                                      "ops": arts["onnx_export"].get("ops"),
                                      "matmulnbits_zero_points": zero_point_types(arts["onnx_int4"])}}
    res["a"] = section_a(arts, args)
    res["b"] = section_b(arts, args)
    res["c"] = section_c(arts, res["b"])
    res["d"] = section_d(arts, args)
    for row in res["b"]["rows"].values():
        row.pop("_measurement")
    res["load_average_end"] = load_average()
    res["elapsed_s"] = time.perf_counter() - t0
    res["platform"] = platform.platform()
    write_json(args.out, res)
    write_text(args.out.with_suffix(".md"), markdown(res))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
