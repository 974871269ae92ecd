"""The loss registry alone: each training mode's loss on tiny tensors is the losses.py function it names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from edgepack.distill import train_loss
from edgepack.distill.losses import (DIVERGENCES, SPARSE_DIVERGENCES, SparseTargets, blend, cross_entropy,
                                     sparse_forward_kl)
from edgepack.distill.modes import DENSE, RESPONSE_ONLY, SOFT_LABELS, TEACHER_WHILE_TRAINING, TOP_LOGPROBS
from edgepack.distill.train_loss import LossTerms, MicroBatch, Objective, available_modes, mode_loss, register_mode_loss
from edgepack.errors import UsageError

N, V, K = 6, 13, 4


class Fixed:
    """Targets that hand out the same value for any rows, and remember which rows were asked for."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.asked: list[tuple[list[int], int]] = []

    def targets(self, indices: Sequence[int], examples: Sequence[Any]) -> Any:
        self.asked.append((list(indices), len(examples)))
        return self.value


def _tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    return student, teacher, tokens


def _sparse(teacher: torch.Tensor, samples: bool = False) -> SparseTargets:
    logp = torch.log_softmax(teacher, -1)
    top = torch.topk(logp, K)
    tail = torch.log1p(-top.values.exp().sum(-1))
    extra: dict[str, torch.Tensor] = {}
    if samples:
        ids = torch.multinomial(logp.exp(), 3, replacement=False, generator=torch.Generator().manual_seed(1))
        extra = {"sample_ids": ids, "sample_logprobs": logp.gather(-1, ids), "sample_weights": torch.full((N, 3), 1 / 3)}
    return SparseTargets(top.indices, top.values, tail, **extra)


def _micro(tokens: torch.Tensor) -> MicroBatch:
    return MicroBatch(indices=[3, 7], examples=["a", "b"], answer_tokens=tokens)  # type: ignore[list-item]


def _ce(student: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return cross_entropy(student[None], tokens[None], torch.ones(1, N))


def _check(terms: LossTerms, kd: torch.Tensor, ce: torch.Tensor, alpha: float, student: torch.Tensor) -> None:
    assert torch.equal(terms.kd, kd) and torch.equal(terms.ce, ce)
    assert torch.equal(terms.loss, blend(kd, ce, alpha))
    terms.loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_every_training_mode_has_a_loss() -> None:
    assert set(TEACHER_WHILE_TRAINING) <= set(available_modes())
    for mode in TEACHER_WHILE_TRAINING:
        assert callable(mode_loss(mode))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_is_the_divergence_against_the_teachers_logits_blended_with_ce(name: str, temperature: float) -> None:
    student, teacher, tokens = _tensors()
    source = Fixed(teacher)
    objective = Objective(DENSE, DIVERGENCES[name], source, alpha=0.3, temperature=temperature)
    terms = mode_loss(DENSE)(student, _micro(tokens), objective)
    kd = DIVERGENCES[name](student[None], teacher[None], torch.ones(1, N), temperature=temperature)
    _check(terms, kd, _ce(student, tokens), 0.3, student)
    assert source.asked == [([3, 7], 2)]  # the micro-batch's rows, once


@pytest.mark.parametrize("name", sorted(SPARSE_DIVERGENCES))
def test_soft_labels_is_the_sparse_divergence_on_the_cached_targets(name: str) -> None:
    student, teacher, tokens = _tensors(1)
    sparse = _sparse(teacher, samples=name == "sampled_forward_kl")
    objective = Objective(SOFT_LABELS, SPARSE_DIVERGENCES[name], Fixed(sparse), alpha=0.2)
    terms = mode_loss(SOFT_LABELS)(student, _micro(tokens), objective)
    _check(terms, SPARSE_DIVERGENCES[name](student, sparse), _ce(student, tokens), 0.2, student)


def test_top_logprobs_is_masked_sparse_forward_kl() -> None:
    student, teacher, tokens = _tensors(2)
    sparse, mask = _sparse(teacher), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    objective = Objective(TOP_LOGPROBS, sparse_forward_kl, Fixed((sparse, mask)), alpha=0.0)
    terms = mode_loss(TOP_LOGPROBS)(student, _micro(tokens), objective)
    kd = sparse_forward_kl(student, sparse, mask)
    _check(terms, kd, _ce(student, tokens), 0.0, student)
    assert not torch.equal(kd, sparse_forward_kl(student, sparse))  # the mask is applied


def test_response_only_is_cross_entropy_alone() -> None:
    student, _, tokens = _tensors(3)
    terms = mode_loss(RESPONSE_ONLY)(student, _micro(tokens), Objective(RESPONSE_ONLY, None, None, alpha=0.2))
    ce = _ce(student, tokens)
    assert torch.equal(terms.loss, ce) and torch.equal(terms.ce, ce) and float(terms.kd) == 0.0


def test_a_kd_mode_without_targets_is_a_clear_error() -> None:
    student, _, tokens = _tensors()
    with pytest.raises(ValueError, match="needs a divergence and targets"):
        mode_loss(DENSE)(student, _micro(tokens), Objective(DENSE, None, None))


def test_an_unknown_mode_lists_the_registered_ones() -> None:
    with pytest.raises(UsageError) as exc:
        mode_loss("online-kd")
    message = str(exc.value)
    assert "'online-kd'" in message
    for mode in (DENSE, SOFT_LABELS, TOP_LOGPROBS, RESPONSE_ONLY):
        assert mode in message
    assert "register_mode_loss" in exc.value.hint


def test_a_new_mode_registers_like_the_built_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_loss, "_REGISTRY", dict(train_loss._REGISTRY))

    @register_mode_loss("ce-twice")
    def twice(s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
        ce = _ce(s_logits, micro.answer_tokens)
        return LossTerms(2 * ce, torch.zeros(()), ce)

    assert mode_loss("ce-twice") is twice and "ce-twice" in available_modes()
    student, _, tokens = _tensors()
    assert torch.equal(twice(student, _micro(tokens), Objective("ce-twice", None, None)).loss, 2 * _ce(student, tokens))
    with pytest.raises(ValueError, match="already has a loss"):
        register_mode_loss(DENSE)(twice)
