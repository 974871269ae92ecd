"""One optimizer step alone, on a tiny model: it learns, it weighs micro-batches by tokens, it refuses a bad step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgepack.distill.batching import TeacherPrefix, deterministic_torch, tokenize_rows
from edgepack.distill.losses import DIVERGENCES
from edgepack.distill.modes import DENSE, RESPONSE_ONLY
from edgepack.distill.plan import TrainPlan
from edgepack.distill.train import TrainConfig
from edgepack.distill.train_loss import Objective, OnlineTeacher
from edgepack.distill.train_step import (StepData, StepLog, Trainee, TrainState, divergence_problem, train_step)
from tests.distill.conftest import train_rows

CFG = TrainConfig(lr=1e-2, batch_size=4, micro_batch=2)


def _plan(micro: int) -> TrainPlan:
    return TrainPlan("full", micro, CFG.batch_size // micro, False, 0.0, 0.0, 0.0, ())


def _setup(model_dir: Path, micro: int = 2, dense: bool = True) -> tuple[Trainee, StepData, Objective]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = tokenize_rows(tok, train_rows(), [], 256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=CFG.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainee = Trainee(model, params, optimizer, scheduler, _plan(micro), {"params": 0})
    if dense:
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        with torch.no_grad():  # a teacher that differs from the student, so KD has something to teach
            for p in teacher.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        objective = Objective(DENSE, DIVERGENCES["forward_kl"],
                              OnlineTeacher(teacher, TeacherPrefix(teacher, examples), tok.pad_token_id), alpha=0.2)
    else:
        objective = Objective(RESPONSE_ONLY, None, None)
    return trainee, StepData(examples, seed=0, pad_id=tok.pad_token_id), objective


def test_one_step_changes_the_weights_and_lowers_the_loss_on_its_batch(tiny4_dir: Path) -> None:
    trainee, data, objective = _setup(tiny4_dir)
    before = {k: v.detach().clone() for k, v in trainee.model.named_parameters()}
    with deterministic_torch(0):
        first = train_step(trainee, data, objective, TrainState(), CFG)
        # The same step index is the same batch: its loss after the update is lower.
        again = train_step(trainee, data, objective, TrainState(), CFG)
    assert first.problem is None and first.state.step == 1 and len(first.state.history) == 1
    log = first.state.history[0]
    assert log.step == 1 and log.lr == pytest.approx(CFG.lr) and log.kd > 0 and log.ce > 0
    assert log.loss == pytest.approx(0.8 * log.kd + 0.2 * log.ce, abs=2e-6)
    assert again.state.history[0].loss < log.loss
    assert first.state.tokens > 0 and first.state.elapsed > 0 and first.state.cpu_s > 0
    changed = [k for k, v in trainee.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert all(p.grad is None for p in trainee.params)  # zeroed for the next step


def test_micro_batches_are_weighted_by_answer_tokens(tiny4_dir: Path) -> None:
    """Micro-batches of 1, 2 or 4 rows give one step the same loss (a mean over all answer tokens)."""
    losses, grad_norms = [], []
    for micro in (1, 2, 4):
        trainee, data, objective = _setup(tiny4_dir, micro=micro, dense=False)
        with deterministic_torch(0):
            log = train_step(trainee, data, objective, TrainState(), CFG).state.history[0]
        losses.append(log.loss)
        grad_norms.append(log.grad_norm)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-3)
    assert grad_norms[2] == pytest.approx(grad_norms[0], rel=1e-3)


def test_a_non_finite_loss_is_not_applied(tiny4_dir: Path) -> None:
    trainee, data, objective = _setup(tiny4_dir)
    poisoned = Objective(DENSE, lambda *a, **k: DIVERGENCES["forward_kl"](*a, **k) * float("nan"), objective.targets)
    before = {k: v.detach().clone() for k, v in trainee.model.named_parameters()}
    state = TrainState(3, (StepLog(1, 1.0, 1.0, 1.0, 0.01, 0.5),), 1.5, 100)
    with deterministic_torch(0):
        result = train_step(trainee, data, poisoned, state, CFG)
    assert result.problem == "the loss is nan" and result.state is state
    assert all(torch.equal(v, before[k]) for k, v in trainee.model.named_parameters())
    assert all(p.grad is None for p in trainee.params)
    assert trainee.optimizer.state == {}  # AdamW never stepped


def test_divergence_problem() -> None:
    healthy = (StepLog(1, 2.0, 2.0, 3.0, 1e-3, 1.0),)
    assert divergence_problem(2.5, 1.0, healthy, 10.0) is None
    assert divergence_problem(100.0, 1.0, (), 10.0) is None  # nothing to compare the first step with
    assert divergence_problem(float("nan"), 1.0, healthy, 10.0) == "the loss is nan"
    assert divergence_problem(1.0, math.inf, healthy, 10.0) == "the gradient norm is inf"
    assert divergence_problem(20.5, 1.0, healthy, 10.0) == "the loss exploded to 20.5 (first step: 2)"
    # A first loss near zero is floored, so a tiny absolute rise is not an explosion.
    assert divergence_problem(5e-3, 1.0, (StepLog(1, 1e-6, 0.0, 0.0, 1e-3, 1.0),), 10.0) is None
    # On- and off-policy losses are different quantities: each is compared with the first of its kind.
    mixed = (StepLog(1, 0.05, 0.05, 0.0, 1e-3, 1.0, on_policy=True), StepLog(2, 2.0, 1.0, 3.0, 1e-3, 1.0))
    assert divergence_problem(1.2, 1.0, mixed, 10.0) is None
    assert divergence_problem(0.6, 1.0, mixed, 10.0, on_policy=True) == \
        "the loss exploded to 0.6 (first on-policy step: 0.05)"
    assert divergence_problem(100.0, 1.0, mixed[1:], 10.0, on_policy=True) is None  # its first on-policy step


def test_train_state_round_trips_through_a_checkpoints_state() -> None:
    state = TrainState(2, (StepLog(1, 3.5, 3.0, 5.5, 1e-3, 0.75), StepLog(2, 3.25, 2.75, 5.25, 2e-3, 0.5)), 4.25, 321, 7.5)
    saved = {"identity": {}, "student": {}, "history": state.history_dicts(), "elapsed": state.elapsed,
             "tokens": state.tokens, "cpu_s": state.cpu_s, "plan": None, "step": state.step}
    assert saved["history"][0] == {"step": 1, "loss": 3.5, "kd": 3.0, "ce": 5.5, "lr": 1e-3, "grad_norm": 0.75}
    assert list(saved["history"][0]) == ["step", "loss", "kd", "ce", "lr", "grad_norm"]  # the loss_curve layout
    assert TrainState.from_checkpoint(saved) == state
    del saved["cpu_s"]  # a checkpoint written before CPU seconds were counted resumes with 0
    assert TrainState.from_checkpoint(saved).cpu_s == 0.0
