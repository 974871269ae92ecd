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
    """Print ``result`` as one JSON document (``as_json``) or through ``human``.

    Without a renderer, people get :func:`summary_lines`: a JSON document on stdout is for
    ``--json`` only.
    """
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
    elif human is not None:
        human(result)
    else:
        for line in summary_lines(result):
            out.print(line, highlight=False, soft_wrap=True, markup=False)


def summary_lines(result: Any, limit: int = 20) -> list[str]:
    """A result's top-level scalars as ``key: value`` lines, containers by size; the rest is in ``--json``."""
    if not isinstance(result, dict):
        return [str(result)]
    lines = []
    for key, value in result.items():
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}: {len(value)} item{'s' if len(value) != 1 else ''}")
        elif isinstance(value, dict):
            scalars = [f"{k}={v}" for k, v in value.items() if isinstance(v, (str, int, float, bool)) and v != ""]
            lines.append(f"{key}: {', '.join(scalars[:6])}{', …' if len(scalars) > 6 else ''}" if scalars
                         else f"{key}: {len(value)} fields")
        elif value is not None:
            lines.append(f"{key}: {value}")
    return [*lines[:limit], *(["…"] if len(lines) > limit else []), "(--json prints the full report)"]


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress callback: rich bars on a terminal (unless ``enabled`` is False, as with
    ``--json``), else whole lines with rate and ETA on stderr. Either way the lines also go to
    the stage log (:func:`edgepack.logs.log_progress`).
    """
    from edgepack.logs import log_progress
    from edgepack.progress import LineProgress

    to_log = LineProgress(log_progress)
    if not enabled or not err.is_terminal:
        to_err = LineProgress(_print_line)

        def lines(task: str, done: int, total: int | None = None) -> None:
            to_log(task, done, total)
            to_err(task, done, total)

        yield lines
        return
    with _rich_bars() as bars:

        def both(task: str, done: int, total: int | None = None) -> None:
            to_log(task, done, total)
            bars(task, done, total)

        yield both


@contextmanager
def _rich_bars() -> Iterator[Callable[[str, int, int | None], None]]:
    """One rich bar per task name on stderr (a terminal)."""
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


def _print_line(line: str) -> None:
    from rich.markup import escape

    err.print(f"[dim]{escape(line)}[/dim]", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (a degraded mode the report also records)."""
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


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
