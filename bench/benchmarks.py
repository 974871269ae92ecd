"""BENCHMARKS.md from the committed benchmark results, with PNG plots.

    .venv/bin/python bench/benchmarks.py [--pipeline runs/demo/pipeline.json]

reads every ``bench/<name>/results*.json`` (each written by ``bench/<name>/run.py``, which
records the machine and the exact command in it), copies the stage table of a finished
``edgepack pipeline`` run (``--pipeline``) into ``bench/pipeline/results.json`` so it is
committed too, and writes ``BENCHMARKS.md`` plus the plots under ``bench/plots/``. Nothing
is measured here: every number is one a results file recorded, and every table names the
machine and the command that produced it. A results file not there yet is reported as
"not yet run"; a section whose file has a layout this script does not know is shown as
recorded (its scalar fields and flat tables), never guessed into a chart.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # benchmarks_doc.py beside this script (bench/ is not a package)

from benchmarks_doc import (NOT_RUN, Doc, _flat_table, _name, _num, _rows_with, as_recorded,  # noqa: E402
                            load, provenance, table)


def section_distill(doc: Doc, distill: dict[str, Any] | None) -> None:
    doc.add("## Distillation quality (gap closed per metric, KD vs SFT)")
    if distill is None:
        doc.add(f"*{NOT_RUN}*: `bench/distill/results.json` does not exist yet (the distillation benchmark of "
                "issue #4: undistilled / SFT-only / KD variants over 3 seeds).")
        return
    doc.add(provenance(distill))
    rows = [r for r in _rows_with(distill, "gap_closed") if isinstance(r["gap_closed"], dict)]
    if not rows:
        doc.add("No `gap_closed` figures in the results; shown as recorded:", *as_recorded(distill))
        return
    by_method: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for metric, value in r["gap_closed"].items():
            if isinstance(value, (int, float)):
                by_method.setdefault(_name(r), {}).setdefault(metric, []).append(float(value))
    metrics = list(dict.fromkeys(m for per in by_method.values() for m in per))
    doc.add("Gap closed = (student − undistilled) / (teacher − undistilled) per metric, mean over the rows "
            "recorded for each method (n = rows):",
            table(["method", *metrics, "n"], [[m, *[statistics.mean(per[k]) if k in per else None for k in metrics],
                                               max(len(v) for v in per.values())] for m, per in by_method.items()]))
    targets = (distill.get("summary") or {}).get("targets") or {}
    verdict = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    for key, t in targets.items():
        label = ((distill["summary"].get("methods") or {}).get(key) or {}).get("label", key)
        doc.add(f"Targets for {label} (issue #4, seeds {', '.join(map(str, t.get('seeds') or []))}): beats SFT-only "
                f"on holdout KL and CE in every seed {verdict(t.get('beats_sft_every_seed'))}; closes ≥ 50% of the "
                f"gap on teacher agreement and label accuracy in every seed {verdict(t.get('closes_gap_every_seed'))}; "
                f"≤ 60% of the teacher's parameters {verdict(t.get('params_ok'))} ({t.get('params_ratio', 0):.0%}).")

    def draw(ax: Any) -> None:
        width = 0.8 / max(1, len(by_method))
        for i, (method, per) in enumerate(by_method.items()):
            ax.bar([j + i * width for j in range(len(metrics))],
                   [statistics.mean(per[k]) if k in per else 0 for k in metrics], width, label=method)
        ax.set_xticks([j + width * (len(by_method) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="target 0.5")
        ax.set_ylabel("gap closed")
        ax.set_title("Distillation: gap closed per metric")
        ax.legend(fontsize=8)

    doc.image("distill_gap_closed.png", "gap closed per metric and method", draw)


def section_on_policy(doc: Doc, runs: list[dict[str, Any]]) -> None:
    """bench/distill/results-<domain>.json: off- vs on-policy KD scored by the task's primary metric (issue #19)."""
    doc.add("## On-policy vs off-policy distillation (task score on the holdout)")
    runs = [r for r in runs if (r.get("summary") or {}).get("on_policy_targets")]
    if not runs:
        doc.add(f"*{NOT_RUN}*: no `bench/distill/results-*.json` with on-policy methods (issue #19).")
        return
    verdict = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    for r in runs:
        metric = (r.get("task") or {}).get("primary_metric", "primary")
        teacher = r["teacher"].get("primary")
        methods = r["summary"]["methods"]
        body = [[m["label"], ", ".join(map(str, m["seeds"])),
                 *[(m.get(k) or {}).get(stat) for k in ("primary", "kl") for stat in ("mean", "min", "max")],
                 (m.get("wall_s") or {}).get("mean")] for m in methods.values()]
        shown = _num(teacher, ".3f")
        doc.add(f"**{r['run']}** ({r['steps']} steps per student, teacher {metric} {shown}). " + provenance(r),
                table(["method", "seeds", f"{metric} mean", "min", "max", "KL mean", "min", "max", "train wall s"],
                      body))
        targets = r["summary"]["on_policy_targets"]
        lines = []
        for key, t in targets.items():
            if key == "best":
                lines.append(f"best method ({methods[t['method']]['label']}) keeps {t['retained']:.3f} of the "
                             f"teacher's {metric} (target ≥ 0.92 at ≤ 60% of its parameters) {verdict(t['met'])}")
            else:
                wins = sum(t["wins_over_off_policy"].values())
                lines.append(f"{methods[key]['label']} beats off-policy dense KD in {wins} of "
                             f"{len(t['wins_over_off_policy'])} seeds (target ≥ 2) {verdict(t['met'])}")
                if "wins_at_equal_wall" in t:
                    same = sum(t["wins_at_equal_wall"].values())
                    lines.append(f"at the same wall clock, in {same} of {len(t['wins_at_equal_wall'])} seeds "
                                 f"{verdict(t['met_at_equal_wall'])}")
        doc.add("Targets (issue #19): " + "; ".join(lines) + ".")


TRAINING_METRICS = (("tokens_per_s", "tokens/s"), ("tokens_per_s_incl_cache", "tokens/s incl. soft-label cache share"),
                    ("tokens_per_s_after_step1", "tokens/s after step 1"),
                    ("peak_rss_mb", "peak RSS MB"), ("training_peak_rss_mb", "training peak RSS MB"))


def section_training(doc: Doc, trl: dict[str, Any] | None, distill: dict[str, Any] | None) -> None:
    """bench/trl (edgepack's KD recipe vs TRL's trainers, each pair naming the TRL trainer it is
    measured ``against``); else rows of bench/distill with tokens/s."""
    doc.add("## Training throughput and memory vs TRL")
    summary = (trl or {}).get("summary") or {}
    means = summary.get("means") or {}
    baselines = [k for k in means if k.startswith("trl")]
    if trl is not None and baselines and "versus_trl" in summary:
        kinds = [k for k in means if k not in baselines] + baselines
        keys = [(k, label) for k, label in TRAINING_METRICS if all(k in means[kind] for kind in kinds)]
        targets = []
        for kind, cmp in summary["versus_trl"].items():
            against = cmp.get("against", "trl")
            targets.append(f"{kind} ({summary['modes'][kind]}) vs {against}: tokens/s ≥ {summary['target_speedup']}× "
                           f"**{'met' if cmp['meets_speedup'] else 'not met'}** ({cmp['speedup']}×), peak memory ≤ "
                           f"{summary['target_memory_ratio']}× **{'met' if cmp['meets_memory'] else 'not met'}** "
                           f"({cmp['memory_ratio']}×).")
        trainers = summary.get("trl_trainers") or {}
        doc.add(provenance(trl) + f" {trl.get('steps')} steps, {trl.get('threads')} threads, means over "
                f"{len(next(iter(summary['versus_trl'].values()))['per_round'])} rounds."
                + (" TRL trainers: " + "; ".join(f"{k} = {v}" for k, v in trainers.items()) + "." if trainers else ""),
                table(["trainer", *[label for _, label in keys]],
                      [[kind, *[means[kind][k] for k, _ in keys]] for kind in kinds]
                      + [[f"{kind} / {cmp.get('against', 'trl')}", *[cmp["ratio_of_means"].get(k) for k, _ in keys]]
                         for kind, cmp in summary["versus_trl"].items()]),
                "Targets: " + " ".join(targets))

        def draw(ax: Any) -> None:
            shown = [(k, label) for k, label in keys if k in ("tokens_per_s", "peak_rss_mb")]
            width = 0.8 / len(kinds)
            for i, kind in enumerate(kinds):
                ax.bar([j + width * i for j in range(len(shown))],
                       [means[kind][k] / max(means[x][k] for x in kinds) for k, _ in shown], width, label=kind)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shown))], [label for _, label in shown])
            ax.set_ylabel("relative to the largest")
            ax.set_title("edgepack KD vs TRL (same job)")
            ax.legend(fontsize=8)

        doc.image("training_vs_trl.png", "training tokens/s and peak memory, edgepack vs TRL", draw, size=(5.6, 3.4))
        return
    speed = [r for r in _rows_with(distill or {}, "tokens_per_s")
             if any(k in r for k in ("peak_rss_mb", "peak_memory_mb"))]
    if not speed:
        doc.add(f"*{NOT_RUN}*: neither `bench/trl/results.json` nor training rows in `bench/distill/results.json`.")
        return
    trl_row = next((r for r in speed if "trl" in _name(r).lower()), None)
    body = []
    for r in speed:
        peak = r.get("peak_rss_mb", r.get("peak_memory_mb"))
        trl_peak = trl_row.get("peak_rss_mb", trl_row.get("peak_memory_mb")) if trl_row else None
        body.append([_name(r), r.get("seed"), r["tokens_per_s"], peak,
                     r["tokens_per_s"] / trl_row["tokens_per_s"] if trl_row and trl_row.get("tokens_per_s") else None,
                     peak / trl_peak if trl_peak and isinstance(peak, (int, float)) else None])
    doc.add(provenance(distill or {}),
            table(["run", "seed", "tokens/s", "peak MB", "× TRL tokens/s", "× TRL peak"], body),
            "" if trl_row else "No TRL row (a run named `trl…`) in the results: ratios not computed.")

    def draw(ax: Any) -> None:
        ax.barh([b[0] + (f" s{b[1]}" if b[1] is not None else "") for b in body], [b[2] for b in body])
        ax.set_xlabel("training tokens/s")
        ax.set_title("Training throughput")

    doc.image("distill_throughput.png", "training tokens/s per run", draw)


def section_generation(doc: Doc, gen: dict[str, Any] | None) -> None:
    doc.add("## Teacher generation throughput")
    if gen is None:
        doc.add(f"*{NOT_RUN}*: `bench/generation/results.json` does not exist yet (teacher generation through "
                "the toolchain vs raw llama-cpp-python on the same GGUF, issue #3).")
        return
    doc.add(provenance(gen))
    sides = [(name, gen[key]) for name, key in (("edgepack", "edgepack_tok_s"), ("raw llama-cpp-python", "raw_tok_s"))
             if isinstance(gen.get(key), dict)]
    if sides and isinstance(gen.get("ratio"), dict):
        doc.add(table(["side", "tokens/s median", "min", "max", "n"],
                      [[n, s.get("median"), s.get("min"), s.get("max"), s.get("n")] for n, s in sides]),
                f"edgepack / raw (median of the per-round ratios): {gen['ratio'].get('median')}; target ≥ "
                f"{gen.get('target')}: **{gen.get('verdict', 'not judged')}**. Same answers: {gen.get('same_answers')}.")
    rounds = _flat_table(gen["rounds"]) if isinstance(gen.get("rounds"), list) and gen["rounds"] else None
    doc.add(*([rounds] if rounds and sides else as_recorded(gen)))


QUANT_PAIRS = (("float", ("F32",), ("fp32",)), ("8-bit", ("Q8_0",), ("int8",)), ("4-bit", ("Q4_K_M", "Q4_0"), ("int4",)))


def section_export(doc: Doc, export: dict[str, Any] | None) -> None:
    doc.add("## Quantization fidelity per type (GGUF and ONNX)")
    if export is None:
        doc.add(f"*{NOT_RUN}*: `bench/export/results.json` does not exist.")
        return
    rows = export.get("results", [])
    doc.add(provenance(export),
            f"Reference: {(export.get('reference') or {}).get('note', 'not recorded')}. KLD = mean KL(reference ‖ "
            "artifact) in nats over distinct contexts of the held-out text; the reference is the F16 GGUF for quantized "
            "GGUFs (llama-perplexity's convention) and transformers float32 for the float GGUFs and every ONNX graph. "
            "Bits/weight = file bytes × 8 / parameters.",
            table(["artifact", "format", "quant", "imatrix", "size MB", "bits/weight", "KLD", "KLD vs", "top-1",
                   "decode tok/s", "holdout accuracy"],
                  [[r.get("artifact"), r.get("format"), r.get("quant"), r.get("imatrix"), r.get("size_mb"),
                    r.get("bits_per_weight"), r.get("kld"), r.get("kld_reference"), r.get("top1"),
                    r.get("decode_tok_s"), r.get("accuracy")] for r in rows], right={4, 5, 6, 8, 9, 10}))
    plain = {(r.get("format"), r.get("quant")): r for r in rows if not r.get("imatrix")}
    side = []
    for label, gguf_quants, onnx_quants in QUANT_PAIRS:
        for gq in gguf_quants:
            g = plain.get(("gguf", gq))
            o = next((plain[("onnx", q)] for q in onnx_quants if ("onnx", q) in plain), None)
            if g or o:
                side.append([label, gq, _num((g or {}).get("size_mb"), ".1f"), _num((g or {}).get("kld"), ".4f"),
                             onnx_quants[0], _num((o or {}).get("size_mb"), ".1f"), _num((o or {}).get("kld"), ".4f")])
    if side:
        doc.add("Side by side (same student, no imatrix):",
                table(["class", "GGUF", "MB", "KLD", "ONNX", "MB", "KLD"], side, right={2, 3, 5, 6}))

    def draw(ax: Any) -> None:
        # Float artifacts (KLD ~1e-6 and below, 2-4x the size) would squash the quantized ones
        # into a corner; they are in the table above.
        quantized = [r for r in rows if isinstance(r.get("kld"), (int, float)) and r["kld"] > 0 and r.get("size_mb")
                     and (r.get("bits_per_weight") or 99) < 12]
        offsets = [(4, 4), (4, -10), (-34, 4), (-34, -10)]
        for fmt, imatrix, marker, face in (("gguf", False, "o", None), ("gguf", True, "o", "none"),
                                           ("onnx", False, "s", None)):
            pts = [r for r in quantized if r.get("format") == fmt and bool(r.get("imatrix")) == imatrix]
            if not pts:
                continue
            label = fmt.upper() + (" + imatrix" if imatrix else "")
            kwargs = {"facecolors": "none", "edgecolors": "C0"} if face == "none" else {}
            ax.scatter([r["size_mb"] for r in pts], [r["kld"] for r in pts], marker=marker, label=label, **kwargs)
            for i, r in enumerate(pts if not imatrix else []):
                ax.annotate(r["quant"], (r["size_mb"], r["kld"]), fontsize=7, xytext=offsets[i % len(offsets)],
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("KLD vs reference (nats, log)")
        ax.set_title("Quantization fidelity: KLD vs size (quantized artifacts)")
        ax.legend(fontsize=8)

    doc.image("quant_kld_vs_size.png", "KLD vs size, GGUF and ONNX", draw)
    targets = export.get("targets") or []
    if targets:
        doc.add("Targets (reported, not enforced):",
                table(["target", "measured", "met"], [[t.get("target"), t.get("measured"), t.get("met")]
                                                       for t in targets], right={1}))


def gate_files(bench: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in sorted((bench / "gate").glob("results*.json"))]


def section_efficiency(doc: Doc, gates: list[tuple[str, dict[str, Any]]]) -> None:
    doc.add("## Runtime decode efficiency vs measured memory bandwidth")
    if not gates:
        doc.add(f"*{NOT_RUN}*: no `bench/gate/results*.json`.")
        return
    doc.add("Efficiency = decode tokens/s × bytes read per token ÷ this machine's measured read bandwidth "
            "(issue #6 target for the GGUF student: ≥ 0.6).")
    bars = []
    for name, g in gates:
        c = g.get("c") or {}
        bw = c.get("bandwidth") or {}
        threads = (g.get("settings") or {}).get("threads")
        rows = [[rt, e.get("decode_tokens_per_s"), (e.get("bytes_per_token") or 0) / 2**20, e.get("achieved_gb_s"),
                 e.get("efficiency"), e.get("bound_tokens_per_s")]
                for rt, e in c.items() if isinstance(e, dict) and "efficiency" in e]
        doc.add(f"`bench/gate/{name}` ({threads} threads). " + provenance(g),
                f"Bandwidth: {_num(bw.get('read_gb_s'), '.2f')} GB/s read ({bw.get('method', 'method not recorded')}).",
                table(["runtime", "decode tok/s", "MiB read/token", "achieved GB/s", "efficiency", "bound tok/s"],
                      [[*r[:4], _num(100 * r[4], ".1f") + "%" if isinstance(r[4], (int, float)) else None, r[5]]
                       for r in rows]))
        bars += [(f"{r[0]} ({threads}t)", r[4]) for r in rows if isinstance(r[4], (int, float))]
        b = g.get("b") or {}
        side = [[rt, r.get("artifact"), r.get("size_mb"), (r.get("ttft_ms") or {}).get("p95"),
                 (r.get("decode_tokens_per_s") or {}).get("p50"), r.get("peak_rss_mb"), r.get("note")]
                for rt, r in (b.get("rows") or {}).items()]
        if side:
            doc.add("ONNX int4 vs llama.cpp Q4_K_M, same model:",
                    table(["runtime", "artifact", "size MB", "TTFT p95 ms", "decode tok/s", "peak RSS MB", "note"],
                          side, right={2, 3, 4, 5}))

    def draw(ax: Any) -> None:
        ax.barh([b[0] for b in bars], [100 * b[1] for b in bars])
        ax.axvline(60, color="grey", linestyle="--", linewidth=1, label="target 60% (GGUF)")
        ax.set_xlabel("decode efficiency (% of measured bandwidth)")
        ax.set_title("Decode efficiency")
        ax.legend(fontsize=8)

    if bars:
        doc.image("decode_efficiency.png", "decode efficiency per runtime", draw, size=(6.4, 3.2))


def section_stability(doc: Doc, gates: list[tuple[str, dict[str, Any]]]) -> None:
    doc.add("## Gate stability over repeated runs")
    runs = [(name, g, g["d"]) for name, g in gates if isinstance(g.get("d"), dict) and g["d"].get("runs")]
    if not runs:
        doc.add(f"*{NOT_RUN}*: no repeated gates in `bench/gate/results*.json`.")
        return
    for name, g, d in runs:
        doc.add(f"`bench/gate/{name}`: the same artifact gated {len(d['runs'])} times on {d.get('profile')} "
                f"({d.get('threads')} threads). " + provenance(g),
                table(["run", "verdict", "TTFT p95 ms", "decode p50 tok/s", "peak RSS MB", "load avg at start"],
                      [[i + 1, r.get("verdict"), r.get("ttft_p95_ms"), r.get("decode_p50"), r.get("peak_rss_mb"),
                        r.get("load_average_at_start")] for i, r in enumerate(d["runs"])], right={2, 3, 4}))
        spread = [[metric, s.get("mean"), s.get("stdev"), s.get("min"), s.get("max"), s.get("max_dev_from_mean_percent")]
                  for metric in ("ttft_p95_ms", "decode_tokens_per_s") if isinstance(s := d.get(metric), dict)]
        doc.add(table(["metric", "mean", "stdev", "min", "max", "largest deviation %"], spread),
                f"Target: {d.get('target', 'not recorded')}: **{'met' if d.get('within_target') else 'not met'}**.")

    def draw(ax: Any) -> None:
        n = max(len(d["runs"]) for _, _, d in runs)
        ax.axhspan(-10, 10, color="grey", alpha=0.15, label="±10% target")
        for name, _, d in runs:
            for key, label in (("decode_p50", "decode tok/s"), ("ttft_p95_ms", "TTFT p95")):
                values = [r.get(key) for r in d["runs"]]
                if any(v is None for v in values):
                    continue
                mean = statistics.mean(values)
                ax.plot(range(1, len(values) + 1), [100 * (v / mean - 1) for v in values], marker="o",
                        label=f"{label}, {name}")
        ax.set_xticks(range(1, n + 1))
        ax.set_xlabel("gate run")
        ax.set_ylabel("deviation from the mean (%)")
        ax.set_title("Gate stability: repeated gates of one artifact")
        ax.legend(fontsize=7)

    doc.image("gate_stability.png", "decode tok/s over repeated gates", draw, size=(6.4, 3.4))


def section_scale(doc: Doc, scale: dict[str, Any] | None) -> None:
    """bench/scale: cost against model size (random-init SmolLM2-shaped students), with one plot."""
    doc.add("## Cost vs model size")
    sizes = list(((scale or {}).get("sizes") or {}).values())
    if not sizes:
        doc.add(f"*{NOT_RUN}*: `bench/scale/results.json` (issue #18: training, soft labels, export and decode "
                "of random-init students at about 135M, 360M and 1B parameters).")
        return
    assert scale is not None
    sizes.sort(key=lambda r: r["params"])
    doc.add(provenance(scale) + f" {scale.get('threads')} torch thread(s); decoding with the gate's measurement on "
            f"{scale.get('gate_threads')} llama.cpp threads (and on 1). Every number is in `bench/scale/results.md`.",
            table(["size", "params", "soft labels s/1k tokens", "train tokens/s", "plan", "planned peak MB",
                   "measured peak MB", "measured / planned", "HF→F16 s", "→Q4_K_M s", "decode tok/s",
                   "efficiency", "decode tok/s (1 thread)", "efficiency (1 thread)"],
                  [[r["size"], f"{r['params'] / 1e6:.1f}M", r["softlabels"]["s_per_1k_answer_tokens"],
                    r["train"]["tokens_per_s"], f"{r['train']['plan']['method']}, mb {r['train']['plan']['micro_batch']}"
                    + (", checkpointing" if r["train"]["plan"].get("checkpointing") else ""),
                    r["train"]["planned_peak_mb"], r["train"]["measured_peak_mb"], r["train"]["measured_over_planned"],
                    r["export"]["convert_f16_s"], r["export"]["quantize_q4_k_m_s"],
                    (r.get("decode") or {}).get("decode_tokens_per_s"), (r.get("decode") or {}).get("efficiency"),
                    (r.get("decode_1_thread") or {}).get("decode_tokens_per_s"),
                    (r.get("decode_1_thread") or {}).get("efficiency")] for r in sizes],
                  right=set(range(1, 14)) - {4}),
            "\n".join(scale.get("findings") or []))
    x = [r["params"] / 1e6 for r in sizes]

    def draw(ax: Any) -> None:
        fig = ax.figure
        ax.remove()
        panels = fig.subplots(2, 3).ravel()
        series = [("training tokens/s", [("KD, cached soft labels", [r["train"]["tokens_per_s"] for r in sizes])]),
                  ("training peak MB", [("measured", [r["train"]["measured_peak_mb"] for r in sizes]),
                                        ("planned", [r["train"]["planned_peak_mb"] for r in sizes])]),
                  ("soft labels: s per 1k tokens", [("teacher = same size", [r["softlabels"]["s_per_1k_answer_tokens"]
                                                                             for r in sizes])]),
                  ("export seconds", [("HF→F16", [r["export"]["convert_f16_s"] for r in sizes]),
                                      ("F16→Q4_K_M", [r["export"]["quantize_q4_k_m_s"] for r in sizes])]),
                  ("decode tokens/s (Q4_K_M)", [("2 threads", [(r.get("decode") or {}).get("decode_tokens_per_s")
                                                               for r in sizes]),
                                                ("1 thread", [(r.get("decode_1_thread") or {}).get("decode_tokens_per_s")
                                                              for r in sizes])]),
                  ("decode efficiency", [("2 threads", [(r.get("decode") or {}).get("efficiency") for r in sizes]),
                                         ("1 thread", [(r.get("decode_1_thread") or {}).get("efficiency")
                                                       for r in sizes])])]
        for panel, (title, lines) in zip(panels, series):
            for label, ys in lines:
                pts = [(a, b) for a, b in zip(x, ys) if isinstance(b, (int, float))]
                panel.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            panel.set_xscale("log")
            panel.minorticks_off()
            panel.set_xticks(x, [f"{v:.0f}M" for v in x])
            panel.set_title(title, fontsize=9)
            panel.set_xlabel("parameters (M)", fontsize=8)
            panel.tick_params(labelsize=7)
            if len(lines) > 1:
                panel.legend(fontsize=7)
        panels[-1].axhline(0.6, color="grey", linestyle="--", linewidth=1)

    doc.image("scale_cost_vs_size.png", "training, soft-label, export and decode cost against model size", draw,
              size=(10, 5.6))


def pipeline_results(source: Path, command: str) -> dict[str, Any]:
    """bench/pipeline/results.json from a run's pipeline.json (its machine, command and stage table)."""
    p = json.loads(source.read_text(encoding="utf-8"))
    run = source.parent
    gate_machine = next((r.get("machine") for r in (json.loads(f.read_text()) for f in sorted((run / "gate").glob("*.json")))
                         if isinstance(r, dict) and r.get("machine")), None) if (run / "gate").is_dir() else None
    return {"command": p.get("command") or _pipeline_command(run), "machine": p.get("machine") or gate_machine,
            "machine_source": "pipeline.json" if p.get("machine") else "the run's gate reports",
            "command_source": "pipeline.json" if p.get("command") else "rebuilt from the run's run.toml",
            "created": p.get("finished") or p.get("started")
            or datetime.fromtimestamp(source.stat().st_mtime, timezone.utc).isoformat(timespec="seconds"),
            "load_average": p.get("load_average"), "copied_from": _shown(source), "copied_by": command,
            "profile": p.get("profile"), "verdict": p.get("verdict"), "bundle": p.get("bundle"),
            "stages": p.get("stages", []), "summary": p.get("summary", []), "eval": p.get("eval"),
            "data": _run_data(run), "task_scores": packaged_quality(source, p)}


def _run_data(run: Path) -> str | None:
    """The run's ``data`` setting (a shipped domain's ``builtin:NAME`` or a file), from its run.toml."""
    import tomllib

    toml = run / "run.toml"
    data = tomllib.loads(toml.read_text(encoding="utf-8")).get("data") if toml.is_file() else None
    return str(data) if data else "builtin:demo"


def _from_run(source: Path, p: dict[str, Any], path: str) -> Path:
    """A path pipeline.json recorded relative to the folder the pipeline ran in (where its
    ``run_dir`` was relative too), resolved from where that pipeline.json is now."""
    found, run_dir = Path(path), Path(str(p.get("run_dir") or ""))
    if found.is_absolute() or run_dir.is_absolute() or not run_dir.parts:
        return found
    return source.resolve().parent.parents[len(run_dir.parts) - 1] / found


def packaged_quality(source: Path, p: dict[str, Any]) -> dict[str, Any] | None:
    """The packaged choice's gated quality: primary metric, the teacher's, per-kind scores and, for
    a JSON task, the valid-JSON rates with and without the grammar (from its gate report)."""
    row = next((r for r in p.get("summary") or [] if r.get("choice") == p.get("packaged") and r.get("report")), None)
    report = _from_run(source, p, row["report"]) if row else None
    if report is None or not report.is_file():
        return None
    q = (json.loads(report.read_text(encoding="utf-8")).get("measurements") or {}).get("quality") or {}
    scores = q.get("scores") or {}
    keep = ("accuracy", "macro_f1", "match_rate", "label_accuracy", "valid_json_rate", "schema_valid_rate",
            "field_f1", "field_exact", "field_chrf", "chrf", "rouge_l", "scored_rows")
    return {"choice": row["choice"], "primary_metric": q.get("primary_metric"), "primary": q.get("primary"),
            "teacher_primary": q.get("teacher_primary"), "relative": q.get("relative"), "rows": q.get("answered"),
            "decoding": q.get("decoding"), "scores": {k: scores[k] for k in keep if k in scores},
            "teacher_scores": {k: (q.get("teacher_scores") or {})[k] for k in keep if k in (q.get("teacher_scores") or {})},
            "structured_output": q.get("structured_output")}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results must not name this checkout)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _pipeline_command(run: Path) -> str:
    """The command that made an older pipeline.json (which did not record it), from its run.toml."""
    from edgepack.pipeline import command_line
    from edgepack.runconfig import load_pipeline_config

    toml = run / "run.toml"
    return command_line(load_pipeline_config(toml), Path(_shown(run))) if toml.is_file() else "not recorded"


def section_pipeline(doc: Doc, pipe: dict[str, Any] | None) -> None:
    doc.add("## Time of each pipeline stage")
    if pipe is None:
        doc.add(f"*{NOT_RUN}*: no `bench/pipeline/results.json` (run `make demo`, then this script).")
        return
    stages = pipe.get("stages", [])
    total = sum(s["seconds"] for s in stages) or 1.0
    doc.add(provenance(pipe) + f" Copied from `{pipe.get('copied_from')}`; machine from {pipe.get('machine_source')}, "
            f"command from {pipe.get('command_source')}.",
            table(["stage", "seconds", "share", "result"],
                  [[s["stage"], s["seconds"], f"{100 * s['seconds'] / total:.0f}%", s.get("summary")] for s in stages],
                  right={1, 2}),
            f"Total {total:.0f} s ({total / 60:.1f} min); verdict {pipe.get('verdict')}; profile {pipe.get('profile')}.")
    summary = pipe.get("summary") or []
    if summary:
        doc.add("Its gate table (`gate --search`, best quality first):",
                table(["artifact", "format", "size MB", "TTFT p95 ms", "tok/s", "peak MB", "quality", "verdict"],
                      [[r.get("artifact"), r.get("choice") or r.get("format"), r.get("size_mb"), r.get("ttft_p95_ms"),
                        r.get("decode_tokens_per_s"), r.get("peak_memory_mb"), r.get("relative_quality"),
                        r.get("verdict")] for r in summary], right={2, 3, 4, 5, 6}))

    def draw(ax: Any) -> None:
        ax.barh([s["stage"] for s in stages][::-1], [s["seconds"] for s in stages][::-1])
        ax.set_xlabel("seconds")
        ax.set_title(f"edgepack pipeline stages ({total / 60:.1f} min)")

    doc.image("pipeline_stages.png", "seconds per pipeline stage", draw, size=(6.4, 3.2))


def section_tasks(doc: Doc, pipes: list[dict[str, Any]], fidelity: list[dict[str, Any]]) -> None:
    """Each shipped domain's gated task scores (the packaged choice) and its scores through serve."""
    doc.add("## Task scores of the shipped domains")
    pipes = [p for p in pipes if p and p.get("task_scores")]
    if not pipes:
        doc.add(f"*{NOT_RUN}*: run `make demo` and `make demo-workorders`, then this script with `--pipeline` and "
                "`--workorders`.")
        return
    rows = []
    for p in pipes:
        t = p["task_scores"]
        detail = {**(t["scores"].get("field_exact") or {}), **{f"{k} (chrF)": v for k, v in
                                                               (t["scores"].get("field_chrf") or {}).items()}}
        so = t.get("structured_output") or {}
        rows.append([p.get("data"), t["choice"], p.get("verdict"), f"{t['primary_metric']} {_num(t['primary'], '.3f')}",
                     _num(t.get("teacher_primary"), ".3f"), _num(t.get("relative"), ".3f"),
                     ", ".join(f"{k} {_num(v, '.2f')}" for k, v in detail.items()) or "-",
                     _valid_json(so.get("constrained")), _valid_json(so.get("unconstrained"))])
    doc.add("The packaged choice of each domain's pipeline run, gated on its holdout under the task's own "
            "metric, system prompt and decoding (per field: exact match; chrF for free-text fields). Valid JSON: "
            "the rate with the schema as a grammar (as the bundle decodes) and without it. " +
            " ".join(provenance(p) for p in pipes),
            table(["data", "packaged", "verdict", "primary (gated)", "teacher", "relative", "per field",
                   "valid JSON (grammar)", "valid JSON (none)"], rows))
    if fidelity:
        doc.add("Through `edgepack serve` with bare user messages (no system turn, no decoding settings: the "
                "server applies the bundle's task), scored by the same scorer (`bench/serve/task_fidelity.py`, "
                "target: within 0.03 of the gated score). " + " ".join(provenance(f) for f in fidelity),
                table(["bundle", "metric", "served", "gated", "delta", "ok"],
                      [[f["bundle"]["name"], f["task"].get("primary_metric"), _num(f["served"]["primary"], ".3f"),
                        _num(f["gated"]["primary"], ".3f"), _num(f["comparison"].get("delta"), "+.3f"),
                        f["comparison"].get("ok")] for f in fidelity if f.get("bundle")]))


def _valid_json(rates: dict[str, Any] | None) -> str:
    return _num((rates or {}).get("valid_json_rate"), ".2f") if rates else "-"


def section_others(doc: Doc, serve: dict[str, Any] | None, soft: dict[str, Any] | None,
                   rel: dict[str, Any] | None) -> None:
    doc.add("## Serving (`edgepack serve`)")
    if serve is None:
        doc.add(f"*{NOT_RUN}*.")
    else:
        a = serve.get("a") or {}
        rounds = (serve.get("b") or {}).get("rounds") or []
        ratios = [r["server_tokens_per_s"] / r["direct_tokens_per_s"] for r in rounds
                  if r.get("server_tokens_per_s") and r.get("direct_tokens_per_s")]
        doc.add(provenance(serve),
                table(["burst", "max queue", "completed", "refused", "hung", "answers = serial", "wall s", "ok"],
                      [[k, v.get("max_queue"), v.get("completed"), v.get("refused"), len(v.get("hung") or []),
                        v.get("completed_equal_serial"), v.get("wall_s"), v.get("ok")]
                       for k, v in a.items() if isinstance(v, dict) and "completed" in v]),
                f"Server vs in-process decode tokens/s over {len(ratios)} alternating rounds: median ratio "
                f"{_num(statistics.median(ratios) if ratios else None, '.3f')}.")
    doc.add("## Soft-label cache (`distill/softlabels.py`)")
    if soft is None:
        doc.add(f"*{NOT_RUN}*.")
    else:
        doc.add(provenance(soft),
                table(["k", "samples", "bytes/token", "retained mass (mean)", "tokens/s (busy)", "overhead vs forward"],
                      [[r.get("k"), r.get("samples"), r.get("bytes_per_token"), (r.get("retained_mass") or {}).get("mean"),
                        r.get("cache_tokens_per_s_busy"), r.get("overhead_vs_forward")] for r in soft.get("runs", [])]),
                f"Plain teacher forward: {soft.get('plain_forward_tokens_per_s')} tokens/s.")
    doc.add("## Reliability (hostile inputs, kills, full disks)")
    if rel is None:
        doc.add(f"*{NOT_RUN}*.")
    else:
        doc.add(provenance(rel),
                table(["category", "inputs tried", "faults injected", "failures", "seconds"],
                      [[c.get("category"), c.get("inputs_tried"), c.get("faults_injected"), c.get("failures"),
                        c.get("seconds")] for c in rel.get("categories", [])]),
                "Runs merged into it: " + "; ".join(f"`{r.get('command')}`" for r in rel.get("runs", [])) + "."
                if rel.get("runs") else "")


# --- the command ------------------------------------------------------------------------------

def generate(*, bench: Path = BENCH, out: Path = ROOT / "BENCHMARKS.md", plots: Path | None = None,
             pipeline: Path | None = ROOT / "runs" / "demo" / "pipeline.json",
             workorders: Path | None = None, command: str = "") -> dict[str, Any]:
    """Write ``out`` and the PNGs; returns what was written and which sources were missing."""
    from edgepack.atomic import write_json, write_text

    plots = plots if plots is not None else bench / "plots"
    if pipeline is not None and pipeline.is_file():
        write_json(bench / "pipeline" / "results.json", pipeline_results(pipeline, command))
    if workorders is not None and workorders.is_file():
        write_json(bench / "pipeline" / "workorders.json", pipeline_results(workorders, command))
    doc = Doc(out, plots)
    doc.add("# Benchmarks",
            f"Generated by `{command}` from the committed `bench/*/results*.json`; each section names "
            "the machine and the command of the run it comes from. Regenerate with `make benchmarks`. The machine "
            "is shared by other jobs, so timings carry the load average recorded with them.")
    distill = load(bench, "distill")
    section_distill(doc, distill)
    section_on_policy(doc, [json.loads(f.read_text(encoding="utf-8"))
                            for f in sorted((bench / "distill").glob("results-*.json"))])
    section_training(doc, load(bench, "trl"), distill)
    section_generation(doc, load(bench, "generation"))
    section_export(doc, load(bench, "export"))
    gates = gate_files(bench)
    section_efficiency(doc, gates)
    section_stability(doc, gates)
    section_scale(doc, load(bench, "scale"))
    section_pipeline(doc, load(bench, "pipeline"))
    section_tasks(doc, [load(bench, "pipeline"), load(bench, "pipeline", "workorders.json")],
                  [json.loads(f.read_text(encoding="utf-8")) for f in sorted((bench / "serve").glob("task_fidelity*.json"))])
    section_others(doc, load(bench, "serve"), load(bench, "softlabels"), load(bench, "reliability"))
    write_text(out, doc.text())
    missing = [n for n in ("distill", "trl", "generation", "export", "gate", "pipeline", "serve", "softlabels",
                           "reliability", "scale")
               if not any((bench / n).glob("results*.json"))]
    return {"markdown": out, "plots": doc.written, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=ROOT / "runs" / "demo" / "pipeline.json",
                        help="pipeline.json of a finished run; its stage table is copied to bench/pipeline/results.json")
    parser.add_argument("--workorders", type=Path, default=ROOT / "runs" / "workorders" / "pipeline.json",
                        help="pipeline.json of a `make demo-workorders` run; copied to bench/pipeline/workorders.json")
    parser.add_argument("--bench", type=Path, default=BENCH, help="folder holding <name>/results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=None, help="PNG folder (default: BENCH/plots)")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/benchmarks.py", *(sys.argv[1:] if argv is None else argv)])
    result = generate(bench=args.bench, out=args.out, plots=args.plots, pipeline=args.pipeline,
                      workorders=args.workorders, command=command)
    print(f"wrote {result['markdown']} and {len(result['plots'])} plots; not yet run: "
          f"{', '.join(result['missing']) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
