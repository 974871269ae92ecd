"""Device and precision selection (device.py), and the autocast / gradient-scaling paths of a training
step run on the CPU — the same code a CUDA or MPS run takes, with the CPU as the device."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgepack.distill.batching import deterministic_torch
from edgepack.distill.device import CPU, Device, ddp_backend, device_memory_mb, peak_memory_mb, resolve_device
from edgepack.distill.train import TrainConfig, train_student
from edgepack.distill.train_step import TrainState, train_step
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run
from tests.distill.test_train_step import CFG, _setup

CPU_ONLY = ["cpu"]
ALL = ["cpu", "cuda", "mps"]


def test_cpu_defaults_to_fp32_and_is_bit_reproducible() -> None:
    device = resolve_device(None, "cpu", available=CPU_ONLY)
    assert (device.name, device.precision, device.autocast_dtype) == ("cpu", "fp32", None)
    assert device.bit_reproducible and device.not_reproducible_reason is None
    assert device.grad_scaler() is None and device.teacher_dtype == torch.float32


@pytest.mark.parametrize(("requested", "profile_device", "cuda_bf16", "expected"), [
    ("cuda", "cpu", True, ("cuda", "bf16", False)),   # Ampere+: bf16 autocast, no scaling
    ("cuda", "cpu", False, ("cuda", "fp16", True)),   # Turing/Pascal: fp16 + GradScaler
    (None, "cuda", True, ("cuda", "bf16", False)),    # the profile's [training] device
    (None, "mps", None, ("mps", "fp16", True)),
    ("auto", "mps", None, ("mps", "fp16", True)),
    ("cpu", "cuda", None, ("cpu", "fp32", False)),    # --device overrides the profile
])
def test_accelerators_autocast_in_half_precision(requested: str | None, profile_device: str, cuda_bf16: bool | None,
                                                  expected: tuple[str, str, bool]) -> None:
    device = resolve_device(requested, profile_device, available=ALL, cuda_bf16=cuda_bf16)
    assert (device.name, device.precision, device.needs_grad_scaler) == expected
    if device.name != "cpu":
        assert not device.bit_reproducible and "not bit-deterministic" in device.not_reproducible_reason
        assert device.teacher_dtype == device.autocast_dtype


@pytest.mark.parametrize(("requested", "profile_device", "precision", "cuda_bf16", "words"), [
    ("cuda", "cpu", "auto", None, "--device cuda is not available in this process (found: cpu)"),
    (None, "mps", "auto", None, "the profile's [training] device mps is not available"),
    ("tpu", "cpu", "auto", None, "'tpu' is not one of auto, cpu, cuda, mps"),
    ("cpu", "cpu", "fp16", None, "fp16 is for accelerators"),
    ("cpu", "cpu", "int8", None, "'int8' is not one of auto, fp32, bf16, fp16"),
])
def test_absent_devices_and_bad_precisions_are_refused(requested: str | None, profile_device: str, precision: str,
                                                       cuda_bf16: bool | None, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        resolve_device(requested, profile_device, precision, available=CPU_ONLY, cuda_bf16=cuda_bf16)
    assert words in str(caught.value) and caught.value.exit_code == 2


def test_bf16_on_a_cuda_device_without_it_is_refused() -> None:
    with pytest.raises(UsageError, match="does not support bfloat16"):
        resolve_device("cuda", "cpu", "bf16", available=ALL, cuda_bf16=False)


def test_auto_falls_back_to_the_cpu_and_says_so() -> None:
    device = resolve_device("auto", "cuda", available=CPU_ONLY)
    assert device.name == "cpu" and "absent, using cpu" in device.reason


def test_bf16_on_the_cpu_is_allowed_so_autocast_runs_in_cpu_tests() -> None:
    device = resolve_device("cpu", "cpu", "bf16", available=CPU_ONLY)
    assert device.autocast_dtype == torch.bfloat16 and not device.needs_grad_scaler
    with device.autocast():
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize(("device_type", "backend"), [("cuda", "nccl"), ("cpu", "gloo"), ("mps", "gloo")])
def test_data_parallel_backend_follows_the_device(device_type: str, backend: str) -> None:
    assert ddp_backend(device_type) == backend


def test_planner_budget_and_peak_on_the_cpu_are_the_profile_and_rss() -> None:
    assert device_memory_mb(CPU, 3000) == (3000, "profile memory_mb")
    assert peak_memory_mb(CPU, 123.0) == 123.0


@pytest.mark.parametrize(("free_mb", "expected"), [(6000, 4096), (3000, 3000)])
def test_on_cuda_the_planner_plans_within_free_memory_capped_at_the_profile(free_mb: int, expected: int) -> None:
    cuda = Device("cuda", "bf16", "test")
    budget, source = device_memory_mb(cuda, 4096, free_mb=free_mb)
    assert budget == expected and str(free_mb) in source


def _forward_dtypes(trainee) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    layer = trainee.model.get_decoder().layers[0].mlp.down_proj
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_a_bf16_autocast_step_runs_the_student_in_bf16_and_learns(tiny4_dir: Path) -> None:
    trainee, data, objective = _setup(tiny4_dir)
    trainee = replace(trainee, device=Device("cpu", "bf16", "test"))
    seen = _forward_dtypes(trainee)
    with deterministic_torch(0):
        first = train_step(trainee, data, objective, TrainState(), CFG)
        again = train_step(trainee, data, objective, TrainState(), CFG)
    assert first.problem is None and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainee.params)  # fp32 master weights
    assert again.state.history[0].loss < first.state.history[0].loss


def test_gradient_scaling_steps_and_an_overflow_redoes_the_step_with_a_lower_scale(tiny4_dir: Path) -> None:
    # The GradScaler path a fp16 GPU run takes, on the CPU (torch.amp.GradScaler("cpu")).
    trainee, data, objective = _setup(tiny4_dir)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainee = replace(trainee, device=Device("cpu", "bf16", "test"), scaler=scaler)
    before = {k: v.detach().clone() for k, v in trainee.model.named_parameters()}
    # An fp16 overflow, as a GPU would see it: one backward's gradient becomes inf.
    overflow = trainee.params[-1].register_hook(lambda g: g * float("inf"))
    with deterministic_torch(0):
        overflowed = train_step(trainee, data, objective, TrainState(), CFG)
    overflow.remove()
    assert overflowed.problem is None and overflowed.state.step == 0  # not applied, not fatal: redone
    assert scaler.get_scale() < 1024.0
    assert all(torch.equal(before[k], v) for k, v in trainee.model.named_parameters())
    scaler.update(1024.0)
    with deterministic_torch(0):
        stepped = train_step(trainee, data, objective, TrainState(), CFG)
    assert stepped.problem is None and stepped.state.step == 1
    assert any(not torch.equal(before[k], v) for k, v in trainee.model.named_parameters())


def test_training_in_bf16_on_the_cpu_reports_device_and_precision(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, device="cpu",
                           precision="bf16", config=TrainConfig(lr=1e-2, alpha=0.0))
    assert (report["device"], report["precision"], report["bit_reproducible"]) == ("cpu", "bf16", True)
    assert report["peak_measure"] == "peak RSS" and report["final_loss"] > 0
    saved = json.loads((run / "student" / "train_report.json").read_text())
    assert saved["precision"] == "bf16"


def test_cli_refuses_an_absent_device_in_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("LOUD: this machine has CUDA, so --device cuda is not absent here")
    done = subprocess.run([sys.executable, "-m", "edgepack", "distill", "train", str(tmp_path), "-p", "cpu-x86-2c",
                           "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("--device cuda is not available in this process (found: cpu" in line for line in lines)


def test_planner_arithmetic_for_an_8gb_cuda_board_in_bf16_and_fp32() -> None:
    # The VRAM plan of a 1B-class student (Llama-3.2-1B's shape) on an 8 GB CUDA board with 7800 MB
    # free: full fine-tuning never fits (fp32 master weights + AdamW alone are ~19 GB), so LoRA;
    # bf16 autocast saves half-size activations and so affords micro-batch 2 where fp32 needs 1 (the
    # losses' vocabulary-wide tensors, 128k wide, stay fp32 in both: distill/plan.py).
    from edgepack.distill.plan import plan_training
    from edgepack.memory import ModelShape

    shape = ModelShape(16, 2048, 32, 8, 64, 8192, 128256, 1_235_814_400, 128256 * 2048, True)
    budget, source = device_memory_mb(Device("cuda", "bf16", "test"), 8192, free_mb=7800)
    assert budget == 7800 and "below the profile's 8192 MB" in source

    def planned(precision: str):
        return plan_training(shape, teacher=None, teacher_mode="none", budget_mb=budget, baseline_mb=0,
                             batch_size=8, micro_batch=4, seq_len=256, device="cuda", precision=precision)

    fp32, bf16 = planned("fp32"), planned("bf16")
    assert (fp32.method, fp32.micro_batch, fp32.checkpointing) == ("lora", 1, False)
    assert (bf16.method, bf16.micro_batch, bf16.checkpointing) == ("lora", 2, False)
    assert fp32.planned_peak_mb == pytest.approx(6393.5, abs=1) and bf16.planned_peak_mb == pytest.approx(7025.8, abs=1)


def test_targets_read_on_the_cpu_follow_the_logits_device_without_a_copy_on_the_cpu() -> None:
    from edgepack.distill.device import to_device
    from edgepack.distill.losses import SparseTargets

    sparse = SparseTargets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2))
    moved, mask = to_device((sparse, torch.ones(2, dtype=torch.bool)), torch.device("cpu"))
    assert moved.topk_ids is sparse.topk_ids and moved.sample_ids is None and mask.dtype == torch.bool
    on_meta = to_device(sparse, "meta")  # another device: every tensor field moves
    assert {t.device.type for t in (on_meta.topk_ids, on_meta.topk_logprobs, on_meta.tail_logmass)} == {"meta"}


def test_the_gpu_check_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    # bench/gpu/check.py has not run on a GPU here; on the CPU only its refusal can be checked.
    if torch.cuda.is_available():
        pytest.skip("LOUD: this machine has CUDA; run bench/gpu/check.py itself instead")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu" / "check.py"), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "r.json").exists()
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr


def test_deterministic_algorithms_only_where_the_run_is_bit_reproducible() -> None:
    # CUDA's deterministic mode raises on cuBLAS matmuls without CUBLAS_WORKSPACE_CONFIG: not turned on there.
    from edgepack.distill.device import seeded

    before = torch.are_deterministic_algorithms_enabled()
    with seeded(CPU, 3):
        assert torch.are_deterministic_algorithms_enabled()
        first = torch.rand(2)
    with seeded(Device("cuda", "bf16", "test"), 3):
        assert torch.are_deterministic_algorithms_enabled() == before
        assert torch.equal(torch.rand(2), first)  # seeded all the same
    assert torch.are_deterministic_algorithms_enabled() == before


def test_a_vram_budget_nothing_meets_names_the_device_and_the_numbers() -> None:
    from edgepack.distill.plan import plan_training
    from edgepack.memory import ModelShape

    shape = ModelShape(16, 2048, 32, 8, 64, 8192, 128256, 1_235_814_400, 128256 * 2048, True)
    budget, _ = device_memory_mb(Device("cuda", "bf16", "test"), 4096, free_mb=3500)
    with pytest.raises(UsageError, match=r"training needs at least \d+ MB .*more than the 3500 MB profile "
                                         r"gpu-4gb allows for training on cuda") as caught:
        plan_training(shape, teacher=None, teacher_mode="none", budget_mb=budget, baseline_mb=0, batch_size=8,
                      micro_batch=4, seq_len=256, device="cuda", precision="bf16", profile_name="gpu-4gb")
    assert caught.value.exit_code == 2


def test_where_bitsandbytes_imports_full_fine_tuning_with_8bit_adamw_comes_before_lora() -> None:
    # Planner arithmetic only: bitsandbytes is not installed here, so the 8-bit optimizer itself has not run.
    from edgepack.distill.device import bitsandbytes_usable
    from edgepack.distill.optim import candidates
    from edgepack.distill.plan import plan_training
    from edgepack.memory import ModelShape

    shape = ModelShape(16, 2048, 32, 8, 64, 8192, 128256, 1_235_814_400, 128256 * 2048, True)

    def planned(eight_bit: bool):
        return plan_training(shape, teacher=None, teacher_mode="cached", budget_mb=16000, baseline_mb=0,
                             batch_size=8, micro_batch=4, seq_len=256, device="cuda", precision="bf16",
                             optimizers=candidates("auto", "cuda", eight_bit))

    without, with_8bit = planned(False), planned(True)
    assert (without.method, without.optimizer) == ("lora", "adamw")
    assert (with_8bit.method, with_8bit.optimizer) == ("full", "adamw8bit")
    assert with_8bit.rejected[:6] == without.rejected[:6]  # fp32 states were tried first, the same way
    assert with_8bit.describe()["optimizer"] == "adamw8bit"
    assert not bitsandbytes_usable(CPU)  # never on the CPU, installed or not
