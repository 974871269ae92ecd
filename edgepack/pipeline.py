"""One command from teacher to bundle: distill data → train → export → gate → pack.

Each stage reads the files the previous one wrote in the run directory and is skipped
when its output is already complete, so a rerun of the same command resumes. ``run.toml``
is written once inputs are validated, before any stage runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.atomic import write_json
from edgepack.constants import (ARTIFACTS_DIR, BUNDLES_DIR, DATA_DIR, EXPORT_REPORT, GATE_DIR,
                                HOLDOUT_FILE, PASS, RUN_DATA, RUN_PROFILE, RUN_SEED, RUN_TEACHER,
                                UNVERIFIED)
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``edgepack pipeline`` was asked to do (mirrored into run.toml)."""

    profile: Profile
    teacher: str
    data: Path | None
    run_dir: Path
    steps: int = 30
    limit: int | None = None
    seed: int = 0
    allow_unverified: bool = False
    correct_teacher: bool = False

    def settings(self) -> dict[str, Any]:
        return {RUN_PROFILE: self.profile.name if self.profile.source.startswith(str(_shipped_dir()))
                else self.profile.source, RUN_TEACHER: self.teacher,
                RUN_DATA: str(self.data) if self.data else "builtin:demo", RUN_SEED: self.seed,
                "steps": self.steps, "limit": self.limit, "allow_unverified": self.allow_unverified,
                "correct_teacher": self.correct_teacher}


def _shipped_dir() -> Path:
    from edgepack.profiles import PROFILE_DIR

    return PROFILE_DIR


def _validate_inputs(cfg: PipelineConfig) -> None:
    """Fail on bad input before anything is written under the run directory."""
    from edgepack.distill.data import load_prompts
    from edgepack.distill.teachers import resolve_teacher

    resolve_teacher(cfg.teacher)
    if cfg.data is not None:
        load_prompts(cfg.data, strict=False)


def run_pipeline(cfg: PipelineConfig, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Run (or resume) every stage; return a summary with the bundle path and the verdict."""
    from edgepack.runconfig import write_run_config

    _validate_inputs(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_run_config(run, cfg.settings())
    stages: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        progress(f"pipeline: {name}", 0, 1)
        summary = fn()
        progress(f"pipeline: {name}", 1, 1)
        stages.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2), "summary": summary})

    stage("distill data", lambda: _distill_data(cfg, progress))
    stage("distill train", lambda: _distill_train(cfg, progress))
    evaluation: dict[str, Any] = {}
    stage("eval", lambda: _evaluate(cfg, evaluation, progress))
    stage("export", lambda: _export(cfg, progress))
    gate_results: list[dict[str, Any]] = []
    stage("gate", lambda: _gate(cfg, gate_results, progress))
    bundle: dict[str, Any] = {}
    stage("pack", lambda: _pack(cfg, gate_results, bundle))
    sample: dict[str, str] = {}
    if bundle.get("bundle"):
        stage("run", lambda: _smoke_run(run, Path(bundle["bundle"]), sample))
    chosen = next((g for g in gate_results if g["verdict"] == PASS), None) or \
        next((g for g in gate_results if g["verdict"] == UNVERIFIED), None) or \
        (gate_results[0] if gate_results else {"verdict": "NOT RUN"})
    result = {"run_dir": str(run), "profile": cfg.profile.name, "stages": stages,
              "gates": [{k: g.get(k) for k in ("artifact", "quant", "verdict", "reasons")}
                        for g in gate_results],
              "verdict": chosen["verdict"], "bundle": bundle.get("bundle"), "sample": sample,
              "eval": evaluation, "summary": [summary_row(g) for g in gate_results]}
    write_json(run / "pipeline.json", result)
    return result


def _distill_data(cfg: PipelineConfig, progress: ProgressFn) -> str:
    from edgepack.distill.data import build_dataset

    report = build_dataset(teacher=cfg.teacher, data=cfg.data, run_dir=cfg.run_dir, limit=cfg.limit,
                           strict=False, seed=cfg.seed, progress=progress, correct=cfg.correct_teacher)
    fixed = report.get("teacher_correction")
    note = (f", teacher accuracy {fixed['accuracy_before']} → {fixed['accuracy_after']} after correction"
            if fixed else "")
    return _short(report, ("kept", "dropped")) + note


def _distill_train(cfg: PipelineConfig, progress: ProgressFn) -> str:
    from edgepack.distill.train import train_student

    report = train_student(run_dir=cfg.run_dir, profile=cfg.profile, student="auto", steps=cfg.steps,
                           seed=cfg.seed, resume=True, progress=progress)
    return _short(report, ("steps", "final_loss", "params"))


def _evaluate(cfg: PipelineConfig, out: dict[str, Any], progress: ProgressFn) -> str:
    """Teacher vs undistilled vs distilled student on the holdout (RUN/eval.json, reused on a rerun)."""
    from edgepack.constants import EVAL_REPORT, STUDENT_DIR
    from edgepack.distill.evaluate import evaluate_run

    run = Path(cfg.run_dir)
    report = _read_json(run / EVAL_REPORT)
    if not report or (run / EVAL_REPORT).stat().st_mtime < (run / STUDENT_DIR).stat().st_mtime:
        report = evaluate_run(run_dir=run, progress=progress)
    out.update({name: {k: report[name].get(k) for k in ("label_accuracy", "teacher_label_agreement", "kl", "ce")}
                for name in ("teacher", "undistilled", "distilled") if name in report})
    out["gap_closed"] = report.get("gap_closed")
    out["contamination"] = report.get("contamination")
    acc = {name: out.get(name, {}).get("label_accuracy") for name in ("undistilled", "distilled", "teacher")}
    return (f"holdout accuracy: undistilled {acc['undistilled']} → distilled {acc['distilled']} "
            f"(teacher {acc['teacher']})")


def summary_row(gate: dict[str, Any]) -> dict[str, Any]:
    """One line of the pipeline's table: artifact, size, latency, memory, quality, verdict."""
    m = gate.get("measurements") or {}
    quality = m.get("quality") or {}
    artifact = Path(str(gate.get("artifact", "")))
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else \
        (artifact.stat().st_size if artifact.is_file() else None)
    return {"artifact": artifact.name, "format": gate.get("format"), "quant": gate.get("quant"),
            "size_mb": round(size / 2**20, 1) if size is not None else None,
            "ttft_p95_ms": _round((m.get("ttft_ms") or {}).get("p95")),
            "decode_tokens_per_s": _round((m.get("decode_tokens_per_s") or {}).get("p50")),
            "peak_memory_mb": _round(m.get("peak_rss_mb")),
            "accuracy": _round(quality.get("accuracy"), 3), "relative_quality": _round(quality.get("relative"), 3),
            "verdict": gate.get("verdict")}


def _round(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else None


def _export(cfg: PipelineConfig, progress: ProgressFn) -> str:
    from edgepack.export.api import export_model

    quants = [c.quant for c in cfg.profile.choices if c.format == "gguf"]
    done = _read_json(Path(cfg.run_dir) / ARTIFACTS_DIR / EXPORT_REPORT)
    have = {a["quant"] for a in done.get("artifacts", [])}
    if not set(quants) <= have:
        done = export_model(source=Path(cfg.run_dir), fmt="gguf", quants=quants, out_dir=None,
                            progress=progress)
    return ", ".join(f"{a['quant']} {a['bytes'] / 2**20:.1f} MB" for a in done["artifacts"])


def _gate(cfg: PipelineConfig, results: list[dict[str, Any]], progress: ProgressFn) -> str:
    """Gate the profile's choices in preference order; stop at the first PASS."""
    from edgepack.runtime.gate import run_gate

    run = Path(cfg.run_dir)
    artifacts = {a["quant"]: run / ARTIFACTS_DIR / a["path"]
                 for a in _read_json(run / ARTIFACTS_DIR / EXPORT_REPORT)["artifacts"]
                 if a["format"] == "gguf"}
    holdout = run / DATA_DIR / HOLDOUT_FILE
    for choice in cfg.profile.choices:
        path = artifacts.get(choice.quant) if choice.format == "gguf" else None
        if path is None:
            continue
        report_path = run / GATE_DIR / f"{path.name}.json"
        report = _read_json(report_path)
        if not report:
            report = run_gate(artifact=path, profile=cfg.profile,
                              holdout=holdout if holdout.is_file() else None, progress=progress)
            write_json(report_path, report)
        results.append(report)
        if report["verdict"] == PASS:
            break
    return "; ".join(f"{r.get('quant')}: {r['verdict']}" for r in results) or "no gguf artifact"


def _pack(cfg: PipelineConfig, gates: list[dict[str, Any]], out: dict[str, Any]) -> str:
    from edgepack.export.pack import pack_run

    if not any(g["verdict"] == PASS or (cfg.allow_unverified and g["verdict"] == UNVERIFIED)
               for g in gates):
        return "nothing packaged: no artifact passed the gate"
    existing = sorted((Path(cfg.run_dir) / BUNDLES_DIR).glob("*.edgepack"))
    if existing:
        out["bundle"] = str(existing[0])
        return f"{existing[0].name} (already packaged)"
    result = pack_run(run_dir=Path(cfg.run_dir), profile=cfg.profile, artifact=None,
                      allow_unverified=cfg.allow_unverified)
    out.update(result)
    return Path(result["bundle"]).name


def _smoke_run(run: Path, bundle: Path, sample: dict[str, str]) -> str:
    """Load the finished bundle the way a device would and answer one holdout prompt."""
    from edgepack.runtime.session import open_model

    with open(run / DATA_DIR / HOLDOUT_FILE, encoding="utf-8") as fh:
        messages = json.loads(fh.readline())["messages"]
    with open_model(bundle) as session:
        text = "".join(session.stream_chat(messages, max_tokens=48, temperature=0.0))
    sample.update(prompt=messages[-1]["content"], completion=text)
    return text.strip().replace("\n", " ")[:80]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _short(report: dict[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={report[k]}" for k in keys if k in report) or "done"
