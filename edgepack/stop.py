"""Stop strings of teacher decoding (``distill data --stop``, run.toml ``stop``): the rule the
command line, run.toml and the data stage share, and the cut every teacher kind's answer gets.
Core, so that run.toml's validation needs no distill import (tests/edgepack/test_layers.py)."""

from __future__ import annotations

from edgepack.errors import UsageError

MAX_STOP_STRINGS = 4  # as OpenAI's API allows


def check_stop(stop: tuple[str, ...]) -> None:
    """UsageError for stop strings no teacher kind takes: an empty one, or more than
    :data:`MAX_STOP_STRINGS` (checked before any teacher is opened)."""
    if any(not isinstance(s, str) or not s for s in stop):
        raise UsageError("a stop string (--stop) must not be empty",
                         hint="give the text that ends an answer, e.g. --stop $'\\n' or --stop '<end_of_turn>'")
    if len(stop) > MAX_STOP_STRINGS:
        raise UsageError(f"at most {MAX_STOP_STRINGS} stop strings (--stop) are allowed (got {len(stop)})",
                         hint=f"keep the {MAX_STOP_STRINGS} that end the teacher's answers")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` before the first stop string in it, and whether there was one."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)
