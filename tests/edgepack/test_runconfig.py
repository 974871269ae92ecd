"""run.toml: written once, read back, and a conflicting rerun refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.errors import RunDirError
from edgepack.runconfig import read_run_config, write_run_config


def test_roundtrip_and_resume(tmp_path: Path) -> None:
    settings = {"profile": "cpu-x86-2c", "teacher": 'a "quoted" path', "seed": 3, "limit": None,
                "allow_unverified": False}
    written = write_run_config(tmp_path, settings)
    back = read_run_config(tmp_path)
    assert back["teacher"] == 'a "quoted" path' and back["seed"] == 3 and "limit" not in back
    assert back["created"] == written["created"]
    assert write_run_config(tmp_path, settings)["created"] == written["created"]  # resume


def test_conflicting_settings_refused(tmp_path: Path) -> None:
    write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 0})
    with pytest.raises(RunDirError, match="seed"):
        write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 1})
