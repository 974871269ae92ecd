"""`edgepack gate`: measure an artifact on this machine against a profile's budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def gate_cmd(
    artifact: Annotated[Path, typer.Argument(help="A .gguf file, an ONNX folder, or a .edgepack bundle.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    holdout: Annotated[Path | None, typer.Option(help="Holdout JSONL for the quality check.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here too.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Measure latency, memory and quality in the real runtime; exit 0 only on PASS."""
    from edgepack.atomic import write_json
    from edgepack.console import emit, out, progress_bars
    from edgepack.constants import PASS
    from edgepack.profiles import load_profile
    from edgepack.runtime.gate import run_gate

    prof = load_profile(profile)
    with progress_bars(not json_out) as progress:
        result = run_gate(artifact=artifact, profile=prof, holdout=holdout, progress=progress)
    if report is not None:
        write_json(report, result)

    def human(r: dict[str, Any]) -> None:
        from rich.table import Table

        t = Table("check", "measured", "budget", "ok", title=f"gate {r['artifact']} on {r['profile']}")
        for c in r["checks"]:
            t.add_row(c["name"], str(c["measured"]), str(c["budget"]),
                      {True: "[green]yes[/green]", False: "[red]no[/red]"}.get(c["ok"], "n/a"))
        out.print(t)
        colour = {"PASS": "green", "FAIL": "red"}.get(r["verdict"], "yellow")
        out.print(f"verdict: [bold {colour}]{r['verdict']}[/bold {colour}]"
                  + (f" — {'; '.join(r['reasons'])}" if r.get("reasons") else ""))

    emit(result, json_out, human)
    if result["verdict"] != PASS:
        raise typer.Exit(1)
