"""``run.toml``: what a run was asked to do, written once at its start.

The file is flat TOML (strings, numbers, booleans), read back with ``tomllib``. A rerun
with the same settings resumes; a rerun with different settings is refused instead of
mixing two runs' outputs in one folder. :data:`PIPELINE_SETTINGS` is the pipeline's part
of the format (every key, its type and default); :func:`load_pipeline_config` reads a
run.toml given to ``edgepack pipeline --config`` and refuses unknown keys and bad values.
"""

from __future__ import annotations

import datetime as _dt
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.atomic import write_text
from edgepack.constants import (BUILTIN_TEACHER, RUN_CREATED, RUN_DATA, RUN_PROFILE, RUN_SCHEMA, RUN_SEED,
                                RUN_TEACHER, RUN_TOML, RUN_VERSION, TRAINING_DEVICES)
from edgepack.errors import RunDirError, UsageError
from edgepack.stop import check_stop

RUN_SCHEMA_VERSION = 1
# Keys that may differ between the first run and a resume without changing the result.
_VOLATILE = {RUN_CREATED, RUN_VERSION}
# Keys edgepack writes about the run itself, not settings of it.
RUN_METADATA = (RUN_SCHEMA, RUN_CREATED, RUN_VERSION)


@dataclass(frozen=True)
class Setting:
    """One pipeline key of run.toml."""

    kind: type
    """The TOML type: str, int, bool or list (of strings; an int key refuses a bool)."""
    default: Any
    """Value when the key is absent; None = unset (such keys are not written)."""
    doc: str
    choices: tuple[str, ...] = ()
    """Allowed values of a str key; empty = any string."""
    minimum: int | None = None
    """Smallest allowed value of an int key."""
    check: Callable[[Any], None] | None = None
    """Further checks of a value of the right type (raises UsageError; its message is the problem)."""


# Search quality modes, spelled here so run.toml's validation needs no runtime import
# (the same tuple as edgepack.export.gate.search.QUALITY_MODES; a test keeps them equal).
SEARCH_QUALITY_MODES = ("all", "until-pass")


def _check_stop(value: list[str]) -> None:
    check_stop(tuple(value))


PIPELINE_SETTINGS: dict[str, Setting] = {
    RUN_PROFILE: Setting(str, None, "profile name or path to a profile .toml (required)"),
    RUN_TEACHER: Setting(str, BUILTIN_TEACHER, "teacher spec: HF dir, .gguf, builtin:NAME or openai:URL#MODEL"),
    RUN_DATA: Setting(str, "builtin:demo", "prompts JSONL, or builtin:NAME for a shipped domain (demo, workorders)"),
    RUN_SEED: Setting(int, 0, "seed of data sampling and training", minimum=0),
    "steps": Setting(int, 30, "KD optimizer steps", minimum=1),
    "limit": Setting(int, None, "use at most this many training prompts (absent: all)", minimum=1),
    "allow_unverified": Setting(bool, False, "package an UNVERIFIED gate (recorded in the bundle)"),
    "correct_teacher": Setting(bool, False, "LoRA-SFT the teacher on the references first"),
    "search_quality": Setting(str, "until-pass", "which gated choices answer the holdout: all, or until-pass "
                              "(only where it can decide the verdict)", choices=SEARCH_QUALITY_MODES),
    # `distill data`'s task flags, passed through by the pipeline (absent: the data decides)
    "format_regex": Setting(str, None, "answer format: a regex the whole answer must match"),
    "format_schema": Setting(str, None, "answer format: a JSON Schema file the answer must satisfy"),
    "system_prompt": Setting(str, None, "a text file with the task's system prompt"),
    "holdout": Setting(str, None, "your own holdout prompts (JSONL); then every data row trains"),
    "strict": Setting(bool, False, "stop at the first bad data line instead of skipping it (reported)"),
    "license": Setting(str, None, "Hub license id the model cards state (absent: the teacher's recorded one)"),
    "device": Setting(str, None, "where distill train runs: auto, cpu, cuda or mps (absent: the profile's "
                      "[training] device)", choices=TRAINING_DEVICES),
    "chat_template": Setting(str, None, "a Jinja chat template file for a teacher without one (a base model)"),
    "stop": Setting(list, None, "stop strings (up to 4) that end the teacher's answers, as `distill data --stop`",
                    check=_check_stop),
}


def pipeline_defaults() -> dict[str, Any]:
    """Every pipeline key with its default value."""
    return {k: s.default for k, s in PIPELINE_SETTINGS.items()}


def pipeline_problems(settings: dict[str, Any]) -> list[str]:
    """Every unknown key and bad value in ``settings`` (pipeline keys and run metadata), each naming its key."""
    problems = []
    for key, value in settings.items():
        if key in RUN_METADATA:
            if key == RUN_SCHEMA and value != RUN_SCHEMA_VERSION:
                problems.append(f"{key} = {value!r}: this edgepack reads run.toml schema {RUN_SCHEMA_VERSION}")
            continue
        spec = PIPELINE_SETTINGS.get(key)
        if spec is None:
            problems.append(f"unknown key {key!r} (known: {', '.join(PIPELINE_SETTINGS)})")
        elif value is None:
            continue
        elif not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)) or \
                (spec.kind is list and not all(isinstance(v, str) for v in value)):
            problems.append(f"{key} = {value!r}: must be {_kind_name(spec.kind)}")
        elif spec.choices and value not in spec.choices:
            problems.append(f"{key} = {value!r}: must be one of {', '.join(spec.choices)}")
        elif spec.minimum is not None and value < spec.minimum:
            problems.append(f"{key} = {value!r}: must be at least {spec.minimum}")
        elif spec.kind is str and not value.strip():
            problems.append(f"{key} = {value!r}: must not be empty")
        elif spec.check is not None:
            try:
                spec.check(value)
            except UsageError as exc:
                problems.append(f"{key} = {value!r}: {exc}")
    return problems


def check_pipeline_settings(settings: dict[str, Any], source: str) -> None:
    """Raise one UsageError listing every problem of ``settings`` (see :func:`pipeline_problems`)."""
    problems = pipeline_problems(settings)
    if problems:
        raise UsageError(f"{source}: " + "; ".join(problems),
                         hint="see the run.toml keys in README.md (section Pipeline)")


def load_pipeline_config(path: Path) -> dict[str, Any]:
    """The pipeline settings of a run.toml (a file, or a run folder holding one), validated.

    Unknown keys, values of the wrong type or out of range, and a missing ``profile`` raise
    one :class:`UsageError` naming each key. Run metadata (schema, created, edgepack
    version) is checked and dropped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RUN_TOML
    if not path.is_file():
        raise UsageError(f"config file not found: {path}", hint="pass the run.toml of an earlier run")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})", hint="fix the TOML syntax") from exc
    problems = pipeline_problems(raw)
    if RUN_PROFILE not in raw:
        problems.append(f"missing key {RUN_PROFILE!r}")
    if problems:
        raise UsageError(f"{path}: " + "; ".join(problems),
                         hint="see the run.toml keys in README.md (section Pipeline)")
    return {k: v for k, v in raw.items() if k not in RUN_METADATA}


def _kind_name(kind: type) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list of strings"}
    return names.get(kind, kind.__name__)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    # TOML strings take no other control character as is (a stop string may hold one).
    text = "".join(f"\\u{ord(c):04x}" if (c < " " and c != "\t") or c == "\x7f" else c for c in text)
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


def write_run_config(run_dir: Path, settings: dict[str, Any],
                     defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write run.toml, or check that an existing one asked for the same thing.

    ``defaults``: a key an existing run.toml lacks counts as its default there (a setting
    added after that run was started), so the run still resumes.
    """
    defaults = defaults or {}
    wanted = {RUN_SCHEMA: RUN_SCHEMA_VERSION, **{k: v for k, v in settings.items() if v is not None}}
    existing = read_run_config(run_dir)
    if existing:
        diff = sorted(k for k in (set(existing) | set(wanted)) - _VOLATILE
                      if existing.get(k, defaults.get(k)) != wanted.get(k, defaults.get(k)))
        if diff:
            changes = ", ".join(f"{k}: {existing.get(k)!r} → {wanted.get(k)!r}" for k in diff)
            raise RunDirError(f"{run_dir} holds a run with other settings ({changes})",
                              hint="use a new --out folder, or the same settings to resume")
        return existing
    wanted[RUN_CREATED] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    wanted[RUN_VERSION] = __version__
    write_text(Path(run_dir) / RUN_TOML, dumps(wanted))
    return wanted
