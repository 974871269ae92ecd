"""The task contract: what a correct answer is, how it is scored, and how the model is asked.

A :class:`Task` is one frozen value, written by ``distill data`` to ``RUN/task.json`` (part of
the data stage's identity) and read by ``edgepack eval`` and the gate's holdout pass, which
both score through :mod:`edgepack.scoring`. It holds:

* ``system_prompt`` and ``demonstrations`` — how the task is asked (the demonstrations are
  worked user/assistant turns the teacher sees; the student learns without them);
* ``answer`` — the answer kind and its spec, from :data:`~edgepack.answers.ANSWER_KINDS`, keyed
  by the exact kind name: ``labels`` (a label set and the pattern that reads the label, by default the
  demo's ``Category:`` line), ``regex`` (a pattern the whole answer must match, with or without
  a ``label`` group), ``json`` (a JSON Schema and the fields to score) or ``text`` (free text);
* ``decoding`` — max tokens, temperature, repeat penalty and stop strings;
* ``primary_metric`` — the one number a verdict is judged on (one of the kind's metrics).

It is built from the flags users already have (:func:`answer_from_options` for
``--format-regex`` / ``--format-schema``, the label set found in the data rows,
:func:`read_system_prompt` for ``--system-prompt``) by :func:`build_task`; the shipped demo is
one instance of it (:data:`DEMO_TASK`). :func:`load_task` checks a file against its schema and
reports every problem at once. Labels are read and compared by :mod:`edgepack.labels`.

``task.json`` (``schema_version`` 1)::

    {"schema_version": 1,
     "system_prompt": "You triage alarm ..." | null,
     "demonstrations": [{"role": "user" | "assistant", "content": "..."}, ...],
     "answer": {"kind": "labels", "labels": ["electrical", ...], "pattern": "(?i)category..."}
             | {"kind": "regex", "pattern": "...", "labels": [...] | null}
             | {"kind": "json", "schema": {...}, "fields": ["asset", ...], "file": "x.json" | null,
                "sha256": "..." | null, "labels": [...] | null}
             | {"kind": "text"},
     "decoding": {"max_tokens": 48, "temperature": 0.0, "repeat_penalty": 1.0, "stop": []},
     "primary_metric": "accuracy"}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepack.answers import (ANSWER_KINDS, DEMO_ANSWER_RE, LABEL_MAX_TOKENS, Answer, AnswerKind, JsonAnswer,
                              LabelsAnswer, RegexAnswer, TextAnswer, fail, schema_fields,
                              schema_text_fields)
from edgepack.errors import DataError, EdgepackError, UsageError
from edgepack.labels import fold_label

__all__ = ["ANSWER_KINDS", "DEMO_ANSWER_RE", "DEMO_LABELS", "DEMO_SYSTEM_PROMPT", "DEMO_TASK", "TASK_FILE",
           "TASK_JSON_SCHEMA", "TASK_SCHEMA_VERSION", "Answer", "AnswerKind", "Decoding", "JsonAnswer",
           "LabelsAnswer", "RegexAnswer", "Task", "TextAnswer", "answer_from_options", "build_task", "load_task",
           "read_system_prompt", "run_task", "save_task", "task_from_json"]

TASK_FILE = "task.json"        # RUN/task.json, written by `distill data`
TASK_SCHEMA_VERSION = 1

DEMO_LABELS = ("electrical", "mechanical", "hydraulic_pneumatic", "thermal", "instrumentation", "network")
DEMO_SYSTEM_PROMPT = """\
You triage alarm and maintenance messages from plant equipment. Pick exactly one category:
electrical: power supply, motors' windings, drives, breakers, fuses, cables, grounding
mechanical: bearings, gears, belts, chains, couplings, alignment, vibration, wear
hydraulic_pneumatic: hydraulic oil systems, cylinders, compressed air, pneumatic actuators
thermal: temperatures, boilers, furnaces, HVAC, chillers, heat exchangers, cooling
instrumentation: sensors, transmitters, gauges, analyzers, calibration, signal errors
network: PLC, SCADA and HMI communication, switches, fieldbus, links
Answer in exactly two lines:
Category: <category>
Action: <one sentence>"""
Messages = list[dict[str, str]]


# --- decoding ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How the deployed model answers (eval, the gate and, later, the bundle)."""

    max_tokens: int = LABEL_MAX_TOKENS
    """At most this many new tokens per answer."""
    temperature: float = 0.0
    """0 = greedy."""
    repeat_penalty: float = 1.0
    """llama.cpp's repeat penalty; 1.0 = none (what the gate's backends decode with)."""
    stop: tuple[str, ...] = ()
    """The answer ends before the first of these strings."""

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (all of it when none occurs)."""
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[:min(ends)] if ends else text

    def describe(self) -> str:
        """One line for reports: ``greedy, max 48 tokens`` and what differs from the defaults."""
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"
        extra = "".join([f", repeat penalty {self.repeat_penalty:g}" if self.repeat_penalty != 1.0 else "",
                         f", stop at {list(self.stop)}" if self.stop else ""])
        return f"{how}, max {self.max_tokens} tokens{extra}"

    def to_json(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "repeat_penalty": self.repeat_penalty, "stop": list(self.stop)}


# --- the task ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """The task contract (see the module docstring); ``RUN/task.json`` holds one."""

    answer: Answer
    """The answer kind and its spec."""
    system_prompt: str | None = None
    """The system turn of every prompt that has none of its own (None: the rows' own, if any)."""
    demonstrations: tuple[dict[str, str], ...] = ()
    """Worked user/assistant turns the teacher sees after the system turn (data/teacher_context.json)."""
    decoding: Decoding = field(default_factory=Decoding)
    """How answers are decoded in eval and the gate."""
    primary_metric: str = ""
    """The metric a verdict is judged on; empty: the kind's default."""

    def __post_init__(self) -> None:
        if not self.primary_metric:
            object.__setattr__(self, "primary_metric", self.answer.default_primary)
        if self.primary_metric not in self.answer.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not a metric of a {self.answer.kind} task "
                             f"({', '.join(self.answer.metrics)})")

    @property
    def kind(self) -> str:
        return self.answer.kind

    @property
    def labels(self) -> frozenset[str] | None:
        """The label set, folded (None: the task has none)."""
        labels = self.answer.labels
        return frozenset(fold_label(x) for x in labels) if labels else None

    def prompt_messages(self, messages: Messages) -> Messages:
        """``messages`` with the task's system prompt first when they have no system turn."""
        if self.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def row_problem(self, row: dict[str, Any]) -> str | None:
        """Why a holdout row cannot be scored for this task, or None."""
        return self.answer.row_problem(row)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": TASK_SCHEMA_VERSION, "system_prompt": self.system_prompt,
                "demonstrations": [dict(t) for t in self.demonstrations], "answer": self.answer.to_json(),
                "decoding": self.decoding.to_json(), "primary_metric": self.primary_metric}

    def sha256(self) -> str:
        """Content hash of the canonical JSON (part of data/'s identity)."""
        blob = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def describe(self) -> dict[str, Any]:
        """A short summary for reports: kind, primary metric, label count, decoding."""
        return {"kind": self.kind, "primary_metric": self.primary_metric,
                "labels": len(self.answer.labels) if self.answer.labels else None,
                "decoding": self.decoding.describe(), "sha256": self.sha256()}



_TURN = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
         "properties": {"role": {"enum": ["user", "assistant"]}, "content": {"type": "string"}}}
TASK_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "answer", "decoding", "primary_metric"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": TASK_SCHEMA_VERSION},
        "system_prompt": {"type": ["string", "null"]},
        "demonstrations": {"type": "array", "items": _TURN},
        "answer": {"type": "object", "required": ["kind"],
                   "properties": {"kind": {"enum": list(ANSWER_KINDS)}}},
        "decoding": {"type": "object", "additionalProperties": False,
                     "required": ["max_tokens", "temperature", "repeat_penalty", "stop"],
                     "properties": {"max_tokens": {"type": "integer", "minimum": 1},
                                    "temperature": {"type": "number", "minimum": 0},
                                    "repeat_penalty": {"type": "number", "exclusiveMinimum": 0},
                                    "stop": {"type": "array", "items": {"type": "string", "minLength": 1}}}},
        "primary_metric": {"type": "string"},
    },
}
"""The schema of task.json itself (the answer object is checked by its kind's ``json_schema``)."""


def _schema_problems(obj: Any) -> list[str]:
    """Every way ``obj`` breaks :data:`TASK_JSON_SCHEMA` or its answer kind's schema, each naming the key."""
    import jsonschema

    def problems(value: Any, schema: dict[str, Any], prefix: str) -> list[str]:
        errors = jsonschema.Draft202012Validator(schema).iter_errors(value)
        return sorted(f"{prefix}{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: "
                      f"{' '.join(e.message.split())[:160]}" for e in errors)

    found = problems(obj, TASK_JSON_SCHEMA, "")
    answer = obj.get("answer") if isinstance(obj, dict) else None
    if not found and isinstance(answer, dict):
        found = problems(answer, ANSWER_KINDS[answer["kind"]].json_schema, "answer.")
    return found


def task_from_json(obj: Any, where: str, error: type[EdgepackError] = DataError) -> Task:
    """A :class:`Task` from task.json's content; ``error`` names ``where`` and every problem at once."""
    hint = "task.json is written by `edgepack distill data`; fix the file, or rerun distill data in a new run folder"
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if isinstance(version, int) and version > TASK_SCHEMA_VERSION:
        raise fail(error, where, f"schema_version {version} is newer than this edgepack reads "
                                 f"({TASK_SCHEMA_VERSION})", "upgrade edgepack")
    problems = _schema_problems(obj)
    if problems:
        raise fail(error, where, "not a valid task: " + "; ".join(problems), hint)
    spec = {k: v for k, v in obj["answer"].items() if k != "kind"}
    for key in ("labels", "fields", "text_fields"):
        if spec.get(key) is not None:
            spec[key] = tuple(spec[key])
    answer = ANSWER_KINDS[obj["answer"]["kind"]](**spec)
    if isinstance(answer, JsonAnswer) and "fields" not in spec:
        answer = replace(answer, fields=schema_fields(answer.schema))
    if isinstance(answer, JsonAnswer) and "text_fields" not in spec:
        answer = replace(answer, text_fields=schema_text_fields(answer.schema))
    answer.validate(where, error)
    d = obj["decoding"]
    decoding = Decoding(max_tokens=d["max_tokens"], temperature=float(d["temperature"]),
                        repeat_penalty=float(d["repeat_penalty"]), stop=tuple(d["stop"]))
    try:
        return Task(answer=answer, system_prompt=obj.get("system_prompt"),
                    demonstrations=tuple(dict(t) for t in obj.get("demonstrations", [])), decoding=decoding,
                    primary_metric=obj["primary_metric"])
    except ValueError as exc:
        raise fail(error, where, str(exc), hint) from None


def load_task(path: Path) -> Task:
    """The task in ``path`` (a task.json); DataError naming the file and every problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}", hint="run `edgepack distill data` to write RUN/task.json")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({getattr(exc, 'msg', None) or str(exc)[:80]})",
                        hint="task.json is written by `edgepack distill data`; rerun it in a new run folder") from None
    return task_from_json(obj, str(path))


def save_task(task: Task, path: Path) -> None:
    """Write ``task`` to ``path`` atomically."""
    from edgepack.atomic import write_json

    write_json(Path(path), task.to_json())


def run_task(run_dir: Path) -> tuple[Task, str]:
    """The task of a run directory and where it came from: ``RUN/task.json`` when there is one,
    else :data:`DEMO_TASK` (runs built before the contract, and the gate of a bare artifact)."""
    path = Path(run_dir) / TASK_FILE
    if path.is_file():
        return load_task(path), str(path)
    return DEMO_TASK, "the demo contract (no task.json)"


# --- built from the flags users already have --------------------------------------------------

def answer_from_options(regex: str | None = None, schema: Path | None = None) -> RegexAnswer | JsonAnswer | None:
    """The answer kind of ``--format-regex`` or ``--format-schema`` (checked now, before any
    generation), or None: then the data decides (labels when its rows carry them, else text)."""
    if regex is not None and schema is not None:
        raise UsageError("give --format-regex or --format-schema, not both")
    if regex is not None:
        answer = RegexAnswer(pattern=regex)
        answer.validate("", UsageError)
        return answer
    if schema is not None:
        return JsonAnswer.from_file(schema)
    return None


def read_system_prompt(path: Path) -> str:
    """The text of ``--system-prompt FILE`` (UTF-8, trailing whitespace removed)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--system-prompt file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8").rstrip()
    except UnicodeDecodeError as exc:
        raise UsageError(f"--system-prompt {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise UsageError(f"--system-prompt {path} is empty", hint="write the task's instructions in the file")
    return text


def build_task(*, answer: Answer | None, labels: frozenset[str] | None, system_prompt: str | None,
               demonstrations: Messages | tuple[dict[str, str], ...] = ()) -> Task:
    """The task of a ``distill data`` run: the user's answer format (or labels when the rows
    carry them, else free text), the rows' label set, the system prompt and demonstrations,
    and the kind's default decoding and primary metric."""
    ordered = tuple(sorted(labels)) if labels else None
    if answer is None:
        answer = LabelsAnswer(labels=ordered) if ordered else TextAnswer()
    elif ordered and answer.label_from and not isinstance(answer, TextAnswer):
        answer = replace(answer, labels=ordered)
    return Task(answer=answer, system_prompt=system_prompt, demonstrations=tuple(dict(t) for t in demonstrations),
                decoding=Decoding(max_tokens=answer.max_tokens))


DEMO_TASK = build_task(answer=None, labels=frozenset(DEMO_LABELS), system_prompt=DEMO_SYSTEM_PROMPT)
"""The shipped demo's contract (``distill data`` adds its demonstrations, distill/demo/shots.jsonl);
eval and the gate use it for a run without task.json."""
