"""Quality filters for teacher answers, and the answer format of labelled tasks.

A labelled task (the shipped demo, or any prompts file whose rows carry ``label``) answers
in two lines::

    Category: <label>
    Action: <one sentence>

The user can replace that format check with their own (``--format-regex`` /
``--format-schema``): an :class:`AnswerFormat` from :data:`ANSWER_FORMATS`, built by
:func:`answer_format_from_options`. A violation counts as ``format`` either way.

:func:`drop_reason` returns why a teacher answer must not become training data (or
``None`` to keep it); the reasons are counted in ``data/report.json``.
:func:`parse_category` is the lenient reader used for accuracy (evaluation, gate).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgepack.errors import UsageError

# Checked in this order; the first that applies is the one counted. ``duplicate`` (an answer
# equal or nearly equal to one already kept for the same prompt, see is_near_duplicate) is
# decided by the caller, which sees every sample of a prompt.
DROP_REASONS = ("empty", "truncated", "refusal", "repetition", "format", "label_mismatch", "duplicate")

REFUSAL_RE = re.compile(
    r"\b(i\s+(?:can(?:no|')t|am\s+(?:not\s+able|unable)|won't)\s+(?:help|assist|answer|provide|do)|"
    r"i'm\s+(?:sorry|unable|not\s+able)|as\s+an\s+ai\b|i\s+apologi[sz]e)", re.IGNORECASE)
NEAR_DUPLICATE = 0.8
"""Word-trigram Jaccard similarity at or above which two answers to one prompt are duplicates."""

ANSWER_RE = re.compile(r"\ACategory: ([A-Za-z_]+)\nAction: (\S[^\n]*)\Z")
_CATEGORY_RE = re.compile(r"category\s*:\s*\**\s*([A-Za-z_]+)", re.IGNORECASE)

# A word n-gram seen this often in one short answer means the decoder is looping.
REPEAT_NGRAM = 4
REPEAT_COUNT = 3


def format_answer(label: str, action: str) -> str:
    """The canonical answer text for a label and an action sentence."""
    return f"Category: {label}\nAction: {action}"


def parse_category(text: str | None) -> str | None:
    """The first ``Category: <word>`` in ``text``, lower-cased; ``None`` when absent.

    Lenient on purpose (case, spacing, markdown bold, text around it): accuracy should
    measure the label, while :func:`drop_reason` enforces the exact format for training.
    """
    if not text:
        return None
    m = _CATEGORY_RE.search(text)
    return m.group(1).lower() if m else None


def is_repetitive(text: str) -> bool:
    """True when a word n-gram or a whole line repeats (a decoding loop)."""
    words = text.split()
    grams = Counter(tuple(words[i:i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1))
    if grams and max(grams.values()) >= REPEAT_COUNT:
        return True
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return bool(lines) and max(Counter(lines).values()) >= REPEAT_COUNT


# --- answer formats ----------------------------------------------------------------------

class AnswerFormat(Protocol):
    """A check of the whole (stripped) answer; ``kind`` names it in the data report."""

    kind: str
    label_from: str | None
    """Where the answer states its label (None: it does not, so labels cannot be checked)."""

    def check(self, text: str) -> tuple[bool, str | None]:
        """(the answer has the format, the label it states or None)."""
        ...

    def describe(self) -> dict[str, Any]:
        """``format_check`` in data/report.json, and part of data/'s identity."""
        ...


class DemoFormat:
    """``Category: <label>`` then ``Action: <at least two words>`` (the shipped demo's format).

    Applied only to labelled tasks (a free-form prompts file gets no format check).
    """

    kind = "demo"
    label_from = "the Category line"

    def check(self, text: str) -> tuple[bool, str | None]:
        m = ANSWER_RE.match(text)
        if m is None or len(m.group(2).split()) < 2:
            return False, None
        return True, m.group(1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "label_from": self.label_from}


class RegexFormat:
    """The whole answer (leading and trailing whitespace stripped, as it is stored) must match
    ``pattern`` (``re.fullmatch`` with DOTALL). A named group ``label`` is the answer's label,
    checked against the task's labels and the row's label when they exist."""

    kind = "regex"

    def __init__(self, pattern: str) -> None:
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except (re.error, RecursionError, OverflowError) as exc:
            raise UsageError(f"--format-regex does not compile: {' '.join(str(exc).split())}",
                             hint="give a Python regular expression that the whole answer must match") from None
        self.pattern = pattern
        self.label_from = "group 'label'" if "label" in self.regex.groupindex else None

    def check(self, text: str) -> tuple[bool, str | None]:
        m = self.regex.fullmatch(text)
        if m is None:
            return False, None
        return True, m.groupdict().get("label")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "pattern": self.pattern, "label_from": self.label_from}


class JsonSchemaFormat:
    """The answer must be JSON and valid under a JSON Schema (the ``jsonschema`` package, the
    draft the schema's ``$schema`` names, 2020-12 when none; ``format`` is an annotation, as
    the spec's default says). A top-level string property ``label`` is the answer's label.
    ``$ref`` to other documents is not fetched: an unresolvable one is a UsageError."""

    kind = "json-schema"
    label_from = "property 'label'"

    def __init__(self, path: Path) -> None:
        import jsonschema

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--format-schema file not found: {path}")
        try:
            raw = path.read_bytes()
            self.schema = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"--format-schema {path} is not valid JSON "
                             f"({getattr(exc, 'msg', None) or str(exc)[:80]})",
                             hint="the file must hold one JSON Schema document") from None
        if not isinstance(self.schema, (dict, bool)):
            raise UsageError(f"--format-schema {path} is not a JSON Schema (an object or a boolean)")
        cls = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(self.schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise UsageError(f"--format-schema {path} is not a valid JSON Schema: {' '.join(exc.message.split())[:200]}"
                             ) from None
        self.validator = cls(self.schema)
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.check("null")  # a top-level $ref that cannot be resolved fails here, before any generation

    def check(self, text: str) -> tuple[bool, str | None]:
        import referencing.exceptions

        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False, None
        try:
            ok = self.validator.is_valid(value)
        except referencing.exceptions.Unresolvable as exc:
            raise UsageError(f"--format-schema {self.path}: cannot resolve $ref {exc}",
                             hint="inline the referenced schema; remote references are not fetched") from None
        except RecursionError:
            ok = False
        label = value.get("label") if isinstance(value, dict) else None
        return ok, label if isinstance(label, str) else None

    def describe(self) -> dict[str, Any]:
        # The file's name and content hash (not its folder): moving the schema keeps data/'s identity.
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256,
                "draft": self.validator.META_SCHEMA.get("$schema"), "label_from": self.label_from}


# kind → constructor from the option's value (the report's ``format_check.kind``).
ANSWER_FORMATS: dict[str, Callable[..., AnswerFormat]] = {
    "demo": DemoFormat,
    "regex": RegexFormat,
    "json-schema": JsonSchemaFormat,
}
DEMO_FORMAT = DemoFormat()


def answer_format_from_options(regex: str | None = None, schema: Path | None = None) -> AnswerFormat | None:
    """The user's format check (``--format-regex`` or ``--format-schema``), or None for the demo's."""
    if regex is not None and schema is not None:
        raise UsageError("give --format-regex or --format-schema, not both")
    if regex is not None:
        return ANSWER_FORMATS["regex"](regex)
    if schema is not None:
        return ANSWER_FORMATS["json-schema"](schema)
    return None


def drop_reason(text: str, *, finished: bool, label: str | None, labels: frozenset[str] | None,
                answer_format: AnswerFormat | None = None) -> str | None:
    """Why this teacher answer is dropped, or ``None`` to keep it.

    ``finished`` is False when generation stopped at the token limit instead of at EOS.
    ``labels`` is the task's label set. ``answer_format`` is the user's format check; without
    one the demo format is checked, and only for labelled tasks (``labels`` not None). A label
    the answer states must be one of ``labels`` (else ``format``) and equal ``label`` (else
    ``label_mismatch``); a user format that states no label is not checked for it.
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    if not finished:
        return "truncated"
    if REFUSAL_RE.search(stripped):
        return "refusal"
    if is_repetitive(stripped):
        return "repetition"
    if answer_format is None:
        if labels is None:
            return None
        answer_format = DEMO_FORMAT
    ok, stated = answer_format.check(stripped)
    if not ok or (stated is not None and labels is not None and stated not in labels):
        return "format"
    if label is not None and stated is not None and stated != label:
        return "label_mismatch"
    return None


def is_near_duplicate(text: str, kept: list[str], threshold: float = NEAR_DUPLICATE) -> bool:
    """True when ``text`` equals (normalised) or nearly equals one of the ``kept`` answers."""
    from edgepack.distill.contamination import normalize, shingles

    norm, grams = normalize(text), shingles(text)
    for other in kept:
        if normalize(other) == norm:
            return True
        other_grams = shingles(other)
        union = grams | other_grams
        if union and len(grams & other_grams) / len(union) >= threshold:
            return True
    return False
