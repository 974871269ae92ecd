"""The CLI: lazy imports, one-line errors with exit code 2, one JSON document with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "200"}


def edgepack(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    probe = ("import sys; from edgepack.cli import main; rc = main(['--help']);"
             "heavy = [m for m in ('torch', 'onnxruntime', 'llama_cpp', 'transformers', 'numpy') "
             "if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for name in ("profiles", "distill", "eval", "export", "gate", "pack", "verify", "run", "chat",
                 "serve", "pipeline"):
        assert name in out.stdout
    assert elapsed < 5.0  # generous for a loaded 2-core CI box; ~0.3 s when idle


@pytest.mark.parametrize("group,subs", [("profiles", ["list", "show", "fit"]),
                                        ("distill", ["data", "train"])])
def test_command_groups_are_fixed(group: str, subs: list[str]) -> None:
    out = edgepack(group, "--help")
    assert out.returncode == 0
    for s in subs:
        assert s in out.stdout


def test_profiles_list_json_is_one_document() -> None:
    out = edgepack("profiles", "list", "--json")
    assert out.returncode == 0, out.stderr
    names = {p["name"] for p in json.loads(out.stdout)}
    assert {"cpu-x86-2c", "gpu-4gb", "mac-m1-8gb"} <= names


def test_profiles_show_json() -> None:
    out = edgepack("profiles", "show", "cpu-x86-2c", "--json")
    data = json.loads(out.stdout)
    assert data["threads"] == 2 and data["device"] == "cpu"


def _one_line_error(out: subprocess.CompletedProcess[str], needle: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and needle in lines[0], out.stderr
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint:"))
    assert "Traceback" not in out.stderr


def test_unknown_profile_is_one_line_exit_2() -> None:
    _one_line_error(edgepack("profiles", "show", "nope"), "unknown profile 'nope'")


def test_malformed_profile_lists_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[device]\nkind = "tpu"\n')
    out = edgepack("profiles", "show", str(bad))
    _one_line_error(out, "device.kind")
    assert "[deploy] table missing" in out.stderr


def test_fit_missing_model(tmp_path: Path) -> None:
    _one_line_error(edgepack("profiles", "fit", str(tmp_path / "nope.gguf"), "--profile", "cpu-x86-2c"),
                    "model not found")


def test_fit_json(tiny_llama_dir: Path) -> None:
    out = edgepack("profiles", "fit", str(tiny_llama_dir), "--profile", "cpu-x86-2c", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"deploy", "train"}
    entry = data["deploy"][0]
    assert set(entry) >= {"format", "quant", "weights_bytes", "kv_cache_bytes", "overhead_bytes",
                          "total_bytes", "fits"}


def test_pipeline_bad_input_writes_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    _one_line_error(edgepack("pipeline", "--profile", "no-such", "--out", str(out_dir)), "unknown profile")
    _one_line_error(edgepack("pipeline", "--profile", "cpu-x86-2c", "--out", str(out_dir),
                             "--teacher", str(tmp_path / "missing-teacher")), "missing-teacher")
    _one_line_error(edgepack("pipeline", "--profile", "cpu-x86-2c", "--out", str(out_dir),
                             "--data", str(tmp_path / "missing.jsonl")), "missing.jsonl")
    assert not out_dir.exists()


def test_debug_env_shows_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "edgepack", "profiles", "show", "nope"],
                         capture_output=True, text=True, env={**ENV, "EDGEPACK_DEBUG": "1"})
    assert out.returncode == 2 and "Traceback" in out.stderr
