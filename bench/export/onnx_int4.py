"""ONNX weight-only quantization variants of one model: size, KLD, top-1, decode speed, accuracy.

    .venv/bin/python bench/export/onnx_int4.py --model runs/demo/student --out bench/export/onnx_int4.json

The study behind edgepack's ONNX int4 default (export/onnx/quantize.py). The model is
exported once to fp32 ONNX (optimum), then each variant is quantized from that graph with
:func:`edgepack.export.onnx.quantize.quantize_onnx` and measured:

* KLD (nats) and top-1 agreement vs the fp32 ONNX graph on the demo holdout (demo system
  prompt + prompt + reference answer), each distinct context once;
* decode tok/s: the onnx runtime backend, 128-token prompt, 64 tokens, best of 2 after a
  warm-up, ``--threads`` threads (in this process, unlike run.py's fresh-process numbers);
* holdout label accuracy (greedy, edgepack.export.gate.quality) when the variant is marked.

Writes ``--out`` (JSON) and the same name with ``.md``. Load averages are recorded per row:
on a shared machine the speed column is only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> (bits, options as OnnxQuantOptions kwargs, measure accuracy)
VARIANTS: dict[str, tuple[int, dict[str, Any], bool]] = {
    "int4 default (b32, zero points, acc4, head8, down/v int8)": (4, {}, True),
    "int4, head8 only": (4, {"int8_layers": ()}, True),
    "int4, head8 + down_proj int8": (4, {"int8_layers": ("down_proj",)}, True),
    "int4 everywhere (head4)": (4, {"int8_layers": (), "head_bits": 4}, True),
    "int4 symmetric": (4, {"symmetric": True}, False),
    "int4 block 128": (4, {"block_size": 128}, False),
    "int4 accuracy_level 0": (4, {"accuracy_level": 0}, False),
    "int8 default": (8, {}, True),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _decode_speed(folder: Path, threads: int) -> float:
    from edgepack.runtime.backends.onnxrt import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.load(folder, threads=threads, n_ctx=1024)
    prompt = backend.tokenize("Pump P-101 discharge pressure is low. " * 16)[:128]
    list(backend.generate(prompt, max_tokens=8, stop_at_eos=False))
    best = 0.0
    for _ in range(2):
        it = backend.generate(prompt, max_tokens=65, stop_at_eos=False)
        next(it)
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        best = max(best, n / (time.perf_counter() - t0))
    backend.close()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/student", help="HF dir or run dir")
    parser.add_argument("--out", type=Path, default=Path("bench/export/onnx_int4.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-prompts", type=int, default=24)
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/export/onnx_int4.py", *sys.argv[1:]])

    import numpy as np

    from edgepack.distill.data import DEMO_HOLDOUT, DEMO_SYSTEM_PROMPT
    from edgepack.export.api import resolve_source
    from edgepack.export.fidelity.metrics import LogitStats, fresh_starts
    from edgepack.export.fidelity.prompts import encode_row, load_rows
    from edgepack.export.onnx.convert import OnnxCausalLM, export_onnx
    from edgepack.export.onnx.quantize import OnnxQuantOptions, quantize_onnx
    from edgepack.runtime.backends.onnxrt import OnnxRuntimeBackend
    from edgepack.export.gate.gate import machine_info
    from edgepack.export.gate.quality import evaluate_holdout, load_holdout

    sys.path.insert(0, str(Path(__file__).parent))
    from run import _demo_rows, _write_jsonl  # noqa: E402  (same holdout rows as run.py)

    hf_dir, _, _ = resolve_source(Path(args.model))
    work = Path(tempfile.mkdtemp(prefix="edgepack-onnx-int4-"))
    rows_out: list[dict[str, Any]] = []
    try:
        holdout = _write_jsonl(work / "holdout.jsonl", _demo_rows(DEMO_HOLDOUT, DEMO_SYSTEM_PROMPT))
        fp32 = work / "fp32"
        _log("export fp32")
        export_onnx(hf_dir, fp32, quant="fp32")
        from edgepack.export.fidelity.prompts import load_tokenizer

        tok = load_tokenizer(fp32)
        seqs = [encode_row(tok, r, with_response=True, max_tokens=256)
                for r in load_rows(holdout, limit=args.max_prompts)]
        starts = fresh_starts(seqs)
        ref_model = OnnxCausalLM(fp32 / "model.onnx", threads=args.threads)
        refs = [ref_model.logits(s) for s in seqs]
        del ref_model
        labelled = load_holdout(holdout)
        backend = OnnxRuntimeBackend.load(fp32, threads=args.threads, n_ctx=1024)
        base_acc = evaluate_holdout(backend, labelled)["accuracy"]
        backend.close()
        rows_out.append({"variant": "fp32 (reference)", "size_mb": round((fp32 / "model.onnx").stat().st_size / 1e6, 1),
                         "kld": 0.0, "top1": 1.0, "decode_tok_s": round(_decode_speed(fp32, args.threads), 1),
                         "accuracy": base_acc, "load_1min": os.getloadavg()[0]})
        for name, (bits, kwargs, with_acc) in VARIANTS.items():
            _log(name)
            dst = work / f"v{len(rows_out)}"
            shutil.copytree(fp32, dst, ignore=shutil.ignore_patterns("model.onnx*"))
            t0 = time.perf_counter()
            ops = quantize_onnx(fp32 / "model.onnx", dst / "model.onnx", bits, OnnxQuantOptions(**kwargs))
            seconds = time.perf_counter() - t0
            model = OnnxCausalLM(dst / "model.onnx", threads=args.threads)
            stats = LogitStats()
            for ref, ids, start in zip(refs, seqs, starts):
                if start < len(ids):
                    stats.add(ref[start:], model.logits(ids)[start:])
            del model
            summary = stats.summary()
            row = {"variant": name, "bits": bits, "options": ops, "quantize_s": round(seconds, 1),
                   "size_mb": round((dst / "model.onnx").stat().st_size / 1e6, 1),
                   "kld": summary["kld_mean"], "top1": summary["top1_agreement"],
                   "decode_tok_s": round(_decode_speed(dst, args.threads), 1), "accuracy": None}
            if with_acc:
                backend = OnnxRuntimeBackend.load(dst, threads=args.threads, n_ctx=1024)
                row["accuracy"] = evaluate_holdout(backend, labelled)["accuracy"]
                backend.close()
            row["load_1min"] = os.getloadavg()[0]
            rows_out.append(row)
            _log(json.dumps({k: row[k] for k in ("variant", "size_mb", "kld", "top1", "decode_tok_s", "accuracy")}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": command, "model": args.model, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(), "threads": args.threads, "distinct_positions": sum(
                  len(s) - f for s, f in zip(seqs, starts)), "rows": rows_out}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [f"# ONNX weight-only quantization variants: {args.model}", "",
             f"Command: `{command}`  ", f"Created {result['created']}; machine {result['machine']}.  ",
             f"KLD / top-1 vs the fp32 ONNX graph over {result['distinct_positions']} distinct contexts of the demo "
             f"holdout; decode tok/s with {args.threads} threads in-process (best of 2); accuracy = holdout label "
             "accuracy (66 rows, greedy).", "",
             "| variant | size MB | KLD | top-1 | decode tok/s | accuracy | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"| {r['variant']} | {r['size_mb']} | {r['kld']:.4f} | {100 * r['top1']:.1f}% "
                     f"| {r['decode_tok_s']} | {acc} | {r['load_1min']:.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
