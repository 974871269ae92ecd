"""The recipe's setup alone: inputs checked before any model loads, the data and mode, the models and objective."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgepack.constants import STUDENT_DIR
from edgepack.distill.losses import DIVERGENCES
from edgepack.distill.modes import DENSE, RESPONSE_ONLY
from edgepack.distill.train import IDENTITY_DEFAULTS, TrainConfig
from edgepack.distill.train_loss import OnlineTeacher
from edgepack.distill.train_setup import (TrainRequest, build_training, check_inputs, lr_factor, read_training_data)
from edgepack.distill.train_step import TrainState
from edgepack.errors import DataError, UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run

PROFILE = load_profile("cpu-x86-2c")
CFG = TrainConfig(lr=1e-2, batch_size=4, micro_batch=2)


def make_request(run: Path, config: TrainConfig = CFG, **kw) -> TrainRequest:
    return TrainRequest(run_dir=run, profile=PROFILE, config=config, out=run / STUDENT_DIR, **kw)


def test_check_inputs_gives_the_identity_and_refuses_bad_options(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    inputs = check_inputs(make_request(run, steps=7, seed=3))
    assert inputs.teacher_dir == run / "teacher" and len(inputs.teacher_sha256) == 64
    assert inputs.identity == {"teacher_sha256": inputs.teacher_sha256, "student": "auto", "steps": 7, "seed": 3,
                               "profile": PROFILE.name,
                               "config": {k: v for k, v in CFG.__dict__.items()
                                           if IDENTITY_DEFAULTS.get(k, object()) != v}}
    # method and mlp_keep join the identity only away from their defaults (older runs still resume).
    assert "method" not in inputs.identity and "mlp_keep" not in inputs.identity
    other = check_inputs(make_request(run, method="lora", mlp_keep=0.5)).identity
    assert (other["method"], other["mlp_keep"]) == ("lora", 0.5)
    bad = [(dict(steps=0), "at least 1"),
           (dict(config=replace(CFG, divergence="sampled_forward_kl")), "forward_kl, reverse_kl, jsd, sft"),
           (dict(config=replace(CFG, micro_batch=3)), "multiple of micro_batch"),
           (dict(config=replace(CFG, soft_labels=True, temperature=2.0)), "temperature 1"),
           (dict(student=str(tiny4_dir), mlp_keep=0.5), "width-prunes an `auto` student")]
    for kw, message in bad:
        with pytest.raises(UsageError, match=message):
            check_inputs(make_request(run, **kw))


def test_read_training_data_tokenizes_rows_and_chooses_the_mode(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    req = make_request(run)
    data = read_training_data(req, check_inputs(req))
    assert data.mode.name == DENSE and data.mode.reason is None and data.sparse is None
    assert data.tokenizer_dir == run / "teacher" and len(data.rows) == 12 and len(data.examples) == 12
    assert data.too_long == 0 and data.pad_id == data.tokenizer.pad_token_id
    assert [e.row for e in data.examples] == list(range(12))
    sft = make_request(run, config=replace(CFG, divergence="sft"))
    assert read_training_data(sft, check_inputs(sft)).mode.name == RESPONSE_ONLY
    short = make_request(run, config=replace(CFG, max_length=8))
    with pytest.raises(DataError, match="no training row fits max_length=8"):
        read_training_data(short, check_inputs(short))


@pytest.mark.parametrize("divergence", ["forward_kl", "sft"])
def test_build_training_makes_the_student_optimizer_and_objective(tmp_path: Path, tiny4_dir: Path,
                                                                  divergence: str) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    req = make_request(run, config=replace(CFG, divergence=divergence), steps=10)
    inputs = check_inputs(req)
    data = read_training_data(req, inputs)
    built = build_training(req, inputs, data, baseline_mb=300.0)
    trainee = built.trainee
    assert built.start == TrainState()
    assert trainee.description["source"] == "auto" and trainee.description["num_layers"] == 2
    assert trainee.model.config.num_hidden_layers == 2 and trainee.model.training
    assert trainee.plan.method == "full" and trainee.plan.micro_batch == 2
    assert trainee.params == list(trainee.model.parameters()) and all(p.requires_grad for p in trainee.params)
    assert trainee.optimizer.param_groups[0]["lr"] == pytest.approx(CFG.lr * lr_factor(0, 10, 1, CFG.min_lr_ratio))
    assert built.data.examples is data.examples and built.data.seed == 0
    objective = built.objective
    if divergence == "sft":  # response-only: no teacher kept, CE alone
        assert objective.mode == RESPONSE_ONLY and objective.targets is None and objective.divergence is None
    else:
        assert objective.mode == DENSE and objective.divergence is DIVERGENCES["forward_kl"]
        assert isinstance(objective.targets, OnlineTeacher)
        logits = objective.targets.targets([0], data.examples[:1])
        assert logits.shape == (data.examples[0].answer_tokens, trainee.model.config.vocab_size)
        assert not logits.requires_grad


def test_lr_factor_warms_up_then_follows_a_cosine_to_the_floor() -> None:
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 10, 2, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2))))
