"""What the CLI shares: JSON output, rich progress, and turning errors into one line.

Only the CLI prints. ``emit`` prints exactly one JSON document on stdout when ``--json``
was given, else calls the human renderer; human output and progress go to stderr when
``--json`` is on, so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

out = Console()
err = Console(stderr=True)


def emit(result: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    """Print ``result`` as one JSON document (``as_json``) or through ``human``."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
    elif human is not None:
        human(result)
    else:
        out.print_json(json.dumps(result, default=str))


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress callback backed by rich bars on stderr (one bar per task name)."""
    if not enabled or not err.is_terminal:
        yield _quiet_progress
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f}/s" if task.speed else "-/s")

    bars: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  RateColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as prog:

        def update(task: str, done: int, total: int | None = None) -> None:
            if task not in bars:
                bars[task] = prog.add_task(task, total=total)
            prog.update(bars[task], completed=done, total=total)

        yield update


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (a degraded mode the report also records)."""
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def _quiet_progress(task: str, done: int, total: int | None = None) -> None:
    # Not a terminal (CI, pipes): print a line at the start and end of each task only.
    if done == 0 or (total is not None and done >= total):
        err.print(f"[dim]{task}: {done}/{total if total is not None else '?'}[/dim]")


def report_error(exc: BaseException) -> int:
    """Print an EdgepackError as one line (+ hint); return its exit code."""
    from rich.markup import escape

    from edgepack.errors import EdgepackError

    if os.environ.get("EDGEPACK_DEBUG") == "1":
        err.print_exception()
    if isinstance(exc, EdgepackError):
        msg = escape(str(exc).replace("\n", " "))
        err.print(f"[bold red]error:[/bold red] {msg}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    err.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(str(exc))}", highlight=False,
              soft_wrap=True)
    err.print("[yellow]hint:[/yellow] rerun with EDGEPACK_DEBUG=1 for a traceback and report it",
              highlight=False)
    return 3
