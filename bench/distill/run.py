"""Distillation quality: the KD student vs an SFT-only student (and other variants), gap closed per metric.

    .venv/bin/python bench/distill/run.py --run runs/demo --methods sft --seeds 0

Takes a finished run (``make demo``'s ``runs/demo``: data, the corrected teacher and the KD
student trained with dense forward KL), trains each requested variant beside it with the same
data, student shape, steps and seed (``distill train --variant``), then runs ``edgepack eval``
with all of them: label accuracy, agreement with the teacher's labels, KL to the teacher and
cross-entropy on its answers, and the gap closed per metric, plus each training's wall time,
tokens/s and peak RSS. Methods: ``sft`` (cross-entropy on the teacher's text only), ``topk``
(cached top-32 soft labels + tail), ``sampled`` (16 importance-sampled tokens per position).
Variants of another seed than the main student's are trained as ``<method>-s<seed>``.

Writes ``results.json`` and ``results.md`` beside it (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from edgepack.runtime.gate import machine_info

METHODS = {  # name → (label, TrainConfig overrides)
    "sft": ("SFT-only (CE on teacher text)", {"divergence": "sft"}),
    "topk": ("KD top-32 + tail (cached)", {"soft_labels": True, "soft_k": 32}),
    "sampled": ("KD sampled, 16 per position (cached)", {"soft_labels": True, "soft_samples": 16,
                                                          "divergence": "sampled_forward_kl"}),
}
METRICS = ("label_accuracy", "teacher_label_agreement", "kl", "ce")


def main() -> None:
    from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
    from edgepack.distill.evaluate import evaluate_run
    from edgepack.distill.train import TrainConfig, train_student
    from edgepack.profiles import load_profile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--methods", default="sft")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("bench/distill/results.json"))
    args = parser.parse_args()
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    main_report = json.loads((args.run / STUDENT_DIR / TRAIN_REPORT).read_text())
    ident = main_report["identity"]
    profile = load_profile(ident["profile"])
    load = {"start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    variants: dict[str, tuple[str, int, dict[str, Any]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            label, overrides = METHODS[method]
            name = method if seed == ident["seed"] else f"{method}-s{seed}"
            config = TrainConfig(**{**ident["config"], **overrides})
            report = train_student(run_dir=args.run, profile=profile, student=ident["student"], steps=ident["steps"],
                                   seed=seed, config=config, variant=name)
            variants[name] = (label, seed, report)
    ev = evaluate_run(run_dir=args.run, variants=tuple(variants))
    load["end"] = os.getloadavg()[0]

    def row(method: str, seed: int, entry: dict[str, Any], gap: dict[str, Any] | None,
            train: dict[str, Any] | None) -> dict[str, Any]:
        return {"method": method, "seed": seed, **{m: entry.get(m) for m in METRICS}, "gap_closed": gap,
                **({k: train.get(k) for k in ("wall_s", "tokens_per_s", "peak_rss_mb", "steps", "mode")} if train else {})}

    rows = [row("undistilled", ident["seed"], ev["undistilled"], None, None),
            row("KD dense forward KL (online teacher)", ident["seed"], ev["distilled"], ev["gap_closed"], main_report)]
    rows += [row(label, seed, ev["variants"][name], ev["variants"][name]["gap_closed"], report)
             for name, (label, seed, report) in variants.items()]
    results = {"command": command, "machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "load_average": load, "seconds": round(time.perf_counter() - t0, 1), "run": str(args.run),
               "teacher": ev["teacher"], "holdout_rows": ev["holdout_rows"], "contamination": ev["contamination"],
               "steps": ident["steps"], "rows": rows,
               "note": "the KD dense row is the run's own student (trained by the pipeline); its wall time and "
                       "tokens/s are from that training"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [f"# Distillation: KD vs SFT-only on {args.run}", "", f"Command: `{command}`  ",
          f"Machine: {results['machine']['cpu']} ({results['machine']['cpu_count']} CPUs); load average "
          f"{load['start']:.2f} → {load['end']:.2f}; {results['seconds']} s. Holdout: {ev['holdout_rows']} rows, "
          f"contamination {ev['contamination']}; {ident['steps']} steps each.", "",
          "| method | seed | label acc. | teacher agreement | KL | CE | gap closed (acc / agree / KL / CE) | "
          "wall s | tokens/s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
          f"| teacher | – | {fmt(ev['teacher']['label_accuracy'])} | 1 | 0 | {fmt(ev['teacher']['ce'])} | – | – | – | – |"]
    for r in rows:
        gap = " / ".join(fmt((r["gap_closed"] or {}).get(m)) for m in METRICS) if r["gap_closed"] else "–"
        md.append(f"| {r['method']} | {r['seed']} | " + " | ".join(fmt(r[m]) for m in METRICS)
                  + f" | {gap} | {fmt(r.get('wall_s'))} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('peak_rss_mb'))} |")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
