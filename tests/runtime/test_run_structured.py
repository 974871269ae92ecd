"""`edgepack run` and `chat` on a json task's bundle decode under its schema by default (#15, deliverable 5).

The tiny random model writes no JSON on its own (``--no-task`` shows it), so a schema-valid
answer is the grammar's doing; an ONNX bundle answers unconstrained and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.runtime.server.test_structured import JSON_TASK, PROMPTS, SCHEMA, gguf_bundle, onnx_bundle


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, Any], str]:
    from edgepack.cli import main

    code = main(["run", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_run_decodes_a_json_tasks_answers_under_its_schema(tiny_gguf: Path, tmp_path: Path, cache_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    bundle = gguf_bundle(tiny_gguf, tmp_path / "tiny-json.edgepack", JSON_TASK)
    for prompt in PROMPTS:
        out, _ = run_json(capsys, str(bundle), "--prompt", prompt)
        assert out["task"] == "json" and out["json_schema"] is True
        jsonschema.validate(json.loads(out["completion"]), SCHEMA)
        penalized, _ = run_json(capsys, str(bundle), "--prompt", prompt, "--repeat-penalty", "1.3")
        jsonschema.validate(json.loads(penalized["completion"]), SCHEMA)
    raw, _ = run_json(capsys, str(bundle), "--prompt", PROMPTS[0], "--no-task", "--max-tokens", "40")
    assert raw["json_schema"] is False
    with pytest.raises(ValueError):
        json.loads(raw["completion"])


def test_chat_decodes_each_reply_under_the_schema(tiny_gguf: Path, tmp_path: Path, cache_dir: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.cli import main

    bundle = gguf_bundle(tiny_gguf, tmp_path / "tiny-json.edgepack", JSON_TASK)
    lines = iter([PROMPTS[0], PROMPTS[1], ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(bundle)]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)


def test_run_on_onnx_says_the_answer_is_unconstrained(tiny_onnx_fp32: dict[str, Any], tmp_path: Path,
                                                       cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = onnx_bundle(tiny_onnx_fp32["path"], tmp_path / "tiny-onnx-json.edgepack", JSON_TASK)
    out, err = run_json(capsys, str(bundle), "--prompt", PROMPTS[0])
    assert out["task"] == "json" and out["json_schema"] is False
    assert "cannot constrain decoding" in err and "unconstrained" in err
