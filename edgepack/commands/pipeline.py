"""`edgepack pipeline`: teacher → data → KD → export → gate --search → bundle in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def pipeline_cmd(
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Profile name or .toml path.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (resumable; with --config, default: "
                                                           "the folder of that run.toml).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Take every setting from a run's run.toml; "
                                                                 "flags given with it override its keys.")] = None,
    teacher: Annotated[str | None, typer.Option(help="HF dir, .gguf, builtin:NAME or openai:URL#MODEL "
                                                     "(default: builtin:smollm2-135m-instruct).")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Prompts JSONL, or builtin:NAME for a shipped domain: builtin:demo (alarm triage, the default) or "
             "builtin:workorders (work orders → JSON).")] = None,
    steps: Annotated[int | None, typer.Option(help="KD optimizer steps (default 30).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most N training prompts.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default 0).")] = None,
    allow_unverified: Annotated[bool | None, typer.Option(
        "--allow-unverified/--no-allow-unverified", help="Package an UNVERIFIED gate (recorded).")] = None,
    correct_teacher: Annotated[bool | None, typer.Option(
        "--correct-teacher/--no-correct-teacher",
        help="LoRA-SFT the teacher on the references first (teacher correction).")] = None,
    search_quality: Annotated[str | None, typer.Option(
        help="Which gated choices answer the holdout: until-pass (default: only where it can decide the "
             "verdict, i.e. before the first PASS and within the latency and memory budgets) or all.")] = None,
    format_regex: Annotated[str | None, typer.Option(
        help="As `distill data --format-regex`: the answer is a regex match (a `label` group is its label).")] = None,
    format_schema: Annotated[Path | None, typer.Option(
        help="As `distill data --format-schema`: the answer is JSON valid under this JSON Schema file.")] = None,
    system_prompt: Annotated[Path | None, typer.Option(
        help="As `distill data --system-prompt`: a text file with the task's system prompt.")] = None,
    holdout: Annotated[Path | None, typer.Option(
        help="As `distill data --holdout`: your own holdout prompts; then every --data row trains.")] = None,
    strict: Annotated[bool | None, typer.Option(
        "--strict/--no-strict", help="Stop at the first bad data line (default: skip each one, and report them).")
    ] = None,
    license_id: Annotated[str | None, typer.Option(
        "--license", help="Hub license id the model cards state (default: the teacher's recorded license).")] = None,
    device: Annotated[str | None, typer.Option(
        help="As `distill train --device`: auto, cpu, cuda or mps (default: the profile's [training] device).")
    ] = None,
    chat_template: Annotated[Path | None, typer.Option(
        help="As `distill data --chat-template`: a Jinja chat template for a teacher without one.")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="As `distill data --stop` (repeatable, up to 4): a stop string that ends the teacher's answers.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Run every stage end to end (export: every format the profile allows; gate: --search) and
    print the search table, the bundle path and the gate verdict."""
    from edgepack.console import emit, progress_bars, warn
    from edgepack.pipeline import resolve_config, run_pipeline

    path = lambda p: str(p) if p is not None else None  # noqa: E731
    overrides = {"profile": profile, "teacher": teacher, "data": path(data),
                 "steps": steps, "limit": limit, "seed": seed, "allow_unverified": allow_unverified,
                 "correct_teacher": correct_teacher, "search_quality": search_quality,
                 "format_regex": format_regex, "format_schema": path(format_schema),
                 "system_prompt": path(system_prompt), "holdout": path(holdout), "strict": strict,
                 "license": license_id, "device": device, "chat_template": path(chat_template),
                 "stop": stop or None}
    cfg = resolve_config(config=config, run_dir=out, overrides=overrides)
    from edgepack.logs import stage_log

    with stage_log("pipeline", cfg.run_dir), progress_bars(not json_out) as progress:
        result = run_pipeline(cfg, progress=progress)
    for line in result.get("warnings") or []:  # skipped bad data lines, merged label spellings...
        warn(line)
    emit(result, json_out, _print_result)
    if not result["bundle"]:
        raise typer.Exit(1)


def _print_result(r: dict[str, Any]) -> None:
    """The human form of the pipeline's result: the stage table, the gate --search table, the
    first reason of each failed choice, the bundle path and the gate verdict."""
    from rich.table import Table

    from edgepack.console import out as console

    t = Table("stage", "seconds", "result", title=f"pipeline {r['run_dir']}")
    for s in r["stages"]:
        t.add_row(s["stage"], f"{s['seconds']:.1f}", s["summary"])
    console.print(t)
    if r.get("summary"):
        from rich import box

        # Short headers so the table fits 80 columns: TTFT95 = TTFT p95 in ms, acc = holdout label
        # accuracy (score: the task's primary metric, named in the title), ×teach = that relative to
        # the teacher's.
        metric = next((row["primary_metric"] for row in r["summary"] if row.get("primary_metric")), "accuracy")
        score, named = ("acc", "") if metric == "accuracy" else ("score", f"; score = {metric}")
        g = Table(title=f"gate --search on {r['profile']}, best quality first (* packaged{named})",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for name in ("artifact", "fmt", "MB", "TTFT95", "tok/s", "peakMB", score, "×teach", "verdict"):
            g.add_column(name, no_wrap=True)
        for row in r["summary"]:
            row = {**row, "score": row["primary"] if row.get("primary") is not None else row["accuracy"]}
            cells = [str(row[k]) if row[k] is not None else "-" for k in
                     ("artifact", "format", "size_mb", "ttft_p95_ms", "decode_tokens_per_s", "peak_memory_mb",
                      "score", "relative_quality", "verdict")]
            if row["choice"] == r.get("packaged"):
                cells[-1] += "*"
            g.add_row(*cells)
        console.print(g)
        for row in r["summary"]:
            if row["verdict"] not in ("PASS", "skipped", "not exported") and row["reasons"]:
                console.print(f"{row['artifact']}: {row['reasons'][0]}", highlight=False, markup=False)
    console.print(f"bundle: [bold]{r['bundle']}[/bold]")
    console.print(f"gate verdict: [bold]{r['verdict']}[/bold]")
