"""The bundle's model card (``README.md``): an HF model card with the task, the gate and how to use it.

Written by :func:`~edgepack.export.pack.pack.pack_run` from the manifest it is about to write,
so the card says nothing the manifest does not hold. Its front matter (built with
huggingface_hub's ``ModelCardData`` in :mod:`edgepack.model_card`) carries ``license``,
``base_model``, ``pipeline_tag: text-generation``, ``tags`` (edgepack, distillation, the format,
the quant, the profile), ``language`` when the teacher lists one, and ``model-index`` with the
scores the gate measured under the task. The task section states what the model was gated to
do (issue #15): the answer kind, its spec, the primary metric, the system prompt and decoding
that ``run``, ``chat``, ``serve`` and the Modelfile apply, and those scores (``task_scores``).
"""

from __future__ import annotations

from typing import Any

from edgepack import __version__
from edgepack.constants import (M_FORMAT, M_GATE, M_GATE_STATUS, M_LINEAGE, M_MODEL, M_PACK, M_PROFILE, M_QUANT,
                                M_TASK_SCORES)
from edgepack.formats import get_format
from edgepack.model_card import (CardLicense, card_license, eval_results, intended_use_section, license_section,
                                 limitations_section, render_card, task_section, value_text)
from edgepack.task import Task


def teacher_record(lineage: dict[str, Any]) -> dict[str, Any]:
    """The teacher as the run recorded it: ``teacher/source.json``, else data/report.json's ``teacher``
    (an endpoint teacher has no folder)."""
    teacher = lineage.get("teacher") or (lineage.get("data") or {}).get("teacher")
    return teacher if isinstance(teacher, dict) else {}


def bundle_license(lineage: dict[str, Any], override: str | None) -> CardLicense:
    """``--license``, else what ``distill train`` recorded for the student, else the teacher's license."""
    student = (lineage.get("student") or {}).get("license")
    student = student if isinstance(student, dict) else {}
    return card_license(override, [
        (f"`distill train` ({student.get('source')})", student.get("id") if student.get("source") else None),
        ("the teacher's source (`teacher/source.json`)", teacher_record(lineage).get("license"))])


def _made_section(manifest: dict[str, Any], teacher: str) -> list[str]:
    """``## How it was made``: distilled (the train and data reports), quantized (the export entry)."""
    lineage = manifest[M_LINEAGE]
    train, data = lineage.get("train") or {}, lineage.get("data") or {}
    entry = (lineage.get("export") or {}).get("entry") or {}
    lines = ["## How it was made", ""]
    if train.get("steps"):
        params = f"{train['params'] / 1e6:.1f}M" if isinstance(train.get("params"), (int, float)) else "?"
        lines.append(f"- Distilled from `{teacher}` ({train.get('mode', '?')} distillation): {train['steps']} steps "
                     f"on {train.get('rows_used', '?')} rows, loss {value_text(train.get('first_loss'))} → "
                     f"{value_text(train.get('final_loss'))}; {params} parameters.")
    else:
        lines.append(f"- Distilled from `{teacher}`; the run recorded no training steps.")
    if data.get("kept") is not None:
        lines.append(f"- Data: the teacher's answers to the run's prompts, {data['kept']} kept and "
                     f"{data.get('dropped', '?')} dropped by the answer filters.")
    lines.append(f"- Quantized: {manifest[M_FORMAT]} {manifest[M_QUANT]}"
                 + (f", {entry['bytes'] / 2**20:.1f} MiB." if isinstance(entry.get("bytes"), int) else "."))
    lines += [f"- Gated: {manifest[M_GATE_STATUS]} on the `{manifest[M_PROFILE]['name']}` profile (below).", ""]
    return lines


def _front(manifest: dict[str, Any], task: Task, lic: CardLicense, teacher: dict[str, Any]) -> Any:
    """The front matter as a ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    profile, fmt, quant = manifest[M_PROFILE]["name"], manifest[M_FORMAT], manifest[M_QUANT]
    results = eval_results(task, manifest.get(M_TASK_SCORES))
    return ModelCardData(
        license=lic.id, **({} if lic.known else {"license_name": "unknown"}),
        base_model=teacher.get("base_model") or teacher.get("name"), pipeline_tag="text-generation",
        library_name=fmt, tags=["edgepack", "distillation", fmt, quant, profile],
        language=list(teacher.get("language") or []) or None,
        model_name=manifest[M_MODEL], eval_results=results or None,
        edgepack={"profile": profile, "gate_status": manifest[M_GATE_STATUS], "quant": quant, "task_kind": task.kind,
                  "primary_metric": task.primary_metric, "license_source": lic.source or None})


def model_card(manifest: dict[str, Any], *, license: CardLicense, task: Task, task_source: str,
               tokenizer_folder: bool = False) -> str:
    """README.md: the front matter, then what the bundle is, its task, how it was made and judged, and use
    (``tokenizer_folder``: the bundle has a ``tokenizer/`` folder, which the Use section names)."""
    gate, teacher = manifest[M_GATE], teacher_record(manifest[M_LINEAGE])
    teacher_name = teacher.get("spec", "not recorded")
    rows = [f"| {c['name']} | {c['measured']} | {c['budget']} | {c['unit']} | "
            f"{ {True: 'yes', False: 'no'}.get(c['ok'], 'not measured') } |" for c in gate.get("checks", [])]
    machine = gate.get("machine") if isinstance(gate.get("machine"), dict) else {}
    name, profile = manifest["bundle_name"], manifest[M_PROFILE]
    body = [
        f"# {manifest[M_MODEL]} for {profile['name']} ({manifest[M_FORMAT]} {manifest[M_QUANT]})", "",
        f"Distilled from `{teacher_name}` by edgepack {__version__} and packed for the "
        f"`{profile['name']}` profile: {profile.get('description', '')}.", "",
        *intended_use_section(task, f"on devices like the `{profile['name']}` profile's"),
        *task_section(task, task_source, manifest.get(M_TASK_SCORES)),
        *_made_section(manifest, teacher_name),
        *limitations_section(teacher_name, [
            f"- Quantized to {manifest[M_QUANT]}: the gate's scores are this file's, not the unquantized student's.",
            f"- The latency and memory budgets hold for the `{profile['name']}` profile's device as measured below."]),
        f"## Gate: {manifest[M_GATE_STATUS]}", "",
        f"Measured on {machine.get('system', '?')} {machine.get('machine', '?')}, {machine.get('cpu', '?')}, "
        f"{machine.get('cpu_count', '?')} CPUs. Policy: {gate.get('policy', '')}", "",
        "| check | measured | budget | unit | ok |", "|---|---|---|---|---|", *rows, "",
        *[f"- {r}" for r in gate.get("reasons", [])], "",
        "## Use", "", "```sh", f"edgepack verify {name}",
        f"edgepack run {name} --prompt \"...\"              # the task's system prompt and decoding",
        f"edgepack run {name} --prompt \"...\" --no-task    # the raw model", "```", "",
        "`tokenizer/` is a transformers tokenizer folder with the gated chat template: "
        "`AutoTokenizer.from_pretrained(\"tokenizer\").apply_chat_template(messages, tokenize=False, "
        "add_generation_prompt=True)` renders the prompt the gate measured." if tokenizer_folder else "",
        "",
        *([usage, ""] if (usage := get_format(manifest[M_FORMAT]).card_usage) else []),
        *([f"Signed with Ed25519 key `{signed['key_id']}` (sha256 of the raw public key): "
           f"`edgepack verify {name} --key PUBLIC_KEY.pem` checks the signature.", ""]
          if (signed := (manifest.get(M_PACK) or {}).get("signed_by")) else []),
        "## Files", "", "Every file's size and sha256 are listed in `manifest.json`; "
        "`edgepack verify` checks them all.", "",
        *license_section(license, teacher_name),
    ]
    return render_card(_front(manifest, task, license, teacher), body)
