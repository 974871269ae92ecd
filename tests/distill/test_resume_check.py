"""The shared resume check (resume_check.py) fails where resume is broken: a resume that skips the
optimizer's or the scheduler's state still finishes, but not bit-identical to the straight run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgepack.distill import checkpoint
from edgepack.distill.train import TrainConfig
from edgepack.profiles import load_profile
from tests.distill.resume_check import check_resume

PROFILE = load_profile("cpu-x86-2c")
FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


class _Ignored:
    """Stands in for the optimizer or the scheduler whose saved state a broken resume drops."""

    def load_state_dict(self, _state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("dropped", ["optimizer", "scheduler"])
def test_a_resume_that_drops_training_state_fails_the_check(tmp_path: Path, tiny4_dir: Path, dropped: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoint.restore_training_state

    def broken(path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        return real(path, _Ignored() if dropped == "optimizer" else optimizer,
                    _Ignored() if dropped == "scheduler" else scheduler)

    monkeypatch.setattr(checkpoint, "restore_training_state", broken)
    with pytest.raises(AssertionError, match=r"model\."):  # the first tensor that differs is named
        check_resume(tmp_path, tiny4_dir, steps=4, kill_after=3, resumes_from=2, profile=PROFILE, seed=0,
                     config=FAST)
