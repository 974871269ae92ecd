"""The task contract: every answer kind round-trips through task.json, and bad task files are
refused with one line naming the file and every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import DataError, UsageError
from edgepack.task import (ANSWER_KINDS, DEMO_LABELS, DEMO_SYSTEM_PROMPT, DEMO_TASK, TASK_SCHEMA_VERSION, Decoding,
                           JsonAnswer, LabelsAnswer, RegexAnswer, Task, TextAnswer, build_task, load_task, save_task,
                           task_from_json)

SCHEMA = {"type": "object", "required": ["asset", "fault"],
          "properties": {"asset": {"type": "string"}, "fault": {"enum": ["leak", "noise"]},
                         "label": {"type": "string"}}}
EXAMPLES = {
    "labels": Task(answer=LabelsAnswer(labels=("electrical", "thermal")), system_prompt="Triage.",
                   demonstrations=({"role": "user", "content": "Fan hot"},
                                   {"role": "assistant", "content": "Category: thermal\nAction: Cool it."})),
    "regex": Task(answer=RegexAnswer(pattern=r"(?P<label>\w+) -> .+", labels=("a", "b")),
                  decoding=Decoding(max_tokens=20, temperature=0.5, repeat_penalty=1.1, stop=("\n\n",))),
    "json": Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset", "fault"), file="s.json", sha256="0" * 64),
                 primary_metric="schema_valid_rate"),
    "text": Task(answer=TextAnswer(), system_prompt=None),
}


def test_every_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(ANSWER_KINDS)


@pytest.mark.parametrize("kind", sorted(ANSWER_KINDS))
def test_every_kind_round_trips_through_task_json(kind: str, tmp_path: Path) -> None:
    task = EXAMPLES[kind]
    save_task(task, tmp_path / "task.json")
    raw = json.loads((tmp_path / "task.json").read_text())
    assert raw["schema_version"] == TASK_SCHEMA_VERSION and raw["answer"]["kind"] == kind
    loaded = load_task(tmp_path / "task.json")
    assert loaded == task and loaded.sha256() == task.sha256()
    assert loaded.primary_metric in ANSWER_KINDS[kind].metrics


def test_the_hash_follows_the_content() -> None:
    assert EXAMPLES["labels"].sha256() != Task(answer=LabelsAnswer(labels=("electrical", "thermal"))).sha256()
    assert len(DEMO_TASK.sha256()) == 64


def test_the_demo_contract() -> None:
    assert DEMO_TASK.kind == "labels" and set(DEMO_TASK.answer.labels) == set(DEMO_LABELS)
    assert DEMO_TASK.system_prompt == DEMO_SYSTEM_PROMPT and DEMO_TASK.primary_metric == "accuracy"
    assert DEMO_TASK.decoding == Decoding(max_tokens=48, temperature=0.0, repeat_penalty=1.0, stop=())
    assert DEMO_TASK.answer.check("Category: thermal\nAction: Clean the condenser.") == (True, "thermal")
    assert DEMO_TASK.answer.check("Category: thermal\nAction: Clean.")[0] is False  # two words at least
    assert DEMO_TASK.answer.label("**Category:** Thermal, surely") == "thermal"
    assert DEMO_TASK.labels == frozenset(DEMO_LABELS)


def _valid() -> dict:
    return EXAMPLES["labels"].to_json()


def _with(path: str, value: object) -> dict:
    obj = _valid()
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node[p]
    node[last] = value
    return obj


@pytest.mark.parametrize(("obj", "fragments"), [
    (_with("decoding.max_tokens", 0), ["decoding.max_tokens: 0 is less than the minimum of 1"]),
    ({**_valid(), "extra": 1, "primary_metric": 3},
     ["(top level): Additional properties are not allowed ('extra' was unexpected)", "primary_metric: 3 is not"]),
    (_with("answer.kind", "tree"), ["answer.kind: 'tree' is not one of ['labels', 'regex', 'json', 'text']"]),
    (_with("answer.labels", []), ["answer.labels: [] should be non-empty"]),
    (_with("demonstrations", [{"role": "system", "content": "x"}]), ["demonstrations.0.role: 'system' is not one of"]),
    (_with("answer.labels", ["thermal", "Thermal"]), ["the label set has duplicates ('thermal' and 'Thermal'"]),
    (_with("answer.pattern", "(unclosed"), ["answer.pattern does not compile: missing )"]),
    (_with("answer.pattern", "category: \\w+"), ["answer.pattern has no group to read the label from"]),
    (_with("primary_metric", "chrf"), ["primary_metric 'chrf' is not a metric of a labels task (accuracy, macro_f1)"]),
    ({**EXAMPLES["regex"].to_json(), "answer": {"kind": "regex", "pattern": "a**"}},
     ["answer.pattern does not compile: multiple repeat"]),
    ({**EXAMPLES["json"].to_json(), "answer": {"kind": "json", "schema": {"type": 5}}},
     ["answer.schema is not a valid JSON Schema: 5 is not valid"]),
    ({**EXAMPLES["json"].to_json(), "answer": {"kind": "json", "schema": [1]}}, ["answer.schema: [1] is not of type"]),
    ({"schema_version": 2}, ["schema_version 2 is newer than this edgepack reads (1)"]),
])
def test_a_bad_task_file_is_one_line_naming_the_file_and_every_problem(obj: dict, fragments: list[str],
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError) as exc:
        load_task(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and exc.value.exit_code == 2
    for fragment in fragments:
        assert fragment in message
    assert exc.value.hint


def test_an_unreadable_task_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="task file not found"):
        load_task(tmp_path / "task.json")
    (tmp_path / "task.json").write_text("{oops")
    with pytest.raises(DataError, match="task.json: not valid JSON"):
        load_task(tmp_path / "task.json")


def test_json_fields_default_to_the_schemas_properties() -> None:
    obj = {**EXAMPLES["json"].to_json(), "answer": {"kind": "json", "schema": SCHEMA}, "primary_metric": "field_f1"}
    task = task_from_json(obj, "t.json")
    assert task.answer.fields == ("asset", "fault", "label") and task.answer.file is None


def test_build_task_from_the_flags_and_the_data() -> None:
    labels = frozenset({"thermal", "electrical"})
    assert build_task(answer=None, labels=labels, system_prompt=None).answer == LabelsAnswer(
        labels=("electrical", "thermal"))
    assert build_task(answer=None, labels=None, system_prompt="S").kind == "text"
    with_group = build_task(answer=RegexAnswer(pattern=r"(?P<label>\w+)!"), labels=labels, system_prompt=None)
    assert with_group.answer.labels == ("electrical", "thermal") and with_group.primary_metric == "label_accuracy"
    without = build_task(answer=RegexAnswer(pattern=r"\w+!"), labels=labels, system_prompt=None)
    assert without.answer.labels is None and without.primary_metric == "match_rate"
    as_json = build_task(answer=JsonAnswer(schema=SCHEMA, fields=("asset",)), labels=labels, system_prompt=None)
    assert as_json.answer.labels == ("electrical", "thermal") and as_json.decoding.max_tokens == 64
    assert build_task(answer=JsonAnswer(schema={"type": "object"}), labels=None, system_prompt=None
                      ).primary_metric == "schema_valid_rate"  # no fields to score


def test_a_primary_metric_must_be_the_kinds() -> None:
    with pytest.raises(ValueError, match="not a metric of a text task"):
        Task(answer=TextAnswer(), primary_metric="accuracy")


def test_decoding_cuts_at_the_first_stop_string() -> None:
    d = Decoding(stop=("\nAction", "###"))
    assert d.cut("Category: x ### more\nAction: y") == "Category: x "
    assert d.cut("no stop") == "no stop" and Decoding().cut("a\nAction") == "a\nAction"
    assert Decoding().describe() == "greedy, max 48 tokens"
    assert Decoding(temperature=0.7, max_tokens=9).describe() == "temperature 0.7, max 9 tokens"


def test_the_system_prompt_goes_first_unless_the_row_has_its_own() -> None:
    task = Task(answer=TextAnswer(), system_prompt="S")
    user = [{"role": "user", "content": "u"}]
    assert task.prompt_messages(user) == [{"role": "system", "content": "S"}, *user]
    own = [{"role": "system", "content": "own"}, *user]
    assert task.prompt_messages(own) == own and Task(answer=TextAnswer()).prompt_messages(user) == user


def test_regex_and_json_read_the_label_they_state() -> None:
    regex = RegexAnswer(pattern=r"(?P<label>\w+) -> .+")
    assert regex.label("  Thermal -> cool it  ") == "thermal" and regex.label("nope") is None
    assert regex.check("a -> b") == (True, "a") and RegexAnswer(pattern=r"\w+").label_from is None
    as_json = JsonAnswer(schema=SCHEMA)
    assert as_json.label('{"label": "Thermal"}') == "thermal" and as_json.label("[1]") is None
    assert as_json.check('{"asset": "P-1", "fault": "leak"}') == (True, None)
    assert as_json.check('{"asset": "P-1", "fault": "hum"}') == (False, None)


def test_flag_errors_are_usage_errors(tmp_path: Path) -> None:
    from edgepack.task import answer_from_options

    with pytest.raises(UsageError, match="--format-regex does not compile"):
        answer_from_options(regex="(")
    (tmp_path / "s.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}}))
    with pytest.raises(UsageError, match=r"--format-schema .*s\.json is not a valid JSON Schema"):
        answer_from_options(schema=tmp_path / "s.json")


def test_a_schema_pattern_python_cannot_compile_is_a_usage_error(tmp_path: Path) -> None:
    """jsonschema's check raises a bare ValueError for a{<5000 digits>}; it must be one clear line, exit 2."""
    from edgepack.task import answer_from_options

    (tmp_path / "s.json").write_text(json.dumps({"type": "string", "pattern": "a{" + "9" * 5000 + "}"}))
    with pytest.raises(UsageError, match=r"--format-schema .*s\.json is not a usable JSON Schema \(it cannot be checked\)"):
        answer_from_options(schema=tmp_path / "s.json")
