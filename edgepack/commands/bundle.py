"""`edgepack pack` and `edgepack verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def pack_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory with gated artifacts.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    artifact: Annotated[Path | None, typer.Option(help="Which gated artifact (default: the best PASS).")] = None,
    allow_unverified: Annotated[bool, typer.Option(help="Also package an UNVERIFIED gate (recorded).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Package a gated artifact into a verifiable .edgepack bundle."""
    from edgepack.console import emit
    from edgepack.export.pack import pack_run
    from edgepack.profiles import load_profile

    result = pack_run(run_dir=run, profile=load_profile(profile), artifact=artifact,
                      allow_unverified=allow_unverified)
    emit(result, json_out)


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="A .edgepack bundle.")],
    json_out: JsonOpt = False,
) -> None:
    """Check a bundle's schema and every file hash; exit 1 naming the file on mismatch."""
    from edgepack.console import emit, out
    from edgepack.runtime.bundle import verify_bundle

    manifest = verify_bundle(bundle)
    result = {"bundle": str(bundle), "ok": True, "manifest": manifest}
    emit(result, json_out, lambda r: out.print(
        f"[green]OK[/green] {bundle}: {len(manifest['files'])} files verified"))
