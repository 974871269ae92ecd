"""Quality filters for teacher answers: why an answer must not become training data.

:func:`drop_reason` returns why a teacher answer is dropped (or ``None`` to keep it); the
reasons are counted in ``data/report.json``. The answer's format is the task's
(:mod:`edgepack.task`): a labelled task (the shipped demo, or any prompts file whose rows
carry ``label``) answers in two lines::

    Category: <label>
    Action: <one sentence>

and the user can replace that check with their own (``--format-regex`` / ``--format-schema``:
the task's ``regex`` / ``json`` answer kinds). A violation counts as ``format`` either way.

*Labels.* A label the answer states is compared with the task's labels by
:func:`edgepack.labels.fold_label` (case, width, separators; not look-alike letters: an answer
written with a Cyrillic ``а`` is not the label eval will read, so it fails the format), the one
comparison eval and the gate use too. The rows' label set itself is unified by
:func:`edgepack.labels.unify_labels` in ``distill data``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from edgepack.labels import fold_label
from edgepack.answers import DEMO_ANSWER_RE
from edgepack.task import DEMO_TASK

if TYPE_CHECKING:
    from edgepack.answers import AnswerKind

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

ANSWER_RE = DEMO_ANSWER_RE  # the labelled task's two-line format (group 1: the label, group 2: the action)

# A word n-gram seen this often in one short answer means the decoder is looping.
REPEAT_NGRAM = 4
REPEAT_COUNT = 3


def format_answer(label: str, action: str) -> str:
    """The canonical answer text for a label and an action sentence."""
    return f"Category: {label}\nAction: {action}"


def is_repetitive(text: str) -> bool:
    """True when a word n-gram or a whole line repeats (a decoding loop)."""
    words = text.split()
    grams = Counter(tuple(words[i:i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1))
    if grams and max(grams.values()) >= REPEAT_COUNT:
        return True
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return bool(lines) and max(Counter(lines).values()) >= REPEAT_COUNT


def drop_reason(text: str, *, finished: bool, label: str | None, labels: frozenset[str] | None,
                answer_format: AnswerKind | None = None) -> str | None:
    """Why this teacher answer is dropped, or ``None`` to keep it.

    ``finished`` is False when generation stopped at the token limit instead of at EOS.
    ``labels`` is the task's label set. ``answer_format`` is the task's answer kind (its
    ``check``); without one the demo format is checked, and only for labelled tasks (``labels``
    not None); a ``text`` task checks no format. A label the answer states must be one of
    ``labels`` (else ``format``) and equal ``label`` (else ``label_mismatch``), compared by
    :func:`~edgepack.labels.fold_label`; a format that states no label is not checked for it.
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
        answer_format = DEMO_TASK.answer
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
