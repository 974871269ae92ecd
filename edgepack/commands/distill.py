"""`edgepack distill data|train` and `edgepack eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgepack.constants import BUILTIN_TEACHER

app = typer.Typer(help="Distillation: teacher data, then KD training.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


@app.command("data")
def data_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    teacher: Annotated[str, typer.Option(help="HF dir, .gguf, builtin:NAME or openai:URL#MODEL.")] = BUILTIN_TEACHER,
    data: Annotated[Path | None, typer.Option(help="Prompts JSONL (default: the shipped demo domain).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most N training prompts.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 2 on the first bad row instead of skipping it.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split and sampling.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Generate, filter and store teacher data for distillation."""
    from edgepack.console import emit, progress_bars
    from edgepack.distill.data import build_dataset

    with progress_bars(not json_out) as progress:
        report = build_dataset(teacher=teacher, data=data, run_dir=out, limit=limit, strict=strict,
                               seed=seed, progress=progress)
    emit(report, json_out)


@app.command("train")
def train_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by `distill data`.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    student: Annotated[str, typer.Option(help="`auto` or an HF dir sharing the teacher's tokenizer.")] = "auto",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Distill the teacher into a student sized for the profile."""
    from edgepack.console import emit, progress_bars
    from edgepack.distill.train import train_student
    from edgepack.profiles import load_profile

    prof = load_profile(profile)
    with progress_bars(not json_out) as progress:
        report = train_student(run_dir=run, profile=prof, student=student, steps=steps, seed=seed,
                               resume=resume, progress=progress)
    emit(report, json_out)


def eval_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory with a trained student.")],
    json_out: JsonOpt = False,
) -> None:
    """Compare teacher, undistilled student and distilled student on the holdout."""
    from edgepack.console import emit, progress_bars
    from edgepack.distill.evaluate import evaluate_run

    with progress_bars(not json_out) as progress:
        report = evaluate_run(run_dir=run, progress=progress)
    emit(report, json_out)
