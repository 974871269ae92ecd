"""The shipped demo domain (plant alarm triage): sizes, labels, answer format, no leakage."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from edgepack.distill.data import (DEMO_HOLDOUT, DEMO_LABELS, DEMO_SEED, DEMO_SHOTS, DEMO_SYSTEM_PROMPT,
                                   load_demo_shots, load_prompts)
from edgepack.distill.filters import ANSWER_RE, drop_reason

FILES = {"seed": DEMO_SEED, "holdout": DEMO_HOLDOUT, "shots": DEMO_SHOTS}


def _raw(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_sizes_and_balance() -> None:
    seed, hold = _raw(DEMO_SEED), _raw(DEMO_HOLDOUT)
    assert 200 <= len(seed) <= 300 and len(hold) >= 60
    for rows in (seed, hold):
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(DEMO_LABELS)
        assert max(counts.values()) - min(counts.values()) <= 2, counts
    assert Counter(r["label"] for r in _raw(DEMO_SHOTS)).keys() == set(DEMO_LABELS)


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_row_is_valid_and_its_reference_answers_its_label(name: str) -> None:
    path = FILES[name]
    loaded = load_prompts(path, strict=True)
    assert not loaded.bad
    raw = _raw(path)
    assert len({r["id"] for r in raw}) == len(raw)
    for r in raw:
        assert set(r) == {"id", "prompt", "label", "reference"}
        assert r["label"] in DEMO_LABELS
        m = ANSWER_RE.match(r["reference"])
        assert m and m.group(1) == r["label"], r
        action = m.group(2)
        assert action.endswith(".") and action.count(". ") == 0, r  # one sentence
        assert drop_reason(r["reference"], finished=True, label=r["label"], labels=frozenset(DEMO_LABELS)) is None


def test_no_prompt_is_shared_between_seed_holdout_and_shots() -> None:
    sets = {name: {_norm(r["prompt"]) for r in _raw(path)} for name, path in FILES.items()}
    assert len(sets["seed"]) == len(_raw(DEMO_SEED)) and len(sets["holdout"]) == len(_raw(DEMO_HOLDOUT))
    assert not sets["seed"] & sets["holdout"]
    assert not sets["shots"] & (sets["seed"] | sets["holdout"])


def test_system_prompt_names_every_label_and_the_format() -> None:
    for label in DEMO_LABELS:
        assert f"{label}:" in DEMO_SYSTEM_PROMPT
    assert "Category: <category>\nAction: <one sentence>" in DEMO_SYSTEM_PROMPT
    rows = load_prompts(DEMO_SEED, system=DEMO_SYSTEM_PROMPT).rows
    assert all(r.messages[0] == {"role": "system", "content": DEMO_SYSTEM_PROMPT} for r in rows)


def test_shots_alternate_user_and_assistant() -> None:
    turns = load_demo_shots()
    assert len(turns) == 2 * len(_raw(DEMO_SHOTS))
    assert [t["role"] for t in turns[:4]] == ["user", "assistant", "user", "assistant"]
    assert all(ANSWER_RE.match(t["content"]) for t in turns[1::2])
