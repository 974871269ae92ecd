"""The training memory planner: pure selection logic, then LoRA training chosen by it (tiny model)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edgepack.constants import STUDENT_DIR
from edgepack.distill.plan import plan_training
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from edgepack.memory import ModelShape
from edgepack.train_memory import DENSE_KD_COPIES, LOGIT_COPIES, PROCESS_GROWTH_MB, SAVED_PER_LAYER, transients
from tests.distill.conftest import make_run
from tests.distill.resume_check import check_resume

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


MIB = 2**20
# A shape whose numbers are easy to follow: 2 layers, hidden 64, query width 64, MLP 128, vocabulary 1000
# (embedding 64 000 parameters, under glibc's 32 MiB heap-block limit).
SMALL = ModelShape(2, 64, 4, 2, 16, 128, 1000, 164_000, 64_000, True)


def test_transients_count_what_autograd_keeps_per_layer_and_token() -> None:
    tokens = 2 * 100
    per_layer = tokens * (6 * 64 + 5 * 64 + 4 * 128) * 4  # fp32: norms, attention, MLP (module docstring)
    assert SAVED_PER_LAYER == (6, 5, 4)
    final_norm = tokens * 3 * 64 * 4
    logits = tokens * 1000 * 4
    head_grad = 1000 * 64 * 4  # full fine-tuning: the head's weight gradient, whole before it joins .grad
    t = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, device="cuda")
    # every layer's saved set, one layer's backward working set, the final norm; no heap on an accelerator
    assert t.activations_bytes == 2 * per_layer + per_layer + final_norm
    assert t.logits_bytes == LOGIT_COPIES * logits + head_grad and t.heap_retained_bytes == 0
    lora = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, device="cuda", lora=True)
    assert lora.logits_bytes == LOGIT_COPIES * logits  # LoRA's adapters leave the head frozen
    # checkpointing keeps each layer's input and recomputes one layer
    c = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=True, device="cuda")
    assert c.activations_bytes == 2 * tokens * 64 * 4 + per_layer + per_layer + final_norm
    # half-precision autocast halves the saved activations, not the fp32 losses' logits
    h = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, act_bytes=2, device="cuda")
    assert h.activations_bytes == 3 * per_layer // 2 + final_norm and h.logits_bytes == t.logits_bytes
    # dense KD keeps two more vocabulary-wide tensors
    d = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, dense_kd=True, device="cuda")
    assert d.logits_bytes == (LOGIT_COPIES + DENSE_KD_COPIES) * logits + head_grad


def test_the_cpu_heap_keeps_the_gradients_and_the_loss_chunks_once_more() -> None:
    logits = 200 * 1000 * 4
    full = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False)
    assert full.heap_retained_bytes == 4 * SMALL.params + 2 * logits  # every gradient is heap-sized here
    lora = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, lora=True, trainable_params=1000)
    assert lora.heap_retained_bytes == 4 * 1000 + 2 * logits
    # a 49,152-token vocabulary: the embedding's gradient (113 MB) is mmapped and handed back, not kept
    smol = transients(STUDENT, micro_batch=2, seq_len=256, checkpointing=False)
    assert smol.heap_retained_bytes == 4 * (STUDENT.params - STUDENT.embedding_params) + 2 * 512 * 49152 * 4
    assert full.total_bytes == full.activations_bytes + full.logits_bytes + full.heap_retained_bytes


def test_the_plan_adds_the_process_growth_on_the_cpu_only() -> None:
    kw = dict(teacher=None, teacher_mode="none", budget_mb=16384, baseline_mb=300, batch_size=2, micro_batch=2,
              seq_len=100, method="full")
    cpu = plan_training(SMALL, **kw)
    t = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, trainable_params=SMALL.params)
    state = (4 + 4 + 8) * SMALL.params  # weights, gradients, fp32 AdamW
    assert cpu.planned_peak_mb == round(300 + PROCESS_GROWTH_MB + (state + t.total_bytes) / MIB, 1)
    assert cpu.transients_mb == t.describe_mb()
    cuda = plan_training(SMALL, **{**kw, "baseline_mb": 0}, device="cuda")
    t_cuda = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, device="cuda")
    assert cuda.planned_peak_mb == round((state + t_cuda.total_bytes) / MIB, 1)


def test_known_answer_lengths_count_the_logits_at_the_longest_answers_only() -> None:
    kw = dict(teacher=None, teacher_mode="none", budget_mb=16384, baseline_mb=300, batch_size=4, micro_batch=2,
              seq_len=100, method="full")
    every = plan_training(SMALL, **kw)
    known = plan_training(SMALL, **kw, answer_lengths=[10, 40, 30, 5])  # a micro-batch of 2 holds at most 70
    t = transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, trainable_params=SMALL.params,
                   answer_positions=70)
    assert known.transients_mb == t.describe_mb() and t.logits_bytes == LOGIT_COPIES * 70 * 1000 * 4 + 1000 * 64 * 4
    assert known.planned_peak_mb < every.planned_peak_mb
    assert transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False, answer_positions=10**6) == \
        transients(SMALL, micro_batch=2, seq_len=100, checkpointing=False)  # never more than every position


FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


def test_lora_training_merges_and_resumes_bit_identical(tmp_path: Path, tiny4_dir: Path) -> None:
    report, _ = check_resume(tmp_path, tiny4_dir, steps=5, kill_after=3, resumes_from=2,
                             profile=load_profile("cpu-x86-2c"), seed=2, config=FAST, method="lora")
    assert report["plan"]["method"] == "lora" and report["identity"]["method"] == "lora"
    assert report["peak_rss_mb"] > 0 and report["measured_over_planned_peak"] > 0
    student = tmp_path / "full" / STUDENT_DIR
    assert not any("lora" in k for k in load_file(str(student / "model.safetensors")))  # merged: a plain HF model
    assert not (student / "adapter_config.json").exists()
    assert report["final_loss"] < report["first_loss"]  # LoRA trained


def test_default_plan_is_full_fine_tuning_and_reported(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, config=FAST)
    assert report["plan"]["method"] == "full" and report["plan"]["checkpointing"] is False
    assert report["plan"]["budget_mb"] == 16384 and "method" not in report["identity"]
    assert 0 < report["measured_over_planned_peak"] <= 1.0  # the plan is an upper bound
    assert set(report["plan"]["transients_mb"]) == {"activations", "logits", "heap_retained"}
