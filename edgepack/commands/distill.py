"""`edgepack distill data|train` and `edgepack eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgepack.constants import BUILTIN_TEACHER, TEACHER_API_KEY_ENV

app = typer.Typer(help="Distillation: teacher data, then KD training.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
# --device/--precision of `distill train` and of teacher correction (`distill data`): device.py resolves them.
PrecisionOpt = Annotated[str, typer.Option(
    help="auto (fp32 on cpu, bf16 or fp16+scaling on GPUs), fp32, bf16 or fp16.")]


def _device_option(default: str, note: str = "") -> typer.models.OptionInfo:
    return typer.Option(help=f"cpu, cuda, mps or auto (default: {default}); refused when absent.{note}")


@app.command("data")
def data_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    teacher: Annotated[str, typer.Option(help="HF dir, .gguf, builtin:NAME or openai:URL#MODEL.")] = BUILTIN_TEACHER,
    data: Annotated[Path | None, typer.Option(
        help="Prompts JSONL, or builtin:NAME for a shipped domain: builtin:demo (alarm triage, the default) or "
             "builtin:workorders (work orders → JSON).")] = None,
    holdout: Annotated[Path | None, typer.Option(
        help="Your own holdout prompts (JSONL like --data); then every --data row trains.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most N training prompts.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 2 on the first bad row instead of skipping it.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split and sampling.")] = 0,
    correct_teacher: Annotated[bool, typer.Option(
        "--correct-teacher", help="First LoRA-SFT the teacher on the rows' references (teacher correction).")] = False,
    correct_steps: Annotated[int, typer.Option(help="Optimizer steps of teacher correction.")] = 40,
    device: Annotated[str | None, _device_option(
        "cpu", " Where --correct-teacher trains (auto: the first accelerator found, cuda then mps, else cpu).")] = None,
    precision: PrecisionOpt = "auto",
    samples: Annotated[int, typer.Option(help="Teacher answers per training prompt (greedy, then sampled).")] = 1,
    sample_temperature: Annotated[float, typer.Option(help="Temperature of the samples after the first.")] = 0.8,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Load a pickled HF checkpoint (.bin/.pt) through torch's weights-only loader.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Allow an HF teacher folder's own modeling code (auto_map).")] = False,
    concurrency: Annotated[int, typer.Option(help="Endpoint teacher: requests in flight at once.")] = 4,
    api_key_env: Annotated[str, typer.Option(
        help="Endpoint teacher: environment variable holding the API key (sent as a Bearer token).")
    ] = TEACHER_API_KEY_ENV,
    timeout: Annotated[float, typer.Option(
        help="Endpoint teacher: total seconds per request, connect to last byte, before a retry.")] = 120.0,
    format_regex: Annotated[str | None, typer.Option(
        help="Answer format: a regex the whole answer must match (DOTALL); a group named `label` is its label. "
             "Replaces the demo format check.")] = None,
    format_schema: Annotated[Path | None, typer.Option(
        help="Answer format: a JSON Schema file the answer (as JSON) must satisfy; a top-level `label` string is "
             "its label. Replaces the demo format check.")] = None,
    system_prompt: Annotated[Path | None, typer.Option(
        help="A text file with the task's system prompt, given to every row without a system turn of its own "
             "(default: the demo's for the demo, none for --data). Recorded in RUN/task.json.")] = None,
    chat_template: Annotated[Path | None, typer.Option(
        help="A Jinja chat template file for a teacher that has none (a base model), or to replace its own; "
             "rendered in the sandbox, written into RUN/teacher and so inherited by the student.")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="A stop string (repeatable, up to 4): each answer ends before the first one the teacher writes, "
             "as OpenAI's `stop` (a base model never ends its turn: e.g. --stop $'\\n').")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate, filter and store teacher data for distillation; write the task contract (RUN/task.json)."""
    from edgepack.console import emit, progress_bars, warn
    from edgepack.distill.correct import CorrectionConfig
    from edgepack.distill.data import build_dataset
    from edgepack.distill.endpoint import EndpointConfig
    from edgepack.stop import check_stop
    from edgepack.errors import UsageError
    from edgepack.logs import stage_log
    from edgepack.task import answer_from_options, read_system_prompt

    if not correct_teacher and (device is not None or precision != "auto"):
        raise UsageError("--device and --precision say where teacher correction trains; there is none to train",
                         hint="add --correct-teacher, or drop --device/--precision")
    answer_format = answer_from_options(format_regex, format_schema)
    system = read_system_prompt(system_prompt) if system_prompt is not None else None
    check_stop(tuple(stop or ()))
    with stage_log("data", out), progress_bars(not json_out) as progress:
        report = build_dataset(teacher=teacher, data=data, run_dir=out, limit=limit, strict=strict,
                               seed=seed, progress=progress, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code, correct=correct_teacher,
                               correction=CorrectionConfig(steps=correct_steps), samples=samples,
                               sample_temperature=sample_temperature,
                               endpoint=EndpointConfig(concurrency=concurrency, api_key_env=api_key_env,
                                                       timeout_s=timeout),
                               answer_format=answer_format, holdout=holdout, system_prompt=system,
                               device=device, precision=precision, chat_template=chat_template,
                               stop=tuple(stop or ()))
    if report.get("distillation") == "response-only":
        warn(f"response-only distillation: {report.get('distillation_reason')}")
    for line in report.get("warnings") or []:  # skipped bad lines, merged label spellings, refused invalid answers
        warn(line)
    emit(report, json_out)


@app.command("train")
def train_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by `distill data`.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    student: Annotated[str, typer.Option(
        help="`auto` (pruned from a local teacher) or an HF dir; a student with another tokenizer "
             "trains response-only (announced).")] = "auto",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint.")] = False,
    loss: Annotated[str, typer.Option(
        help="fkl, rkl, jsd, (with --soft-labels) sampled, or sft: cross-entropy on the teacher's text only.")] = "fkl",
    soft_labels: Annotated[bool, typer.Option(
        "--soft-labels", help="Distill against cached sparse soft labels (RUN/softlabels, built when missing) "
                              "instead of the online teacher.")] = False,
    soft_k: Annotated[int, typer.Option(help="Top-k tokens per position in the soft-label cache.")] = 32,
    soft_samples: Annotated[int, typer.Option(help="Importance-sampled tokens per position (0 = none).")] = 0,
    on_policy: Annotated[float, typer.Option(
        "--on-policy", help="On-policy distillation (GKD's lambda): the fraction of steps whose answers the student "
                            "samples and the teacher scores; 0 = off-policy only.")] = 0.0,
    on_policy_temperature: Annotated[float, typer.Option(help="The student's sampling temperature on "
                                                              "on-policy steps.")] = 1.0,
    on_policy_max_new: Annotated[int, typer.Option(help="Most tokens per sampled completion (0 = the longest "
                                                        "answer in the data).")] = 0,
    on_policy_teacher: Annotated[str, typer.Option(
        help="Who scores the sampled tokens: hf (the local teacher in torch), gguf (the run's GGUF teacher "
             "through llama.cpp), endpoint, or auto.")] = "auto",
    on_policy_after: Annotated[int, typer.Option(
        help="Off-policy warm-up: the first N steps train on the teacher's answers; --on-policy applies "
             "from step N on.")] = 0,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (merged at the end) instead of "
                                                      "letting the planner choose from the profile's memory.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning, whatever the planner would choose.")] = False,
    mlp_keep: Annotated[float, typer.Option(
        help="Width pruning of an `auto` student: keep this fraction of each block's MLP channels "
             "(the most active on calibration prompts); 1 = depth pruning only.")] = 1.0,
    variant: Annotated[str | None, typer.Option(
        help="Train into RUN/student-NAME instead of RUN/student (a baseline or another loss beside the main "
             "student; compare with `edgepack eval RUN --variants NAME`).")] = None,
    license_id: Annotated[str | None, typer.Option(
        "--license", help="Hub license id the model card states (default: the one recorded for the teacher).")] = None,
    optimizer: Annotated[str, typer.Option(
        help="auto (the planner: fp32 AdamW, or bitsandbytes' 8-bit on CUDA when needed), adamw (fp32 moments), "
             "adamw-bf16 (bf16 moments: half the optimizer state) or adamw8bit (CUDA).")] = "auto",
    teacher_precision: Annotated[str, typer.Option(
        help="The frozen teacher's dtype: auto (fp32 on cpu, the autocast precision on GPUs), fp32, bf16 "
             "(half the teacher's memory on cpu) or fp16 (GPUs).")] = "auto",
    checkpointing: Annotated[str, typer.Option(
        help="Gradient checkpointing: auto (the planner, when the profile's memory is short), on (less memory, "
             "each block's forward recomputed in backward) or off.")] = "auto",
    mmap_threshold: Annotated[int, typer.Option(
        help="glibc's malloc mmap threshold in bytes for this process (e.g. 65536): freed blocks that large go "
             "back to the OS, lowering the peak at some speed; 0 = glibc's default.")] = 0,
    device: Annotated[str | None, _device_option("the profile's [training] device")] = None,
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Distill the teacher into a student sized for the profile."""
    from edgepack.console import emit, progress_bars, warn
    from edgepack.distill.train import LOSS_NAMES, TrainConfig, train_student
    from edgepack.errors import UsageError
    from edgepack.logs import stage_log
    from edgepack.profiles import load_profile

    if loss not in LOSS_NAMES:
        raise UsageError(f"unknown --loss {loss!r}", hint=f"use one of {', '.join(LOSS_NAMES)}")
    if lora and full:
        raise UsageError("--lora and --full exclude each other", hint="give one, or neither to let the planner choose")
    prof = load_profile(profile)
    config = TrainConfig(divergence=LOSS_NAMES[loss], soft_labels=soft_labels, soft_k=soft_k,
                         soft_samples=soft_samples, on_policy=on_policy, on_policy_temperature=on_policy_temperature,
                         on_policy_max_new=on_policy_max_new, on_policy_teacher=on_policy_teacher,
                         on_policy_after=on_policy_after, optimizer=optimizer, teacher_precision=teacher_precision,
                         checkpointing=checkpointing, mmap_threshold=mmap_threshold)
    with stage_log("train", run), progress_bars(not json_out) as progress:
        report = train_student(run_dir=run, profile=prof, student=student, steps=steps, seed=seed,
                               resume=resume, progress=progress, config=config, variant=variant,
                               method="lora" if lora else "full" if full else "auto", mlp_keep=mlp_keep,
                               license=license_id, device=device, precision=precision)
    if report.get("mode_reason"):
        warn(f"{report['mode']} distillation: {report['mode_reason']}")
    aligned = report.get("endpoint_logprobs") or {}
    if aligned.get("unaligned_rows"):
        warn(f"{aligned['unaligned_rows']} of {aligned['rows']} rows: the endpoint's tokens do not match the student's "
             "tokenization, so those rows learned from the teacher's text only (cross-entropy)")
    plan = report.get("plan") or {}
    if plan.get("method") == "lora" and not lora:  # chosen by the planner, not asked for
        warn(f"the planner chose LoRA: full fine-tuning does not fit the profile's {plan['budget_mb']:.0f} MB of "
             "training memory (each candidate's estimate is in the report's plan.rejected)")
    emit(report, json_out)


def eval_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory with a trained student.")],
    variants: Annotated[str, typer.Option(
        help="Comma-separated students trained with `distill train --variant NAME` to compare too "
             "(e.g. `sft` for an SFT-only baseline).")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Compare teacher, undistilled student and distilled student on the holdout."""
    from edgepack.console import emit, progress_bars
    from edgepack.distill.evaluate import evaluate_run
    from edgepack.logs import stage_log

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    with stage_log("eval", run), progress_bars(not json_out) as progress:
        report = evaluate_run(run_dir=run, variants=names, progress=progress)
    emit(report, json_out, _eval_table)


def _eval_table(report: dict) -> None:
    """Metrics per model, then the share of the undistilled → teacher gap each student closed."""
    from rich.table import Table

    from edgepack.console import out
    from edgepack.distill.evaluate import GAP_METRICS

    columns = {"teacher": report["teacher"], "undistilled": report["undistilled"], "distilled": report["distilled"],
               **{f"variant {v}": e for v, e in report.get("variants", {}).items()}}
    table = Table(title=f"holdout: {report['holdout_rows']} rows, contamination {report['contamination']}")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    task = report.get("task") or {}
    for metric in (*GAP_METRICS, "format_rate", "params"):
        table.add_row(metric, *(fmt(e.get(metric)) for e in columns.values()))
    if task.get("primary_metric"):
        table.add_row(f"task ({task.get('kind')}): {task['primary_metric']}",
                      *(fmt(e.get("primary")) for e in columns.values()))
    gaps = {"distilled": report["gap_closed"], **{f"variant {v}": e["gap_closed"]
                                                 for v, e in report.get("variants", {}).items()}}
    for metric in GAP_METRICS:
        table.add_row(f"gap closed: {metric}", "", "", *(fmt(g.get(metric)) for g in gaps.values()))
    out.print(table)
    if report.get("kl_note"):
        out.print(report["kl_note"])
