"""Answer filters (drop reasons) under each answer format of the task, as tables."""

from __future__ import annotations

import pytest

from edgepack.distill.filters import drop_reason, format_answer, is_near_duplicate, is_repetitive
from edgepack.labels import extract_label
from edgepack.task import JsonAnswer, RegexAnswer, answer_from_options

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


def test_format_answer_round_trips() -> None:
    text = format_answer("network", "Replace the patch cable.")
    assert drop_reason(text, finished=True, label="network", labels=LABELS) is None
    assert extract_label(text) == "network"


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


# -- user answer formats (--format-regex / --format-schema) ------------------------------------

REGEX = r"(?P<label>[a-z_]+) -> .+\."
SCHEMA = {"type": "object", "required": ["label", "action"], "additionalProperties": False,
          "properties": {"label": {"type": "string"}, "action": {"type": "string", "minLength": 5}}}


@pytest.fixture()
def schema_file(tmp_path):
    import json

    path = tmp_path / "answer.schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


FORMAT_CASES = [
    # (kind, text, label, labels, expected reason)
    ("regex", "electrical -> Check the fuses.", "electrical", LABELS, None),
    ("regex", "electrical -> Check the fuses.\nThen call the supervisor.", "electrical", LABELS, None),  # DOTALL
    ("regex", "Label: electrical -> Check the fuses.", "electrical", LABELS, "format"),  # the whole answer
    ("regex", "electrical -> Check the fuses", "electrical", LABELS, "format"),
    ("regex", "mechanical -> Replace the bearing.", "electrical", LABELS, "label_mismatch"),
    ("regex", "water -> Check the supply.", None, LABELS, "format"),  # a label outside the task's set
    ("regex", "water -> Check the supply.", None, None, None),        # no label set: any label
    ("regex", GOOD, "electrical", LABELS, "format"),                  # replaces the demo format
    ("regex", "", "electrical", LABELS, "empty"),                     # earlier reasons still first
    ("json", '{"label": "electrical", "action": "Check the fuses."}', "electrical", LABELS, None),
    ("json", ' {"action": "Check the fuses.", "label": "network"} ', "network", LABELS, None),
    ("json", '{"label": "electrical", "action": "Chk"}', "electrical", LABELS, "format"),
    ("json", '{"label": "electrical"}', "electrical", LABELS, "format"),
    ("json", '{"label": "electrical", "action": "Check.", "x": 1}', "electrical", LABELS, "format"),
    ("json", '{"label": "electrical", "action": "Check the fuses."', "electrical", LABELS, "format"),
    ("json", GOOD, "electrical", LABELS, "format"),
    ("json", '{"label": "mechanical", "action": "Replace it."}', "electrical", LABELS, "label_mismatch"),
    ("json", '{"label": "water", "action": "Check the supply."}', None, LABELS, "format"),
]


@pytest.mark.parametrize(("kind", "text", "label", "labels", "expected"), FORMAT_CASES)
def test_user_formats(kind: str, text: str, label, labels, expected, schema_file) -> None:
    fmt = answer_from_options(regex=REGEX) if kind == "regex" else answer_from_options(schema=schema_file)
    assert fmt.kind == kind and fmt.format_check()["kind"] == {"regex": "regex", "json": "json-schema"}[kind]
    assert drop_reason(text, finished=True, label=label, labels=labels, answer_format=fmt) == expected


def test_a_user_format_without_a_label_checks_no_label() -> None:
    fmt = RegexAnswer(pattern=r"[A-Z][^\n]+\.")
    assert fmt.label_from is None and fmt.format_check() == {"kind": "regex", "pattern": r"[A-Z][^\n]+\.",
                                                            "label_from": None}
    assert drop_reason("Check the fuses.", finished=True, label="electrical", labels=LABELS,
                       answer_format=fmt) is None
    assert drop_reason("check the fuses.", finished=True, label="electrical", labels=LABELS,
                       answer_format=fmt) == "format"
    # A free-form task (no labels) still gets the user's format check.
    assert drop_reason("no capital.", finished=True, label=None, labels=None, answer_format=fmt) == "format"


def test_schema_identity_is_its_content_hash(schema_file, tmp_path) -> None:
    import hashlib
    import json

    described = JsonAnswer.from_file(schema_file).format_check()
    assert described["sha256"] == hashlib.sha256(schema_file.read_bytes()).hexdigest()
    assert described["draft"] == "https://json-schema.org/draft/2020-12/schema"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SCHEMA, "$schema": "http://json-schema.org/draft-07/schema#",
                                 "required": ["label"]}))
    assert JsonAnswer.from_file(other).format_check()["sha256"] != described["sha256"]
    assert JsonAnswer.from_file(other).format_check()["draft"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize(("regex", "schema", "message"), [
    ("(unclosed", None, "--format-regex does not compile: missing ), unterminated subpattern at position 0"),
    ("a**", None, "--format-regex does not compile: multiple repeat"),
    (None, "{not json", "is not valid JSON"),
    (None, "[1, 2]", "is not a JSON Schema"),
    (None, '{"type": 5}', "is not a valid JSON Schema: 5 is not valid"),
    (None, "missing", "--format-schema file not found"),
    ("x", "{}", "not both"),
])
def test_bad_format_options_are_usage_errors(regex, schema, message: str, tmp_path) -> None:
    from edgepack.errors import UsageError

    path = None
    if schema is not None:
        path = tmp_path / "s.json"
        if schema != "missing":
            path.write_text(schema)
    with pytest.raises(UsageError) as exc:
        answer_from_options(regex=regex, schema=path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_remote_ref_is_not_fetched(tmp_path) -> None:
    import json

    from edgepack.errors import UsageError

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"$ref": "https://example.invalid/answer.json"}))
    with pytest.raises(UsageError, match="cannot resolve \\$ref"):
        JsonAnswer.from_file(path)  # found before any generation
    # One reached only by some answers is found when an answer reaches it.
    path.write_text(json.dumps({"properties": {"detail": {"$ref": "https://example.invalid/detail.json"}}}))
    fmt = JsonAnswer.from_file(path)
    assert fmt.check('{"label": "x"}') == (True, "x")
    with pytest.raises(UsageError, match="cannot resolve \\$ref"):
        fmt.check('{"label": "x", "detail": 1}')


# --- labels the answer states (issue #20) ---------------------------------------------------------

CYRILLIC_A = "therm\u0430l"  # Cyrillic а


def test_a_stated_label_is_compared_case_blind_but_not_look_alike_blind() -> None:
    answer = "Category: Thermal\nAction: Check the cooling fan."
    assert drop_reason(answer, finished=True, label="thermal", labels=frozenset({"thermal", "network"})) is None
    look_alike = f"Category: {CYRILLIC_A}\nAction: Check the cooling fan."
    fmt = RegexAnswer(pattern=r"Category: (?P<label>\w+)\nAction: .+")
    assert drop_reason(look_alike, finished=True, label="thermal", labels=frozenset({"thermal"}),
                       answer_format=fmt) == "format"
