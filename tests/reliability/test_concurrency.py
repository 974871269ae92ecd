"""Two processes running one stage on one run directory: one runs, the other is refused clearly.

Issue #20 defect 11: two concurrent exports on one run made one fail with "internal error:
FileNotFoundError" (exit 3) or "failed to quantize (code 0)". The second process now gets one
line naming the stage, the run and the holder's pid (exit 2), deterministically: these tests
start the second process while the first one is inside its stage. The full count (several
stages, several processes at once) is ``bench/reliability/run_dir_trust.py``'s concurrency
category.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[2]


def _run_with_student(tiny_llama_dir: Path, run: Path) -> Path:
    shutil.copytree(tiny_llama_dir, run / "student")
    (run / "student" / COMPLETE_MARKER).write_text("ok\n")
    return run


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "COLUMNS": "400"})


def test_second_export_on_one_run_is_refused_while_the_first_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.export.api import export_model
    from edgepack.gguf_header import read_gguf

    run = _run_with_student(tiny_llama_dir, tmp_path / "run")
    seen: list[subprocess.CompletedProcess[str]] = []

    def progress(task: str, done: int, total: int | None = None) -> None:
        if not seen:  # the first export is inside its stage now: start the second one and wait for it
            seen.append(_cli("export", str(run), "--quant", "Q8_0", "--no-fidelity"))

    report = export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None, fidelity=False, progress=progress)
    second = seen[0]
    assert second.returncode == 2, second.stderr
    message = " ".join(second.stderr.split())
    assert "export is already running on" in message and str(run) in message and f"pid {os.getpid()}" in message
    assert "internal error" not in message
    assert [a["quant"] for a in report["artifacts"]] == ["F16", "Q8_0"]
    assert read_gguf(run / "artifacts" / "student-Q8_0.gguf").quant == "Q8_0"
    assert not list(run.glob(".edgepack-*.lock"))  # released and removed when the stage ended


@pytest.fixture()
def hold() -> Iterator[Any]:
    """Factory: a child process that holds ``stage``'s lock on a run until the test ends (or is
    killed with ``kill=True``); returns its pid."""
    procs: list[subprocess.Popen[str]] = []

    def start(run: Path, stage: str) -> int:
        code = textwrap.dedent(f"""
            import sys
            from edgepack.locks import stage_lock
            with stage_lock({str(run)!r}, {stage!r}):
                print("held", flush=True)
                sys.stdin.read()
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc.pid

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_every_stage_refuses_a_run_another_process_holds(hold: Any, tmp_path: Path) -> None:
    from edgepack.distill.data import build_dataset
    from edgepack.distill.train import train_student
    from edgepack.errors import RunDirLocked
    from edgepack.export.api import export_model
    from edgepack.export.pack.pack import pack_run
    from edgepack.profiles import load_profile
    from edgepack.export.gate.search import search

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / COMPLETE_MARKER).write_text("ok\n")
    (run / "artifacts").mkdir()
    profile = load_profile("cpu-x86-2c")
    calls = {
        "distill data": lambda: build_dataset(teacher="builtin:smollm2-135m-instruct", data=None, run_dir=run),
        "distill train": lambda: train_student(run_dir=run, profile=profile),
        "export": lambda: export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None),
        "gate": lambda: search(profile=profile, run_dir=run),
        "pack": lambda: pack_run(run_dir=run, profile=profile, artifact=None, allow_unverified=False),
    }
    for stage, call in calls.items():
        pid = hold(run, stage)
        with pytest.raises(RunDirLocked) as info:
            call()
        assert str(info.value).startswith(f"{stage} is already running on {run} (pid {pid}")
        assert info.value.exit_code == 2


def test_gate_on_an_artifact_of_a_held_run_is_refused(hold: Any, tmp_path: Path) -> None:
    from edgepack.errors import RunDirLocked
    from edgepack.profiles import load_profile
    from edgepack.export.gate.gate import run_gate

    artifact = tmp_path / "run" / "artifacts" / "x.gguf"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"GGUF")
    pid = hold(tmp_path / "run", "gate")
    with pytest.raises(RunDirLocked, match=f"pid {pid}"):
        run_gate(artifact=artifact, profile=load_profile("cpu-x86-2c"), holdout=None)


def test_cli_prints_one_line_and_exits_2(hold: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pid = hold(run, "pack")
    proc = _cli("pack", str(run), "--profile", "cpu-x86-2c", timeout=120)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"pid {pid}" in error[0] and "pack is already running" in error[0]


def test_a_lock_left_by_a_killed_process_does_not_block(hold: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.export.api import export_model

    run = _run_with_student(tiny_llama_dir, tmp_path / "run")
    pid = hold(run, "export")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # the kernel dropped its flock when it died
    lock = run / ".edgepack-export.lock"
    assert lock.is_file() and str(pid) in lock.read_text()  # the file stays; the lock died with its holder
    report = export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None, fidelity=False)
    assert [a["quant"] for a in report["artifacts"]] == ["F16", "Q8_0"] and not lock.exists()


def test_nested_use_in_one_thread_is_allowed_and_other_threads_are_refused(tmp_path: Path) -> None:
    import threading

    from edgepack.errors import RunDirLocked
    from edgepack.locks import stage_lock

    errors: list[BaseException] = []

    def other() -> None:
        try:
            with stage_lock(tmp_path / "run", "gate"):
                pass
        except RunDirLocked as exc:
            errors.append(exc)

    with stage_lock(tmp_path / "run", "gate"), stage_lock(tmp_path / "run", "gate"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        with stage_lock(tmp_path / "run", "export"):  # another stage is not excluded
            pass
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])
    assert not (tmp_path / "run").exists()  # taking the lock created the run folder; nothing else was written
