"""What the KD recipe (train.py) writes: checkpoints while it trains, then the student and its report.

* :func:`save_progress` — ``RUN/checkpoints/step-N`` (checkpoint.py: weights, AdamW, schedule,
  RNG, and state.json with the identity, the student's description, the loss curve and the
  plan), written by rank 0 only.
* :func:`train_report` — train_report.json's fields, a pure function of what training did and
  the peak memory measured (:func:`peak_rss_mb`).
* :func:`save_student` — ``RUN/student`` (or ``RUN/student-<variant>``) as a complete HF folder
  (safetensors, the student's tokenizer and chat template, student.json, train_report.json,
  loss_curve.png, and an HF model card README.md from :func:`edgepack.model_card.student_card`),
  atomically; LoRA adapters are merged first, so it is always a plain model.
"""

from __future__ import annotations

import resource
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import atomic_dir, is_temp_name, write_json
from edgepack.constants import LOSS_CURVE_PNG, STUDENT_INFO, TRAIN_REPORT
from edgepack.distill import checkpoint as ckpt
from edgepack.distill.curves import loss_curve_png
from edgepack.distill.device import peak_measure
from edgepack.distill.modes import SOFT_LABELS, TOP_LOGPROBS
from edgepack.distill.parallel import DataParallel
from edgepack.distill.train_loss import OnlineTeacher
from edgepack.distill.teachers import SOURCE_FILE
from edgepack.distill.train_step import Trainee, TrainState
from edgepack.model_card import card_license, student_card
from edgepack.task import run_task

if TYPE_CHECKING:
    from edgepack.distill.train import TrainConfig
    from edgepack.distill.train_setup import RunInputs, TrainData, TrainingRun, TrainRequest


def save_progress(root: Path, trainee: Trainee, state: TrainState, identity: dict[str, Any], *, keep: int,
                  parallel: DataParallel = DataParallel()) -> None:
    """Checkpoint ``state.step`` under ``root`` (rank 0 writes, the other ranks hold the same state)."""
    if parallel.is_main:
        ckpt.save_checkpoint(root, state.step, trainee.model, trainee.optimizer, trainee.scheduler,
                             {"identity": identity, "student": trainee.description, "history": state.history_dicts(),
                              "elapsed": state.elapsed, "tokens": state.tokens, "cpu_s": state.cpu_s, "plan": trainee.plan.describe()},
                             keep=keep)
    parallel.barrier()


def train_report(request: TrainRequest, inputs: RunInputs, data: TrainData, run: TrainingRun, state: TrainState, *,
                 peak_mb: float, peak_is_this_call: bool, world: int = 1) -> dict[str, Any]:
    """train_report.json: what was trained, on what, how it went, and the memory it took."""
    import torch

    cfg, description, plan, mode = request.config, run.trainee.description, run.trainee.plan, data.mode
    teacher = run.objective.targets
    return {
        "identity": inputs.identity,
        "steps": request.steps,
        "params": description["params"],
        "teacher_params": description["teacher_params"],
        "final_loss": state.history[-1].loss,
        "first_loss": state.history[0].loss,
        "loss_curve": state.history_dicts(),
        "rows": len(data.rows), "rows_used": len(data.examples), "rows_too_long": data.too_long,
        "mode": mode.name,
        "mode_reason": mode.reason,
        "teacher_prefix_tokens": teacher.prefix.length if isinstance(teacher, OnlineTeacher) else None,
        "student_prefix_tokens": run.data.student_prefix,
        **_targets_report(data, cfg),
        "tokens": state.tokens,
        "wall_s": round(state.elapsed, 2),
        "cpu_s": round(state.cpu_s, 2),
        "tokens_per_s": round(state.tokens / state.elapsed, 1) if state.elapsed else None,
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_scope": "this training call" if peak_is_this_call else "the whole process (peak not resettable here)",
        "plan": plan.describe(),
        **_memory_parts(run),
        "measured_over_planned_peak": round(peak_mb / plan.planned_peak_mb, 3),
        **request.device.describe(),  # device, precision, bit_reproducible (and why not)
        "peak_measure": peak_measure(request.device),
        "torch_threads": torch.get_num_threads(),
        "on_policy": run.objective.on_policy.describe(state.history) if run.objective.on_policy else None,
        "resumed_from_step": run.start.step or None,
        "data_parallel_processes": world,
    }


def _memory_parts(run: TrainingRun) -> dict[str, Any]:
    """The optimizer and the frozen teacher as held (the plan has what the planner counted): the
    optimizer's name and state, the teacher's dtype and weights (None: no teacher in memory)."""
    import torch

    state = sum(v.numel() * v.element_size() for s in run.trainee.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    holders = (run.objective.targets, getattr(run.objective.on_policy, "scorer", None))  # dense KD; hf scorer
    teacher = next((h.model for h in holders if isinstance(h, OnlineTeacher)), None)
    weights = None if teacher is None else sum(t.numel() * t.element_size()
                                               for t in (*teacher.parameters(), *teacher.buffers()))
    return {"optimizer": run.trainee.plan.optimizer, "optimizer_state_mb": round(state / 2**20, 1),
            "teacher_dtype": None if teacher is None else str(teacher.dtype).removeprefix("torch."),
            "teacher_weights_mb": None if weights is None else round(weights / 2**20, 1)}


def _targets_report(data: TrainData, cfg: TrainConfig) -> dict[str, Any]:
    """The sparse targets' report fields: the soft-label cache's k/samples, the endpoint's alignment stats."""
    sparse: Any = data.sparse
    return {"soft_labels": {"k": sparse.k, "samples": sparse.samples, "divergence": cfg.divergence}
            if data.mode.name == SOFT_LABELS else None,
            "endpoint_logprobs": sparse.stats if data.mode.name == TOP_LOGPROBS else None}


def save_student(request: TrainRequest, inputs: RunInputs, data: TrainData, trainee: Trainee,
                 report: dict[str, Any]) -> None:
    """Write RUN/student (or RUN/student-<variant>) atomically (module docstring)."""
    out, cfg, description = request.out, request.config, trainee.description
    for stale in out.parent.glob(f"{out.name}.tmp-*"):  # a final save that was killed
        if is_temp_name(stale.name):  # edgepack's own temporary name, never a user's folder
            shutil.rmtree(stale, ignore_errors=True)
    model = trainee.model.merge_and_unload() if trainee.plan.method == "lora" else trainee.model
    teacher = _teacher_record(inputs)
    license = card_license(request.license, [("the teacher's source (`teacher/source.json`)", teacher.get("license"))])
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(data.tokenizer_dir, tmp)
        write_json(tmp / STUDENT_INFO, {**description,
                                        "teacher": str(inputs.teacher_dir or inputs.data_report["teacher"]["spec"]),
                                        "teacher_sha256": inputs.teacher_sha256, "mode": data.mode.name,
                                        "train_config": asdict(cfg), "license": license.to_json()})
        write_json(tmp / TRAIN_REPORT, report)
        task, task_source = run_task(request.run_dir)
        (tmp / "README.md").write_text(student_card(name=out.name, teacher=teacher, license=license, task=task,
                                                    task_source=task_source, report=report), encoding="utf-8")
        loss_curve_png(report["loss_curve"], tmp / LOSS_CURVE_PNG,
                       f"{out.name}: {data.mode.name} ({cfg.divergence}), {description['params'] / 1e6:.1f}M parameters")


def _teacher_record(inputs: RunInputs) -> dict[str, Any]:
    """The teacher as ``distill data`` recorded it: ``teacher/source.json``, else the data report's
    (an endpoint teacher has no folder)."""
    import json

    source = inputs.teacher_dir / SOURCE_FILE if inputs.teacher_dir is not None else None
    record = json.loads(source.read_text()) if source is not None and source.is_file() else \
        inputs.data_report.get("teacher")
    return record if isinstance(record, dict) else {}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from edgepack.distill.teachers import HF_TOKENIZER_FILES

    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ------------------------------------------------------------------ memory, measured for the report


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the peak is this call's (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (since the last reset) on Linux, else the process's lifetime ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20
