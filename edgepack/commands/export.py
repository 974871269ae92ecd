"""`edgepack export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_cmd(
    source: Annotated[Path, typer.Argument(help="A run directory (its student/) or an HF model dir.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf or onnx.")] = "gguf",
    quant: Annotated[list[str] | None, typer.Option("--quant", help="Quantization type; repeatable (default: Q4_K_M for gguf, int4 for onnx).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/artifacts).")] = None,
    imatrix: Annotated[bool, typer.Option("--imatrix", help="GGUF: quantize with an importance matrix computed from RUN/data/train.jsonl (or --calibration).")] = False,
    calibration: Annotated[Path | None, typer.Option(help="Calibration for --imatrix: a JSONL of chat rows or an existing GGUF imatrix.")] = None,
    fidelity: Annotated[bool, typer.Option("--fidelity/--no-fidelity", help="Measure every artifact against the source model (fidelity.json, fidelity.md).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Convert a model to GGUF or ONNX and quantize it."""
    from edgepack.console import emit, progress_bars
    from edgepack.export.api import export_model

    with progress_bars(not json_out) as progress:
        report = export_model(source=source, fmt=fmt, quants=quant or [], out_dir=out, progress=progress,
                              imatrix=imatrix or calibration is not None, calibration=calibration,
                              fidelity=fidelity)
    emit(report, json_out)
