"""Memory preflight: refuse a model up front instead of being OOM-killed.

mmap lets llama.cpp "load" a model larger than RAM and then crawl or be killed mid-answer
(llama.cpp #711, llama-cpp-python #254). Before loading, edgepack compares an estimate with the
memory this process can actually get (the smaller of psutil's MemAvailable and the cgroup v2
limit) and refuses with both numbers, the way Ollama does.

The estimate is :mod:`edgepack.memory`'s, the one estimator ``profiles fit``, the student sizer
and the manifest use too: :func:`gguf_artifact_memory` (the gguf format's ``artifact_memory``
part) reads the tensor bytes, their types and the attention shape from the GGUF header and asks
:func:`edgepack.memory.gguf_memory` for weights + F16 KV cache + the gguf runtime allowance. It is
an estimate and is labelled as one wherever it is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.errors import BudgetError
from edgepack.formats import BUILTIN_FORMATS
from edgepack.gguf_header import TOKENS_KEY, ArrayInfo, GGUFInfo, read_gguf
from edgepack.memory import GGUF_KV_BYTES, GGUF_REPACKED_TYPES, gguf_memory, kv_cache_bytes

MB = 1024 * 1024
RUNTIME_ALLOWANCE_BYTES = min(f.runtime_base_bytes for f in BUILTIN_FORMATS)
"""The smallest format base (edgepack/formats.py): what a bundle's model bytes must leave room for
before its format's full estimate is known; never more than that estimate asks for."""


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)  # per-layer head counts (some hybrids): bound by the largest
    return None


def _vocab_size(info: GGUFInfo) -> int:
    """Vocabulary entries: the arch key, else the token list's length, else the embedding's rows."""
    tokens = info.metadata.get(TOKENS_KEY)
    length = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else None
    embd = next((t.shape[1] for t in info.tensors if t.name == "token_embd.weight" and len(t.shape) > 1), None)
    return _as_int(info.arch_value("vocab_size")) or length or embd or 0


def _gguf_kv(info: GGUFInfo, n_ctx: int) -> tuple[int, str]:
    """(F16 KV bytes, what went into them); 0 when the metadata lacks the attention shape."""
    n_layer = _as_int(info.arch_value("block_count"))
    n_head = _as_int(info.arch_value("attention.head_count"))
    n_head_kv = _as_int(info.arch_value("attention.head_count_kv")) or n_head
    n_embd = _as_int(info.arch_value("embedding_length"))
    key_dim = _as_int(info.arch_value("attention.key_length")) or (n_embd // n_head if n_embd and n_head else None)
    value_dim = _as_int(info.arch_value("attention.value_length")) or key_dim
    if not (n_layer and n_head_kv and key_dim and value_dim):
        return 0, "no KV cache term (the metadata lacks the attention shape: likely low)"
    kv = kv_cache_bytes(n_layers=n_layer, n_ctx=n_ctx, n_kv_heads=n_head_kv, key_dim=key_dim,
                        value_dim=value_dim, bytes_per_value=GGUF_KV_BYTES)
    return kv, f"F16 KV cache {n_layer} layers × {n_head_kv} kv heads × ({key_dim}+{value_dim})"


def estimate_gguf_memory(info: GGUFInfo, n_ctx: int) -> dict[str, Any]:
    """Weights + KV + allowance for a GGUF loaded with context ``n_ctx``, in bytes.

    ``basis`` says what went into the number; a model whose metadata lacks the attention
    shape gets no KV term and says so.
    """
    repacked = sum(t.nbytes for t in info.tensors
                   if t.ggml_type in GGUF_REPACKED_TYPES and "token_embd" not in t.name)
    kv, kv_note = _gguf_kv(info, n_ctx)
    estimate = gguf_memory(weights_bytes=info.tensor_bytes, repacked_bytes=repacked, kv_bytes=kv, n_ctx=n_ctx,
                           hidden=_as_int(info.arch_value("embedding_length")) or 0, vocab=_vocab_size(info),
                           kv_note=kv_note)
    return estimate.as_dict()


def gguf_artifact_memory(path: Path, n_ctx: int) -> dict[str, Any]:
    """The gguf format's ``artifact_memory`` part: :func:`estimate_gguf_memory` of the file at ``path``.

    Keys: weights_bytes, kv_cache_bytes, runtime_allowance_bytes, total_bytes, n_ctx, basis.
    """
    return estimate_gguf_memory(read_gguf(Path(path)), n_ctx)


def _cgroup_available_bytes() -> int | None:
    """Room left under a cgroup v2 ``memory.max`` (containers), or None when unlimited."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> tuple[int, str]:
    """Memory a new allocation can get, and where the number comes from."""
    import psutil

    available = int(psutil.virtual_memory().available)
    source = "MemAvailable"
    cgroup = _cgroup_available_bytes()
    if cgroup is not None and cgroup < available:
        available, source = cgroup, "cgroup memory.max - memory.current"
    return available, source


def preflight(required_bytes: int, available_bytes: int, *, what: str, source: str = "available memory",
              basis: str = "") -> None:
    """Raise BudgetError when ``required_bytes`` exceeds ``available_bytes``, with both numbers."""
    if required_bytes <= available_bytes:
        return
    raise BudgetError(
        f"{what} needs about {required_bytes / MB:.0f} MB but only {available_bytes / MB:.0f} MB is available "
        f"({source})" + (f"; estimate: {basis}" if basis else ""),
        hint="close other programs, pick a smaller quantization, or load with a shorter context",
    )
