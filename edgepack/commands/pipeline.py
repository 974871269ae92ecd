"""`edgepack pipeline`: teacher → data → KD → export → gate → bundle in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgepack.constants import BUILTIN_TEACHER


def pipeline_cmd(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (resumable).")],
    teacher: Annotated[str, typer.Option(help="HF dir, .gguf, builtin:NAME or openai:URL#MODEL.")] = BUILTIN_TEACHER,
    data: Annotated[Path | None, typer.Option(help="Prompts JSONL (default: the shipped demo domain).")] = None,
    steps: Annotated[int, typer.Option(help="KD optimizer steps.")] = 30,
    limit: Annotated[int | None, typer.Option(help="Use at most N training prompts.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    allow_unverified: Annotated[bool, typer.Option(help="Package an UNVERIFIED gate (recorded).")] = False,
    correct_teacher: Annotated[bool, typer.Option(
        "--correct-teacher", help="LoRA-SFT the teacher on the references first (teacher correction).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Run every stage end to end and print the bundle path and the gate verdict."""
    from edgepack.console import emit, out as console, progress_bars
    from edgepack.constants import PASS
    from edgepack.pipeline import PipelineConfig, run_pipeline
    from edgepack.profiles import load_profile

    cfg = PipelineConfig(profile=load_profile(profile), teacher=teacher, data=data, run_dir=out,
                         steps=steps, limit=limit, seed=seed, allow_unverified=allow_unverified,
                         correct_teacher=correct_teacher)
    with progress_bars(not json_out) as progress:
        result = run_pipeline(cfg, progress=progress)

    def human(r: dict[str, Any]) -> None:
        from rich.table import Table

        t = Table("stage", "seconds", "result", title=f"pipeline {r['run_dir']}")
        for s in r["stages"]:
            t.add_row(s["stage"], f"{s['seconds']:.1f}", s["summary"])
        console.print(t)
        if r.get("summary"):
            g = Table("artifact", "MB", "TTFT p95 ms", "tok/s", "peak MB", "accuracy", "× teacher", "verdict",
                      title=f"gate on {r['profile']}")
            for row in r["summary"]:
                g.add_row(*(str(row[k]) if row[k] is not None else "-" for k in
                            ("artifact", "size_mb", "ttft_p95_ms", "decode_tokens_per_s", "peak_memory_mb",
                             "accuracy", "relative_quality", "verdict")))
            console.print(g)
        console.print(f"bundle: [bold]{r['bundle']}[/bold]")
        console.print(f"gate verdict: [bold]{r['verdict']}[/bold]")

    emit(result, json_out, human)
    if not result["bundle"]:
        raise typer.Exit(1)
