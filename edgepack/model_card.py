"""Hugging Face model cards (``README.md``) for what edgepack writes: the student folder and the bundle.

``distill train`` writes one beside the student's safetensors (:func:`student_card`, called by
:func:`edgepack.distill.train_save.save_student`); ``pack`` writes one at the bundle's root
(:mod:`edgepack.export.pack.card`). Both are built with huggingface_hub's ``ModelCard``,
``ModelCardData`` and ``EvalResult``, so the YAML front matter is what the Hub parses: ``license``,
``base_model``, ``pipeline_tag``, ``tags``, ``language`` and, for a gated bundle, ``model-index``
with the gate's scores. (``ModelCard.validate`` posts to the Hub; edgepack never does, but
``EvalResult`` and ``ModelCardData`` check their fields offline, and ``ModelCard.load`` reads it.)

The license is decided in one place, :func:`card_license`: ``--license``, else what an earlier
stage recorded (the student's card, the teacher's ``source.json``: the builtin table, a GGUF's
``general.license``, an HF folder's card), else ``other`` with a note that says how to set it.
The task section (what the model was distilled and gated to do) is shared by both cards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgepack.task import Task

LICENSE_UNKNOWN = "other"  # the Hub's id for a license it has no id for
LICENSE_HINT = "pass --license ID (a Hub license id such as apache-2.0 or mit) to `distill train`, `pack` or `pipeline`"


@dataclass(frozen=True)
class CardLicense:
    """The license a card states and where it came from."""

    id: str
    """A Hub license id (``apache-2.0``), or ``other`` when nothing recorded one."""
    source: str
    """Where it came from, for the card's License section (``--license``, ``the teacher ...``)."""

    @property
    def known(self) -> bool:
        return self.source != ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source or None}


def card_license(override: str | None, recorded: list[tuple[str, Any]]) -> CardLicense:
    """``override`` (``--license``), else the first license in ``recorded`` ((where, value) pairs, in
    order of precedence), else ``other`` with no source."""
    if override and override.strip():
        return CardLicense(override.strip().lower(), "--license")
    for where, value in recorded:
        if isinstance(value, str) and value.strip():
            return CardLicense(value.strip().lower(), where)
    return CardLicense(LICENSE_UNKNOWN, "")


def license_section(lic: CardLicense, teacher: str) -> list[str]:
    """``## License``: the license and where it was recorded, or how to set it."""
    if lic.known:
        return ["## License", "", f"`{lic.id}`, as recorded by {lic.source}. The model is distilled from "
                f"`{teacher}` and trained on its answers: check that the teacher's and the prompts' terms allow "
                "your use.", ""]
    return ["## License", "", f"Unknown: the teacher `{teacher}` records no license (no `general.license` in its GGUF, "
            "no `license` in its model card), so the front matter says `license: other`. The model inherits the "
            f"terms of its teacher and training data; {LICENSE_HINT}.", ""]


def render_card(data: Any, body: list[str]) -> str:
    """The card text: ``data`` (a ``ModelCardData``) as YAML front matter, then ``body``; parsed back by
    ``ModelCard`` before it is returned, so a card that does not load is never written."""
    from huggingface_hub import ModelCard

    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)))


def eval_results(task: Task, scores: dict[str, Any] | None) -> list[Any]:
    """``model-index`` results: each metric the gate measured on the holdout under ``task``
    (the primary first), or none when it measured none."""
    from huggingface_hub import EvalResult

    measured = (scores or {}).get("scores") or {}
    metrics = [task.primary_metric, *(m for m in task.answer.metrics if m != task.primary_metric)]
    rows = (scores or {}).get("rows")
    return [EvalResult(task_type="text-generation", task_name=f"{task.kind} task ({task.primary_metric})",
                       dataset_type="edgepack-holdout", dataset_name=f"edgepack holdout ({rows} rows)",
                       dataset_split="holdout", metric_type=m, metric_value=measured[m],
                       metric_name=m + (" (primary)" if m == task.primary_metric else ""))
            for m in metrics if isinstance(measured.get(m), (int, float))]


def intended_use_section(task: Task, where: str) -> list[str]:
    """``## Intended use``: the one task it was distilled for, where, and what it is not."""
    return ["## Intended use", "", f"One task: `{task.kind}` answers (primary metric {task.primary_metric}) to "
            f"prompts like the ones it was distilled on, {where}. Send the task's system prompt (below; edgepack's "
            "`run`, `chat` and `serve` do) and its decoding. It is not a general-purpose assistant.", ""]


def limitations_section(teacher: str, extra: list[str]) -> list[str]:
    """``## Limitations``: what a small distilled model cannot be trusted with."""
    return ["## Limitations", "",
            f"- It learned from `{teacher}`'s answers: it repeats the teacher's mistakes and biases, usually more "
            "often.",
            "- Its scores come from a holdout drawn from the same prompts as its training data; other inputs, "
            "languages or phrasings can score much lower.",
            "- A few-million to few-hundred-million parameter model: no world knowledge to rely on, and "
            "answers outside the task's format are unreliable.", *extra, ""]


def fenced(text: str, lang: str = "text") -> list[str]:
    """``text`` in a code fence longer than any run of backticks inside it."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [f"{fence}{lang}", text, fence]


def value_text(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _labels_spec(task: Task) -> list[str]:
    labels = ", ".join(f"`{x}`" for x in task.answer.labels or ())
    return [f"Each answer names one of {len(task.answer.labels or ())} labels: {labels}. The label is read with "
            f"the pattern `{getattr(task.answer, 'pattern', '')}`.", ""]


def _regex_spec(task: Task) -> list[str]:
    labels = ", ".join(f"`{x}`" for x in task.answer.labels or ())
    return ["The whole answer must match this regular expression:", "",
            *fenced(getattr(task.answer, "pattern", "")), "",
            *([f"Its `label` group names one of: {labels}.", ""] if labels else [])]


def _json_spec(task: Task) -> list[str]:
    fields = ", ".join(f"`{f}`" for f in getattr(task.answer, "fields", ())) or "every field of the schema"
    text = ", ".join(f"`{f}`" for f in getattr(task.answer, "text_fields", ()))
    text = f"; free-text fields scored by chrF against the reference: {text}" if text else ""
    return [f"Each answer is one JSON object under this schema; the fields scored by exact match are {fields}{text}.",
            "",
            *fenced(json.dumps(getattr(task.answer, "schema", {}), indent=2, ensure_ascii=False), "json"), ""]


def _text_spec(task: Task) -> list[str]:
    return ["Free text, scored against the holdout's reference answers (or the teacher's where a row has none).", ""]


# answer kind (task.json's answer.kind) -> what a correct answer is, for the card
ANSWER_SPECS: dict[str, Callable[[Task], list[str]]] = {
    "labels": _labels_spec,
    "regex": _regex_spec,
    "json": _json_spec,
    "text": _text_spec,
}


GATE_UNSCORED = "No gated scores: the gate measured no holdout under this task (see the gate section)."


def _scores(task: Task, scores: dict[str, Any] | None, unscored: str) -> list[str]:
    """The gated scores as a table, or why there are none (``unscored``)."""
    if scores is None:
        return [unscored, ""]
    measured = scores.get("scores") or {}
    rows = [f"| {m}{' (primary)' if m == task.primary_metric else ''} | {value_text(measured.get(m))} |"
            for m in task.answer.metrics]
    rows += [f"| {f} exact | {value_text(v)} |" for f, v in (measured.get("field_exact") or {}).items()]
    rows += [f"| {f} chrF | {value_text(v)} |" for f, v in (measured.get("field_chrf") or {}).items()]
    lines = [f"Measured by the gate on {scores.get('answered', scores['rows'])} of {scores['rows']} holdout rows, "
             f"decoded as above ({scores.get('decoding_line') or 'the task decoding'}):", "",
             "| metric | value |", "|---|---|", *rows, ""]
    if scores.get("teacher_primary") is not None:
        relative = f"; relative quality {value_text(scores.get('relative'))}" if scores.get("relative") is not None else ""
        lines += [f"The teacher's recorded answers score {task.primary_metric} {value_text(scores['teacher_primary'])}"
                  f"{relative}.", ""]
    structured = scores.get("structured_output")
    if isinstance(structured, dict):
        free = structured.get("unconstrained") or {}
        lines += [f"Structured output: decoded {structured.get('decoding')}; valid-JSON rate without the grammar "
                  f"{value_text(free.get('valid_json_rate'))}. {structured.get('note', '')}".rstrip(), ""]
    return lines


def task_section(task: Task, task_source: str, scores: dict[str, Any] | None, *,
                 unscored: str = GATE_UNSCORED) -> list[str]:
    """``## Task``: the kind and its spec, the primary metric, the prompt, the decoding, the scores
    (``unscored`` says why there are none)."""
    lines = ["## Task", "", f"A `{task.kind}` task ({task_source}); primary metric **{task.primary_metric}**.", "",
             *ANSWER_SPECS.get(task.kind, lambda _: [])(task)]
    if task.system_prompt is not None:
        lines += ["System prompt (`edgepack run`, `chat` and `serve` send it unless a request brings its own "
                  "system message):", "", *fenced(task.system_prompt), ""]
    else:
        lines += ["The task has no system prompt of its own: requests are answered as they come.", ""]
    d = task.decoding
    lines += [f"Decoding: {d.describe()} (temperature {d.temperature:g}, repeat penalty {d.repeat_penalty:g}, "
              f"stop strings {list(d.stop) or 'none'}): the gate's; `run`, `chat` and `serve` decode so. Another "
              "runtime needs the same settings (many default to a repeat penalty of 1.1).", "",
              "### Gated scores", "", *_scores(task, scores, unscored)]
    return lines


def student_card(*, name: str, teacher: dict[str, Any], license: CardLicense, task: Task | None, task_source: str,
                 report: dict[str, Any]) -> str:
    """The student folder's ``README.md`` (written by ``distill train``): an HF card for the
    safetensors beside it, before any export or gate (so no ``model-index`` yet)."""
    from huggingface_hub import ModelCardData

    teacher_name = str(teacher.get("spec") or "not recorded")
    data = ModelCardData(license=license.id, **({} if license.known else {"license_name": "unknown"}),
                         base_model=teacher.get("base_model") or teacher.get("name"), pipeline_tag="text-generation",
                         library_name="transformers", tags=["edgepack", "distillation", "safetensors"],
                         language=list(teacher.get("language") or []) or None, model_name=name,
                         edgepack={"stage": "distill train", "mode": report.get("mode"),
                                   "license_source": license.source or None})
    params = report.get("params")
    size = f"{params / 1e6:.1f}M parameters" if isinstance(params, (int, float)) else "parameters not recorded"
    body = [f"# {name}", "",
            f"A student distilled by edgepack from `{teacher_name}`: {report.get('mode', '?')} distillation, "
            f"{report.get('steps', '?')} steps on {report.get('rows_used', '?')} rows, loss "
            f"{value_text(report.get('first_loss'))} → {value_text(report.get('final_loss'))}, {size}.", ""]
    if task is not None:
        body += [*intended_use_section(task, "after `edgepack export` and `edgepack gate` (this folder is the "
                                             "unquantized, ungated student)"),
                 *task_section(task, task_source, None, unscored="Not gated yet: `edgepack gate` measures the "
                               "exported artifacts on the holdout, and the bundle's card carries the scores.")]
    body += [*limitations_section(teacher_name, ["- Not quantized and not gated: `edgepack export`, `gate` and "
                                                 "`pack` measure it against a device profile."]),
             "## Files", "", "`model.safetensors` and `config.json` (a transformers model), the tokenizer and chat "
             "template, `student.json` (what was kept of the teacher), `train_report.json` (every number above) "
             "and `loss_curve.png`.", "", *license_section(license, teacher_name)]
    return render_card(data, body)
