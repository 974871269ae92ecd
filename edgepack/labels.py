"""How labels are read from answers and compared: one extraction, one fold, one skeleton.

Every stage that compares labels asks this module: ``distill data`` (the rows' label set and
the teacher's holdout labels), the data filters, teacher correction, ``edgepack eval`` and the
gate's holdout pass (through :mod:`edgepack.scoring`). There is no second parser.

* :func:`fold_label` is how two labels compare: NFKC (full-width and styled forms → plain),
  invisible format characters removed, case-folded, surrounding punctuation stripped, and runs
  of spaces, ``/`` and ``-`` read as one ``_`` (``Hydraulic/Pneumatic`` is
  ``hydraulic_pneumatic``). It does not read look-alike letters of other scripts as Latin: an
  answer written with a Cyrillic ``а`` is not the label a reader of the label set would find.
* :func:`label_skeleton` is :func:`fold_label` with look-alikes read as Latin: labels typed by
  people in the data rows that share a skeleton are one label (:func:`unify_labels`).
* :func:`extract_label` reads the label an answer states with a pattern (by default the demo's
  lenient ``Category: <label>``: any case, spacing, markdown bold, text around it), folded.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

# The demo's label line, read leniently: "Category:" in any case, an ASCII or full-width colon,
# markdown bold, then a word that may hold digits, "_", "-" and "/" (folded by fold_label).
DEFAULT_LABEL_PATTERN = r"(?i)category\s*[:：]\s*\**\s*(?P<label>[^\W_][\w\-/]*)"

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
_SEPARATORS = re.compile(r"[\s/\-]+")
_EDGE_PUNCTUATION = ".,;:*"


def _fold(label: str, look_alikes: bool) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKC", label) if unicodedata.category(c) != "Cf")
    if look_alikes:
        text = text.translate(_LOOK_ALIKES)
    text = text.casefold().strip().strip(_EDGE_PUNCTUATION).strip()
    return _SEPARATORS.sub("_", text)


def fold_label(label: str) -> str:
    """How labels compare: NFKC, invisible characters removed, case-folded, edge punctuation
    stripped, runs of spaces/slashes/dashes as one underscore."""
    return _fold(label, look_alikes=False)


def label_skeleton(label: str) -> str:
    """:func:`fold_label` with look-alike letters of other scripts read as Latin: two labels
    with one skeleton look the same to a reader (``therm\u0430l`` and ``thermal``)."""
    return _fold(label, look_alikes=True)


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


def duplicate_labels(labels: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs (earlier, later) of ``labels`` that are one label (the same :func:`label_skeleton`)."""
    seen: dict[str, str] = {}
    pairs = []
    for label in labels:
        key = label_skeleton(label)
        if key in seen:
            pairs.append((seen[key], label))
        else:
            seen[key] = label
    return pairs


def label_group(regex: re.Pattern[str]) -> str | int:
    """The group of ``regex`` that holds the label: the one named ``label``, else group 1 (else
    the whole match, for a pattern without groups)."""
    return "label" if "label" in regex.groupindex else 1 if regex.groups else 0


def extract_label(text: str | None, pattern: str | re.Pattern[str] = DEFAULT_LABEL_PATTERN) -> str | None:
    """The label after the first match of ``pattern`` in ``text`` (see :func:`label_group`),
    folded; None when absent. By default the demo's lenient ``Category: <label>``."""
    if not text:
        return None
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern  # re caches compiled patterns
    match = regex.search(text)
    if match is None or match.group(label_group(regex)) is None:
        return None
    return fold_label(match.group(label_group(regex))) or None
