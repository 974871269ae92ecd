"""Each chunked KD loss against a direct dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgepack.distill.losses import (DIVERGENCES, blend, cross_entropy, forward_kl, generalized_jsd,
                                     reverse_kl)


def _inputs(seed: int = 0, b: int = 2, s: int = 7, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v, generator=g) * 3
    teacher = torch.randn(b, s, v, generator=g) * 3
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    return student, teacher, mask


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_forward_kl_matches_dense(temperature: float, chunk: int) -> None:
    s, t, m = _inputs()
    ref = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                   reduction="none", log_target=True).sum(-1)
    expected = _masked_mean(ref, m) * temperature**2
    torch.testing.assert_close(forward_kl(s, t, m, temperature=temperature, chunk=chunk), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("chunk", [2, 128])
def test_reverse_kl_matches_dense(temperature: float, chunk: int) -> None:
    s, t, m = _inputs(1)
    ref = F.kl_div(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1),
                   reduction="none", log_target=True).sum(-1)
    expected = _masked_mean(ref, m) * temperature**2
    torch.testing.assert_close(reverse_kl(s, t, m, temperature=temperature, chunk=chunk), expected)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_dense(beta: float) -> None:
    s, t, m = _inputs(2)
    p_s, p_t = F.softmax(s * 0.5, -1), F.softmax(t * 0.5, -1)  # temperature 2
    mix = beta * p_t + (1 - beta) * p_s
    ref = beta * (p_t * (p_t.log() - mix.log())).sum(-1) + (1 - beta) * (p_s * (p_s.log() - mix.log())).sum(-1)
    expected = _masked_mean(ref, m) * 4.0
    torch.testing.assert_close(generalized_jsd(s, t, m, beta=beta, temperature=2.0, chunk=3), expected)


def test_symmetric_jsd_is_symmetric_and_bounded() -> None:
    s, t, m = _inputs(3)
    a = generalized_jsd(s, t, m, beta=0.5)
    b = generalized_jsd(t, s, m, beta=0.5)
    torch.testing.assert_close(a, b)
    assert 0 < float(a) <= torch.log(torch.tensor(2.0)).item() + 1e-6


def test_cross_entropy_matches_dense() -> None:
    s, _, m = _inputs(4)
    targets = torch.randint(0, s.shape[-1], s.shape[:-1], generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), reduction="none").reshape(m.shape)
    torch.testing.assert_close(cross_entropy(s, targets, m, chunk=2), _masked_mean(ref, m))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_is_zero_for_identical_logits_and_has_gradients(name: str) -> None:
    s, _, m = _inputs(5)
    assert float(DIVERGENCES[name](s, s.clone(), m)) == pytest.approx(0.0, abs=1e-5)
    student = s.clone().requires_grad_(True)
    teacher = torch.randn_like(s)
    DIVERGENCES[name](student, teacher, m).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # Masked-out positions get no gradient.
    assert float(student.grad[m == 0].abs().sum()) == 0.0


def test_bf16_logits_are_upcast() -> None:
    s, t, m = _inputs(6)
    low = forward_kl(s.bfloat16(), t.bfloat16(), m)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, forward_kl(s.bfloat16().float(), t.bfloat16().float(), m))


def test_blend_and_argument_checks() -> None:
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert float(blend(kd, ce, 0.25)) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        blend(kd, ce, 1.5)
    s, t, m = _inputs()
    with pytest.raises(ValueError):
        generalized_jsd(s, t, m, beta=0.0)
    with pytest.raises(ValueError):
        forward_kl(s, t[:, :3], m)
    with pytest.raises(ValueError):
        forward_kl(s, t, m, temperature=0)
