"""Holdout parsing and label accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import DataError
from edgepack.export.gate.quality import load_holdout, parse_label, teacher_accuracy


@pytest.mark.parametrize("text,label", [
    ("Category: mechanical\nAction: check", "mechanical"),
    ("category:Electrical.", "electrical"),
    ("**Category:** hydraulic_pneumatic", "hydraulic_pneumatic"),
    ("The Category: Hydraulic/Pneumatic issue", "hydraulic_pneumatic"),
    ("Category: thermal, then Category: electrical", "thermal"),
    ("no label here", None),
    ("", None),
    (None, None),
])
def test_parse_label(text: str | None, label: str | None) -> None:
    assert parse_label(text) == label


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_holdout_normalises_rows(tmp_path: Path) -> None:
    rows = load_holdout(write(tmp_path / "h.jsonl", [
        {"prompt": "p1", "label": "Mechanical", "response": "Category: mechanical"},
        {"messages": [{"role": "user", "content": "p2"}], "label": None},
        "",
    ]))
    assert rows[0]["messages"] == [{"role": "user", "content": "p1"}] and rows[0]["label"] == "mechanical"
    assert rows[1]["label"] is None and rows[1]["response"] is None


@pytest.mark.parametrize("line,fragment", [("{bad", "not valid JSON"), ("[1]", "JSON object"),
                                           ('{"label": "x"}', "messages")])
def test_bad_holdout_lines_are_named(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path / "h.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(DataError, match=f"h.jsonl:2: .*{fragment}"):
        load_holdout(path)


def test_empty_or_missing_holdout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        load_holdout(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="not found"):
        load_holdout(tmp_path / "missing.jsonl")


def test_teacher_accuracy_counts_only_labelled_rows_with_responses() -> None:
    rows = [{"label": "a", "response": "Category: a"}, {"label": "a", "response": "Category: b"},
            {"label": None, "response": "Category: a"}, {"label": "b", "response": None}]
    assert teacher_accuracy(rows) == (0.5, 2)
    assert teacher_accuracy([{"label": "a", "response": None}]) == (None, 0)
