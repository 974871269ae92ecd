"""The one scorer: how good a task's answers are, the same way in ``edgepack eval`` and the gate.

:func:`score_answers` takes a :class:`~edgepack.task.Task`, the answers and the holdout rows they
answer (dicts with optional ``label``, ``reference`` and the teacher's ``response``) and returns
the task kind's metrics, each from a well-kept library, registered by the exact kind name in
:data:`SCORERS`:

* ``labels`` — ``accuracy``, ``macro_f1`` (averaged over the gold labels present) and a
  ``confusion`` table (scikit-learn), on the rows with a gold label; an answer that names no
  label counts as the class ``(none)``.
* ``regex`` — ``match_rate`` (the whole answer matches), and ``label_accuracy`` when the
  pattern has a ``label`` group.
* ``json`` — ``valid_json_rate``, ``schema_valid_rate`` (jsonschema), exact match per field
  (``field_exact``, JSON values equal) and their mean ``field_accuracy``, and ``field_f1``: the
  F1 of the (field, value) pairs per row, averaged over rows (scikit-learn, ``average="samples"``);
  free-text ``text_fields`` instead get ``field_chrf``: sacrebleu's chrF of the answer's value
  against the reference's, over the rows whose reference has the field (a missing or non-string
  value is an empty hypothesis).
  Each row is compared with its ``reference`` when that is a JSON object, else the teacher's.
* ``text`` — ``chrf`` (sacrebleu's corpus chrF, divided by 100) and ``rouge_l`` (rouge-score's
  ROUGE-L F-measure, mean over rows; its tokenizer keeps ASCII letters and digits only, so chrF
  is the one to read for other scripts) against the row's ``reference``, or the teacher's answer
  when there is none.

Every metric is in 0..1 and None when nothing could be measured; ``primary`` is the value of the
task's ``primary_metric``. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgepack.labels import fold_label
from edgepack.task import Task

NO_LABEL = "(none)"  # the class of an answer that names no label, in the confusion table
Row = Mapping[str, Any]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def label_scores(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    """Label accuracy on the rows with a gold label, for any kind whose answers state a label.

    ``accuracy`` is None when the task's answers state no label or no row has one.
    """
    if task.answer.label_from is None:
        return {"labelled": 0, "correct": 0, "accuracy": None, "unparsed": None}
    predicted = [task.answer.label(a) for a in answers]
    pairs = [(fold_label(r["label"]), p) for p, r in zip(predicted, rows) if r.get("label")]
    correct = sum(gold == p for gold, p in pairs)
    return {"labelled": len(pairs), "correct": correct, "accuracy": correct / len(pairs) if pairs else None,
            "unparsed": sum(p is None for p in predicted)}


def teacher_agreement(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    """How often an answer names the label the row's teacher ``response`` names (rows whose
    teacher names one; a gold label is not needed)."""
    pairs = [(task.answer.label(a), task.answer.label(r.get("response"))) for a, r in zip(answers, rows)]
    named = [(a, t) for a, t in pairs if t is not None]
    agreed = sum(a == t for a, t in named)
    return {"rows": len(named), "agreed": agreed, "agreement": agreed / len(named) if named else None}


def format_rate(task: Task, answers: Sequence[str]) -> float | None:
    """Share of answers in the task's format whose stated label (if any) is in the label set."""
    labels = task.labels

    def fits(text: str) -> bool:
        ok, stated = task.answer.check(text.strip())
        return ok and (stated is None or labels is None or fold_label(stated) in labels)

    return _mean([float(fits(a)) for a in answers])


# --- per kind ---------------------------------------------------------------------------------

def _labels(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pairs = [(fold_label(r["label"]), task.answer.label(a) or NO_LABEL) for a, r in zip(answers, rows)
             if r.get("label")]
    if not pairs:
        return {"accuracy": None, "macro_f1": None, "confusion": None, "scored_rows": 0}
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    gold = sorted(set(y_true))
    shown = gold + sorted(set(y_pred) - set(gold))
    with warnings.catch_warnings():
        # scikit-learn warns whenever the table is 1x1 (one label, always named), even with
        # ``labels`` given; the table is right.
        warnings.simplefilter("ignore", UserWarning)
        matrix = confusion_matrix(y_true, y_pred, labels=shown).tolist()
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=gold, average="macro", zero_division=0)),
            "confusion": {"labels": shown, "matrix": matrix, "rows": "gold label", "columns": "answered label"},
            "scored_rows": len(pairs)}


def _regex(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    matched = [float(task.answer.check(a.strip())[0]) for a in answers]
    labels = label_scores(task, answers, rows)
    return {"match_rate": _mean(matched), "label_accuracy": labels["accuracy"], "scored_rows": len(answers),
            "labelled_rows": labels["labelled"]}


def _json_reference(task: Task, row: Row) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object an answer is compared with: the row's reference, else the teacher's answer."""
    for key, source in (("reference", "reference"), ("response", "teacher")):
        is_json, value = task.answer.parse((row.get(key) or "").strip())
        if is_json and isinstance(value, dict):
            return value, source
    return None, None


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _json(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    parsed = [task.answer.parse(a.strip()) for a in answers]
    out: dict[str, Any] = {
        "valid_json_rate": _mean([float(ok) for ok, _ in parsed]),
        "schema_valid_rate": _mean([float(task.answer.check(a.strip())[0]) for a in answers]),
    }
    refs = [_json_reference(task, r) for r in rows]
    text_fields = list(task.answer.text_fields)
    fields = list(task.answer.fields) or sorted({k for ref, _ in refs if ref for k in ref} - set(text_fields))
    scored = [({} if not isinstance(value, dict) else value, ref, source)
              for (_, value), (ref, source) in zip(parsed, refs)
              if ref is not None and set(ref) & set(fields + text_fields)]
    exact = {}
    for f in fields:
        hits = [float(f in pred and _canon(pred[f]) == _canon(ref[f])) for pred, ref, _ in scored if f in ref]
        exact[f] = _mean(hits)
    measured = [v for v in exact.values() if v is not None]
    field_f1 = None
    pairs = [({f"{f}={_canon(p[f])}" for f in fields if f in p}, {f"{f}={_canon(r[f])}" for f in fields if f in r})
             for p, r, _ in scored if set(r) & set(fields)]
    if pairs:
        binarizer = MultiLabelBinarizer().fit([s for pair in pairs for s in pair])
        predicted, gold = binarizer.transform([p for p, _ in pairs]), binarizer.transform([g for _, g in pairs])
        field_f1 = float(f1_score(gold, predicted, average="samples", zero_division=0))
    return {**out, "field_accuracy": _mean(measured), "field_f1": field_f1, "field_exact": exact,
            "field_chrf": {f: _field_chrf(f, scored) for f in text_fields},
            "scored_rows": len(scored), "reference_from": _sources(s for _, _, s in scored)}


def _field_chrf(field: str, scored: Sequence[tuple[dict[str, Any], dict[str, Any], str]]) -> float | None:
    """chrF (0–1) of a free-text field's values against the references', over rows that have it."""
    import sacrebleu

    pairs = [(p.get(field) if isinstance(p.get(field), str) else "", str(r[field])) for p, r, _ in scored if field in r]
    if not pairs:
        return None
    return sacrebleu.corpus_chrf([h for h, _ in pairs], [[r for _, r in pairs]]).score / 100.0


def _sources(sources: Any) -> dict[str, int]:
    counts = {"reference": 0, "teacher": 0}
    for s in sources:
        counts[s] += 1
    return counts


def _text(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = []
    for answer, row in zip(answers, rows):
        if row.get("reference") is not None:
            pairs.append((answer.strip(), row["reference"].strip(), "reference"))
        elif row.get("response") is not None:
            pairs.append((answer.strip(), row["response"].strip(), "teacher"))
    if not pairs:
        return {"chrf": None, "rouge_l": None, "scored_rows": 0, "reference_from": _sources([])}
    hyps, refs = [h for h, _, _ in pairs], [r for _, r, _ in pairs]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return {"chrf": sacrebleu.corpus_chrf(hyps, [refs]).score / 100.0,
            "rouge_l": _mean([rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]),
            "scored_rows": len(pairs), "reference_from": _sources(s for _, _, s in pairs)}


# kind name (as in task.json) → scorer(task, answers, rows) returning at least the kind's metrics
SCORERS: dict[str, Callable[[Task, Sequence[str], Sequence[Row]], dict[str, Any]]] = {
    "labels": _labels,
    "regex": _regex,
    "json": _json,
    "text": _text,
}


def score_answers(task: Task, answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    """The task kind's metrics of ``answers`` (one per row of ``rows``), with ``primary``.

    Returns ``{"kind", "primary_metric", "primary", "rows", <metric>: value, ...}`` plus the
    kind's details (confusion table, per-field exact match, where references came from).
    """
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    scorer = SCORERS.get(task.kind)
    if scorer is None:
        raise ValueError(f"no scorer for task kind {task.kind!r}; scorers exist for {', '.join(SCORERS)}")
    scores = scorer(task, [a or "" for a in answers], rows)
    return {"kind": task.kind, "primary_metric": task.primary_metric, "primary": scores[task.primary_metric],
            "rows": len(rows), **scores}
