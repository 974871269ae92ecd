"""The BENCHMARKS.md sections on making a student (bench/benchmarks.py): distillation quality
(bench/distill), off- vs on-policy KD (bench/distill/results-<domain>.json), training speed and
memory against TRL (bench/trl), teacher generation throughput (bench/generation) and the
soft-label cache (bench/softlabels)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks_doc import NOT_RUN, Doc, _flat_table, _name, _num, _rows_with, as_recorded, provenance, table



def section_distill(doc: Doc, distill: dict[str, Any] | None) -> None:
    if not doc.section("Distillation quality (gap closed per metric, KD vs SFT)", distill,
                       "`bench/distill/results.json` does not exist yet (the distillation benchmark of "
                       "issue #4: undistilled / SFT-only / KD variants over 3 seeds)."):
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
    every_method_by_domain(doc, runs)
    every_teacher_kind(doc, runs)
    runs = [r for r in runs if set((r.get("summary") or {}).get("on_policy_targets") or {}) - {"best"}]
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
                 (m.get("wall_s") or {}).get("mean"), (m.get("cpu_s") or {}).get("mean")] for m in methods.values()]
        shown = _num(teacher, ".3f")
        doc.add(f"**{r['run']}** ({r['steps']} steps per student, teacher {metric} {shown}). " + provenance(r),
                table(["method", "seeds", f"{metric} mean", "min", "max", "KL mean", "min", "max", "train wall s",
                       "train CPU s"],
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


def every_teacher_kind(doc: Doc, runs: list[dict[str, Any]]) -> None:
    """bench/distill/teacher_kinds.py's results (``teacher_gguf`` marks them): on-policy KD scored by
    each teacher kind from one student start."""
    for r in (r for r in runs if "teacher_gguf" in r):
        metric = (r.get("task") or {}).get("primary_metric", "primary")
        body = [[k["kind"], (k.get("scorer") or {}).get("kind"), k.get("steps_on_policy"),
                 f"{k.get('completions')} ({k.get('completions_capped')})", _num(k.get("primary"), ".3f"),
                 _num(k.get("teacher_primary"), ".3f"), _num(k.get("undistilled_primary"), ".3f"),
                 k.get("wall_s"), k.get("cpu_s")] for k in r["rows"]]
        doc.add(f"**Every teacher kind on {r['run']}** (seed {r['seed']}, {r['steps']} steps: λ 1 after a half-way "
                f"warm-up, one student start; `{r['file']}`). " + provenance(r),
                table(["teacher kind", "scorer", "on-policy steps", "completions (capped)", metric,
                       f"teacher {metric}", "undistilled", "wall s", "CPU s"], body))


def every_method_by_domain(doc: Doc, runs: list[dict[str, Any]]) -> None:
    """One table per domain and step count of every method the results-*.json files (``file``: the
    name benchmarks.py adds) trained from
    the run's own fresh student (invocations with ``--student`` fine-tune another start and stay
    out), best task score first, with the share of the teacher's score each keeps."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        if "--student" not in r["command"] and (r.get("teacher") or {}).get("primary") is not None:
            groups.setdefault((Path(r["run"]).name, r["steps"]), []).append(r)
    for (domain, steps), results in sorted(groups.items()):
        metric = (results[0].get("task") or {}).get("primary_metric", "primary")
        teacher = results[0]["teacher"]["primary"]
        # A method retrained with the same result in another invocation (CPU training is deterministic) is one row.
        rows: dict[tuple[Any, ...], tuple[dict[str, Any], list[str]]] = {}
        for r in results:
            for m in (m for m in r["summary"]["methods"].values() if m.get("primary")):
                key = (m["label"], tuple(m["seeds"]), m["primary"]["mean"], (m.get("kl") or {}).get("mean"))
                rows.setdefault(key, (m, []))[1].append(r["file"])
        ranked = sorted(rows.values(), key=lambda mf: -mf[0]["primary"]["mean"])
        body = [[m["label"], ", ".join(map(str, m["seeds"])), _num(m["primary"]["mean"], ".3f"),
                 f"{_num(m['primary']['min'], '.3f')} – {_num(m['primary']['max'], '.3f')}",
                 _num(m["primary"]["mean"] / teacher, ".3f") if teacher else "–",
                 _num((m.get("kl") or {}).get("mean"), ".3f"), ", ".join(f"`{f}`" for f in files)] for m, files in ranked]
        timed = "".join(f"; the equal-time rows {r['equal_wall']['steps']} steps, the CPU time of "
                        f"{r['summary']['methods'][r['equal_wall']['method']]['label']}"
                        for r in results if r.get("equal_wall"))
        doc.add(f"**{domain}, every method at {steps} steps** (teacher {metric} {_num(teacher, '.3f')}; "
                f"each from the run's own fresh student, rows from the files named{timed}):",
                table(["method", "seeds", f"{metric} mean", "min – max", "÷ teacher", "KL mean", "results"], body))


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
    if not doc.section("Teacher generation throughput", gen,
                       "`bench/generation/results.json` does not exist yet (teacher generation through "
                       "the toolchain vs raw llama-cpp-python on the same GGUF, issue #3)."):
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



def section_softlabels(doc: Doc, soft: dict[str, Any] | None) -> None:
    if not doc.section("Soft-label cache (`distill/softlabels.py`)", soft):
        return
    doc.add(provenance(soft),
            table(["k", "samples", "bytes/token", "retained mass (mean)", "tokens/s (busy)", "overhead vs forward"],
                  [[r.get("k"), r.get("samples"), r.get("bytes_per_token"), (r.get("retained_mass") or {}).get("mean"),
                    r.get("cache_tokens_per_s_busy"), r.get("overhead_vs_forward")] for r in soft.get("runs", [])]),
            f"Plain teacher forward: {soft.get('plain_forward_tokens_per_s')} tokens/s.")
