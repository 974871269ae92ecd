"""What the student learns from: the training mode, chosen once per run and recorded in its report.

==============  ===========================================================================
``dense``        the local teacher's full distribution at every answer token (online KD)
``soft-labels``  the local teacher's cached sparse distribution (RUN/softlabels, top-k + tail
                 or importance samples), so training never holds the teacher in memory
``top-logprobs`` an endpoint teacher's top-k logprobs per answer token, mapped onto the
                 student's vocabulary (endpoint_targets.py); forward KL on top-k + tail
``response-only`` cross-entropy on the teacher's answer text only (sequence-level KD, i.e.
                 SFT on teacher outputs)
==============  ===========================================================================

``response-only`` is either asked for (``--loss sft``: the SFT-only baseline) or a degraded
mode: an endpoint that returned no logprobs, or a student whose tokenizer differs from the
teacher's (vocab, special tokens), where comparing logits token by token would silently
misalign. A degraded mode always carries its ``reason``; the CLI prints it as a warning and the
train report keeps it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.constants import DATA_DIR, DATA_REPORT
from edgepack.errors import UsageError

DENSE, SOFT_LABELS, TOP_LOGPROBS, RESPONSE_ONLY = "dense", "soft-labels", "top-logprobs", "response-only"
SFT = "sft"
"""The divergence name of cross-entropy only (``--loss sft``)."""

# How each mode holds the teacher while the student trains (what the memory planner counts):
# ``online`` its weights and logits, ``cached`` soft labels read from disk, ``none`` nothing.
TEACHER_WHILE_TRAINING: dict[str, str] = {
    DENSE: "online",
    SOFT_LABELS: "cached",
    TOP_LOGPROBS: "none",  # the endpoint's logprobs are in the data rows
    RESPONSE_ONLY: "none",
}


@dataclass(frozen=True)
class TrainingMode:
    name: str
    reason: str | None = None
    """Why a degraded mode was chosen; None when it is what was asked for."""

    @property
    def needs_teacher_weights(self) -> bool:
        return self.name in (DENSE, SOFT_LABELS)

    @property
    def teacher_while_training(self) -> str:
        """``online``, ``cached`` or ``none``: see :data:`TEACHER_WHILE_TRAINING`."""
        return TEACHER_WHILE_TRAINING[self.name]


def read_data_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / DATA_DIR / DATA_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def is_endpoint_run(data_report: dict[str, Any]) -> bool:
    """True when the run's answers came from an endpoint teacher (no local weights)."""
    return "teacher_dir" in data_report and data_report["teacher_dir"] is None


def tokenizer_mismatch(teacher: Any, student: Any) -> str | None:
    """How two HF tokenizers differ (vocab, then bos/eos/pad ids, then special tokens), or None."""
    if teacher.get_vocab() != student.get_vocab():
        return f"vocabularies differ ({len(teacher)} vs {len(student)} tokens)"
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher, attr) != getattr(student, attr):
            return f"{attr} differs ({getattr(teacher, attr)} vs {getattr(student, attr)})"
    if sorted(teacher.all_special_tokens) != sorted(student.all_special_tokens):
        return "special tokens differ"
    return None


def choose_mode(*, data_report: dict[str, Any], divergence: str, soft_labels: bool,
                tokenizer_problem: str | None) -> TrainingMode:
    """The mode for this run's data, the requested loss and the student's tokenizer.

    ``tokenizer_problem``: how the student's tokenizer differs from the local teacher's
    (None: identical, or an endpoint teacher, whose tokenizer is unknown).
    """
    if divergence == SFT:
        if soft_labels:
            raise UsageError("--loss sft trains on the teacher's text only; it uses no soft labels",
                             hint="drop --soft-labels, or pick a KD loss")
        return TrainingMode(RESPONSE_ONLY)
    if is_endpoint_run(data_report):
        if soft_labels:
            raise UsageError("--soft-labels caches a local teacher's distributions; this run's teacher is an endpoint",
                             hint="drop --soft-labels: an endpoint's top-k logprobs are used when it returned them")
        if data_report.get("distillation") != TOP_LOGPROBS:
            return TrainingMode(RESPONSE_ONLY, f"the endpoint teacher's answers carry no logprobs "
                                               f"({data_report.get('distillation_reason')})")
        if divergence != "forward_kl":
            raise UsageError(f"an endpoint teacher's top-k logprobs support forward KL only (got {divergence})",
                             hint="use --loss fkl (or --loss sft for the teacher's text only)")
        return TrainingMode(TOP_LOGPROBS)
    if tokenizer_problem:
        return TrainingMode(RESPONSE_ONLY, f"the student's tokenizer differs from the teacher's ({tokenizer_problem}), "
                                           "so their logits cannot be compared token by token")
    return TrainingMode(SOFT_LABELS if soft_labels else DENSE)
