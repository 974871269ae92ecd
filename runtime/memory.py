"""Memory estimate and preflight: refuse a model up front instead of being OOM-killed.

mmap lets llama.cpp "load" a model larger than RAM and then crawl or be killed mid-answer
(llama.cpp #711, llama-cpp-python #254). Before loading, edgepack compares an estimate with the
memory this process can actually get (the smaller of psutil's MemAvailable and the cgroup v2
limit) and refuses with both numbers, the way Ollama does.

The estimate is a pure function of shapes: weights (tensor bytes) + KV cache
(layers × context × kv_heads × (key_dim + value_dim) × 2 bytes for llama.cpp's default F16
cache) + a fixed runtime allowance for the interpreter, the runtime library and compute
buffers. The allowance was calibrated on the embedded 135M teacher (RSS after load minus
weights and KV ≈ 60 MB with llama-cpp-python 0.3.36) and doubled; it is an estimate and
is labelled as one wherever it is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.errors import BudgetError
from edgepack.gguf_header import GGUFInfo

MB = 1024 * 1024
RUNTIME_ALLOWANCE_BYTES = 128 * MB
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type is F16


def kv_cache_bytes(*, n_layer: int, n_ctx: int, n_head_kv: int, key_dim: int, value_dim: int,
                   bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
    """Bytes of a K+V cache for ``n_ctx`` positions."""
    return n_layer * n_ctx * n_head_kv * (key_dim + value_dim) * bytes_per_element


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)  # per-layer head counts (some hybrids): bound by the largest
    return None


def estimate_gguf_memory(info: GGUFInfo, n_ctx: int) -> dict[str, Any]:
    """Weights + KV + allowance for a GGUF loaded with context ``n_ctx``, in bytes.

    ``basis`` says what went into the number; a model whose metadata lacks the attention
    shape gets no KV term and says so.
    """
    weights = info.tensor_bytes
    n_layer = _as_int(info.arch_value("block_count"))
    n_head = _as_int(info.arch_value("attention.head_count"))
    n_head_kv = _as_int(info.arch_value("attention.head_count_kv")) or n_head
    n_embd = _as_int(info.arch_value("embedding_length"))
    key_dim = _as_int(info.arch_value("attention.key_length")) or (n_embd // n_head if n_embd and n_head else None)
    value_dim = _as_int(info.arch_value("attention.value_length")) or key_dim
    if n_layer and n_head_kv and key_dim and value_dim:
        kv = kv_cache_bytes(n_layer=n_layer, n_ctx=n_ctx, n_head_kv=n_head_kv,
                            key_dim=key_dim, value_dim=value_dim)
        basis = (f"weights {weights} B + F16 KV cache {n_layer} layers × {n_ctx} ctx × {n_head_kv} kv heads "
                 f"× ({key_dim}+{value_dim}) + runtime allowance {RUNTIME_ALLOWANCE_BYTES // MB} MB (estimate)")
    else:
        kv = 0
        basis = (f"weights {weights} B + runtime allowance {RUNTIME_ALLOWANCE_BYTES // MB} MB; no KV term: "
                 "the metadata lacks the attention shape (estimate, likely low)")
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "runtime_allowance_bytes": RUNTIME_ALLOWANCE_BYTES,
            "total_bytes": weights + kv + RUNTIME_ALLOWANCE_BYTES, "n_ctx": n_ctx, "basis": basis}


def gguf_artifact_memory(path: Path, n_ctx: int) -> dict[str, Any]:
    """:func:`estimate_gguf_memory` of the GGUF file at ``path`` (header read by the bounded reader):
    the ``gguf`` format's ``artifact_memory`` part, which the runtime preflight calls."""
    from edgepack.gguf_header import read_gguf

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
