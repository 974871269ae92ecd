"""`edgepack profiles list|show|fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Hardware profiles: list, show, and fit a model to one.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


@app.command("list")
def list_cmd(json_out: JsonOpt = False) -> None:
    """List the shipped hardware profiles."""
    from edgepack.console import emit, out
    from edgepack.profiles import load_profile, shipped_profiles

    rows = [load_profile(n) for n in shipped_profiles()]
    data = [{"name": p.name, "device": p.device, "arch": p.arch, "threads": p.threads,
             "memory_budget_mb": p.memory_budget_mb, "description": p.description} for p in rows]

    def human(items: list[dict[str, Any]]) -> None:
        from rich.table import Table

        t = Table("name", "device", "arch", "threads", "memory MB", "description")
        for r in items:
            t.add_row(r["name"], r["device"], r["arch"], str(r["threads"]),
                      str(r["memory_budget_mb"]), r["description"])
        out.print(t)

    emit(data, json_out, human)


@app.command("show")
def show_cmd(profile: Annotated[str, typer.Argument(help="Shipped name or path to a .toml file.")],
             json_out: JsonOpt = False) -> None:
    """Show every field of a profile."""
    from edgepack.console import emit, out
    from edgepack.profiles import load_profile

    data = load_profile(profile).describe()

    def human(d: dict[str, Any]) -> None:
        for k, v in d.items():
            out.print(f"[bold]{k}[/bold]: {v}", highlight=False)

    emit(data, json_out, human)


@app.command("fit")
def fit_cmd(
    model: Annotated[Path, typer.Argument(help="An HF model dir, a .gguf file, or an ONNX model.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name or .toml path.")],
    context: Annotated[int | None, typer.Option(help="Context length (default: the profile's).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Estimate deploy and training memory of MODEL for a profile."""
    from edgepack.console import emit, out
    from edgepack.profiles import load_profile
    from edgepack.profiles.fit import fit_model

    result = fit_model(model, load_profile(profile), context=context)

    def human(r: dict[str, Any]) -> None:
        from rich.table import Table

        t = Table("format", "quant", "weights MB", "KV MB", "overhead MB", "total MB", "fits",
                  title=f"deploy on {r['profile']} (budget {r['budget_mb']} MB, ctx {r['context']})")
        for d in r["deploy"]:
            t.add_row(d["format"], d["quant"], *(f"{d[k] / 2**20:.1f}" for k in
                      ("weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes")),
                      "[green]yes[/green]" if d["fits"] else "[red]no[/red]")
        out.print(t)
        tr = r["train"]
        growth = f" + {tr['process_growth_bytes'] / 2**20:.0f} MB process" if tr["process_growth_bytes"] else ""
        out.print(f"train on {tr['device']} ({tr['method']}, micro-batch {tr['micro_batch']}): "
                  f"{tr['total_bytes'] / 2**20:.0f} MB{growth} of {tr['budget_bytes'] / 2**20:.0f} MB → "
                  f"{'fits' if tr['fits'] else 'does not fit'} (distill train plans again: LoRA, smaller "
                  "micro-batches, checkpointing)")
        for note in r.get("notes", []):
            out.print(f"note: {note}")

    emit(result, json_out, human)
