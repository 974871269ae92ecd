"""``run.toml``: what a run was asked to do, written once at its start.

The file is flat TOML (strings, numbers, booleans), read back with ``tomllib``. A rerun
with the same settings resumes; a rerun with different settings is refused instead of
mixing two runs' outputs in one folder.
"""

from __future__ import annotations

import datetime as _dt
import tomllib
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.atomic import write_text
from edgepack.constants import RUN_CREATED, RUN_SCHEMA, RUN_TOML, RUN_VERSION
from edgepack.errors import RunDirError

RUN_SCHEMA_VERSION = 1
# Keys that may differ between the first run and a resume without changing the result.
_VOLATILE = {RUN_CREATED, RUN_VERSION}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def dumps(settings: dict[str, Any]) -> str:
    lines = ["# Written by edgepack at the start of this run; rerun with --config to reproduce it."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items() if v is not None]
    return "\n".join(lines) + "\n"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's settings, or {} when the run has no run.toml yet."""
    path = Path(run_dir) / RUN_TOML
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RunDirError(f"{path}: not valid TOML ({exc})") from exc


def write_run_config(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write run.toml, or check that an existing one asked for the same thing."""
    wanted = {RUN_SCHEMA: RUN_SCHEMA_VERSION, **{k: v for k, v in settings.items() if v is not None}}
    existing = read_run_config(run_dir)
    if existing:
        diff = sorted(k for k in (set(existing) | set(wanted)) - _VOLATILE
                      if existing.get(k) != wanted.get(k))
        if diff:
            changes = ", ".join(f"{k}: {existing.get(k)!r} → {wanted.get(k)!r}" for k in diff)
            raise RunDirError(f"{run_dir} holds a run with other settings ({changes})",
                              hint="use a new --out folder, or the same settings to resume")
        return existing
    wanted[RUN_CREATED] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    wanted[RUN_VERSION] = __version__
    write_text(Path(run_dir) / RUN_TOML, dumps(wanted))
    return wanted
