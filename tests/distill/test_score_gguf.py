"""GgufScorer against transformers on the same tiny model, KV-prefix reuse, vocabulary refusal,
and finding a run's teacher GGUF (distill/score_gguf.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from edgepack.constants import DATA_DIR, DATA_REPORT, TEACHER_CORRECTED_DIR, TEACHER_DIR, TEACHER_SOURCE
from edgepack.distill.batching import Example, collate, tokenize_rows
from edgepack.distill.score_gguf import GgufScorer, check_vocab, run_teacher_gguf, topk_tail
from edgepack.errors import RunDirError, UsageError
from tests.distill.conftest import make_run, train_rows
from tests.tiny import build_tiny_llama

K = 8
# llama.cpp on an F32 GGUF vs transformers fp32: ~2e-6 with the scorer's f32 KV cache, ~1e-3 with
# llama.cpp's default f16 cache (which this tolerance catches).
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("score") / "tiny-F32.gguf", outtype="F32")


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    """Three rows of different lengths sharing the system prompt, as training tokenizes them, with a
    teacher-only context turn (so teacher_ids differ from student_ids)."""
    rows = train_rows(3)
    rows[1]["response"] += " Then log the reading and call the shift lead."
    rows[2]["response"] = "Category: thermal"
    context = [{"role": "user", "content": "Example alarm"}, {"role": "assistant", "content": "Category: network"}]
    out, too_long = tokenize_rows(tokenizer, rows, context, max_length=256)
    assert too_long == 0 and len({len(e.teacher_ids) for e in out}) == 3
    return out


def hf_answer_logprobs(model_dir: Path, examples: list[Example]) -> torch.Tensor:
    """transformers' log-softmax [N, V] at the positions predicting each example's answer, in collate order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.teacher_ids])).logits[0]
            rows.append(torch.log_softmax(logits[e.teacher_prompt - 1:len(e.teacher_ids) - 1].float(), dim=-1))
    return torch.cat(rows)


def assert_matches_dense(targets, ref: torch.Tensor, k: int, n_known: int | None = None) -> None:
    """``targets`` (SparseTargets) is the top-k + tail of the dense log-probs ``ref`` [N, V]."""
    n_known = n_known or ref.shape[1]
    assert targets.topk_ids.dtype == torch.int64 and targets.topk_logprobs.dtype == torch.float32
    assert targets.tail_logmass.dtype == torch.float32
    assert targets.topk_ids.shape == (ref.shape[0], k) and targets.tail_logmass.shape == (ref.shape[0],)
    assert int(targets.topk_ids.max()) < n_known
    # The log-probs of the ids the scorer kept are transformers' (whatever the order of near-ties).
    assert torch.allclose(targets.topk_logprobs, ref.gather(1, targets.topk_ids), atol=TOL)
    # Same top-k up to ties: every id transformers ranks clearly above its k-th best is kept,
    # and the kept ids are ranked best first.
    kth = ref[:, :n_known].topk(k, dim=-1).values[:, -1:]
    clearly_in = ref[:, :n_known] > kth + 2 * TOL
    kept = torch.zeros_like(clearly_in).scatter(1, targets.topk_ids, True)
    assert bool((kept | ~clearly_in).all())
    assert bool((targets.topk_logprobs[:, :-1] >= targets.topk_logprobs[:, 1:]).all())
    # The tail is the rest of the mass: transformers' mass outside the kept ids, and top-k + tail = 1.
    outside = torch.logsumexp(ref.scatter(1, targets.topk_ids, float("-inf")), dim=-1)
    assert torch.allclose(targets.tail_logmass, outside, atol=TOL)
    total = torch.logsumexp(torch.cat([targets.topk_logprobs, targets.tail_logmass[:, None]], dim=1), dim=1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)


def test_scores_match_transformers(f32_gguf: Path, tiny_llama_dir: Path, tokenizer, examples: list[Example]) -> None:
    with GgufScorer(f32_gguf, tokenizer, k=K, n_ctx=256, threads=2) as scorer:
        targets = scorer.targets([0, 1, 2], examples)
        info = scorer.describe()
    ref = hf_answer_logprobs(tiny_llama_dir, examples)
    batch = collate([e.teacher_ids for e in examples], [e.teacher_prompt for e in examples], pad_id=0)
    assert len(targets) == len(batch.targets) == ref.shape[0] == sum(e.answer_tokens for e in examples)
    assert_matches_dense(targets, ref, K)
    # The teacher's favourite token is a real prediction, not padding: top-1 agrees where it is clear.
    gap = ref.topk(2, dim=-1).values
    clear = (gap[:, 0] - gap[:, 1]) > 2 * TOL
    assert bool((targets.topk_ids[clear, 0] == ref.argmax(-1)[clear]).all())
    assert info["kind"] == "gguf" and info["k"] == K and info["n_ctx"] >= 256 and len(info["sha256"]) == 64
    assert info["positions"] == len(targets) and info["tokens_reused"] > 0  # the shared system prompt


@pytest.mark.parametrize("n_batch", [512, 7])
def test_prefix_reuse_equals_scoring_from_scratch(f32_gguf: Path, tokenizer, examples: list[Example],
                                                  n_batch: int) -> None:
    # Long, short, the same one again, a longer one after a shorter one: every kind of prefix change.
    order = [examples[1], examples[2], examples[2], examples[0], examples[1]]
    with GgufScorer(f32_gguf, tokenizer, k=K, n_ctx=256, threads=2, n_batch=n_batch) as scorer:
        reused = scorer.targets(list(range(len(order))), order)
        stats = scorer.describe()
    scratch = []
    for e in order:
        with GgufScorer(f32_gguf, tokenizer, k=K, n_ctx=256, threads=2) as fresh:
            scratch.append(fresh.targets([0], [e]))
            assert fresh.describe()["tokens_reused"] == 0
    ids = torch.cat([t.topk_ids for t in scratch])
    assert torch.equal(reused.topk_ids, ids)
    assert torch.allclose(reused.topk_logprobs, torch.cat([t.topk_logprobs for t in scratch]), atol=1e-5)
    assert torch.allclose(reused.tail_logmass, torch.cat([t.tail_logmass for t in scratch]), atol=1e-5)
    # Only the first example ran its system prompt; the others kept its KV cache.
    total = sum(len(e.teacher_ids) - 1 for e in order)
    assert stats["tokens_evaluated"] + stats["tokens_reused"] == total
    assert stats["tokens_reused"] >= (len(order) - 1) * 16


def test_a_gguf_with_another_vocabulary_is_refused(f32_gguf: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # Same size, two ids swapped: a silent misalignment unless the ids are compared.
    folder = tmp_path / "tok"
    shutil.copytree(tiny_llama_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    swapped = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(UsageError, match=r"token 30[01] is") as err:
        GgufScorer(f32_gguf, swapped, k=K, n_ctx=256)
    assert "--on-policy-teacher hf" in err.value.hint
    # One more token in the tokenizer than in the GGUF.
    grown = AutoTokenizer.from_pretrained(tiny_llama_dir)
    grown.add_tokens(["<extra_token>"])
    with pytest.raises(UsageError, match="not the same vocabulary"):
        GgufScorer(f32_gguf, grown, k=K, n_ctx=256)


def test_gguf_tokens_past_the_tokenizer_must_be_padding(tokenizer) -> None:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    normal, unused = 1, 5
    padded = check_vocab(Path("t.gguf"), [*pieces, "[PAD400]"], [normal] * len(pieces) + [unused], tokenizer)
    assert padded == len(pieces)
    with pytest.raises(UsageError, match="is not padding"):
        check_vocab(Path("t.gguf"), [*pieces, "extra"], [normal] * (len(pieces) + 1), tokenizer)


def test_padded_teacher_keeps_padding_mass_in_the_tail(tiny_llama_dir: Path, tokenizer, examples: list[Example],
                                                       tmp_path: Path) -> None:
    """Embedding rows past the tokenizer (llama.cpp's padding) are never a top-k id; their mass is tail."""
    from transformers import AutoModelForCausalLM

    from edgepack.export.gguf.convert import convert_hf_to_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer) + 16, mean_resizing=False)
    with torch.no_grad():  # make the padding rows likely, so the test can fail
        model.get_input_embeddings().weight[len(tokenizer):] = model.get_input_embeddings().weight[:16] * 3
    padded = tmp_path / "padded"
    model.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    gguf = convert_hf_to_gguf(padded, tmp_path / "padded-F32.gguf", outtype="F32")
    with GgufScorer(gguf, tokenizer, k=K, n_ctx=256, threads=2) as scorer:
        assert scorer.n_vocab == len(tokenizer) + 16 and scorer.n_known == len(tokenizer)
        targets = scorer.targets([0, 1], examples[:2])
    ref = hf_answer_logprobs(padded, examples[:2])
    assert float(ref[:, len(tokenizer):].logsumexp(-1).exp().max()) > 0.01  # padding holds real mass
    assert_matches_dense(targets, ref, K, n_known=len(tokenizer))


def test_unknown_kv_cache_type_is_refused(f32_gguf: Path, tokenizer) -> None:
    with pytest.raises(UsageError, match="unknown KV cache type"):
        GgufScorer(f32_gguf, tokenizer, kv_cache="q8")


def test_topk_tail_with_the_whole_vocabulary_has_no_tail() -> None:
    logits = torch.randn(3, 5)
    ids, lps, tail = topk_tail(logits, 5)
    assert torch.isneginf(tail).all()
    assert torch.allclose(lps.exp().sum(-1), torch.ones(3))


def test_a_sequence_longer_than_the_context_is_refused(f32_gguf: Path, tokenizer, examples: list[Example]) -> None:
    e = examples[0]
    long = Example(e.student_ids, e.student_prompt, e.teacher_ids * 8, e.teacher_prompt, e.row)
    with GgufScorer(f32_gguf, tokenizer, k=K, n_ctx=256, threads=2) as scorer:
        with pytest.raises(UsageError, match="context holds"):
            scorer.targets([0], [long])
        assert len(scorer.targets([0], [e])) == e.answer_tokens  # still usable afterwards


# ------------------------------------------------------------------ run_teacher_gguf


def test_run_teacher_gguf_for_gguf_and_hf_teachers(f32_gguf: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    gguf = shutil.copyfile(f32_gguf, tmp_path / "teacher.gguf")
    run = make_run(tmp_path / "run-gguf", gguf)
    assert run_teacher_gguf(run) == gguf.resolve()
    with open(gguf, "ab") as fh:  # changed after the data was made
        fh.write(b"\0")
    with pytest.raises(RunDirError, match="has changed"):
        run_teacher_gguf(run)
    gguf.unlink()
    with pytest.raises(RunDirError, match="no longer exists"):
        run_teacher_gguf(run)
    assert run_teacher_gguf(make_run(tmp_path / "run-hf", tiny_llama_dir)) is None


def test_run_teacher_gguf_for_a_corrected_teacher(f32_gguf: Path, tmp_path: Path) -> None:
    """After teacher correction the run's teacher is RUN/teacher-corrected, whose GGUF is a name in it."""
    from edgepack.distill.correct import corrected_source

    run = tmp_path / "run"
    folder = run / TEACHER_CORRECTED_DIR
    folder.mkdir(parents=True)
    gguf = shutil.copyfile(f32_gguf, folder / "teacher-Q8_0.gguf")
    source = corrected_source(folder, gguf, "0" * 64)
    (folder / TEACHER_SOURCE).write_text(json.dumps(source.describe() | {"path": gguf.name}))
    (run / DATA_DIR).mkdir()
    (run / DATA_DIR / DATA_REPORT).write_text(json.dumps({"teacher_dir": TEACHER_CORRECTED_DIR}))
    assert run_teacher_gguf(run) == gguf


@pytest.mark.slow
def test_run_teacher_gguf_for_the_builtin_teacher(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    from edgepack.distill.teachers import resolve_teacher

    folder = tmp_path / "run" / TEACHER_DIR
    folder.mkdir(parents=True)
    # A recorded path elsewhere (another machine): a builtin is found through its package.
    described = resolve_teacher("builtin:smollm2-135m-instruct").describe() | {"path": "/elsewhere/x.gguf"}
    (folder / TEACHER_SOURCE).write_text(json.dumps(described))
    assert run_teacher_gguf(tmp_path / "run") == builtin_teacher_gguf


@pytest.mark.slow
def test_builtin_teacher_scores_equal_the_runtime_backends(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    """A real quantized teacher (SmolLM2-135M Q4_1) with the tokenizer edgepack rebuilds from it: the
    vocabulary is accepted, and with llama.cpp's f16 KV cache the scores are the runtime backend's
    prompt logprobs (llama-cpp-python's own batch, all positions, from scratch) — KV reuse included."""
    from transformers import AutoTokenizer

    from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf
    from edgepack.runtime.backends.base import get_backend

    hf_tokenizer_from_gguf(builtin_teacher_gguf, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    examples, _ = tokenize_rows(tok, train_rows(2), [], max_length=256)
    with GgufScorer(builtin_teacher_gguf, tok, k=K, n_ctx=256, threads=1, kv_cache="f16") as scorer:
        targets = scorer.targets([0, 1], examples)
        assert scorer.describe()["tokens_reused"] > 0
    backend = get_backend("gguf").load(builtin_teacher_gguf, threads=1, n_ctx=256)
    try:
        rows = [lp for e in examples for lp in backend.prompt_logprobs(e.teacher_ids, K)[e.teacher_prompt:]]
    finally:
        backend.close()
    assert len(rows) == len(targets)
    assert torch.allclose(targets.topk_logprobs, torch.tensor([[lp for _, lp in r.top] for r in rows]), atol=1e-4)
    assert torch.equal(targets.topk_ids, torch.tensor([[i for i, _ in r.top] for r in rows]))
