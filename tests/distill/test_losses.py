"""Each chunked KD loss against a direct dense computation, dense and on cached sparse targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgepack.distill.losses import (DIVERGENCES, SPARSE_DIVERGENCES, SparseTargets, blend, cross_entropy,
                                     forward_kl, generalized_jsd, reverse_kl, sampled_forward_kl, sparse_forward_kl,
                                     sparse_jsd, sparse_reverse_kl)


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


# --------------------------------------------------------------------------- sparse (cached) targets


def _topk_targets(teacher_logits: torch.Tensor, k: int) -> SparseTargets:
    """Top-k + exact tail of dense teacher logits [N, V] (what the cache stores, without fp16)."""
    lp = F.log_softmax(teacher_logits.float(), -1)
    top, ids = lp.topk(k, -1)
    if k == lp.shape[-1]:
        tail = torch.full((lp.shape[0],), float("-inf"))
    else:
        tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    return SparseTargets(ids, top, tail)


def _rows(seed: int, n: int = 9, v: int = 13, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def _dense_on_rows(name: str, s: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    ones = torch.ones(1, s.shape[0])
    return DIVERGENCES[name](s[None], t[None], ones, **kw)


def _sparse(name: str):
    return {"forward_kl": sparse_forward_kl, "reverse_kl": sparse_reverse_kl, "jsd": sparse_jsd}[name]


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_topk_with_k_equal_vocab_is_the_dense_loss(name: str, chunk: int) -> None:
    s, t = _rows(10)
    targets = _topk_targets(t, t.shape[-1])
    kw = {"beta": 0.3} if name == "jsd" else {}
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    sparse = _sparse(name)(a, targets, chunk=chunk, **kw)
    dense = _dense_on_rows(name, b, t, **kw)
    torch.testing.assert_close(sparse, dense)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(a.grad, b.grad)


def _bucket_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Probabilities over (top-k ids…, everything else), computed directly from the softmax."""
    p = F.softmax(logits.double(), -1)
    top = p.gather(-1, ids)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True))], -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_topk_losses_are_the_dense_losses_of_the_bucketed_distributions(k: int) -> None:
    s, t = _rows(11)
    targets = _topk_targets(t, k)
    p_t, p_s = _bucket_probs(t, targets.topk_ids), _bucket_probs(s, targets.topk_ids)
    torch.testing.assert_close(sparse_forward_kl(s, targets, chunk=4).double(), _kl(p_t, p_s).mean(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_reverse_kl(s, targets, chunk=4).double(), _kl(p_s, p_t).mean(),
                               rtol=1e-5, atol=1e-6)
    beta = 0.7
    m = beta * p_t + (1 - beta) * p_s
    jsd = (beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)).mean()
    torch.testing.assert_close(sparse_jsd(s, targets, beta=beta, chunk=4).double(), jsd, rtol=1e-5, atol=1e-6)
    # The bucketed loss is a lower bound of the dense one (data processing inequality), so top-k KD
    # without the tail bucket's help would see less than the real divergence.
    assert float(sparse_forward_kl(s, targets)) <= float(_dense_on_rows("forward_kl", s, t)) + 1e-6


def test_sparse_losses_mask_chunking_and_gradients() -> None:
    s, t = _rows(12, n=10)
    targets = _topk_targets(t, 4)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.float32)
    keep = mask.bool()
    kept = SparseTargets(targets.topk_ids[keep], targets.topk_logprobs[keep], targets.tail_logmass[keep])
    for name in ("forward_kl", "reverse_kl", "jsd"):
        a = s.clone().requires_grad_(True)
        loss = _sparse(name)(a, targets, mask, chunk=3)
        torch.testing.assert_close(loss, _sparse(name)(s[keep], kept, chunk=128))
        loss.backward()
        assert float(a.grad[~keep].abs().sum()) == 0.0 and float(a.grad[keep].abs().sum()) > 0
        assert float(_sparse(name)(t, targets)) == pytest.approx(0.0, abs=1e-5)  # student = teacher
    with pytest.raises(ValueError):
        sparse_forward_kl(s[:3], targets)
    with pytest.raises(ValueError):
        sparse_jsd(s, targets, beta=1.0)
    with pytest.raises(ValueError):
        sampled_forward_kl(s, targets)  # no samples cached
    assert set(SPARSE_DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "sampled_forward_kl"}


def _sampled_targets(t: torch.Tensor, samples: int, generator: torch.Generator) -> SparseTargets:
    """Sampled targets for teacher logits [N, V], padded like the soft-label reader pads them."""
    from edgepack.distill.softlabels import sample_support

    lp = F.log_softmax(t, -1)
    ids, counts, lengths = sample_support(lp, samples, generator)
    n, width = lp.shape[0], int(lengths.max())
    pos = torch.repeat_interleave(torch.arange(n), lengths)
    col = torch.arange(ids.numel()) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    out = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width), torch.zeros(n, width)
    out[0][pos, col], out[1][pos, col], out[2][pos, col] = ids, lp[pos, ids], counts.float() / samples
    return SparseTargets(torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), torch.zeros(n), *out)


def test_sampled_forward_kl_is_unbiased_in_value_and_gradient() -> None:
    s, t = _rows(13, n=4, v=11, scale=2.0)
    n, reps = s.shape[0], 4000
    dense_student = s.clone().requires_grad_(True)
    dense = _dense_on_rows("forward_kl", dense_student, t)
    dense.backward()
    # reps independent 16-draw estimates of every position, evaluated in one call: the mean over
    # all rows is the mean over replicates of the per-replicate loss.
    targets = _sampled_targets(t.repeat(reps, 1), 16, torch.Generator().manual_seed(1234))
    student = s.repeat(reps, 1).requires_grad_(True)
    estimate = sampled_forward_kl(student, targets, chunk=1000)
    estimate.backward()
    # Per-replicate values (for the standard error only), straight from the definition.
    per_row = (targets.sample_weights * (targets.sample_logprobs
                                         - F.log_softmax(s, -1).repeat(reps, 1).gather(-1, targets.sample_ids))).sum(-1)
    per_rep = per_row.double().reshape(reps, n).mean(-1)
    torch.testing.assert_close(per_rep.mean(), estimate.detach().double())
    se = per_rep.std() / reps**0.5
    value, want = float(estimate.detach()), float(dense.detach())
    assert abs(value - want) < 4 * se, (value, want, float(se))
    # Row r·n + i's gradient × reps is replicate r's estimate of the dense gradient of position i.
    grads = (student.grad * reps).double().reshape(reps, n, -1)
    g_se = grads.std(0) / reps**0.5
    assert bool(((grads.mean(0) - dense_student.grad.double()).abs() < 4 * g_se + 1e-6).all())
    # Not a trivially wide test: one 16-draw estimate is far from the dense value.
    assert float(per_rep.std()) > 0.05 and float(se) < 0.005


def test_sparse_targets_cat_pads_samples() -> None:
    a = SparseTargets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2),
                      torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 1), torch.ones(2, 1))
    b = SparseTargets(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), torch.zeros(1),
                      torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4), torch.full((1, 4), 0.25))
    c = SparseTargets.cat([a, b])
    assert len(c) == 3 and c.sample_ids.shape == (3, 4)
    assert c.sample_weights.sum(-1).tolist() == [1.0, 1.0, 1.0]
