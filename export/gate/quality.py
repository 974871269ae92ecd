"""The gate's quality check: holdout label accuracy of an artifact, relative to the teacher.

Holdout rows (JSONL) carry ``messages`` (or a ``prompt`` string), a gold ``label`` and, when
the data stage recorded it, the teacher's ``response``. The artifact answers every row that
has a gold label or a teacher response with a label in it, greedily, through its own chat
template; the label is read from the first ``Category: <label>`` in the answer. The
teacher's accuracy is the same parse applied to its recorded responses, so the relative
quality compares like with like. Agreement with the teacher is the fraction of rows whose
teacher response names a label where the artifact names the same one (a gold label is not
needed). Rows with neither are counted and skipped, never guessed.

The gate runs :func:`evaluate_holdout` in a child process (:mod:`edgepack.export.gate.quality_child`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgepack.errors import DataError
from edgepack.progress import ProgressFn, null_progress

LABEL_PATTERN = re.compile(r"category\s*[:：]\s*\**\s*([A-Za-z0-9][A-Za-z0-9_\-/]*)", re.IGNORECASE)
DEFAULT_MAX_TOKENS = 48
_ROLES = ("system", "user", "assistant")


def parse_label(text: str | None) -> str | None:
    """The label after the first ``Category:`` in ``text``, normalised; None if absent."""
    if not text:
        return None
    match = LABEL_PATTERN.search(text)
    if not match:
        return None
    return normalize_label(match.group(1))


def normalize_label(label: str) -> str:
    """Lower case, spaces/slashes/dashes as underscores, trailing punctuation removed."""
    label = label.strip().strip(".,;:*").strip().lower()
    return re.sub(r"[\s/\-]+", "_", label)


def load_holdout(path: Path) -> list[dict[str, Any]]:
    """Rows of a holdout JSONL with ``messages`` normalised; DataError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"holdout file not found: {path}")
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            row = _parse_line(raw, f"{path}:{lineno}")
            if row is None:
                continue
            if isinstance(row.get("messages"), list) and row["messages"]:
                messages = row["messages"]
                bad = next((i for i, m in enumerate(messages) if not (
                    isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str))), None)
                if bad is not None:
                    raise DataError(f"{path}:{lineno}: messages[{bad}] must be "
                                    "{role: system|user|assistant, content: string}")
                messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            elif isinstance(row.get("prompt"), str):
                messages = [{"role": "user", "content": row["prompt"]}]
            else:
                raise DataError(f"{path}:{lineno}: needs a `messages` list or a `prompt` string")
            label = row.get("label")
            row_id = row.get("id")
            rows.append({"id": row_id if isinstance(row_id, str) else str(lineno), "messages": messages,
                         "label": normalize_label(label) if isinstance(label, str) and label.strip() else None,
                         "response": row.get("response") if isinstance(row.get("response"), str) else None})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


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


def teacher_accuracy(rows: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Accuracy of the recorded teacher responses on labelled rows, and how many it covers."""
    scored = [r for r in rows if r["label"] is not None and r["response"] is not None]
    if not scored:
        return None, 0
    correct = sum(parse_label(r["response"]) == r["label"] for r in scored)
    return correct / len(scored), len(scored)


def to_answer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the artifact answers: those with a gold label or a teacher response naming one."""
    return [r for r in rows if r["label"] is not None or parse_label(r["response"]) is not None]


def evaluate_holdout(backend: Any, rows: list[dict[str, Any]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                     progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Label accuracy of ``backend`` on ``rows`` (greedy), with the teacher's for comparison,
    and how often the artifact names the label the teacher's recorded response names."""
    answered = to_answer(rows)
    labelled = correct = unparsed = agreed = teacher_labelled = 0
    examples: list[dict[str, Any]] = []
    for i, row in enumerate(answered):
        answer = "".join(backend.stream_chat(row["messages"], max_tokens=max_tokens, temperature=0.0))
        predicted = parse_label(answer)
        teacher = parse_label(row["response"])
        unparsed += predicted is None
        if row["label"] is not None:
            labelled += 1
            correct += predicted == row["label"]
        if teacher is not None:
            teacher_labelled += 1
            agreed += predicted == teacher
        if len(examples) < 3:
            examples.append({"id": row["id"], "label": row["label"], "teacher": teacher, "predicted": predicted,
                             "answer": answer[:200]})
        progress("gate: holdout", i + 1, len(answered))
    accuracy = correct / labelled if labelled else None
    agreement = agreed / teacher_labelled if teacher_labelled else None
    t_acc, t_n = teacher_accuracy(rows)
    relative = accuracy / t_acc if accuracy is not None and t_acc else None
    responses = sum(r["response"] is not None for r in rows)
    notes = []
    if not labelled:
        notes.append("no holdout row has a label; accuracy not measured")
    if t_acc is None:
        notes.append("holdout rows carry no teacher responses; relative quality not computed")
    elif t_acc == 0:
        notes.append("the teacher's recorded responses score 0 accuracy; relative quality undefined")
    if responses and not teacher_labelled:
        notes.append("no teacher response names a label (`Category: ...`); agreement with the teacher not computed")
    elif responses > teacher_labelled:
        notes.append(f"{responses - teacher_labelled} teacher responses name no label and are left out of the "
                     "agreement")
    return {"rows": len(rows), "answered": len(answered), "labelled": labelled, "correct": correct,
            "unparsed": unparsed, "accuracy": accuracy, "teacher_accuracy": t_acc, "teacher_rows": t_n,
            "relative": relative, "teacher_agreement": agreement, "teacher_agreement_rows": teacher_labelled,
            "teacher_agreed": agreed, "decoding": f"greedy, max {max_tokens} tokens", "examples": examples,
            "notes": notes}
