"""Measurement in a fresh child process: real numbers, and a parent that never hangs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from edgepack.export.gate.measure import (child_command, exact_prompt, measure_artifact, percentile,
                                      run_child, summarize)


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 100])
def test_percentile_matches_numpy(q: float) -> None:
    import numpy as np

    values = [12.0, 3.5, 7.25, 9.0, 100.0, 4.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_reports_spread() -> None:
    s = summarize([10.0, 20.0, 30.0, 40.0, 50.0])
    assert (s["p50"], s["min"], s["max"], s["n"]) == (30.0, 10.0, 50.0, 5)
    assert s["p95"] == pytest.approx(48.0)
    assert s["stdev"] == pytest.approx(15.811, abs=1e-3)


def test_exact_prompt_length(tiny_gguf: Path) -> None:
    from edgepack.runtime.backends.base import get_backend

    with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=512) as backend:
        for n in (1, 7, 128, 300):
            assert len(exact_prompt(backend, n)) == n


def test_real_measurement_of_a_gguf(tiny_gguf: Path) -> None:
    r = measure_artifact(tiny_gguf, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=64, decode_tokens=32, runs=5,
                         min_seconds=0)
    assert r["ok"], r
    assert r["prompt_tokens"] == 64 and r["runs"] == 5
    for series in ("ttft_ms", "decode_tokens_per_s"):
        s = r[series]
        assert s["n"] == 5 and len(s["samples"]) == 5
        assert 0 < s["min"] <= s["p50"] <= s["p95"] <= s["max"]
    assert 0 < r["rss_before_load_mb"] <= r["rss_after_load_mb"] <= r["peak_rss_mb"] < 2048
    assert r["import_s"] > 0 and r["load_s"] > 0 and r["vram_mb"] is None
    assert r["backend"]["llama_cpp_python"]
    assert r["gpu_offload"] is False


def test_runs_continue_until_the_minimum_time_or_the_cap(tiny_gguf: Path) -> None:
    """Five runs of a fast model are a fraction of a second: the child keeps timing runs until
    ``min_seconds`` of them, or ``max_runs`` runs, are done."""
    r = measure_artifact(tiny_gguf, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=64, decode_tokens=32, runs=3,
                         min_seconds=0.5, max_runs=100_000)  # a tiny model's run is about a millisecond
    assert r["ok"], r
    assert r["runs"] >= 3 and r["timed_s"] >= 0.5 and r["ttft_ms"]["n"] == r["runs"]
    capped = measure_artifact(tiny_gguf, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=16, decode_tokens=8,
                              runs=3, min_seconds=3600, max_runs=7)
    assert capped["ok"] and capped["runs"] == 7 and capped["timed_s"] < 3600
    assert (capped["min_runs"], capped["max_runs"]) == (3, 7)


def test_bad_artifact_is_reported_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    r = measure_artifact(bad, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=8, timeout_s=60)
    assert r["ok"] is False
    assert r["error_type"] == "InvalidModelFile" and "metadata count" in r["error"]


def test_hung_child_is_killed_at_the_timeout() -> None:
    t0 = time.perf_counter()
    r = run_child([sys.executable, "-c", "import time; time.sleep(120)"], timeout_s=2)
    assert time.perf_counter() - t0 < 15
    assert r["ok"] is False and "timed out after 2 s" in r["error"]


def test_hung_grandchild_does_not_hold_the_parent() -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    t0 = time.perf_counter()
    r = run_child([sys.executable, "-c", code], timeout_s=2)
    assert time.perf_counter() - t0 < 15 and r["ok"] is False


def test_killed_child_names_the_signal() -> None:
    r = run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], timeout_s=30)
    assert r["ok"] is False and "SIGKILL" in r["error"] and "out-of-memory" in r["error"]


def test_child_without_json_is_a_failure() -> None:
    r = run_child([sys.executable, "-c", "import sys; print('hello'); sys.stderr.write('boom\\n'); sys.exit(3)"],
                  timeout_s=30)
    assert r["ok"] is False and "exited 3" in r["error"] and r["stderr_tail"] == ["boom"]


def test_child_out_of_memory_under_a_limit(tiny_gguf: Path) -> None:
    """A child capped below what it needs (RLIMIT_AS) fails cleanly; the parent reports it."""
    cmd = child_command(tiny_gguf, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=8, decode_tokens=4, runs=1)
    limited = [sys.executable, "-c",
               "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (100 << 20, 100 << 20)); "
               f"sys.argv = {cmd[2:]!r}; sys.argv[0] = 'measure'; "
               "runpy.run_module('edgepack.export.gate.measure', run_name='__main__')"]
    r = run_child(limited, timeout_s=60)
    assert r["ok"] is False and r["error"]


@pytest.mark.slow
def test_embedded_teacher_measurement(builtin_teacher_gguf: Path) -> None:
    # one thread: two llama.cpp threads spin against each other on a shared 2-core box
    r = measure_artifact(builtin_teacher_gguf, fmt="gguf", threads=1, n_ctx=2048, prompt_tokens=128,
                         decode_tokens=24, min_seconds=0)
    assert r["ok"], r
    assert r["runs"] == 5 and r["prompt_tokens"] == 128
    # 98 MB of weights, mmapped and touched: RSS must cover them, and stay far below 1 GB.
    assert 100 < r["peak_rss_mb"] < 1024
    assert r["decode_tokens_per_s"]["p50"] > 1


def test_vram_parser() -> None:
    from edgepack.export.gate.measure import parse_compute_apps

    text = "1234, 812\n999, 100\n1234, 10 MiB\nbad line\n"
    assert parse_compute_apps(text, 1234) == 822.0
    assert parse_compute_apps(text, 5) is None


def test_peak_rss_is_the_childs_own_not_the_parents(tiny_gguf: Path) -> None:
    """exec() folds the parent's RSS into a child's ru_maxrss on Linux; the report must not."""
    ballast = bytearray(600 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page so the parent's RSS really is 600+ MB
    r = measure_artifact(tiny_gguf, fmt="gguf", threads=1, n_ctx=256, prompt_tokens=16, decode_tokens=8, runs=1)
    del ballast
    assert r["ok"], r
    assert r["peak_rss_mb"] < 400
