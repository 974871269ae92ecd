"""KD training end to end on tiny run dirs: it learns, saves a complete student, resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgepack.atomic import is_complete
from edgepack.constants import CHECKPOINT_DIR, STUDENT_DIR, STUDENT_INFO, TEACHER_DIR, TRAIN_REPORT
from edgepack.distill.checkpoint import checkpoint_dirs
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import RunDirError, RuntimeFailure, UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run, student_with_another_tokenizer, train_rows
from tests.distill.resume_check import check_resume

PROFILE = load_profile("cpu-x86-2c")
FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


def _kd_on_train_set(run: Path, student_model) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import TeacherPrefix, tokenize_rows
    from edgepack.distill.evaluate import answer_divergence

    tok = AutoTokenizer.from_pretrained(run / TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(run / TEACHER_DIR).eval()
    examples, _ = tokenize_rows(tok, train_rows(), [], 256)
    return answer_divergence(teacher, student_model.eval(), examples, TeacherPrefix(teacher, examples),
                             tok.pad_token_id)["kl"]


def test_training_reduces_kd_loss_and_writes_a_complete_student(tmp_path: Path, tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.student import derive_student

    run = make_run(tmp_path / "run", tiny4_dir)
    calls: list[tuple] = []
    report = train_student(run_dir=run, profile=PROFILE, student="auto", steps=8, seed=0, resume=False,
                           progress=lambda t, d, n=None: calls.append((t, d, n)), config=FAST)
    out = run / STUDENT_DIR
    assert is_complete(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            STUDENT_INFO, TRAIN_REPORT} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    info = json.loads((out / STUDENT_INFO).read_text())
    assert info["kept_layers"] == [0, 3] and info["num_layers"] == 2 and info["params"] == report["params"]
    assert report["params"] <= 0.6 * report["teacher_params"]
    assert len(report["loss_curve"]) == 8 and report["tokens_per_s"] > 0 and report["peak_rss_mb"] > 0
    assert json.loads((out / TRAIN_REPORT).read_text())["final_loss"] == report["final_loss"]
    assert ("train", 8, 8) in calls
    # The saved folder is a usable HF model with the teacher's tokenizer and chat template.
    student = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False) \
        .endswith("<|im_start|>assistant\n")
    # KD loss over the whole training set: distilled student < the same student before KD.
    before, _ = derive_student(run / TEACHER_DIR, keep=info["kept_layers"])
    kd_before, kd_after = _kd_on_train_set(run, before), _kd_on_train_set(run, student)
    assert kd_after < 0.7 * kd_before, (kd_before, kd_after)
    # A rerun with the same settings is skipped; other settings are refused.
    assert train_student(run_dir=run, profile=PROFILE, steps=8, seed=0, resume=True, config=FAST)["skipped"]
    with pytest.raises(RunDirError):
        train_student(run_dir=run, profile=PROFILE, steps=9, seed=0, resume=True, config=FAST)


def test_resume_after_interruption_is_bit_identical(tmp_path: Path, tiny4_dir: Path) -> None:
    def killed(cut: Path) -> None:
        assert not (cut / STUDENT_DIR).exists()
        assert [p.name for p in checkpoint_dirs(cut / CHECKPOINT_DIR)] == ["step-2"]
        # A save killed half-way leaves a folder without .complete: it must be ignored.
        shutil.copytree(cut / CHECKPOINT_DIR / "step-2", cut / CHECKPOINT_DIR / "step-4")
        (cut / CHECKPOINT_DIR / "step-4" / ".complete").unlink()
        with pytest.raises(RunDirError, match="unfinished run") as exc:
            train_student(run_dir=cut, profile=PROFILE, steps=6, seed=1, resume=False, config=FAST)
        assert "--resume" in exc.value.hint

    check_resume(tmp_path, tiny4_dir, steps=6, kill_after=3, resumes_from=2, before_resume=killed, profile=PROFILE,
                 seed=1, config=FAST)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny4_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.distill import losses

    run = make_run(tmp_path / "run", tiny4_dir)
    real = losses.forward_kl
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 6 else value  # 2 micro-batches/step: step 4 goes bad

    monkeypatch.setitem(losses.DIVERGENCES, "forward_kl", poisoned)
    with pytest.raises(RuntimeFailure, match="step 4: the loss is nan") as exc:
        train_student(run_dir=run, profile=PROFILE, steps=8, seed=0, resume=False,
                      config=TrainConfig(lr=3e-3, save_every=10))
    assert "checkpoint" in exc.value.hint
    assert [p.name for p in checkpoint_dirs(run / CHECKPOINT_DIR)] == ["step-3"]
    assert not (run / STUDENT_DIR).exists()
    weights = load_file(str(run / CHECKPOINT_DIR / "step-3" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Resuming with a healthy loss finishes the run from step 3.
    monkeypatch.setitem(losses.DIVERGENCES, "forward_kl", real)
    report = train_student(run_dir=run, profile=PROFILE, steps=8, seed=0, resume=True,
                           config=TrainConfig(lr=3e-3, save_every=10))
    assert report["resumed_from_step"] == 3 and len(report["loss_curve"]) == 8


def test_teacher_prefix_cache_matches_a_full_forward(tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import TeacherPrefix, collate, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir).eval()
    ctx = [{"role": "user", "content": "Example: fan noisy"},
           {"role": "assistant", "content": "Category: mechanical\nAction: Check the fan."}]
    examples, _ = tokenize_rows(tok, train_rows(5), ctx, 256)
    assert all(len(e.teacher_ids) > len(e.student_ids) for e in examples)
    prefix = TeacherPrefix(teacher, examples)
    assert prefix.length > TeacherPrefix.MIN_TOKENS
    cached = prefix.logits(teacher, examples[:3], tok.pad_token_id)
    full = collate([e.teacher_ids for e in examples[:3]], [e.teacher_prompt for e in examples[:3]], tok.pad_token_id)
    with torch.no_grad():
        ref = teacher(input_ids=full.ids, attention_mask=full.attention).logits[full.predicts]
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=1e-4)
    assert int(full.predicts.sum()) == sum(e.answer_tokens for e in examples[:3])


def test_student_shared_prefix_matches_the_full_batch_in_values_and_gradients(tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import answer_hidden, shared_prefix_len, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    examples, _ = tokenize_rows(tok, train_rows(5), [], 256)
    part = examples[:3]
    seqs, prompts = [e.student_ids for e in part], [e.student_prompt for e in part]
    n = shared_prefix_len(seqs, prompts)
    assert n >= 16 and n < min(prompts)
    results = []
    for prefix_len in (0, n):
        model = AutoModelForCausalLM.from_pretrained(tiny4_dir).train()
        hidden, batch = answer_hidden(model.get_decoder(), seqs, prompts, tok.pad_token_id, prefix_len)
        logits = model.get_output_embeddings()(hidden)
        loss = torch.nn.functional.cross_entropy(logits, batch.targets)
        loss.backward()
        results.append((logits.detach(), batch.targets, {k: p.grad for k, p in model.named_parameters()}))
    (full, targets, grads), (shared, shared_targets, shared_grads) = results
    assert torch.equal(targets, shared_targets) and len(targets) == sum(e.answer_tokens for e in part)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    # The prefix's own weights get their gradient through its KV cache (the embedding rows of
    # prefix-only tokens, every block's k/v projections).
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_training_with_teacher_context(tmp_path: Path, tiny4_dir: Path) -> None:
    ctx = [{"role": "user", "content": "Example alarm: fan noisy"},
           {"role": "assistant", "content": "Category: mechanical\nAction: Check the fan bearings."}]
    run = make_run(tmp_path / "run", tiny4_dir, context=ctx)
    report = train_student(run_dir=run, profile=PROFILE, steps=2, seed=0, resume=False, config=FAST)
    assert report["teacher_prefix_tokens"] > 0 and is_complete(run / STUDENT_DIR)


def test_user_student_smaller_and_tokenizer_mismatch_is_response_only(tmp_path: Path, tiny4_dir: Path,
                                                              tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    run = make_run(tmp_path / "run", tiny4_dir)
    # Same tokenizer, fewer blocks: accepted.
    report = train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=2, seed=0,
                           resume=False, config=FAST)
    assert report["params"] < report["teacher_params"]
    assert report["mode"] == "dense" and report["mode_reason"] is None
    # Another tokenizer (one added token): never misaligned logits, response-only with the reason.
    other = student_with_another_tokenizer(tiny_llama_dir, tmp_path / "other")
    run2 = make_run(tmp_path / "run2", tiny4_dir)
    report = train_student(run_dir=run2, profile=PROFILE, student=str(other), steps=2, seed=0, resume=False,
                           config=FAST)
    assert report["mode"] == "response-only"
    assert "tokenizer differs" in report["mode_reason"] and "vocabularies differ" in report["mode_reason"]
    assert all(h["kd"] == 0.0 and h["loss"] == h["ce"] for h in report["loss_curve"])
    # The student keeps its own tokenizer (the added token), not the teacher's.
    assert "<|extra|>" in AutoTokenizer.from_pretrained(run2 / STUDENT_DIR).get_vocab()
    # A student larger than the teacher: refused.
    run3 = make_run(tmp_path / "run3", tiny_llama_dir)
    with pytest.raises(UsageError, match="more than the teacher"):
        train_student(run_dir=run3, profile=PROFILE, student=str(tiny4_dir), steps=2, seed=0, resume=False)


def test_missing_stage_inputs(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="data is missing") as exc:
        train_student(run_dir=tmp_path / "empty", profile=PROFILE, steps=2, seed=0, resume=False)
    assert "distill data" in exc.value.hint


def test_auto_student_of_a_two_block_teacher_is_a_budget_error(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from edgepack.errors import BudgetError

    run = make_run(tmp_path / "run", tiny_llama_dir)
    with pytest.raises(BudgetError):
        train_student(run_dir=run, profile=PROFILE, steps=2, seed=0, resume=False)


def test_cached_soft_labels_with_k_equal_to_the_vocabulary_train_like_the_online_teacher(
        tmp_path: Path, tiny4_dir: Path) -> None:
    base = TrainConfig(lr=1e-2, alpha=0.0, batch_size=4, micro_batch=2)
    online = train_student(run_dir=make_run(tmp_path / "online", tiny4_dir), profile=PROFILE, steps=3, seed=0,
                           config=base)
    from dataclasses import replace

    cached_run = make_run(tmp_path / "cached", tiny4_dir)
    cached = train_student(run_dir=cached_run, profile=PROFILE, steps=3, seed=0,
                           config=replace(base, soft_labels=True, soft_k=400))
    assert (cached_run / "softlabels" / ".complete").is_file()
    assert cached["soft_labels"] == {"k": 400, "samples": 0, "divergence": "forward_kl"}
    assert cached["teacher_prefix_tokens"] is None
    for a, b in zip(online["loss_curve"], cached["loss_curve"]):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-3)
    # Top-8 + tail and importance samples train too (different, finite losses).
    sparse_run = make_run(tmp_path / "sampled", tiny4_dir)
    sampled = train_student(run_dir=sparse_run, profile=PROFILE, steps=2, seed=0,
                            config=replace(base, soft_labels=True, soft_k=8, soft_samples=16,
                                           divergence="sampled_forward_kl"))
    assert all(h["kd"] == h["kd"] and h["kd"] > 0 for h in sampled["loss_curve"])
    with pytest.raises(UsageError, match="temperature 1"):
        train_student(run_dir=sparse_run, profile=PROFILE, steps=2, seed=1,
                      config=replace(base, soft_labels=True, temperature=2.0))


def test_a_student_without_a_chat_template_is_refused_before_any_work(tmp_path: Path, tiny4_dir: Path,
                                                                      tiny_llama_dir: Path) -> None:
    """Issue #20 defect 12: exit 3 (internal error) from deep inside tokenization; now one line, exit 2."""
    import os
    import subprocess
    import sys

    student = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    (student / "chat_template.jinja").unlink(missing_ok=True)
    run = make_run(tmp_path / "run", tiny4_dir)
    env = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-m", "edgepack", "distill", "train", str(run), "-p", "cpu-x86-2c",
                          "--student", str(student), "--steps", "1"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "chat template" in errors[0] and str(student) in errors[0]
    assert "hint:" in out.stderr and "Traceback" not in out.stderr
    assert not (run / STUDENT_DIR).exists() and not (run / CHECKPOINT_DIR).exists()


def test_a_users_student_on_cached_soft_labels_never_loads_the_teachers_weights(tmp_path: Path, tiny4_dir: Path,
                                                                                 tiny_llama_dir: Path) -> None:
    """Only the teacher's shape is needed (meta device): the weights file can be gone once the cache exists."""
    run = make_run(tmp_path / "run", tiny4_dir)
    cfg = dataclasses.replace(FAST, soft_labels=True)
    first = train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=2, seed=0, config=cfg)
    (run / TEACHER_DIR / "model.safetensors").unlink()  # the cache is built; the teacher's weights are not read again
    again = train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=2, seed=0, config=cfg,
                          variant="again")
    assert again["teacher_params"] == first["teacher_params"] > again["params"]
    assert again["mode"] == "soft-labels"
    with pytest.raises(OSError):  # dense KD runs the teacher: its weights are read
        train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=2, seed=0, config=FAST,
                      variant="dense")
