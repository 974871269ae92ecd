"""Knowledge-distillation losses over logits, each a small function.

Every loss takes ``student_logits`` and ``teacher_logits`` of shape ``[..., S, V]`` and a
``mask`` of shape ``[..., S]`` (1 where the position counts), and returns the mean over
masked positions. The vocabulary axis is processed in sequence chunks of ``chunk``
positions, so at most one ``[B, chunk, V]`` fp32 slice exists besides the logits themselves
(the logits may be bf16/fp16; the softmax is always computed in fp32).

Temperature ``T`` softens both distributions; the result is multiplied by ``T**2`` so that
gradient magnitudes do not shrink with T (Hinton et al., 2015).

The second half holds the same divergences on the teacher's *cached sparse* distribution
(:class:`SparseTargets`, written by ``distill/softlabels.py``): top-k tokens plus an explicit
tail bucket, and an unbiased estimator from tokens sampled from the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from edgepack.train_memory import LOSS_CHUNK_ROWS

DEFAULT_CHUNK = LOSS_CHUNK_ROWS  # the training memory estimate counts these chunks

# One chunk's per-position loss: (student log-probs, teacher log-probs) -> [B, chunk].
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunked(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             token_loss: TokenLoss, temperature: float, chunk: int) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape[:-1])}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    total = student_logits.new_zeros((), dtype=torch.float32)
    seq = student_logits.shape[-2]
    for start in range(0, seq, chunk):
        sl = slice(start, start + chunk)
        s = F.log_softmax(student_logits[..., sl, :].float() / temperature, dim=-1)
        with torch.no_grad():
            t = F.log_softmax(teacher_logits[..., sl, :].float() / temperature, dim=-1)
        total = total + (token_loss(s, t) * mask[..., sl].float()).sum()
    return total / mask.float().sum().clamp(min=1.0) * temperature**2


def _forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # KL(teacher || student) = sum_v p_t (log p_t - log p_s); mode-covering.
    return (t.exp() * (t - s)).sum(-1)


def _reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # KL(student || teacher) = sum_v p_s (log p_s - log p_t); mode-seeking.
    return (s.exp() * (s - t)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over masked positions (the classic KD loss)."""
    return _chunked(student_logits, teacher_logits, mask, _forward_kl, temperature, chunk)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean KL(student ‖ teacher) over masked positions (MiniLLM-style, mode-seeking)."""
    return _chunked(student_logits, teacher_logits, mask, _reverse_kl, temperature, chunk)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                    beta: float = 0.5, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(β) of GKD (Agarwal et al., 2024).

    With M = β·P_teacher + (1-β)·P_student: β·KL(P_teacher ‖ M) + (1-β)·KL(P_student ‖ M).
    β = 0.5 is the symmetric JSD; β must lie strictly between 0 and 1 (both ends are 0).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) (got {beta}); use forward_kl / reverse_kl for the ends")
    log_b, log_1mb = math.log(beta), math.log1p(-beta)

    def token_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = torch.logsumexp(torch.stack([t + log_b, s + log_1mb]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)

    return _chunked(student_logits, teacher_logits, mask, token_loss, temperature, chunk)


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                  chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of the student on the teacher's tokens ``targets`` over masked positions."""
    if targets.shape != student_logits.shape[:-1] or mask.shape != targets.shape:
        raise ValueError("targets and mask must have the logits' shape without the vocab axis")
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, student_logits.shape[-2], chunk):
        sl = slice(start, start + chunk)
        logp = F.log_softmax(student_logits[..., sl, :].float(), dim=-1)
        nll = -logp.gather(-1, targets[..., sl].unsqueeze(-1)).squeeze(-1)
        total = total + (nll * mask[..., sl].float()).sum()
    return total / mask.float().sum().clamp(min=1.0)


def blend(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """The training objective ``(1 - alpha)·KD + alpha·CE`` (alpha = 0: pure distillation)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
    return (1.0 - alpha) * kd + alpha * ce


# KD divergences by exact name (TrainConfig.divergence).
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}


# --------------------------------------------------------------------------- sparse (cached) targets
#
# Losses on the teacher's cached sparse support (distill/softlabels.py), for training without the
# teacher in memory. Inputs are the student's logits rows at the answer positions ``[N, V]`` (any
# leading shape flattens to N) and a :class:`SparseTargets` with N rows. Rows are processed
# ``chunk`` at a time under activation checkpointing, so the only ``[*, V]`` fp32 tensors that
# outlive a chunk are the student's own logits: the log-softmax of a chunk is recomputed in the
# backward pass instead of being kept for all N rows.
#
# Top-k losses compare "bucketed" distributions over k + 1 outcomes: the teacher's k most likely
# tokens, and one tail bucket holding all other tokens. The teacher's tail mass is stored
# explicitly; the student's is the mass its softmax puts outside the teacher's top-k set. With
# k = V the tail is empty and each loss equals its dense counterpart above.
#
# The sampled estimator uses S tokens drawn from the teacher (T = 1) per position, stored as
# unique ids with weights count/S. E[weight(v)] = p_teacher(v), so Σ_v w_v (log p_t(v) - log p_s(v))
# is an unbiased estimate of KL(teacher ‖ student) and its student gradient (softmax - w) an
# unbiased estimate of the dense gradient (softmax - p_teacher): the random-sampling KD of
# "Sparse Logit Sampling" (Anshumann et al., 2025), where caching only the top-k is biased.
#
# All targets are teacher log-probabilities at temperature 1 (a tempered teacher's normaliser
# needs the whole vocabulary, which the cache does not keep), so the sparse losses take no T.


@dataclass
class SparseTargets:
    """The teacher's cached sparse distribution at N answer positions (one row per position)."""

    topk_ids: torch.Tensor
    """int64 [N, k]: the teacher's k most likely tokens."""
    topk_logprobs: torch.Tensor
    """float32 [N, k]: their log-probabilities at temperature 1."""
    tail_logmass: torch.Tensor
    """float32 [N]: log of the teacher mass outside the top-k (-inf when k = V)."""
    sample_ids: torch.Tensor | None = None
    """int64 [N, U]: distinct tokens among S draws from the teacher (padded with weight 0)."""
    sample_logprobs: torch.Tensor | None = None
    """float32 [N, U]: the teacher's log-probabilities of ``sample_ids``."""
    sample_weights: torch.Tensor | None = None
    """float32 [N, U]: count / S of each drawn token (0 marks padding)."""
    tokens: torch.Tensor | None = None
    """int64 [N]: the answer token each position predicts (for alignment checks)."""

    def __len__(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def has_samples(self) -> bool:
        return self.sample_ids is not None

    def to(self, device: torch.device | str) -> SparseTargets:
        return SparseTargets(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})

    @staticmethod
    def cat(parts: list[SparseTargets]) -> SparseTargets:
        """Concatenate along positions; sample columns are right-padded (weight 0) to the widest."""
        if not parts:
            raise ValueError("nothing to concatenate")
        out: dict[str, torch.Tensor | None] = {}
        for name in ("topk_ids", "topk_logprobs", "tail_logmass"):
            out[name] = torch.cat([getattr(p, name) for p in parts])
        out["tokens"] = torch.cat([p.tokens for p in parts]) if all(p.tokens is not None for p in parts) else None
        if all(p.has_samples for p in parts):
            width = max(p.sample_ids.shape[1] for p in parts)  # type: ignore[union-attr]
            for name in ("sample_ids", "sample_logprobs", "sample_weights"):
                out[name] = torch.cat([F.pad(getattr(p, name), (0, width - getattr(p, name).shape[1]))
                                       for p in parts])
        return SparseTargets(**out)  # type: ignore[arg-type]


# One chunk's summed loss: (student logits rows [c, V], then that chunk's target tensors) -> scalar.
ChunkLoss = Callable[..., torch.Tensor]


def _sparse_chunked(student_logits: torch.Tensor, tensors: list[torch.Tensor], mask: torch.Tensor | None,
                    chunk_loss: ChunkLoss, chunk: int) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    rows = student_logits.reshape(-1, student_logits.shape[-1])
    n = rows.shape[0]
    for t in tensors:
        if t.shape[0] != n:
            raise ValueError(f"sparse targets have {t.shape[0]} positions, the student logits {n}")
    weights = torch.ones(n) if mask is None else mask.reshape(-1).float()
    if weights.shape[0] != n:
        raise ValueError(f"mask has {weights.shape[0]} positions, the student logits {n}")
    weights = weights.to(rows.device)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        args = (rows[sl], weights[sl], *(t[sl] for t in tensors))
        if rows.requires_grad and torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            total = total + chunk_loss(*args)
    return total / weights.sum().clamp(min=1.0)


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Σ p (log p - log q) over the last axis, with 0·log 0 = 0 (empty tail buckets)."""
    safe = p_log > float("-inf")
    terms = torch.where(safe, p_log.exp() * (p_log - torch.where(safe, q_log, torch.zeros_like(q_log))),
                        torch.zeros_like(p_log))
    return terms.sum(-1)


def _buckets(logits: torch.Tensor, ids: torch.Tensor, topk_logprobs: torch.Tensor, tail: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the k + 1 buckets: top-k tokens, then the tail."""
    s_all = logits.float()
    norm = torch.logsumexp(s_all, dim=-1, keepdim=True)
    s_top = s_all.gather(-1, ids) - norm
    # The student's tail from the logits outside the top-k set (exact, unlike log1p(-Σ p_top),
    # which cancels catastrophically when the top-k holds nearly all the mass). With k = V the
    # set is empty: the finite fill keeps the gradient finite and the where() below makes it -inf.
    if ids.shape[-1] >= logits.shape[-1]:
        s_tail = torch.full_like(norm.squeeze(-1), float("-inf"))  # k = V: the tail bucket is empty
    else:
        outside = s_all.scatter(-1, ids, float("-inf"))
        s_tail = torch.logsumexp(outside, dim=-1) - norm.squeeze(-1)
    student = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
    teacher = torch.cat([topk_logprobs.float(), tail.float().unsqueeze(-1)], dim=-1)
    # fp16 storage leaves Σ p a little off 1: renormalise so each divergence stays ≥ 0.
    teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    return student, teacher


def _topk_args(targets: SparseTargets, device: torch.device) -> list[torch.Tensor]:
    return [targets.topk_ids.to(device).long(), targets.topk_logprobs.to(device), targets.tail_logmass.to(device)]


def sparse_forward_kl(student_logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor | None = None, *,
                      chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over the teacher's top-k tokens plus one tail bucket."""
    def chunk_loss(logits, w, ids, lp, tail):  # type: ignore[no-untyped-def]
        s, t = _buckets(logits, ids, lp, tail)
        return (_kl_terms(t, s) * w).sum()

    return _sparse_chunked(student_logits, _topk_args(targets, student_logits.device), mask, chunk_loss, chunk)


def sparse_reverse_kl(student_logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor | None = None, *,
                      chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean KL(student ‖ teacher) over the top-k + tail buckets."""
    def chunk_loss(logits, w, ids, lp, tail):  # type: ignore[no-untyped-def]
        s, t = _buckets(logits, ids, lp, tail)
        return (_kl_terms(s, t) * w).sum()

    return _sparse_chunked(student_logits, _topk_args(targets, student_logits.device), mask, chunk_loss, chunk)


def sparse_jsd(student_logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor | None = None, *,
               beta: float = 0.5, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Generalized JSD(β) (as :func:`generalized_jsd`) over the top-k + tail buckets."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) (got {beta}); use sparse_forward_kl / sparse_reverse_kl for the ends")
    log_b, log_1mb = math.log(beta), math.log1p(-beta)

    def chunk_loss(logits, w, ids, lp, tail):  # type: ignore[no-untyped-def]
        s, t = _buckets(logits, ids, lp, tail)
        m = torch.logsumexp(torch.stack([t + log_b, s + log_1mb]), dim=0)
        return ((beta * _kl_terms(t, m) + (1 - beta) * _kl_terms(s, m)) * w).sum()

    return _sparse_chunked(student_logits, _topk_args(targets, student_logits.device), mask, chunk_loss, chunk)


def sampled_forward_kl(student_logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor | None = None, *,
                       chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Unbiased estimate of mean KL(teacher ‖ student) from tokens sampled from the teacher.

    Per position Σ_j w_j (log p_t(v_j) - log p_s(v_j)) with w_j = count_j / S; both the value and
    the gradient with respect to the student's logits are unbiased (their expectation over the
    teacher's draws is the dense forward KL and its gradient).
    """
    if not targets.has_samples:
        raise ValueError("these soft labels hold no sampled tokens; cache them with samples > 0")
    device = student_logits.device
    args = [targets.sample_ids.to(device).long(), targets.sample_logprobs.to(device),  # type: ignore[union-attr]
            targets.sample_weights.to(device)]  # type: ignore[union-attr]

    def chunk_loss(logits, w, ids, lp, weights):  # type: ignore[no-untyped-def]
        s = F.log_softmax(logits.float(), dim=-1).gather(-1, ids)
        return ((weights * (lp.float() - s)).sum(-1) * w).sum()

    return _sparse_chunked(student_logits, args, mask, chunk_loss, chunk)


# Losses on cached soft labels by exact name: "<divergence>" on the top-k + tail buckets, or the
# sampled forward-KL estimator.
SPARSE_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": sparse_forward_kl,
    "reverse_kl": sparse_reverse_kl,
    "jsd": sparse_jsd,
    "sampled_forward_kl": sampled_forward_kl,
}
