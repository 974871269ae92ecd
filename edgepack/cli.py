"""Wiring only: assemble the command groups into the ``edgepack`` app.

Command modules import nothing heavy at module level, so ``edgepack --help`` does not
import torch, onnxruntime or llama_cpp.
"""

from __future__ import annotations

import sys

import click
import typer

from edgepack.commands import bundle, distill, export, gate, pipeline, profiles, run

app = typer.Typer(
    name="edgepack",
    help="Distill a teacher LLM into a small, verified bundle for a named edge device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(profiles.app, name="profiles")
app.add_typer(distill.app, name="distill")
app.command("eval")(distill.eval_cmd)
app.command("export")(export.export_cmd)
app.command("gate")(gate.gate_cmd)
app.command("pack")(bundle.pack_cmd)
app.command("verify")(bundle.verify_cmd)
app.command("run")(run.run_cmd)
app.command("chat")(run.chat_cmd)
app.command("serve")(run.serve_cmd)
app.command("pipeline")(pipeline.pipeline_cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map errors to one line and an exit code."""
    from edgepack.console import report_error

    try:
        result = app(args=argv, standalone_mode=False, prog_name="edgepack")
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        return report_error(exc)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
