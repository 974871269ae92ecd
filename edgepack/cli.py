"""Wiring only: assemble the command groups into the ``edgepack`` app.

Command modules import nothing heavy at module level, so ``edgepack --help`` does not
import torch, onnxruntime or llama_cpp.
"""

from __future__ import annotations

import sys

import typer

from edgepack.commands import bundle, distill, export, gate, pipeline, profiles, run

app = typer.Typer(
    name="edgepack",
    help="Distill a teacher LLM into a small, verified bundle for a named edge device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show third-party logs and "
                                          "warnings on stderr (they always go to RUN/logs/<stage>.log).")) -> None:
    from edgepack.logs import set_verbose

    set_verbose(verbose)


app.add_typer(profiles.app, name="profiles")
app.add_typer(distill.app, name="distill")
app.command("eval")(distill.eval_cmd)
app.command("export")(export.export_cmd)
app.command("gate")(gate.gate_cmd)
app.command("pack")(bundle.pack_cmd)
app.command("verify")(bundle.verify_cmd)
app.command("keygen")(bundle.keygen_cmd)
app.command("run")(run.run_cmd)
app.command("chat")(run.chat_cmd)
app.command("serve")(run.serve_cmd)
app.command("pipeline")(pipeline.pipeline_cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; an edgepack error becomes one line and an exit code.

    Usage errors are typer's own (exit 2); commands signal a failed check with
    ``typer.Exit(1)``; anything else raised is mapped by :func:`report_error`.
    """
    from edgepack.console import report_error

    try:
        app(args=argv, prog_name="edgepack")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        return report_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
