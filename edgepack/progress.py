"""Progress reporting without printing from library code.

Library functions take a ``progress`` callback: ``progress(task, done, total)``; the CLI
passes one backed by rich progress bars on a terminal and :class:`LineProgress` (whole lines
with rate and ETA) otherwise; tests pass nothing (:func:`null_progress`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, done: int, total: int | None = None) -> None: ...


def null_progress(task: str, done: int, total: int | None = None) -> None:
    """A progress callback that ignores every update."""


class Notes:
    """Collects degraded-mode announcements ("no logprobs → response-only") for reports."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def warn(self, message: str) -> None:
        self.items.append(message)


class LineProgress:
    """A progress callback that prints whole lines, for a log or a pipe (no carriage returns).

    Per task: a line at the start, then at least every ``every_fraction`` of the total or every
    ``every_s`` seconds, whichever comes first (checked on each update), and the final line;
    each gives count, rate and ETA: ``train: 45/150 (30%) 1.9/s, ETA 55s``. ``clock`` is
    injectable so tests need no sleeps.
    """

    def __init__(self, write: Callable[[str], None], *, clock: Callable[[], float] = time.monotonic,
                 every_fraction: float = 0.1, every_s: float = 30.0) -> None:
        self.write, self.clock = write, clock
        self.every_fraction, self.every_s = every_fraction, every_s
        self._tasks: dict[str, _TaskClock] = {}

    def __call__(self, task: str, done: int, total: int | None = None) -> None:
        now = self.clock()
        state = self._tasks.get(task)
        if state is None or done < state.printed_done:  # new task, or the same name counting again
            self._tasks[task] = _TaskClock(start=now, start_done=done, printed_at=now, printed_done=done)
            self.write(progress_line(task, done, total, None, None))
            return
        final = total is not None and done >= total
        step = max(1, math.ceil(total * self.every_fraction)) if total else None
        due = (step is not None and done - state.printed_done >= step) or now - state.printed_at >= self.every_s
        if final and state.finished or not (final or due):
            return
        state.printed_at, state.printed_done, state.finished = now, done, final
        elapsed = now - state.start
        rate = (done - state.start_done) / elapsed if elapsed > 0 else None
        self.write(progress_line(task, done, total, rate, elapsed if final else None))


@dataclass
class _TaskClock:
    start: float
    start_done: int
    printed_at: float
    printed_done: int
    finished: bool = False


def progress_line(task: str, done: int, total: int | None, rate: float | None, elapsed: float | None) -> str:
    """``task: 45/150 (30%) 1.9/s, ETA 55s``; the final line (``elapsed`` given) says ``in 1m20s``."""
    line = f"{task}: {done}/{total if total is not None else '?'}"
    if total:
        line += f" ({100 * done // total}%)"
    if rate is None:
        return line
    line += f" {_rate(rate)}"
    if elapsed is not None:
        return line + f", in {format_seconds(elapsed)}"
    if total is not None and rate > 0:
        return line + f", ETA {format_seconds((total - done) / rate)}"
    return line


def _rate(rate: float) -> str:
    if rate >= 10:
        return f"{rate:.0f}/s"
    if rate >= 0.1 or rate == 0:
        return f"{rate:.2g}/s"
    return f"{1 / rate:.0f}s each"


def format_seconds(seconds: float) -> str:
    """``55s``, ``3m20s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
