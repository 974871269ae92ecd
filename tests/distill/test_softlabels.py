"""The sparse soft-label store on tiny run dirs: cache, read back, resume, validate, and train through it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgepack.atomic import is_complete
from edgepack.constants import COMPLETE_MARKER, SOFTLABELS_DIR, SOFTLABELS_INDEX, TEACHER_DIR
from edgepack.distill.softlabels import cache_soft_labels, sample_support
from edgepack.distill.softlabels_read import SoftLabels, open_soft_labels
from edgepack.errors import InvalidModelFile, RunDirError, UsageError
from tests.distill.conftest import make_run, train_rows

CONTEXT = [{"role": "user", "content": "Pump P-1 bearing noise, vibration rising"},
           {"role": "assistant", "content": "Category: mechanical\nAction: Inspect the bearing."}]
K, SAMPLES, SHARD_ROWS = 8, 16, 5


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, tiny4_dir: Path) -> Path:
    """A run with teacher-only context, cached with k=8, 16 samples, 5 rows a shard (3 shards)."""
    run = make_run(tmp_path_factory.mktemp("softlabels") / "run", tiny4_dir, context=CONTEXT)
    cache_soft_labels(run, k=K, samples=SAMPLES, shard_rows=SHARD_ROWS)
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _teacher_and_examples(run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import tokenize_rows

    tok = AutoTokenizer.from_pretrained(run / TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(run / TEACHER_DIR, dtype=torch.float32).eval()
    examples, _ = tokenize_rows(tok, train_rows(), CONTEXT, 256)
    return tok, teacher, examples


def test_cache_holds_the_teachers_distribution_at_every_answer_token(cached: Path) -> None:
    out = cached / SOFTLABELS_DIR
    assert is_complete(out)
    index = json.loads((out / SOFTLABELS_INDEX).read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert [s["rows"] for s in index["shards"]] == [[0, 5], [5, 10], [10, 12]]
    assert index["k"] == K and index["samples"] == SAMPLES and index["rows"] == 12
    assert index["teacher_sha256"] == json.loads((cached / TEACHER_DIR / "source.json").read_text())["sha256"]
    assert 0 < index["retained_mass"]["mean"] < 1 and index["bytes_per_token"] > 0
    assert index["timing"]["forward_tokens_per_s"] > 0 and index["timing"]["shards_computed"] == 3
    assert index["timing"]["teacher_prefix_tokens"] >= 16  # the shared-prefix KV cache was used

    tok, teacher, examples = _teacher_and_examples(cached)
    labels = open_soft_labels(cached, max_length=256)
    assert len(labels) == len(examples) == 12 and index["tokens"] == sum(e.answer_tokens for e in examples)
    with torch.no_grad():
        for i, e in enumerate(examples):
            # A direct, unbatched forward of the teacher over its full sequence (no prefix cache).
            logits = teacher(input_ids=torch.tensor([e.teacher_ids])).logits[0]
            lp = F.log_softmax(logits[e.teacher_prompt - 1:len(e.teacher_ids) - 1], -1)
            row = labels.row(i)
            assert row.tokens.tolist() == e.student_ids[e.student_prompt:]
            assert row.topk_ids.shape == (e.answer_tokens, K)
            # Stored log-probs are the teacher's at the stored ids (fp16), and they are its k largest.
            torch.testing.assert_close(row.topk_logprobs, lp.gather(-1, row.topk_ids), atol=4e-3, rtol=2e-3)
            kth_next = lp.topk(K + 1, -1).values[:, K]
            assert bool((lp.gather(-1, row.topk_ids).min(-1).values >= kth_next - 1e-4).all())
            # The tail is the exact mass outside the stored ids.
            tail = torch.logsumexp(lp.scatter(-1, row.topk_ids, float("-inf")), -1)
            torch.testing.assert_close(row.tail_logmass, tail, atol=1e-4, rtol=1e-4)
            # Sampled tokens: teacher log-probs, weights count/16 summing to 1 per position.
            real = row.sample_weights > 0
            torch.testing.assert_close(row.sample_logprobs[real], lp.gather(-1, row.sample_ids)[real],
                                       atol=4e-3, rtol=2e-3)
            torch.testing.assert_close(row.sample_weights.sum(-1), torch.ones(e.answer_tokens))
            assert bool(((row.sample_weights * SAMPLES) == (row.sample_weights * SAMPLES).round()).all())


def test_targets_line_up_with_collate(cached: Path) -> None:
    from edgepack.distill.batching import collate

    tok, _, examples = _teacher_and_examples(cached)
    labels = open_soft_labels(cached)
    chosen = [7, 2, 11, 5]  # across shards, out of order
    part = [examples[i] for i in chosen]
    batch = collate([e.student_ids for e in part], [e.student_prompt for e in part], tok.pad_token_id)
    targets = labels.targets(chosen, part)
    assert len(targets) == int(batch.predicts.sum())
    assert torch.equal(targets.tokens, batch.targets)
    assert targets.sample_ids.shape[0] == len(targets)
    with pytest.raises(RunDirError, match="does not match"):
        labels.targets([0, 1], [examples[1], examples[0]])
    with pytest.raises(IndexError):
        labels.row(12)


def test_k_equal_vocab_reproduces_dense_kd_through_the_reader(tmp_path: Path, tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from edgepack.distill.batching import TeacherPrefix, collate
    from edgepack.distill.losses import DIVERGENCES, SPARSE_DIVERGENCES
    from tests.tiny import build_tiny_llama

    run = make_run(tmp_path / "run", tiny4_dir, context=CONTEXT)
    tok, teacher, examples = _teacher_and_examples(run)
    vocab = teacher.config.vocab_size
    index = cache_soft_labels(run, k=vocab, shard_rows=8)
    assert index["retained_mass"]["min"] == pytest.approx(1.0, abs=2e-3)
    student = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "student", seed=1), dtype=torch.float32)
    assert student.config.vocab_size == vocab
    labels = open_soft_labels(run)
    prefix = TeacherPrefix(teacher, examples)
    chosen = [3, 9, 0]
    part = [examples[i] for i in chosen]
    batch = collate([e.student_ids for e in part], [e.student_prompt for e in part], tok.pad_token_id)
    hidden = student.get_decoder()(input_ids=batch.ids, attention_mask=batch.attention).last_hidden_state
    s_logits = student.get_output_embeddings()(hidden[batch.predicts])
    t_logits = prefix.logits(teacher, part, tok.pad_token_id)
    targets = labels.targets(chosen, part)
    ones = torch.ones(1, s_logits.shape[0])
    for name in ("forward_kl", "reverse_kl", "jsd"):
        dense = DIVERGENCES[name](s_logits[None], t_logits[None], ones)
        sparse = SPARSE_DIVERGENCES[name](s_logits, targets)
        # fp16 log-probs: equal to the dense loss up to the storage rounding.
        torch.testing.assert_close(sparse, dense, rtol=5e-3, atol=1e-4)
        g_dense, = torch.autograd.grad(dense, s_logits, retain_graph=True)
        g_sparse, = torch.autograd.grad(sparse, s_logits, retain_graph=True)
        torch.testing.assert_close(g_sparse, g_dense, rtol=2e-2, atol=2e-5)


def test_resume_recomputes_only_the_missing_shard(cached: Path, tmp_path: Path) -> None:
    run = _copy(cached, tmp_path / "run")
    out = run / SOFTLABELS_DIR
    index = json.loads((out / SOFTLABELS_INDEX).read_text())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    # A finished store is returned as is.
    assert cache_soft_labels(run, k=K, samples=SAMPLES, shard_rows=SHARD_ROWS)["skipped"]
    (out / "shard-00001.safetensors").unlink()
    again = cache_soft_labels(run, k=K, samples=SAMPLES, shard_rows=SHARD_ROWS)
    assert again["timing"]["shards_computed"] == 1 and again["timing"]["shards_reused"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]
    assert after["shard-00002.safetensors"] == before["shard-00002.safetensors"]
    # Deterministic: the recomputed shard (sampled tokens included) is byte-identical.
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]
    # A killed run: no index, no marker, a half-written shard under a temporary name.
    for name in (COMPLETE_MARKER, SOFTLABELS_INDEX, "shard-00002.safetensors"):
        (out / name).unlink()
    (out / "shard-00002.safetensors.part-999999999.edgepack-tmp").write_bytes(b"partial")  # a dead pid's write
    resumed = cache_soft_labels(run, k=K, samples=SAMPLES, shard_rows=SHARD_ROWS)
    assert resumed["timing"]["shards_computed"] == 1 and is_complete(out)
    assert not list(out.glob("*.part-*"))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in index["shards"]]


def test_damaged_shards_are_refused_on_read_and_recomputed(cached: Path, tmp_path: Path) -> None:
    run = _copy(cached, tmp_path / "run")
    out = run / SOFTLABELS_DIR
    shard = out / "shard-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[:-100])  # truncated
    with pytest.raises(InvalidModelFile, match="shard-00001.safetensors is truncated"):
        open_soft_labels(run)
    flipped = bytearray(original)
    flipped[-5] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(flipped))
    with pytest.raises(InvalidModelFile, match="does not match its sha256"):
        open_soft_labels(run)
    report = cache_soft_labels(run, k=K, samples=SAMPLES, shard_rows=SHARD_ROWS)
    assert report["timing"]["shards_computed"] == 1 and shard.read_bytes() == original
    shard.unlink()
    with pytest.raises(InvalidModelFile, match="missing"):
        open_soft_labels(run)


def test_identity_mismatches_and_bad_arguments(cached: Path, tmp_path: Path) -> None:
    out = cached / SOFTLABELS_DIR
    with pytest.raises(RunDirError, match="teacher_sha256"):
        SoftLabels(out, teacher_sha256="0" * 64)
    with pytest.raises(RunDirError, match="max_length"):
        open_soft_labels(cached, max_length=128)
    with pytest.raises(RunDirError, match="other settings"):
        cache_soft_labels(cached, k=K + 1, samples=SAMPLES, shard_rows=SHARD_ROWS)
    run = _copy(cached, tmp_path / "run")
    (run / SOFTLABELS_DIR / COMPLETE_MARKER).unlink()
    with pytest.raises(RunDirError, match="incomplete"):
        open_soft_labels(run)
    # A half-finished store of other settings is not mixed with new shards.
    with pytest.raises(RunDirError, match="other settings"):
        cache_soft_labels(run, k=K, samples=0, shard_rows=SHARD_ROWS)
    with pytest.raises(UsageError):
        cache_soft_labels(run, k=0)
    with pytest.raises(UsageError):
        cache_soft_labels(run, samples=300)
    with pytest.raises(UsageError, match="vocabulary"):
        cache_soft_labels(tmp_path / "run", k=10**6)
    with pytest.raises(RunDirError, match="missing or incomplete"):
        cache_soft_labels(tmp_path / "nothing")


def test_sample_support_counts() -> None:
    lp = F.log_softmax(torch.randn(6, 20, generator=torch.Generator().manual_seed(0)), -1)
    ids, counts, lengths = sample_support(lp, 16, torch.Generator().manual_seed(1))
    assert int(counts.sum()) == 6 * 16 and len(ids) == int(lengths.sum())
    start = 0
    for n in lengths.tolist():
        row = ids[start:start + n]
        assert torch.equal(row, row.unique()) and int(counts[start:start + n].sum()) == 16
        start += n
    again = sample_support(lp, 16, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((ids, counts, lengths), again))
