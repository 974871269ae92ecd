"""`edgepack eval` on a tiny trained run: every number is computed and KD shows up in KL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.constants import EVAL_REPORT
from edgepack.distill.evaluate import evaluate_run
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import RunDirError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run


def test_evaluate_a_trained_tiny_run(tmp_path: Path, tiny4_dir: Path) -> None:
    run = make_run(tmp_path / "run", tiny4_dir)
    with pytest.raises(RunDirError, match="student"):
        evaluate_run(run_dir=run)
    train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=8, seed=0, resume=False,
                  config=TrainConfig(lr=1e-2, alpha=0.0, save_every=100))
    report = evaluate_run(run_dir=run)
    assert report["holdout_rows"] == 4 and report["forced_rows"] == 4
    # The recorded teacher answers are perfect for these rows (they are the references).
    assert report["teacher"]["label_accuracy"] == 1.0 and report["teacher"]["format_rate"] == 1.0
    assert report["task"]["kind"] == "labels" and "demo contract" in report["task"]["source"]  # no task.json
    assert report["teacher"]["primary"] == report["teacher"]["scores"]["accuracy"] == 1.0
    assert report["teacher"]["scores"]["macro_f1"] == 1.0 and report["teacher"]["scores"]["confusion"]["labels"]
    before, after = report["undistilled"], report["distilled"]
    for entry in (before, after):
        assert {"label_accuracy", "format_rate", "kl", "ce", "params", "samples"} <= set(entry)
        assert 0.0 <= entry["label_accuracy"] <= 1.0 and entry["kl"] >= 0 and entry["tokens"] > 0
    assert before["params"] == after["params"]
    assert after["kl"] < before["kl"]
    assert report["gap_closed"]["kl"] == pytest.approx((before["kl"] - after["kl"]) / before["kl"], abs=1e-3)
    assert json.loads((run / EVAL_REPORT).read_text())["distilled"]["kl"] == after["kl"]


def test_sft_variant_beside_the_kd_student(tmp_path: Path, tiny4_dir: Path) -> None:
    """`--loss sft --variant sft` trains an SFT-only baseline in RUN/student-sft; eval compares both."""
    import subprocess
    import sys

    from edgepack.constants import LOSS_CURVE_PNG, STUDENT_DIR

    run = make_run(tmp_path / "run", tiny4_dir)
    cfg = dict(lr=1e-2, alpha=0.0, save_every=100)
    kd = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=6, seed=0, config=TrainConfig(**cfg))
    sft = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=6, seed=0, variant="sft",
                        config=TrainConfig(divergence="sft", **cfg))
    assert kd["mode"] == "dense" and sft["mode"] == "response-only" and sft["mode_reason"] is None
    for folder in (run / STUDENT_DIR, run / "student-sft"):
        assert (folder / LOSS_CURVE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RunDirError, match="student-nope"):
        evaluate_run(run_dir=run, variants=("nope",))
    env = {"EDGEPACK_DEBUG": "0", "COLUMNS": "200", "PATH": ""}
    shown = subprocess.run([sys.executable, "-m", "edgepack", "eval", str(run), "--variants", "sft"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr
    assert "variant sft" in shown.stdout and "gap closed: kl" in shown.stdout
    report = json.loads((run / EVAL_REPORT).read_text())
    entry = report["variants"]["sft"]
    before = report["undistilled"]
    assert set(entry["gap_closed"]) == {"label_accuracy", "teacher_label_agreement", "kl", "ce"}
    assert entry["gap_closed"]["kl"] == pytest.approx((before["kl"] - entry["kl"]) / before["kl"], abs=1e-3)
    assert report["teacher"]["ce"] is not None and report["teacher"]["ce"] > 0
    # KD on the teacher's distribution gets closer to it than SFT on its text alone.
    assert report["distilled"]["kl"] < entry["kl"]


def test_eval_scores_through_the_runs_task_and_refuses_rows_that_do_not_fit(tmp_path: Path,
                                                                            tiny4_dir: Path) -> None:
    from edgepack.constants import DATA_DIR, HOLDOUT_FILE
    from edgepack.distill.data import read_jsonl
    from edgepack.errors import DataError
    from edgepack.task import TASK_FILE, Task, TextAnswer, save_task

    run = make_run(tmp_path / "run", tiny4_dir)
    train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, resume=False,
                  config=TrainConfig(lr=1e-2, alpha=0.0, save_every=100))
    save_task(Task(answer=TextAnswer()), run / TASK_FILE)
    report = evaluate_run(run_dir=run)
    assert report["task"]["kind"] == "text" and report["task"]["source"] == str(run / TASK_FILE)
    teacher, distilled = report["teacher"], report["distilled"]
    # No references: the teacher's own answers are the reference, so the teacher scores 1.
    assert teacher["primary"] == teacher["scores"]["chrf"] == 1.0
    assert teacher["scores"]["reference_from"] == {"reference": 0, "teacher": 4}
    assert 0.0 <= distilled["primary"] < 1.0 and distilled["scores"]["primary_metric"] == "chrf"
    assert distilled["label_accuracy"] is None and distilled["teacher_label_agreement"] is None  # states no label
    holdout = run / DATA_DIR / HOLDOUT_FILE
    rows = read_jsonl(holdout)
    rows[2]["response"] = None
    holdout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / EVAL_REPORT).unlink()
    with pytest.raises(DataError, match=r"holdout\.jsonl:3: has no `reference` and no teacher `response`"):
        evaluate_run(run_dir=run)
    assert not (run / EVAL_REPORT).exists()


def test_eval_repeat_penalty_is_llama_cpps() -> None:
    """eval's penalty equals the runtime's (llama.cpp semantics over the last 64 tokens, left
    padding excluded), so eval and the gate decode a task with repeat_penalty alike."""
    import numpy as np
    import torch

    from edgepack.distill.evaluate import _llama_repeat_penalty
    from edgepack.runtime.backends.base import PENALTY_LAST_N
    from edgepack.runtime.backends.onnxrt import repeat_penalized

    assert _llama_repeat_penalty(1.0, [0]) == {}
    gen = torch.Generator().manual_seed(0)
    pads = [3, 0]
    ids = torch.randint(0, 49, (2, 40), generator=gen)  # shorter than the window: all of it counts
    ids[0, :3] = 49  # padding that must not be penalized
    scores = torch.randn(2, 50, generator=gen)
    processor = _llama_repeat_penalty(1.3, pads)["logits_processor"]
    got = processor(ids, scores.clone())
    for row, start in enumerate(pads):
        window = ids[row, max(start, ids.shape[1] - PENALTY_LAST_N):].tolist()
        want = repeat_penalized(scores[row].numpy(), window, 1.3)
        np.testing.assert_allclose(got[row].numpy(), want, rtol=1e-6)
    assert not torch.equal(got, scores)
    assert got[0, 49] == scores[0, 49]  # id 49 stands only in row 0's padding
