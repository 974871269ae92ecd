"""`edgepack export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgepack.constants import ARTIFACTS_DIR, EXPORT_REPORT, FIDELITY_MARKDOWN, RUN_TOML


def export_cmd(
    source: Annotated[Path, typer.Argument(help="A run directory (its student/) or an HF model dir.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf, onnx, or a format a package registers (edgepack.formats).")] = "gguf",
    quant: Annotated[list[str] | None, typer.Option("--quant", help="Quantization type; repeatable (default: Q4_K_M for gguf, int4 for onnx).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/artifacts).")] = None,
    imatrix: Annotated[bool, typer.Option("--imatrix", help="GGUF: quantize with an importance matrix computed from RUN/data/train.jsonl (or --calibration).")] = False,
    calibration: Annotated[Path | None, typer.Option(help="Calibration for --imatrix: a JSONL of chat rows or an existing GGUF imatrix.")] = None,
    onnx_block_size: Annotated[int | None, typer.Option(help="ONNX int4/int8: weights per scale (16-256; default 32).")] = None,
    onnx_symmetric: Annotated[bool | None, typer.Option("--onnx-symmetric/--onnx-zero-points", help="ONNX: no zero points, or a 4-bit integer zero point per block (default).")] = None,
    onnx_accuracy_level: Annotated[int | None, typer.Option(help="ONNX MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (default 4).")] = None,
    onnx_head_bits: Annotated[int | None, typer.Option(help="ONNX: bits of the output head / embedding table, 4 or 8 (default 8).")] = None,
    fidelity: Annotated[bool, typer.Option("--fidelity/--no-fidelity", help="Measure every artifact against the source model (fidelity.json, fidelity.md).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Convert a model to GGUF, ONNX or a registered artifact format and quantize it."""
    from edgepack.console import emit, progress_bars
    from edgepack.export.api import export_model
    from edgepack.logs import stage_log

    from edgepack.export.onnx.quantize import OnnxQuantOptions

    given = {"block_size": onnx_block_size, "symmetric": onnx_symmetric, "accuracy_level": onnx_accuracy_level,
             "head_bits": onnx_head_bits}
    given = {k: v for k, v in given.items() if v is not None}
    run_dir = source if (source / RUN_TOML).is_file() else None
    with stage_log("export", run_dir), progress_bars(not json_out) as progress:
        report = export_model(source=source, fmt=fmt, quants=quant or [], out_dir=out, progress=progress,
                              imatrix=imatrix or calibration is not None, calibration=calibration,
                              fidelity=fidelity, onnx_options=OnnxQuantOptions(**given) if given else None)
    emit(report, json_out, lambda r: _summary(r, out or source / ARTIFACTS_DIR))


def _summary(report: dict[str, Any], out: Path) -> None:
    """One line per artifact (size, quant), the notes, and where export.json is."""
    from edgepack.console import out as stdout

    for art in report.get("artifacts") or []:
        stdout.print(f"{art['format']} {art['quant']}: {out / art['path']} ({art['bytes'] / 1e6:.1f} MB)",
                     highlight=False, soft_wrap=True)
    for note in report.get("notes") or []:
        stdout.print(f"note: {note}", highlight=False, soft_wrap=True)
    fidelity = report.get("fidelity")
    if fidelity:
        stdout.print(f"fidelity: {out / FIDELITY_MARKDOWN}", highlight=False, soft_wrap=True)
    stdout.print(f"report: {out / EXPORT_REPORT} (--json prints it)", highlight=False, soft_wrap=True)
