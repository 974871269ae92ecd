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

*Label spellings.* Labels come from the data rows, typed by people: ``Thermal``, ``THERMAL``, a
full-width ``ｔｈｅｒｍａｌ`` or one with a Cyrillic ``а`` read as one label. :func:`unify_labels`
groups the spellings that read the same (:func:`label_skeleton`) and gives each group one
label (:func:`fold_label` of its plainest spelling); ``distill data`` relabels the rows, lists
the merged spellings in its report and warns. A label the *answer* states is compared with
:func:`fold_label` only (case and width, not look-alikes): an answer written with a Cyrillic
``а`` is not the label eval will read, so it fails the format. export/gate/quality.py has its own
label normaliser for the gate (issue #15 will make one scorer of the two).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from edgepack.errors import UsageError

# Checked in this order; the first that applies is the one counted. ``duplicate`` (an answer
# equal or nearly equal to one already kept for the same prompt, see is_near_duplicate) is
# decided by the caller, which sees every sample of a prompt.
# ``invalid_answer`` (an endpoint answer whose logprobs or text are not valid, see
# endpoint.is_invalid_answer) is decided by the caller too, after the text checks.
DROP_REASONS = ("empty", "truncated", "refusal", "repetition", "format", "label_mismatch", "invalid_answer",
                "duplicate")

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


# --- label spellings ------------------------------------------------------------------------

# Letters of other scripts that read as a Latin letter, mapped to it: the single-letter
# Cyrillic, Greek and Latin-extension entries of Unicode's confusables.txt (UTS #39) whose
# target is one ASCII letter. A small explicit table rather than a dependency: no confusables
# library is installed here, and the full table also maps sequences ("rn" → "m") and digits
# ("0" → "O") that would merge labels people mean to differ ("zone1", "zonel").
_LOOK_ALIKES = str.maketrans({
    # Cyrillic
    "А": "A", "а": "a", "В": "B", "Е": "E", "е": "e", "К": "K", "М": "M", "Н": "H", "О": "O", "о": "o",
    "Р": "P", "р": "p", "С": "C", "с": "c", "Т": "T", "Х": "X", "х": "x", "У": "Y", "у": "y", "Ү": "Y",
    "ү": "y", "Ѕ": "S", "ѕ": "s", "І": "I", "і": "i", "Ј": "J", "ј": "j", "Ԛ": "Q", "ԛ": "q", "Ԝ": "W",
    "ԝ": "w", "һ": "h", "ԁ": "d", "Ӏ": "l", "ӏ": "l",
    # Greek
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "α": "a", "ι": "i", "ν": "v", "ο": "o", "ρ": "p", "υ": "u",
    "γ": "y",
    # Latin letters that read as plainer ones
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g",
})


def _visible_nfkc(label: str) -> str:
    """NFKC (full-width and styled forms → plain), without invisible format characters (ZWSP, soft hyphen…)."""
    return "".join(c for c in unicodedata.normalize("NFKC", label) if unicodedata.category(c) != "Cf")


def fold_label(label: str) -> str:
    """How labels compare: NFKC, invisible characters removed, case-folded, stripped."""
    return _visible_nfkc(label).casefold().strip()


def label_skeleton(label: str) -> str:
    """:func:`fold_label` with look-alike letters of other scripts read as Latin: two labels
    with one skeleton look the same to a reader (``therm\u0430l`` and ``thermal``)."""
    return _visible_nfkc(label).translate(_LOOK_ALIKES).casefold().strip()


def unify_labels(labels: Iterable[str]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """One label per group of spellings that read the same.

    ``labels`` holds one entry per row. Returns (spelling → its label, and per label the other
    spellings merged into it with their row counts; labels spelled one way only are absent).
    A group's label is the :func:`fold_label` of its plainest spelling: one without look-alike
    letters if there is one, then the one on most rows, then the first seen.
    """
    counts = Counter(labels)  # insertion order = first seen
    groups: dict[str, list[str]] = {}
    for spelling in counts:
        groups.setdefault(label_skeleton(spelling), []).append(spelling)
    canonical: dict[str, str] = {}
    merged: dict[str, dict[str, int]] = {}
    for spellings in groups.values():
        best = min(spellings, key=lambda s: (fold_label(s) != label_skeleton(s), -counts[s], spellings.index(s)))
        label = fold_label(best)
        for s in spellings:
            canonical[s] = label
        others = {s: counts[s] for s in spellings if s != label}
        if others:
            merged[label] = others
    return canonical, merged


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
    ``label_mismatch``), compared by :func:`fold_label`; a user format that states no label is
    not checked for it.
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
    said = fold_label(stated) if stated is not None else None
    if not ok or (said is not None and labels is not None and said not in {fold_label(x) for x in labels}):
        return "format"
    if label is not None and said is not None and said != fold_label(label):
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
