"""One optimizer step of the KD recipe, and the typed state the recipe carries from step to step.

A step takes ``batch_size`` rows (a pure function of seed and step: batching.batch_indices, so
the step number is the data cursor), runs them in micro-batches of the plan's size — the
student's logits at answer positions only, the mode's loss (train_loss.py) weighted by its
share of the step's answer tokens, backward — sums the gradients over data-parallel ranks,
clips them, and steps AdamW and the LR schedule. The student's forward runs under the device's
autocast (device.py: bf16/fp16 on accelerators, bf16 on the CPU when asked) and the losses in
fp32; with fp16 the gradients are scaled (GradScaler), and an overflowed step is redone with a
lower scale rather than stopping. A non-finite loss or gradient norm, or a loss
``explode_factor`` times the first step's, is not applied: the step returns the problem and the
state it started from, and the recipe keeps the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgepack.distill.batching import Example, answer_hidden, batch_indices
from edgepack.distill.device import CPU, Device
from edgepack.distill.parallel import DataParallel
from edgepack.distill.plan import TrainPlan
from edgepack.distill.train_loss import MicroBatch, ModeLoss, Objective, mode_loss

if TYPE_CHECKING:
    from edgepack.distill.train import TrainConfig


@dataclass(frozen=True)
class StepLog:
    """One row of the loss curve (train_report.json ``loss_curve``, checkpoint ``history``)."""

    step: int
    """Steps done, this one included (1-based)."""
    loss: float
    kd: float
    ce: float
    lr: float
    """The learning rate after this step's schedule update."""
    grad_norm: float
    """The gradient norm before clipping."""
    on_policy: bool = False
    """The student sampled this step's answers and the teacher scored them (onpolicy.py; ``ce`` is 0)."""
    sampled: int = 0
    """On-policy steps: completions sampled (the batch's rows)."""
    capped: int = 0
    """On-policy steps: completions that hit the token cap before the student ended its turn."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.on_policy:  # off-policy rows read as they did before on-policy steps existed
            for key in ("on_policy", "sampled", "capped"):
                del out[key]
        return out


@dataclass(frozen=True)
class TrainState:
    """How far training has come: what a checkpoint stores besides the weights and optimizer."""

    step: int = 0
    history: tuple[StepLog, ...] = ()
    elapsed: float = 0.0
    """Seconds spent in training steps (setup and checkpoints not counted)."""
    tokens: int = 0
    """Student tokens (prompt + answer) of the steps done."""
    cpu_s: float = 0.0
    """CPU seconds of this process (all its threads) in training steps: unlike ``elapsed``, not
    moved by other work on a shared machine (with one thread, the wall clock of a quiet one)."""

    @staticmethod
    def from_checkpoint(state: dict[str, Any]) -> TrainState:
        """The state of a checkpoint's state.json (checkpoint.restore_training_state)."""
        return TrainState(state["step"], tuple(StepLog(**h) for h in state["history"]), state["elapsed"],
                          state["tokens"], state.get("cpu_s", 0.0))  # checkpoints before cpu_s: 0

    def history_dicts(self) -> list[dict[str, Any]]:
        return [h.as_dict() for h in self.history]


@dataclass(frozen=True)
class Trainee:
    """The student being trained and what updates it."""

    model: Any
    params: list[torch.nn.Parameter]
    """The trainable parameters (all of them, or the LoRA adapters)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: TrainPlan
    description: dict[str, Any]
    """What the student is (student.json): its source, kept layers, parameter counts."""
    device: Device = CPU
    """Where the student runs and its autocast precision (device.py)."""
    scaler: Any = None
    """torch.amp.GradScaler for fp16 autocast (device.py); None otherwise."""


@dataclass(frozen=True)
class StepData:
    """The tokenized rows and how a step cuts them into micro-batches."""

    examples: list[Example]
    seed: int
    pad_id: int
    student_prefix: int = 0
    """Prompt tokens every row shares, run once per micro-batch (0: none or not worth it)."""


@dataclass(frozen=True)
class StepResult:
    """The state after a step, or, when ``problem`` says why it was not applied, the state before it."""

    state: TrainState
    problem: str | None = None


def divergence_problem(loss: float, grad_norm: float, history: tuple[StepLog, ...], explode_factor: float,
                       on_policy: bool = False) -> str | None:
    """Why a step's loss or gradient must not be applied, or None when it is healthy.

    A loss explodes against the first step *of the same kind*: an on-policy step's loss is KD
    on the student's own samples, an off-policy one (1-α)·KD + α·CE on the teacher's text."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    first = next((h for h in history if h.on_policy == on_policy), None)
    if first is not None and loss > explode_factor * max(first.loss, 1e-3):
        return f"the loss exploded to {loss:.4g} (first {'on-policy ' if on_policy else ''}step: {first.loss:.4g})"
    return None


def _micro_step(trainee: Trainee, indices: list[int], examples: list[Example], data: StepData,
                objective: Objective, n_answer: int, loss: ModeLoss) -> tuple[list[float], int]:
    """Forward and backward one micro-batch; its (loss, kd, ce) weighted by its share of the step's tokens."""
    model, device = trainee.model, trainee.device
    with device.placement(), device.autocast():
        hidden, batch = answer_hidden(model.get_decoder(), [e.student_ids for e in examples],
                                      [e.student_prompt for e in examples], data.pad_id,
                                      data.student_prefix if len(examples) > 1 else 0)
        s_logits = model.get_output_embeddings()(hidden)
    # The losses run in fp32 outside autocast: log-softmax over the vocabulary in bf16/fp16
    # loses the small probabilities KD is about.
    with device.placement():
        terms = loss(s_logits.float(), MicroBatch(indices, examples, batch.targets), objective)
    weight = s_logits.shape[0] / n_answer  # the step loss is a mean over all answer tokens
    scaled = terms.loss * weight
    (scaled if trainee.scaler is None else trainee.scaler.scale(scaled)).backward()
    values = [float(value.detach()) * weight for value in (terms.loss, terms.kd, terms.ce)]
    return values, sum(len(e.student_ids) for e in examples)


def train_step(trainee: Trainee, data: StepData, objective: Objective, state: TrainState, cfg: TrainConfig,
               parallel: DataParallel = DataParallel()) -> StepResult:
    """Optimizer step ``state.step`` (0-based): batch → loss → backward → clip → step (module docstring)."""
    t0, c0 = time.perf_counter(), time.process_time()
    indices = batch_indices(len(data.examples), data.seed, state.step, cfg.batch_size)
    chosen = [data.examples[i] for i in indices]
    size = trainee.plan.micro_batch
    micro_batches = [(indices[i:i + size], chosen[i:i + size]) for i in range(0, len(chosen), size)]
    mine = parallel.my_share(micro_batches)
    on_policy = objective.on_policy is not None and objective.on_policy.applies(state.step)
    if on_policy:  # the student's own completions replace the teacher's answers (onpolicy.py)
        mine = [(part_indices, objective.on_policy.sample(trainee.model, part, trainee.device, step=state.step,
                                                          first_row=part_indices[0]))
                for part_indices, part in mine]
        eos = objective.on_policy.eos_id
        n_answer, sampled, capped = (int(v) for v in parallel.sum_values([
            sum(e.answer_tokens for _, part in mine for e in part), sum(len(part) for _, part in mine),
            sum(e.student_ids[-1] != eos for _, part in mine for e in part)]))
        loss_fn: ModeLoss = objective.on_policy.loss
    else:
        n_answer, sampled, capped = sum(e.answer_tokens for e in chosen), 0, 0  # global batch, every rank
        loss_fn = mode_loss(objective.mode)
    totals, step_tokens = [0.0, 0.0, 0.0], 0
    for part_indices, part in mine:
        values, tokens = _micro_step(trainee, part_indices, part, data, objective, n_answer, loss_fn)
        totals = [total + value for total, value in zip(totals, values)]
        step_tokens += tokens
    parallel.sum_gradients(trainee.params)
    *totals, step_tokens = parallel.sum_values([*totals, step_tokens])
    scaler = trainee.scaler
    if scaler is not None:
        scaler.unscale_(trainee.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainee.params, cfg.clip_norm))
    loss, kd, ce = totals
    if scaler is not None and not math.isfinite(grad_norm) and math.isfinite(loss):
        # fp16 overflow of the scaled gradients: lower the scale and redo this step (same batch).
        scaler.update(scaler.get_scale() / 2)
        trainee.optimizer.zero_grad(set_to_none=True)
        return StepResult(state)
    problem = divergence_problem(loss, grad_norm, state.history, cfg.explode_factor, on_policy)
    if problem:
        trainee.optimizer.zero_grad(set_to_none=True)  # the weights stay those after the last good step
        return StepResult(state, problem)
    if scaler is None:
        trainee.optimizer.step()
    else:
        scaler.step(trainee.optimizer)
        scaler.update()
    trainee.scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    log = StepLog(state.step + 1, round(loss, 6), round(kd, 6), round(ce, 6), trainee.scheduler.get_last_lr()[0],
                  round(grad_norm, 4), on_policy, sampled, capped)
    return StepResult(TrainState(state.step + 1, (*state.history, log), state.elapsed + time.perf_counter() - t0,
                                 state.tokens + int(step_tokens), state.cpu_s + time.process_time() - c0))
