"""`edgepack run`, `edgepack chat` and `edgepack serve`.

All three apply the bundle's task by default (:meth:`edgepack.runtime.session.ModelSession.apply_task`):
its system prompt (``--system`` replaces it; a request's own system message wins in ``serve``)
and its decoding (``--max-tokens``, ``--temperature``, ``--repeat-penalty`` override a field).
``--no-task`` gives the raw model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

KeyOpt = Annotated[Path | None, typer.Option("--key", help="Ed25519 public key (PEM): require its signature.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt instead of the task's.")]
NoTaskOpt = Annotated[bool, typer.Option("--no-task", help="The raw model: no task system prompt or decoding.")]
TemperatureOpt = Annotated[float | None, typer.Option(help="0 = greedy (default: the task's, else 0).")]
PenaltyOpt = Annotated[float | None, typer.Option(help="llama.cpp's repeat penalty, 1 = none "
                                                       "(default: the task's, else 1).")]
RUN_MAX_TOKENS = 128   # without a task
CHAT_MAX_TOKENS = 256  # without a task


def _not_text(text: str) -> bool:
    """True when ``text`` holds lone surrogates: bytes that were not UTF-8 (surrogateescape), or a
    ``\\ud800`` escape; no tokenizer or writer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_text(value: str | None, flag: str) -> None:
    """UsageError before the model is loaded when ``value`` is not UTF-8 text."""
    from edgepack.errors import UsageError

    if value is not None and _not_text(value):
        raise UsageError(f"{flag} is not valid UTF-8 text (it holds bytes that decode to lone surrogates)",
                         hint="pass it as UTF-8 text, e.g. convert it with iconv")


def _check_decoding(max_tokens: int | None, temperature: float | None, repeat_penalty: float | None) -> None:
    """UsageError before the model is loaded for a decoding flag the session would refuse."""
    from edgepack.errors import UsageError
    from edgepack.runtime.session import apply_task

    try:
        apply_task(None, [], max_tokens=max_tokens, temperature=temperature, repeat_penalty=repeat_penalty)
    except UsageError as exc:
        raise UsageError(str(exc), hint="--max-tokens >= 1, --temperature >= 0 (0 = greedy), "
                                        "--repeat-penalty > 0 (1 = none)") from None


def run_cmd(
    model: Annotated[Path, typer.Argument(help="A .edgepack bundle or a .gguf file.")],
    prompt: Annotated[str, typer.Option("--prompt", help="User message to complete.")],
    max_tokens: Annotated[int | None, typer.Option(help="Maximum new tokens (default: the task's, "
                                                               f"else {RUN_MAX_TOKENS}).")] = None,
    temperature: TemperatureOpt = None,
    repeat_penalty: PenaltyOpt = None,
    system: SystemOpt = None,
    no_task: NoTaskOpt = False,
    key: KeyOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Verify and load a bundle, then answer one prompt under its task (streamed)."""
    import sys

    from edgepack.console import emit, warn
    from edgepack.runtime.session import open_model

    _check_text(prompt, "--prompt")  # checked before the model is loaded
    _check_text(system, "--system")
    _check_decoding(max_tokens, temperature, repeat_penalty)
    with open_model(model, key=key, warn=warn, no_task=no_task) as session:
        messages, decoding, schema = session.apply_task(
            [{"role": "user", "content": prompt}], system=system, max_tokens=max_tokens, temperature=temperature,
            repeat_penalty=repeat_penalty, default_max_tokens=RUN_MAX_TOKENS)
        if json_out:
            text = "".join(session.answer(messages, decoding, schema))
            emit({"model": str(model), "prompt": prompt, "completion": text,
                  "task": session.task.kind if session.task is not None else None,
                  "system": messages[0]["content"] if messages[0]["role"] == "system" else None,
                  "decoding": decoding.to_json(), "json_schema": schema is not None}, True)
            return
        for piece in session.answer(messages, decoding, schema):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def chat_cmd(
    model: Annotated[Path, typer.Argument(help="A .edgepack bundle or a .gguf file.")],
    max_tokens: Annotated[int | None, typer.Option(help="Maximum new tokens per reply (default: the "
                                                               f"task's, else {CHAT_MAX_TOKENS}).")] = None,
    temperature: TemperatureOpt = None,
    repeat_penalty: PenaltyOpt = None,
    system: SystemOpt = None,
    no_task: NoTaskOpt = False,
    key: KeyOpt = None,
) -> None:
    """Interactive chat with a bundle under its task (empty line or Ctrl-D to quit)."""
    import sys

    from edgepack.console import err, warn
    from edgepack.runtime.session import open_model

    _check_text(system, "--system")
    _check_decoding(max_tokens, temperature, repeat_penalty)
    history: list[dict[str, str]] = []
    with open_model(model, key=key, warn=warn, no_task=no_task) as session:
        err.print("[dim]empty line or Ctrl-D to quit[/dim]")
        if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, not as a crash
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            if _not_text(line):
                err.print("that line is not valid UTF-8 text; type it again")
                continue
            history.append({"role": "user", "content": line})
            messages, decoding, schema = session.apply_task(
                history, system=system, max_tokens=max_tokens, temperature=temperature,
                repeat_penalty=repeat_penalty, default_max_tokens=CHAT_MAX_TOKENS)
            reply = []
            for piece in session.answer(messages, decoding, schema):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})


def serve_cmd(
    model: Annotated[Path, typer.Argument(help="A .edgepack bundle or a .gguf file.")],
    host: Annotated[str, typer.Option(help="Bind address (loopback by default; others need an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(help="Env var holding the API key (Bearer token).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429 with Retry-After.")] = 16,
    timeout: Annotated[float, typer.Option(help="Per-request deadline in seconds.")] = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1 << 20,
    ctx: Annotated[int | None, typer.Option(help="Context length (default: the bundle's profile).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the bundle's profile).")] = None,
    fallback: Annotated[str | None, typer.Option(help="Teacher endpoint openai:URL#MODEL for low-confidence answers.")] = None,
    fallback_min_logprob: Annotated[float | None, typer.Option(help="Mean token logprob below which the teacher answers.")] = None,
    fallback_api_key_env: Annotated[str | None, typer.Option(help="Env var holding the teacher endpoint's key.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt for requests without one, "
                                                                "instead of the task's.")] = None,
    no_task: NoTaskOpt = False,
    key: KeyOpt = None,
) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API until Ctrl-C (chat requests get its task)."""
    from edgepack.console import err, warn
    from edgepack.errors import UsageError
    from edgepack.runtime.server.serve import serve

    _check_text(system, "--system")
    if (fallback is None) != (fallback_min_logprob is None):
        raise UsageError("--fallback and --fallback-min-logprob go together",
                         hint="e.g. --fallback openai:http://127.0.0.1:9000/v1#teacher --fallback-min-logprob -1.5")
    try:
        serve(model, host=host, port=port, api_key_env=api_key_env, max_queue=max_queue, timeout_s=timeout,
              max_body_bytes=max_body, n_ctx=ctx, threads=threads, fallback=fallback,
              fallback_min_logprob=fallback_min_logprob, fallback_api_key_env=fallback_api_key_env,
              public_key=key, on_ready=lambda url: err.print(f"serving {url} (Ctrl-C to stop)"), on_warning=warn,
              no_task=no_task, system=system)
    except KeyboardInterrupt:
        err.print("stopped")
