"""The resume check every training test shares: a run killed after a step and resumed from its
last checkpoint ends bit-identical to the same run trained straight through.

    straight, resumed = check_resume(tmp_path, tiny4_dir, steps=6, kill_after=3, resumes_from=2,
                                     profile=PROFILE, seed=1, config=cfg)

trains ``tmp_path/full`` straight through and ``tmp_path/cut`` killed after step ``kill_after``
(the progress callback raises, as a Ctrl-C or a kill lands between steps: only the checkpoints
written so far survive), resumes ``cut`` with ``resume=True``, and asserts that it restarted from
checkpoint ``resumes_from``, that both saved students hold the same tensors to the bit, and that
both loss curves are equal entry by entry (loss, KD, CE, learning rate, gradient norm, on-policy
samples). The two reports come back for the caller's own assertions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from edgepack.constants import STUDENT_DIR
from edgepack.distill.train import train_student
from tests.distill.conftest import make_run


class Killed(Exception):
    """The kill, raised from the progress callback right after a training step."""


def kill_after_step(step: int) -> Callable[..., None]:
    """A progress callback that kills training once ``step`` steps are done."""

    def progress(task: str, done: int, total: int | None = None) -> None:
        if task == "train" and done == step:
            raise Killed(f"killed after step {step}")

    return progress


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    """Two saved students hold the same tensor names and every tensor is equal to the bit."""
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def check_resume(tmp_path: Path, teacher: Path, *, steps: int, kill_after: int, resumes_from: int,
                 before_resume: Callable[[Path], None] | None = None,
                 **train: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train straight through and killed-then-resumed (``train`` is passed to train_student both
    times); assert the resumed run is the straight one to the bit. ``before_resume(cut)`` runs
    between the kill and the resume. Returns (straight report, resumed report)."""
    full = make_run(tmp_path / "full", teacher)
    straight = train_student(run_dir=full, steps=steps, **train)
    cut = make_run(tmp_path / "cut", teacher)
    with pytest.raises(Killed):
        train_student(run_dir=cut, steps=steps, progress=kill_after_step(kill_after), **train)
    if before_resume is not None:
        before_resume(cut)
    resumed = train_student(run_dir=cut, steps=steps, resume=True, **train)
    assert resumed["resumed_from_step"] == resumes_from
    assert_same_weights(full / STUDENT_DIR, cut / STUDENT_DIR)
    assert resumed["loss_curve"] == straight["loss_curve"]
    return straight, resumed

