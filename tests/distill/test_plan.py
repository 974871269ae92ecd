"""The training memory planner: pure selection logic, then LoRA training chosen by it (tiny model)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
from edgepack.distill.plan import plan_training
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from edgepack.memory import ModelShape
from tests.distill.conftest import make_run

# SmolLM2-135M's shape, and a 14-block student pruned from it.
TEACHER = ModelShape(30, 576, 9, 3, 64, 1536, 49152, 134_515_008, 49152 * 576, True)
STUDENT = dataclasses.replace(TEACHER, n_layers=14, params=77_873_472)


def plan(budget_mb: float, method: str = "auto", teacher_mode: str = "online"):
    return plan_training(STUDENT, teacher=TEACHER, teacher_mode=teacher_mode, budget_mb=budget_mb, baseline_mb=400,
                         batch_size=8, micro_batch=4, seq_len=256, method=method, profile_name="p")


def test_the_fastest_candidate_that_fits_is_chosen() -> None:
    roomy = plan(16384)
    assert (roomy.method, roomy.micro_batch, roomy.grad_accumulation, roomy.checkpointing) == ("full", 4, 2, False)
    assert roomy.rejected == () and roomy.planned_peak_mb <= 16384
    # Less memory: smaller micro-batches (more accumulation) or checkpointing before LoRA.
    tighter = plan(roomy.planned_peak_mb - 1)
    assert tighter.method == "full" and (tighter.micro_batch < 4 or tighter.checkpointing)
    assert tighter.rejected[0].startswith("full, micro-batch 4:")
    # Too little for full fine-tuning at any micro-batch, even with checkpointing: LoRA.
    with pytest.raises(UsageError, match=r"\(full, micro-batch 1, checkpointing\)") as exc:
        plan(1, method="full")
    smallest_full = float(re.search(r"needs at least (\d+) MB", str(exc.value)).group(1))
    lora = plan(smallest_full - 50)
    assert lora.method == "lora" and lora.planned_peak_mb <= smallest_full - 50
    # Every full candidate was tried first: 3 micro-batches (4, 2, 1) × checkpointing off/on.
    assert [r.split(":")[0] for r in lora.rejected[:6]] == [
        f"full, micro-batch {m}{c}" for c in ("", ", checkpointing") for m in (4, 2, 1)]
    # Cached soft labels free the teacher's memory.
    assert plan(16384, teacher_mode="cached").planned_peak_mb < roomy.planned_peak_mb


def test_a_budget_nothing_meets_says_what_would_fit() -> None:
    with pytest.raises(UsageError, match=r"training needs at least \d+ MB \(lora, micro-batch 1, checkpointing\)") as exc:
        plan(500)
    assert exc.value.exit_code == 2 and "--soft-labels" in exc.value.hint
    with pytest.raises(UsageError, match="auto, full or lora"):
        plan(16384, method="qlora")


FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


class _Interrupt(Exception):
    pass


def test_lora_training_merges_and_resumes_bit_identical(tmp_path: Path, tiny4_dir: Path) -> None:
    profile = load_profile("cpu-x86-2c")
    full = make_run(tmp_path / "full", tiny4_dir)
    report = train_student(run_dir=full, profile=profile, steps=5, seed=2, config=FAST, method="lora")
    assert report["plan"]["method"] == "lora" and report["identity"]["method"] == "lora"
    assert report["peak_rss_mb"] > 0 and report["measured_over_planned_peak"] > 0
    saved = load_file(str(full / STUDENT_DIR / "model.safetensors"))
    assert not any("lora" in k for k in saved)  # merged: a plain HF model
    assert not (full / STUDENT_DIR / "adapter_config.json").exists()

    cut = make_run(tmp_path / "cut", tiny4_dir)

    def stop_after_step_3(task: str, done: int, total: int | None = None) -> None:
        if task == "train" and done == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_student(run_dir=cut, profile=profile, steps=5, seed=2, config=FAST, method="lora",
                      progress=stop_after_step_3)
    resumed = train_student(run_dir=cut, profile=profile, steps=5, seed=2, config=FAST, method="lora", resume=True)
    assert resumed["resumed_from_step"] == 2
    other = load_file(str(cut / STUDENT_DIR / "model.safetensors"))
    for name in saved:
        assert torch.equal(saved[name], other[name]), name
    # LoRA changed the weights (it trained), and only through the adapters' low-rank updates.
    pruned = json.loads((full / STUDENT_DIR / TRAIN_REPORT).read_text())
    assert pruned["final_loss"] < pruned["first_loss"]


def test_default_plan_is_full_fine_tuning_and_reported(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, config=FAST)
    assert report["plan"]["method"] == "full" and report["plan"]["checkpointing"] is False
    assert report["plan"]["budget_mb"] == 16384 and "method" not in report["identity"]
    assert 0 < report["measured_over_planned_peak"] <= 1.0  # the plan is an upper bound
