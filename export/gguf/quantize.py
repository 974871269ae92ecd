"""Quantize an F32/F16/BF16 GGUF with llama.cpp's own quantizer (via llama-cpp-python).

``quantize_gguf(src, dst, qtype)`` calls ``llama_model_quantize`` with the ftype named in
:data:`QUANT_TYPES`; the output is written to ``<dst>.part-<pid>.edgepack-tmp`` and renamed when whole.

Row sizes: K-quants (Q*_K, IQ4_XS) work on 256-wide blocks, Q8_0/Q4_0/Q4_1 on 32-wide
blocks. For a tensor whose row length is not a multiple of the block, llama.cpp falls back
to a compatible type per tensor (e.g. Q4_K → Q5_0, Q6_K → Q8_0; see
``tensor_type_fallback`` in llama.cpp's ``llama-quant.cpp``), so a hidden-64 test model
still quantizes; its file is just larger than a real Q4_K_M. :func:`tensor_types` reports
what each tensor actually became.

An importance matrix is read from llama.cpp's GGUF imatrix format
(``<tensor>.in_sum2`` / ``<tensor>.counts``, as ``llama-imatrix`` writes it).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_path
from edgepack.errors import InvalidModelFile, ModelSourceError, RuntimeFailure, UsageError
from edgepack.gguf_header import read_gguf, tensor_data

# edgepack quant name → (llama_cpp.LLAMA_FTYPE_* constant, the ggml type of most weight matrices)
QUANT_TYPES: dict[str, tuple[str, str]] = {
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K"),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K"),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    "Q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1"),
    "IQ4_XS": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS"),
}


def supported_quants() -> list[str]:
    """Quant names this llama-cpp-python build can produce."""
    import llama_cpp

    return [q for q, (const, _) in QUANT_TYPES.items() if hasattr(llama_cpp, const)]


def _ftype(qtype: str) -> int:
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise UsageError(f"unknown quantization {qtype!r}", hint=f"choose from {', '.join(QUANT_TYPES)}")
    const = QUANT_TYPES[qtype][0]
    if not hasattr(llama_cpp, const):
        raise UsageError(f"{qtype} is not supported by this llama-cpp-python build",
                         hint=f"available: {', '.join(supported_quants())}")
    return int(getattr(llama_cpp, const))


def load_imatrix(path: Path) -> dict[str, list[float]]:
    """Per-tensor importance values from a GGUF imatrix (mean squared activations)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"imatrix {path} does not exist")
    try:
        info = read_gguf(path)
    except InvalidModelFile as exc:
        raise InvalidModelFile(f"{path.name} is not a GGUF imatrix (the legacy .dat format is not read): {exc}",
                               hint="regenerate it with a current llama-imatrix (GGUF output)") from exc
    names = {t.name for t in info.tensors}
    out: dict[str, list[float]] = {}
    for name in (t.name for t in info.tensors if t.name.endswith(".in_sum2")):
        base = name[: -len(".in_sum2")]
        if base + ".counts" not in names:
            raise InvalidModelFile(f"{path.name}: {base} has in_sum2 but no matching counts")
        sums = tensor_data(info, name).astype(np.float32)
        counts = tensor_data(info, base + ".counts").astype(np.float32)
        if counts.size == 0 or sums.size % counts.size:
            raise InvalidModelFile(f"{path.name}: {base} has in_sum2 but no matching counts")
        per_expert = sums.reshape(counts.size, -1)
        # A zero count means the tensor never saw data: importance 1 (llama-quantize does the same).
        values = np.where(counts[:, None] > 0, per_expert / np.maximum(counts[:, None], 1), 1.0)
        if not np.isfinite(values).all():
            raise InvalidModelFile(f"{path.name}: imatrix for {base} has NaN/Inf values")
        out[base] = values.astype(np.float32).reshape(-1).tolist()
    if not out:
        raise InvalidModelFile(f"{path.name} holds no <tensor>.in_sum2 entries; not an imatrix")
    return out


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int | None = None,
                  imatrix: Path | None = None) -> Path:
    """Quantize ``src`` (an F32/F16/BF16 GGUF) to ``qtype`` at ``dst``; returns ``dst``."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    ftype = _ftype(qtype)
    if not src.is_file():
        raise ModelSourceError(f"{src} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads) if threads else (os.cpu_count() or 1)
    keep: list[Any] = []  # ctypes buffers must outlive the call
    if imatrix is not None:
        entries = load_imatrix(imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(entries.items()):
            buf = (ctypes.c_float * len(values))(*values)
            bname = name.encode()
            keep += [buf, bname]
            arr[i].name, arr[i].data, arr[i].size = bname, ctypes.cast(buf, ctypes.POINTER(ctypes.c_float)), len(values)
        arr[len(entries)].name = None  # terminator
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with atomic_path(dst) as tmp, _captured_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            detail = " ".join(line.strip() for line in log[-3:])
            raise RuntimeFailure(f"llama.cpp failed to quantize {src.name} to {qtype} (code {rc}): {detail}",
                                 hint="check that the source is an F32/F16/BF16 GGUF written by edgepack")
    return dst


@contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    """Route llama.cpp's log into a list (warnings and errors) instead of stderr.

    With EDGEPACK_DEBUG=1 everything is also echoed to stderr. The callback is global in
    llama.cpp, so llama-cpp-python's own callback is put back afterwards.
    """
    import llama_cpp
    import llama_cpp._logger as llama_logger

    lines: list[str] = []
    debug = os.environ.get("EDGEPACK_DEBUG") == "1"

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h numbering)
            lines.append(text.decode("utf-8", "replace"))
        if debug:
            sys.stderr.write(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name → ggml type name (e.g. ``Q4_K``), read from the file's tensor table."""
    return {t.name: t.ggml_type for t in read_gguf(Path(path)).tensors}


def quant_report(path: Path, qtype: str) -> dict[str, Any]:
    """What a quantized file holds: ggml type counts, and how many weight matrices could
    not take ``qtype``'s block type because their row length is not a multiple of its
    block size (llama.cpp then falls back to another type for that tensor)."""
    import gguf

    tensors = read_gguf(Path(path)).tensors
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    primary = gguf.GGMLQuantizationType[QUANT_TYPES[qtype][1]]
    block = gguf.GGML_QUANT_SIZES[primary][0]
    matrices = [t for t in tensors if len(t.shape) >= 2]
    fallback = sum(1 for t in matrices if int(t.shape[0]) % block)  # shape[0] is ne0, the row length
    return {"tensor_types": dict(sorted(counts.items())), "fallback_tensors": fallback,
            "weight_matrices": len(matrices), "block_size": int(block)}
