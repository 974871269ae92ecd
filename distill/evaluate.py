"""`edgepack eval`: did distillation help? Teacher vs undistilled vs distilled student on the holdout.

* **teacher** — its holdout answers as recorded by ``distill data`` (the real teacher, e.g.
  the GGUF under llama.cpp, with its teacher-only context); not regenerated here.
* **undistilled** — the student before KD: for ``auto`` students the teacher's kept blocks
  (``student.json: kept_layers``), rebuilt deterministically; for a user-provided student,
  its original folder.
* **distilled** — ``RUN/student``.

Every answer is scored under the run's task (``RUN/task.json``; the demo's contract for a run
built before it) by :func:`edgepack.scoring.score_answers`, the scorer the gate uses: per
model the task's metrics (``scores``, with ``primary``), plus label accuracy (the label read as
the task reads it), format rate and label agreement with the teacher, from the task's decoding
(greedy for the demo) of the holdout prompts (transformers, batched with left padding); and
teacher-forced on the teacher's holdout answers, the mean per-token KL(teacher ‖ student) and
the student's cross-entropy. "Gap closed" is the share of the undistilled→teacher gap that KD
recovered. The report is also written to ``RUN/eval.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.atomic import is_complete, write_json
from edgepack.constants import (DATA_DIR, DATA_REPORT, EVAL_REPORT, HOLDOUT_FILE, STUDENT_DIR, STUDENT_INFO,
                                TEACHER_CONTEXT, TEACHER_DIR)
from edgepack.errors import DataError, RunDirError
from edgepack.progress import ProgressFn, null_progress
from edgepack.task import Task, run_task

GEN_BATCH = 16
MAX_LENGTH = 1024


def answer_divergence(teacher: Any, student: Any, examples: list[Any], prefix: Any, pad_id: int,
                      micro_batch: int = 4) -> dict[str, float | None]:
    """Token-weighted mean KL(teacher ‖ student), student CE and the teacher's own CE at the answer positions.

    ``teacher`` None (an endpoint teacher, or a student with another tokenizer): student CE only.
    """
    import torch

    from edgepack.distill.batching import collate
    from edgepack.distill.losses import cross_entropy, forward_kl

    kl_sum = ce_sum = teacher_ce_sum = 0.0
    n_tokens = 0
    with torch.no_grad():
        for i in range(0, len(examples), micro_batch):
            part = examples[i:i + micro_batch]
            batch = collate([e.student_ids for e in part], [e.student_prompt for e in part], pad_id)
            hidden = student.get_decoder()(input_ids=batch.ids, attention_mask=batch.attention).last_hidden_state
            s_logits = student.get_output_embeddings()(hidden[batch.predicts])
            ones = torch.ones(1, s_logits.shape[0])
            n = s_logits.shape[0]
            if teacher is not None:
                t_logits = prefix.logits(teacher, part, pad_id)
                kl_sum += float(forward_kl(s_logits[None], t_logits[None], ones)) * n
                teacher_ce_sum += float(cross_entropy(t_logits[None], batch.targets[None], ones)) * n
            ce_sum += float(cross_entropy(s_logits[None], batch.targets[None], ones)) * n
            n_tokens += n
    known = teacher is not None
    return {"kl": kl_sum / max(n_tokens, 1) if known else None, "ce": ce_sum / max(n_tokens, 1),
            "teacher_ce": teacher_ce_sum / max(n_tokens, 1) if known else None, "tokens": n_tokens}


def _generate_answers(model: Any, tok: Any, rows: list[dict[str, Any]], progress: ProgressFn, what: str,
                      contract: Task) -> list[str]:
    """Answers under the task's decoding (greedy for temperature 0), GEN_BATCH prompts at a
    time (left-padded: one decode step serves all), cut at its stop strings."""
    import torch

    from edgepack.runtime.chat.tokens import hf_chat_ids

    model.eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    decoding = contract.decoding
    sampling = ({"do_sample": True, "temperature": decoding.temperature} if decoding.temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    answers: list[str] = []
    progress(what, 0, len(rows))
    for start in range(0, len(rows), GEN_BATCH):
        # the task's system prompt where a row has none, as the gate and the bundle ask
        prompts = [hf_chat_ids(tok, contract.prompt_messages(r["messages"])) for r in rows[start:start + GEN_BATCH]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        penalty = _llama_repeat_penalty(decoding.repeat_penalty, [width - len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=decoding.max_tokens, eos_token_id=eos,
                                 pad_token_id=pad, **sampling, **penalty)
        for row in out[:, width:].tolist():
            row = row[:row.index(eos)] if eos in row else row
            answers.append(decoding.cut(tok.decode(row, skip_special_tokens=True)).strip())
        progress(what, len(answers), len(rows))
    return answers


def _llama_repeat_penalty(penalty: float, pad_widths: list[int]) -> dict[str, Any]:
    """``generate`` kwargs applying llama.cpp's repeat penalty (the runtime's, not transformers'
    ``repetition_penalty``, which penalizes the whole context): each token id among a row's last
    PENALTY_LAST_N prompt-and-answer tokens (left padding excluded) has a positive logit divided
    by ``penalty``, a negative one multiplied. Nothing for 1.0."""
    if penalty == 1.0:
        return {}
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from edgepack.runtime.backends.base import PENALTY_LAST_N

    class LlamaRepeatPenalty(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for row, start in enumerate(pad_widths):
                window = input_ids[row, max(start, input_ids.shape[1] - PENALTY_LAST_N):].unique()
                seen = scores[row, window]
                scores[row, window] = torch.where(seen <= 0, seen * penalty, seen / penalty)
            return scores

    return {"logits_processor": LogitsProcessorList([LlamaRepeatPenalty()])}


def answer_scores(task: Task, answers: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's holdout scores under ``task``: the scorer's (``scores``, ``primary``; the
    gate's numbers for the same answers) and eval's summary fields beside them."""
    from edgepack.scoring import format_rate, label_scores, score_answers, teacher_agreement

    scores = score_answers(task, answers, rows)
    labels = label_scores(task, answers, rows)
    agreement = teacher_agreement(task, answers, rows)
    fmt = format_rate(task, answers)
    return {
        "label_accuracy": _ratio(labels["correct"], labels["labelled"]) if labels["accuracy"] is not None else None,
        "format_rate": None if fmt is None else round(fmt, 4),
        "teacher_label_agreement": _ratio(agreement["agreed"], agreement["rows"]),
        "exact_match_with_teacher": _ratio(sum(a == (r.get("response") or "").strip() for a, r in zip(answers, rows)),
                                           len(rows)),
        "primary": scores["primary"],
        "scores": scores,
    }


def _check_rows(task: Task, rows: list[dict[str, Any]], path: Path) -> None:
    """Every holdout row fits the task, else a DataError naming the first that does not."""
    for lineno, row in enumerate(rows, 1):
        problem = task.row_problem(row)
        if problem is not None:
            raise DataError(f"{path}:{lineno}: {problem}", hint="rerun `edgepack distill data` in a new run folder")


def _round(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _gap_closed(before: float | None, after: float | None, target: float | None) -> float | None:
    if before is None or after is None or target is None or abs(target - before) < 1e-12:
        return None
    return round((after - before) / (target - before), 4)


# Metrics "gap closed" is reported for; each is compared with the teacher's own value.
GAP_METRICS = ("label_accuracy", "teacher_label_agreement", "kl", "ce")


def evaluate_run(*, run_dir: Path, variants: tuple[str, ...] = (), progress: ProgressFn = null_progress
                 ) -> dict[str, Any]:
    """Compare teacher, undistilled student and distilled student on the holdout.

    ``variants`` adds students trained beside the main one (``distill train --variant NAME``,
    e.g. an SFT-only baseline with ``--loss sft``), each with its own gap closed.
    """
    from edgepack.distill.batching import TeacherPrefix, tokenize_rows

    run = _read_eval_inputs(Path(run_dir), variants)  # every refusal before any model is loaded
    t0 = time.perf_counter()
    models = _load_eval_models(run)
    forced_rows = [r for r in run.rows if r.get("response")]
    examples, too_long = tokenize_rows(models.tok, forced_rows, run.context, MAX_LENGTH)
    prefix = TeacherPrefix(models.kl_teacher, examples) if examples and models.kl_teacher is not None else None
    report = _report_head(run, models.kl_note, forced=len(examples), too_long=too_long)
    entries: dict[str, dict[str, Any]] = {}
    for name, model in models.students.items():
        entries[name] = _student_entry(name, model, run, models, examples, prefix, report["teacher"], progress)
    report.update(_comparison(entries, report["teacher"], variants))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(run.run_dir / EVAL_REPORT, report)
    return report


@dataclass(frozen=True)
class EvalInputs:
    """What eval reads from the run folder, checked before any model is loaded."""

    run_dir: Path
    student_dir: Path
    teacher_dir: Path | None  # None: an endpoint teacher (no local weights)
    variant_dirs: dict[str, Path]
    rows: list[dict[str, Any]]  # the holdout
    data_report: dict[str, Any]
    task: Task
    task_source: str
    context: list[dict[str, Any]]  # the teacher-only context turns
    info: dict[str, Any]  # student.json


@dataclass(frozen=True)
class EvalModels:
    """The loaded students (undistilled, distilled, variants), their tokenizer and the teacher for KL."""

    tok: Any
    pad_id: int
    students: dict[str, Any]
    kl_teacher: Any  # None when KL cannot be computed (``kl_note`` says why)
    kl_note: str | None


def _read_eval_inputs(run_dir: Path, variants: tuple[str, ...]) -> EvalInputs:
    """The run's folders (each complete, else RunDirError naming the stage to run), holdout rows,
    task, teacher context and student info."""
    from edgepack.distill.data import read_jsonl, teacher_dir_of
    from edgepack.distill.modes import is_endpoint_run, read_data_report
    from edgepack.distill.train import student_dir_name

    data_dir, student_dir = run_dir / DATA_DIR, run_dir / STUDENT_DIR
    remote = is_complete(data_dir) and is_endpoint_run(read_data_report(run_dir))
    teacher_dir = None if remote else teacher_dir_of(run_dir) if is_complete(data_dir) else run_dir / TEACHER_DIR
    variant_dirs = {v: run_dir / student_dir_name(v) for v in variants}
    for folder, stage in ((data_dir, "distill data"), (teacher_dir, "distill data"), (student_dir, "distill train"),
                          *((d, "distill train --variant") for d in variant_dirs.values())):
        if folder is not None and not is_complete(folder):
            raise RunDirError(f"{folder} is missing or incomplete", hint=f"run `edgepack {stage}` first")
    rows = read_jsonl(data_dir / HOLDOUT_FILE)
    if not rows:
        raise RunDirError(f"{data_dir / HOLDOUT_FILE} has no rows to evaluate on",
                          hint="use a prompts file with enough rows for a holdout split (20%)")
    data_report = json.loads((data_dir / DATA_REPORT).read_text()) if (data_dir / DATA_REPORT).is_file() else {}
    task, task_source = run_task(run_dir)
    _check_rows(task, rows, data_dir / HOLDOUT_FILE)
    context_path = data_dir / TEACHER_CONTEXT
    context = json.loads(context_path.read_text())["messages"] if context_path.is_file() else []
    info = json.loads((student_dir / STUDENT_INFO).read_text())
    return EvalInputs(run_dir=run_dir, student_dir=student_dir, teacher_dir=teacher_dir, variant_dirs=variant_dirs,
                      rows=rows, data_report=data_report, task=task, task_source=task_source, context=context,
                      info=info)


def _load_eval_models(run: EvalInputs) -> EvalModels:
    """The teacher (local only), the undistilled student (the teacher's kept blocks rebuilt, or a
    user student's original folder), the distilled student and the variants, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.modes import tokenizer_mismatch
    from edgepack.distill.student import prune_teacher

    tok = AutoTokenizer.from_pretrained(run.student_dir)  # the student's own: the teacher's, unless it differs
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    teacher = None if run.teacher_dir is None else \
        AutoModelForCausalLM.from_pretrained(run.teacher_dir, dtype=torch.float32).eval()
    info = run.info
    if info.get("source") == "auto" or info.get("kept_layers"):
        undistilled, _ = prune_teacher(teacher, tok, keep=info["kept_layers"], kept_channels=info.get("kept_channels"))
    else:
        undistilled = AutoModelForCausalLM.from_pretrained(info["source"], dtype=torch.float32)
    students = {"undistilled": undistilled,
                "distilled": AutoModelForCausalLM.from_pretrained(run.student_dir, dtype=torch.float32),
                **{f"variant {v}": AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
                   for v, d in run.variant_dirs.items()}}
    # KL needs the teacher's logits on the student's vocabulary: a local teacher with the same tokenizer.
    kl_note = ("the teacher is an endpoint (no local weights)" if run.teacher_dir is None else
               tokenizer_mismatch(AutoTokenizer.from_pretrained(run.teacher_dir), tok))
    return EvalModels(tok=tok, pad_id=pad_id, students=students, kl_teacher=None if kl_note else teacher,
                      kl_note=kl_note)


def _report_head(run: EvalInputs, kl_note: str | None, *, forced: int, too_long: int) -> dict[str, Any]:
    """The report's fields before any student is scored, the teacher's recorded answers scored."""
    teacher_answers = [(r.get("response") or "").strip() for r in run.rows]
    return {
        "holdout_rows": len(run.rows),
        "task": {"source": run.task_source, **run.task.describe()},
        "teacher": {"source": "data/holdout.jsonl (the teacher's recorded answers)",
                    **answer_scores(run.task, teacher_answers, run.rows), "kl": None if kl_note else 0.0, "ce": None},
        "teacher_context_turns": len(run.context),
        "forced_rows": forced, "forced_rows_too_long": too_long,
        "contamination": (run.data_report.get("contamination") or {}).get("status", "not checked"),
        "kl_note": f"KL to the teacher not computed: {kl_note}" if kl_note else None,
    }


def _student_entry(name: str, model: Any, run: EvalInputs, models: EvalModels, examples: list[Any], prefix: Any,
                   teacher: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
    """One student's report entry: its generated answers scored, and teacher-forced KL/CE on
    ``examples``; sets the teacher's own CE in ``teacher`` (the same for every student)."""
    model.eval()
    answers = _generate_answers(model, models.tok, run.rows, progress, f"eval: {name} answers", run.task)
    entry = answer_scores(run.task, answers, run.rows)
    if examples:
        scores = answer_divergence(models.kl_teacher, model, examples, prefix, models.pad_id)
        teacher["ce"] = _round(scores.pop("teacher_ce"))
        entry.update({k: _round(v) for k, v in scores.items()})
    entry["params"] = sum(p.numel() for p in model.parameters())
    entry["samples"] = [{"id": r["id"], "label": r.get("label"), "answer": a} for r, a in zip(run.rows[:5], answers)]
    return entry


def _comparison(entries: dict[str, dict[str, Any]], teacher: dict[str, Any], variants: tuple[str, ...]
                ) -> dict[str, Any]:
    """The undistilled and distilled entries, the distilled student's gap closed, and each variant
    with its own."""
    before = entries["undistilled"]
    gaps = {name: {m: _gap_closed(before.get(m), e.get(m), teacher.get(m)) for m in GAP_METRICS}
            for name, e in entries.items() if name != "undistilled"}
    return {"undistilled": before, "distilled": entries["distilled"], "gap_closed": gaps["distilled"],
            "variants": {v: {**entries[f"variant {v}"], "gap_closed": gaps[f"variant {v}"]} for v in variants}}
