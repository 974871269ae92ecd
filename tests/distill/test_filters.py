"""Answer filters and the lenient category parser, as tables."""

from __future__ import annotations

import pytest

from edgepack.distill.filters import drop_reason, format_answer, is_near_duplicate, is_repetitive, parse_category

LABELS = frozenset({"electrical", "mechanical", "network"})
GOOD = "Category: electrical\nAction: Check the motor supply fuses."

CASES = [
    # (text, finished, label, labels, expected reason)
    (GOOD, True, "electrical", LABELS, None),
    ("  " + GOOD + "\n", True, "electrical", LABELS, None),
    (GOOD, True, None, LABELS, None),
    ("", True, "electrical", LABELS, "empty"),
    ("   \n ", True, None, None, "empty"),
    (GOOD, False, "electrical", LABELS, "truncated"),
    ("Check the pump. Check the pump. Check the pump. Check the pump.", True, None, None, "repetition"),
    ("Category: electrical\nAction: Check it.\nAction: Check it.\nAction: Check it.", True, "electrical", LABELS,
     "repetition"),
    ("The pump is broken.", True, "electrical", LABELS, "format"),
    ("Category: water\nAction: Check the water supply.", True, "electrical", LABELS, "format"),
    ("category: electrical\naction: Check the fuses.", True, "electrical", LABELS, "format"),
    ("Category: electrical\nAction: Check.", True, "electrical", LABELS, "format"),
    ("Category: electrical\nAction: Check the fuses.\nThen call the supervisor.", True, "electrical", LABELS, "format"),
    ("Category: mechanical\nAction: Replace the bearing.", True, "electrical", LABELS, "label_mismatch"),
    ("The pump is broken.", True, None, None, None),  # free-form task: no format check
    ("I'm sorry, but I can't help with plant equipment.", True, None, None, "refusal"),
    ("As an AI language model I cannot inspect pumps.", True, "electrical", LABELS, "refusal"),
    ("I cannot assist with that request.", True, None, None, "refusal"),
    ("Category: electrical\nAction: I cannot say; check the fuses.", True, "electrical", LABELS, None),
]


@pytest.mark.parametrize(("text", "finished", "label", "labels", "expected"), CASES)
def test_drop_reason(text: str, finished: bool, label, labels, expected) -> None:
    assert drop_reason(text, finished=finished, label=label, labels=labels) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD, "electrical"),
    ("**Category:** Mechanical\nAction: x", "mechanical"),
    ("I think category : network because", "network"),
    ("Category: hydraulic_pneumatic\nAction: Fix the hose.", "hydraulic_pneumatic"),
    ("No label here", None),
    ("", None),
    (None, None),
])
def test_parse_category(text, expected) -> None:
    assert parse_category(text) == expected


def test_format_answer_round_trips() -> None:
    text = format_answer("network", "Replace the patch cable.")
    assert drop_reason(text, finished=True, label="network", labels=LABELS) is None
    assert parse_category(text) == "network"


def test_short_answers_are_not_repetitive() -> None:
    assert not is_repetitive(GOOD)
    assert not is_repetitive("Check the pump and check the motor.")


@pytest.mark.parametrize(("text", "kept", "dup"), [
    (GOOD, [GOOD], True),
    ("category: ELECTRICAL\nAction: check the motor supply fuses!", [GOOD], True),   # same after normalising
    ("Category: electrical\nAction: Check the motor supply fuses now.", [GOOD], True),  # near (Jaccard 6/7)
    ("Category: electrical\nAction: Replace the contactor of the feed pump.", [GOOD], False),
    (GOOD, [], False),
])
def test_near_duplicates_of_kept_answers(text: str, kept: list[str], dup: bool) -> None:
    assert is_near_duplicate(text, kept) is dup
