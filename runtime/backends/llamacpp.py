"""The ``gguf`` backend: llama.cpp through llama-cpp-python.

Loading goes in two steps. First edgepack's own bounded header reader
(:mod:`edgepack.gguf_header`) checks the file, so a truncated or hostile GGUF is
refused with :class:`~edgepack.errors.InvalidModelFile` before native code parses it. Then
llama.cpp loads it quietly (``verbose=False``) while a log hook keeps llama.cpp's warnings
and errors, so a refusal still says why (llama-cpp-python #2187: with verbose off the
reason is otherwise lost).

Chat prompts are rendered from the GGUF's ``tokenizer.chat_template`` by edgepack's sandboxed
renderer, never by llama-cpp-python's chat handlers; the GGUF's templates are checked
(:mod:`edgepack.runtime.chat.check`) before ``Llama()`` compiles them. Generation stops
before any end-of-generation token llama.cpp knows for the vocabulary (EOS, EOT, ...).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, RuntimeFailure, UsageError
from edgepack.runtime.backends.base import Backend, register_backend
from edgepack.gguf_header import GGUFInfo, read_gguf

# llama.cpp log lines kept from the last load (WARN, ERROR and their continuations). The
# numbering is current ggml's (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); the comment
# in llama-cpp-python's _logger.py still shows an older order.
_LOG_LINES: deque[str] = deque(maxlen=40)
_LOG_STATE: dict[str, Any] = {"callback": None, "last_level": 0}
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5


def _install_log_hook() -> None:
    """Route llama.cpp's log into :data:`_LOG_LINES` instead of stderr.

    The callback is process-global in llama.cpp and other code (the exporter) swaps its own in
    and back, so it is set again before every load. ``EDGEPACK_DEBUG=1`` echoes everything.
    """
    import llama_cpp

    if _LOG_STATE["callback"] is None:
        debug = os.environ.get("EDGEPACK_DEBUG") == "1"

        @llama_cpp.llama_log_callback
        def hook(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _GGML_CONT:
                level = _LOG_STATE["last_level"]
            _LOG_STATE["last_level"] = level
            if level in (_GGML_WARN, _GGML_ERROR):
                _LOG_LINES.append(text.decode("utf-8", errors="replace").rstrip())
            if debug:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG_STATE["callback"] = hook  # a ctypes callback must outlive every call into C
    llama_cpp.llama_log_set(_LOG_STATE["callback"], ctypes.c_void_p(0))


def _log_detail(fallback: str) -> str:
    return "; ".join(line for line in _LOG_LINES if line) or fallback


# --- what the format registry (edgepack.formats, ``gguf``) reads from a GGUF header ------------
def trained_context(path: Path) -> int | None:
    """``<arch>.context_length``: the context the model was trained for, if the header says."""
    value = read_gguf(Path(path)).arch_value("context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def file_quant(path: Path) -> str | None:
    """The file type llama.cpp's quantizer recorded (``Q4_K_M``); InvalidModelFile for a bad header."""
    return read_gguf(Path(path)).quant


def check_templates(path: Path, *, strict: bool = True) -> None:
    """Check every chat template the GGUF holds, as ``Llama()`` would compile them.

    An unreadable header is left to the loader, which refuses it past the same check with the
    same error (the gate's measurement reports it as the reason for FAIL).
    """
    from edgepack.runtime.chat.check import check_gguf_templates

    try:
        header = read_gguf(Path(path))
    except InvalidModelFile:
        return
    check_gguf_templates(header, strict=strict)


@register_backend("gguf")
class LlamaCppBackend(Backend):
    """A GGUF model loaded in llama.cpp."""

    def __init__(self, llm: Any, header: GGUFInfo, gpu_layers: int) -> None:
        import llama_cpp

        self._llm = llm
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._header = header
        self._gpu_layers = gpu_layers
        self._n_vocab = int(llm.n_vocab())
        self._stop = frozenset(
            t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )
        from edgepack.runtime.chat.tokens import llama_control_tokens

        self._control = llama_control_tokens(llm)
        bos, eos = llm.token_bos(), llm.token_eos()
        self._special = {
            "bos_token": self._piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            "eos_token": self._piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
        }

    @classmethod
    def prepare(cls) -> None:
        _install_log_hook()

    @classmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> LlamaCppBackend:
        """Check the GGUF header, then load it in llama.cpp (quietly, keeping its errors)."""
        path = Path(path)
        header = read_gguf(path)
        # llama-cpp-python compiles every tokenizer.chat_template* key inside Llama(), with
        # jinja2's constant folding and no limits (a template bomb hangs or takes gigabytes
        # there); the check rehearses that compile in a limited child first (once per template).
        from edgepack.runtime.chat.check import check_gguf_templates

        check_gguf_templates(header)
        import llama_cpp

        _install_log_hook()
        _LOG_LINES.clear()
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                                  n_threads_batch=threads, n_gpu_layers=gpu_layers,
                                  verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise RuntimeFailure(f"llama.cpp could not load {path.name}: {_log_detail(str(exc))}",
                                 hint="check the file was exported for this llama.cpp version "
                                      f"(llama-cpp-python {llama_cpp.__version__})") from exc
        return cls(llm, header, gpu_layers)

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads the context up to a multiple of 256 and reports the padded size, but
        # llama-cpp-python sizes its token buffer (input_ids) to the size asked for: a prompt
        # between the two escaped as a bare numpy ValueError. The smaller one is the real limit.
        return min(int(self._llm.n_ctx()), len(self._llm.input_ids))

    @property
    def stop_tokens(self) -> frozenset[int]:
        return self._stop

    @property
    def chat_template(self) -> str | None:
        return self._header.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    @property
    def control_tokens(self) -> dict[str, int]:
        return dict(self._control)

    @property
    def header(self) -> GGUFInfo:
        return self._header

    @property
    def info(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "backend": "llama.cpp",
            "llama_cpp_python": self._lib.__version__,
            "gpu_offload_supported": bool(self._lib.llama_supports_gpu_offload()),
            "gpu_layers": self._gpu_layers,
            "n_ctx": self.n_ctx,
            "n_vocab": int(self._llm.n_vocab()),
        }

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def _piece(self, token: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # llama.cpp returns minus the size it needs

    def token_bytes(self, token: int) -> bytes:
        return self._piece(token, special=False)

    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        tokens = list(tokens)
        if not tokens:
            raise UsageError("cannot generate from an empty prompt")
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise UsageError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                             hint="shorten the prompt or load the model with a larger context")
        return self._generate(tokens, min(max_tokens, room), temperature, seed, stop_at_eos)

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float,
                  seed: int | None, stop_at_eos: bool) -> Iterator[int]:
        llm = self._llm
        # A fresh state each call: llama-cpp-python would otherwise reuse a cached prompt,
        # which both changes results and makes time-to-first-token meaningless.
        llm.reset()
        if seed is not None:
            llm.set_seed(seed)
        if max_tokens <= 0:
            return
        produced = 0
        sampling = dict(top_k=40, top_p=0.95, min_p=0.05) if temperature > 0 else {}
        _install_log_hook()
        _LOG_LINES.clear()
        stream = llm.generate(tokens, temp=temperature, repeat_penalty=1.0, reset=True, **sampling)
        while True:
            try:
                tok = next(stream)
            except StopIteration:
                return
            except RuntimeError as exc:  # llama_decode failed (out of memory, bad state)
                raise RuntimeFailure(f"llama.cpp failed while generating: {_log_detail(str(exc))}") from exc
            if stop_at_eos and tok in self._stop:
                return
            yield int(tok)
            produced += 1
            if produced >= max_tokens:
                return

    def last_token_logprob(self, token: int) -> float | None:
        import numpy as np

        # -1: the last row llama.cpp computed, i.e. the logits the token was just sampled from
        # (llama-cpp-python keeps no copy of them unless logits_all is on).
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        if not ptr:
            return None
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        top = logits.max()
        return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

