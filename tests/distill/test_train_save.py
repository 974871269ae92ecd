"""What the recipe writes, alone: a checkpoint that setup resumes exactly, the report's fields, the student folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgepack.atomic import is_complete
from edgepack.constants import CHECKPOINT_DIR, STUDENT_INFO, TRAIN_REPORT
from edgepack.distill.checkpoint import checkpoint_dirs
from edgepack.distill.train_save import save_progress, save_student, train_report
from edgepack.distill.train_setup import build_training, check_inputs, read_training_data
from edgepack.distill.train_step import StepLog, TrainState
from edgepack.errors import RunDirError
from tests.distill.conftest import make_run
from tests.distill.test_train_setup import CFG, make_request

# train_report.json's fields, in the order they are written (the pipeline, eval and the CLI read them).
REPORT_FIELDS = ["identity", "steps", "params", "teacher_params", "final_loss", "first_loss", "loss_curve", "rows",
                 "rows_used", "rows_too_long", "mode", "mode_reason", "teacher_prefix_tokens", "student_prefix_tokens",
                 "soft_labels", "endpoint_logprobs", "tokens", "wall_s", "cpu_s", "tokens_per_s", "peak_rss_mb",
                 "peak_rss_scope", "plan", "optimizer", "optimizer_state_mb", "teacher_dtype", "teacher_weights_mb",
                 "measured_over_planned_peak", "device", "precision", "device_reason",
                 "bit_reproducible", "bit_reproducible_reason", "peak_measure", "torch_threads",
                 "on_policy", "resumed_from_step", "data_parallel_processes"]
STATE = TrainState(2, (StepLog(1, 4.0, 4.5, 2.0, 5e-3, 1.5), StepLog(2, 3.0, 3.25, 2.0, 1e-2, 1.25)), 2.0, 500, 3.5)


def _setup(run: Path, resume: bool = False):
    req = make_request(run, steps=4, resume=resume)
    inputs = check_inputs(req)
    data = read_training_data(req, inputs)
    return req, inputs, data, build_training(req, inputs, data, baseline_mb=300.0)


def test_a_checkpoint_is_resumed_exactly_by_setup(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    req, inputs, data, built = _setup(run)
    trainee = built.trainee
    with torch.no_grad():  # weights and AdamW state that a fresh student would not have
        for p in trainee.params:
            p.add_(0.01)
            p.grad = torch.ones_like(p)
    trainee.optimizer.step()
    save_progress(req.checkpoints, trainee, STATE, inputs.identity, keep=1)
    assert [p.name for p in checkpoint_dirs(run / CHECKPOINT_DIR)] == ["step-2"]
    with pytest.raises(RunDirError, match="unfinished run"):
        _setup(run)
    _, _, _, resumed = _setup(run, resume=True)
    assert resumed.start.step == 2 and resumed.start.history == STATE.history and resumed.start.tokens == 500
    assert resumed.start.cpu_s == 3.5
    assert resumed.trainee.description == trainee.description and resumed.trainee.plan == trainee.plan
    for (name, a), b in zip(trainee.model.named_parameters(), resumed.trainee.params):
        assert torch.equal(a, b), name
    saved, restored = trainee.optimizer.state_dict()["state"], resumed.trainee.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[i]["exp_avg"], restored[i]["exp_avg"]) for i in saved)


def test_train_report_fields_and_values(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    req, inputs, data, built = _setup(run)
    report = train_report(req, inputs, data, built, STATE, peak_mb=600.0, peak_is_this_call=True)
    assert list(report) == REPORT_FIELDS
    assert report["identity"] == inputs.identity and report["steps"] == 4
    assert (report["first_loss"], report["final_loss"]) == (4.0, 3.0)
    assert report["loss_curve"] == STATE.history_dicts()
    assert (report["rows"], report["rows_used"], report["rows_too_long"]) == (12, 12, 0)
    assert report["mode"] == "dense" and report["teacher_prefix_tokens"] is not None
    assert report["soft_labels"] is None and report["endpoint_logprobs"] is None
    assert report["tokens"] == 500 and report["tokens_per_s"] == 250.0 and report["wall_s"] == 2.0
    assert report["cpu_s"] == 3.5  # both threads of a 2-thread step count
    assert report["peak_rss_mb"] == 600.0 and report["peak_rss_scope"] == "this training call"
    assert report["measured_over_planned_peak"] == round(600.0 / built.trainee.plan.planned_peak_mb, 3)
    teacher = built.objective.targets.model  # the online teacher, fp32 on the CPU by default
    assert (report["optimizer"], report["teacher_dtype"]) == ("adamw", "float32")
    assert report["teacher_weights_mb"] == round(sum(p.numel() * 4 for p in teacher.parameters()) / 2**20, 1)
    assert report["on_policy"] is None and report["resumed_from_step"] is None and report["data_parallel_processes"] == 1
    json.dumps(report)  # written as JSON as it is


def test_save_student_writes_a_complete_hf_folder(tmp_path: Path, tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path / "run", tiny4_dir)
    req, inputs, data, built = _setup(run)
    report = train_report(req, inputs, data, built, STATE, peak_mb=600.0, peak_is_this_call=True)
    stale, users = run / "student.tmp-999999.edgepack-tmp", run / "student.tmp-mine"
    stale.mkdir()  # a final save that was killed
    users.mkdir()  # a user's folder that only looks alike
    save_student(req, inputs, data, built.trainee, report)
    out = req.out
    assert is_complete(out) and not stale.exists() and users.is_dir()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", STUDENT_INFO, TRAIN_REPORT, "loss_curve.png"} <= names
    info = json.loads((out / STUDENT_INFO).read_text())
    assert info["mode"] == "dense" and info["teacher_sha256"] == inputs.teacher_sha256
    assert info["teacher"] == str(run / "teacher") and info["train_config"] == CFG.__dict__
    assert json.loads((out / TRAIN_REPORT).read_text()) == json.loads(json.dumps(report))
    saved = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(built.trainee.model.named_parameters(), saved.parameters()):
        assert torch.equal(a, b), name
