"""Shared pieces of the reliability suite: fuzz settings, the bounded-call check, tmpfs mounts.

Fuzz tests run ``EDGEPACK_FUZZ_EXAMPLES`` examples per property (default 200, the CI size);
``bench/reliability/run.py`` raises it for the long run and sets ``EDGEPACK_FUZZ_REPORT`` to a
JSON path that receives, per reader, how many inputs were tried and how each one ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from edgepack.errors import EdgepackError

FUZZ_EXAMPLES = int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "200"))
TIME_LIMIT_S = 1.0
# Python-heap peak allowed for one reader call: a fixed allowance plus a multiple of the
# input size. A reader that trusts a claimed count (2^63 elements) blows far past it.
MEMORY_BASE = 8 << 20
MEMORY_PER_INPUT_BYTE = 16

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])

_OUTCOMES: dict[str, Counter[str]] = defaultdict(Counter)


def bounded(reader: str, fn: Callable[..., Any], *args: Any, allowed: type[EdgepackError], size: int,
            **kwargs: Any) -> Any:
    """Call a reader: it must return or raise ``allowed``, within 1 s and bounded memory.

    Returns the result, or the typed error it raised. Any other exception propagates (and
    fails the test); the outcome is counted for the reliability report. The time limit is
    checked on an untraced call, the memory bound on a second, traced call.
    """
    def call() -> tuple[Any, str]:
        try:
            return fn(*args, **kwargs), "accepted"
        except allowed as exc:
            return exc, type(exc).__name__
        except BaseException as exc:
            _OUTCOMES[reader][f"UNTYPED {type(exc).__name__}"] += 1
            raise

    # Timed without tracing (tracemalloc slows allocation-heavy paths several fold), then
    # once more under tracemalloc for the heap peak.
    t0 = time.perf_counter()
    result, outcome = call()
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    try:
        again, _ = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(again) is type(result), f"{reader}: a second read of the same input ended differently"
    _OUTCOMES[reader][outcome] += 1
    if isinstance(result, EdgepackError):
        assert str(result).strip() and isinstance(result.hint, str), f"{reader}: an error without a message"
    assert elapsed < TIME_LIMIT_S, f"{reader} took {elapsed:.2f} s"
    limit = MEMORY_BASE + MEMORY_PER_INPUT_BYTE * size
    assert peak < limit, f"{reader} peaked at {peak} bytes of Python heap for a {size}-byte input"
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("EDGEPACK_FUZZ_REPORT")
    if path and _OUTCOMES:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in sorted(_OUTCOMES.items())}, indent=2) + "\n")


# --- small filesystems ------------------------------------------------------------------------

def _mount_problem() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    return None


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    """Factory: mount a tmpfs of ``size`` bytes at a folder; everything is unmounted afterwards.

    Skips the test (with the reason) where mounting is not possible (not root, no
    CAP_SYS_ADMIN in this container).
    """
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        why = _mount_problem()
        if why is None:
            folder.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
            why = None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"
        if why is not None:
            pytest.skip(why)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, size: int) -> None:
    """Grow (or shrink) a tmpfs in place; its files stay."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def leftovers(folder: Path) -> list[str]:
    """Names of interrupted-write debris (``*.part-*``, ``*.tmp-*``, ``*.old-*``) under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if any(tag in p.name for tag in (".part-", ".tmp-", ".old-")))
