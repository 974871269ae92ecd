"""The JSON Schema of a bundle's ``manifest.json``: every field the runtime reads, typed.

A manifest is attacker-controlled until its signature is checked, and even a signed one is
only as careful as whoever packed it, so the reader checks types and ranges here, in one
place, with ``jsonschema`` (a field of the wrong type used to surface as exit 3 or a
MemoryError deep inside loading). Every problem is reported at once, naming the key.

The numbers here are validated, not trusted: memory and context decisions are recomputed from
the model file and the profile/CLI (``runtime/session.py``). Extra keys are allowed, so a newer
edgepack's additions do not break an older reader within one ``schema_version``.

Two optional keys carry the task contract (issue #15): ``task`` is task.json's object
(:mod:`edgepack.task`; checked here by the same reader as task.json, every problem at once) and
``task_scores`` the scores the gate measured under it (``primary_metric``, ``primary``, the
``scores`` dict, the holdout ``rows``, the ``decoding``). Bundles packed before them still load;
:func:`manifest_task` gives the task or None.
"""

from __future__ import annotations

from typing import Any

from edgepack.constants import (M_CHAT_TEMPLATE, M_ENTRYPOINT, M_FILES, M_FORMAT, M_GATE, M_GATE_STATUS,
                                M_LINEAGE, M_MODEL, M_PACK, M_PROFILE, M_QUANT, M_RUNTIME, M_SCHEMA, M_TASK,
                                M_TASK_SCORES)
from edgepack.errors import BundleError
from edgepack.task import TASK_JSON_SCHEMA, Task, task_from_json

_NAME = {"type": "string", "minLength": 1, "maxLength": 255}
_COUNT = {"type": "integer", "minimum": 0}
_OBJECT = {"type": "object"}
_SCORE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
# A context longer than any released model's is a forged number, not a deployment choice.
MAX_CONTEXT_LENGTH = 1 << 21
TASK_SCORES_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"], "required": ["primary_metric", "primary", "scores", "rows", "decoding"],
    "properties": {
        "primary_metric": {"type": "string", "minLength": 1, "maxLength": 64},
        "primary": _SCORE,
        "teacher_primary": _SCORE,
        "relative": {"type": ["number", "null"], "minimum": 0},
        "scores": _OBJECT,
        "rows": _COUNT,
        "answered": _COUNT,
        "decoding": TASK_JSON_SCHEMA["properties"]["decoding"],
        "decoding_line": {"type": ["string", "null"], "maxLength": 500},
        "structured_output": {"type": ["object", "null"]},
        "holdout": {"type": ["string", "null"]},
        "task_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}
"""``task_scores``: what the gate measured on the holdout under the bundle's task (written by pack)."""

MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [M_SCHEMA, M_MODEL, M_FORMAT, M_QUANT, M_PROFILE, M_ENTRYPOINT, M_FILES, M_GATE_STATUS],
    "properties": {
        M_SCHEMA: {"type": "integer"},
        M_MODEL: _NAME,
        M_FORMAT: _NAME,
        M_QUANT: _NAME,
        M_ENTRYPOINT: {"type": "string", "minLength": 1, "maxLength": 255},
        M_GATE_STATUS: {"type": "string", "maxLength": 64},
        M_PROFILE: {"type": "object", "required": ["name"], "properties": {"name": _NAME}},
        M_FILES: {"type": "array", "maxItems": 4096, "items": {
            "type": "object", "required": ["path", "size", "sha256"],
            "properties": {"path": {"type": "string"}, "size": _COUNT,
                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}},
        M_GATE: _OBJECT,
        M_LINEAGE: _OBJECT,
        M_PACK: _OBJECT,
        M_CHAT_TEMPLATE: {"type": ["string", "null"]},
        M_TASK: _OBJECT,  # its content is checked by edgepack.task's reader (see manifest_problems)
        M_TASK_SCORES: TASK_SCORES_SCHEMA,
        "bundle_name": {"type": "string"},
        M_RUNTIME: {"type": "object", "properties": {
            "context_length": {"type": "integer", "minimum": 1, "maximum": MAX_CONTEXT_LENGTH},
            "threads": {"type": "integer", "minimum": 1, "maximum": 4096},
            "device": {"type": ["string", "null"], "maxLength": 64},
            "memory_estimate": {"type": "object", "properties": {"total_bytes": _COUNT}},
            "stop_tokens": {"type": "array", "maxItems": 4096, "items": {
                "type": "object", "required": ["id"],
                "properties": {"id": _COUNT, "text": {"type": "string"}}}},
            "special_tokens": _OBJECT,
            "artifact_dir": {"type": "string"},
            "artifact_sha256": {"type": "string"},
        }},
    },
    "dependentRequired": {M_TASK_SCORES: [M_TASK]},
}


def _validator() -> Any:
    """Draft 2020-12 where "integer" means a JSON integer: ``1e6`` parses as a float and is refused."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    return validators.extend(Draft202012Validator, type_checker=checker)


def manifest_problems(manifest: Any, schema: dict[str, Any] = MANIFEST_SCHEMA) -> list[str]:
    """Every way ``manifest`` breaks :data:`MANIFEST_SCHEMA` (or ``schema``, for one part of it, such
    as :data:`TASK_SCORES_SCHEMA`), as ``key: what`` lines (empty when valid)."""
    validator = _validator()(schema)
    problems = []
    for error in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message[:160]}")
    task = manifest.get(M_TASK) if schema is MANIFEST_SCHEMA and isinstance(manifest, dict) else None
    if isinstance(task, dict):
        try:
            task_from_json(task, M_TASK, BundleError)
        except BundleError as exc:
            problems.append(str(exc))
    return problems


def manifest_task(manifest: dict[str, Any], bundle: str) -> Task | None:
    """The task a (checked) manifest carries, or None for a bundle packed without one."""
    task = manifest.get(M_TASK)
    return None if task is None else task_from_json(task, f"{bundle}: manifest.json {M_TASK}", BundleError)


def check_manifest(manifest: Any, bundle: str) -> None:
    """BundleError listing every schema problem of ``manifest`` (all at once), else nothing."""
    problems = manifest_problems(manifest)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise BundleError(f"{bundle}: manifest.json is malformed: {shown}",
                          hint="bundles are written by `edgepack pack`; repack it from the run")
