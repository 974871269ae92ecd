"""Teacher correction: LoRA SFT on references, merged, converted, measured, and used downstream."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgepack.atomic import is_complete
from edgepack.constants import DATA_DIR, DATA_REPORT, TEACHER_CORRECTED_DIR, TEACHER_DIR
from edgepack.distill.correct import CORRECTION_REPORT, CorrectionConfig
from edgepack.distill.data import build_dataset, read_jsonl, teacher_dir_of
from edgepack.errors import DataError, RunDirError, UsageError

# One label and one answer for every prompt: a random-init teacher cannot produce it, a
# teacher that learned from the references must.
ANSWER = "Category: mechanical\nAction: Inspect the pump bearings and coupling for wear."
FAST = CorrectionConfig(steps=30, batch_size=4, lr=1e-2, rank=8, alpha=16, warmup_steps=2)


def _prompts(path: Path, n: int = 20, reference: bool = True) -> Path:
    rows = [{"id": f"p{i}", "label": "mechanical",
             "messages": [{"role": "system", "content": "Triage the alarm. Answer with a category and an action."},
                          {"role": "user", "content": f"Pump P-{100 + i} discharge pressure low alarm {i}"}],
             **({"reference": ANSWER} if reference else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def corrected_run(tmp_path_factory: pytest.TempPathFactory, tiny4_dir: Path) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("correct")
    run = tmp / "run"
    report = build_dataset(teacher=str(tiny4_dir), data=_prompts(tmp / "p.jsonl"), run_dir=run, seed=0,
                           correct=True, correction=FAST)
    return run, report


def test_correction_makes_the_teacher_competent_and_reports_before_and_after(corrected_run) -> None:
    run, report = corrected_run
    folder = run / TEACHER_CORRECTED_DIR
    assert is_complete(folder) and is_complete(run / TEACHER_DIR)
    correction = json.loads((folder / CORRECTION_REPORT).read_text())
    assert correction["metric"] == "accuracy"
    assert correction["score_before"] == 0.0
    assert correction["score_after"] == 1.0
    assert correction["final_loss"] < correction["first_loss"] / 2
    # The holdout (20% of the rows) is never trained on.
    assert correction["rows"] == 16 and correction["holdout_scored"] == 4
    assert (folder / "model.safetensors").is_file() and (folder / "teacher-Q8_0.gguf").is_file()
    assert not (folder / "teacher-F16.gguf").exists()
    # The data stage generated with the corrected teacher (through llama.cpp) and says so.
    assert report["teacher_dir"] == TEACHER_CORRECTED_DIR
    assert report["teacher"]["kind"] == "gguf"
    assert report["teacher_correction"]["score_after"] == 1.0
    assert report["kept"] == 16 and report["teacher_holdout_accuracy"] == 1.0
    assert all(r["response"].startswith("Category: mechanical\n") for r in read_jsonl(run / DATA_DIR / "train.jsonl"))


def test_training_uses_the_corrected_teacher(corrected_run, tmp_path: Path) -> None:
    import shutil

    from edgepack.distill.train import TrainConfig, train_student
    from edgepack.profiles import load_profile

    src, _ = corrected_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    assert teacher_dir_of(run) == run / TEACHER_CORRECTED_DIR
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=1, seed=0,
                           config=TrainConfig(batch_size=2, micro_batch=2))
    corrected_sha = json.loads((run / TEACHER_CORRECTED_DIR / "source.json").read_text())["sha256"]
    assert report["identity"]["teacher_sha256"] == corrected_sha
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["teacher"].endswith(TEACHER_CORRECTED_DIR)


def test_rerun_reuses_the_corrected_teacher(corrected_run, tiny4_dir: Path) -> None:
    run, _ = corrected_run
    before = (run / TEACHER_CORRECTED_DIR / "model.safetensors").stat().st_mtime_ns
    data = run.parent / "p.jsonl"
    again = build_dataset(teacher=str(tiny4_dir), data=data, run_dir=run, seed=0, correct=True,
                          correction=FAST)
    assert again["skipped"] is True
    assert (run / TEACHER_CORRECTED_DIR / "model.safetensors").stat().st_mtime_ns == before
    report = json.loads((run / DATA_DIR / DATA_REPORT).read_text())
    assert report["identity"]["correction"]["steps"] == FAST.steps


def test_correction_without_references_is_refused_and_writes_no_data(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(DataError, match="reference"):
        build_dataset(teacher=str(tiny_llama_dir), data=_prompts(tmp_path / "p.jsonl", reference=False),
                      run_dir=run, seed=0, correct=True, correction=FAST)
    assert not (run / DATA_DIR).exists() and not (run / TEACHER_CORRECTED_DIR).exists()


def test_a_json_tasks_correction_is_scored_by_its_field_f1(tmp_path: Path, tiny4_dir: Path) -> None:
    """correction.json scores the task's primary metric, not a `Category:` label: for a JSON task
    the field F1 against the holdout references (it was null, with a note about labels)."""
    from edgepack.answers import JsonAnswer

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["asset", "fault"], "additionalProperties": False,
                                  "properties": {"asset": {"type": "string"}, "fault": {"enum": ["leak", "noise"]}}}))
    answer = json.dumps({"asset": "P-1", "fault": "leak"}, separators=(",", ":"))
    rows = [{"id": f"p{i}", "reference": answer,
             "messages": [{"role": "system", "content": "Extract the work order as JSON."},
                          {"role": "user", "content": f"Pump P-1 is leaking at the seal, note {i}"}]} for i in range(20)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_dataset(teacher=str(tiny4_dir), data=tmp_path / "p.jsonl", run_dir=tmp_path / "run", seed=0,
                           correct=True, correction=FAST, answer_format=JsonAnswer.from_file(schema))
    correction = report["teacher_correction"]
    assert correction["metric"] == "field_f1" and correction["holdout_scored"] == 4
    assert correction["score_before"] == 0.0 and correction["score_after"] == 1.0


# ---------------------------------------------------------------- where the correction trains

IDENTITY_KEYS = {"teacher_sha256", "rows", "seed", "config"}  # as before --device existed
BF16_STEPS = replace(FAST, steps=8)
"""CPU bf16 autocast is emulated (~2.5× slower than fp32 here): a few steps show the path runs and learns."""


def _absent_device() -> str:
    from edgepack.distill.device import available_devices

    missing = [d for d in ("cuda", "mps") if d not in available_devices()]
    if not missing:
        pytest.skip("LOUD: this machine has both CUDA and MPS; no absent device to refuse")
    return missing[0]


def test_the_default_cpu_fp32_correction_keeps_its_identity_and_reports_its_device(corrected_run,
                                                                                  tiny4_dir: Path) -> None:
    run, report = corrected_run
    correction = json.loads((run / TEACHER_CORRECTED_DIR / CORRECTION_REPORT).read_text())
    # Identities made before the option are reused: no device key at the default.
    assert set(correction["identity"]) == IDENTITY_KEYS
    assert "correction_device" not in report["identity"]
    assert (correction["device"], correction["precision"], correction["bit_reproducible"]) == ("cpu", "fp32", True)
    assert correction["bit_reproducible_reason"] is None and correction["device_reason"] == "no profile, default cpu"
    assert (report["teacher_correction"]["device"], report["teacher_correction"]["precision"]) == ("cpu", "fp32")
    # Asking for the default explicitly is the same run: reused, not redone.
    for device, precision in (("cpu", "fp32"), ("auto", "auto")):
        again = build_dataset(teacher=str(tiny4_dir), data=run.parent / "p.jsonl", run_dir=run, seed=0,
                              correct=True, correction=FAST, device=device, precision=precision)
        assert again["skipped"] is True


def test_bf16_autocast_on_the_cpu_corrects_the_teacher_and_enters_the_identity(corrected_run, tiny4_dir: Path,
                                                                               tmp_path: Path) -> None:
    """The autocast path on the CPU, called as data.py does (a few steps: too few for the data
    stage's format check, enough to learn), beside the fixture's fp32 run of the same rows."""
    import shutil

    from edgepack.distill.correct import correct_teacher
    from edgepack.distill.data import load_prompts, split_rows
    from edgepack.distill.device import resolve_device
    from edgepack.distill.teachers import resolve_teacher

    fp32_run, _ = corrected_run
    train, holdout = split_rows(load_prompts(fp32_run.parent / "p.jsonl").rows, 0)
    def correct() -> dict:
        return correct_teacher(teacher_dir=fp32_run / TEACHER_DIR, before=resolve_teacher(str(tiny4_dir)),
                               train=train, holdout=holdout, out_dir=tmp_path / TEACHER_CORRECTED_DIR, seed=0,
                               config=BF16_STEPS, device=resolve_device("cpu", precision="bf16"))

    correction = correct()
    assert correction == json.loads((tmp_path / TEACHER_CORRECTED_DIR / CORRECTION_REPORT).read_text())
    assert correct() == {**correction, "skipped": True}  # the same device and precision: reused
    fp32 = json.loads((fp32_run / TEACHER_CORRECTED_DIR / CORRECTION_REPORT).read_text())
    assert correction["identity"]["device"] == {"device": "cpu", "precision": "bf16"}
    assert ({k: v for k, v in correction["identity"].items() if k not in ("device", "config")}
            == {k: v for k, v in fp32["identity"].items() if k != "config"})
    assert (correction["device"], correction["precision"], correction["bit_reproducible"]) == ("cpu", "bf16", True)
    assert correction["device_reason"] == "--device cpu"
    # The same rows, seed and initial adapters (the step count does not change the first step's
    # batch or weights): only bf16 autocast makes the first step's loss differ.
    assert correction["first_loss"] != fp32["first_loss"]
    assert abs(correction["first_loss"] - fp32["first_loss"]) < 0.05 * fp32["first_loss"]
    assert correction["final_loss"] < correction["first_loss"] * 0.8 and correction["steps"] == BF16_STEPS.steps
    # The fp32 run is not reused for bf16, neither its data/ nor its corrected teacher.
    with pytest.raises(RunDirError, match="another teacher or other inputs"):
        build_dataset(teacher=str(tiny4_dir), data=fp32_run.parent / "p.jsonl", run_dir=fp32_run, seed=0,
                      correct=True, correction=FAST, precision="bf16")
    other = tmp_path / "fp32-corrected-only"
    other.mkdir()
    shutil.copytree(fp32_run / TEACHER_CORRECTED_DIR, other / TEACHER_CORRECTED_DIR)
    with pytest.raises(RunDirError, match="corrected with other data or settings"):
        build_dataset(teacher=str(tiny4_dir), data=fp32_run.parent / "p.jsonl", run_dir=other, seed=0,
                      correct=True, correction=FAST, precision="bf16")


def test_an_absent_device_is_refused_before_anything_is_loaded_or_written(tmp_path: Path, tiny4_dir: Path) -> None:
    missing = _absent_device()
    run = tmp_path / "run"
    with pytest.raises(UsageError, match=f"--device {missing} is not available"):
        build_dataset(teacher=str(tiny4_dir), data=_prompts(tmp_path / "p.jsonl"), run_dir=run, seed=0,
                      correct=True, correction=FAST, device=missing)
    with pytest.raises(UsageError, match="fp16 is for accelerators"):
        build_dataset(teacher=str(tiny4_dir), data=tmp_path / "p.jsonl", run_dir=run, seed=0,
                      correct=True, correction=FAST, precision="fp16")
    assert not run.exists()


@pytest.mark.parametrize("args, message", [
    (("--correct-teacher", "--device", "MISSING"), "--device MISSING is not available in this process"),
    (("--device", "cpu"), "--device and --precision say where teacher correction trains"),
    (("--precision", "bf16"), "--device and --precision say where teacher correction trains"),
])
def test_the_cli_refuses_in_one_line(args: tuple[str, ...], message: str, tmp_path: Path, tiny4_dir: Path) -> None:
    missing = _absent_device()
    args, message = tuple(a.replace("MISSING", missing) for a in args), message.replace("MISSING", missing)
    done = subprocess.run([sys.executable, "-m", "edgepack", "distill", "data", "--out", str(tmp_path / "run"),
                           "--teacher", str(tiny4_dir), "--data", str(_prompts(tmp_path / "p.jsonl")), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) <= 2  # the line and its hint
    assert not (tmp_path / "run").exists()


def test_the_pipeline_corrects_on_its_device_setting_or_its_profiles(tmp_path: Path, tiny4_dir: Path) -> None:
    """The pipeline's ``device`` (None: the profile's ``[training] device``) reaches teacher correction;
    the pipeline refuses an absent one before it writes anything."""
    from edgepack.pipeline import PipelineConfig, distill_data, run_pipeline
    from edgepack.profiles import load_profile

    missing = _absent_device()
    data = _prompts(tmp_path / "p.jsonl")
    profile = next(p for p in map(load_profile, ("gpu-8gb", "mac-m2-16gb")) if p.train_device == missing)
    cpu_profile = load_profile("cpu-x86-2c")
    cases = [(profile, None, "the profile's [training] device"), (cpu_profile, missing, f"--device {missing}")]
    for prof, device, origin in cases:
        cfg = PipelineConfig(profile=prof, teacher=str(tiny4_dir), data=data, run_dir=tmp_path / "run",
                             correct_teacher=True, device=device)
        for stage in (distill_data, run_pipeline):
            with pytest.raises(UsageError, match=re.escape(origin) + ".* is not available"):
                stage(cfg)
    assert not (tmp_path / "run").exists()


# An overflowed step is skipped by GradScaler and still advances the schedule (a fixed step count).
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_the_fp16_gradient_scaling_path_learns_and_skips_overflowed_steps(corrected_run, tmp_path: Path) -> None:
    """The steps an fp16 GPU takes (autocast fp16, GradScaler: scale, unscale, clip, step, update),
    on the CPU: a Device built directly, as resolve_device refuses fp16 on the CPU."""
    import torch
    from safetensors.torch import load_file

    from edgepack.distill.correct import _train_lora
    from edgepack.distill.data import load_prompts, split_rows
    from edgepack.distill.device import Device

    fp32_run, _ = corrected_run
    train, _ = split_rows(load_prompts(fp32_run.parent / "p.jsonl").rows, 0)
    history, used = _train_lora(fp32_run / TEACHER_DIR, train, tmp_path / "merged", 0, replace(FAST, steps=4),
                                Device("cpu", "fp16", "test"), lambda *a: None)
    assert used == 16 and len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"] and not any(h.get("skipped_fp16_overflow") for h in history)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}  # fp32 weights, merged on the CPU
    teacher = load_file(fp32_run / TEACHER_DIR / "model.safetensors")
    assert any(not torch.equal(merged[k], teacher[k]) for k in teacher)

    class OverflowingDevice(Device):
        """A loss scale no fp16 gradient survives: every step overflows, as a bad fp16 step on a GPU."""

        def grad_scaler(self) -> torch.amp.GradScaler:
            return torch.amp.GradScaler("cpu", init_scale=1e30)

    history, _ = _train_lora(fp32_run / TEACHER_DIR, train, tmp_path / "overflowed", 0, replace(FAST, steps=2),
                             OverflowingDevice("cpu", "fp16", "test"), lambda *a: None)
    assert all(h["skipped_fp16_overflow"] for h in history)  # recorded in the loss curve...
    overflowed = load_file(tmp_path / "overflowed" / "model.safetensors")
    assert all(torch.equal(overflowed[k], teacher[k]) for k in teacher)  # ...and not applied
