"""The BENCHMARKS.md sections on the whole toolchain (bench/benchmarks.py): a finished ``edgepack
pipeline`` run's pipeline.json copied into bench/pipeline/ (its machine, command, stage table and
the packaged choice's gated task scores), the stage times, each shipped domain's task scores (and
through ``edgepack serve``, bench/serve/task_fidelity*.json), and reliability (bench/reliability)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks_doc import NOT_RUN, Doc, _num, provenance, table

ROOT = Path(__file__).resolve().parent.parent



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
    if not doc.section("Time of each pipeline stage", pipe,
                       "no `bench/pipeline/results.json` (run `make demo`, then this script)."):
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


def section_reliability(doc: Doc, rel: dict[str, Any] | None) -> None:
    if not doc.section("Reliability (hostile inputs, kills, full disks)", rel):
        return
    doc.add(provenance(rel),
            table(["category", "inputs tried", "faults injected", "failures", "seconds"],
                  [[c.get("category"), c.get("inputs_tried"), c.get("faults_injected"), c.get("failures"),
                    c.get("seconds")] for c in rel.get("categories", [])]),
            "Runs merged into it: " + "; ".join(f"`{r.get('command')}`" for r in rel.get("runs", [])) + "."
            if rel.get("runs") else "")
