"""--optimizer (optim.py: fp32 AdamW, AdamW with bf16 moments) and --teacher-precision, on tiny models:
the bf16 AdamW follows torch's AdamW, resumes bit-identically, and the planner, the report and the
run identity say what was used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
from edgepack.distill.checkpoint import restore_training_state, save_checkpoint
from edgepack.distill.optim import CHUNK, OPTIMIZERS, AdamWBf16, candidates
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run
from tests.distill.resume_check import check_resume

PROFILE = load_profile("cpu-x86-2c")
FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


def _pair(shapes: list[tuple[int, ...]], wd: float) -> tuple[list, list, torch.optim.Optimizer, AdamWBf16]:
    torch.manual_seed(0)
    start = [torch.randn(*s) * 0.02 for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    return ref, ours, torch.optim.AdamW(ref, lr=1e-3, weight_decay=wd), AdamWBf16(ours, lr=1e-3, weight_decay=wd)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_bf16_moments_follow_torch_adamw_within_bf16_rounding(wd: float) -> None:
    # One tensor larger than a chunk (two chunks, the second partial), a matrix, a vector.
    ref, ours, opt_ref, opt = _pair([(CHUNK + 1000,), (64, 48), (48,)], wd)
    steps = 5
    for _ in range(steps):
        for a, b in zip(ref, ours):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        # Each step moves a weight by ~lr; bf16 moments shift an update by ~2^-8 of it (2^-7 bound).
        assert (a - b).abs().max().item() <= steps * 1e-3 * 2**-6
        assert not torch.equal(a, b)  # really different state precision, not torch's AdamW
        state = opt.state[b]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        ref_state = opt_ref.state[a]
        for key in ("exp_avg", "exp_avg_sq"):  # a few bf16 roundings of values of the moment's scale
            ref_m = ref_state[key]
            assert (state[key].float() - ref_m).abs().max() <= 2**-6 * ref_m.abs().max(), key


def test_stochastic_rounding_keeps_the_second_moment_decaying() -> None:
    # β2 = 0.999 shrinks v by 0.1 % a step, under half a bf16 step: round-to-nearest would keep the
    # old, larger v for ever once gradients get smaller (7× too large here); stochastic rounding tracks it.
    x, y = torch.nn.Parameter(torch.zeros(4096)), torch.nn.Parameter(torch.zeros(4096))
    ref, ours = torch.optim.AdamW([x], lr=0.0), AdamWBf16([y], lr=0.0)
    torch.manual_seed(1)
    nearest = torch.zeros(4096, dtype=torch.bfloat16)
    for t in range(2500):
        g = torch.randn(4096) * (1.0 if t < 800 else 0.1)
        x.grad, y.grad = g, g.clone()
        ref.step()
        ours.step()
        nearest = (nearest.float() * 0.999 + 0.001 * g * g).to(torch.bfloat16)
    true_v = ref.state[x]["exp_avg_sq"].mean()
    assert abs(ours.state[y]["exp_avg_sq"].float().mean() / true_v - 1) < 0.05
    assert nearest.float().mean() / true_v > 3  # what the stochastic rounding is for


def test_state_dict_round_trip_through_a_checkpoint_keeps_bf16_and_continues_bit_identically(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    torch.manual_seed(3)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]

    def run(opt: AdamWBf16, params: list, steps: range) -> None:
        for s in steps:
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()

    straight = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt = AdamWBf16(straight, lr=1e-2, weight_decay=0.01)
    run(opt, straight, range(4))

    class _Model:  # save_checkpoint writes the model as an HF folder; only the optimizer matters here
        def save_pretrained(self, path: Path, **_: object) -> None:
            pass

    first = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    opt1 = AdamWBf16(first, lr=1e-2, weight_decay=0.01)
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, lambda s: 1.0)
    run(opt1, first, range(2))
    saved = save_checkpoint(tmp_path, 2, _Model(), opt1, sched1, {"identity": {}})
    tensors = load_file(str(saved / "optimizer.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}

    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = AdamWBf16(second, lr=1e-2, weight_decay=0.01)
    restore_training_state(saved, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["step"] == 2 for s in opt2.state.values())
    run(opt2, second, range(2, 4))
    for a, b in zip(straight, second):
        assert torch.equal(a, b)


def test_resume_with_bf16_moments_and_a_bf16_teacher_is_bit_identical(tmp_path: Path, tiny4_dir: Path) -> None:
    cfg = TrainConfig(**{**FAST.__dict__, "optimizer": "adamw-bf16", "teacher_precision": "bf16"})
    report, _ = check_resume(tmp_path, tiny4_dir, steps=4, kill_after=3, resumes_from=2, profile=PROFILE, seed=1,
                             config=cfg)
    assert report["optimizer"] == report["plan"]["optimizer"] == "adamw-bf16"
    assert report["teacher_dtype"] == report["plan"]["teacher_dtype"] == "bfloat16"
    params = report["params"]
    assert report["optimizer_state_mb"] == pytest.approx(4 * params / 2**20, abs=0.06)  # two bf16 moments
    assert report["plan"]["optimizer_state_mb"] == pytest.approx(4 * params / 2**20, abs=0.06)
    assert report["identity"]["config"]["optimizer"] == "adamw-bf16"
    assert report["identity"]["config"]["teacher_precision"] == "bf16"


def test_defaults_stay_out_of_the_identity_and_the_report_says_fp32(tmp_path: Path, tiny4_dir: Path) -> None:
    from dataclasses import asdict

    from edgepack.distill.train import IDENTITY_DEFAULTS

    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=PROFILE, steps=2, seed=0, config=FAST)
    assert set(report["identity"]["config"]) == set(asdict(FAST)) - set(IDENTITY_DEFAULTS)
    assert {"optimizer", "teacher_precision"} <= set(IDENTITY_DEFAULTS)
    assert report["optimizer"] == "adamw" and report["teacher_dtype"] == "float32"
    assert report["optimizer_state_mb"] == pytest.approx(8 * report["params"] / 2**20, abs=0.06)
    # The defaults named explicitly are the same run: recognised as finished, not retrained.
    again = TrainConfig(**{**FAST.__dict__, "optimizer": "auto", "teacher_precision": "auto"})
    assert train_student(run_dir=run, profile=PROFILE, steps=2, seed=0, config=again)["skipped"]
    with pytest.raises(Exception, match="other settings"):
        train_student(run_dir=run, profile=PROFILE, steps=2, seed=0,
                      config=TrainConfig(**{**FAST.__dict__, "optimizer": "adamw-bf16"}))


def test_the_planner_counts_bf16_moments_and_a_bf16_teacher_at_half() -> None:
    from edgepack.distill.plan import plan_training
    from edgepack.memory import ModelShape

    student = ModelShape(14, 576, 9, 3, 64, 1536, 49152, 77_873_472, 49152 * 576, True)
    teacher = ModelShape(30, 576, 9, 3, 64, 1536, 49152, 134_515_008, 49152 * 576, True)

    def plan(**kw: object):
        return plan_training(student, teacher=teacher, teacher_mode="online", budget_mb=8000, baseline_mb=300,
                             batch_size=4, micro_batch=2, seq_len=256, **kw)

    base, lean = plan(), plan(optimizers=("adamw-bf16",), teacher_dtype="bfloat16")
    assert (base.optimizer, base.teacher_dtype) == ("adamw", "float32")
    assert (lean.optimizer, lean.teacher_dtype) == ("adamw-bf16", "bfloat16")
    assert lean.optimizer_state_mb == pytest.approx(base.optimizer_state_mb / 2, rel=1e-3)
    assert lean.teacher_mb == pytest.approx(base.teacher_mb / 2, rel=1e-3)
    saved = (base.optimizer_state_mb - lean.optimizer_state_mb) + (base.teacher_mb - lean.teacher_mb)
    assert base.planned_peak_mb - lean.planned_peak_mb == pytest.approx(saved, abs=0.2)


@pytest.mark.parametrize(("checkpointing", "budget_mb", "expected"), [
    ("auto", 16000, False), ("on", 16000, True), ("auto", 2400, True), ("off", 2550, False)])
def test_checkpointing_on_and_off_leave_the_planner_no_choice(checkpointing: str, budget_mb: int,
                                                               expected: bool) -> None:
    from edgepack.distill.plan import plan_training
    from edgepack.memory import ModelShape

    student = ModelShape(14, 576, 9, 3, 64, 1536, 49152, 77_873_472, 49152 * 576, True)
    plan = plan_training(student, teacher=None, teacher_mode="none", budget_mb=budget_mb, baseline_mb=300,
                         batch_size=4, micro_batch=2, seq_len=256, method="full", checkpointing=checkpointing)
    assert plan.checkpointing is expected
    if checkpointing == "off":  # where only checkpointing would fit, "off" is refused rather than overridden
        with pytest.raises(UsageError, match="training needs at least"):
            plan_training(student, teacher=None, teacher_mode="none", budget_mb=2400, baseline_mb=300,
                          batch_size=4, micro_batch=2, seq_len=256, method="full", checkpointing="off")


def test_checkpointing_on_trains_with_checkpointed_blocks_and_joins_the_identity(tmp_path: Path,
                                                                                   tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=PROFILE, steps=2, seed=0,
                           config=TrainConfig(**{**FAST.__dict__, "checkpointing": "on"}))
    assert report["plan"]["checkpointing"] is True and report["student_prefix_tokens"] == 0
    assert report["identity"]["config"]["checkpointing"] == "on"


def test_registry_and_refusals() -> None:
    assert set(OPTIMIZERS) == {"adamw", "adamw-bf16", "adamw8bit"}
    assert candidates("auto", "cpu", False) == ("adamw",)
    assert candidates("auto", "cuda", True) == ("adamw", "adamw8bit")
    assert candidates("adamw-bf16", "cpu", False) == ("adamw-bf16",)
    with pytest.raises(UsageError, match="unknown --optimizer 'adam'") as bad:
        candidates("adam", "cpu", False)
    assert "adamw-bf16" in bad.value.hint
    with pytest.raises(UsageError, match="needs CUDA"):
        candidates("adamw8bit", "cpu", False)


def test_a_teacher_precision_for_a_run_without_an_online_teacher_is_refused(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    cfg = TrainConfig(**{**FAST.__dict__, "divergence": "sft", "teacher_precision": "bf16"})  # response-only
    with pytest.raises(UsageError, match="holds no teacher in torch while training") as caught:
        train_student(run_dir=run, profile=PROFILE, steps=1, seed=0, config=cfg)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert not (run / STUDENT_DIR).exists()


@pytest.mark.parametrize(("option", "words"), [
    (["--optimizer", "sgd"], "unknown --optimizer 'sgd'"),
    (["--optimizer", "adamw8bit"], "--optimizer adamw8bit needs CUDA"),
    (["--teacher-precision", "int8"], "--teacher-precision 'int8' is not one of"),
    (["--teacher-precision", "fp16"], "--teacher-precision fp16 is for accelerators"),
    (["--checkpointing", "yes"], "--checkpointing 'yes' is not one of auto, on, off"),
    (["--mmap-threshold", "-1"], "--mmap-threshold -1 is outside glibc's range"),
    (["--mmap-threshold", str(64 * 1024 * 1024)], "is outside glibc's range (1 to 33554432 bytes)"),
])
def test_cli_refuses_bad_names_in_one_line_with_exit_2(tmp_path: Path, tiny4_dir: Path, option: list[str],
                                                       words: str) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    env = {**os.environ, "EDGEPACK_DEBUG": ""}
    done = subprocess.run([sys.executable, "-m", "edgepack", "distill", "train", str(run), "--profile", "cpu-x86-2c",
                           "--device", "cpu", "--steps", "1", *option], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    assert not (run / STUDENT_DIR).exists()


def test_a_mmap_threshold_run_trains_and_is_recorded(tmp_path: Path, tiny4_dir: Path) -> None:
    """glibc's threshold is process-wide, so the run is its own process (the CLI)."""
    run = make_run(tmp_path / "run", tiny4_dir)
    done = subprocess.run([sys.executable, "-m", "edgepack", "distill", "train", str(run), "--profile", "cpu-x86-2c",
                           "--device", "cpu", "--steps", "2", "--mmap-threshold", "65536", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((run / STUDENT_DIR / TRAIN_REPORT).read_text())
    assert report["identity"]["config"]["mmap_threshold"] == 65536 and len(report["loss_curve"]) == 2
