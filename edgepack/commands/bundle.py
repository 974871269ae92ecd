"""`edgepack pack`, `edgepack verify` and `edgepack keygen`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def pack_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory with gated artifacts.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    artifact: Annotated[Path | None, typer.Option(help="Which gated artifact (default: the best PASS).")] = None,
    allow_unverified: Annotated[bool, typer.Option(help="Also package an UNVERIFIED gate (recorded).")] = False,
    sign: Annotated[Path | None, typer.Option("--sign", help="Ed25519 private key (PEM) to sign with.")] = None,
    license_id: Annotated[str | None, typer.Option(
        "--license", help="Hub license id the model card states (default: the student's, else the teacher's).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Package a gated artifact into a verifiable .edgepack bundle (signed with --sign)."""
    from edgepack.console import emit
    from edgepack.export.pack.pack import pack_run
    from edgepack.logs import stage_log
    from edgepack.profiles import load_profile

    with stage_log("pack", run):
        result = pack_run(run_dir=run, profile=load_profile(profile), artifact=artifact,
                          allow_unverified=allow_unverified, sign_key=sign, license=license_id)
    emit(result, json_out)


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="A .edgepack bundle.")],
    key: Annotated[Path | None, typer.Option("--key", help="Ed25519 public key (PEM): require its signature.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check a bundle's schema, every file hash and, with --key, its signature; failures name the file."""
    from edgepack.console import emit, out
    from edgepack.runtime.bundle.archive import inspect_bundle

    check = inspect_bundle(bundle, key=key)
    manifest = check.manifest
    signature = check.signature.describe() if check.signature else None
    result = {"bundle": str(bundle), "ok": True, "signature": signature, "manifest": manifest}

    def human(_: object) -> None:
        signed = ("signature verified (key " + signature["key_id"][:16] + "…)" if signature and signature["verified"]
                  else "signed, signature not checked (pass --key)" if signature else "unsigned")
        out.print(f"[green]OK[/green] {bundle}: {len(manifest['files'])} files verified; {signed}; "
                  f"{_task_line(manifest)}")

    emit(result, json_out, human)


def _task_line(manifest: dict[str, Any]) -> str:
    """``task labels, accuracy 0.800 gated`` (or why there is no task or score) for verify's line."""
    from edgepack.constants import M_TASK, M_TASK_SCORES

    task, scores = manifest.get(M_TASK), manifest.get(M_TASK_SCORES)
    if not isinstance(task, dict):
        return "no task (packed before bundles carried one)"
    kind = task["answer"]["kind"]
    if not isinstance(scores, dict) or scores.get("primary") is None:
        return f"task {kind}, no gated score"
    return f"task {kind}, {scores['primary_metric']} {scores['primary']:.3f} gated"


def keygen_cmd(
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Writes OUT.key (private, 0600) and OUT.pub.")],
    json_out: JsonOpt = False,
) -> None:
    """Create an Ed25519 key pair for `pack --sign` / `verify --key`."""
    from edgepack.console import emit, out
    from edgepack.runtime.bundle.signing import generate_keypair

    result = generate_keypair(out_path)
    emit(result, json_out, lambda r: out.print(f"wrote {r['private_key']} (keep secret) and {r['public_key']}; "
                                               f"key id {r['key_id']}"))
