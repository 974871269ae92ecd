"""Progress reporting without printing from library code.

Library functions take a ``progress`` callback: ``progress(task, done, total)``; the CLI
passes one backed by rich progress bars, tests pass nothing (:func:`null_progress`).
"""

from __future__ import annotations

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
