"""What a SIGKILL leaves behind is cleaned up by the next run of the same stage.

A kill inside an atomic write leaves ``<name>.part-<pid>.edgepack-tmp`` (a file) or
``<name>.tmp-<pid>.edgepack-tmp`` (a folder) under a dead pid; nothing under a final name. These tests plant exactly that debris
(what bench/reliability/run.py's kill trials produce at random) and run the stage again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.constants import CHECKPOINT_DIR, STUDENT_DIR
from edgepack.profiles import load_profile
from tests.reliability.conftest import leftovers
from tests.tiny import build_tiny_llama

DEAD_PID = 999_999_999  # above pid_max: no live process owns this debris


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny4") / "llama", layers=4)


def _plant(folder: Path, name: str, *, is_dir: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if is_dir:
        path.mkdir()
        (path / f"model.safetensors.part-{DEAD_PID}.edgepack-tmp").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


def test_training_cleans_half_written_checkpoints(tmp_path: Path, teacher4: Path) -> None:
    from edgepack.distill.train import TrainConfig, train_student
    from tests.distill.conftest import make_run

    run = make_run(tmp_path / "run", teacher4)
    _plant(run / CHECKPOINT_DIR, f"step-2.tmp-{DEAD_PID}.edgepack-tmp", is_dir=True)
    train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, resume=True,
                  config=TrainConfig(lr=1e-2, save_every=1, alpha=0.0))
    assert leftovers(run / CHECKPOINT_DIR) == []


def test_training_cleans_a_half_written_student(tmp_path: Path, teacher4: Path) -> None:
    from edgepack.distill.train import TrainConfig, train_student
    from tests.distill.conftest import make_run

    run = make_run(tmp_path / "run", teacher4)
    _plant(run, f"{STUDENT_DIR}.tmp-{DEAD_PID}.edgepack-tmp", is_dir=True)
    train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, resume=True,
                  config=TrainConfig(lr=1e-2, save_every=1, alpha=0.0))
    assert leftovers(run) == []


def test_pack_cleans_a_half_written_bundle(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from edgepack.constants import BUNDLES_DIR
    from edgepack.export.pack.pack import pack_run
    from tests.runtime.helpers import make_run_dir, write_profile

    profile = write_profile(tmp_path, "tiny-ok", min_relative_quality=0.0)
    run = make_run_dir(tmp_path / "run", tiny_llama_dir, [profile])
    _plant(run / BUNDLES_DIR, f"student-tiny-ok-gguf-Q8_0.edgepack.part-{DEAD_PID}.edgepack-tmp", is_dir=False)
    pack_run(run_dir=run, profile=load_profile(str(profile)), artifact=None, allow_unverified=False)
    assert leftovers(run / BUNDLES_DIR) == []
