"""Teacher correction: LoRA SFT on references, merged, converted, measured, and used downstream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.atomic import is_complete
from edgepack.constants import DATA_DIR, DATA_REPORT, TEACHER_CORRECTED_DIR, TEACHER_DIR
from edgepack.distill.correct import CORRECTION_REPORT, CorrectionConfig
from edgepack.distill.data import build_dataset, read_jsonl, teacher_dir_of
from edgepack.errors import DataError

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
