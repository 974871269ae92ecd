"""Holdout parsing under the task, the task the gate finds, and the teacher's score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import DataError
from edgepack.export.gate.quality import find_task, load_holdout, teacher_accuracy, to_answer
from edgepack.task import DEMO_TASK, JsonAnswer, RegexAnswer, Task, TextAnswer, save_task

TEXT = Task(answer=TextAnswer())


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_holdout_normalises_rows(tmp_path: Path) -> None:
    rows = load_holdout(write(tmp_path / "h.jsonl", [
        {"prompt": "p1", "label": "Mechanical", "response": "Category: mechanical"},
        {"messages": [{"role": "user", "content": "p2"}], "label": None},
        "",
    ]), Task(answer=RegexAnswer(pattern=".+")))  # a regex task scores rows with neither label nor response
    assert rows[0]["messages"] == [{"role": "user", "content": "p1"}] and rows[0]["label"] == "mechanical"
    assert rows[1]["label"] is None and rows[1]["response"] is None and rows[1]["reference"] is None


@pytest.mark.parametrize("line,fragment", [("{bad", "not valid JSON"), ("[1]", "JSON object"),
                                           ('{"label": "x"}', "messages")])
def test_bad_holdout_lines_are_named(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path / "h.jsonl", [{"prompt": "ok", "label": "x"}, line])
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


@pytest.mark.parametrize(("task", "row", "fragment"), [
    (DEMO_TASK, {"prompt": "p2"}, "no `label` and no teacher `response`: a labels task"),
    (DEMO_TASK, {"prompt": "p2", "label": "  "}, "no `label` and no teacher `response`"),
    (TEXT, {"prompt": "p2", "label": "x"}, "no `reference` and no teacher `response`: a text task"),
])
def test_a_row_that_does_not_fit_the_task_is_named(tmp_path: Path, task: Task, row: dict, fragment: str) -> None:
    path = write(tmp_path / "h.jsonl", [{"prompt": "p1", "label": "x", "reference": "r", "response": "t"}, row])
    with pytest.raises(DataError) as exc:
        load_holdout(path, task)
    assert str(exc.value).startswith(f"{path}:2: ") and fragment in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.exit_code == 2 and exc.value.hint


def test_rows_that_fit() -> None:
    assert DEMO_TASK.row_problem({"response": "Category: x"}) is None  # the teacher's label is compared
    assert TEXT.row_problem({"reference": "r"}) is None and TEXT.row_problem({"response": "t"}) is None
    for answer in (RegexAnswer(pattern=".+"), JsonAnswer(schema={"type": "object"})):
        assert Task(answer=answer).row_problem({}) is None  # rates need the answer only


def test_teacher_accuracy_counts_only_labelled_rows_with_responses() -> None:
    rows = [{"label": "a", "response": "Category: a"}, {"label": "a", "response": "Category: b"},
            {"label": None, "response": "Category: a"}, {"label": "b", "response": None}]
    assert teacher_accuracy(rows) == (0.5, 2)
    assert teacher_accuracy([{"label": "a", "response": None}]) == (None, 0)


def test_the_teacher_score_of_a_text_task_is_its_chrf_against_the_references() -> None:
    rows = [{"reference": "Replace the bearing.", "response": "Replace the bearing."},
            {"reference": None, "response": "Check the fuse."}]
    assert teacher_accuracy(rows, TEXT) == (1.0, 2)
    rows[0]["response"] = "Something else entirely."
    score, n = teacher_accuracy(rows, TEXT)
    assert n == 2 and 0.0 < score < 1.0


def test_to_answer_keeps_rows_the_task_can_score() -> None:
    rows = [{"label": "a", "response": None}, {"label": None, "response": "Category: b"},
            {"label": None, "response": "no label"}]
    assert to_answer(rows) == rows[:2]
    assert to_answer(rows, TEXT) == rows[1:]


def test_the_gate_finds_the_runs_task(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "artifacts").mkdir()
    holdout = write(run / "data" / "holdout.jsonl", [{"prompt": "p", "reference": "r"}])
    artifact = run / "artifacts" / "student-Q8_0.gguf"
    elsewhere = write(tmp_path / "h.jsonl", [{"prompt": "p", "reference": "r"}])
    assert find_task(artifact, holdout)[0] is DEMO_TASK  # no task.json: the demo's contract, and it says so
    assert "demo contract" in find_task(artifact, holdout)[1]
    save_task(TEXT, run / "task.json")
    for art, hold in ((artifact, holdout), (artifact, elsewhere), (tmp_path / "x.gguf", holdout)):
        task, source = find_task(art, hold)
        assert task == TEXT and source == str((run / "task.json").resolve())
    assert find_task(tmp_path / "x.gguf", elsewhere)[0] is DEMO_TASK
