"""One command from teacher to bundle: distill data → train → eval → export → gate → pack → run.

Each stage reads the files the previous one wrote in the run directory and is skipped
when its output is already complete, so a rerun of the same command resumes. ``run.toml``
is written once inputs are validated, before any stage runs, and holds every setting of
:class:`PipelineConfig`; :func:`config_from_settings` turns it back into one
(``edgepack pipeline --config RUN/run.toml``).

Export makes every format and quantization the profile's ``choices`` allow (GGUF and
ONNX); the gate stage is ``gate --search`` (:func:`edgepack.export.gate.search.search`): it
gates the choices best quality first, the first that passes every budget is packaged, and
the whole table goes into ``pipeline.json``.

Each stage call (:func:`distill_data`, :func:`distill_train`, :func:`evaluate`,
:func:`export_artifacts`, :func:`gate_search`, :func:`pack_bundle`, :func:`smoke_run`) returns
a frozen result (:class:`DataResult` ... :class:`SmokeResult`) with the line the stage table
shows; :func:`run_pipeline` passes results on and assembles ``pipeline.json`` from them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edgepack.atomic import write_json
from edgepack.constants import (ARTIFACTS_DIR, BUNDLE_SUFFIX, BUNDLES_DIR, DATA_DIR, EXPORT_REPORT, FAIL,
                                HOLDOUT_FILE, M_GATE, M_TASK, PASS, RUN_DATA, RUN_PROFILE, RUN_SEED, RUN_TEACHER, UNVERIFIED)
from edgepack.errors import UsageError
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress
from edgepack.provenance import load_average, machine_info
from edgepack.runconfig import (PIPELINE_SETTINGS, RUN_METADATA, check_pipeline_settings, load_pipeline_config,
                                pipeline_defaults, write_run_config)

PIPELINE_FILE = "pipeline.json"
_D = PIPELINE_SETTINGS  # the defaults live with run.toml's keys, in one table


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``edgepack pipeline`` was asked to do (mirrored into run.toml)."""

    profile: Profile
    """The device profile: budgets, the student's size and the export choices."""
    teacher: str
    """Teacher spec: HF dir, .gguf, builtin:NAME or openai:URL#MODEL."""
    data: Path | None
    """Prompts JSONL, or ``builtin:NAME`` (a shipped domain, see distill/shipped.py); None = the demo."""
    run_dir: Path
    """The run directory (not in run.toml: it is where run.toml lives)."""
    steps: int = _D["steps"].default
    """KD optimizer steps."""
    limit: int | None = _D["limit"].default
    """Use at most this many training prompts; None = all."""
    seed: int = _D[RUN_SEED].default
    allow_unverified: bool = _D["allow_unverified"].default
    """Package an UNVERIFIED gate (the profile's device is not this machine)."""
    correct_teacher: bool = _D["correct_teacher"].default
    """LoRA-SFT the teacher on the references before it labels the data."""
    search_quality: str = _D["search_quality"].default
    """Which gated choices answer the holdout: ``all``, or ``until-pass`` (see export/gate/search.py)."""
    format_regex: str | None = _D["format_regex"].default
    """``distill data --format-regex``: a regex the whole answer must match (a ``regex`` task)."""
    format_schema: Path | None = _D["format_schema"].default
    """``distill data --format-schema``: the answer's JSON Schema file (a ``json`` task)."""
    system_prompt: Path | None = _D["system_prompt"].default
    """``distill data --system-prompt``: a file with the task's system prompt."""
    holdout: Path | None = _D["holdout"].default
    """``distill data --holdout``: your own holdout prompts; then every data row trains."""
    strict: bool = _D["strict"].default
    """``distill data --strict``: the first bad data line stops the run (else each is skipped, and reported)."""
    license: str | None = _D["license"].default
    """``distill train`` / ``pack --license``: the license the model cards state (None: the teacher's)."""
    device: str | None = _D["device"].default
    """``distill train --device``, and ``distill data --device`` when the teacher is corrected: auto, cpu,
    cuda or mps (None: the profile's ``[training] device``)."""
    chat_template: Path | None = _D["chat_template"].default
    """``distill data --chat-template``: the teacher's chat template file (a base model has none)."""
    stop: tuple[str, ...] = ()
    """``distill data --stop``: stop strings that end the teacher's answers (run.toml: a list; absent: none)."""

    def settings(self) -> dict[str, Any]:
        """run.toml's keys for this config (:data:`edgepack.runconfig.PIPELINE_SETTINGS`)."""
        path = lambda p: None if p is None else str(p)  # noqa: E731
        return {RUN_PROFILE: self.profile.name if Path(self.profile.source).parent == _shipped_dir()
                else self.profile.source, RUN_TEACHER: self.teacher,
                RUN_DATA: str(self.data) if self.data else _D[RUN_DATA].default, RUN_SEED: self.seed,
                "steps": self.steps, "limit": self.limit, "allow_unverified": self.allow_unverified,
                "correct_teacher": self.correct_teacher, "search_quality": self.search_quality,
                "format_regex": self.format_regex, "format_schema": path(self.format_schema),
                "system_prompt": path(self.system_prompt), "holdout": path(self.holdout), "strict": self.strict,
                "license": self.license, "device": self.device, "chat_template": path(self.chat_template),
                "stop": list(self.stop) or None}


def config_from_settings(settings: dict[str, Any], run_dir: Path) -> PipelineConfig:
    """A :class:`PipelineConfig` from run.toml keys; absent keys take their defaults.

    Unknown keys or bad values raise one UsageError naming each key; ``profile`` is required.
    """
    from edgepack.profiles import load_profile

    check_pipeline_settings(settings, source="pipeline settings")
    if settings.get(RUN_PROFILE) is None:
        raise UsageError("no profile given", hint="pass --profile NAME, or --config RUN/run.toml")
    s = pipeline_defaults() | {k: v for k, v in settings.items() if v is not None and k not in RUN_METADATA}
    data = s[RUN_DATA]
    path = lambda key: None if s[key] is None else Path(s[key])  # noqa: E731
    return PipelineConfig(profile=load_profile(str(s[RUN_PROFILE])), teacher=s[RUN_TEACHER],
                          data=None if data == _D[RUN_DATA].default else Path(data), run_dir=Path(run_dir),
                          steps=s["steps"], limit=s["limit"], seed=s[RUN_SEED],
                          allow_unverified=s["allow_unverified"], correct_teacher=s["correct_teacher"],
                          search_quality=s["search_quality"], format_regex=s["format_regex"],
                          format_schema=path("format_schema"), system_prompt=path("system_prompt"),
                          holdout=path("holdout"), strict=s["strict"], license=s["license"], device=s["device"],
                          chat_template=path("chat_template"), stop=tuple(s["stop"] or ()))


def resolve_config(*, config: Path | None, run_dir: Path | None, overrides: dict[str, Any]) -> PipelineConfig:
    """The pipeline's settings: defaults, then ``config``'s run.toml, then ``overrides`` (the flags given).

    A flag given alongside ``--config`` overrides that key of the file (a new ``--out`` then
    starts a run that differs only there; the same ``--out`` refuses the change). Without
    ``run_dir`` the run is the folder holding ``config`` (that run resumes).
    """
    settings: dict[str, Any] = {}
    if config is not None:
        settings = load_pipeline_config(config)
        if run_dir is None:
            run_dir = (Path(config) if Path(config).is_dir() else Path(config).parent)
    if run_dir is None:
        raise UsageError("no run directory given", hint="pass --out RUN (or --config RUN/run.toml to resume RUN)")
    return config_from_settings(settings | {k: v for k, v in overrides.items() if v is not None}, run_dir)


def command_line(settings: dict[str, Any], run_dir: Path) -> str:
    """The ``edgepack pipeline`` command for run.toml ``settings`` (profile and teacher always,
    other flags where they differ from the default)."""
    import shlex

    s = pipeline_defaults() | {k: v for k, v in settings.items() if k not in RUN_METADATA}
    words = ["edgepack", "pipeline", "--profile", str(s[RUN_PROFILE]), "--teacher", str(s[RUN_TEACHER]),
             "--out", str(run_dir)]
    for key, spec in PIPELINE_SETTINGS.items():
        value = s.get(key)
        if key in (RUN_PROFILE, RUN_TEACHER) or value is None or value == spec.default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):  # a repeatable flag (--stop)
            words += [w for v in value for w in (flag, v)]
            continue
        words += [flag if value else "--no-" + key.replace("_", "-")] if isinstance(value, bool) else [flag, str(value)]
    return shlex.join(words)


def _shipped_dir() -> Path:
    from edgepack.profiles import PROFILE_DIR

    return PROFILE_DIR


def _validate_inputs(cfg: PipelineConfig) -> None:
    """Fail on bad input before anything is written under the run directory: the settings, the
    teacher spec, the data and holdout (as ``distill data`` reads them), the answer format, the
    system prompt file and the training device (where teacher correction and ``distill train`` run)."""
    from edgepack.distill.data import check_inputs
    from edgepack.distill.device import resolve_device
    from edgepack.distill.teachers import resolve_teacher

    check_pipeline_settings(cfg.settings(), source="pipeline settings")
    resolve_device(cfg.device, cfg.profile.train_device)
    resolve_teacher(cfg.teacher, chat_template=cfg.chat_template)
    _task_options(cfg)
    check_inputs(cfg.data, holdout=cfg.holdout, strict=cfg.strict, limit=cfg.limit)


def _task_options(cfg: PipelineConfig) -> dict[str, Any]:
    """``build_dataset``'s task arguments from the pipeline's flags (each checked: a regex that
    does not compile, a schema that is not one, an empty system prompt file are UsageErrors)."""
    from edgepack.task import answer_from_options, read_system_prompt

    return {"answer_format": answer_from_options(cfg.format_regex, cfg.format_schema),
            "system_prompt": read_system_prompt(cfg.system_prompt) if cfg.system_prompt is not None else None}


# --- what each stage returns ----------------------------------------------------------------------
# Each stage call returns one frozen result; run_pipeline assembles pipeline.json from them, so no
# stage fills in a dict another one reads. ``summary`` is the one line the stage table shows.

@dataclass(frozen=True)
class DataResult:
    """``distill data``: RUN/data written (or reused)."""

    summary: str
    report: dict[str, Any]
    """build_dataset's report (kept/dropped rows, teacher correction...)."""

    @property
    def warnings(self) -> list[str]:
        """What the user should know about the data (skipped bad lines, merged label spellings...)."""
        return list(self.report.get("warnings") or [])


@dataclass(frozen=True)
class TrainResult:
    """``distill train``: RUN/student written (or resumed)."""

    summary: str
    report: dict[str, Any]
    """train_student's report (steps, final loss, parameters...)."""


@dataclass(frozen=True)
class EvalResult:
    """Teacher vs undistilled vs distilled student on the holdout (RUN/eval.json)."""

    summary: str
    scores: dict[str, dict[str, Any]]
    """``teacher`` / ``undistilled`` / ``distilled`` → label_accuracy, teacher_label_agreement, kl, ce and
    ``primary``, the task's primary metric (eval.json's ``task.primary_metric``)."""
    gap_closed: Any
    contamination: Any

    def as_report(self) -> dict[str, Any]:
        """pipeline.json's ``eval`` object."""
        return {**self.scores, "gap_closed": self.gap_closed, "contamination": self.contamination}


@dataclass(frozen=True)
class ExportResult:
    """Every format and quantization the profile allows, on disk (RUN/artifacts/export.json)."""

    summary: str
    artifacts: tuple[dict[str, Any], ...]
    """export.json's artifact entries."""


@dataclass(frozen=True)
class GateResult:
    """``gate --search`` over the run: every choice's row, best quality first."""

    summary: str
    search: dict[str, Any]
    """search()'s report (:func:`edgepack.export.gate.search.search`)."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.search["rows"])

    @property
    def chosen(self) -> str | None:
        return self.search["chosen"]

    @property
    def verdict(self) -> str:
        return self.search["verdict"]


@dataclass(frozen=True)
class PackResult:
    """The bundle made (or reused) for the gate's choice; nothing when no choice passed."""

    summary: str
    choice: str | None = None
    """``format:quant`` packaged."""
    bundle: str | None = None
    """Path of the bundle."""


@dataclass(frozen=True)
class SmokeResult:
    """The finished bundle loaded as a device would, answering one holdout prompt."""

    summary: str
    sample: dict[str, str]
    """``prompt`` and ``completion``."""


class _StageResult(Protocol):
    @property
    def summary(self) -> str: ...


_R = TypeVar("_R", bound=_StageResult)


class _StageTimer:
    """Runs stage calls in order, reporting progress and recording each one's seconds and summary."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], _R]) -> _R:
        t0 = time.perf_counter()
        self.progress(f"pipeline: {name}", 0, 1)
        result = fn()
        self.progress(f"pipeline: {name}", 1, 1)
        self.records.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2), "summary": result.summary})
        return result


def run_pipeline(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Run (or resume) every stage; return pipeline.json's contents (bundle path, verdict, tables)."""
    _validate_inputs(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_run_config(run, cfg.settings(), defaults=pipeline_defaults())
    started, load_start = _now(), load_average()
    stages = _StageTimer(progress)
    data = stages.run("distill data", lambda: distill_data(cfg, progress))
    stages.run("distill train", lambda: distill_train(cfg, progress))
    evaluation = stages.run("eval", lambda: evaluate(cfg, progress))
    stages.run("export", lambda: export_artifacts(cfg, progress))
    gate = stages.run("gate", lambda: gate_search(cfg, progress))
    packed = stages.run("pack", lambda: pack_bundle(cfg, gate))
    smoke = None
    if packed.bundle:
        bundle = Path(packed.bundle)
        smoke = stages.run("run", lambda: smoke_run(run, bundle))
    rows = [summary_row(r) for r in gate.rows]
    result = {"run_dir": str(run), "profile": cfg.profile.name, "command": command_line(cfg.settings(), run),
              "machine": machine_info(), "started": started, "finished": _now(),
              "load_average": {"start": load_start, "end": load_average()},
              "seconds": round(sum(s["seconds"] for s in stages.records), 2), "stages": stages.records,
              "gates": [{k: r.get(k) for k in ("artifact", "format", "quant", "verdict", "reasons")}
                        for r in rows if r["verdict"] in (PASS, FAIL, UNVERIFIED)],
              "verdict": gate.verdict, "chosen": gate.chosen, "packaged": packed.choice, "bundle": packed.bundle,
              "sample": smoke.sample if smoke else {}, "eval": evaluation.as_report(), "summary": rows,
              "search": {k: gate.search.get(k) for k in ("pareto", "pareto_axes", "notes", "search_quality",
                                                         "best_on_this_host", "holdout")},
              "warnings": data.warnings}
    write_json(run / PIPELINE_FILE, result)
    return result


def distill_data(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> DataResult:
    """The teacher labels the prompts into RUN/data (reused when complete)."""
    from edgepack.distill.data import build_dataset

    report = build_dataset(teacher=cfg.teacher, data=cfg.data, run_dir=cfg.run_dir, limit=cfg.limit,
                           strict=cfg.strict, seed=cfg.seed, progress=progress, correct=cfg.correct_teacher,
                           holdout=cfg.holdout, device=cfg.device, profile_device=cfg.profile.train_device,
                           chat_template=cfg.chat_template, stop=cfg.stop,
                           **_task_options(cfg))
    fixed = report.get("teacher_correction")
    # A task without labels (json, text) has no label accuracy to show for the correction.
    note = (f", teacher {fixed.get('metric', 'accuracy')} {fixed['score_before']} → {fixed['score_after']} "
            "after correction" if fixed and fixed.get("score_after") is not None else "")
    return DataResult(_short(report, ("kept", "dropped")) + note + _skipped(report), report)


def _skipped(report: dict[str, Any], shown: int = 5) -> str:
    """``, 3 bad data lines skipped (lines 4, 9, holdout.jsonl:2)``, or "" when none was."""
    bad = report.get("bad_row_details") or []
    if not report.get("bad_rows"):
        return ""
    lines = ", ".join(f"{Path(b['file']).name}:{b['line']}" if b.get("file") else str(b["line"]) for b in bad[:shown])
    return f", {report['bad_rows']} bad data line{'s' if report['bad_rows'] > 1 else ''} skipped (lines {lines})"


def distill_train(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> TrainResult:
    """Knowledge distillation into RUN/student (resumed from its checkpoint)."""
    from edgepack.distill.train import train_student

    report = train_student(run_dir=cfg.run_dir, profile=cfg.profile, student="auto", steps=cfg.steps,
                           seed=cfg.seed, resume=True, progress=progress, license=cfg.license,
                           device=cfg.device)
    return TrainResult(_short(report, ("steps", "final_loss", "params")), report)


def evaluate(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> EvalResult:
    """Teacher vs undistilled vs distilled student on the holdout (RUN/eval.json, reused on a rerun
    unless the student is newer)."""
    from edgepack.constants import EVAL_REPORT, STUDENT_DIR
    from edgepack.distill.evaluate import evaluate_run

    run = Path(cfg.run_dir)
    report = _read_json(run / EVAL_REPORT)
    if not report or (run / EVAL_REPORT).stat().st_mtime < (run / STUDENT_DIR).stat().st_mtime:
        report = evaluate_run(run_dir=run, progress=progress)
    scores = {name: {k: report[name].get(k) for k in ("label_accuracy", "teacher_label_agreement", "kl", "ce",
                                                      "primary")}
              for name in ("teacher", "undistilled", "distilled") if name in report}
    # The task's primary metric (label accuracy for the demo); eval.json before the task contract has only that.
    metric = (report.get("task") or {}).get("primary_metric") or "accuracy"
    value = {name: _round(s["primary"], 4) if s.get("primary") is not None else s.get("label_accuracy")
             for name, s in scores.items()}
    summary = (f"holdout {metric}: undistilled {value.get('undistilled')} → distilled {value.get('distilled')} "
               f"(teacher {value.get('teacher')})")
    return EvalResult(summary, scores, report.get("gap_closed"), report.get("contamination"))


def export_plan(profile: Profile) -> dict[str, list[str]]:
    """Format → quantizations to export, every choice the profile allows, in its order."""
    plan: dict[str, list[str]] = {}
    for choice in profile.choices:
        quants = plan.setdefault(choice.format.lower(), [])
        if choice.quant not in quants:
            quants.append(choice.quant)
    return plan


def export_artifacts(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> ExportResult:
    """Export each format whose choices are not all on disk yet (a rerun reuses the artifacts).

    ``export_model`` measures fidelity over every artifact in the folder, so only the last
    format exported in this call measures it: one pass covers GGUF and ONNX.
    """
    from edgepack.export.api import export_model

    folder = Path(cfg.run_dir) / ARTIFACTS_DIR
    plan = export_plan(cfg.profile)
    have = {(str(a["format"]).lower(), str(a["quant"]).lower())
            for a in _read_json(folder / EXPORT_REPORT).get("artifacts", []) if (folder / a["path"]).exists()}
    todo = [fmt for fmt, quants in plan.items() if any((fmt, q.lower()) not in have for q in quants)]
    for i, fmt in enumerate(todo):
        export_model(source=Path(cfg.run_dir), fmt=fmt, quants=plan[fmt], out_dir=None, progress=progress,
                     fidelity=i == len(todo) - 1)
    artifacts = tuple(_read_json(folder / EXPORT_REPORT)["artifacts"])
    return ExportResult(", ".join(f"{a['format']} {a['quant']} {_size_mb(folder / a['path']):.1f} MB"
                                  for a in artifacts), artifacts)


def gate_search(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> GateResult:
    """``gate --search`` over the run: every choice gated, best quality first (reports reused)."""
    from edgepack.export.gate.search import search

    run = Path(cfg.run_dir)
    holdout = run / DATA_DIR / HOLDOUT_FILE
    found = search(profile=cfg.profile, run_dir=run, holdout=holdout if holdout.is_file() else None,
                   progress=progress, quality=cfg.search_quality)
    summary = "; ".join(f"{r['choice']}: {r['verdict'] or r['status']}" for r in found["rows"]) + \
        f"; chosen: {found['chosen'] or 'none'}"
    return GateResult(summary, found)


def pack_bundle(cfg: PipelineConfig, gate: GateResult) -> PackResult:
    """Package the search's choice (or, with allow_unverified, the best UNVERIFIED one); an earlier
    bundle is reused only when it holds exactly that artifact, gated for this profile."""
    from edgepack.export.pack.pack import pack_run

    chosen = next((r for r in gate.rows if r["choice"] == gate.chosen), None)
    if chosen is None and cfg.allow_unverified:
        chosen = next((r for r in gate.rows if r["verdict"] == UNVERIFIED), None)
    if chosen is None:
        return PackResult("nothing packaged: no artifact passed the gate")
    fmt, quant = chosen["choice"].split(":", 1)
    existing = sorted((Path(cfg.run_dir) / BUNDLES_DIR).glob(f"*-{cfg.profile.name}-{fmt}-{quant}{BUNDLE_SUFFIX}"))
    if existing and _holds(existing[0], Path(chosen["path"]), cfg.profile, Path(cfg.run_dir), chosen["report"]):
        return PackResult(f"{existing[0].name} (already packaged)", chosen["choice"], str(existing[0]))
    result = pack_run(run_dir=Path(cfg.run_dir), profile=cfg.profile, artifact=Path(chosen["path"]),
                      allow_unverified=cfg.allow_unverified, license=cfg.license)
    return PackResult(Path(result["bundle"]).name, chosen["choice"], result["bundle"])


def _holds(bundle: Path, artifact: Path, profile: Profile, run_dir: Path, report: str | None) -> bool:
    """Whether an earlier ``bundle`` verifies and holds exactly ``artifact``'s bytes, gated for
    this ``profile``, with the gate report the search chose (``report``) and the run's task now;
    a stale, damaged or foreign file under the bundle's name, or one packed before the task or
    the report changed, is packed again."""
    from edgepack.errors import BundleError, RunDirError
    from edgepack.export.gate.gate import artifact_digest
    from edgepack.export.pack.trust import check_bundle_binding, read_run_task
    from edgepack.runtime.bundle.archive import verify_bundle

    try:
        manifest = verify_bundle(bundle)
        check_bundle_binding(manifest, artifact, artifact_digest(artifact))
        gated = json.loads(Path(report).read_text(encoding="utf-8")) if report else {}
        gated = {k: v for k, v in gated.items() if not k.startswith("_")}  # as pack writes it
        task = read_run_task(run_dir)[0].to_json()
    except (BundleError, RunDirError, OSError, ValueError):
        return False
    return ((manifest.get(M_GATE) or {}).get("profile_sha256") == profile.content_hash()
            and manifest.get(M_GATE) == gated and manifest.get(M_TASK) == task)


def smoke_run(run: Path, bundle: Path) -> SmokeResult:
    """Load the finished bundle the way a device would and answer one holdout prompt sent bare (the
    user turn alone): the bundle's task supplies the system prompt, the decoding and, for a json
    task on a backend that constrains JSON, the schema, as ``edgepack run`` applies them."""
    from edgepack.runtime.session import open_model

    with open(run / DATA_DIR / HOLDOUT_FILE, encoding="utf-8") as fh:
        prompt = json.loads(fh.readline())["messages"][-1]["content"]
    with open_model(bundle) as session:
        messages, decoding, schema = session.apply_task([{"role": "user", "content": prompt}])
        text = "".join(session.answer(messages, decoding, schema))
    return SmokeResult(text.strip().replace("\n", " ")[:80], {"prompt": prompt, "completion": text})


def summary_row(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the pipeline's table from a search row: artifact, format, size, latency,
    memory, quality (label accuracy, and the task's primary metric), verdict (``not exported`` /
    ``skipped`` when it was not gated)."""
    report = _read_json(Path(row["report"])) if row.get("report") else {}
    quality = (report.get("measurements") or {}).get("quality") or {}
    fmt, quant = row["choice"].split(":", 1)
    return {"choice": row["choice"], "artifact": row.get("artifact"), "format": fmt, "quant": quant,
            "size_mb": _round(row.get("size_mb")), "ttft_p95_ms": _round(row.get("ttft_p95_ms")),
            "decode_tokens_per_s": _round(row.get("decode_tokens_per_s")),
            "peak_memory_mb": _round(row.get("peak_rss_mb")),
            "accuracy": _round(quality.get("accuracy"), 3), "primary_metric": quality.get("primary_metric"),
            "primary": _round(quality.get("primary"), 3), "relative_quality": _round(row.get("quality"), 3),
            "quality_measured": row.get("quality_measured", False),
            "efficiency": _round(row.get("efficiency"), 3), "verdict": row.get("verdict") or row.get("status"),
            "reasons": row.get("reasons", []), "pareto": row.get("pareto", False), "reused": row.get("reused", False),
            "report": row.get("report")}


def _round(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _size_mb(path: Path) -> float:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return size / 2**20


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _short(report: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={report[k]}" for k in keys if k in report) or "done"
