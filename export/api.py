"""`edgepack export`: turn a run's student (or any HF dir) into deployable artifacts.

``export_model`` resolves the source, checks the requested quantizations with the format's
``check_quants`` and runs the format's ``exporter`` (:mod:`edgepack.formats`), then records every
artifact (size, sha256, what the file actually stores) in ``export.json`` beside them. The
built-in exporters are here: :func:`export_gguf_artifacts` converts once to
``<model>-F16.gguf`` and quantizes that file to each requested type as ``<model>-<QUANT>.gguf``;
:func:`export_onnx_artifacts` writes one ``<model>-onnx-<quant>/`` folder per quantization. Each file
is written under a temporary name and renamed when whole, so an interrupted export
leaves no artifact under a final name; the next export removes what it left (and only that,
:func:`~edgepack.atomic.clean_stale`). An export holds the run's ``export`` lock
(:mod:`edgepack.locks`), so a second export of the same run is refused, not interleaved.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgepack.hashing import sha256_file
from edgepack.atomic import atomic_path, clean_stale, is_complete, scratch, write_json
from edgepack.constants import (ARTIFACTS_DIR, COMPLETE_MARKER, DATA_DIR, EXPORT_REPORT, FIDELITY_MARKDOWN,
                                FIDELITY_REPORT, HOLDOUT_FILE, RUN_TOML, STUDENT_DIR, TRAIN_FILE)
from edgepack.errors import ModelSourceError, RunDirError, UsageError
from edgepack.formats import Format, all_formats, get_format
from edgepack.locks import stage_lock
from edgepack.export.merge import ADAPTER_CONFIG
from edgepack.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    from edgepack.export.onnx.quantize import OnnxQuantOptions

FLOAT_TYPES = ("F32", "F16", "BF16")
RUN_MODEL_NAME = "student"
IMATRIX_SUFFIX = ".imatrix.gguf"




def resolve_source(source: Path) -> tuple[Path, str, Path | None]:
    """(HF dir, model name, default output dir) for a run dir or an HF model dir."""
    source = Path(source)
    if not source.is_dir():
        raise ModelSourceError(f"{source} is not a directory")
    if (source / RUN_TOML).is_file() or (source / STUDENT_DIR).is_dir():
        student = source / STUDENT_DIR
        if not student.is_dir() or not is_complete(student):
            raise RunDirError(f"{student} is missing or incomplete (no {COMPLETE_MARKER} marker)",
                              hint="run `edgepack distill train` on this run first")
        return student, RUN_MODEL_NAME, source / ARTIFACTS_DIR
    if (source / "config.json").is_file() or (source / ADAPTER_CONFIG).is_file():
        return source, source.name, None
    raise ModelSourceError(f"{source} is neither a run directory (run.toml, student/) nor an HF model "
                           "or LoRA adapter dir")


def _artifact_entry(out_dir: Path, path: Path, fmt: str, quant: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"path": path.relative_to(out_dir).as_posix(), "format": fmt, "quant": quant,
            "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}


def _merge_report(out_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Keep entries of an earlier export.json (e.g. another format) whose files still exist."""
    previous = out_dir / EXPORT_REPORT
    if not previous.is_file():
        return report
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return report
    ours = {a["path"] for a in report["artifacts"]}
    kept = [a for a in old.get("artifacts", []) if isinstance(a, dict) and a.get("path") not in ours
            and (out_dir / str(a.get("path"))).exists()]
    report["artifacts"] = kept + report["artifacts"]
    return report


def export_model(*, source: Path, fmt: str, quants: list[str], out_dir: Path | None,
                 progress: ProgressFn = null_progress, imatrix: bool = False, calibration: Path | None = None,
                 fidelity: bool = True, onnx_options: OnnxQuantOptions | None = None) -> dict[str, Any]:
    """Export a model to an artifact format (GGUF, ONNX or a registered one) and record the
    artifacts in export.json.

    ``source`` is a run directory (its ``student/`` must be complete; artifacts are named
    ``student-<QUANT>.gguf`` and go to ``RUN/artifacts`` by default) or an HF model dir
    (artifacts are named after the dir, ``<dirname>-<QUANT>.gguf``; ``--out`` is required).
    A LoRA adapter dir (``adapter_config.json``, as source or as the run's student) is
    merged into its local base model first.
    GGUF: ``<model>-F16.gguf`` is written once and each quant made from it; ``quants`` are
    llama.cpp types (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q4_1, IQ4_XS) or F32/F16/BF16
    (default Q4_K_M). ONNX: one folder ``<model>-onnx-<quant>/`` (model.onnx + config and
    tokenizer files) per quant in fp32/int8/int4 (default int4), with its logits measured
    against PyTorch. An empty ``quants`` list means the format's default. Options a format's
    exporter does not take (``export_options``: ``imatrix`` for GGUF, ``options`` for ONNX) are
    refused before any work.
    ``imatrix`` (GGUF): quantize with an importance matrix computed from ``calibration``
    (a JSONL of chat rows; default ``RUN/data/train.jsonl``) and saved as
    ``<model>.imatrix.gguf``; a ``calibration`` that is already a GGUF imatrix is used as is.
    ``onnx_options`` (ONNX int4/int8): block size, zero points, MatMulNBits accuracy level
    and the bits of the output head / embedding table; default block 32, integer zero points,
    accuracy level 4 (int8 compute), head int8 (see ``edgepack.export.onnx.quantize``).
    ``fidelity``: measure every artifact in the folder against the source model
    (``RUN/data/holdout.jsonl`` when there is one, else a built-in prompt set) and write
    ``fidelity.json`` and ``fidelity.md``. Returns the export.json dict.
    """
    artifact_format = get_format(fmt.lower())
    hf_dir, model, default_out = resolve_source(Path(source))
    out = Path(out_dir) if out_dir is not None else default_out
    if out is None:
        raise UsageError(f"exporting the HF dir {source} needs an output folder", hint="pass --out DIR")
    if not artifact_format.provides("exporter"):
        exporting = [f.name for f in all_formats() if f.provides("exporter")]
        raise UsageError(f"format {artifact_format.name!r} has no exporter", hint=f"use one of: {', '.join(exporting)}")
    wanted = _check_quants(artifact_format, quants)
    calibration = _check_calibration(artifact_format, Path(source), default_out, imatrix, calibration)
    if onnx_options is not None and "options" not in artifact_format.export_options:
        takers = [f for f in all_formats() if "options" in f.export_options]
        raise UsageError(f"{'/'.join(f.label for f in takers)} quantization options apply to "
                         f"--format {' or '.join(f.name for f in takers)} only")
    # One export at a time per run (or per output folder for an HF dir): two would replace each
    # other's files mid-write (issue #20 defect 11).
    with stage_lock(Path(source) if default_out is not None else out, "export"):
        return _export_locked(source=Path(source), fmt=artifact_format, hf_dir=hf_dir, model=model, out=out,
                              wanted=wanted, calibration=calibration, fidelity=fidelity,
                              onnx_options=onnx_options, progress=progress)


def _export_locked(*, source: Path, fmt: Format, hf_dir: Path, model: str, out: Path, wanted: list[str],
                   calibration: Path | None, fidelity: bool, onnx_options: OnnxQuantOptions | None,
                   progress: ProgressFn) -> dict[str, Any]:
    """:func:`export_model` once its inputs are checked and it holds the stage lock."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)  # what an export killed earlier left (never a live process's file, never a user's)
    export = fmt.part("exporter")

    def finish(model_dir: Path, merged_from: Path | None) -> dict[str, Any]:
        from edgepack.export.gguf.vocab import read_chat_template

        # The template travels into every artifact and is compiled by llama.cpp and transformers
        # there: a hostile one (a template bomb, an injection) is refused before any weights are read.
        read_chat_template(model_dir)
        options: dict[str, Any] = {}
        imatrix_info = None
        if onnx_options is not None:
            options["options"] = onnx_options
        if calibration is not None:
            imatrix_info = _imatrix(model_dir, model, out, calibration, progress)
            options["imatrix"] = out / imatrix_info["file"]
        artifacts, notes = export(model_dir, model, out, wanted, progress, **options)
        if merged_from is not None:
            notes.append(f"LoRA adapter {merged_from.name} was merged into its base before export")
        report = {
            "source": str(source), "model": model, "hf_dir": str(hf_dir), "format": fmt.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "artifacts": artifacts, "notes": notes,
        }
        if merged_from is not None:
            report["merged_adapter"] = str(merged_from)
        if imatrix_info is not None:
            report["imatrix"] = imatrix_info
        report = _merge_report(out, report)
        write_json(out / EXPORT_REPORT, report)
        if fidelity:  # export.json is written first: a failed measurement never hides the artifacts
            report["fidelity"] = _fidelity(Path(source), model_dir, out, report, progress)
            write_json(out / EXPORT_REPORT, report)
        return report

    if (hf_dir / "config.json").is_file():
        return finish(hf_dir, None)
    # a LoRA adapter dir: merge into its (local) base first, in a temporary folder under out
    from edgepack.export.merge import merge_lora

    with scratch(out, f"{model}-merge") as tmp:
        merged = merge_lora(hf_dir, tmp / model, progress=progress)
        return finish(merged, hf_dir)


def _check_calibration(fmt: Format, source: Path, run_artifacts: Path | None, imatrix: bool,
                       calibration: Path | None) -> Path | None:
    """The imatrix input (JSONL or GGUF imatrix) to use, checked before any work; None = no imatrix."""
    if not imatrix and calibration is None:
        return None
    if "imatrix" not in fmt.export_options:
        takers = [f.label for f in all_formats() if "imatrix" in f.export_options]
        raise UsageError(f"an importance matrix applies to {'/'.join(takers)} quantization only",
                         hint=f"drop --imatrix for {fmt.label}")
    if calibration is None:
        if run_artifacts is None:
            raise UsageError("--imatrix on an HF dir needs calibration text",
                             hint="pass --calibration FILE.jsonl (chat rows) or an existing imatrix .gguf")
        calibration = source / DATA_DIR / TRAIN_FILE
        if not calibration.is_file():
            raise RunDirError(f"{calibration} does not exist; the importance matrix is computed from it",
                              hint="run `edgepack distill data` first, or pass --calibration FILE.jsonl")
    if not Path(calibration).is_file():
        raise ModelSourceError(f"calibration file {calibration} does not exist")
    return Path(calibration)


def _imatrix(model_dir: Path, model: str, out: Path, calibration: Path, progress: ProgressFn) -> dict[str, Any]:
    """Compute ``<model>.imatrix.gguf`` from a JSONL, or copy a given GGUF imatrix; its summary."""
    import shutil

    from edgepack.export.gguf.imatrix import build_imatrix, is_imatrix_file, read_imatrix_meta

    dest = out / f"{model}{IMATRIX_SUFFIX}"
    if is_imatrix_file(calibration):
        if calibration.resolve() != dest.resolve():
            with atomic_path(dest) as tmp:
                shutil.copyfile(calibration, tmp)
        meta = read_imatrix_meta(dest)
        info = {"computed": False, "given": str(calibration), "datasets": meta["datasets"],
                "chunks": meta["chunk_count"], "chunk_size": meta["chunk_size"], "entries": meta["entries"],
                "sha256": sha256_file(dest)}
    else:
        info = {"computed": True, **build_imatrix(model_dir, dest, calibration, progress=progress)}
        info.pop("path")
    return {"file": dest.name, **info}


def _fidelity(source: Path, model_dir: Path, out: Path, report: dict[str, Any],
              progress: ProgressFn) -> dict[str, Any]:
    """Run the fidelity report over every artifact listed in ``report``; its summary for export.json."""
    from edgepack.export.fidelity.report import fidelity_report

    holdout = source / DATA_DIR / HOLDOUT_FILE
    paths = [out / a["path"] for a in report["artifacts"] if (out / a["path"]).exists()]
    fid = fidelity_report(model_dir, paths, holdout if holdout.is_file() else None, out,
                          command=_command_line(), progress=progress)
    return {"report": FIDELITY_REPORT, "markdown": FIDELITY_MARKDOWN, "prompts": fid["prompts"]["source"],
            "artifacts": [{"path": Path(a["path"]).relative_to(out).as_posix(), "quant": a["quant"],
                           "kld": a["kld"], "kld_reference": a["kld_reference"], "top1": a["top1"],
                           "tokenizer_ok": a["tokenizer"]["ok"],
                           "greedy_exact_match_rate": a["greedy"].get("exact_match_rate")}
                          for a in fid["artifacts"]]}


def _command_line() -> str:
    import shlex
    import sys

    return shlex.join(sys.argv)


def _check_quants(fmt: Format, quants: list[str]) -> list[str]:
    """The requested quant names for ``fmt``, checked before any work; the format's default when empty.

    The format's ``check_quants`` decides where it has one; otherwise a name must be one of its
    ``quants`` (case-blind, spelled as the format spells it).
    """
    asked = list(quants) or [fmt.default_quant or fmt.quants[0]]
    if fmt.provides("check_quants"):
        return list(fmt.part("check_quants")(asked))
    canonical = {q.lower(): q for q in fmt.quants}
    wanted = list(dict.fromkeys(canonical.get(q.lower(), q) for q in asked))
    for q in wanted:
        if q not in fmt.quants:
            raise UsageError(f"{q!r} is not a {fmt.label} quantization", hint=f"choose from {', '.join(fmt.quants)}")
    return wanted


def check_onnx_quants(quants: list[str]) -> list[str]:
    """ONNX quantizations, spelled lower case, as :mod:`edgepack.export.onnx.convert` makes them."""
    from edgepack.export.onnx.convert import ONNX_QUANTS

    wanted = list(dict.fromkeys(q.lower() for q in quants))
    for q in wanted:
        if q not in ONNX_QUANTS:
            raise UsageError(f"{q!r} is not an ONNX quantization", hint=f"choose from {', '.join(ONNX_QUANTS)}")
    return wanted


def check_gguf_quants(quants: list[str]) -> list[str]:
    """GGUF types, spelled upper case: F32/F16/BF16 or a type this llama.cpp build quantizes to."""
    from edgepack.export.gguf.quantize import QUANT_TYPES, supported_quants

    wanted = list(dict.fromkeys(q.upper() for q in quants))
    for q in wanted:
        if q not in FLOAT_TYPES and q not in QUANT_TYPES:
            raise UsageError(f"unknown quantization {q!r}",
                             hint=f"choose from {', '.join([*FLOAT_TYPES, *QUANT_TYPES])}")
        if q in QUANT_TYPES and q not in supported_quants():
            raise UsageError(f"{q} is not supported by this llama.cpp build",
                             hint=f"available: {', '.join(supported_quants())}")
    return wanted


def export_gguf_artifacts(hf_dir: Path, model: str, out: Path, wanted: list[str],
                 progress: ProgressFn, imatrix: Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``<model>-F16.gguf`` once, then each quant from it (weighted by ``imatrix`` when
    given); returns (artifacts, notes)."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.export.gguf.quantize import quant_report, quantize_gguf

    base_type = "F16" if "F16" in wanted or any(q not in FLOAT_TYPES for q in wanted) else wanted[0]
    steps = len(set(wanted) | {base_type})
    artifacts: list[dict[str, Any]] = []
    notes: list[str] = []
    progress("export", 0, steps)
    source_bytes = sum(p.stat().st_size for p in Path(hf_dir).glob("*.safetensors"))
    base = _on_disk(out, source_bytes, f"{model}-{base_type}.gguf", lambda: convert_hf_to_gguf(
        hf_dir, out / f"{model}-{base_type}.gguf", outtype=base_type, progress=progress))
    artifacts.append(_artifact_entry(out, base, "gguf", base_type, {}))
    progress("export", 1, steps)
    for q in wanted:
        if q == base_type:
            continue
        if q in FLOAT_TYPES:
            path = _on_disk(out, source_bytes, f"{model}-{q}.gguf", lambda: convert_hf_to_gguf(
                hf_dir, out / f"{model}-{q}.gguf", outtype=q, progress=progress))
            artifacts.append(_artifact_entry(out, path, "gguf", q, {}))
        else:
            path = _on_disk(out, base.stat().st_size, f"{model}-{q}.gguf",
                            lambda: quantize_gguf(base, out / f"{model}-{q}.gguf", q, imatrix=imatrix))
            info = quant_report(path, q)
            if imatrix is not None:
                info["imatrix"] = imatrix.name
            if info["fallback_tensors"]:
                notes.append(f"{q}: {info['fallback_tensors']} of {info['weight_matrices']} weight matrices have "
                             f"rows not a multiple of {info['block_size']}; llama.cpp stored them in a "
                             f"fallback type ({', '.join(info['tensor_types'])})")
            artifacts.append(_artifact_entry(out, path, "gguf", q, info))
        progress("export", len(artifacts), steps)
    return artifacts, notes


def _on_disk(out: Path, needed: int, name: str, write: Callable[[], Path]) -> Path:
    """Run ``write``; a failure on a disk without room for the file becomes one clear error.

    gguf-py reports a full disk as ``OSError('8192 requested and 6112 written')`` and llama.cpp's
    quantizer as ``basic_ios::clear: iostream error``; neither says why. The atomic writers
    have already removed their temporary file, so the previous artifacts are intact.
    ``needed`` is an upper bound of the file's size (the source weights, or the F16 base).
    """
    import errno
    import shutil

    try:
        return write()
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(out).free
        if getattr(exc, "errno", None) == errno.ENOSPC or free < needed:
            raise RunDirError(f"not enough disk space in {out} to write {name}: up to {needed / 2**20:.1f} MB "
                              f"needed, {free / 2**20:.1f} MB free ({exc})",
                              hint="free some space, or export to a folder on another disk (--out)") from exc
        raise


def export_onnx_artifacts(hf_dir: Path, model: str, out: Path, wanted: list[str], progress: ProgressFn,
                 options: OnnxQuantOptions | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One ``<model>-onnx-<quant>/`` folder per quant; returns (artifacts, notes)."""
    from edgepack.export.onnx.convert import export_onnx

    artifacts: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, q in enumerate(wanted):
        progress("export", i, len(wanted))
        info = export_onnx(hf_dir, out / f"{model}-onnx-{q}", quant=q, progress=progress, options=options)
        folder = info.pop("path")
        artifacts.append({"path": folder.relative_to(out).as_posix(), "format": "onnx", "quant": q, **info})
        p = info["parity"]
        notes.append(f"onnx {q}: max |logit diff| vs PyTorch {p['max_abs_diff_vs_torch']:.3g}, "
                     f"top-1 agreement {p['top1_agreement_vs_torch']:.0%} on a {p['prompt_tokens']}-token prompt")
    progress("export", len(wanted), len(wanted))
    return artifacts, notes
