"""`edgepack run`, `edgepack chat` and `edgepack serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

KeyOpt = Annotated[Path | None, typer.Option("--key", help="Ed25519 public key (PEM): require its signature.")]


def _not_text(text: str) -> bool:
    """True when ``text`` holds lone surrogates: bytes that were not UTF-8 (surrogateescape), or a
    ``\\ud800`` escape; no tokenizer or writer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def run_cmd(
    model: Annotated[Path, typer.Argument(help="A .edgepack bundle or a .gguf file.")],
    prompt: Annotated[str, typer.Option("--prompt", help="User message to complete.")],
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    key: KeyOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Verify and load a bundle, then complete one chat prompt (streamed)."""
    import sys

    from edgepack.console import emit, warn
    from edgepack.errors import UsageError
    from edgepack.runtime.session import open_model

    if _not_text(prompt):  # checked before the model is loaded
        raise UsageError("--prompt is not valid UTF-8 text (it holds bytes that decode to lone surrogates)",
                         hint="pass the prompt as UTF-8 text, e.g. convert it with iconv")
    with open_model(model, key=key, warn=warn) as session:
        if json_out:
            text = "".join(session.stream_chat([{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=temperature))
            emit({"model": str(model), "prompt": prompt, "completion": text}, True)
            return
        for piece in session.stream_chat([{"role": "user", "content": prompt}],
                                         max_tokens=max_tokens, temperature=temperature):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def chat_cmd(
    model: Annotated[Path, typer.Argument(help="A .edgepack bundle or a .gguf file.")],
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    key: KeyOpt = None,
) -> None:
    """Interactive chat with a bundle (empty line or Ctrl-D to quit)."""
    import sys

    from edgepack.console import err, warn
    from edgepack.runtime.session import open_model

    history: list[dict[str, str]] = []
    with open_model(model, key=key, warn=warn) as session:
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
            reply = []
            for piece in session.stream_chat(history, max_tokens=max_tokens, temperature=temperature):
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
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = 4,
    timeout: Annotated[float, typer.Option(help="Per-request deadline in seconds.")] = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1 << 20,
    ctx: Annotated[int | None, typer.Option(help="Context length (default: the bundle's profile).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the bundle's profile).")] = None,
    fallback: Annotated[str | None, typer.Option(help="Teacher endpoint openai:URL#MODEL for low-confidence answers.")] = None,
    fallback_min_logprob: Annotated[float | None, typer.Option(help="Mean token logprob below which the teacher answers.")] = None,
    fallback_api_key_env: Annotated[str | None, typer.Option(help="Env var holding the teacher endpoint's key.")] = None,
    key: KeyOpt = None,
) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API until Ctrl-C."""
    from edgepack.console import err, warn
    from edgepack.errors import UsageError
    from edgepack.runtime.server.serve import serve

    if (fallback is None) != (fallback_min_logprob is None):
        raise UsageError("--fallback and --fallback-min-logprob go together",
                         hint="e.g. --fallback openai:http://127.0.0.1:9000/v1#teacher --fallback-min-logprob -1.5")
    try:
        serve(model, host=host, port=port, api_key_env=api_key_env, max_queue=max_queue, timeout_s=timeout,
              max_body_bytes=max_body, n_ctx=ctx, threads=threads, fallback=fallback,
              fallback_min_logprob=fallback_min_logprob, fallback_api_key_env=fallback_api_key_env,
              public_key=key, on_ready=lambda url: err.print(f"serving {url} (Ctrl-C to stop)"), on_warning=warn)
    except KeyboardInterrupt:
        err.print("stopped")
