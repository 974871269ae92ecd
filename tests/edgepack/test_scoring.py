"""The one scorer, per answer kind, on answers whose scores can be worked out by hand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgepack.scoring import SCORERS, format_rate, label_scores, score_answers, teacher_agreement
from edgepack.task import ANSWER_KINDS, DEMO_TASK, JsonAnswer, LabelsAnswer, RegexAnswer, Task, TextAnswer

SCHEMA = {"type": "object", "required": ["asset", "fault"], "additionalProperties": False,
          "properties": {"asset": {"type": "string"}, "fault": {"enum": ["leak", "noise"]}}}
TASKS = {
    "labels": Task(answer=LabelsAnswer(labels=("a", "b", "c"))),
    "regex": Task(answer=RegexAnswer(pattern=r"(?P<label>\w+) -> .+")),
    "json": Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset", "fault"))),
    "text": Task(answer=TextAnswer()),
}


def test_every_kind_has_a_scorer_and_it_returns_the_kinds_metrics() -> None:
    assert set(SCORERS) == set(ANSWER_KINDS) == set(TASKS)
    rows = [{"label": "a", "reference": '{"asset": "x", "fault": "leak"}', "response": "Category: a"}]
    for kind, task in TASKS.items():
        scores = score_answers(task, ["Category: a"], rows)
        assert set(ANSWER_KINDS[kind].metrics) <= set(scores), kind
        assert scores["kind"] == kind and scores["primary"] == scores[task.primary_metric]
        assert all(scores[m] is None or 0.0 <= scores[m] <= 1.0 for m in ANSWER_KINDS[kind].metrics)


def test_labels_accuracy_macro_f1_and_confusion() -> None:
    rows = [{"label": "a"}, {"label": "a"}, {"label": "b"}, {"label": "c"}, {"label": None}]
    answers = ["Category: a", "Category: b", "Category: B.", "nothing", "Category: a"]
    s = score_answers(TASKS["labels"], answers, rows)
    assert s["accuracy"] == pytest.approx(2 / 4) and s["scored_rows"] == 4
    # per gold label: a P=1 R=1/2 F=2/3; b P=1/2 R=1 F=2/3; c F=0 -> macro 4/9
    assert s["macro_f1"] == pytest.approx(4 / 9)
    assert s["confusion"]["labels"] == ["a", "b", "c", "(none)"]
    assert s["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    nothing = score_answers(TASKS["labels"], ["Category: a"], [{"label": None, "response": "x"}])
    assert nothing["accuracy"] is None and nothing["primary"] is None


def test_regex_match_rate_and_label_accuracy() -> None:
    rows = [{"label": "a"}, {"label": "b"}, {"label": None}]
    s = score_answers(TASKS["regex"], ["a -> x", "A -> y", "no arrow"], rows)
    assert s["match_rate"] == pytest.approx(2 / 3) and s["label_accuracy"] == pytest.approx(1 / 2)
    plain = Task(answer=RegexAnswer(pattern=r"\w+ -> .+"))
    s = score_answers(plain, ["a -> x", "no"], rows[:2])
    assert s["primary_metric"] == "match_rate" and s["primary"] == 0.5 and s["label_accuracy"] is None


def test_json_rates_per_field_exact_match_and_field_f1() -> None:
    rows = [{"reference": '{"asset": "P-1", "fault": "leak"}'},
            {"reference": "not json", "response": '{"asset": "P-2", "fault": "noise"}'},  # the teacher's answer
            {"reference": '{"asset": "P-3", "fault": "leak"}'},
            {}]                                                                         # nothing to compare
    answers = ['{"asset": "P-1", "fault": "leak"}', '{"asset": "P-2", "fault": "leak"}', '["P-3"]', "{}"]
    s = score_answers(TASKS["json"], answers, rows)
    assert s["valid_json_rate"] == 1.0 and s["schema_valid_rate"] == pytest.approx(2 / 4)
    assert s["field_exact"] == pytest.approx({"asset": 2 / 3, "fault": 1 / 3})
    assert s["field_accuracy"] == pytest.approx(0.5)
    assert s["field_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3) and s["primary"] == s["field_f1"]
    assert s["scored_rows"] == 3 and s["reference_from"] == {"reference": 2, "teacher": 1}


def test_json_text_fields_get_chrf_and_stay_out_of_the_exact_f1() -> None:
    import sacrebleu

    from edgepack.answers import schema_fields, schema_text_fields

    schema = {"type": "object", "properties": {"fault": {"enum": ["leak", "noise"]},
                                               "action": {"type": "string", "x-edgepack-score": "chrf"}}}
    assert schema_fields(schema) == ("fault",) and schema_text_fields(schema) == ("action",)
    task = Task(answer=JsonAnswer(schema=schema, fields=schema_fields(schema), text_fields=("action",)))
    rows = [{"reference": '{"fault": "leak", "action": "Replace the seal on P-1."}'},
            {"reference": '{"fault": "noise", "action": "Grease the bearing."}'},
            {"reference": '{"action": "Check the fan."}'}]                   # a text field only: no F1 row
    answers = ['{"fault": "leak", "action": "Replace the pump seal."}', '{"fault": "noise", "action": 7}',
               '{"action": "Check the fan."}']
    s = score_answers(task, answers, rows)
    # the free text does not spoil the exact scores: both faults are right
    assert s["field_exact"] == {"fault": 1.0} and s["field_f1"] == pytest.approx(1.0)
    hyps, refs = ["Replace the pump seal.", "", "Check the fan."], ["Replace the seal on P-1.", "Grease the bearing.",
                                                                    "Check the fan."]
    assert s["field_chrf"]["action"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score / 100)
    assert 0.0 < s["field_chrf"]["action"] < 1.0 and s["scored_rows"] == 3
    with pytest.raises(Exception, match="both in fields"):
        JsonAnswer(schema=schema, fields=("fault", "action"), text_fields=("action",)).validate("t", ValueError)


def test_text_chrf_and_rouge_l_against_the_reference_or_the_teacher() -> None:
    import sacrebleu

    rows = [{"reference": "replace the pump bearing"}, {"response": "reset the breaker"}]
    answers = ["replace the bearing", "reset the breaker"]
    s = score_answers(TASKS["text"], answers, rows)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, [["replace the pump bearing",
                                                                        "reset the breaker"]]).score / 100)
    # ROUGE-L F: LCS 3 of 3 and 4 words -> 2*1*0.75/1.75; and 1 for the exact answer
    assert s["rouge_l"] == pytest.approx((6 / 7 + 1.0) / 2)
    assert s["reference_from"] == {"reference": 1, "teacher": 1}
    same = score_answers(TASKS["text"], ["reset the breaker"], rows[1:])
    assert same["chrf"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)


def test_helpers_for_label_agreement_and_format() -> None:
    rows = [{"label": "a", "response": "Category: a"}, {"label": "b", "response": "I do not know"},
            {"label": None, "response": "Category: c"}]
    answers = ["Category: a\nAction: do it now", "Category: a\nAction: x", "Category: z\nAction: check it"]
    assert label_scores(TASKS["labels"], answers, rows) == {"labelled": 2, "correct": 1, "accuracy": 0.5,
                                                            "unparsed": 0}
    assert teacher_agreement(TASKS["labels"], answers, rows) == {"rows": 2, "agreed": 1, "agreement": 0.5}
    # in format: the first only (the second's action is one word; the third's label is not in the set)
    assert format_rate(TASKS["labels"], answers) == pytest.approx(1 / 3)
    assert label_scores(TASKS["text"], answers, rows)["accuracy"] is None


def test_answers_and_rows_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 answers for 1 rows"):
        score_answers(DEMO_TASK, ["a", "b"], [{"label": "a"}])


def test_scoring_is_lazy_and_downloads_nothing() -> None:
    """Importing the scorer loads no metric library; scoring every kind with sockets refused works
    (rouge-score's tokenizer needs no NLTK data)."""
    code = """
import socket, sys
def refuse(*a, **k):
    raise OSError("network access refused in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
import edgepack.scoring as sc
assert not {"sklearn", "sacrebleu", "rouge_score", "nltk"} & set(sys.modules), sorted(sys.modules)
from tests.edgepack.test_scoring import TASKS
rows = [{"label": "a", "reference": '{"asset": "x", "fault": "leak"}'}]
for task in TASKS.values():
    sc.score_answers(task, ['{"asset": "x", "fault": "leak"}'], rows)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"NLTK_DATA": "/nonexistent", "PATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
