"""Progress without a terminal: whole lines with count, rate and ETA, at least every 10% or 30 s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.progress import LineProgress, format_seconds, progress_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(total: int | None, steps: int, seconds_per_step: float) -> list[str]:
    clock, lines = FakeClock(), []
    progress = LineProgress(lines.append, clock=clock)
    progress("train", 0, total)
    for done in range(1, steps + 1):
        clock.now += seconds_per_step
        progress("train", done, total)
    return lines


def test_a_line_every_tenth_with_rate_and_eta() -> None:
    lines = _run(150, 150, 0.5)
    assert lines[0] == "train: 0/150 (0%)"
    assert len(lines) == 11  # the start, then every 15 steps; the last is the final line
    assert lines[3] == "train: 45/150 (30%) 2/s, ETA 52s"  # 105 left at 2/s = 52.5 s
    assert lines[-1] == "train: 150/150 (100%) 2/s, in 75s"


def test_slow_tasks_print_every_30_seconds() -> None:
    lines = _run(1000, 100, 7.0)  # 10% would be 100 steps = 700 s; 30 s comes first
    assert len(lines) == 1 + 20  # the start, then a line every 5 steps (35 s >= 30 s)
    assert lines[1] == "train: 5/1000 (0%) 0.14/s, ETA 1h56m"  # 995 left at 1/7 per second


def test_unknown_total_prints_rate_without_eta() -> None:
    lines = _run(None, 10, 10.0)
    assert lines[0] == "train: 0/?"
    assert lines[1:] == ["train: 3/? 0.1/s", "train: 6/? 0.1/s", "train: 9/? 0.1/s"]


def test_final_line_once_and_a_reused_name_starts_again() -> None:
    clock, lines = FakeClock(), []
    progress = LineProgress(lines.append, clock=clock)
    progress("eval", 0, 4)
    clock.now = 8
    progress("eval", 4, 4)
    progress("eval", 4, 4)
    progress("eval", 0, 4)  # a second model evaluated under the same task name
    assert lines == ["eval: 0/4 (0%)", "eval: 4/4 (100%) 0.5/s, in 8s", "eval: 0/4 (0%)"]


def test_formatting() -> None:
    assert [format_seconds(s) for s in (0, 55.4, 200, 3720)] == ["0s", "55s", "3m20s", "1h02m"]
    assert progress_line("x", 1, 100, 0.01, None) == "x: 1/100 (1%) 100s each, ETA 2h45m"


def test_cli_progress_goes_to_stderr_and_the_stage_log(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgepack.console import progress_bars
    from edgepack.logs import stage_log

    with stage_log("train", tmp_path), progress_bars() as progress:  # pytest's stderr is not a terminal
        for done in range(11):
            progress("train", done, 10)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "train: 0/10 (0%)" in log and "train: 10/10 (100%)" in log
    err = capsys.readouterr().err
    assert err.startswith("train: 0/10 (0%)\n") and "train: 10/10 (100%)" in err and "\r" not in err
    assert len(err.splitlines()) == 11  # 10 steps of 10%: every one is a line, each printed once


def test_distill_train_through_a_pipe_prints_progress_lines_with_eta(tmp_path: Path) -> None:
    from tests.distill.conftest import make_run
    from tests.tiny import build_tiny_llama

    run = make_run(tmp_path / "run", build_tiny_llama(tmp_path / "teacher", layers=4))
    env = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "edgepack", "distill", "train", str(run), "-p", "cpu-x86-2c",
                          "--steps", "20"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\r" not in out.stderr and "\r" not in out.stdout
    train = [ln for ln in out.stderr.splitlines() if ln.startswith("train: ")]
    assert train[0] == "train: 0/20 (0%)" and train[-1].startswith("train: 20/20 (100%)"), out.stderr
    assert len(train) >= 11 and any(", ETA " in ln for ln in train), train  # at least every 10%
    log = (run / "logs" / "train.log").read_text()
    assert "train: 20/20 (100%)" in log
    assert not out.stdout.lstrip().startswith("{")  # a summary, not a JSON document, without --json
