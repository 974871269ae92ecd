"""The gate's quality check: holdout scores of an artifact under the task, relative to the teacher.

Holdout rows (JSONL) carry ``messages`` (or a ``prompt`` string) and, as the task needs, a gold
``label``, a ``reference`` answer and the teacher's recorded ``response``. The task is
``RUN/task.json`` of the run the holdout or the artifact belongs to (:func:`find_task`), else
the demo's contract; a row that does not fit it (no label and no teacher response for a
``labels`` task, no reference and no teacher response for a ``text`` task) is a DataError
naming the file and line, before anything is measured. The artifact answers the rows it can be
scored on (:func:`to_answer`) exactly as its bundle will: the task's system prompt before a row
without a system turn, the task's decoding (max tokens, temperature, repeat penalty, stop
strings), through its own chat template, and for a json task under the task's schema where the
runtime constrains JSON (:func:`decodes_under_schema`; then a second pass without it gives the
unconstrained valid-JSON rate, ``structured_output``). :func:`edgepack.scoring.score_answers`
scores the answers, exactly as ``edgepack eval`` does.
The teacher's score is the same scorer applied to its recorded responses, so the relative
quality (``primary / teacher_primary``) compares like with like. For tasks whose answers state
a label, ``accuracy`` is the label accuracy and agreement with the teacher is the fraction of
rows whose teacher response names a label where the artifact names the same one. What could not
be computed is said (``unmeasured``, keyed by the gate's quality check names, and ``notes``).

The gate runs :func:`evaluate_holdout` in a child process (:mod:`edgepack.export.gate.quality_child`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.constants import ARTIFACTS_DIR, DATA_DIR, HOLDOUT_FILE
from edgepack.errors import DataError
from edgepack.labels import fold_label
from edgepack.progress import ProgressFn, null_progress
from edgepack.task import DEMO_TASK, TASK_FILE, Task, load_task

_ROLES = ("system", "user", "assistant")


def find_task(artifact: Path | None, holdout: Path | None) -> tuple[Task, str]:
    """The task to score with, and where it came from: ``RUN/task.json`` of the run whose
    ``data/holdout.jsonl`` is the holdout, else of the run whose ``artifacts/`` hold the
    artifact, else the demo's contract (said so in the report, never silently)."""
    runs = []
    if holdout is not None and Path(holdout).name == HOLDOUT_FILE and Path(holdout).parent.name == DATA_DIR:
        runs.append(Path(holdout).resolve().parent.parent)
    if artifact is not None and Path(artifact).parent.name == ARTIFACTS_DIR:
        runs.append(Path(artifact).resolve().parent.parent)
    for run in runs:
        if (run / TASK_FILE).is_file():
            return load_task(run / TASK_FILE), str(run / TASK_FILE)
    return DEMO_TASK, "the demo contract (no RUN/task.json beside the holdout or the artifact)"


def load_holdout(path: Path, task: Task = DEMO_TASK) -> list[dict[str, Any]]:
    """Rows of a holdout JSONL with ``messages`` normalised and labels folded; a DataError names
    the line of a malformed row or of one that does not fit ``task``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"holdout file not found: {path}")
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            row = _parse_line(raw, where)
            if row is None:
                continue
            label, reference, response = (row.get(k) if isinstance(row.get(k), str) else None
                                          for k in ("label", "reference", "response"))
            out = {"id": row["id"] if isinstance(row.get("id"), str) else str(lineno),
                   "messages": _messages(row, where),
                   "label": fold_label(label) if label is not None and label.strip() else None,
                   "reference": reference, "response": response}
            problem = task.row_problem(out)
            if problem is not None:
                raise DataError(f"{where}: {problem}", hint=f"every row of a {task.kind} task needs it; "
                                                              "fix the row or drop it from the holdout")
            rows.append(out)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
        bad = next((i for i, m in enumerate(messages) if not (
            isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str))), None)
        if bad is not None:
            raise DataError(f"{where}: messages[{bad}] must be {{role: system|user|assistant, content: string}}")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise DataError(f"{where}: needs a `messages` list or a `prompt` string")


def _parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """One JSONL line as a dict (None for a blank line); DataError for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, an integer of more than 4300 digits (ValueError), or nesting too
        # deep for the decoder (RecursionError): all just "not valid JSON" to the user.
        raise DataError(f"{where}: not valid JSON ({getattr(exc, 'msg', None) or str(exc)[:80]})") from exc
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
        raise DataError(f"{where}: contains a lone UTF-16 surrogate escape; not valid Unicode text") from exc
    return row


def teacher_accuracy(rows: list[dict[str, Any]], task: Task = DEMO_TASK) -> tuple[float | None, int]:
    """The task's primary metric of the recorded teacher responses, and how many rows it covers
    (for a labels task: its accuracy on the labelled rows with a response)."""
    from edgepack.scoring import score_answers

    scores = score_answers(task, *_teacher_answers(rows))
    return scores["primary"], scores["scored_rows"]


def _teacher_answers(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    with_response = [r for r in rows if r.get("response") is not None]
    return [r["response"] for r in with_response], with_response


def to_answer(rows: list[dict[str, Any]], task: Task = DEMO_TASK) -> list[dict[str, Any]]:
    """The rows the artifact answers: those an answer can be scored on (for a labels task, rows
    with a gold label or a teacher response naming one; see the answer kind's ``answerable``)."""
    return [r for r in rows if task.answer.answerable(r)]


def decodes_under_schema(task: Task, backend: Any) -> bool:
    """Whether the bundle decodes ``task``'s answers under its JSON schema on ``backend``: what
    :func:`edgepack.runtime.session.apply_task` decides for every request (a json task, a backend
    that constrains JSON)."""
    from edgepack.runtime.session import apply_task

    return apply_task(task, [], constrains_json=bool(getattr(backend, "constrains_json", False)))[2] is not None


def answer_passes(task: Task) -> int:
    """How many times the gate may answer the holdout under ``task``: twice for a json task (under
    its schema, then without it, for the unconstrained valid-JSON rate), once otherwise."""
    return 2 if task.kind == "json" else 1


def answer_row(backend: Any, row: dict[str, Any], task: Task, max_tokens: int, *, constrained: bool = True) -> str:
    """The artifact's answer to one row as the bundle gives it, through the same
    :func:`~edgepack.runtime.session.apply_task` as ``run``, ``chat`` and ``serve``: the task's system
    prompt before a row without a system turn, its decoding (temperature, repeat penalty, ended
    before its first stop string) and, for a json task on a backend that constrains JSON, its
    schema as a grammar (``constrained=False``: without it)."""
    from edgepack.runtime.session import apply_task, cut_at_stop

    constrains = constrained and bool(getattr(backend, "constrains_json", False))
    messages, decoding, schema = apply_task(task, row["messages"], max_tokens=max_tokens, constrains_json=constrains)
    pieces = backend.stream_chat(messages, max_tokens=decoding.max_tokens, temperature=decoding.temperature,
                                 repeat_penalty=decoding.repeat_penalty, json_schema=schema)
    return "".join(cut_at_stop(pieces, decoding.stop))


def evaluate_holdout(backend: Any, rows: list[dict[str, Any]], task: Task = DEMO_TASK, *,
                     max_tokens: int | None = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Scores of ``backend``'s answers to ``rows`` under ``task`` (its system prompt and decoding;
    ``max_tokens`` overrides its limit), with the teacher's for comparison and, for tasks whose
    answers state a label, how often the artifact names the label the teacher's recorded
    response names. A json task on a backend that constrains JSON is answered under its schema
    (what the verdict judges) and again without it (``structured_output``: the valid-JSON rate
    the grammar is worth); elsewhere its answers are unconstrained, and the report says so."""
    limit = max_tokens if max_tokens is not None else task.decoding.max_tokens
    answered = to_answer(rows, task)
    grammar = decodes_under_schema(task, backend)
    total = (2 if grammar else 1) * len(answered)

    def answer_all(constrained: bool, done: int) -> list[str]:
        answers = []
        for i, row in enumerate(answered):
            answers.append(answer_row(backend, row, task, limit, constrained=constrained))
            progress("gate: holdout", done + i + 1, total)
        return answers

    answers = answer_all(True, 0)
    free = answer_all(False, len(answered)) if grammar else None
    return quality_report(task, rows, answered, answers, limit, unconstrained=free,
                          runtime=str(getattr(backend, "format", "") or "this"))


def quality_report(task: Task, rows: list[dict[str, Any]], answered: list[dict[str, Any]], answers: list[str],
                   max_tokens: int, *, unconstrained: list[str] | None = None, runtime: str = "this") -> dict[str, Any]:
    """The gate's quality dict from the artifact's ``answers`` to the ``answered`` rows (for a json
    task decoded under its schema when ``unconstrained``, the same rows answered without it, is
    given; ``runtime`` names the backend's format for the report). Pure."""
    from edgepack.scoring import label_scores, score_answers, teacher_agreement

    scores = score_answers(task, answers, answered)
    teacher = score_answers(task, *_teacher_answers(rows))
    labels = label_scores(task, answers, answered)
    teacher_labels = label_scores(task, *_teacher_answers(rows))
    agreement = teacher_agreement(task, answers, answered)
    primary, t_primary = scores["primary"], teacher["primary"]
    examples = [{"id": r["id"], "label": r["label"], "teacher": task.answer.label(r.get("response")),
                 "predicted": task.answer.label(a), "answer": a[:200]} for r, a in list(zip(answered, answers))[:3]]
    relative = primary / t_primary if primary is not None and t_primary else None
    unmeasured = _unmeasured(task, rows, scores, teacher)
    structured = _structured_output(task, answered, scores, unconstrained, runtime)
    return {"rows": len(rows), "answered": len(answered), "labelled": labels["labelled"],
            "correct": labels["correct"], "unparsed": labels["unparsed"], "accuracy": labels["accuracy"],
            "teacher_accuracy": teacher_labels["accuracy"], "teacher_rows": teacher["scored_rows"],
            "relative": relative, "teacher_agreement": agreement["agreement"],
            "teacher_agreement_rows": agreement["rows"], "teacher_agreed": agreement["agreed"],
            "task": task.describe(), "primary_metric": task.primary_metric, "primary": primary,
            "teacher_primary": t_primary, "scores": scores, "teacher_scores": teacher,
            "decoding": _decoding_line(task, max_tokens, structured), "structured_output": structured,
            "unmeasured": unmeasured, "examples": examples,
            "notes": _notes(task, rows, agreement, unmeasured)}


def _structured_output(task: Task, answered: list[dict[str, Any]], scores: dict[str, Any],
                       unconstrained: list[str] | None, runtime: str) -> dict[str, Any] | None:
    """For a json task: how its answers were decoded, and the valid-JSON rate with and without the
    schema as a grammar (None for other kinds)."""
    if task.kind != "json":
        return None
    from edgepack.scoring import score_answers

    rates = ("valid_json_rate", "schema_valid_rate")
    if unconstrained is None:
        return {"decoding": "unconstrained", "constrained": None,
                "unconstrained": {k: scores[k] for k in rates},
                "note": f"the {runtime} runtime cannot constrain decoding to a JSON schema: the answers were "
                        "decoded unconstrained, as the bundle will decode them"}
    free = score_answers(task, unconstrained, answered)
    return {"decoding": "constrained", "constrained": {k: scores[k] for k in rates},
            "unconstrained": {k: free[k] for k in rates} | {"primary": free["primary"]},
            "note": f"answered under the task's JSON schema as a grammar ({runtime}, as the bundle decodes; the "
                    "verdict judges these), and again without it for the unconstrained rates"}


def _decoding_line(task: Task, max_tokens: int, structured: dict[str, Any] | None) -> str:
    line = task.decoding.describe().replace(f"max {task.decoding.max_tokens} tokens", f"max {max_tokens} tokens")
    if task.system_prompt is not None:
        line += ", the task's system prompt"
    if structured is not None:
        line += (", under the task's JSON schema" if structured["decoding"] == "constrained"
                 else ", JSON unconstrained")
    return line


def _unmeasured(task: Task, rows: list[dict[str, Any]], scores: dict[str, Any],
                teacher: dict[str, Any]) -> dict[str, str | None]:
    """Why each quality budget's number could not be computed, keyed by its check name (None:
    it was). :func:`edgepack.export.gate.gate.decide` turns a reason into UNVERIFIED."""
    metric = task.primary_metric
    score = None
    if scores["primary"] is None or not scores.get("scored_rows"):
        score = (f"{metric} not measured: none of the {scores['rows']} answered rows could be scored for it "
                 f"(a {task.kind} task scores against {_SCORED_AGAINST.get(task.kind, 'what its rows carry')})")
    relative = score
    if relative is None and teacher["primary"] is None:
        relative = ("the holdout rows carry no teacher responses, so there is no teacher score to compare with "
                    "(record them in the holdout, as `edgepack distill data` does, or judge by [quality] min_score)"
                    if not any(r.get("response") is not None for r in rows)
                    else f"the teacher's recorded responses give no {metric}")
    elif relative is None and teacher["primary"] == 0:
        relative = f"the teacher's recorded responses score 0 {metric}; a ratio to 0 is undefined"
    return {"score": score, "relative_quality": relative}


# what a row's answer is compared with, per answer kind (for the reason a metric is missing)
_SCORED_AGAINST = {"labels": "a gold `label`", "regex": "a gold `label` (label_accuracy; match_rate needs none)",
                   "json": "a JSON `reference` or the teacher's JSON `response`",
                   "text": "a `reference` or the teacher's `response`"}


def _notes(task: Task, rows: list[dict[str, Any]], agreement: dict[str, Any],
           unmeasured: dict[str, str | None]) -> list[str]:
    """What could not be measured, and why (the gate reports these, never guesses)."""
    notes = [unmeasured["score"]] if unmeasured["score"] else []
    if unmeasured["relative_quality"] and unmeasured["relative_quality"] != unmeasured["score"]:
        notes.append(f"relative quality not computed: {unmeasured['relative_quality']}")
    responses = sum(r.get("response") is not None for r in rows)
    # agreement is about labels: only for a task with a label set (a json schema without one says nothing)
    if task.answer.label_from is not None and (task.kind == "labels" or task.labels):
        if responses and not agreement["rows"]:
            notes.append(f"no teacher response names a label ({task.answer.label_from}); agreement with the teacher "
                         "not computed")
        elif responses > agreement["rows"]:
            notes.append(f"{responses - agreement['rows']} teacher responses name no label and are left out of the "
                         "agreement")
    return notes


def primary_vs_teacher(quality: dict[str, Any]) -> str:
    """``accuracy 0.400 vs teacher 0.800``: the measured primary metric beside the teacher's."""
    metric = quality.get("primary_metric", "accuracy")
    value = quality.get("primary", quality.get("accuracy"))
    teacher = quality.get("teacher_primary", quality.get("teacher_accuracy"))
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{metric} {fmt(value)} vs teacher {fmt(teacher)}"
