"""Knowledge-distillation losses over logits, each a small function.

Every loss takes ``student_logits`` and ``teacher_logits`` of shape ``[..., S, V]`` and a
``mask`` of shape ``[..., S]`` (1 where the position counts), and returns the mean over
masked positions. The vocabulary axis is processed in sequence chunks of ``chunk``
positions, so at most one ``[B, chunk, V]`` fp32 slice exists besides the logits themselves
(the logits may be bf16/fp16; the softmax is always computed in fp32).

Temperature ``T`` softens both distributions; the result is multiplied by ``T**2`` so that
gradient magnitudes do not shrink with T (Hinton et al., 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 128

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
