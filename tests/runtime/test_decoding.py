"""Decoding options every backend takes (runtime/backends/base.py): llama.cpp's repeat penalty and
JSON-schema constrained output, on the tiny GGUF and ONNX models.

The penalty's reference is written out here in numpy (:func:`repeat_penalized`, llama.cpp's
formula) and checked against each backend token by token; the two backends are then checked
against each other. The JSON tests rely on random weights: unconstrained, the tiny model never
writes JSON, so a schema-valid answer is the grammar's doing; it also writes bytes that are not
UTF-8, which llama.cpp's grammar alone lets through (the UTF-8 guard's tests).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.errors import UsageError
from edgepack.runtime.backends.base import PENALTY_LAST_N, Backend, get_backend
from edgepack.runtime.backends.onnxrt import repeat_penalized

MESSAGES = [{"role": "user", "content": "Pump P-101 discharge pressure low alarm."}]
PROMPTS = ["Pump P-101 discharge pressure low alarm.", "Compressor C-12 tripped on high vibration.",
           "PLC rack 2 lost Profinet communication.", "Flow transmitter FT-204 reading drifts."]
SCHEMA = {"type": "object",
          "properties": {"asset": {"type": "string", "maxLength": 12},
                         "priority": {"enum": ["low", "medium", "high"]},
                         "hours": {"type": "integer"}},
          "required": ["asset", "priority", "hours"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gguf32(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The tiny model as an F32 GGUF: the same arithmetic as the FP32 ONNX export, to the last bit
    that decides a greedy token."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    path = convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf32") / "tiny-F32.gguf", outtype="F32")
    with get_backend("gguf").load(path, threads=1, n_ctx=256) as backend:
        yield backend


@pytest.fixture(scope="module")
def onnx32(tiny_onnx_fp32: dict[str, Any]) -> Iterator[Backend]:
    with get_backend("onnx").load(tiny_onnx_fp32["path"], threads=1, n_ctx=256) as backend:
        yield backend


def greedy(backend: Backend, prompt: list[int], n: int = 32, **options: Any) -> list[int]:
    return list(backend.generate(prompt, max_tokens=n, stop_at_eos=False, **options))


# --- the penalty's formula --------------------------------------------------------------------
def test_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 0.0, 3.0, -1.0], dtype=np.float32)
    out = repeat_penalized(logits, [0, 1, 2, 0, 0], 2.0)  # a count of 3 penalizes once, as llama.cpp
    assert out.tolist() == [1.0, -4.0, 0.0, 3.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 0.0, 3.0, -1.0]  # the caller's logits are not touched
    assert repeat_penalized(logits, [0, 1], 1.0) is logits


# --- each backend against the formula ----------------------------------------------------------
def llama_reference(backend: Any, prompt: list[int], penalty: float, n: int) -> list[int]:
    """Greedy with the penalty applied by hand to llama.cpp's raw logits, the window holding the
    prompt's last PENALTY_LAST_N tokens and then every answer token (llama-server's counting)."""
    llm, lib, vocab = backend._llm, backend._lib, backend.info["n_vocab"]
    llm.reset()
    window, out, step = list(prompt[-PENALTY_LAST_N:]), [], list(prompt)
    for _ in range(n):
        llm.eval(step)
        ptr = lib.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).copy()
        tok = int(np.argmax(repeat_penalized(logits, window[-PENALTY_LAST_N:], penalty)))
        out.append(tok)
        window.append(tok)
        step = [tok]
    return out


def onnx_reference(folder: Path, prompt: list[int], penalty: float, n: int) -> list[int]:
    """The same with the whole prefix through the ONNX graph each step (no KV cache)."""
    from edgepack.export.onnx.convert import onnx_logits

    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(np.argmax(repeat_penalized(onnx_logits(folder / "model.onnx", seq)[-1], seq[-PENALTY_LAST_N:],
                                             penalty)))
        out.append(tok)
        seq.append(tok)
    return out


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_llama_cpp_penalizes_as_llama_server_counts(gguf32: Any, penalty: float) -> None:
    prompt = gguf32.chat_tokens(MESSAGES)
    got = greedy(gguf32, prompt, 24, repeat_penalty=penalty)
    assert got == llama_reference(gguf32, prompt, penalty, 24)
    assert got != greedy(gguf32, prompt, 24)  # the penalty decides something on this prompt


def test_onnx_penalizes_with_the_same_formula_and_window(onnx32: Any, tiny_onnx_fp32: dict[str, Any]) -> None:
    prompt = onnx32.chat_tokens(MESSAGES)
    got = greedy(onnx32, prompt, 12, repeat_penalty=1.3)
    assert got == onnx_reference(tiny_onnx_fp32["path"], prompt, 1.3, 12)
    assert got != greedy(onnx32, prompt, 12)


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.3, 0.8])
def test_both_backends_pick_the_same_greedy_tokens(gguf32: Any, onnx32: Any, penalty: float) -> None:
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        prompt = gguf32.chat_tokens(messages)
        assert onnx32.chat_tokens(messages) == prompt
        assert greedy(onnx32, prompt, repeat_penalty=penalty) == greedy(gguf32, prompt, repeat_penalty=penalty), text


def test_penalty_1_is_what_llama_generate_picks(gguf32: Any) -> None:
    """At penalty 1.0 the hand-built chain is llama-cpp-python's: same greedy and seeded tokens."""
    llm, prompt = gguf32._llm, gguf32.chat_tokens(MESSAGES)

    def library(temp: float, seed: int) -> list[int]:
        llm.reset()
        llm.set_seed(seed)
        sampling = dict(top_k=40, top_p=0.95, min_p=0.05) if temp > 0 else {}
        out: list[int] = []
        for tok in llm.generate(prompt, temp=temp, repeat_penalty=1.0, reset=True, **sampling):
            out.append(int(tok))
            if len(out) == 24:
                return out
        return out

    assert greedy(gguf32, prompt, 24) == library(0.0, 0)
    assert greedy(gguf32, prompt, 24, temperature=1.2, seed=11) == library(1.2, 11)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_bad_penalty_is_refused_before_generating(fmt: str, gguf32: Any, onnx32: Any) -> None:
    backend = gguf32 if fmt == "gguf" else onnx32
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="repeat_penalty"):
            backend.generate([1, 5], max_tokens=2, repeat_penalty=bad)


# --- JSON schema ----------------------------------------------------------------------------------
def answer(backend: Backend, text: str, **options: Any) -> str:
    return "".join(backend.stream_chat([{"role": "user", "content": text}], max_tokens=96, **options))


def test_gguf_decodes_schema_valid_json(tiny_gguf: Path) -> None:
    import jsonschema

    with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256) as backend:
        assert backend.constrains_json
        for text in PROMPTS:
            free = answer(backend, text)
            with pytest.raises(ValueError):
                json.loads(free)  # random weights: no JSON without the grammar
            for penalty in (1.0, 1.3):
                constrained = answer(backend, text, json_schema=SCHEMA, repeat_penalty=penalty)
                jsonschema.validate(json.loads(constrained), SCHEMA)


def test_onnx_ignores_the_schema_and_says_so(onnx32: Any) -> None:
    assert onnx32.constrains_json is False
    prompt = onnx32.chat_tokens(MESSAGES)
    assert greedy(onnx32, prompt, json_schema=SCHEMA) == greedy(onnx32, prompt)
    with pytest.raises(UsageError, match="not a valid JSON Schema"):
        onnx32.generate(prompt, max_tokens=4, json_schema={"type": "nothing"})


BAD_SCHEMAS = {
    "invalid": ({"type": "nothing"}, "not a valid JSON Schema"),
    "not_a_schema": ([1, 2], "not a JSON Schema"),
    "huge_array": ({"type": "array", "items": {"type": "integer"}, "maxItems": 10 ** 9}, "maxItems 1000000000"),
    "huge_string": ({"type": "string", "minLength": 5000}, "minLength 5000"),
    "huge_pattern": ({"type": "string", "pattern": "^((a{999}){999}){999}$"}, "repeats more than"),
    "huge_digits": ({"type": "string", "pattern": "^a{" + "9" * 5000 + "}$"}, "repeats more than|cannot be checked"),
    "remote_ref": ({"$ref": "https://example.com/s.json"}, "cannot resolve|cannot be turned"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMAS))
def test_bad_schema_is_a_usage_error_before_the_first_token(case: str, gguf32: Any) -> None:
    schema, message = BAD_SCHEMAS[case]
    with pytest.raises(UsageError, match=message):
        gguf32.generate(gguf32.chat_tokens(MESSAGES), max_tokens=4, json_schema=schema)
    with pytest.raises(UsageError, match=message):
        gguf32.check_json_schema(schema)


# --- UTF-8 under a grammar ------------------------------------------------------------------------
def _is_utf8_prefix(data: bytes) -> bool:
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=False)
        return True
    except UnicodeDecodeError:
        return False


def test_utf8_guard_bans_exactly_what_breaks_utf8() -> None:
    """Against Python's strict decoder (RFC 3629: no overlongs, surrogates or > U+10FFFF)."""
    import random

    from edgepack.runtime.backends.utf8 import Utf8Guard

    rng = random.Random(5)
    pieces = [b"", b"a", b'"', b"\xc3", b"\xa9", b"\xc3\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80",
              b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf8\xbf\x89\x89", b"\xc0\xaf", b"\xb0",
              b"\xe6\x97\xa5\xe6", b"\x9c\xac", b"\xf4\x8f\xbf\xbf", b"\xef\xbf\xbd"]
    pieces += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) for _ in range(60)]
    guard = Utf8Guard(pieces)
    for _ in range(300):
        text, state = b"", 0
        for _ in range(8):
            banned = guard.banned(state)
            for tok, piece in enumerate(pieces):
                assert bool(banned[tok]) == (not _is_utf8_prefix(text + piece) or (piece == b"" and state != 0)), \
                    (text, piece)
            allowed = [t for t in range(len(pieces)) if not banned[t]]
            tok = rng.choice(allowed)
            text, state = text + pieces[tok], guard.after(state, tok)
        assert (state == 0) == (_is_utf8_prefix(text) and text.decode("utf-8", "ignore").encode() == text)


def test_a_grammar_never_lets_invalid_utf8_through(tiny_gguf: Path) -> None:
    """The tiny model, asked for a free string, writes bytes llama.cpp's grammar alone would accept
    (5 of these 12 answers, without the guard)."""
    import jsonschema

    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 24}}, "required": ["note"]}
    with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256) as backend:
        for text in PROMPTS:
            for penalty in (1.0, 1.3, 1.5):
                tokens = backend.generate(backend.chat_tokens([{"role": "user", "content": text}]), max_tokens=80,
                                          json_schema=schema, repeat_penalty=penalty)
                raw = b"".join(backend.token_bytes(t) for t in tokens)
                jsonschema.validate(json.loads(raw.decode("utf-8")), schema)  # strict: no replacement characters
