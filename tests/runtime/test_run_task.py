"""`edgepack run` and `chat` apply the bundle's task by default; `--system` and `--no-task` override.

A real tiny GGUF in a real bundle whose manifest carries a task; each CLI answer is compared
with the session's own answer to the same messages under the same decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgepack.runtime.session import open_model
from edgepack.task import DEMO_TASK, Decoding, Task
from tests.runtime.test_session_task import _bundle

PROMPT = "Compressor C-12 tripped on high vibration."
TASK = replace(DEMO_TASK, system_prompt="Classify the alarm.", decoding=Decoding(max_tokens=10, stop=("e",)))


@pytest.fixture()
def bundle(tiny_gguf: Path, tmp_path: Path, cache_dir: Path) -> Path:
    return _bundle(tiny_gguf, tmp_path / "tiny.edgepack", TASK)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    from edgepack.cli import main

    code = main(["run", *args, "--prompt", PROMPT, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _expected(bundle: Path, messages: list[dict[str, str]], decoding: Decoding, *, no_task: bool = False) -> str:
    with open_model(bundle, no_task=no_task) as session:
        return "".join(session.answer(messages, decoding))


def test_run_applies_the_task(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(bundle))
    assert (out["task"], out["system"], out["decoding"]) == ("labels", "Classify the alarm.", TASK.decoding.to_json())
    messages = [{"role": "system", "content": "Classify the alarm."}, {"role": "user", "content": PROMPT}]
    assert out["completion"] == _expected(bundle, messages, TASK.decoding)
    assert "e" not in out["completion"]  # cut before the task's stop string


def test_system_and_decoding_flags_override_the_task(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(bundle), "--system", "Be brief.", "--max-tokens", "4", "--repeat-penalty", "1.3")
    decoding = replace(TASK.decoding, max_tokens=4, repeat_penalty=1.3)
    assert (out["system"], out["decoding"]) == ("Be brief.", decoding.to_json())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    assert out["completion"] == _expected(bundle, messages, decoding)


def test_no_task_gives_the_raw_model(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(bundle), "--no-task", "--max-tokens", "12")
    assert (out["task"], out["system"], out["decoding"]) == (None, None, Decoding(max_tokens=12).to_json())
    with open_model(bundle) as session:
        assert out["completion"] == session.complete([{"role": "user", "content": PROMPT}], max_tokens=12)


def test_a_bare_model_keeps_the_old_defaults(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(tiny_gguf))
    assert (out["task"], out["system"], out["decoding"]["max_tokens"]) == (None, None, 128)


@pytest.mark.parametrize("flag,value,problem", [("--temperature", "-1", "temperature must be >= 0"),
                                                ("--repeat-penalty", "0", "repeat penalty must be > 0"),
                                                ("--max-tokens", "0", "max tokens must be a positive integer")])
def test_bad_decoding_flags_exit_2_before_loading(bundle: Path, flag: str, value: str, problem: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.cli import main
    from edgepack.runtime import session

    monkeypatch.setattr(session, "open_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["run", str(bundle), "--prompt", PROMPT, flag, value]) == 2
    assert problem in capsys.readouterr().err


def test_chat_applies_the_task_every_turn(bundle: Path, cache_dir: Path) -> None:
    task: Task = TASK
    out = subprocess.run([sys.executable, "-m", "edgepack", "chat", str(bundle)], input="Pump P-1 alarm\nAgain\n\n",
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EDGEPACK_CACHE": str(cache_dir), "EDGEPACK_DEBUG": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    first = [{"role": "system", "content": "Classify the alarm."}, {"role": "user", "content": "Pump P-1 alarm"}]
    reply = _expected(bundle, first, task.decoding)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Again"}]
    assert out.stdout.replace("> ", "").splitlines() == [reply, _expected(bundle, second, task.decoding)]


def test_verify_names_the_task(bundle: Path, tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    old = _bundle(tiny_gguf, tmp_path / "old.edgepack", None)
    assert main(["verify", str(bundle)]) == 0 and main(["verify", str(old)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    first, second = (part.strip() for part in text.split("OK ")[1:])
    assert first.endswith("task labels, no gated score") and second.endswith("no task (packed before bundles "
                                                                             "carried one)")


@pytest.mark.parametrize("config,system", [({}, "Classify the alarm."), ({"system": "Be brief."}, "Be brief."),
                                           ({"no_task": True}, None)])
def test_serve_applies_the_task_its_system_flag_and_no_task(bundle: Path, config: dict[str, Any],
                                                            system: str | None) -> None:
    """``serve --system`` / ``--no-task`` reach every chat request; a request's own system turn wins."""
    import urllib.request

    from edgepack.runtime.server.serve import ServeConfig, start_server

    user = [{"role": "user", "content": PROMPT}]
    own = [{"role": "system", "content": "Answer in French."}, *user]
    with start_server(bundle, ServeConfig(port=0, threads=1, **config)) as app:
        assert (app.session.task is None) is bool(config.get("no_task"))
        messages, decoding, _ = app.apply_task(user, max_tokens=12)  # as the request below asks
        assert messages == ([{"role": "system", "content": system}] if system else []) + user
        assert app.apply_task(own)[0] == own
        body = json.dumps({"messages": user, "max_tokens": 12}).encode()
        req = urllib.request.Request(f"{app.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            served = json.loads(resp.read())["choices"][0]["message"]["content"]
        assert served == "".join(app.session.answer(messages, decoding))
