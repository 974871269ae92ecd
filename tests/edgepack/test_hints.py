"""Error hints name the right fix: run/serve/gate take an artifact; verify takes the .edgepack file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "300"}
ARTIFACT_HINT = "hint: pass a .edgepack bundle, a .gguf file or an ONNX folder"


def _edgepack(*args: str) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert "Traceback" not in out.stderr and out.stdout == ""
    return out.returncode, [ln for ln in out.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("command", [["run", "{p}", "--prompt", "hi"], ["serve", "{p}"],
                                     ["gate", "{p}", "-p", "cpu-x86-2c"]])
def test_a_missing_artifact_names_what_to_pass(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "model.edgepack"
    code, lines = _edgepack(*(arg.format(p=missing) for arg in command))
    assert code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("error:") and str(missing) in lines[0]
    assert lines[1] == ARTIFACT_HINT  # not "a local HF model dir ... builtin:", which these do not take


def test_run_on_a_folder_that_is_no_model_names_what_to_pass(tmp_path: Path) -> None:
    code, lines = _edgepack("run", str(tmp_path), "--prompt", "hi")
    assert code == 2 and lines[0].startswith("error:") and "not a model artifact" in lines[0]
    assert lines[1:] == [ARTIFACT_HINT]


def test_verify_on_a_directory_says_pass_the_file(tmp_path: Path) -> None:
    code, lines = _edgepack("verify", str(tmp_path))
    assert code == 2 and lines[0] == f"error: {tmp_path} is a directory; pass the .edgepack file", lines
    (tmp_path / "tiny-cpu.edgepack").write_bytes(b"")
    code, lines = _edgepack("verify", str(tmp_path))
    assert code == 2 and lines[1] == "hint: it holds tiny-cpu.edgepack"
