"""The answer kinds of a task: what a correct answer looks like, and how its label is read.

Registered by the exact kind name in :data:`ANSWER_KINDS` (the ``answer.kind`` of task.json,
see :mod:`edgepack.task`): ``labels`` (a label set, answered in the demo's two-line format and
read with a lenient pattern, by default the demo's ``Category:`` line), ``regex`` (a pattern the
whole answer must match, with or without a ``label`` group), ``json`` (a JSON Schema and the
fields to score) and ``text`` (free text). Each kind is a frozen dataclass that checks its own
spec (:meth:`validate`), checks an answer's format for the training data (:meth:`check`, used
by distill/filters.py), reads the label an answer states for scoring (:meth:`label`, through
:mod:`edgepack.labels`), says which holdout rows it can score (:meth:`row_problem`) and names
the metrics :mod:`edgepack.scoring` computes for it (``metrics``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgepack.errors import EdgepackError, UsageError
from edgepack.labels import DEFAULT_LABEL_PATTERN, duplicate_labels, extract_label, fold_label

# How many tokens an answer may take. A label answer is ~20 tokens; other kinds get the teacher's
# own limit (distill/generate.py DecodeParams.max_new_tokens): no kept training answer is longer.
LABEL_MAX_TOKENS = 48
ANSWER_MAX_TOKENS = 64

# The labels kind's training format: the demo's two lines (the action at least two words).
DEMO_ANSWER_RE = re.compile(r"\ACategory: ([A-Za-z_]+)\nAction: (\S[^\n]*)\Z")


def fail(error: type[EdgepackError], where: str, problem: str, hint: str | None = None) -> EdgepackError:
    """``error`` with ``where: problem`` as its one line (``problem`` alone when ``where`` is empty)."""
    return error(f"{where}: {problem}" if where else problem, hint=hint)


def _compile(pattern: str, flags: int, what: str, error: type[EdgepackError]) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except (re.error, RecursionError, OverflowError) as exc:
        raise fail(error, "", f"{what} does not compile: {' '.join(str(exc).split())}",
                   "give a Python regular expression") from None


# --- answer kinds -----------------------------------------------------------------------------

class AnswerKind(Protocol):
    """One answer kind of :data:`ANSWER_KINDS`. ``metrics`` names what :mod:`edgepack.scoring`
    computes for it, ``json_schema`` checks its ``answer`` object in task.json, ``label_from``
    says where an answer states its label (None: it does not), ``labels`` is the label set (None:
    none), ``default_primary`` and ``max_tokens`` are its defaults for the task."""

    kind: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    json_schema: ClassVar[dict[str, Any]]
    label_from: str | None
    labels: tuple[str, ...] | None
    default_primary: str
    max_tokens: int

    def validate(self, where: str, error: type[EdgepackError]) -> None:
        """Raise ``error`` naming ``where`` when the spec cannot be used (a regex, a schema, labels)."""

    def check(self, text: str) -> tuple[bool, str | None]:
        """(the whole stripped answer has the task's format, the label it states or None)."""

    def label(self, text: str | None) -> str | None:
        """The label the answer states, folded (for scoring); None when it states none."""

    def row_problem(self, row: dict[str, Any]) -> str | None:
        """Why a holdout row cannot be scored for this kind, or None."""

    def answerable(self, row: dict[str, Any]) -> bool:
        """Whether an answer to this (fitting) row counts toward a metric: the gate asks no other."""

    def format_check(self) -> dict[str, Any] | None:
        """``format_check`` in data/report.json (None: no format check)."""

    def to_json(self) -> dict[str, Any]:
        """The ``answer`` object of task.json."""


_LABEL_LIST = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}


def _check_labels(labels: tuple[str, ...] | None, where: str, error: type[EdgepackError]) -> None:
    dups = duplicate_labels(labels or ())
    if dups:
        shown = ", ".join(f"{a!r} and {b!r}" for a, b in dups[:3])
        raise fail(error, where, f"the label set has duplicates ({shown} are one label)",
                   "list each label once; labels compare case-, width- and look-alike-blind")


@dataclass(frozen=True)
class LabelsAnswer:
    """One label from a fixed set, stated in the demo's two-line format (``Category:`` /
    ``Action:``) and read for scoring with ``pattern`` (its ``label`` group, else group 1)."""

    kind: ClassVar[str] = "labels"
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    json_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["kind", "labels"], "additionalProperties": False,
        "properties": {"kind": {"const": "labels"}, "labels": _LABEL_LIST, "pattern": {"type": "string"}}}
    label_from: ClassVar[str] = "the Category line"
    labels: tuple[str, ...]
    pattern: str = DEFAULT_LABEL_PATTERN
    default_primary: ClassVar[str] = "accuracy"
    max_tokens: ClassVar[int] = LABEL_MAX_TOKENS

    def validate(self, where: str, error: type[EdgepackError]) -> None:
        _check_labels(self.labels, where, error)
        regex = _compile(self.pattern, 0, f"{where}: answer.pattern" if where else "the label pattern", error)
        if not regex.groups:
            raise fail(error, where, "answer.pattern has no group to read the label from",
                       "put the label in a group named `label`: (?P<label>...)")

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    def check(self, text: str) -> tuple[bool, str | None]:
        m = DEMO_ANSWER_RE.match(text)
        if m is None or len(m.group(2).split()) < 2:
            return False, None
        return True, m.group(1)

    def label(self, text: str | None) -> str | None:
        return extract_label(text, self._regex)

    def row_problem(self, row: dict[str, Any]) -> str | None:
        if row.get("label") is None and row.get("response") is None:
            return "has no `label` and no teacher `response`: a labels task has nothing to score it against"
        return None

    def answerable(self, row: dict[str, Any]) -> bool:
        # accuracy needs a gold label; agreement needs a teacher response that names one
        return row.get("label") is not None or self.label(row.get("response")) is not None

    def format_check(self) -> dict[str, Any] | None:
        return {"kind": "demo", "label_from": self.label_from}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": list(self.labels), "pattern": self.pattern}


@dataclass(frozen=True)
class RegexAnswer:
    """The whole answer (stripped) must match ``pattern`` (``re.fullmatch`` with DOTALL); a
    named group ``label`` is the answer's label, checked against ``labels`` when they exist."""

    kind: ClassVar[str] = "regex"
    metrics: ClassVar[tuple[str, ...]] = ("match_rate", "label_accuracy")
    json_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["kind", "pattern"], "additionalProperties": False,
        "properties": {"kind": {"const": "regex"}, "pattern": {"type": "string"},
                       "labels": {"anyOf": [_LABEL_LIST, {"type": "null"}]}}}
    pattern: str
    labels: tuple[str, ...] | None = None
    max_tokens: ClassVar[int] = ANSWER_MAX_TOKENS

    def validate(self, where: str, error: type[EdgepackError]) -> None:
        _compile(self.pattern, re.DOTALL, f"{where}: answer.pattern" if where else "--format-regex", error)
        _check_labels(self.labels, where, error)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern, re.DOTALL)

    @property
    def label_from(self) -> str | None:
        return "group 'label'" if "label" in self.regex.groupindex else None

    @property
    def default_primary(self) -> str:
        return "label_accuracy" if self.label_from else "match_rate"

    def check(self, text: str) -> tuple[bool, str | None]:
        m = self.regex.fullmatch(text)
        if m is None:
            return False, None
        return True, m.groupdict().get("label")

    def label(self, text: str | None) -> str | None:
        stated = self.check(text.strip())[1] if text else None
        return fold_label(stated) if stated else None

    def row_problem(self, row: dict[str, Any]) -> str | None:
        return None  # the match rate needs the answer only

    def answerable(self, row: dict[str, Any]) -> bool:
        return True

    def format_check(self) -> dict[str, Any] | None:
        return {"kind": "regex", "pattern": self.pattern, "label_from": self.label_from}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern,
                "labels": None if self.labels is None else list(self.labels)}


@dataclass(frozen=True)
class JsonAnswer:
    """The answer must be JSON valid under ``schema`` (the ``jsonschema`` package, the draft the
    schema's ``$schema`` names, 2020-12 when none; ``format`` is an annotation, as the spec's
    default says). ``fields`` (by default the schema's top-level ``properties``) are scored one
    by one by exact match; ``text_fields`` (by default the properties the schema annotates with
    ``"x-edgepack-score": "chrf"``, free text such as a suggested action) by chrF against the
    reference's value instead, outside the exact-match F1. A top-level string property ``label``
    is the answer's label. ``$ref`` to other
    documents is not fetched: an unresolvable one is a UsageError."""

    kind: ClassVar[str] = "json"
    metrics: ClassVar[tuple[str, ...]] = ("valid_json_rate", "schema_valid_rate", "field_accuracy", "field_f1")
    json_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["kind", "schema"], "additionalProperties": False,
        "properties": {"kind": {"const": "json"}, "schema": {"type": ["object", "boolean"]},
                       "fields": {"type": "array", "items": {"type": "string", "minLength": 1}},
                       "text_fields": {"type": "array", "items": {"type": "string", "minLength": 1}},
                       "file": {"type": ["string", "null"]}, "sha256": {"type": ["string", "null"]},
                       "labels": {"anyOf": [_LABEL_LIST, {"type": "null"}]}}}
    label_from: ClassVar[str] = "property 'label'"
    schema: Any
    fields: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ()
    file: str | None = None
    """The schema file's name (not its folder: moving it keeps data/'s identity)."""
    sha256: str | None = None
    """The schema file's content hash."""
    labels: tuple[str, ...] | None = None
    max_tokens: ClassVar[int] = ANSWER_MAX_TOKENS

    @classmethod
    def from_file(cls, path: Path) -> JsonAnswer:
        """The answer kind of ``--format-schema FILE``, checked before any generation."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--format-schema file not found: {path}")
        raw = path.read_bytes()
        try:
            schema = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"--format-schema {path} is not valid JSON ({getattr(exc, 'msg', None) or str(exc)[:80]})",
                             hint="the file must hold one JSON Schema document") from None
        answer = cls(schema=schema, fields=schema_fields(schema), text_fields=schema_text_fields(schema),
                     file=path.name, sha256=hashlib.sha256(raw).hexdigest())
        answer._validate(f"--format-schema {path}", UsageError)
        return answer

    def validate(self, where: str, error: type[EdgepackError]) -> None:
        self._validate(f"{where}: answer.schema" if where else "the answer schema", error)

    def _validate(self, subject: str, error: type[EdgepackError]) -> None:
        import jsonschema

        if not isinstance(self.schema, (dict, bool)):
            raise error(f"{subject} is not a JSON Schema (an object or a boolean)")
        try:
            self.validator.check_schema(self.schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise error(f"{subject} is not a valid JSON Schema: {' '.join(exc.message.split())[:200]}") from None
        except (ValueError, RecursionError) as exc:  # a pattern Python's re cannot compile, e.g. a{<5000 digits>}
            raise error(f"{subject} is not a usable JSON Schema (it cannot be checked): {' '.join(str(exc).split())[:200]}") from None
        _check_labels(self.labels, subject, error)
        both = sorted(set(self.fields) & set(self.text_fields))
        if both:
            raise error(f"{subject}: {', '.join(both)} listed both in fields (exact match) and in text_fields (chrF)")
        self.check("null")  # a top-level $ref that cannot be resolved fails here, before any generation

    @cached_property
    def validator(self) -> Any:
        import jsonschema

        cls = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
        return cls(self.schema)

    @property
    def default_primary(self) -> str:
        return "field_f1" if self.fields else "schema_valid_rate"

    def parse(self, text: str | None) -> tuple[bool, Any]:
        """(the answer is JSON, its value)."""
        try:
            return True, json.loads(text or "")
        except (ValueError, RecursionError):
            return False, None

    def check(self, text: str) -> tuple[bool, str | None]:
        import referencing.exceptions

        is_json, value = self.parse(text)
        if not is_json:
            return False, None
        try:
            ok = self.validator.is_valid(value)
        except referencing.exceptions.Unresolvable as exc:
            raise UsageError(f"the answer schema ({self.file or 'inline'}): cannot resolve $ref {exc}",
                             hint="inline the referenced schema; remote references are not fetched") from None
        except RecursionError:
            ok = False
        label = value.get("label") if isinstance(value, dict) else None
        return ok, label if isinstance(label, str) else None

    def label(self, text: str | None) -> str | None:
        is_json, value = self.parse(text)
        stated = value.get("label") if is_json and isinstance(value, dict) else None
        return fold_label(stated) if isinstance(stated, str) and stated.strip() else None

    def row_problem(self, row: dict[str, Any]) -> str | None:
        return None  # the valid-JSON and schema-valid rates need the answer only

    def answerable(self, row: dict[str, Any]) -> bool:
        return True

    def format_check(self) -> dict[str, Any] | None:
        return {"kind": "json-schema", "file": self.file, "sha256": self.sha256,
                "draft": self.validator.META_SCHEMA.get("$schema"), "label_from": self.label_from}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": self.schema, "fields": list(self.fields),
                "text_fields": list(self.text_fields), "file": self.file,
                "sha256": self.sha256, "labels": None if self.labels is None else list(self.labels)}


TEXT_SCORE_KEYWORD = "x-edgepack-score"
"""The schema annotation that marks a free-text property (value ``"chrf"``): scored by chrF, not exact match."""


def _properties(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return props if isinstance(props, dict) else {}


def schema_fields(schema: Any) -> tuple[str, ...]:
    """The fields a JSON task scores by exact match by default: the schema's top-level
    ``properties`` except the free-text ones (:func:`schema_text_fields`)."""
    return tuple(k for k in _properties(schema) if k not in schema_text_fields(schema))


def schema_text_fields(schema: Any) -> tuple[str, ...]:
    """The top-level properties annotated ``"x-edgepack-score": "chrf"``: scored by chrF."""
    return tuple(k for k, v in _properties(schema).items()
                 if isinstance(v, dict) and v.get(TEXT_SCORE_KEYWORD) == "chrf")


@dataclass(frozen=True)
class TextAnswer:
    """Free text, scored against the row's reference (or the teacher's answer) by chrF and ROUGE-L."""

    kind: ClassVar[str] = "text"
    metrics: ClassVar[tuple[str, ...]] = ("chrf", "rouge_l")
    json_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "required": ["kind"], "additionalProperties": False,
        "properties": {"kind": {"const": "text"}}}
    label_from: ClassVar[None] = None
    labels: ClassVar[None] = None
    default_primary: ClassVar[str] = "chrf"
    max_tokens: ClassVar[int] = ANSWER_MAX_TOKENS

    def validate(self, where: str, error: type[EdgepackError]) -> None:
        return None

    def check(self, text: str) -> tuple[bool, str | None]:
        return True, None  # no format: any answer fits

    def label(self, text: str | None) -> str | None:
        return None

    def row_problem(self, row: dict[str, Any]) -> str | None:
        if row.get("reference") is None and row.get("response") is None:
            return "has no `reference` and no teacher `response`: a text task has nothing to score it against"
        return None

    def answerable(self, row: dict[str, Any]) -> bool:
        return self.row_problem(row) is None

    def format_check(self) -> dict[str, Any] | None:
        return None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}


# kind name (exactly as in task.json) → its spec class
ANSWER_KINDS: dict[str, type[Any]] = {cls.kind: cls for cls in (LabelsAnswer, RegexAnswer, JsonAnswer, TextAnswer)}
Answer = LabelsAnswer | RegexAnswer | JsonAnswer | TextAnswer
