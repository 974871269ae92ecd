"""Quality filters for teacher answers, and the answer format of labelled tasks.

A labelled task (the shipped demo, or any prompts file whose rows carry ``label``) answers
in two lines::

    Category: <label>
    Action: <one sentence>

:func:`drop_reason` returns why a teacher answer must not become training data (or
``None`` to keep it); the reasons are counted in ``data/report.json``.
:func:`parse_category` is the lenient reader used for accuracy (evaluation, gate).
"""

from __future__ import annotations

import re
from collections import Counter

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


def drop_reason(text: str, *, finished: bool, label: str | None, labels: frozenset[str] | None) -> str | None:
    """Why this teacher answer is dropped, or ``None`` to keep it.

    ``finished`` is False when generation stopped at the token limit instead of at EOS.
    ``labels`` is the task's label set (``None`` for free-form tasks: no format check).
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
    if labels is None:
        return None
    m = ANSWER_RE.match(stripped)
    if m is None or m.group(1) not in labels or len(m.group(2).split()) < 2:
        return "format"
    if label is not None and m.group(1) != label:
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
