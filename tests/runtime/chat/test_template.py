"""The sandboxed chat-template renderer: real templates render, hostile ones never run code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgepack.errors import InvalidModelFile, UnsafeModelError, UsageError
from edgepack.runtime.chat.template import render_chat, to_ollama_template
from tests.runtime.helpers import rewrite_gguf
from tests.tiny import CHATML_TEMPLATE

SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER = [{"role": "user", "content": "Pump P-101 alarm"}]


def ssti_payloads(marker: Path) -> list[str]:
    """Known template-injection payloads (CVE-2024-34359 family), each trying to touch ``marker``."""
    cmd = f"touch {marker}"
    return [
        "{{ lipsum.__globals__['os'].popen('" + cmd + "').read() }}",
        "{{ cycler.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "{{ joiner.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "{{ namespace.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('" + cmd + "').read() }}",
        "{% set x = lipsum.__globals__ %}{{ x }}",  # a probe that plain Jinja would render as ''
    ]


def test_chatml_renders_like_transformers() -> None:
    out = render_chat(CHATML_TEMPLATE, USER + [{"role": "assistant", "content": "ok"}], add_generation_prompt=True)
    assert out == "<|im_start|>user\nPump P-101 alarm<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n<|im_start|>assistant\n"


def test_tojson_is_not_html_escaped() -> None:
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<a & 'b'>"}]) == \
        '{"role": "user", "content": "<a & \'b\'>"}'


@pytest.mark.parametrize("index", range(8))
def test_ssti_payloads_are_refused_and_never_run(index: int, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    payload = ssti_payloads(marker)[index]
    with pytest.raises(UnsafeModelError, match="sandbox forbids"):
        render_chat(payload, USER)
    assert not marker.exists()


def test_ssti_in_gguf_metadata_is_refused_by_the_runtime(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.runtime.backends.base import get_backend

    marker = tmp_path / "MARKER"
    for payload in ssti_payloads(marker)[:2]:
        evil = rewrite_gguf(tiny_gguf, tmp_path / "evil.gguf", {"tokenizer.chat_template": payload})
        # Refused at load: the template check renders it before llama.cpp opens the file.
        with pytest.raises(UnsafeModelError), get_backend("gguf").load(evil, threads=1, n_ctx=128) as backend:
            "".join(backend.stream_chat(USER, max_tokens=4))
        assert not marker.exists()


def test_ssti_in_bundle_session_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.runtime.session import open_model

    marker = tmp_path / "MARKER"
    evil = rewrite_gguf(tiny_gguf, tmp_path / "evil.gguf", {"tokenizer.chat_template": ssti_payloads(marker)[0]})
    with pytest.raises(UnsafeModelError), open_model(evil, n_ctx=128) as session:
        session.complete(USER, max_tokens=4)
    assert not marker.exists()


def test_memory_bombs_are_refused() -> None:
    with pytest.raises(UnsafeModelError):
        render_chat("{{ 'x' * 10000000000 }}", USER)
    with pytest.raises(UnsafeModelError):
        render_chat("{{ 10 ** 100000000 }}", USER)
    with pytest.raises(UnsafeModelError, match="exceeds"):
        render_chat("{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}{% endfor %}", USER)


def test_raise_exception_is_a_usage_error() -> None:
    tpl = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System role required') }}{% endif %}"
    with pytest.raises(UsageError, match="System role required"):
        render_chat(tpl, USER)


def test_broken_templates_are_invalid_model_files() -> None:
    with pytest.raises(InvalidModelFile, match="does not parse"):
        render_chat("{% for m in messages %}", USER)
    with pytest.raises(InvalidModelFile, match="failed to render"):
        render_chat("{{ messages[5]['content'] }}", USER)
    with pytest.raises(InvalidModelFile, match="empty"):
        render_chat("  ", USER)


@pytest.mark.parametrize("bad", [[], "hello", [{"role": "user"}], [{"role": 1, "content": "x"}], ["x"]])
def test_malformed_messages_are_usage_errors(bad: object) -> None:
    with pytest.raises(UsageError):
        render_chat(CHATML_TEMPLATE, bad)  # type: ignore[arg-type]


def test_ollama_template_chatml_has_optional_system() -> None:
    go, system = to_ollama_template(CHATML_TEMPLATE)  # type: ignore[misc]
    assert system is None
    assert go == ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                  "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")


def test_ollama_template_carries_a_default_system_prompt() -> None:
    go, system = to_ollama_template(SMOLLM_TEMPLATE)  # type: ignore[misc]
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert go.startswith("<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ .Prompt }}")


def test_ollama_template_refuses_shapes_it_cannot_express() -> None:
    # Only the last message is rendered: no Go template reproduces that from the sentinels.
    assert to_ollama_template("{{ messages[-1]['content'] }}") is None
    assert to_ollama_template("{{ raise_exception('no') }}") is None


def test_no_environment_side_effects() -> None:
    before = dict(os.environ)
    render_chat(CHATML_TEMPLATE, USER)
    assert dict(os.environ) == before
