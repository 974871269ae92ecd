"""Backend registry and the llama.cpp backend on a real (tiny) GGUF."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edgepack.errors import ModelSourceError, UsageError
from edgepack.runtime.backends import base
from edgepack.formats import format_of
from edgepack.runtime.backends.base import Backend, get_backend, register_backend

USER = [{"role": "user", "content": "Pump P-101 discharge pressure low alarm."}]


class ByteBackend(Backend):
    """A backend whose tokens are single UTF-8 bytes of a fixed reply: exercises the shared
    streaming code (byte-split characters) without a model."""

    def __init__(self, reply: str) -> None:
        self.reply = reply.encode("utf-8")

    @classmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> "ByteBackend":
        return cls(Path(path).read_text(encoding="utf-8"))

    n_ctx = 64  # type: ignore[assignment]
    stop_tokens = frozenset({256})  # type: ignore[assignment]
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # type: ignore[assignment]

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        yield from list(self.reply)[:max_tokens]


def test_third_party_registration_by_exact_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register_backend("bytes-test")(ByteBackend)
    assert get_backend("bytes-test") is ByteBackend
    assert "bytes-test" in base.available_formats()
    with pytest.raises(UsageError, match="bytes-tes'.*available: .*bytes-test"):
        get_backend("bytes-tes")  # exact names only, no prefix matching
    with pytest.raises(ValueError, match="already served"):
        register_backend("gguf")(ByteBackend)


def test_register_rejects_non_backends() -> None:
    with pytest.raises(TypeError):
        register_backend("x")(object)  # type: ignore[arg-type]


def test_streaming_never_splits_a_utf8_character(tmp_path: Path) -> None:
    text = "Über 95°C — 日本語 ok"
    (tmp_path / "m").write_text(text, encoding="utf-8")
    backend = ByteBackend.load(tmp_path / "m", threads=1, n_ctx=64)
    pieces = list(backend.stream_chat(USER, max_tokens=1000))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_format_of() -> None:
    assert format_of(Path("a/student-Q4_K_M.gguf")).name == "gguf"
    with pytest.raises(ModelSourceError, match="expected"):
        format_of(Path("model.bin"))


def test_heavy_modules_are_not_imported_by_runtime_modules() -> None:
    code = ("import sys; import edgepack.export.gate.gate, edgepack.runtime.session, edgepack.runtime.bundle.archive, "
            "edgepack.export.gate.measure, edgepack.runtime.backends.base, edgepack.export.pack.pack, edgepack.cli; "
            "heavy = [m for m in ('llama_cpp', 'torch', 'transformers', 'onnxruntime') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_llamacpp_is_the_gguf_backend() -> None:
    from edgepack.runtime.backends.llamacpp import LlamaCppBackend

    assert get_backend("gguf") is LlamaCppBackend


@pytest.fixture(scope="module")
def tiny_backend(tiny_gguf: Path) -> Iterator[Backend]:
    # llama.cpp pads the context to a multiple of 256; ask for exactly that.
    with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256) as backend:
        yield backend


def test_tiny_model_metadata(tiny_backend: Backend) -> None:
    assert tiny_backend.n_ctx == 256
    assert 2 in tiny_backend.stop_tokens  # <|im_end|>
    assert tiny_backend.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert tiny_backend.info["backend"] == "llama.cpp"


def test_chat_prompt_uses_the_template_and_specials(tiny_backend: Backend) -> None:
    tokens = tiny_backend.chat_tokens(USER)
    assert tokens[0] == 1  # <|im_start|> parsed as one special token, not text
    assert tokens.count(1) == 2 and tokens.count(2) == 1  # one BOS per turn, no BOS added twice
    assert tokens[-1] == tiny_backend.tokenize("\n")[-1]


def test_greedy_is_deterministic_and_streams(tiny_backend: Backend) -> None:
    prompt = tiny_backend.chat_tokens(USER)
    a = list(tiny_backend.generate(prompt, max_tokens=12, stop_at_eos=False))
    b = list(tiny_backend.generate(prompt, max_tokens=12, stop_at_eos=False))
    assert a == b and len(a) == 12
    upto_stop = list(tiny_backend.generate(prompt, max_tokens=12))  # stops before any stop token
    text = "".join(tiny_backend.stream_chat(USER, max_tokens=12))
    assert text == b"".join(tiny_backend.token_bytes(t) for t in upto_stop).decode("utf-8", "replace")


def test_generation_stops_before_a_stop_token(tiny_backend: Backend) -> None:
    prompt = tiny_backend.chat_tokens(USER)
    free = list(tiny_backend.generate(prompt, max_tokens=100, stop_at_eos=False))
    stopped = list(tiny_backend.generate(prompt, max_tokens=100, stop_at_eos=True))
    assert not set(stopped) & tiny_backend.stop_tokens
    first_stop = next((i for i, t in enumerate(free) if t in tiny_backend.stop_tokens), None)
    assert stopped == (free[:first_stop] if first_stop is not None else free)


def test_sampling_is_seeded(tiny_backend: Backend) -> None:
    prompt = tiny_backend.chat_tokens(USER)
    a = list(tiny_backend.generate(prompt, max_tokens=16, temperature=1.5, seed=7, stop_at_eos=False))
    b = list(tiny_backend.generate(prompt, max_tokens=16, temperature=1.5, seed=7, stop_at_eos=False))
    greedy = list(tiny_backend.generate(prompt, max_tokens=16, stop_at_eos=False))
    assert a == b
    assert a != greedy


def test_generation_limits(tiny_backend: Backend) -> None:
    with pytest.raises(UsageError, match="context holds 256"):
        tiny_backend.generate([5] * 300, max_tokens=4)
    with pytest.raises(UsageError, match="temperature"):
        tiny_backend.generate([1, 3], max_tokens=4, temperature=-1)
    # max_tokens is clamped to the room left in the context
    assert len(list(tiny_backend.generate([1] + [5] * 248, max_tokens=50, stop_at_eos=False))) == 7


@pytest.mark.slow
def test_embedded_teacher_answers_in_category_format(builtin_teacher_gguf: Path) -> None:
    with get_backend("gguf").load(builtin_teacher_gguf, threads=2, n_ctx=512) as teacher:
        assert teacher.stop_tokens >= {2}
        answer = "".join(teacher.stream_chat([{"role": "user", "content": "What is 2+2? Answer with a number."}],
                                             max_tokens=16))
    assert "4" in answer


def test_broken_template_in_gguf_is_an_invalid_model_file(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.errors import InvalidModelFile
    from tests.runtime.helpers import rewrite_gguf

    broken = rewrite_gguf(tiny_gguf, tmp_path / "b.gguf", {"tokenizer.chat_template": "{% for m in messages %}"})
    with pytest.raises(InvalidModelFile, match="chat template does not parse"):
        get_backend("gguf").load(broken, threads=1, n_ctx=256)


def test_closing_frees_the_llama_cpp_model(tiny_gguf: Path) -> None:
    """close() is the backend's own (a module function once swallowed it as dead code after a
    return, so the base class's no-op ran and the model stayed loaded until garbage collection)."""
    from edgepack.runtime.backends.llamacpp import LlamaCppBackend

    assert "close" in LlamaCppBackend.__dict__
    with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256) as backend:
        llm = backend._llm
        assert llm is not None
    assert backend._llm is None and llm._ctx.ctx is None  # llama-cpp-python freed the native context
