"""Does the importance matrix help this model? KLD with no imatrix, a seed-data imatrix, and one
computed on the evaluation text itself.

    .venv/bin/python bench/export/imatrix_ablation.py --model runs/demo/student --out bench/export/imatrix_ablation.json

The export benchmark (run.py) found that the importance matrix computed from the demo seed
data *raises* Q4_K_M's KLD on the holdout. This ablation separates the two explanations: a
calibration mismatch (then an imatrix computed on the holdout text itself, the most favourable
case possible, would help) or the model (then even that one does not). It also reports how
concentrated the importance is: the share of a tensor's total importance held by its largest
column (persistent outlier channels of the normalised hidden state).

Writes the JSON and a markdown table beside it (``.md``), with the command and the machine.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUANTS = ("Q4_0", "Q4_K_M")


def _concentration(path: Path) -> dict[str, float]:
    import numpy as np

    from edgepack.export.gguf.quantize import load_imatrix

    shares = sorted(float(np.max(v) / np.sum(v)) for v in map(np.asarray, load_imatrix(path).values()))
    return {"median_top_column_share": round(shares[len(shares) // 2], 4), "max_top_column_share": round(shares[-1], 4)}


def main() -> None:
    from run import _demo_rows, _write_jsonl  # bench/export/run.py: the same calibration and holdout text

    from edgepack.distill.data import DEMO_HOLDOUT, DEMO_SEED, DEMO_SYSTEM_PROMPT
    from edgepack.export.fidelity.report import fidelity_report
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.export.gguf.imatrix import build_imatrix
    from edgepack.export.gguf.quantize import quantize_gguf
    from edgepack.export.gate.gate import machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/student"))
    parser.add_argument("--out", type=Path, default=Path("bench/export/imatrix_ablation.json"))
    parser.add_argument("--max-prompts", type=int, default=24)
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    t0 = time.perf_counter()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="edgepack-imatrix-ablation-") as tmp:
        work = Path(tmp)
        texts = {"seed": _write_jsonl(work / "seed.jsonl", _demo_rows(DEMO_SEED, DEMO_SYSTEM_PROMPT)),
                 "holdout": _write_jsonl(work / "holdout.jsonl", _demo_rows(DEMO_HOLDOUT, DEMO_SYSTEM_PROMPT))}
        f16 = convert_hf_to_gguf(args.model, work / "student-F16.gguf", "F16")
        imatrices = {name: work / f"{name}.imatrix.gguf" for name in texts}
        for name, path in imatrices.items():
            build_imatrix(args.model, path, texts[name])
        artifacts: dict[Path, dict[str, Any]] = {}
        for q in QUANTS:
            artifacts[quantize_gguf(f16, work / f"student-{q}.gguf", q)] = {"quant": q, "imatrix": "none"}
            for name, path in imatrices.items():
                out = quantize_gguf(f16, work / f"student-{q}-{name}.gguf", q, imatrix=path)
                artifacts[out] = {"quant": q, "imatrix": name}
        report = fidelity_report(args.model, [f16, *artifacts], texts["holdout"], work / "report",
                                 max_prompts=args.max_prompts, max_tokens=256)
        load.append(os.getloadavg()[0])
        rows = []
        for entry in report["artifacts"]:
            meta = artifacts.get(Path(entry["path"]))
            if meta is not None:
                rows.append({**meta, "kld": entry["kld"], "top1": entry.get("top1"),
                             "kld_reference": entry.get("kld_reference")})
        concentration = {name: _concentration(path) for name, path in imatrices.items()}
    base = {r["quant"]: r["kld"] for r in rows if r["imatrix"] == "none"}
    for r in rows:
        r["kld_change_vs_none"] = round(r["kld"] / base[r["quant"]] - 1.0, 4)
    results = {"command": command, "machine": machine_info(), "model": str(args.model),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 1),
               "load_average_1min": {"start": load[0], "end": load[-1]},
               "evaluation": f"demo holdout, {args.max_prompts} sequences, KLD vs the F16 GGUF in llama.cpp",
               "rows": rows, "importance_concentration": concentration}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    md = [f"# Importance matrix ablation: {args.model}", "", f"Command: `{command}`  ",
          f"Machine: {results['machine'].get('cpu')} ({results['machine'].get('cpu_count')} logical CPUs); "
          f"load average {load[0]:.2f} → {load[-1]:.2f}; {results['seconds']} s.  ",
          f"Evaluation: {results['evaluation']}.", "",
          "| quant | imatrix from | KLD | change vs none | top-1 |", "|---|---|---:|---:|---:|"]
    md += [f"| {r['quant']} | {r['imatrix']} | {r['kld']:.5f} | {r['kld_change_vs_none']:+.1%} | "
           f"{r['top1']:.2%} |" if r.get("top1") is not None else
           f"| {r['quant']} | {r['imatrix']} | {r['kld']:.5f} | {r['kld_change_vs_none']:+.1%} | – |" for r in rows]
    md += ["", "Importance concentration (share of a tensor's total importance in its largest column, over "
               "all tensors): " + "; ".join(f"{k}: median {v['median_top_column_share']}, max "
                                             f"{v['max_top_column_share']}" for k, v in concentration.items())]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
