"""`edgepack pack`: turn a gated artifact of a run into a verifiable ``.edgepack`` bundle.

``pack_run`` reads the gate reports in ``RUN/gate/``, picks an artifact (the one asked for,
or the first of the profile's choices, in preference order, whose verdict is PASS), checks
that the file (or ONNX folder) is byte-for-byte the one that was gated (the gate's
:func:`~edgepack.export.gate.gate.artifact_digest`), and writes
``RUN/bundles/<model>-<profile>-<format>-<quant>.edgepack`` atomically (format:
:mod:`edgepack.runtime.bundle.archive`). FAIL is never packed; UNVERIFIED only with
``allow_unverified``, and the bundle says so (``gate_status`` and ``pack``).

The run is untrusted input (:mod:`edgepack.export.pack.trust`): nothing is read through a symbolic
link or from outside the run, a report counts only for the profile whose content hash it
records and only with the verdict its own measurements give, and the model bytes in the
written bundle are checked against the gated sha256 before the bundle gets its final name.
One pack per run at a time (:mod:`edgepack.locks`).

What goes in, besides the model file: ``manifest.json`` with every file's sha256, the gate
report, the run's task (``RUN/task.json``, or the demo contract for a run without one, said so
in the bundle's notes) and the scores the gate measured under it (:func:`gated_task_scores`,
``task_scores``), the run's lineage (run.toml, teacher source, student shape, data and train
reports, export entry, tool versions), the chat template, ``tokenizer/`` (the student's tokenizer
files and the gated chat template, for ``AutoTokenizer``) when the run has them, a Hugging Face
model card ``README.md`` with the license, the task and the gated scores
(:mod:`edgepack.export.pack.card`), and for GGUF an Ollama ``Modelfile`` whose SYSTEM and
PARAMETERs are the task's (:mod:`edgepack.export.pack.modelfile`). An ONNX folder goes in whole under its own name (model.onnx, external data,
config and tokenizer files). Per-format contents come from the format's ``payload`` part
(:mod:`edgepack.formats`; :func:`gguf_payload`, :func:`onnx_payload` for the built-ins), so a
third-party format packs the same way. With ``sign_key`` the bundle also carries ``manifest.sig``, an Ed25519
signature over the manifest (:mod:`edgepack.runtime.bundle.signing`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.atomic import atomic_path, clean_stale
from edgepack.constants import (ARTIFACTS_DIR, BUNDLE_SUFFIX, BUNDLES_DIR, DATA_DIR, DATA_REPORT,
                                EXPORT_REPORT, FAIL, GATE_DIR, M_CHAT_TEMPLATE, M_ENTRYPOINT, M_FILES,
                                M_FORMAT, M_GATE, M_GATE_STATUS, M_LINEAGE, M_MODEL, M_PACK, M_PROFILE,
                                M_QUANT, M_RUNTIME, M_SCHEMA, M_TASK, M_TASK_SCORES, MANIFEST_SCHEMA_VERSION,
                                PASS, RUN_TOML, STUDENT_DIR, STUDENT_INFO, TEACHER_DIR, TEACHER_SOURCE,
                                TRAIN_REPORT, UNVERIFIED)
from edgepack.errors import GateFailed, RunDirError, UsageError
from edgepack.formats import all_formats, format_of, get_format
from edgepack.export.pack.card import bundle_license, model_card
from edgepack.export.pack.trust import (RUN_TASK_SOURCE, artifact_path, check_bundle_binding, check_verdict,
                                        list_run_folder, profile_problem, read_run_file, read_run_json, read_run_task)
from edgepack.locks import stage_lock
from edgepack.profiles import Profile
from edgepack.provenance import tool_versions
from edgepack.runtime.bundle.archive import BundleFile, write_bundle
from edgepack.task import Task

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


# --- choosing the artifact -------------------------------------------------------------------
def _export_quants(run_dir: Path) -> dict[str, str]:
    """Artifact name -> the quant it was exported as (``RUN/artifacts/export.json``).

    A profile's choice (``onnx:int4``) names an export quant. Choices are matched against the
    export's name for the artifact when the run has one, and otherwise against what the graph
    holds (its narrowest MatMulNBits width; the manifest records the full mix, e.g. ``int4+int8``).
    """
    report = read_run_json(run_dir, f"{ARTIFACTS_DIR}/{EXPORT_REPORT}")
    artifacts = report.get("artifacts") if isinstance(report, dict) else None
    return {Path(str(a["path"])).name: str(a["quant"]) for a in artifacts or []
            if isinstance(a, dict) and a.get("path") and a.get("quant")}


def load_gate_reports(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``RUN/gate/*.json`` report, each with ``_report_path`` and ``_choice_quant``
    (the export's quant name for the artifact, else the gate's) added. Read through no
    symbolic link (:mod:`edgepack.export.pack.trust`)."""
    gate_dir = Path(run_dir) / GATE_DIR
    names = list_run_folder(run_dir, GATE_DIR)
    if names is None:
        raise RunDirError(f"{gate_dir} does not exist; nothing has been gated in this run",
                          hint="run `edgepack gate` (or `edgepack pipeline`) first")
    reports = []
    exported = _export_quants(run_dir)
    for name in (n for n in names if n.endswith(".json")):
        report = read_run_json(run_dir, f"{GATE_DIR}/{name}")
        if not isinstance(report, dict) or report.get("verdict") not in (PASS, FAIL, UNVERIFIED):
            raise RunDirError(f"{gate_dir / name} is not a gate report (no verdict)")
        quant = exported.get(_name(report), report.get("quant"))
        reports.append({**report, "_report_path": str(gate_dir / name), "_choice_quant": quant})
    if not reports:
        raise RunDirError(f"{gate_dir} holds no gate reports", hint="run `edgepack gate` first")
    return reports


def _name(report: dict[str, Any]) -> str:
    return str(report.get("artifact_name") or Path(str(report.get("artifact", ""))).name)


def _choice(report: dict[str, Any]) -> tuple[Any, Any]:
    """(format, quant) of a report, as a profile's choices name them."""
    return report.get("format"), report.get("_choice_quant", report.get("quant"))


def _acceptable(report: dict[str, Any], allow_unverified: bool) -> bool:
    return report["verdict"] == PASS or (allow_unverified and report["verdict"] == UNVERIFIED)


def choose_report(reports: list[dict[str, Any]], profile: Profile, artifact: Path | None,
                  allow_unverified: bool) -> dict[str, Any]:
    """The gate report to pack, by the rules in the module docstring; GateFailed otherwise.

    A report counts only when it was gated against this very profile (its content hash, see
    :func:`~edgepack.export.pack.trust.profile_problem`), and the one chosen must have the verdict
    its own measurements give (:func:`~edgepack.export.pack.trust.check_verdict`).
    """
    allowed = [(c.format, c.quant) for c in profile.choices]
    named = [r for r in reports if r.get("profile") == profile.name]
    mine = [r for r in named if profile_problem(r, profile) is None]
    foreign = [r for r in named if profile_problem(r, profile) is not None]
    rerun = f"run `edgepack gate` with this profile ({profile.source or profile.name})"
    if artifact is not None:
        match = [r for r in mine if _name(r) == Path(artifact).name]
        stale = [r for r in foreign if _name(r) == Path(artifact).name]
        if not match and stale:
            raise RunDirError(str(profile_problem(stale[-1], profile)), hint=rerun)
        if not match:
            others = sorted({str(r.get("profile")) for r in reports if _name(r) == Path(artifact).name})
            raise RunDirError(f"no gate report for {Path(artifact).name} on profile {profile.name}"
                              + (f" (gated only for {', '.join(others)})" if others else ""),
                              hint=f"run `edgepack gate {artifact} --profile {profile.name}` first")
        report = match[-1]
        if _choice(report) not in allowed:
            raise UsageError(f"{_name(report)} is {':'.join(map(str, _choice(report)))}, which profile "
                             f"{profile.name} does not allow ({', '.join(map(str, profile.choices))})")
        if not _acceptable(report, allow_unverified):
            extra = " (pass --allow-unverified to package it anyway)" if report["verdict"] == UNVERIFIED else ""
            raise GateFailed(f"{_name(report)}: gate verdict {report['verdict']}{extra}: "
                             + "; ".join(report.get("reasons", [])[:3]))
        check_verdict(report, profile)
        return report
    ranked = sorted((r for r in mine if _choice(r) in allowed), key=lambda r: allowed.index(_choice(r)))
    for wanted in ([PASS, UNVERIFIED] if allow_unverified else [PASS]):
        for report in ranked:
            if report["verdict"] == wanted:
                check_verdict(report, profile)
                return report
    if foreign and not ranked:
        more = f" ({len(foreign) - 1} more like it)" if len(foreign) > 1 else ""
        raise RunDirError(f"{profile_problem(foreign[0], profile)}{more}; such a report does not count for "
                          "this profile", hint=rerun)
    summary = "; ".join(f"{_name(r)}: {r['verdict']}" for r in ranked) or "no report for this profile's choices"
    if foreign:
        summary += f"; {len(foreign)} report(s) gated against another profile named {profile.name} do not count"
    raise GateFailed(f"no artifact of this run passed the gate for {profile.name} ({summary})",
                     hint="see RUN/gate/*.json; try a smaller quantization, or --allow-unverified "
                          "when the gate could not run on the target device")


def gated_task_scores(report: dict[str, Any], task: Task) -> tuple[dict[str, Any] | None, str | None]:
    """(``task_scores`` for the manifest from the report's quality block, or None and why).

    Scores count only when the gate measured them under this very task (its sha256 in the
    quality block); a report gated without a holdout, one whose holdout pass failed, one from
    before the task contract and one scored under another task give none, said so.
    """
    from edgepack.runtime.bundle.manifest import TASK_SCORES_SCHEMA, manifest_problems

    quality = (report.get("measurements") or {}).get("quality")
    gated = quality.get("task") if isinstance(quality, dict) else None
    sha = gated.get("sha256") if isinstance(gated, dict) else None
    if not isinstance(quality, dict):
        return None, "no task scores: the artifact was gated without a holdout"
    if quality.get("error"):
        return None, f"no task scores: the gate could not answer the holdout ({str(quality['error'])[:120]})"
    if sha is None:
        return None, "no task scores: the gate report predates the task contract (its quality block names no task)"
    if sha != task.sha256():
        return None, (f"no task scores: the gate scored the holdout under another task (sha256 {str(sha)[:12]}…) "
                      f"than the run's ({task.sha256()[:12]}…); re-run the gate to carry scores")
    scores = {"primary_metric": task.primary_metric, "primary": quality.get("primary"),
              "teacher_primary": quality.get("teacher_primary"), "relative": quality.get("relative"),
              "scores": quality.get("scores"), "rows": quality.get("rows"), "answered": quality.get("answered"),
              "decoding": task.decoding.to_json(), "decoding_line": quality.get("decoding"),
              "structured_output": quality.get("structured_output"), "holdout": quality.get("holdout"),
              "task_sha256": sha}
    problems = manifest_problems(scores, TASK_SCORES_SCHEMA)
    if problems:
        raise RunDirError(f"{report['_report_path']}: its quality block cannot be carried as task scores: "
                          + "; ".join(problems[:4]), hint="re-run the gate")
    return scores, None


def _locate_artifact(run_dir: Path, report: dict[str, Any], asked: Path | None) -> tuple[Path, str]:
    """(``RUN/artifacts/<name>``, the sha256 the gate recorded for it), after checking that the
    file (or ONNX folder) is reached through no link, is the one asked for, and is byte for byte
    the gated one (:func:`~edgepack.export.gate.gate.artifact_digest`)."""
    from edgepack.export.gate.gate import artifact_digest

    path = artifact_path(run_dir, report, report["_report_path"])
    if asked is not None and Path(asked).exists() and not Path(asked).samefile(path):
        raise UsageError(f"{asked} is not {path}; pack takes the artifacts inside the run it packs",
                         hint=f"pass --artifact {path}")
    gated_sha = report.get("model_sha256") or report.get("artifact_sha256")
    if not isinstance(gated_sha, str) or not gated_sha:
        raise RunDirError(f"{report['_report_path']} records no sha256 of {path.name}; re-run the gate")
    if artifact_digest(path) != gated_sha:
        raise RunDirError(f"{path} is not the file that was gated (sha256 differs from "
                          f"{report['_report_path']})", hint="re-run the gate on the current artifact")
    return path, gated_sha


# --- per-format payloads ----------------------------------------------------------------------
# files (list[BundleFile]), entrypoint, chat_template, runtime, notes, has_tokenizer, file_quant (the
# quantization the file itself records, as the gate reads it: GGUF file type, ONNX graph widths) and,
# optionally, task_files: (task, task_source) -> (files, notes), the files that state the task (the
# GGUF Modelfile), made once pack has read the run's task.
Payload = dict[str, Any]


def gguf_payload(model: Path, model_name: str, profile: Profile) -> Payload:
    """A GGUF file and its chat template, llama.cpp's runtime facts, and as ``task_files`` its
    Ollama ``Modelfile`` (the task's system prompt and decoding, :mod:`~edgepack.export.pack.modelfile`)."""
    from edgepack.export.pack.modelfile import write_modelfile
    from edgepack.gguf_header import read_gguf, stop_token_ids, token_texts
    from edgepack.runtime.chat.check import check_gguf_templates
    from edgepack.runtime.chat.template import to_ollama_template
    from edgepack.runtime.memory import estimate_gguf_memory

    header = read_gguf(model, keep_arrays=("tokenizer.ggml.tokens",))
    check_gguf_templates(header, strict=True)  # a template bomb never ships (llama.cpp compiles it on load)
    stops = token_texts(header, stop_token_ids(header))
    bos_id = header.metadata.get("tokenizer.ggml.bos_token_id")
    specials = {"bos_token": token_texts(header, [bos_id]).get(bos_id, "") if isinstance(bos_id, int) else "",
                "eos_token": stops.get(header.metadata.get("tokenizer.ggml.eos_token_id"), "")}
    template = header.chat_template
    derived = to_ollama_template(template, **specials) if template else None
    missing = None if derived is not None else ("the model has no chat template" if not template else
                                                "the chat template cannot be expressed as an Ollama TEMPLATE exactly")

    def modelfile(task: Task, task_source: str) -> tuple[list[BundleFile], list[str]]:
        text, notes = write_modelfile(model_file=model.name, model_name=model_name, template=derived,
                                      template_missing=missing, stop_tokens=stops, task=task,
                                      task_source=task_source, num_ctx=profile.context_length)
        return [BundleFile("Modelfile", text.encode("utf-8"))], notes
    import importlib.metadata as md

    runtime = {
        "backend": "llama.cpp", "requires": {"llama-cpp-python": f">={md.version('llama-cpp-python')}"},
        "gguf_version": header.version, "architecture": header.architecture,
        "context_length": profile.context_length, "threads": profile.threads, "device": profile.device,
        "stop_tokens": [{"id": i, "text": t} for i, t in stops.items()], "special_tokens": specials,
        "memory_estimate": estimate_gguf_memory(header, profile.context_length),
    }
    files = [BundleFile(model.name, model)]
    if template:
        files.append(BundleFile("chat_template.jinja", template.encode("utf-8")))
    return {"files": files, "entrypoint": model.name, "chat_template": template, "runtime": runtime,
            "notes": [], "has_tokenizer": False, "file_quant": header.quant, "task_files": modelfile}


def onnx_folder_files(folder: Path) -> list[BundleFile]:
    """Every file of an exported ONNX folder as ``<folder>/<relative path>`` (not ``.complete``).

    A symlink anywhere in the folder is refused: a bundle holds regular files only, and a
    link could pull in a file from outside the folder.
    """
    from edgepack.constants import COMPLETE_MARKER

    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            raise RunDirError(f"{folder.name}/{rel} is a symbolic link; bundles hold regular files only",
                              hint="re-export the ONNX folder, or copy the file in place of the link")
        if p.is_file() and rel != COMPLETE_MARKER:
            files.append(BundleFile(f"{folder.name}/{rel}", p))
    return files


def onnx_payload(model: Path, model_name: str, profile: Profile) -> Payload:
    """An ONNX folder (model.onnx, external data, config and tokenizer files) under its own name
    (no ``task_files``: the task travels in the manifest, there is no ONNX counterpart of a Modelfile).

    The entrypoint is ``<folder>/model.onnx``; the ONNX backend loads the folder around it.
    ``runtime.artifact_sha256`` is the gate's folder digest, which the manifest's file list
    reproduces (sha256 over ``"<path below the folder>\t<sha256>\n"``, sorted).
    """
    import importlib.metadata as md

    from edgepack.export.gate.gate import artifact_digest
    from edgepack.runtime.chat.check import check_folder_template
    from edgepack.runtime.onnx_graph import MODEL_FILE, estimate_onnx_memory, inspect_onnx

    if not model.is_dir():
        raise UsageError(f"{model} is not an ONNX folder (expected a folder with {MODEL_FILE})")
    graph = inspect_onnx(model)  # refuses external data that leaves the folder
    template = check_folder_template(model, strict=True)
    files = onnx_folder_files(model)
    if template:
        files.append(BundleFile("chat_template.jinja", template.encode("utf-8")))
    runtime = {
        "backend": "onnxruntime", "requires": {"onnxruntime": f">={md.version('onnxruntime')}"},
        "artifact_dir": model.name, "artifact_sha256": artifact_digest(model), "onnx_quant": graph.quant, "onnx_quant_detail": graph.quant_detail,
        "context_length": profile.context_length, "threads": profile.threads, "device": profile.device,
        "memory_estimate": estimate_onnx_memory(model, profile.context_length),
    }
    notes = [] if template else ["the ONNX folder has no chat template; chat needs one"]
    return {"files": files, "entrypoint": f"{model.name}/{MODEL_FILE}", "chat_template": template,
            "runtime": runtime, "notes": notes, "has_tokenizer": (model / "tokenizer.json").is_file(),
            "file_quant": graph.quant}


# --- lineage and model card ---------------------------------------------------------------------
def read_lineage(run_dir: Path, artifact_name: str) -> dict[str, Any]:
    """What the run recorded about how the artifact was made; absent files are listed. Read
    through no symbolic link (:func:`~edgepack.export.pack.trust.read_run_file`)."""
    run = Path(run_dir)
    sources = {"teacher": f"{TEACHER_DIR}/{TEACHER_SOURCE}", "student": f"{STUDENT_DIR}/{STUDENT_INFO}",
               "data": f"{DATA_DIR}/{DATA_REPORT}", "train": f"{STUDENT_DIR}/{TRAIN_REPORT}"}
    lineage: dict[str, Any] = {"missing": []}
    raw = read_run_file(run, RUN_TOML)
    if raw is not None:
        try:
            lineage["run"] = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RunDirError(f"{run / RUN_TOML}: not valid TOML ({exc})") from exc
    else:
        lineage["missing"].append(RUN_TOML)
    for key, rel in sources.items():
        value = read_run_json(run, rel)
        if value is None:
            lineage["missing"].append(rel)
        elif not isinstance(value, dict):
            raise RunDirError(f"{run / rel} is not a JSON object", hint="re-run the stage that writes it")
        else:
            lineage[key] = value
    report = read_run_json(run, f"{ARTIFACTS_DIR}/{EXPORT_REPORT}")
    if isinstance(report, dict):
        entry = next((a for a in report.get("artifacts") or [] if isinstance(a, dict)
                      and Path(str(a.get("path"))).name == artifact_name), None)
        lineage["export"] = {"entry": entry, "notes": report.get("notes", []), "model": report.get("model"),
                             "created": report.get("created")}
    else:
        lineage["missing"].append(f"{ARTIFACTS_DIR}/{EXPORT_REPORT}")
    lineage["tools"] = tool_versions()
    return lineage


def tokenizer_folder(run_dir: Path, chat_template: str | None) -> list[BundleFile]:
    """``tokenizer/``: the student's tokenizer files, read through no link, plus the gated chat
    template as ``chat_template.jinja`` (which transformers prefers over ``tokenizer_config.json``'s),
    so ``AutoTokenizer.from_pretrained`` on the folder renders the prompts the gate measured.
    Empty when the run has no tokenizer files."""
    from edgepack.runtime.chat.template import TEMPLATE_FILE

    files = []
    for name in TOKENIZER_FILES:
        data = read_run_file(run_dir, f"{STUDENT_DIR}/{name}")  # bytes read through no link, now
        if data is not None:
            files.append(BundleFile(f"tokenizer/{name}", data))
    if files and chat_template:
        files.append(BundleFile(f"tokenizer/{TEMPLATE_FILE}", chat_template.encode("utf-8")))
    return files


# --- the command ------------------------------------------------------------------------------
def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def pack_run(*, run_dir: Path, profile: Profile, artifact: Path | None,
             allow_unverified: bool, sign_key: Path | None = None, license: str | None = None) -> dict[str, Any]:
    """Package the run's best gated artifact for ``profile`` into RUN/bundles/*.edgepack.

    ``sign_key``: an Ed25519 private key (PEM); the bundle then carries ``manifest.sig``,
    a signature over its manifest (which lists every file's sha256). ``license``: the Hub
    license id the model card states (default: the student's or the teacher's recorded one).
    """
    run_dir = Path(run_dir)
    signer, public_key, signed_by = None, None, None
    if sign_key is not None:  # a bad key fails before anything is read or written
        from edgepack.runtime.bundle.signing import key_id, load_private_key, sign_manifest

        private_key = load_private_key(sign_key)
        public_key = private_key.public_key()
        signed_by = {"algorithm": "ed25519", "key_id": key_id(public_key)}

        def signer(manifest_bytes: bytes) -> bytes:
            return sign_manifest(manifest_bytes, private_key)
    with stage_lock(run_dir, "pack"):
        return _pack_locked(run_dir, profile, artifact, allow_unverified, signer, public_key, signed_by, license)


def _check_payload(report: dict[str, Any], model: Path, fmt: str, quant: str, payload: Payload) -> None:
    """What the file holds must be what the report (and, for GGUF, the profile's choice) says."""
    where = report["_report_path"]
    found = format_of(model).name
    if found != fmt:
        raise RunDirError(f"{where} says {model.name} is {fmt}, but it is {found}", hint="re-run the gate")
    if payload["file_quant"] != report.get("quant"):
        raise RunDirError(f"{where} says {model.name} is {report.get('quant')}, but the file holds "
                          f"{payload['file_quant']}", hint="re-run the gate")
    if get_format(fmt).exact_file_quant and payload["file_quant"] is not None and quant != payload["file_quant"]:
        raise RunDirError(f"{model.name} would be packed as {quant} (export.json) but the file holds "
                          f"{payload['file_quant']}", hint="re-export the run")


def _pack_locked(run_dir: Path, profile: Profile, artifact: Path | None, allow_unverified: bool,
                 signer: Callable[[bytes], bytes] | None, public_key: Any,
                 signed_by: dict[str, str] | None, license: str | None = None) -> dict[str, Any]:
    """:func:`pack_run` while it holds the run's pack lock."""
    report = choose_report(load_gate_reports(run_dir), profile, artifact, allow_unverified)
    task, task_source = read_run_task(run_dir)  # a broken task.json stops pack before anything is read
    task_scores, scores_note = gated_task_scores(report, task)
    model_path, gated_sha = _locate_artifact(run_dir, report, artifact)
    fmt, quant, verdict = str(report["format"]), str(_choice(report)[1]), str(report["verdict"])
    if verdict == FAIL:  # unreachable through choose_report; kept as the invariant
        raise GateFailed(f"{model_path.name} failed the gate")
    artifact_format = get_format(fmt)
    if not artifact_format.provides("payload"):
        supported = [f.name for f in all_formats() if f.provides("payload")]
        raise UsageError(f"packing {fmt!r} artifacts is not supported; supported: {', '.join(supported)}",
                         hint="a format needs payload set to 'module:attribute' to be packed")
    lineage = read_lineage(run_dir, model_path.name)
    model_name = _safe(str((lineage.get("export") or {}).get("model") or
                           model_path.stem.removesuffix(f"-{quant}")))
    payload = artifact_format.part("payload")(model_path, model_name, profile)
    _check_payload(report, model_path, fmt, quant, payload)
    task_files, task_notes = payload["task_files"](task, task_source) if payload.get("task_files") else ([], [])
    bundle_name = f"{model_name}-{_safe(profile.name)}-{fmt}-{_safe(quant)}{BUNDLE_SUFFIX}"
    notes = [*([] if task_source == RUN_TASK_SOURCE else [f"task: {task_source}"]),
             *([scores_note] if scores_note else []), *payload["notes"], *task_notes]
    if verdict == UNVERIFIED:
        notes.insert(0, "packaged with --allow-unverified: the gate could not confirm the budgets on the target "
                        "device (" + "; ".join(report.get("reasons", [])[:2]) + ")")
    gate = {k: v for k, v in report.items() if not k.startswith("_")}
    manifest: dict[str, Any] = {
        M_SCHEMA: MANIFEST_SCHEMA_VERSION, M_MODEL: model_name, M_FORMAT: fmt, M_QUANT: quant,
        M_PROFILE: profile.describe(), M_ENTRYPOINT: payload["entrypoint"], M_FILES: [],
        M_GATE_STATUS: verdict, M_GATE: gate, M_LINEAGE: lineage, M_RUNTIME: payload["runtime"],
        M_CHAT_TEMPLATE: payload["chat_template"], "bundle_name": bundle_name,
        M_TASK: task.to_json(), M_TASK_SCORES: task_scores,
        M_PACK: {"allow_unverified": allow_unverified, "packed_unverified": verdict == UNVERIFIED,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "edgepack": __version__, "notes": notes, "signed_by": signed_by},
    }
    files: list[BundleFile] = [*payload["files"], *task_files]
    tokenizer = [] if payload["has_tokenizer"] else tokenizer_folder(run_dir, payload["chat_template"])
    card = model_card(manifest, license=bundle_license(lineage, license), task=task, task_source=task_source,
                      tokenizer_folder=bool(tokenizer))
    files += [*tokenizer, BundleFile("README.md", card.encode("utf-8"))]
    out = run_dir / BUNDLES_DIR / bundle_name
    list_run_folder(run_dir, BUNDLES_DIR)  # a bundles/ that is a link would put the bundle outside the run
    clean_stale(run_dir / BUNDLES_DIR)  # what a killed pack left (only edgepack's temporary names)
    with atomic_path(out) as staging:  # the final name appears only once the copy is proven the gated one
        check = write_bundle(staging, manifest, files, signer=signer, key=public_key)
        check_bundle_binding(check.manifest, model_path, gated_sha)
    return {"bundle": str(out), "verdict": verdict, "artifact": str(model_path), "format": fmt,
            "quant": quant, "profile": profile.name, "bytes": check.size, "sha256": check.sha256,
            "files": len(check.members), "notes": notes,
            "task": {"kind": task.kind, "source": task_source, "primary_metric": task.primary_metric,
                     "primary": task_scores["primary"] if task_scores else None},
            "signature": check.signature.describe() if check.signature else None}
