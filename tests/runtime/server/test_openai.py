"""The OpenAI API surface over real sockets: answers equal in-process greedy generation, and
the `openai` client works against the server process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, USER, call, chat, port, proc_server, reference)


def test_health_models_and_identity(port: int, tiny_gguf: Path) -> None:
    assert call(port, "GET", "/health").json() == {"status": "ok", "model": "tiny-F16"}
    (card,) = call(port, "GET", "/v1/models").json()["data"]
    assert card["id"] == "tiny-F16" and card["object"] == "model"
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert card["edgepack"]["model_sha256"] == sha and card["edgepack"]["n_ctx"] == CTX
    assert call(port, "GET", "/v1/models/tiny-F16").json()["id"] == "tiny-F16"
    assert call(port, "GET", "/v1/models/other").status == 404


def test_chat_equals_in_process_greedy(port: int, reference: Any) -> None:
    expected = reference.complete(USER, max_tokens=24)
    prompt_tokens = len(reference.backend.chat_tokens(USER))
    reply = chat(port, max_tokens=24)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-F16"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24,
                             "total_tokens": prompt_tokens + 24}
    meta = body["edgepack"]
    assert meta["served_by"] == "student" and meta["bundle"] is None
    assert -20 < meta["mean_token_logprob"] < 0  # a random 400-token vocab: about -log(400) = -6
    assert meta["timings"]["generate_ms"] > 0


def test_streaming_equals_in_process_greedy(port: int, reference: Any) -> None:
    expected = reference.complete(USER, max_tokens=24)
    reply = chat(port, max_tokens=24, stream=True)
    assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream"
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected and len(chunks) > 3  # streamed in pieces, not one blob
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 24 and last["edgepack"]["mean_token_logprob"] < 0

    with_usage = chat(port, max_tokens=8, stream=True, stream_options={"include_usage": True}).events()
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 8
    assert with_usage[-3]["choices"][0]["finish_reason"] == "length"


def test_completions_equal_in_process(port: int, reference: Any) -> None:
    prompt = "Pump P-101 discharge pressure"
    expected = "".join(reference.backend.stream(prompt, max_tokens=12))
    body = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    assert body["usage"]["completion_tokens"] == 12
    events = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stream": True}).events()
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected and events[-1] == "[DONE]"


def test_stop_strings_cut_the_answer(port: int, reference: Any) -> None:
    full = reference.complete(USER, max_tokens=24)
    stop = full[6:9]
    cut = full.index(stop)
    for stream in (False, True):
        reply = chat(port, max_tokens=24, stop=[stop, "never-in-the-text"], stream=stream)
        if stream:
            events = reply.events()[:-1]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = reply.json()["choices"][0]["message"]["content"], reply.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (full[:cut], "stop")


def test_openai_argument_variants(port: int) -> None:
    body = chat(port, max_completion_tokens=3, n=1, top_p=1, presence_penalty=0, user="u1", seed=7).json()
    assert body["usage"]["completion_tokens"] == 3
    parts = [{"type": "text", "text": "Compressor C-12 tripped"}, {"type": "text", "text": "on high vibration."}]
    assert chat(port, messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": parts}], max_tokens=2).status == 200
    sampled = [chat(port, max_tokens=8, temperature=1.0, seed=11).json()["choices"][0]["message"]["content"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_unknown_paths_methods_and_models(port: int) -> None:
    assert call(port, "GET", "/v1/nothing").status == 404
    assert call(port, "GET", "/v1/chat/completions").status == 405
    assert chat(port, model="gpt-4o").status == 404
    assert chat(port, model="tiny-F16", max_tokens=2).status == 200


def test_openai_client(port: int, reference: Any) -> None:
    openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra)")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    expected = reference.complete(USER, max_tokens=12)
    assert [m.id for m in client.models.list()] == ["tiny-F16"]
    done = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=12)
    assert done.choices[0].message.content == expected and done.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=-1)
