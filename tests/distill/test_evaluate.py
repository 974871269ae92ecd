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
    before, after = report["undistilled"], report["distilled"]
    for entry in (before, after):
        assert {"label_accuracy", "format_rate", "kl", "ce", "params", "samples"} <= set(entry)
        assert 0.0 <= entry["label_accuracy"] <= 1.0 and entry["kl"] >= 0 and entry["tokens"] > 0
    assert before["params"] == after["params"]
    assert after["kl"] < before["kl"]
    assert report["gap_closed"]["kl"] == pytest.approx((before["kl"] - after["kl"]) / before["kl"], abs=1e-3)
    assert json.loads((run / EVAL_REPORT).read_text())["distilled"]["kl"] == after["kl"]
