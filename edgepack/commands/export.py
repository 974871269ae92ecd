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
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Convert a model to GGUF or ONNX and quantize it."""
    from edgepack.console import emit, progress_bars
    from edgepack.export.api import export_model

    with progress_bars(not json_out) as progress:
        report = export_model(source=source, fmt=fmt, quants=quant or [], out_dir=out,
                              progress=progress)
    emit(report, json_out)
