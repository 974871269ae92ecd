"""edgepack/labels.py: one extraction, one fold and one skeleton for every stage that compares labels."""

from __future__ import annotations

import pytest

from edgepack.labels import duplicate_labels, extract_label, fold_label, label_skeleton, unify_labels

GOOD = "Category: electrical\nAction: Check the motor supply fuses."


# The cases of both lenient parsers this one replaces (distill/filters.py parse_category and
# export/gate/quality.py parse_label): where they disagreed, the gate's reading wins (a label
# with a slash, a digit or a full-width colon is read whole).
@pytest.mark.parametrize(("text", "expected"), [
    (GOOD, "electrical"),
    ("**Category:** Mechanical\nAction: x", "mechanical"),
    ("I think category : network because", "network"),
    ("Category: hydraulic_pneumatic\nAction: Fix the hose.", "hydraulic_pneumatic"),
    ("Category: mechanical\nAction: check", "mechanical"),
    ("category:Electrical.", "electrical"),
    ("**Category:** hydraulic_pneumatic", "hydraulic_pneumatic"),
    ("The Category: Hydraulic/Pneumatic issue", "hydraulic_pneumatic"),
    ("Category: hydraulic-pneumatic", "hydraulic_pneumatic"),
    ("Category: thermal, then Category: electrical", "thermal"),
    ("Category\uff1a Zone1", "zone1"),
    ("Category: \uff34\uff48\uff45\uff52\uff4d\uff41\uff4c", "thermal"),
    ("No label here", None),
    ("Category: ", None),
    ("", None),
    (None, None),
])
def test_extract_label(text, expected) -> None:
    assert extract_label(text) == expected


def test_extract_label_with_a_users_pattern() -> None:
    assert extract_label("verdict=Thermal!", r"verdict=(\w+)") == "thermal"
    assert extract_label("verdict=Thermal!", r"verdict=(?P<x>\w)(?P<label>\w+)") == "hermal"
    assert extract_label("nothing", r"verdict=(\w+)") is None


def test_fold_reads_separators_and_edge_punctuation_as_one_label() -> None:
    assert fold_label(" Hydraulic / Pneumatic. ") == fold_label("hydraulic-pneumatic") == "hydraulic_pneumatic"
    assert fold_label("**Thermal**") == "thermal"
    assert fold_label("zone 1") != fold_label("zone1")


def test_duplicate_labels_are_the_ones_that_read_the_same() -> None:
    assert duplicate_labels(["thermal", "network", "Thermal", "therm\u0430l"]) == [("thermal", "Thermal"),
                                                                                  ("thermal", "therm\u0430l")]
    assert duplicate_labels(["zone1", "zonel", "network"]) == []


CYRILLIC_A = "therm\u0430l"  # Cyrillic а
SPELLINGS = ["thermal", "Thermal", "THERMAL", "tHeRmAl", CYRILLIC_A, "\uff54\uff48\uff45\uff52\uff4d\uff41\uff4c"]


@pytest.mark.parametrize("spelling", SPELLINGS + ["ther\u200bmal", " thermal ", "THERM\u0391L", "\u0442hermal".upper()])
def test_spellings_of_one_label_share_a_skeleton(spelling: str) -> None:
    assert label_skeleton(spelling) == "thermal"


@pytest.mark.parametrize(("a", "b"), [("thermal", "termal"), ("zone1", "zonel"), ("network", "networks"),
                                      ("\u0441\u0435\u0442\u044c", "network")])
def test_different_labels_stay_different(a: str, b: str) -> None:
    assert label_skeleton(a) != label_skeleton(b)


def test_fold_is_case_and_width_but_not_script() -> None:
    assert fold_label("THERMAL") == fold_label("\uff34hermal") == "thermal"
    assert fold_label(CYRILLIC_A) != "thermal"  # look-alikes are grouped by the skeleton, not folded away


def test_unify_labels_picks_one_plain_spelling_and_reports_the_others() -> None:
    rows = ["thermal", CYRILLIC_A, CYRILLIC_A, CYRILLIC_A, "Thermal", "network", "Network", "NETWORK", "mechanical"]
    canonical, merged = unify_labels(rows)
    assert {canonical[s] for s in rows[:5]} == {"thermal"}  # the plain spelling wins over commoner look-alikes
    assert {canonical[s] for s in rows[5:8]} == {"network"} and canonical["mechanical"] == "mechanical"
    assert merged == {"thermal": {CYRILLIC_A: 3, "Thermal": 1}, "network": {"Network": 1, "NETWORK": 1}}


def test_unify_labels_keeps_a_label_of_another_script() -> None:
    canonical, merged = unify_labels(["\u0441\u0435\u0442\u044c", "\u0421\u0435\u0442\u044c", "network"])
    assert canonical == {"\u0441\u0435\u0442\u044c": "\u0441\u0435\u0442\u044c",
                         "\u0421\u0435\u0442\u044c": "\u0441\u0435\u0442\u044c", "network": "network"}
    assert merged == {"\u0441\u0435\u0442\u044c": {"\u0421\u0435\u0442\u044c": 1}}
