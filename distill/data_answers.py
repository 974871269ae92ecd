"""The teacher's answers for `edgepack distill data` (data.py :func:`~edgepack.distill.data.build_dataset`).

:func:`answer_prompts` asks the teacher one pass per decoding: pass 0 is the greedy answer to
every training and holdout prompt, passes 1.. are samples for the training prompts only. Each
training answer is kept as a row or dropped with a counted reason (filters.py; ``invalid_answer``
for an endpoint answer refused as invalid, ``duplicate`` for one that repeats a kept answer to
the same prompt); each holdout answer is stored with the label the task reads from it.
:class:`TeacherAnswers` accumulates the rows and counts that data/report.json reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.distill.data import PromptRow, with_teacher_context
from edgepack.distill.endpoint import is_invalid_answer
from edgepack.distill.filters import DROP_REASONS, drop_reason, is_near_duplicate
from edgepack.distill.generate import cache_stats, describe_generator, generate_many, open_generator
from edgepack.errors import DataError
from edgepack.progress import ProgressFn

if TYPE_CHECKING:
    from edgepack.distill.generate import DecodeParams, Generation
    from edgepack.distill.teachers import TeacherSource
    from edgepack.task import Task

STEP = "data: teacher answers"  # the progress task these passes report under


@dataclass
class TeacherAnswers:
    """What the teacher's passes produced, accumulated answer by answer."""

    kept: dict[str, list[str]]
    """Per training prompt id, the answers kept for it (stripped): a later sample that repeats
    one is a ``duplicate``."""
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    """Kept training rows: the student's prompt, the answer, the sample number, any soft labels."""
    hold_rows: list[dict[str, Any]] = field(default_factory=list)
    """Holdout rows: the prompt, the teacher's greedy answer and the label read from it."""
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    """Dropped training answers per reason, every reason listed (zeros too)."""
    invalid: list[str] = field(default_factory=list)
    """Why each answer refused as ``invalid_answer`` was invalid."""
    answers: list[Generation] = field(default_factory=list)
    """Every answer, in the order asked."""
    endpoints: list[dict[str, Any] | None] = field(default_factory=list)
    """Per pass, the endpoint's settings and counters (None for a local teacher)."""
    cache: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    """Answer-cache hits and misses over every pass."""
    tokens: int = 0
    """Generated tokens over every pass."""
    done: int = 0
    """Prompts answered so far (the progress count)."""
    labelled: int = 0
    """Holdout rows whose label the teacher's answer could be scored against."""
    correct: int = 0
    """Of those, the rows the teacher's answer labels correctly."""

    def add_train(self, row: PromptRow, gen: Generation, sample: int, *,
                  labels: frozenset[str] | None, task: Task) -> None:
        """Keep a training answer as a row, or count why it is dropped."""
        reason = drop_reason(gen.text, finished=gen.finished, label=row.label, labels=labels,
                             answer_format=task.answer)
        if reason is None and is_invalid_answer(gen):
            reason = "invalid_answer"
            self.invalid.append(gen.no_logprobs_reason)
        if reason is None and is_near_duplicate(gen.text, self.kept[row.id]):
            reason = "duplicate"
        if reason is None:
            self.kept[row.id].append(gen.text.strip())
            self.train_rows.append({**row.record(gen.text.strip()), "sample": sample, **gen.soft_labels()})
        else:
            self.dropped[reason] += 1

    def add_holdout(self, row: PromptRow, gen: Generation, task: Task) -> None:
        """Store a holdout answer with the label the task reads from it, and score that label."""
        rec = row.record(gen.text.strip())
        rec["teacher_category"] = task.answer.label(gen.text)
        self.hold_rows.append(rec)
        # A format that states no label leaves the teacher's accuracy unmeasured (None).
        if row.label is not None and task.answer.label_from:
            self.labelled += 1
            self.correct += rec["teacher_category"] == row.label


def answer_prompts(source: TeacherSource, teacher_dir: Path, options: dict[str, Any],
                   sample_params: list[DecodeParams], *, train: list[PromptRow], holdout: list[PromptRow],
                   context: list[dict[str, str]], labels: frozenset[str] | None, task: Task,
                   progress: ProgressFn) -> TeacherAnswers:
    """Ask the teacher (opened on ``teacher_dir`` with ``options``, see generate.py
    ``open_generator``) one pass per ``sample_params`` entry, with ``context`` before each
    prompt; raise DataError when no training answer is usable."""
    total = len(train) * len(sample_params) + len(holdout)
    progress(STEP, 0, total)
    acc = TeacherAnswers(kept={r.id: [] for r in train})
    # Sample 0 is the teacher's greedy answer (also the holdout's); samples 1.. are drawn at
    # the sample temperature with their own seeds, for training prompts only.
    for j, params in enumerate(sample_params):
        rows = train + (holdout if j == 0 else [])
        with open_generator(source, teacher_dir, params, **options) as generate:
            gens = generate_many(generate, [with_teacher_context(r.messages, context) for r in rows],
                                 lambda n: progress(STEP, acc.done + n, total))
            acc.answers += gens
            acc.endpoints.append(describe_generator(generate))
            for k, v in (cache_stats(generate) or {}).items():
                acc.cache[k] += v
            for i, (row, gen) in enumerate(zip(rows, gens)):
                acc.tokens += gen.tokens
                if i < len(train):
                    acc.add_train(row, gen, j, labels=labels, task=task)
                else:
                    acc.add_holdout(row, gen, task)
                acc.done += 1
    if not acc.train_rows:
        raise DataError(f"the teacher produced no usable answer for {len(train)} prompts "
                        f"(dropped: {_nonzero(acc.dropped)})",
                        hint=f"the endpoint's answers are invalid ({acc.invalid[0]})" if acc.invalid else
                        "check the prompts' format instructions, or use a stronger teacher")
    return acc


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"
