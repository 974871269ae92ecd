"""OpenAI parameters beyond plain generation, through the real openai SDK: unknown fields
ignored and named, sampling options, list and token-id prompts, ``n``, ``echo`` and
``logprobs`` (completions and chat shapes), checked against the backend's own numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgepack.runtime.backends.base import Sampling
from edgepack.runtime.server.api import IGNORED_HEADER, MAX_N
from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    CTX, USER, call, chat, local, port, proc_server, reference)

openai = pytest.importorskip("openai", reason="the openai package is not installed (dev extra: pip install -e .[dev])")
PROMPT = "Compressor C-12 tripped on high vibration."


@pytest.fixture(scope="module")
def client(port: int) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def _own_logprob(backend: Any, prefix: list[int], token: int) -> float:
    """The backend's logprob of ``token`` after ``prefix``, read the way generation reads it."""
    gen = backend.generate(prefix, max_tokens=1, stop_at_eos=False)
    next(gen)
    value = backend.last_token_logprob(token)
    gen.close()
    return value


def test_model_card_names_what_is_served(port: int) -> None:
    meta = call(port, "GET", "/v1/models").json()["data"][0]["edgepack"]
    assert meta["max_n"] == MAX_N and meta["logprobs"] is True
    assert meta["sampling_options"] == ["frequency_penalty", "min_p", "presence_penalty", "top_k", "top_p"]


def test_unknown_fields_are_ignored_and_named(port: int) -> None:
    reply = chat(port, max_tokens=2, frobnicate=1, add_generation_prompt=True)
    assert reply.status == 200, reply.body
    assert reply.headers[IGNORED_HEADER.lower()] == "add_generation_prompt, frobnicate"
    assert IGNORED_HEADER.lower() not in chat(port, max_tokens=2).headers
    tools = chat(port, max_tokens=2, tools=[{"type": "function", "function": {"name": "f"}}])
    assert tools.status == 400 and tools.json()["error"]["param"] == "tools"
    assert "tools are not supported" in tools.json()["error"]["message"]


def test_sampling_options_reach_the_sampler(client: Any, reference: Any) -> None:
    backend = reference.backend
    greedy = reference.complete(USER, max_tokens=16)
    # top_k 1 leaves only the most likely token: sampling at temperature 1 is greedy.
    top1 = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=16, temperature=1.0,
                                          seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy
    # Penalties change the logits even at temperature 0: equal to the backend's own run, not to plain greedy.
    tokens = backend.chat_tokens(USER)
    own = backend.generate(tokens, max_tokens=16, sampling=Sampling(presence_penalty=2.0, frequency_penalty=1.0))
    expected = b"".join(backend.token_bytes(t) for t in own).decode("utf-8", "replace")
    penalized = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=16,
                                               presence_penalty=2.0, frequency_penalty=1.0)
    assert penalized.choices[0].message.content == expected != greedy
    sampled = [client.completions.create(model="tiny-F16", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
                                         top_p=0.9, extra_body={"min_p": 0.01, "top_k": 50}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-F16", prompt=PROMPT, max_tokens=2, presence_penalty=3.0)


def test_list_prompts_n_and_logprobs(client: Any, reference: Any) -> None:
    backend = reference.backend
    prompts = [PROMPT, "Pump P-3 leaks oil."]
    done = client.completions.create(model="tiny-F16", prompt=prompts, max_tokens=4, n=2, logprobs=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    for p, text in enumerate(prompts):
        ids = backend.tokenize(text, add_special=True, parse_special=True)
        greedy = list(backend.generate(ids, max_tokens=4))
        for choice in done.choices[2 * p:2 * p + 2]:  # temperature 0: both choices are the greedy answer
            lp = choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
            assert lp.tokens == [backend.token_bytes(t).decode("utf-8", "replace") for t in greedy]
            assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
            for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
                assert len(top) == 2 and max(top.values()) == pytest.approx(value)  # greedy: the top one
                assert value == pytest.approx(_own_logprob(backend, ids + greedy[:i], greedy[i]), abs=1e-4)
    assert done.usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-F16", prompt=PROMPT, max_tokens=2, n=MAX_N + 1)


def test_echo_with_zero_max_tokens_scores_the_prompt(client: Any, reference: Any) -> None:
    """What lm-eval's loglikelihood sends: token ids, echo, logprobs, nothing generated."""
    backend = reference.backend
    ids = backend.tokenize(PROMPT, add_special=False)
    done = client.completions.create(model="tiny-F16", prompt=[ids, ids[:5]], max_tokens=0, echo=True, logprobs=1)
    first, short = done.choices
    lp = first.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(_own_logprob(backend, ids[:i], ids[i]), abs=1e-4)
        assert len(lp.top_logprobs[i]) == 1
    assert first.text == "".join(lp.tokens) and first.finish_reason == "length"
    assert short.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:5], abs=1e-5)
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens == len(ids) + 5
    # lm-eval asks max_tokens=1: the prompt's logprobs, then one generated token's.
    one = client.completions.create(model="tiny-F16", prompt=ids, max_tokens=1, echo=True, logprobs=1)
    assert len(one.choices[0].logprobs.tokens) == len(ids) + 1
    assert one.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(lp.token_logprobs, abs=1e-5)
    bad = call(client.base_url.port, "POST", "/v1/completions",
               {"prompt": [backend.vocab_size + 5], "max_tokens": 1})
    assert bad.status == 400 and bad.json()["error"]["param"] == "prompt"


def test_chat_logprobs_and_n(client: Any, reference: Any) -> None:
    backend = reference.backend
    greedy = reference.complete(USER, max_tokens=8)
    done = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=8, logprobs=True,
                                          top_logprobs=3)
    (choice,) = done.choices
    assert choice.message.content == greedy
    content = choice.logprobs.content
    assert len(content) == 8
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace") == greedy
    prefix = backend.chat_tokens(USER)
    tokens = list(backend.generate(prefix, max_tokens=8))
    for i, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        assert entry.bytes == list(backend.token_bytes(token))
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob == pytest.approx(_own_logprob(backend, prefix + tokens[:i], token), abs=1e-4)
    several = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=6, n=3, temperature=1.0,
                                             seed=9)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert len({c.message.content for c in several.choices}) > 1  # seed + i: the choices differ
    again = client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=6, n=3, temperature=1.0,
                                           seed=9)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-F16", messages=USER, max_tokens=2, n=2, stream=True)


def test_onnx_backend_refuses_what_it_cannot_honour(local: Any, tiny_onnx_fp32: dict[str, Any]) -> None:
    """Announce, never silently ignore: the ONNX backend has no sampling filters or logprobs."""
    server = local(Path(tiny_onnx_fp32["path"]), n_ctx=512)
    for extra, param in (({"top_p": 0.5}, "top_p"), ({"top_k": 5, "min_p": 0.1}, "top_k"),
                         ({"logprobs": 2}, "logprobs"), ({"echo": True, "max_tokens": 0, "logprobs": 1}, "logprobs")):
        reply = call(server.port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
        error = reply.json()["error"]
        assert reply.status == 400 and error["param"] == param and "onnx backend" in error["message"], reply.body
    plain = call(server.port, "POST", "/v1/completions", {"prompt": [PROMPT, PROMPT], "max_tokens": 2, "n": 2})
    assert plain.status == 200 and [c["index"] for c in plain.json()["choices"]] == [0, 1, 2, 3]


def test_prompt_logprobs_across_decode_batches(reference: Any) -> None:
    """A prompt longer than llama.cpp's batch (512) is scored in chunks; positions on both sides
    of a chunk edge equal generation's own logprob."""
    backend = reference.backend
    ids = backend.tokenize(" ".join(f"pump {i} bearing hot" for i in range(200)), add_special=True)[:1100]
    scored = backend.prompt_logprobs(ids, 2)
    assert len(scored) == len(ids) and scored[0].logprob is None
    for i in (1, 511, 512, 513, 1024, 1099):
        assert scored[i].logprob == pytest.approx(_own_logprob(backend, ids[:i], ids[i]), abs=1e-4)
        assert scored[i].top[0][1] >= scored[i].top[1][1] and scored[i].logprob <= scored[i].top[0][1] + 1e-9
