"""bench/distill/run.py judges each issue's targets only where they apply: issue #4's (KD against
SFT-only, label accuracy and agreement) needs an SFT-only run and a labelled task; #19's
(on-policy against dense KD, share of the teacher's score) needs both methods."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_run() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench" / "distill"))
    try:
        spec = importlib.util.spec_from_file_location("bench_distill_run", ROOT / "bench" / "distill" / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench" / "distill"))
    return module


def _row(key: str, seed: int, primary: float, labels: bool) -> dict[str, Any]:
    gap = {"primary": primary, "label_accuracy": primary if labels else None,
           "teacher_label_agreement": primary if labels else None, "kl": 0.9, "ce": 0.9}
    return {"key": key, "method": key, "seed": seed, "primary": primary, "label_accuracy": primary if labels else None,
            "teacher_label_agreement": primary if labels else None, "kl": 1.0 - primary, "ce": 1.5 - primary,
            "gap_closed": gap, "wall_s": 10.0, "cpu_s": 9.0, "tokens_per_s": 100.0, "peak_rss_mb": 900.0}


@pytest.mark.parametrize("labels,methods,judged", [
    (True, ("sft", "dense"), True),
    (False, ("sft", "dense"), False),   # a JSON task: no label accuracy to close a gap on
    (True, ("dense", "onpolicy100"), False),  # no SFT-only run to beat
])
def test_issue4_targets_only_with_sft_and_labels(bench_run: ModuleType, labels: bool, methods: tuple[str, ...],
                                                 judged: bool) -> None:
    rows = [_row(m, s, 0.5 + 0.1 * i + 0.01 * s, labels) for i, m in enumerate(methods) for s in (0, 1, 2)]
    summary = bench_run.summarize(rows, 0.58, teacher_primary=0.8)
    assert bool(summary["targets"]) is judged
    text = bench_run.render({"run": "r", "command": "c", "machine": {"cpu": "x", "cpu_count": 2},
                             "load_average": {"start": 0.0, "end": 0.0}, "seconds": 1.0, "holdout_rows": 3,
                             "contamination": "clean", "steps": 4, "student_params": 58, "teacher_params": 100,
                             "teacher": {"primary": 0.8, "label_accuracy": 0.8 if labels else None, "ce": 0.2},
                             "rows": rows, "task": {"primary_metric": "accuracy"}, "summary": summary})
    assert ("## Targets (issue #4)" in text) is judged
    if "onpolicy100" in methods:
        on_policy = summary["on_policy_targets"]["onpolicy100"]
        assert on_policy["wins_over_off_policy"] == {0: True, 1: True, 2: True} and on_policy["met"]
        assert "## Targets (issue #19)" in text
