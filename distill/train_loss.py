"""The loss each training mode optimises, chosen from a registry keyed by the exact mode name.

A training mode (modes.py) says what the student learns from; this module says what it
minimises then, per micro-batch of answer positions (the student's logits ``[N, V]``):

==============  =====================================================================
``dense``        (1-α)·KD(the local teacher's logits at the same positions) + α·CE
``soft-labels``  (1-α)·KD(the teacher's cached top-k + tail, or its sampled tokens) + α·CE
``top-logprobs`` (1-α)·KD(an endpoint's top-k logprobs; unaligned rows masked out) + α·CE
``response-only`` CE on the teacher's tokens alone (the KD term is reported as 0)
==============  =====================================================================

KD is the run's divergence (losses.DIVERGENCES, or losses.SPARSE_DIVERGENCES on sparse
targets) and CE the cross-entropy on the teacher's answer tokens. Modes register the way
runtime backends do, through the decorator a new mode would use::

    @register_mode_loss("my-mode")
    def my_mode_loss(s_logits: Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
        ...

An unknown mode raises one UsageError listing the registered ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgepack.distill.batching import Example, TeacherPrefix
from edgepack.distill.device import to_device
from edgepack.distill.losses import blend, cross_entropy
from edgepack.distill.modes import DENSE, RESPONSE_ONLY, SOFT_LABELS, TOP_LOGPROBS
from edgepack.errors import UsageError


class Targets(Protocol):
    """Where a mode's KD targets come from: rows of the training data in, the mode's targets out."""

    def targets(self, indices: Sequence[int], examples: Sequence[Example]) -> Any:
        """The targets at the answer positions of ``examples`` (``indices`` into the example list)."""


@dataclass(frozen=True)
class OnlineTeacher:
    """The frozen local teacher of dense KD, run on each micro-batch (its shared prompt prefix once)."""

    model: Any
    prefix: TeacherPrefix
    pad_id: int

    def targets(self, indices: Sequence[int], examples: Sequence[Example]) -> torch.Tensor:
        """The teacher's logits ``[N, V]`` at the answer-predicting positions of ``examples``."""
        return self.prefix.logits(self.model, list(examples), self.pad_id)


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward's rows: where they sit in the example list, and their answer tokens."""

    indices: Sequence[int]
    examples: Sequence[Example]
    answer_tokens: torch.Tensor
    """int64 [N]: the token each answer position predicts (``Batch.targets``, in ``collate`` order)."""


@dataclass(frozen=True)
class Objective:
    """What this run's student minimises: the mode, its targets and how the terms are weighed."""

    mode: str
    divergence: Callable[..., torch.Tensor] | None
    """The KD function (dense or sparse, by the run's divergence name); None for response-only."""
    targets: Targets | None
    """OnlineTeacher (dense), SoftLabels (soft-labels), EndpointTargets (top-logprobs), or None."""
    alpha: float = 0.2
    """Weight of CE; 1 - alpha weights the KD term."""
    temperature: float = 1.0
    """Softens both distributions of dense KD (sparse targets are held at temperature 1)."""
    on_policy: Any = None
    """onpolicy.OnPolicy: how on-policy steps sample and score (their loss is its ``loss``); None: off-policy only."""


@dataclass(frozen=True)
class LossTerms:
    """One micro-batch's loss (what is backpropagated) and the two terms it is made of."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


ModeLoss = Callable[[torch.Tensor, MicroBatch, Objective], LossTerms]

_REGISTRY: dict[str, ModeLoss] = {}


def register_mode_loss(mode: str) -> Callable[[ModeLoss], ModeLoss]:
    """Decorator: register the loss of the exact training mode ``mode``."""

    def decorator(fn: ModeLoss) -> ModeLoss:
        existing = _REGISTRY.get(mode)
        if existing is not None and existing is not fn:
            raise ValueError(f"training mode {mode!r} already has a loss ({existing.__module__}.{existing.__qualname__})")
        _REGISTRY[mode] = fn
        return fn

    return decorator


def available_modes() -> list[str]:
    """Every training mode with a registered loss."""
    return sorted(_REGISTRY)


def mode_loss(mode: str) -> ModeLoss:
    """The loss of training mode ``mode``; UsageError listing the registered modes otherwise."""
    try:
        return _REGISTRY[mode]
    except KeyError:
        raise UsageError(f"no loss for training mode {mode!r}; available: {', '.join(available_modes())}",
                         hint="register one with @register_mode_loss (edgepack.distill.train_loss)") from None


def _ce(s_logits: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
    return cross_entropy(s_logits[None], micro.answer_tokens[None], torch.ones(1, s_logits.shape[0]))


def _blended(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective,
             kd: Callable[[], torch.Tensor]) -> LossTerms:
    # CE is built before KD, always: the autograd graph (and so the summation order of the
    # logits' gradient) stays that of every earlier run, which keeps training bit-identical.
    ce = _ce(s_logits, micro)
    kd_value = kd()
    return LossTerms(blend(kd_value, ce, objective.alpha), kd_value, ce)


def _checked(objective: Objective) -> tuple[Callable[..., torch.Tensor], Targets]:
    if objective.divergence is None or objective.targets is None:
        raise ValueError(f"mode {objective.mode!r} needs a divergence and targets")
    return objective.divergence, objective.targets


@register_mode_loss(DENSE)
def dense_loss(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
    """KD against the teacher's full distribution at every answer position (tempered), blended with CE."""
    divergence, targets = _checked(objective)

    def kd() -> torch.Tensor:
        t_logits = targets.targets(micro.indices, micro.examples)
        return divergence(s_logits[None], t_logits[None], torch.ones(1, s_logits.shape[0]),
                          temperature=objective.temperature)

    return _blended(s_logits, micro, objective, kd)


@register_mode_loss(SOFT_LABELS)
def soft_labels_loss(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
    """KD against the cached sparse targets (aligned with the answer positions, checked), blended with CE."""
    divergence, targets = _checked(objective)
    return _blended(s_logits, micro, objective,  # the cache is read on the CPU; the logits may be on a GPU
                    lambda: divergence(s_logits, to_device(targets.targets(micro.indices, micro.examples),
                                                           s_logits.device)))


@register_mode_loss(TOP_LOGPROBS)
def top_logprobs_loss(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
    """KD against an endpoint's top-k logprobs (unaligned rows and end-of-turn positions masked), blended with CE."""
    divergence, targets = _checked(objective)

    def kd() -> torch.Tensor:
        sparse, mask = to_device(targets.targets(micro.indices, micro.examples), s_logits.device)
        return divergence(s_logits, sparse, mask)

    return _blended(s_logits, micro, objective, kd)


@register_mode_loss(RESPONSE_ONLY)
def response_only_loss(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
    """CE on the teacher's tokens alone: the teacher's text is all there is to learn from."""
    ce = _ce(s_logits, micro)
    return LossTerms(ce, torch.zeros(()), ce)
