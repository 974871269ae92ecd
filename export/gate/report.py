"""Human-readable gate and search reports: markdown beside the JSON, and a latency plot.

``write_gate_reports(report, out_dir)`` writes ``<artifact>.json`` (the dict
:func:`edgepack.export.gate.gate.run_gate` returns, unchanged), ``<artifact>.md`` and
``<artifact>.png``; ``write_search_reports(result, out_dir)`` does the same for
:func:`edgepack.export.gate.search.search` (``search-<profile>.*``). Every file is written
atomically. The markdown states how the numbers were taken and how much they moved between
runs (stdev, min/max), so a reader can tell a real miss from noise.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch, no
display needed). The gate plot shows TTFT per run against the ``ttft_p95_ms`` budget and the
distribution of per-token decode times against the per-token time the decode budget allows
(1000 / ``min_decode_tokens_per_s`` ms); a budget far outside the data is named in the
legend instead of squashing the axis.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_path, write_json, write_text

OFF_SCALE = 20.0  # a budget line more than this factor beyond the data is named, not drawn


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _check_budget(report: dict[str, Any], name: str) -> float | None:
    for c in report.get("checks", []):
        if c.get("name") == name:
            return c.get("budget")
    return None


def gate_markdown(report: dict[str, Any], png_name: str | None = None) -> str:
    """The gate report as markdown: verdict, checks, reasons, spread, efficiency, host."""
    m = report.get("measurements") or {}
    host = report.get("host") or {}
    machine = report.get("machine") or {}
    ok_text = {True: "yes", False: "**no**", None: "not measured"}
    lines = [f"# Gate: {report.get('artifact_name')} on {report.get('profile')}: **{report.get('verdict')}**", "",
             f"- artifact: `{report.get('artifact')}` ({report.get('format')}:{report.get('quant')})",
             f"- sha256: `{report.get('model_sha256') or report.get('artifact_sha256')}`; profile sha256: "
             f"`{report.get('profile_sha256')}` (`edgepack pack` accepts this report only for that artifact and profile)",
             f"- gated: {report.get('created')}; host: {host.get('reason')}; threads {host.get('threads_used')}; "
             f"load average at start {host.get('load_average_at_start')}",
             f"- machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPUs, {machine.get('memory_mb')} MB; "
             f"llama-cpp-python {machine.get('llama-cpp-python')}, onnxruntime {machine.get('onnxruntime')}", "",
             "| check | measured | budget | ok |", "|---|---:|---:|---|"]
    for c in report.get("checks", []):
        unit = c.get("unit", "")
        lines.append(f"| {c['name']} | {_fmt(c.get('measured'))} {unit} | {_fmt(c.get('budget'))} {unit} | "
                     f"{ok_text.get(c.get('ok'), c.get('ok'))} |")
    if report.get("reasons"):
        lines += ["", "## Reasons", "", *[f"- {r}" for r in report["reasons"]]]
    if m.get("ok"):
        lines += ["", "## Latency and memory", "",
                  f"{m.get('runs')} runs after {m.get('warmup_runs', 1)} warm-up run, each a "
                  f"{m.get('prompt_tokens')}-token prompt then {m.get('decode_tokens')} greedy tokens, in a fresh "
                  f"process, threads={m.get('threads')}. {m.get('timing', '')}.", "",
                  "| series | p50 | p95 | mean | stdev | min | max | stdev/mean |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        spread = report.get("spread") or {}
        for key, label in (("ttft_ms", "TTFT (ms)"), ("decode_tokens_per_s", "decode (tok/s)"),
                           ("inter_token_ms", "per-token decode time (ms)")):
            s = m.get(key)
            if not isinstance(s, dict):
                continue
            cv = (spread.get(key) or {}).get("cv_percent")
            lines.append(f"| {label} | {_fmt(s['p50'], 2)} | {_fmt(s['p95'], 2)} | {_fmt(s['mean'], 2)} | "
                         f"{_fmt(s['stdev'], 2)} | {_fmt(s['min'], 2)} | {_fmt(s['max'], 2)} | "
                         f"{_fmt(cv, 1)}% |")
        lines += ["", f"Load {_fmt(m.get('load_s'), 3)} s; RSS before load {_fmt(m.get('rss_before_load_mb'))} MB, "
                      f"after load {_fmt(m.get('rss_after_load_mb'))} MB, peak {_fmt(m.get('peak_rss_mb'))} MB "
                      f"(the child's VmHWM)" + (f"; VRAM {_fmt(m.get('vram_mb'))} MB" if m.get("vram_mb") else "") + "."]
    elif m:
        lines += ["", "## Measurement", "", f"Failed: {m.get('error')}"]
        lines += [f"    {t}" for t in m.get("stderr_tail") or []]
    if isinstance(m.get("quality"), dict):
        lines += ["", "## Quality on the holdout", "", *quality_lines(m["quality"], report.get("reference"))]
    elif isinstance(report.get("reference"), dict) and m.get("ok"):
        ref = report["reference"]
        lines += ["", f"KLD vs reference `{ref.get('path')}` ({ref.get('source')}): not measured (no holdout)."]
    eff = report.get("efficiency")
    if isinstance(eff, dict):
        lines += ["", "## Decode efficiency", ""]
        if eff.get("efficiency") is not None:
            lines += [f"{_fmt(eff['decode_tokens_per_s'])} tok/s × {eff['bytes_per_token'] / 2**20:,.2f} MiB read "
                      f"per token = {_fmt(eff['achieved_gb_s'], 2)} GB/s, **{100 * eff['efficiency']:.1f}%** of this "
                      f"machine's measured {_fmt(eff['bandwidth_gb_s'], 2)} GB/s (bandwidth bound: "
                      f"{_fmt(eff.get('bound_tokens_per_s'))} tok/s). Bytes per token: {eff.get('basis')}, KV at "
                      f"position {_fmt(eff.get('position'))}. Bandwidth: {eff.get('bandwidth_method')}."]
            if eff.get("note"):
                lines.append(f"Note: {eff['note']}.")
        else:
            lines.append(f"Not computed: {eff.get('error') or eff.get('note')}")
    if png_name:
        lines += ["", f"![latency distribution]({png_name})"]
    elif not has_matplotlib():
        lines += ["", NO_MATPLOTLIB]
    lines += ["", f"Policy: {report.get('policy', '')}", ""]
    return "\n".join(lines)


def quality_lines(q: dict[str, Any], reference: dict[str, Any] | None = None) -> list[str]:
    """Markdown lines for the holdout pass: the task's primary metric and its other scores, the
    teacher's, relative quality, agreement with the teacher, JSON validity with and without the
    schema as a grammar (json tasks), KLD vs the reference."""
    limit = f" (limit {_fmt(q.get('timeout_s'), 0)} s)" if q.get("timeout_s") is not None else ""
    if q.get("error"):
        lines = [f"The holdout `{q.get('holdout')}` could not be answered: {q['error']}{limit}."]
        lines += [f"    {t}" for t in q.get("stderr_tail") or []]
        return lines
    metric = q.get("primary_metric", "accuracy")
    task = q.get("task") or {}
    lines = [f"`{q.get('holdout')}`: {q.get('answered', q.get('labelled'))} of {q.get('rows')} rows answered by the "
             f"artifact itself ({q.get('decoding')}) in a fresh process in {_fmt(q.get('wall_s'), 1)} s{limit}.", "",
             f"- {metric} (the {task.get('kind', 'labels')} task's primary metric): "
             f"{_fmt(q.get('primary', q.get('accuracy')), 3)} {_primary_detail(q, metric)}",
             *_other_scores(q, metric),
             f"- teacher's recorded {metric}: {_fmt(q.get('teacher_primary', q.get('teacher_accuracy')), 3)} "
             f"({q.get('teacher_rows')} rows); relative quality {_fmt(q.get('relative'), 3)}"]
    if q.get("accuracy") is not None or q.get("teacher_agreement_rows") or task.get("kind", "labels") == "labels":
        lines.append(f"- agreement with the teacher: {_fmt(q.get('teacher_agreement'), 3)} ({q.get('teacher_agreed')} "
                     f"of {q.get('teacher_agreement_rows')} rows whose teacher response names a label; reported, "
                     "not a budget)")
    lines += _structured_lines(q.get("structured_output"))
    kld = q.get("kld_vs_reference")
    if isinstance(kld, dict):
        source = " (auto)" if kld.get("source") == "auto" else ""
        head = f"- KLD vs reference: reference: `{kld.get('reference')}`{source}; "
        if kld.get("error") or kld.get("skipped"):
            lines.append(head + f"not measured: {kld.get('error') or kld.get('skipped')}")
        else:
            lines.append(head + f"mean KLD {_fmt(kld.get('kld_mean'), 5)} (p99 {_fmt(kld.get('kld_p99'), 5)}), "
                         f"top-1 agreement {_fmt(kld.get('top1_agreement'), 3)} over {kld.get('positions')} "
                         f"positions of {kld.get('rows')} rows' prompt + teacher response, against "
                         f"{kld.get('compared_with')}; {kld.get('note')}")
    elif reference:
        lines.append(f"- KLD vs reference `{reference.get('path')}`: not measured")
    lines += [f"- note: {n}" for n in q.get("notes") or []]
    return lines


def _primary_detail(q: dict[str, Any], metric: str) -> str:
    if metric == "accuracy" and q.get("labelled") is not None:
        return (f"({q.get('correct')} of {q.get('labelled')} labelled rows; {q.get('unparsed')} answers named "
                "no label)")
    scored = (q.get("scores") or {}).get("scored_rows")
    return f"({scored} scored rows)" if scored is not None else ""


# Scorer keys that are counts or the primary value again, not metrics.
_NOT_METRICS = {"primary", "rows", "scored_rows", "labelled_rows"}


def _other_scores(q: dict[str, Any], metric: str) -> list[str]:
    """The task's other metrics in one line (macro F1, schema-valid rate, ROUGE-L, ...)."""
    scores = q.get("scores") or {}
    shown = [f"{k} {_fmt(v, 3)}" for k, v in scores.items()
             if isinstance(v, float) and k != metric and k not in _NOT_METRICS]
    return [f"- other scores: {', '.join(shown)}"] if shown else []


def structured_summary(s: dict[str, Any] | None) -> str | None:
    """One line on a json task's decoding: valid-JSON (and schema-valid) rates under the schema as
    a grammar and without it, or that the answers were unconstrained. None for other tasks."""
    if not isinstance(s, dict):
        return None

    def rates(r: dict[str, Any] | None) -> str:
        r = r or {}
        return f"valid JSON {_fmt(r.get('valid_json_rate'), 3)}, schema-valid {_fmt(r.get('schema_valid_rate'), 3)}"

    if s.get("decoding") == "constrained":
        return (f"JSON under the task's schema (grammar; the verdict judges these): {rates(s.get('constrained'))}; "
                f"without the grammar: {rates(s.get('unconstrained'))}")
    return f"JSON unconstrained: {rates(s.get('unconstrained'))} ({s.get('note')})"


def _structured_lines(s: dict[str, Any] | None) -> list[str]:
    line = structured_summary(s)
    return [f"- {line}"] if line else []


def _budget_line(ax: Any, value: float | None, data: list[float], label: str, vertical: bool) -> None:
    if value is None or not data:
        return
    hi = max(data)
    if value > OFF_SCALE * hi:
        ax.plot([], [], color="red", linestyle="--", label=f"{label} (off scale)")
        return
    (ax.axvline if vertical else ax.axhline)(value, color="red", linestyle="--", label=label)


NO_MATPLOTLIB = "No plot: matplotlib is not installed (the lean runtime install leaves it out)."


def has_matplotlib() -> bool:
    """Whether plots can be drawn; the lean runtime install (dist/runtime) has no matplotlib."""
    return importlib.util.find_spec("matplotlib") is not None


def latency_png(report: dict[str, Any], path: Path) -> bool:
    """Plot TTFT per run and the per-token decode-time distribution with budget lines.

    Returns False (and writes nothing) when the report has no measurements to plot.
    """
    m = report.get("measurements") or {}
    ttft = list((m.get("ttft_ms") or {}).get("samples") or [])
    gaps = list((m.get("inter_token_ms") or {}).get("samples") or [])
    if not m.get("ok") or not ttft or not has_matplotlib():
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(range(1, len(ttft) + 1), ttft, "o", label="TTFT per run")
    ax1.axhline(m["ttft_ms"]["p95"], color="grey", linestyle=":", label=f"p95 {m['ttft_ms']['p95']:.3g} ms")
    budget = _check_budget(report, "ttft_p95_ms")
    _budget_line(ax1, budget, ttft, f"budget {budget:g} ms" if budget else "", vertical=False)
    ax1.set_xticks(range(1, len(ttft) + 1))
    ax1.set_xlabel("run")
    ax1.set_ylabel("time to first token (ms)")
    ax1.set_title(f"TTFT, {m.get('prompt_tokens')}-token prompt")
    ax1.legend(fontsize=8)
    if gaps:
        ax2.hist(gaps, bins=min(40, max(5, len(gaps) // 8)), color="tab:blue", alpha=0.8)
        median = (m.get("inter_token_ms") or {}).get("p50")
        if median is not None:
            ax2.axvline(median, color="grey", linestyle=":", label=f"median {median:.2f} ms")
        tok_budget = _check_budget(report, "decode_tokens_per_s")
        per_token = 1000.0 / tok_budget if tok_budget else None
        _budget_line(ax2, per_token, gaps, f"budget {per_token:.1f} ms/token" if per_token else "", vertical=True)
        ax2.set_xlabel("per-token decode time (ms)")
        ax2.set_ylabel("tokens")
        ax2.set_title(f"decode, {len(gaps)} tokens over {m.get('runs')} runs")
        ax2.legend(fontsize=8)
    fig.suptitle(f"{report.get('artifact_name')} on {report.get('profile')}: {report.get('verdict')}")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_gate_reports(report: dict[str, Any], out_dir: Path, stem: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.json`` / ``.md`` / ``.png`` (stem: the artifact name); returns the paths.

    The PNG is left out when the measurement failed (nothing to plot); the markdown says why.
    """
    out_dir = Path(out_dir)
    stem = stem or str(report.get("artifact_name") or Path(str(report["artifact"])).name)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json(paths["json"], report)
    if not latency_png(report, paths["png"]):
        paths["png"].unlink(missing_ok=True)  # never leave a plot of an earlier run beside new numbers
        del paths["png"]
    write_text(paths["md"], gate_markdown(report, paths["png"].name if "png" in paths else None))
    return paths


# --- search ---------------------------------------------------------------------------------
def search_markdown(result: dict[str, Any], png_name: str | None = None) -> str:
    """The search table (every choice, best quality first), the pick and the Pareto front."""
    chosen = result.get("chosen")
    lines = [f"# Search for {result.get('profile')}: "
             + (f"**{chosen}** passes every budget" if chosen else f"**no choice passed** ({result.get('verdict')})"),
             "", f"Host: {(result.get('host') or {}).get('reason')}. Holdout: {result.get('holdout') or 'none'}.", "",
             f"| choice | artifact | size MB | TTFT p95 ms | decode tok/s | peak RSS MB | {search_metric(result)} | "
             "× teacher | efficiency | verdict | Pareto | report |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in result.get("rows", []):
        eff = r.get("efficiency")
        lines.append(f"| {r['choice']} | {r.get('artifact') or '-'} | {_fmt(r.get('size_mb'))} | "
                     f"{_fmt(r.get('ttft_p95_ms'))} | {_fmt(r.get('decode_tokens_per_s'))} | "
                     f"{_fmt(r.get('peak_rss_mb'))} | {_fmt(r.get('score'), 3)} | {_fmt(r.get('quality'), 3)} | "
                     f"{'n/a' if eff is None else f'{100 * eff:.1f}%'} | {r.get('verdict') or r.get('status')} | "
                     f"{'yes' if r.get('pareto') else ''} | "
                     f"{('reused ' if r.get('reused') else '') + Path(r['report']).name if r.get('report') else ''} |")
    lines += ["", f"Pareto front ({', '.join(result.get('pareto_axes', []))}): "
              + (", ".join(result.get("pareto") or []) or "empty (nothing was measured)")]
    if result.get("best_on_this_host") and not chosen:
        lines.append(f"\nMet every budget on this host (not the target device): {result['best_on_this_host']}.")
    if result.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in result["notes"]]]
    for r in result.get("rows", []):
        if r.get("reasons") and r.get("verdict") != "PASS":
            lines.append(f"- {r['choice']}: {'; '.join(r['reasons'][:3])}")
    if png_name:
        lines += ["", f"![size vs speed]({png_name})"]
    elif not has_matplotlib():
        lines += ["", NO_MATPLOTLIB]
    return "\n".join(lines) + "\n"


def search_metric(result: dict[str, Any]) -> str:
    """The column title of a search's quality scores: the task's primary metric (every row answers
    the same holdout under the same task), ``score`` when no row measured one."""
    metrics = {r.get("metric") for r in result.get("rows", []) if r.get("metric")}
    return metrics.pop() if len(metrics) == 1 else "score"


def pareto_png(result: dict[str, Any], path: Path) -> bool:
    """Size (MB) vs decode speed, one point per measured choice, Pareto points ringed."""
    rows = [r for r in result.get("rows", []) if r.get("size_mb") is not None
            and r.get("decode_tokens_per_s") is not None]
    if not rows or not has_matplotlib():
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"PASS": "tab:green", "FAIL": "tab:red", "UNVERIFIED": "tab:orange"}
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["size_mb"], r["decode_tokens_per_s"], color=colours.get(r.get("verdict"), "grey"), s=40, zorder=3)
        if r.get("pareto"):
            ax.scatter(r["size_mb"], r["decode_tokens_per_s"], facecolors="none", edgecolors="black", s=140, zorder=2)
        label = r["choice"] + (f"\n{r.get('metric')}={r['score']:.2f}" if r.get("score") is not None else "")
        ax.annotate(label, (r["size_mb"], r["decode_tokens_per_s"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    budget = result.get("min_decode_tokens_per_s")
    if budget is not None:
        _budget_line(ax, budget, [r["decode_tokens_per_s"] for r in rows], f"budget {budget:g} tok/s", vertical=False)
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("decode tokens/s (p50)")
    ax.set_title(f"search on {result.get('profile')} (ringed: Pareto front)")
    if budget is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_search_reports(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``search-<profile>.json`` / ``.md`` / ``.png`` into ``out_dir``; returns the paths.

    Keep these out of ``RUN/gate/``: ``edgepack pack`` reads every JSON there as a gate report.
    """
    out_dir = Path(out_dir)
    stem = f"search-{result.get('profile')}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json(paths["json"], result)
    if not pareto_png(result, paths["png"]):
        paths["png"].unlink(missing_ok=True)
        del paths["png"]
    write_text(paths["md"], search_markdown(result, paths["png"].name if "png" in paths else None))
    return paths
