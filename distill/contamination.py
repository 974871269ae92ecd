"""Holdout contamination: does the evaluation data leak into what the student trains on?

Two checks, each counting exact and near duplicates:

* **prompts** — every holdout prompt against every training prompt;
* **teacher outputs** — every holdout prompt against every kept teacher answer (a teacher
  that recites a holdout alarm in its answer leaks it).

Text is compared after normalisation (lower case, punctuation dropped, whitespace collapsed)
and only over the user turns: a system prompt every row shares would make everything look
alike. *Exact* means equal normalised text. *Near* means the word n-gram (shingle) sets
overlap: Jaccard similarity ≥ ``threshold`` for prompt pairs, and containment (the share of
the holdout prompt's shingles found in the answer) ≥ ``threshold`` for answers. Candidates
come from an inverted index over shingles, so the cost follows the overlap, not the
product of the two set sizes.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

NGRAM = 3
THRESHOLD = 0.6
MAX_EXAMPLES = 20
_WORD = re.compile(r"[a-z0-9]+(?:[-_.][a-z0-9]+)*")


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, n: int = NGRAM) -> frozenset[tuple[str, ...]]:
    words = normalize(text).split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def user_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


class _Index:
    """Shingle → ids of the texts that contain it."""

    def __init__(self, items: Iterable[tuple[str, str]], n: int) -> None:
        self.shingles: dict[str, frozenset[tuple[str, ...]]] = {}
        self.exact: dict[str, list[str]] = defaultdict(list)
        self.postings: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for key, text in items:
            grams = shingles(text, n)
            self.shingles[key] = grams
            self.exact[normalize(text)].append(key)
            for g in grams:
                self.postings[g].append(key)

    def overlaps(self, grams: frozenset[tuple[str, ...]]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for g in grams:
            counts.update(self.postings.get(g, ()))
        return counts


def _check(holdout: list[tuple[str, str]], others: list[tuple[str, str]], *, containment: bool, n: int,
           threshold: float) -> dict[str, Any]:
    index = _Index(others, n)
    exact = near = 0
    examples: list[dict[str, Any]] = []
    for hid, text in holdout:
        grams = shingles(text, n)
        same = index.exact.get(normalize(text), []) if normalize(text) else []
        best_id, best = None, 0.0
        for oid, shared in index.overlaps(grams).items():
            denom = len(grams) if containment else len(grams | index.shingles[oid])
            score = shared / denom if denom else 0.0
            if score > best:
                best_id, best = oid, score
        if same:
            exact += 1
            kind, other, score = "exact", same[0], 1.0
        elif best >= threshold:
            near += 1
            kind, other, score = "near", best_id, best
        else:
            continue
        if len(examples) < MAX_EXAMPLES:
            examples.append({"holdout": hid, "train": other, "kind": kind, "score": round(score, 3)})
    return {"exact": exact, "near": near, "examples": examples}


def contamination_report(holdout: list[dict[str, Any]], train_prompts: list[dict[str, Any]],
                         kept: list[dict[str, Any]], *, n: int = NGRAM,
                         threshold: float = THRESHOLD) -> dict[str, Any]:
    """Exact and near overlap of the holdout with training prompts and kept teacher answers.

    Each row is ``{"id", "messages"}``; ``kept`` rows also carry the teacher's ``response``.
    ``status`` is ``clean`` when nothing overlaps, else ``contaminated``.
    """
    hold = [(r["id"], user_text(r["messages"])) for r in holdout]
    prompts = _check(hold, [(r["id"], user_text(r["messages"])) for r in train_prompts], containment=False,
                     n=n, threshold=threshold)
    outputs = _check(hold, [(f"{r['id']}#answer", r.get("response") or "") for r in kept], containment=True,
                     n=n, threshold=threshold)
    flagged = prompts["exact"] + prompts["near"] + outputs["exact"] + outputs["near"]
    return {"status": "clean" if flagged == 0 else "contaminated", "holdout_rows": len(hold),
            "ngram": n, "threshold": threshold, "prompts": prompts, "teacher_outputs": outputs,
            "method": "normalised user text; exact = equal text; near = word-n-gram Jaccard (prompts) or "
                      "containment (answers) >= threshold"}
