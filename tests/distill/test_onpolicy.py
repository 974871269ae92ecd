"""On-policy distillation (onpolicy.py) on tiny run dirs: sampling, scoring, the loss, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
from edgepack.distill.device import CPU
from edgepack.distill.onpolicy import OnPolicy, sample_completions
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run, student_with_another_tokenizer
from tests.distill.resume_check import check_resume

PROFILE = load_profile("cpu-x86-2c")


def test_sampling_is_seeded_stops_at_eos_and_leaves_the_training_rng_alone(tiny4_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny4_dir).train()
    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    prompts = [tok("a b c").input_ids, tok("a much longer prompt than the other one").input_ids]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    kwargs = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12, device=CPU)
    a = sample_completions(model, prompts, temperature=1.0, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert model.training  # put back in training mode
    assert a == sample_completions(model, prompts, temperature=1.0, seed=7, **kwargs)
    assert a != sample_completions(model, prompts, temperature=1.0, seed=8, **kwargs)
    for c in a:
        assert 1 <= len(c) <= 12
        assert tok.eos_token_id not in c[:-1]  # cut after the first end of turn
    # Left padding does not change a row's completion: sampled alone at temperature ~0 (greedy), the same.
    cold = sample_completions(model, prompts, temperature=1e-4, seed=1, **kwargs)
    assert cold[0] == sample_completions(model, prompts[:1], temperature=1e-4, seed=1, **kwargs)[0]


def test_which_steps_sample_is_a_function_of_seed_and_step() -> None:
    op = OnPolicy(0.5, 0, 1.0, 8, 256, 3, 0, 1, "hf", None, lambda s, t: s.sum())
    picks = [op.applies(step) for step in range(200)]
    assert picks == [op.applies(step) for step in range(200)]
    assert 70 < sum(picks) < 130
    assert all(OnPolicy(1.0, 0, 1.0, 8, 256, 3, 0, 1, "hf", None, None).applies(s) for s in range(50))
    warm = OnPolicy(0.5, 20, 1.0, 8, 256, 3, 0, 1, "hf", None, None)  # the warm-up is off-policy, then as before
    assert [warm.applies(s) for s in range(200)] == [s >= 20 and p for s, p in enumerate(picks)]


def test_an_off_policy_warm_up_precedes_the_on_policy_steps(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=PROFILE, steps=4, seed=0,
                           config=TrainConfig(lr=1e-2, alpha=0.2, on_policy=1.0, on_policy_after=2))
    assert [h.get("on_policy", False) for h in report["loss_curve"]] == [False, False, True, True]
    assert all(h["ce"] > 0 and "sampled" not in h for h in report["loss_curve"][:2])
    assert report["on_policy"]["after"] == 2 and report["on_policy"]["steps_on_policy"] == 2
    assert report["identity"]["config"]["on_policy_after"] == 2


def test_on_policy_training_lowers_the_kd_on_the_students_own_samples(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=PROFILE, steps=8, seed=0,
                           config=TrainConfig(lr=1e-2, alpha=0.0, on_policy=1.0))
    curve = report["loss_curve"]
    assert all(h["on_policy"] and h["ce"] == 0.0 and h["loss"] == h["kd"] for h in curve)
    assert (curve[-1]["kd"] + curve[-2]["kd"]) / 2 < 0.7 * curve[0]["kd"], curve
    op = report["on_policy"]
    assert op["teacher"] == "hf" and op["steps_on_policy"] == 8 and op["max_new_tokens"] > 0
    assert op["completions"] == sum(h["sampled"] for h in curve) == 8 * TrainConfig().batch_size
    assert op["completions_capped"] == sum(h["capped"] for h in curve) <= op["completions"]
    assert report["identity"]["config"]["on_policy"] == 1.0
    saved = json.loads((run / STUDENT_DIR / TRAIN_REPORT).read_text())
    assert saved["on_policy"] == op


def test_mixed_on_policy_run_resumes_bit_identical(tmp_path: Path, tiny4_dir: Path) -> None:
    cfg = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.2, on_policy=0.5)
    report, _ = check_resume(tmp_path, tiny4_dir, steps=6, kill_after=3, resumes_from=2, profile=PROFILE, seed=2,
                             config=cfg)
    kinds = [h.get("on_policy", False) for h in report["loss_curve"]]
    assert any(kinds) and not all(kinds), kinds  # seed 2 mixes both kinds of step
    assert all(h["ce"] > 0 for h in report["loss_curve"] if not h.get("on_policy"))


def test_default_options_keep_the_identity_of_earlier_runs(tmp_path: Path, tiny4_dir: Path) -> None:
    from edgepack.distill.train import student_dir_name
    from edgepack.distill.train_setup import TrainRequest, check_inputs

    run = make_run(tmp_path / "run", tiny4_dir)
    request = TrainRequest(run_dir=run, profile=PROFILE, config=TrainConfig(), out=run / student_dir_name())
    assert not any(k.startswith("on_policy") for k in check_inputs(request).identity["config"])


@pytest.mark.parametrize(("config", "match"), [
    (TrainConfig(on_policy=1.5), "from 0 to 1"),
    (TrainConfig(on_policy=0.5, divergence="sft"), "--loss sft"),
    (TrainConfig(on_policy=0.5, on_policy_temperature=0.0), "temperature must be positive"),
    (TrainConfig(on_policy=0.5, on_policy_teacher="vllm"), "unknown --on-policy-teacher"),
    (TrainConfig(on_policy=0.5, on_policy_teacher="endpoint"), "teacher is local"),
    (TrainConfig(on_policy=0.5, on_policy_teacher="gguf"), "came from an HF folder"),
    (TrainConfig(on_policy=0.5, on_policy_after=2), "leaves no on-policy step in --steps 2"),
    (TrainConfig(on_policy=0.5, on_policy_after=-1), "leaves no on-policy step"),
    (TrainConfig(on_policy_after=1), "without --on-policy"),
])
def test_bad_on_policy_options_are_refused_before_training(tmp_path: Path, tiny4_dir: Path, config: TrainConfig,
                                                            match: str) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    with pytest.raises(UsageError, match=match):
        train_student(run_dir=run, profile=PROFILE, steps=2, seed=0, config=config)
    assert not (run / STUDENT_DIR).exists()


def test_a_student_with_another_tokenizer_cannot_train_on_policy(tmp_path: Path, tiny4_dir: Path,
                                                                  tiny_llama_dir: Path) -> None:
    other = student_with_another_tokenizer(tiny_llama_dir, tmp_path / "other")
    run = make_run(tmp_path / "run", tiny4_dir)
    with pytest.raises(UsageError, match="response-only"):
        train_student(run_dir=run, profile=PROFILE, student=str(other), steps=2, seed=0,
                      config=TrainConfig(on_policy=1.0))


def test_a_gguf_teacher_scores_on_policy_steps_through_llama_cpp(tmp_path: Path, tiny4_dir: Path) -> None:
    """--soft-labels with a GGUF teacher: off-policy steps read the cache, on-policy steps ask llama.cpp."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    gguf = convert_hf_to_gguf(tiny4_dir, tmp_path / "teacher-F32.gguf", outtype="F32")
    run = make_run(tmp_path / "run", gguf)
    report = train_student(run_dir=run, profile=PROFILE, steps=6, seed=2,
                           config=TrainConfig(lr=1e-2, alpha=0.2, soft_labels=True, on_policy=0.5))
    op = report["on_policy"]
    assert report["mode"] == "soft-labels" and op["teacher"] == "gguf"
    assert op["scorer"]["kind"] == "gguf" and op["scorer"]["path"] == str(gguf.resolve())
    assert 1 <= op["steps_on_policy"] < 6 and op["scorer"]["positions"] > 0
    # The llama.cpp scorer's memory is in the plan (its GGUF file at least).
    assert report["plan"]["baseline_mb"] >= gguf.stat().st_size / 2**20
    on = [h for h in report["loss_curve"] if h.get("on_policy")]
    assert all(h["ce"] == 0.0 and h["kd"] > 0 for h in on)
