"""The bundle's model card (``README.md``): HF-style YAML front matter, the task, the gate, use.

Written by :func:`~edgepack.export.pack.pack.pack_run` from the manifest it is about to write,
so the card says nothing the manifest does not hold. The task section states what the model
was gated to do (issue #15): the answer kind, its labels, pattern or JSON schema, the primary
metric, the system prompt and decoding that ``run``, ``chat``, ``serve`` and the Modelfile apply,
and the scores the gate measured under them (``task_scores``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from edgepack import __version__
from edgepack.constants import (M_FORMAT, M_GATE, M_GATE_STATUS, M_LINEAGE, M_MODEL, M_PACK, M_PROFILE, M_QUANT,
                                M_TASK_SCORES)
from edgepack.formats import get_format
from edgepack.task import Task


def _yaml_str(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _fenced(text: str, lang: str = "text") -> list[str]:
    """``text`` in a code fence longer than any run of backticks inside it."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [f"{fence}{lang}", text, fence]


def _value(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _front(manifest: dict[str, Any], task: Task, license_name: str | None) -> list[str]:
    tags = ["edgepack", manifest[M_FORMAT], manifest[M_QUANT], manifest[M_PROFILE]["name"], "distillation"]
    front = ["---"]
    if license_name:
        front.append(f"license: {_yaml_str(license_name)}")
    return front + [f"model_name: {_yaml_str(manifest[M_MODEL])}", "pipeline_tag: text-generation",
                    f"library_name: {_yaml_str(manifest[M_FORMAT])}",
                    "tags:", *[f"- {_yaml_str(t)}" for t in tags], "edgepack:",
                    f"  profile: {_yaml_str(manifest[M_PROFILE]['name'])}",
                    f"  gate_status: {_yaml_str(manifest[M_GATE_STATUS])}",
                    f"  quant: {_yaml_str(manifest[M_QUANT])}",
                    f"  task_kind: {_yaml_str(task.kind)}",
                    f"  primary_metric: {_yaml_str(task.primary_metric)}", "---", ""]


def _labels_spec(task: Task) -> list[str]:
    labels = ", ".join(f"`{x}`" for x in task.answer.labels or ())
    return [f"Each answer names one of {len(task.answer.labels or ())} labels: {labels}. The label is read with "
            f"the pattern `{getattr(task.answer, 'pattern', '')}`.", ""]


def _regex_spec(task: Task) -> list[str]:
    labels = ", ".join(f"`{x}`" for x in task.answer.labels or ())
    return ["The whole answer must match this regular expression:", "",
            *_fenced(getattr(task.answer, "pattern", "")), "",
            *([f"Its `label` group names one of: {labels}.", ""] if labels else [])]


def _json_spec(task: Task) -> list[str]:
    fields = ", ".join(f"`{f}`" for f in getattr(task.answer, "fields", ())) or "every field of the schema"
    return [f"Each answer is one JSON object under this schema; the scored fields are {fields}.", "",
            *_fenced(json.dumps(getattr(task.answer, "schema", {}), indent=2, ensure_ascii=False), "json"), ""]


def _text_spec(task: Task) -> list[str]:
    return ["Free text, scored against the holdout's reference answers (or the teacher's where a row has none).", ""]


# answer kind (task.json's answer.kind) -> what a correct answer is, for the card
ANSWER_SPECS: dict[str, Callable[[Task], list[str]]] = {
    "labels": _labels_spec,
    "regex": _regex_spec,
    "json": _json_spec,
    "text": _text_spec,
}


def _scores(task: Task, scores: dict[str, Any] | None) -> list[str]:
    """The gated scores as a table, or why there are none."""
    if scores is None:
        return ["No gated scores: the gate measured no holdout under this task (see the gate section).", ""]
    measured = scores.get("scores") or {}
    rows = [f"| {m}{' (primary)' if m == task.primary_metric else ''} | {_value(measured.get(m))} |"
            for m in task.answer.metrics]
    rows += [f"| {f} exact | {_value(v)} |" for f, v in (measured.get("field_exact") or {}).items()]
    lines = [f"Measured by the gate on {scores.get('answered', scores['rows'])} of {scores['rows']} holdout rows, "
             f"decoded as above ({scores.get('decoding_line') or 'the task decoding'}):", "",
             "| metric | value |", "|---|---|", *rows, ""]
    if scores.get("teacher_primary") is not None:
        relative = f"; relative quality {_value(scores.get('relative'))}" if scores.get("relative") is not None else ""
        lines += [f"The teacher's recorded answers score {task.primary_metric} {_value(scores['teacher_primary'])}"
                  f"{relative}.", ""]
    structured = scores.get("structured_output")
    if isinstance(structured, dict):
        free = structured.get("unconstrained") or {}
        lines += [f"Structured output: decoded {structured.get('decoding')}; valid-JSON rate without the grammar "
                  f"{_value(free.get('valid_json_rate'))}. {structured.get('note', '')}".rstrip(), ""]
    return lines


def task_section(task: Task, task_source: str, scores: dict[str, Any] | None) -> list[str]:
    """``## Task``: the kind and its spec, the primary metric, the prompt, the decoding, the scores."""
    lines = ["## Task", "", f"A `{task.kind}` task ({task_source}); primary metric **{task.primary_metric}**.", "",
             *ANSWER_SPECS.get(task.kind, lambda _: [])(task)]
    if task.system_prompt is not None:
        lines += ["System prompt (`edgepack run`, `chat` and `serve` send it unless a request brings its own "
                  "system message):", "", *_fenced(task.system_prompt), ""]
    else:
        lines += ["The task has no system prompt of its own: requests are answered as they come.", ""]
    d = task.decoding
    lines += [f"Decoding: {d.describe()} (temperature {d.temperature:g}, repeat penalty {d.repeat_penalty:g}, "
              f"stop strings {list(d.stop) or 'none'}): the gate's; `run`, `chat` and `serve` decode so. Another "
              "runtime needs the same settings (many default to a repeat penalty of 1.1).", "",
              "### Gated scores", "", *_scores(task, scores)]
    return lines


def model_card(manifest: dict[str, Any], *, license_name: str | None, task: Task, task_source: str) -> str:
    """README.md: HF-style YAML front matter, then what the bundle is, its task and how it was judged."""
    gate = manifest[M_GATE]
    teacher = (manifest[M_LINEAGE].get("teacher") or {}).get("spec", "not recorded")
    rows = [f"| {c['name']} | {c['measured']} | {c['budget']} | {c['unit']} | "
            f"{ {True: 'yes', False: 'no'}.get(c['ok'], 'not measured') } |" for c in gate.get("checks", [])]
    machine = gate.get("machine") if isinstance(gate.get("machine"), dict) else {}
    name = manifest["bundle_name"]
    body = [
        f"# {manifest[M_MODEL]} for {manifest[M_PROFILE]['name']} ({manifest[M_FORMAT]} {manifest[M_QUANT]})", "",
        f"Distilled from `{teacher}` by edgepack {__version__} and packed for the "
        f"`{manifest[M_PROFILE]['name']}` profile: {manifest[M_PROFILE].get('description', '')}.", "",
        *task_section(task, task_source, manifest.get(M_TASK_SCORES)),
        f"## Gate: {manifest[M_GATE_STATUS]}", "",
        f"Measured on {machine.get('system', '?')} {machine.get('machine', '?')}, {machine.get('cpu', '?')}, "
        f"{machine.get('cpu_count', '?')} CPUs. Policy: {gate.get('policy', '')}", "",
        "| check | measured | budget | unit | ok |", "|---|---|---|---|---|", *rows, "",
        *[f"- {r}" for r in gate.get("reasons", [])], "",
        "## Use", "", "```sh", f"edgepack verify {name}",
        f"edgepack run {name} --prompt \"...\"              # the task's system prompt and decoding",
        f"edgepack run {name} --prompt \"...\" --no-task    # the raw model", "```", "",
        *([usage, ""] if (usage := get_format(manifest[M_FORMAT]).card_usage) else []),
        *([f"Signed with Ed25519 key `{signed['key_id']}` (sha256 of the raw public key): "
           f"`edgepack verify {name} --key PUBLIC_KEY.pem` checks the signature.", ""]
          if (signed := (manifest.get(M_PACK) or {}).get("signed_by")) else []),
        "## Files", "", "Every file's size and sha256 are listed in `manifest.json`; "
        "`edgepack verify` checks them all.", "",
    ]
    if not license_name:
        body += ["## License", "", "No license was recorded for this model; it inherits the terms of "
                 "its teacher and training data.", ""]
    return "\n".join(_front(manifest, task, license_name) + body)
