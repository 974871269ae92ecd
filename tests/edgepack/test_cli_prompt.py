"""`run --prompt` and `chat` input that is not Unicode text: one clear line, exit 2 (issue #20 defect 12).

Arguments and standard input that are not valid UTF-8 reach Python as lone surrogates
(surrogateescape); they used to travel to the tokenizer and end as an internal error (exit 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


ENV = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "200"}


@pytest.mark.parametrize("prompt", [b"Pump P-1 \xff vibration", b"\xed\xa0\x80", b"ok\x80"])
def test_run_prompt_that_is_not_text_exits_2(tiny_gguf: Path, prompt: bytes) -> None:  # noqa: F811
    out = subprocess.run([sys.executable, "-m", "edgepack", "run", str(tiny_gguf), "--prompt", prompt,
                          "--max-tokens", "4"], capture_output=True, env=ENV, timeout=300)
    stderr = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2, stderr[-2000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--prompt" in errors[0] and "Traceback" not in stderr
    assert "hint:" in stderr


@pytest.mark.parametrize("stdin_errors", ["strict", "surrogateescape"])
def test_chat_line_that_is_not_text_is_refused_and_the_chat_goes_on(tiny_gguf: Path,  # noqa: F811
                                                                    stdin_errors: str) -> None:
    out = subprocess.run([sys.executable, "-m", "edgepack", "chat", str(tiny_gguf), "--max-tokens", "4"],
                         input=b"caf\xe9 alarm\nPump P-1 vibration high\n\n", capture_output=True,
                         env={**ENV, "PYTHONIOENCODING": f"utf-8:{stdin_errors}"}, timeout=300)
    stderr = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 0, stderr[-2000:]
    assert "not valid UTF-8 text" in stderr and "Traceback" not in stderr
    assert out.stdout.count(b"\n") >= 1  # the second line was answered
