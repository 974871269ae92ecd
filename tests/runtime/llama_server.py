"""llama.cpp's own server (``llama-server``) for the parity tests: find the binary, read a
bundle's Modelfile as Ollama does, turn its settings into what llama-server takes, and run
servers (llama-server, ``edgepack serve``) on loopback.

``make llama-server`` builds the binary from the llama.cpp source that llama-cpp-python's sdist
vendors (the version pyproject.toml pins, so the same llama.cpp edgepack's runtime links) and
``make test`` names it in ``EDGEPACK_LLAMA_SERVER``. Under ``make test`` a missing binary is a
failure; pytest run by hand without the variable skips, saying how to get one.

The Modelfile is the deployer's contract: SYSTEM becomes the system turn of every request and
each PARAMETER becomes the llama-server request field or flag of the same meaning
(:data:`REQUEST_FIELDS`, :data:`SERVER_FLAGS`; names from llama.cpp's tools/server/README.md).
A PARAMETER in neither table fails the test, so a setting the packer adds is never dropped here
unnoticed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ENV_VAR = "EDGEPACK_LLAMA_SERVER"

# Modelfile PARAMETER (Ollama's name) -> llama-server's /v1/chat/completions field and the value's
# type. The chat endpoint takes the /completion options (tools/server/README.md); ``n_predict``
# is llama.cpp's name for Ollama's num_predict. ``stop`` repeats in a Modelfile, a list here.
REQUEST_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", float),
    "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "num_predict": ("n_predict", int),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "seed": ("seed", int),
    "stop": ("stop", str),
}
# Modelfile PARAMETERs that llama-server takes when it starts, not per request.
SERVER_FLAGS: dict[str, str] = {
    "num_ctx": "--ctx-size",
}
# Runtime knobs the Modelfile does not carry, set as edgepack's runtime has them so that the only
# differences left are the ones under test: one slot, no prompt cache (llama-server's README:
# reused KV cache "can cause nondeterministic results"), flash attention off (edgepack's llama.cpp
# backend loads with llama-cpp-python's default, off), one thread (a shared 2-core CI box).
FIXED_FLAGS = ("--parallel", "1", "--no-cache-prompt", "--flash-attn", "off", "--threads", "1",
               "--threads-batch", "1", "--no-warmup")


def llama_server_binary() -> Path:
    """The llama-server to test against, from ``EDGEPACK_LLAMA_SERVER``.

    ``make test`` always sets the variable, so a path that is not an executable fails the test
    there; without the variable (pytest by hand) the test skips with the reason.
    """
    value = os.environ.get(ENV_VAR)
    if not value:
        pytest.skip(f"{ENV_VAR} is not set: `make test` builds llama.cpp's server and sets it, or run "
                    f"`make llama-server` and export {ENV_VAR}=<the path it builds>")
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{ENV_VAR}={value} is not an executable llama-server; `make llama-server` builds it "
                    "(make test depends on it)", pytrace=False)
    return path


# --- the Modelfile --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile says about decoding: its SYSTEM and its PARAMETERs in order."""

    system: str | None
    parameters: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.parameters if n == name]


# An instruction at the start of a line and its argument: a """triple-quoted""" block (may span
# lines), or the rest of the line. Lines starting with # are comments (they do not match).
_INSTRUCTION = re.compile(r'^[ \t]*(?P<cmd>[A-Za-z]+)[ \t]+(?P<arg>[^\n]*?"""(?s:.*?)"""|[^\n]*)', re.M)


def _unquote(value: str) -> str:
    """A Modelfile value: the text inside triple or single double quotes as is (Ollama's parser
    knows no escapes), else the stripped rest of the line."""
    value = value.strip()
    for quote in ('"""', '"'):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote):-len(quote)]
    return value


def read_modelfile(text: str) -> Modelfile:
    """SYSTEM and PARAMETERs of an Ollama Modelfile (instructions are case-insensitive)."""
    system: str | None = None
    parameters: list[tuple[str, str]] = []
    for m in _INSTRUCTION.finditer(text):
        cmd, arg = m["cmd"].upper(), m["arg"]
        if cmd == "SYSTEM":
            system = _unquote(arg)
        elif cmd == "PARAMETER":
            name, _, value = arg.strip().partition(" ")
            parameters.append((name.lower(), _unquote(value)))
    return Modelfile(system, tuple(parameters))


def request_body(modelfile: Modelfile, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The /v1/chat/completions body that asks llama-server what ``messages`` ask, with the
    Modelfile's settings: its SYSTEM first (unless the chat has a system turn) and every
    request PARAMETER as llama-server's field."""
    turns = list(messages)
    if modelfile.system is not None and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": modelfile.system})
    body: dict[str, Any] = {"messages": turns}
    for name, value in modelfile.parameters:
        if name in SERVER_FLAGS:
            continue
        assert name in REQUEST_FIELDS, f"Modelfile PARAMETER {name} has no llama-server equivalent here"
        field, kind = REQUEST_FIELDS[name]
        if name == "stop":
            body.setdefault(field, []).append(kind(value))
        else:
            body[field] = kind(value)
    return body


def server_flags(modelfile: Modelfile) -> list[str]:
    """llama-server flags for the Modelfile's load-time PARAMETERs (num_ctx), then :data:`FIXED_FLAGS`."""
    flags = [arg for name, value in modelfile.parameters if name in SERVER_FLAGS for arg in (SERVER_FLAGS[name], value)]
    return [*flags, *FIXED_FLAGS]


# --- servers on loopback --------------------------------------------------------------------------

def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, path: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
    """POST JSON to 127.0.0.1:``port``; (status, decoded JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


class LoopbackServer:
    """A server process (``command`` listening on ``port``), ready once ``GET /health`` is 200;
    stopped with SIGTERM (then SIGKILL) on exit. Its output goes to ``log``."""

    def __init__(self, command: Sequence[str], port: int, log: Path, *, env: dict[str, str] | None = None,
                 start_timeout: float = 120.0) -> None:
        self.command, self.port, self.log, self.env = list(command), port, log, env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LoopbackServer:
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.command, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while _health(self.port) != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{Path(self.command[0]).name} did not become ready on port {self.port}:\n"
                                     f"{self.log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        return self

    def chat(self, body: dict[str, Any]) -> str:
        """The assistant text of one /v1/chat/completions request."""
        status, reply = post(self.port, "/v1/chat/completions", body)
        assert status == 200, f"{status}: {reply}"
        return str(reply["choices"][0]["message"]["content"] or "")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def llama_server(binary: Path, model: Path, modelfile: Modelfile, log: Path) -> LoopbackServer:
    """llama-server on ``model`` with the Modelfile's load-time settings, on a free loopback port."""
    port = free_port()
    return LoopbackServer([str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                           *server_flags(modelfile)], port, log)
