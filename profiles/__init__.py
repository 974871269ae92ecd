"""Named hardware profiles: TOML data files in this folder, loaded into a frozen dataclass.

``load_profile("cpu-x86-2c")`` reads the shipped file; ``load_profile("./mine.toml")`` reads
a user's own. Validation lives in one place (:func:`_validate`) and reports every problem
at once, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgepack.errors import ProfileError
from edgepack.formats import all_formats, find_format

PROFILE_DIR = Path(__file__).resolve().parent

DEVICE_KINDS = ("cpu", "cuda", "metal")
# The formats and quantizations a profile may allow are each format's ``quants``
# (edgepack.formats), so a registered third-party format is a valid choice too.


@dataclass(frozen=True)
class DeployChoice:
    """One allowed (format, quantization) pair, e.g. ``gguf:Q4_K_M``."""

    format: str
    quant: str

    def __str__(self) -> str:
        return f"{self.format}:{self.quant}"


@dataclass(frozen=True)
class Profile:
    """A target device and the budgets a deployed model must meet on it."""

    name: str
    """Profile name; shipped profiles match their file name."""
    description: str
    """One line about the hardware class."""
    device: str
    """Where the deployed model runs: ``cpu``, ``cuda`` or ``metal``."""
    arch: str
    """CPU architecture of the device (``x86_64`` or ``aarch64``/``arm64``)."""
    threads: int
    """CPU threads the runtime may use."""
    memory_budget_mb: int
    """Peak memory (RSS, plus VRAM on GPU devices) the deployed model process may use."""
    choices: tuple[DeployChoice, ...]
    """Allowed formats and quantizations, most preferred (best quality) first."""
    context_length: int
    """Context window the model is deployed with (KV cache is sized for it)."""
    prompt_tokens: int
    """Prompt length at which time-to-first-token is measured."""
    ttft_p95_ms: float
    """Budget: 95th-percentile time to first token at ``prompt_tokens``, in milliseconds."""
    min_decode_tokens_per_s: float
    """Budget: minimum decode speed (median over warm runs), tokens per second."""
    train_device: str
    """Device used when distilling for this profile: ``cpu``, ``cuda`` or ``mps``."""
    train_memory_mb: int
    """Memory available to training on ``train_device`` (RAM for cpu, VRAM for cuda)."""
    gpu_memory_mb: int = 0
    """VRAM (cuda) or the unified-memory share (metal) of the device; 0 on CPU devices."""
    min_relative_quality: float | None = None
    """Relative quality budget: the artifact's score on the holdout (the task's primary metric)
    divided by the teacher's score on its recorded responses, 0..1.5. None: no relative budget.
    A holdout whose rows carry no teacher responses cannot verify it: the verdict is UNVERIFIED."""
    min_score: float | None = None
    """Absolute quality floor: the task's primary metric on the holdout (label accuracy for a
    labels task, field F1 for a json task, chrF for a text task ...; see ``primary_metric`` in
    RUN/task.json), 0..1. None: no floor. It needs no teacher responses, so a holdout of fresh
    rows with gold labels or references can verify it."""
    source: str = ""
    """Where this profile was loaded from (file path)."""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [str(c) for c in value] if f.name == "choices" else value
        return out

    def content_hash(self) -> str:
        """sha256 of every field but ``source``, as canonical JSON.

        A gate report records it (``profile_sha256``) and ``pack`` accepts the report only for
        a profile with the same hash: two profiles with one name but other budgets or choices
        (a user's ``cpu-x86-2c.toml`` beside the shipped one) are different profiles. Comments
        and formatting of the TOML do not change it; any value does.
        """
        # An optional key left unset is left out, so profiles written before it existed keep
        # their hash (and the gate reports bound to it).
        values = {k: v for k, v in self.describe().items()
                  if k != "source" and not (k in _OPTIONAL and v is None)}
        return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# TOML layout: table -> key -> (dataclass field, type). One table per concern.
_SCHEMA: dict[str, dict[str, tuple[str, type]]] = {
    "": {"name": ("name", str), "description": ("description", str)},
    "device": {
        "kind": ("device", str), "arch": ("arch", str), "threads": ("threads", int),
        "memory_budget_mb": ("memory_budget_mb", int), "gpu_memory_mb": ("gpu_memory_mb", int),
    },
    "deploy": {"choices": ("choices", list), "context_length": ("context_length", int)},
    "latency": {
        "prompt_tokens": ("prompt_tokens", int), "ttft_p95_ms": ("ttft_p95_ms", float),
        "min_decode_tokens_per_s": ("min_decode_tokens_per_s", float),
    },
    "quality": {"min_relative_quality": ("min_relative_quality", float), "min_score": ("min_score", float)},
    "training": {"device": ("train_device", str), "memory_mb": ("train_memory_mb", int)},
}
# [quality] sets one of these budgets or both (a profile that judges no quality is a mistake).
_QUALITY_BUDGETS = ("min_relative_quality", "min_score")
_OPTIONAL = {"gpu_memory_mb", *_QUALITY_BUDGETS}
# A profile is a few hundred bytes; anything much larger is not one (and is not read whole).
MAX_PROFILE_BYTES = 1 << 20
# The name ends up in file names (gate reports, bundle names): no separators or dot-dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Upper bounds: far above any real device, low enough that no budget overflows a C int later.
_MAX_INT = {"threads": 1024, "memory_budget_mb": 1 << 24, "gpu_memory_mb": 1 << 24,
            "context_length": 1 << 24, "prompt_tokens": 1 << 24, "train_memory_mb": 1 << 24}


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with edgepack."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def resolve_profile_path(name_or_path: str) -> Path:
    """A shipped name or a path to a .toml file → the file; unknown names raise ProfileError."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"profile file not found: {name_or_path}")
        return path
    path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(
            f"unknown profile {name_or_path!r}; shipped: {', '.join(shipped_profiles())}"
        )
    return path


def load_profile(name_or_path: str) -> Profile:
    """Load and validate a profile by shipped name or file path."""
    path = resolve_profile_path(name_or_path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path}: larger than {MAX_PROFILE_BYTES} bytes; not a profile")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})", hint="fix the TOML syntax") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array / inline table
        raise ProfileError(f"{path}: not valid TOML (arrays or tables nested too deeply)",
                           hint="fix the TOML syntax") from exc
    return _validate(raw, str(path))


def _validate(raw: dict[str, Any], source: str) -> Profile:
    """Check every key at once; raise one ProfileError listing all problems."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for table, keys in _SCHEMA.items():
        section = raw if table == "" else raw.get(table)
        if not isinstance(section, dict):
            problems.append(f"[{table}] table missing")
            continue
        known = set(keys) | (set(_SCHEMA) - {""} if table == "" else set())
        for extra in sorted(set(section) - known):
            problems.append(f"{_key(table, extra)}: unknown key")
        for key, (field_name, typ) in keys.items():
            if key not in section:
                if field_name not in _OPTIONAL:
                    problems.append(f"{_key(table, key)}: missing")
                continue
            value = section[key]
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, typ) or isinstance(value, bool):
                problems.append(f"{_key(table, key)}: expected {typ.__name__}, got {type(value).__name__}")
                continue
            values[field_name] = value
    quality = raw.get("quality")
    if isinstance(quality, dict) and not set(_QUALITY_BUDGETS) & set(quality):
        problems.append(f"[quality]: set {' or '.join(_QUALITY_BUDGETS)} (or both); a profile judges quality by "
                        "at least one of them")
    problems += _check_values(values)
    if problems:
        raise ProfileError(
            f"{source}: {len(problems)} problem(s): " + "; ".join(problems),
            hint="see the profile format in README.md (section Profiles)",
        )
    values["choices"] = tuple(DeployChoice(*c.split(":", 1)) for c in values["choices"])
    return Profile(**values, source=source)


def _check_values(v: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if "name" in v and not _NAME.fullmatch(v["name"]):
        problems.append(f"name: {v['name'][:80]!r} must be 1-64 letters, digits, '.', '_' or '-' "
                        "(it becomes part of file names)")
    for field_name, value in v.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{_FIELD_KEYS.get(field_name, field_name)}: must be a finite number, got {value}")
        limit = _MAX_INT.get(field_name)
        if limit is not None and value > limit:
            problems.append(f"{_FIELD_KEYS.get(field_name, field_name)}: {value} is larger than {limit}")
    if v.get("gpu_memory_mb", 0) < 0:
        problems.append(f"device.gpu_memory_mb: must be >= 0, got {v['gpu_memory_mb']}")
    if "device" in v and v["device"] not in DEVICE_KINDS:
        problems.append(f"device.kind: {v['device']!r} is not one of {', '.join(DEVICE_KINDS)}")
    if "train_device" in v and v["train_device"] not in ("cpu", "cuda", "mps"):
        problems.append(f"training.device: {v['train_device']!r} is not one of cpu, cuda, mps")
    for key, field_name in [
        ("device.threads", "threads"), ("device.memory_budget_mb", "memory_budget_mb"),
        ("deploy.context_length", "context_length"), ("latency.prompt_tokens", "prompt_tokens"),
        ("latency.ttft_p95_ms", "ttft_p95_ms"),
        ("latency.min_decode_tokens_per_s", "min_decode_tokens_per_s"),
        ("training.memory_mb", "train_memory_mb"),
    ]:
        if field_name in v and v[field_name] <= 0:
            problems.append(f"{key}: must be > 0, got {v[field_name]}")
    if "min_relative_quality" in v and not 0.0 <= v["min_relative_quality"] <= 1.5:
        problems.append("quality.min_relative_quality: must be between 0 and 1.5")
    if "min_score" in v and not 0.0 <= v["min_score"] <= 1.0:
        problems.append(f"quality.min_score: must be between 0 and 1 (the task's primary metric), got {v['min_score']}")
    if "prompt_tokens" in v and "context_length" in v and v["prompt_tokens"] >= v["context_length"]:
        problems.append("latency.prompt_tokens: must be smaller than deploy.context_length")
    if "choices" in v:
        if not v["choices"]:
            problems.append("deploy.choices: must list at least one format:quant")
        for c in v["choices"]:
            fmt, _, quant = str(c).partition(":")
            known = find_format(fmt)
            if known is None or quant not in known.quants:
                allowed = ", ".join(f"{f.name}:{q}" for f in all_formats() for q in f.quants)
                problems.append(f"deploy.choices: {c!r} is not one of {allowed}")
    if v.get("device") in ("cuda", "metal") and v.get("gpu_memory_mb", 0) <= 0:
        problems.append("device.gpu_memory_mb: required (> 0) for cuda and metal devices")
    return problems


# dataclass field -> the TOML key users write, for messages
_FIELD_KEYS = {f: (f"{t}.{k}" if t else k) for t, keys in _SCHEMA.items() for k, (f, _) in keys.items()}


def _key(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key
