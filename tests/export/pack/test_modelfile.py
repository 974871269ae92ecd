"""The Modelfile carries the task: SYSTEM is its prompt, the PARAMETERs its decoding, and every
value reads back exactly through (a port of) Ollama's own parser."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgepack.export.pack.modelfile import modelfile_quote, write_modelfile
from edgepack.runtime.backends.base import PENALTY_LAST_N
from edgepack.task import DEMO_SYSTEM_PROMPT, DEMO_TASK, Decoding
from tests.export.pack.ollama_modelfile import parse_modelfile

TEMPLATE = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}', "You are a helpful AI assistant.")


def _write(task=DEMO_TASK, template=TEMPLATE, stops=None):  # type: ignore[no-untyped-def]
    return write_modelfile(model_file="m-Q8_0.gguf", model_name="m", template=template,
                           template_missing=None if template else "the model has no chat template",
                           stop_tokens={2: "<|im_end|>"} if stops is None else stops, task=task,
                           task_source="the run's task.json", num_ctx=2048)


@pytest.mark.parametrize("text", [
    "plain", "two words", " leading and trailing ", "Category:", "\n\n", "a\tb", 'say "hi" now', '"quoted"',
    'ends with a quote"', '""', "<|im_end|>", "日本語 ñ", DEMO_SYSTEM_PROMPT, "x" * 2000,
])
def test_quoted_values_read_back_exactly(text: str) -> None:
    quoted = modelfile_quote(text)
    assert quoted is not None
    assert parse_modelfile(f"FROM ./m.gguf\nSYSTEM {quoted}\nPARAMETER stop {quoted}\n") == [
        ("model", "./m.gguf"), ("system", text), ("stop", text)]


@pytest.mark.parametrize("text", ['has """ inside', "nul\x00byte", "no\u00a0break", "cr\rlf", "zero\u200bwidth"])
def test_values_ollama_cannot_read_back_are_refused(text: str) -> None:
    assert modelfile_quote(text) is None


def test_system_is_the_tasks_prompt_and_parameters_the_gates_decoding() -> None:
    task = replace(DEMO_TASK, decoding=Decoding(max_tokens=40, temperature=0.0, repeat_penalty=1.15,
                                                stop=("\n\n", "Category: x")))
    text, notes = _write(task)
    commands = parse_modelfile(text)
    assert notes == []
    assert ("system", DEMO_SYSTEM_PROMPT) in commands
    assert not any(c == "system" and "helpful AI assistant" in v for c, v in commands)  # not the template's
    params = [(c, v) for c, v in commands if c not in ("model", "template", "system")]
    assert params == [("stop", "<|im_end|>"), ("stop", "\n\n"), ("stop", "Category: x"), ("num_ctx", "2048"),
                      ("temperature", "0.0"), ("repeat_penalty", "1.15"), ("repeat_last_n", str(PENALTY_LAST_N)),
                      ("num_predict", "40")]


def test_repeat_penalty_is_written_at_one_too() -> None:
    """Ollama and llama.cpp's server default to 1.1; the gate decodes with 1.0."""
    params = dict((c, v) for c, v in parse_modelfile(_write()[0]) if c in ("repeat_penalty", "temperature"))
    assert params == {"repeat_penalty": "1.0", "temperature": "0.0"}


def test_a_task_without_a_prompt_keeps_the_templates_default() -> None:
    commands = parse_modelfile(_write(replace(DEMO_TASK, system_prompt=None))[0])
    assert ("system", "You are a helpful AI assistant.") in commands


def test_what_cannot_be_quoted_is_left_out_and_said() -> None:
    task = replace(DEMO_TASK, system_prompt='Answer with """ fences', decoding=Decoding(stop=("ok", "bad\x01")))
    text, notes = _write(task, template=None, stops={2: "<|im_end|>"})
    commands = parse_modelfile(text)
    assert not any(c == "system" for c, _ in commands)
    assert [v for c, v in commands if c == "stop"] == ["<|im_end|>", "ok"]
    assert "# SYSTEM omitted" in text and "# TEMPLATE omitted: the model has no chat template" in text
    assert len(notes) == 3 and any("system prompt" in n for n in notes) and any("stop string" in n for n in notes)
