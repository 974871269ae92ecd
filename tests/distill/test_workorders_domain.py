"""The shipped work-order domain (free-text work order → JSON): schema, balance, no leakage.

The domain is data only (distill/domains/workorders/); these tests hold it to its README:
every reference is a compact JSON answer valid under schema.json, both splits are balanced over
the fault and priority values, and the holdout shares no prompt and no asset with seed or shots.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

import edgepack.distill
from edgepack.distill.contamination import contamination_report, shingles
from edgepack.distill.data import load_prompts

DOMAIN = Path(edgepack.distill.__file__).resolve().parent / "domains" / "workorders"
SPLITS = ("seed", "holdout", "shots")
FIELDS = ("asset", "fault", "priority", "action")
MIN_PER_VALUE_IN_SEED = 5
NEAR_DUPLICATE_JACCARD = 0.3  # well below the holdout contamination check's 0.6


def _rows(split: str) -> list[dict]:
    text = (DOMAIN / f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _answers(split: str) -> list[dict]:
    return [json.loads(r["reference"]) for r in _rows(split)]


def _schema() -> dict:
    return json.loads((DOMAIN / "schema.json").read_text(encoding="utf-8"))


def _enum(field: str) -> list[str]:
    return _schema()["properties"][field]["enum"]


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def test_schema_is_draft_2020_12_strict_and_bounded() -> None:
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert tuple(schema["properties"]) == FIELDS
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop["type"] == "string", name
        assert "enum" in prop or (prop["minLength"] >= 1 and prop["maxLength"] <= 200), name


@pytest.mark.parametrize("bad", [
    {"asset": "P-1", "fault": "rust", "priority": "low", "action": "Paint P-1."},
    {"asset": "P-1", "fault": "leak", "priority": "urgent", "action": "Fix P-1 now."},
    {"asset": "P-1", "fault": "leak", "priority": "low"},
    {"asset": "P-1", "fault": "leak", "priority": "low", "action": "Fix P-1 now.", "note": "x"},
    {"asset": "", "fault": "leak", "priority": "low", "action": "Fix the leak."},
    {"asset": "P-1", "fault": "leak", "priority": "low", "action": "Fix P-1 " + "now " * 40},
])
def test_schema_rejects_answers_outside_the_contract(bad: dict) -> None:
    assert not Draft202012Validator(_schema()).is_valid(bad)


@pytest.mark.parametrize("split", SPLITS)
def test_every_row_loads_and_its_reference_is_a_compact_valid_answer(split: str) -> None:
    assert not load_prompts(DOMAIN / f"{split}.jsonl", strict=True).bad
    validator = Draft202012Validator(_schema())
    for row in _rows(split):
        assert set(row) == {"id", "prompt", "reference"}, row
        answer = json.loads(row["reference"])
        errors = [e.message for e in validator.iter_errors(answer)]
        assert not errors, (row["id"], errors)
        # one compact line, keys in schema order: the form the shots teach and a grammar emits
        assert row["reference"] == json.dumps(answer, ensure_ascii=False, separators=(",", ":")), row["id"]
        assert tuple(answer) == FIELDS, row["id"]
        assert answer["asset"] in row["prompt"], (row["id"], answer["asset"])
        action = answer["action"]
        assert action[0].isupper() and action.endswith(".") and ". " not in action, (row["id"], action)


def test_ids_are_unique_across_files_and_name_their_split() -> None:
    ids = [r["id"] for split in SPLITS for r in _rows(split)]
    assert len(ids) == len(set(ids))
    prefixes = {"seed": "wo-seed-", "holdout": "wo-holdout-", "shots": "wo-shot-"}
    for split, prefix in prefixes.items():
        assert all(r["id"].startswith(prefix) for r in _rows(split)), split


def test_sizes_and_balance() -> None:
    assert 200 <= len(_rows("seed")) <= 250
    assert 55 <= len(_rows("holdout")) <= 70
    assert 6 <= len(_rows("shots")) <= 10
    for field in ("fault", "priority"):
        values = set(_enum(field))
        for split in ("seed", "holdout"):
            counts = Counter(a[field] for a in _answers(split))
            assert max(counts.values()) - min(counts.values()) <= 2, (split, field, counts)
        seed_counts = Counter(a[field] for a in _answers("seed"))
        assert all(seed_counts[v] >= MIN_PER_VALUE_IN_SEED for v in values), seed_counts
    assert {a["fault"] for a in _answers("holdout")} == set(_enum("fault"))
    assert {a["priority"] for a in _answers("holdout")} == set(_enum("priority"))
    assert len({a["priority"] for a in _answers("shots")}) == len(_enum("priority"))


def test_no_prompt_is_shared_between_seed_holdout_and_shots() -> None:
    for exact in (True, False):
        key = (lambda t: t) if exact else _fold
        sets = {split: [key(r["prompt"]) for r in _rows(split)] for split in SPLITS}
        assert all(len(v) == len(set(v)) for v in sets.values())
        for a, b in combinations(SPLITS, 2):
            assert not set(sets[a]) & set(sets[b]), (a, b, exact)


def test_no_near_duplicate_prompts_and_the_holdout_is_clean() -> None:
    def rows(split: str) -> list[dict]:
        return [{"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]}]} for r in _rows(split)]

    assert contamination_report(rows("holdout"), rows("seed") + rows("shots"), [])["status"] == "clean"
    assert contamination_report(rows("shots"), rows("seed"), [])["status"] == "clean"
    grams = [(r["id"], shingles(r["prompt"])) for split in SPLITS for r in _rows(split)]
    for (ida, a), (idb, b) in combinations(grams, 2):
        assert len(a & b) / len(a | b) < NEAR_DUPLICATE_JACCARD, (ida, idb)


def test_holdout_and_shots_use_assets_unseen_in_seed() -> None:
    seen = {_fold(a["asset"]) for a in _answers("seed")}
    for split in ("holdout", "shots"):
        assets = [_fold(a["asset"]) for a in _answers(split)]
        assert len(assets) == len(set(assets)) and not seen & set(assets), split
    assert not {_fold(a["asset"]) for a in _answers("holdout")} & {_fold(a["asset"]) for a in _answers("shots")}


def test_system_prompt_names_every_field_and_allowed_value() -> None:
    system = (DOMAIN / "system.txt").read_text(encoding="utf-8")
    assert "only the JSON object" in system
    for field in FIELDS:
        assert f"{field}:" in system, field
    for field in ("fault", "priority"):
        for value in _enum(field):
            assert re.search(rf"\b{value}\b", system), value
