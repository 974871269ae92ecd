"""edgepack's ONNX backend vs onnxruntime-genai on the same int4 folder: TTFT and greedy decode tok/s.

    .venv/bin/python bench/onnx_genai/run.py --model runs/workorders/student --out bench/onnx_genai/results.json

``--model`` (an HF student folder) is exported to ONNX int4 with edgepack's defaults into a
temp folder; ``--onnx`` takes an exported folder instead (it needs ``genai_config.json``).
Both runtimes get the same prompt token ids and ``--threads`` intra-op threads (onnxruntime-genai
through a config overlay), decode ``--new-tokens`` greedy tokens without stopping at eos, one
warm-up then ``--repeats`` alternating runs; the best of each is reported, with every run.

* TTFT: from handing over the prompt ids to the first new token id being available. For
  onnxruntime-genai that is ``append_tokens`` (the prefill) plus the first
  ``generate_next_token``, which also runs the model on that token (it computes eagerly);
* decode tok/s: tokens 2..N over the time from the first to the last token.

Writes ``--out`` (JSON) and the same name with ``.md``. Load averages are recorded per run: on
a shared machine the speeds compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = ("Work order: Pump P-101 discharge pressure low alarm at 14:32, motor current normal, "
          "suction strainer last cleaned three months ago. Compressor C-12 tripped on high vibration, "
          "11.2 mm/s on the drive-end bearing. Hydraulic unit HPU-3 oil temperature high, 78 degrees C, "
          "cooler fan running. Flow transmitter FT-204 drifts by 3.5% against the reference meter. ")


def _edgepack_run(backend: Any, ids: list[int], new: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    stamps, out = [], []
    for tok in backend.generate(ids, max_tokens=new, stop_at_eos=False):
        stamps.append(time.perf_counter())
        out.append(int(tok))
    return _timing(t0, stamps, out)


def _genai_run(model: Any, og: Any, ids: list[int], new: int) -> dict[str, Any]:
    import numpy as np

    params = og.GeneratorParams(model)
    # min_length keeps eos from ending the run early (fixed-length timing, as stop_at_eos=False)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.array(ids, dtype=np.int32))
    stamps, out = [], []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    return _timing(t0, stamps, out)


def _timing(t0: float, stamps: list[float], out: list[int]) -> dict[str, Any]:
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"ttft_ms": (stamps[0] - t0) * 1000, "decode_tok_s": decode, "tokens": out,
            "load_avg_1m": os.getloadavg()[0]}


def _folder(args: argparse.Namespace, tmp: Path) -> Path:
    if args.onnx:
        return Path(args.onnx)
    from edgepack.export.onnx.convert import export_onnx

    return export_onnx(Path(args.model), tmp / "onnx-int4", quant="int4")["path"]


def measure(folder: Path, threads: int, prompt_tokens: int, new: int, repeats: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    from edgepack.runtime.backends.onnxrt import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.load(folder, threads=threads, n_ctx=prompt_tokens + new + 8)
    ids = (backend.tokenize(PROMPT * 8, add_special=False))[:prompt_tokens]
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    runs: dict[str, list[dict[str, Any]]] = {"edgepack": [], "onnxruntime-genai": []}
    for i in range(repeats + 1):  # run 0 is the warm-up, not kept
        order = ["edgepack", "onnxruntime-genai"] if i % 2 else ["onnxruntime-genai", "edgepack"]
        for name in order:
            r = _edgepack_run(backend, ids, new) if name == "edgepack" else _genai_run(model, og, ids, new)
            if i:
                runs[name].append(r)
    best = {name: {"ttft_ms": min(r["ttft_ms"] for r in rs),
                   "decode_tok_s": max(r["decode_tok_s"] for r in rs)} for name, rs in runs.items()}
    same = runs["edgepack"][0]["tokens"] == runs["onnxruntime-genai"][0]["tokens"]
    return {"prompt_tokens": len(ids), "new_tokens": new, "threads": threads, "repeats": repeats,
            "best": best, "same_greedy_tokens": same, "runs": runs}


def _markdown(result: dict[str, Any]) -> str:
    b = result["best"]
    lines = [
        "# edgepack ONNX backend vs onnxruntime-genai (same int4 folder)", "",
        f"Command: `{result['command']}`", "",
        f"Model: {result['model']}; {result['prompt_tokens']}-token prompt, {result['new_tokens']} greedy tokens, "
        f"{result['threads']} threads, best of {result['repeats']} after a warm-up; "
        f"{result['cpu_count']} CPUs, load average {result['load_avg_start']:.1f} at start. "
        f"onnxruntime {result['versions']['onnxruntime']}, onnxruntime-genai {result['versions']['onnxruntime-genai']}.",
        "", "| runtime | TTFT (ms) | decode tok/s |", "|---|---:|---:|",
    ]
    for name, row in b.items():
        lines.append(f"| {name} | {row['ttft_ms']:.1f} | {row['decode_tok_s']:.1f} |")
    lines += ["", f"Same greedy tokens: {'yes' if result['same_greedy_tokens'] else 'NO'}.", "",
              "Every run (TTFT ms / decode tok/s / 1-minute load average):", ""]
    for name, rs in result["runs"].items():
        cells = ", ".join(f"{r['ttft_ms']:.0f} / {r['decode_tok_s']:.1f} / {r['load_avg_1m']:.1f}" for r in rs)
        lines.append(f"- {name}: {cells}")
    loads = [r["load_avg_1m"] for rs in result["runs"].values() for r in rs]
    if max(loads) > (result["cpu_count"] or 1):
        lines += ["", f"The load average ({min(loads):.1f}-{max(loads):.1f}) exceeded the {result['cpu_count']} CPUs: "
                      "both runtimes shared the cores with other work, so only a large gap would mean anything."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF student folder (exported to ONNX int4 here)")
    src.add_argument("--onnx", help="an exported ONNX folder with genai_config.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/onnx_genai/results.json")
    args = ap.parse_args()
    import importlib.metadata as md

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = _folder(args, Path(tmp))
        result = measure(folder, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
    result = {"command": shlex.join([".venv/bin/python", *sys.argv]), "model": args.model or args.onnx,
              "cpu_count": os.cpu_count(), "load_avg_start": load,
              "versions": {p: md.version(p) for p in ("onnxruntime", "onnxruntime-genai")}, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
