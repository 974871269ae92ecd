"""`edgepack gate`: measure an artifact on this machine against a profile's budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def gate_cmd(
    artifact: Annotated[Path, typer.Argument(help="A .gguf file, an ONNX folder, a .edgepack bundle; "
                                                  "with --search, a run directory (or one artifact).")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    holdout: Annotated[Path | None, typer.Option(help="Holdout JSONL for the quality check.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here, with .md and .png beside it "
                                                     "(with --search: a folder for search-<profile>.*).")] = None,
    search: Annotated[bool, typer.Option("--search", help="Gate every choice the profile allows that the run "
                                                          "exported, best quality first; pick the first PASS.")] = False,
    stop_at_first: Annotated[bool, typer.Option("--stop-at-first", help="With --search: stop at the first PASS.")] = False,
    key: Annotated[Path | None, typer.Option(help="Public key (PEM) a bundle's signature must verify "
                                                  "against; an unsigned bundle is then refused.")] = None,
    reference: Annotated[Path | None, typer.Option(help="Unquantized HF dir (or run dir) to measure the KL divergence "
                                                        "against on the holdout; default: RUN/student for an artifact "
                                                        "under RUN/artifacts/. Reported, not a budget.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    on: Annotated[list[str] | None, typer.Option(
        "--on", help="Gate on a device instead: ssh://user@host[:port] (repeatable; in parallel). The device "
                     "runs its own `edgepack gate`; the report comes back into RUN/gate/.")] = None,
    ssh_option: Annotated[list[str] | None, typer.Option("--ssh-option", help="With --on: an ssh/scp -o KEY=VALUE "
                                                                              "(repeatable).")] = None,
    remote_command: Annotated[str, typer.Option(help="With --on: the device's edgepack command.")] = "edgepack",
    remote_dir: Annotated[str, typer.Option(help="With --on: the device's bundle cache (relative: to its home).")]
        = ".cache/edgepack/bundles",
) -> None:
    """Measure latency, memory and quality in the real runtime; exit 0 only on PASS."""
    from edgepack.console import emit, progress_bars, warn
    from edgepack.constants import PASS
    from edgepack.profiles import load_profile

    prof = load_profile(profile)
    if on:
        if search or holdout is not None or reference is not None or key is not None:
            from edgepack.errors import UsageError

            raise UsageError("--on gates one file on the device; --search, --holdout, --reference and --key are "
                             "for a gate on this machine", hint="run those on the device itself")
        _remote(artifact, profile, on, ssh_option or [], remote_command, remote_dir, report, json_out)
        return
    if search:
        if reference is not None:
            from edgepack.errors import UsageError

            raise UsageError("--reference is for one artifact; --search finds RUN/student by itself",
                             hint="drop --reference, or gate one artifact with it")
        _search(artifact, prof, holdout, report, stop_at_first, json_out)
        return
    from edgepack.export.gate.gate import run_gate
    from edgepack.export.gate.report import write_gate_reports

    from edgepack.logs import run_dir_of, stage_log

    # The gate loads no transformers here (its KLD child is a process of its own).
    with stage_log("gate", run_dir_of(artifact), hf_logging=False), progress_bars(not json_out) as progress:
        result = run_gate(artifact=artifact, profile=prof, holdout=holdout, progress=progress, key=key,
                          reference=reference, warn=warn)
    written = write_gate_reports(result, report.parent, stem=report.stem) if report is not None else {}

    emit(result, json_out, lambda r: _print_gate(r, written))
    if result["verdict"] != PASS:
        raise typer.Exit(1)


def _print_gate(r: dict[str, Any], written: dict[str, Any]) -> None:
    """The human rendering of one gate: the checks, the spread, the quality lines, the verdict."""
    from rich.table import Table

    from edgepack.console import out

    t = Table("check", "measured", "budget", "unit", "ok", title=f"gate {r['artifact']} on {r['profile']}")
    for c in r["checks"]:
        t.add_row(c["name"], str(c["measured"]), str(c["budget"]), c.get("unit", ""),
                  {True: "[green]yes[/green]", False: "[red]no[/red]"}.get(c["ok"], "n/a"))
    out.print(t)
    spread = (r.get("spread") or {}).get("decode_tokens_per_s")
    if spread:
        out.print(f"decode spread over {spread['n']} runs: stdev {spread['stdev']:.1f} tok/s "
                  f"(min {spread['min']:.1f}, max {spread['max']:.1f})")
    for line in _quality_summary((r.get("measurements") or {}).get("quality")):
        out.print(line)
    eff = r.get("efficiency") or {}
    if eff.get("efficiency") is not None:
        out.print(f"decode efficiency: {100 * eff['efficiency']:.1f}% of {eff['bandwidth_gb_s']:.1f} GB/s")
    colour = {"PASS": "green", "FAIL": "red"}.get(r["verdict"], "yellow")
    out.print(f"verdict: [bold {colour}]{r['verdict']}[/bold {colour}]"
              + (f" — {'; '.join(r['reasons'])}" if r.get("reasons") else ""))
    for kind, path in written.items():
        out.print(f"{kind}: {path}")


def _quality_summary(q: dict[str, Any] | None) -> list[str]:
    """A few plain lines on the holdout pass: the task's primary metric, the teacher's, relative
    quality, agreement with the teacher (tasks whose answers name a label), JSON validity with
    and without the grammar (json tasks), KLD."""
    if not isinstance(q, dict) or q.get("error"):
        return []  # no holdout, or its failure is already the verdict's reason
    from edgepack.export.gate.report import structured_summary

    def num(v: Any, d: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    metric = q.get("primary_metric", "accuracy")
    scored = (q.get("scores") or {}).get("scored_rows", q.get("labelled"))
    line = (f"holdout: {metric} {num(q.get('primary', q.get('accuracy')))} ({scored} scored rows), teacher "
            f"{num(q.get('teacher_primary', q.get('teacher_accuracy')))}, relative {num(q.get('relative'))}")
    if q.get("teacher_agreement_rows") or q.get("accuracy") is not None:
        line += (f"; agreement with the teacher {num(q.get('teacher_agreement'))} "
                 f"({q.get('teacher_agreement_rows')} rows)")
    lines = [line]
    json_line = structured_summary(q.get("structured_output"))
    lines += [json_line] if json_line else []
    kld = q.get("kld_vs_reference")
    if isinstance(kld, dict):
        where = f"{kld.get('reference')}" + (" (auto)" if kld.get("source") == "auto" else "")
        if kld.get("error") or kld.get("skipped"):
            lines.append(f"KLD vs reference {where}: not measured ({kld.get('error') or kld.get('skipped')})")
        else:
            lines.append(f"KLD vs reference {where}: {num(kld.get('kld_mean'), 5)}, top-1 agreement "
                         f"{num(kld.get('top1_agreement'))} over {kld.get('positions')} positions "
                         "(reported, not a budget)")
    return lines


def _search(target: Path, prof: Any, holdout: Path | None, report: Path | None, stop_at_first: bool,
            json_out: bool) -> None:
    from edgepack.console import emit, out, progress_bars
    from edgepack.constants import ARTIFACTS_DIR, RUN_TOML
    from edgepack.export.gate.report import search_metric, write_search_reports
    from edgepack.export.gate.search import search

    is_run = target.is_dir() and ((target / RUN_TOML).is_file() or (target / ARTIFACTS_DIR).is_dir())
    from edgepack.logs import run_dir_of, stage_log

    with stage_log("gate", run_dir_of(target), hf_logging=False), progress_bars(not json_out) as progress:
        result = search(profile=prof, run_dir=target if is_run else None, artifacts=None if is_run else [target],
                        holdout=holdout, progress=progress, stop_at_first=stop_at_first)
    # Never into RUN/gate/: `edgepack pack` reads every JSON there as a gate report.
    written = write_search_reports(result, report if report is not None else (target if is_run else target.parent))

    def human(r: dict[str, Any]) -> None:
        from rich.table import Table

        def num(v: Any, d: int = 1) -> str:
            return "-" if v is None else f"{v:.{d}f}"

        t = Table("choice", "size MB", "TTFT p95 ms", "decode tok/s", "peak RSS MB", search_metric(r), "× teacher",
                  "verdict", "Pareto", title=f"search on {r['profile']}")
        for row in r["rows"]:
            verdict = row["verdict"] or row["status"]
            colour = {"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")
            t.add_row(row["choice"], num(row["size_mb"]), num(row["ttft_p95_ms"]), num(row["decode_tokens_per_s"]),
                      num(row["peak_rss_mb"]), num(row.get("score"), 3), num(row["quality"], 3),
                      f"[{colour}]{verdict}[/{colour}]", "yes" if row["pareto"] else "")
        out.print(t)
        out.print(f"chosen: [bold]{r['chosen'] or 'none'}[/bold]; Pareto front: {', '.join(r['pareto']) or '-'}")
        for note in r["notes"]:
            out.print(f"note: {note}")
        for kind, path in written.items():
            out.print(f"{kind}: {path}")

    emit(result, json_out, human)
    if result["chosen"] is None:
        raise typer.Exit(1)


def _remote(artifact: Path, profile: str, on: list[str], ssh_option: list[str], command: str, remote_dir: str,
            report: Path | None, json_out: bool) -> None:
    """``--on``: gate on each device (:mod:`edgepack.export.gate.remote`), one table; exit 2 on the
    first target that could not be gated, else 1 unless every verdict is PASS."""
    from edgepack.console import emit, out
    from edgepack.constants import PASS
    from edgepack.export.gate.remote import SshSettings, gate_remote, parse_options, parse_target

    targets = [parse_target(u) for u in on]
    settings = SshSettings(options=parse_options(ssh_option), command=command, remote_dir=remote_dir)
    outcomes = gate_remote(artifact, profile, targets, settings, report=report)

    def human(rows: list[dict[str, Any]]) -> None:
        from rich.table import Table

        t = Table("device", "machine", "copied", "TTFT p95 ms", "decode tok/s", "verdict", "report",
                  title=f"gate {artifact.name} on {profile}")
        for o, row in zip(outcomes, rows):
            if o.report is None:
                t.add_row(o.target.url, "-", "-", "-", "-", "[red]ERROR[/red]", str(o.error))
                continue
            m, mach = o.report.get("measurements") or {}, o.report.get("machine") or {}
            colour = {"PASS": "green", "FAIL": "red"}.get(row["verdict"], "yellow")
            t.add_row(o.target.url, f"{mach.get('machine')} {mach.get('cpu_count')} CPUs", "yes" if o.copied else "no",
                      _num((m.get("ttft_ms") or {}).get("p95")), _num((m.get("decode_tokens_per_s") or {}).get("p50")),
                      f"[{colour}]{row['verdict']}[/{colour}]", str(o.written.get("json", "")))
        out.print(t)
        for o in outcomes:
            if o.report is not None and o.report.get("reasons"):
                out.print(f"{o.target.url}: {'; '.join(o.report['reasons'][:3])}")

    rows = [{"on": o.target.url, "verdict": o.report["verdict"] if o.report else "ERROR",
             "report": str(o.written.get("json")) if o.written else None,
             "error": str(o.error) if o.error else None, "copied": o.copied,
             "machine": (o.report or {}).get("machine")} for o in outcomes]
    emit(rows, json_out, human)
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise failed[0]
    if any(r["verdict"] != PASS for r in rows):
        raise typer.Exit(1)


def _num(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.1f}"
