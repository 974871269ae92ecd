"""Disk full during a checkpoint save and during an export: a small tmpfs runs out of space.

Each test mounts a tmpfs sized to hold the previous artifact but not a second copy next to it
(atomic writes need both while the new one is built), so the failure lands mid-write. The
tests need root (mount); elsewhere they skip with the reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from edgepack.atomic import is_complete
from edgepack.constants import CHECKPOINT_DIR, STUDENT_DIR
from edgepack.distill.checkpoint import STATE_FILE, checkpoint_dirs, read_state
from edgepack.errors import EdgepackError, RunDirError
from edgepack.profiles import load_profile
from tests.reliability.conftest import leftovers, remount
from tests.tiny import build_tiny_llama

PROFILE = load_profile("cpu-x86-2c")


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny4") / "llama", layers=4)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _page(n: int) -> int:
    return -(-n // 4096) * 4096


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_one(tmp_path: Path, teacher4: Path,
                                                               tmpfs: Callable[[Path, int], Path]) -> None:
    from edgepack.distill.train import TrainConfig, train_student
    from tests.distill.conftest import make_run
    from tests.distill.resume_check import assert_same_weights

    cfg = TrainConfig(lr=1e-2, save_every=1, warmup_fraction=0.2, alpha=0.0)
    full = make_run(tmp_path / "full", teacher4)
    train_student(run_dir=full, profile=PROFILE, steps=4, seed=0, resume=False, config=cfg)
    one = _size(checkpoint_dirs(full / CHECKPOINT_DIR)[-1])

    cut = make_run(tmp_path / "cut", teacher4)
    disk = tmpfs(cut / CHECKPOINT_DIR, _page(one * 3 // 2))
    with pytest.raises(RunDirError, match="no space left on device") as err:
        train_student(run_dir=cut, profile=PROFILE, steps=4, seed=0, resume=False, config=cfg)
    assert "step-1 is intact" in str(err.value) and "--resume" in err.value.hint
    assert [p.name for p in checkpoint_dirs(disk)] == ["step-1"] and read_state(disk / "step-1")["step"] == 1
    assert leftovers(disk) == [] and not (cut / STUDENT_DIR).exists()

    remount(disk, _page(one * 4))  # space freed: the same command with --resume finishes the run
    report = train_student(run_dir=cut, profile=PROFILE, steps=4, seed=0, resume=True, config=cfg)
    assert report["resumed_from_step"] == 1 and is_complete(cut / STUDENT_DIR)
    assert_same_weights(full / STUDENT_DIR, cut / STUDENT_DIR)  # bit-identical to the uninterrupted run


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "step-3"
    folder.mkdir()
    (folder / STATE_FILE).write_text('{"step": 3, "history": [')
    with pytest.raises(RunDirError, match="step-3 is damaged"):
        read_state(folder)
    (folder / STATE_FILE).write_text("[1]")
    with pytest.raises(RunDirError, match="not a JSON object"):
        read_state(folder)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _full_export(tiny_hf: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> tuple[Path, dict[str, str], Any]:
    """Export F16 onto a tmpfs with room for ~1.5 copies, then export F16 + Q8_0 again."""
    from edgepack.export.api import export_model

    ref = tmp_path / "ref"
    export_model(source=tiny_hf, fmt="gguf", quants=["F16"], out_dir=ref, fidelity=False)
    f16 = (ref / f"{tiny_hf.name}-F16.gguf").stat().st_size
    out = tmpfs(tmp_path / "small", _page(f16 * 3 // 2) + 8192)
    export_model(source=tiny_hf, fmt="gguf", quants=["F16"], out_dir=out, fidelity=False)
    before = {p.name: _digest(p) for p in out.iterdir()}
    try:
        export_model(source=tiny_hf, fmt="gguf", quants=["F16", "Q8_0"], out_dir=out, fidelity=False)
    except Exception as exc:  # noqa: BLE001 - inspected by the callers
        return out, before, exc
    return out, before, None


def test_export_on_a_full_disk_keeps_the_previous_artifacts(tiny_hf: Path, tmp_path: Path,
                                                            tmpfs: Callable[[Path, int], Path]) -> None:
    import gguf

    out, before, exc = _full_export(tiny_hf, tmp_path, tmpfs)
    assert exc is not None, "the second export fitted on the small disk; the test sized it wrong"
    assert {p.name: _digest(p) for p in out.iterdir()} == before  # every previous file byte-identical
    assert leftovers(out) == []
    gguf.GGUFReader(out / f"{tiny_hf.name}-F16.gguf", "r")
    assert json.loads((out / "export.json").read_text())["artifacts"][0]["sha256"] == before[f"{tiny_hf.name}-F16.gguf"]


def test_export_on_a_full_disk_says_so(tiny_hf: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    _, _, exc = _full_export(tiny_hf, tmp_path, tmpfs)
    assert isinstance(exc, EdgepackError) and "space" in str(exc).lower(), repr(exc)
