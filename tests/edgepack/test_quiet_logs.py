"""Quiet by default: third-party logs and warnings go to RUN/logs/<stage>.log, not the terminal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from edgepack.logs import stage_log

ENV = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "200"}


def _export_run(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A run directory whose student is the tiny model (what `edgepack export RUN` reads)."""
    from edgepack.constants import COMPLETE_MARKER, STUDENT_DIR
    from edgepack.runconfig import write_run_config

    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, {"profile": "cpu-x86-2c", "teacher": "builtin:smollm2-135m-instruct",
                           "data": "builtin:demo", "seed": 0})
    shutil.copytree(tiny_llama_dir, run / STUDENT_DIR)
    (run / STUDENT_DIR / COMPLETE_MARKER).write_text("ok\n")
    return run


def test_export_onnx_int4_prints_under_50_lines_and_logs_the_rest(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _export_run(tiny_llama_dir, tmp_path)
    out = subprocess.run([sys.executable, "-m", "edgepack", "export", str(run), "--format", "onnx", "--quant", "int4"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    terminal = out.stdout.splitlines() + out.stderr.splitlines()
    assert len(terminal) < 50, "\n".join(terminal)
    assert "matmul_nbits" not in out.stderr and "TracerWarning" not in out.stderr
    assert "\r" not in out.stderr
    assert not out.stdout.lstrip().startswith("{")  # no JSON document without --json
    assert "onnx int4:" in out.stdout and "export.json" in out.stdout
    log = (run / "logs" / "export.log").read_text()
    assert "matmul_nbits_quantizer [INFO]" in log and "TracerWarning" in log  # the detail is kept
    assert "export: 1/1 (100%)" in log
    as_json = subprocess.run([sys.executable, "-m", "edgepack", "export", str(run), "--format", "onnx", "--quant",
                              "int4", "--no-fidelity", "--json"], capture_output=True, text=True, env=ENV, timeout=600)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["format"] == "onnx"


def test_verbose_shows_third_party_output_on_stderr(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edgepack", "-v", "export", str(tiny_llama_dir), "--format", "onnx",
                          "--quant", "int4", "--no-fidelity", "--out", str(tmp_path / "art")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "matmul_nbits_quantizer [INFO]" in out.stderr and "TracerWarning" in out.stderr


def test_stage_log_routes_logging_warnings_and_transformers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    before, show = root.handlers[:], warnings.showwarning
    with stage_log("data", tmp_path):
        logging.getLogger("onnxruntime.quantization").info("quantizing node 7")
        warnings.warn("a tracer warning", UserWarning)
        hf_logging.get_logger("transformers.modeling_utils").warning("torch_dtype is deprecated")
    assert root.handlers == before and warnings.showwarning is show  # restored on exit
    log = (tmp_path / "logs" / "data.log").read_text()
    assert "quantizing node 7" in log and "a tracer warning" in log and "torch_dtype is deprecated" in log
    captured = capsys.readouterr()
    assert "quantizing node 7" not in captured.err and "torch_dtype" not in captured.err
    assert "a tracer warning" not in captured.err


def test_temp_log_is_printed_once_on_failure_and_removed_on_success(capsys: pytest.CaptureFixture) -> None:
    with stage_log("export") as ok_path:
        logging.getLogger("optimum").warning("fine")
    assert not ok_path.exists()
    with pytest.raises(RuntimeError), stage_log("export") as path:
        logging.getLogger("optimum").warning("the detail of the failure")
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert err.count(str(path)) == 1 and "the detail of the failure" in path.read_text()
    path.unlink()


def test_nothing_is_written_when_a_command_fails_before_logging(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError), stage_log("data", tmp_path / "run"):
        raise ValueError("bad input")
    assert not (tmp_path / "run").exists() and capsys.readouterr().err == ""
