"""Token logprobs and the teacher fallback: a low-confidence student answer is sent to a real
teacher server (the module's server process), counted in /metrics and the response metadata.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import UsageError
from edgepack.runtime.server.serve import ServeConfig
from edgepack.runtime.session import open_model
from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, USER, chat, local, metrics, port, proc_server)


def test_token_logprobs_match_transformers(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with open_model(tiny_gguf, threads=1) as session:
        backend = session.backend
        prompt = backend.chat_tokens(USER)
        tokens, logprobs = [], []
        for tok in backend.generate(prompt, max_tokens=16):
            tokens.append(tok)
            logprobs.append(backend.last_token_logprob(tok))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    ref = torch.log_softmax(logits, -1)
    expected = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]
    assert max(abs(a - b) for a, b in zip(logprobs, expected)) < 0.02  # F16 weights vs float32


def test_fallback_to_a_teacher_server(port: int, local: Any) -> None:
    """The module's server process is the teacher; an in-process server is the student."""
    from edgepack.runtime.server.fallback import parse_fallback

    teacher = parse_fallback(f"openai:http://127.0.0.1:{port}/v1#tiny-F16")
    teacher_count = metrics(port).get('edgepack_requests_total{endpoint="/v1/chat/completions",code="200"}', 0)
    always = local(n_ctx=CTX, model_id="student", fallback=teacher, fallback_min_logprob=0.0)
    direct = chat(port, max_tokens=10).json()["choices"][0]["message"]["content"]
    reply = chat(always.port, max_tokens=10, model="student").json()
    meta = reply["edgepack"]
    assert meta["served_by"] == "teacher" and meta["fallback"]["used"] is True
    assert meta["fallback"]["teacher_model"] == "tiny-F16" and meta["fallback"]["student_mean_token_logprob"] < 0
    assert reply["choices"][0]["message"]["content"] == direct
    assert reply["usage"]["completion_tokens"] == 10
    events = chat(always.port, max_tokens=10, stream=True).events()
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == direct
    assert events[-2]["edgepack"]["served_by"] == "teacher" and events[-2]["edgepack"]["fallback"]["stream_buffered"]
    teacher_after = metrics(port)['edgepack_requests_total{endpoint="/v1/chat/completions",code="200"}']
    assert teacher_after == teacher_count + 3  # direct + two forwarded
    assert metrics(always.port)['edgepack_fallback_total{outcome="teacher"}'] == 2

    never = local(n_ctx=CTX, fallback=teacher, fallback_min_logprob=-1000.0)
    meta = chat(never.port, max_tokens=10).json()["edgepack"]
    assert meta["served_by"] == "student" and meta["fallback"]["used"] is False
    assert metrics(never.port)['edgepack_fallback_total{outcome="student"}'] == 1

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    down = local(n_ctx=CTX, fallback=parse_fallback(f"openai:http://127.0.0.1:{dead_port}/v1#t"),
                 fallback_min_logprob=0.0)
    reply = chat(down.port, max_tokens=10).json()
    assert reply["edgepack"]["served_by"] == "student" and "unreachable" in reply["edgepack"]["fallback"]["error"]
    assert metrics(down.port)['edgepack_fallback_total{outcome="teacher_error"}'] == 1


def test_fallback_spec_is_checked() -> None:
    from edgepack.runtime.server.fallback import parse_fallback

    for bad in ("openai:localhost#m", "openai:http://h/v1", "ollama:http://h#m", "http://h/v1#m"):
        with pytest.raises(UsageError):
            parse_fallback(bad)
    with pytest.raises(UsageError, match="fallback_min_logprob"):
        ServeConfig(fallback=parse_fallback("openai:http://127.0.0.1:1/v1#m"))
