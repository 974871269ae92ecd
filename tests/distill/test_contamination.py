"""Holdout contamination: exact and near overlap with training prompts and teacher answers."""

from __future__ import annotations

from edgepack.distill.contamination import contamination_report, normalize, shingles

SYSTEM = {"role": "system", "content": "You triage plant alarms. Pick one category."}


def _row(rid: str, text: str, response: str | None = None) -> dict:
    return {"id": rid, "messages": [SYSTEM, {"role": "user", "content": text}], "response": response}


TRAIN = [_row("t1", "Pump P-101 discharge pressure low, motor current normal."),
         _row("t2", "PLC rack 2 lost Profinet communication with remote I/O station 7."),
         _row("t3", "Boiler B-2 flue gas temperature high at 310 C.")]
KEPT = [_row("t1", TRAIN[0]["messages"][1]["content"], "Category: mechanical\nAction: Inspect pump P-101."),
        _row("t3", TRAIN[2]["messages"][1]["content"],
             "Category: thermal\nAction: Chiller CH-4 condenser fan stopped, check fan motor overload now.")]


def test_normalisation_and_shingles() -> None:
    assert normalize("  Pump P-101:  LOW pressure!! ") == "pump p-101 low pressure"
    assert shingles("a b c d") == {("a", "b", "c"), ("b", "c", "d")}
    assert shingles("a b") == {("a", "b")} and shingles("") == frozenset()


def test_clean_holdout_is_clean_despite_a_shared_system_prompt() -> None:
    hold = [_row("h1", "Air dryer dew point alarm on compressor C-3."),
            _row("h2", "Conveyor belt tracking off on line 4.")]
    report = contamination_report(hold, TRAIN, KEPT)
    assert report["status"] == "clean"
    assert report["prompts"] == {"exact": 0, "near": 0, "examples": []}
    assert report["teacher_outputs"]["exact"] == report["teacher_outputs"]["near"] == 0


def test_exact_near_and_leaked_into_answers_are_counted() -> None:
    hold = [_row("h1", "pump p-101 discharge pressure LOW; motor current normal"),            # exact after normalising
            _row("h2", "PLC rack 2 lost Profinet communication with remote I/O station 9."),  # near
            _row("h3", "Chiller CH-4 condenser fan stopped, check fan motor overload"),       # inside an answer
            _row("h4", "Transformer T-1 oil level low.")]                                    # clean
    report = contamination_report(hold, TRAIN, KEPT)
    assert report["status"] == "contaminated"
    assert (report["prompts"]["exact"], report["prompts"]["near"]) == (1, 1)
    kinds = {e["holdout"]: (e["kind"], e["train"]) for e in report["prompts"]["examples"]}
    assert kinds == {"h1": ("exact", "t1"), "h2": ("near", "t2")}
    assert report["teacher_outputs"]["near"] == 1
    assert report["teacher_outputs"]["examples"][0]["holdout"] == "h3"
    assert report["teacher_outputs"]["examples"][0]["train"] == "t3#answer"
