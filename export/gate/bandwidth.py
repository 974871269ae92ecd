"""This machine's memory bandwidth, and how much of it an artifact's decoding uses.

Decoding one token reads every weight once (plus the KV cache up to that position), so on a
CPU its speed is bounded by memory bandwidth: ``tok/s ≤ bandwidth / bytes per token``.
:func:`decode_efficiency` reports the fraction of the measured bandwidth a gate run achieved,
which tells "the runtime is slow" apart from "the machine is slow".

:func:`measure_bandwidth` sums a large float64 array (256 MB by default, far above any CPU
cache) with numpy, once on one thread and once split across the threads the gate uses (numpy
releases the GIL inside reductions), after one untimed pass that faults the pages in; each
figure is the best of ``repeats`` passes (STREAM's convention: the least disturbed pass) with
the median and every sample kept. A copy (read + write) figure is recorded for reference.
:func:`machine_bandwidth` measures once per machine and caches the result in
``$EDGEPACK_CACHE/bandwidth.json`` (default ``~/.cache/edgepack``), keyed by host name, CPU
model, CPU count and memory size.

Bytes per token come from the artifact itself (its format's ``traffic`` part,
:mod:`edgepack.formats`): GGUF tensor bytes (:func:`gguf_traffic`) with the input embedding
counted as one row when the output head is a separate tensor (a tied head reads the whole
table), ONNX initializer bytes with ``Gather`` tables counted as one row; KV bytes per position
from the cache shape (F16 in llama.cpp, the graph's dtype in ONNX). Efficiency above 1 means the
weights were served from CPU caches (tiny models).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.progress import ProgressFn, null_progress
from edgepack.provenance import machine_key

DEFAULT_ARRAY_MB = 256
DEFAULT_REPEATS = 5
CACHE_FILE = "bandwidth.json"
GB = 1e9


def _timed_passes(fn: Callable[[], Any], repeats: int, nbytes: int) -> list[float]:
    fn()  # untimed: faults pages in, spins up threads
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - start) / GB)
    return rates


def _series(rates: list[float]) -> dict[str, Any]:
    return {"best": max(rates), "median": statistics.median(rates), "min": min(rates),
            "samples": [round(r, 3) for r in rates]}


def measure_bandwidth(*, array_mb: int = DEFAULT_ARRAY_MB, repeats: int = DEFAULT_REPEATS,
                      threads: int | None = None) -> dict[str, Any]:
    """Read bandwidth (GB/s, 1e9 bytes) of a numpy sum over ``array_mb`` MB; see the module doc."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from edgepack.runtime.backends.base import default_threads

    if array_mb < 64 or repeats < 1:
        raise ValueError("need array_mb >= 64 (larger than CPU caches) and repeats >= 1")
    threads = max(1, threads or default_threads())
    a = np.ones(array_mb * 2**20 // 8, dtype=np.float64)
    chunks = np.array_split(a, threads)
    single = _timed_passes(lambda: float(a.sum()), repeats, a.nbytes)
    with ThreadPoolExecutor(threads) as pool:
        multi = _timed_passes(lambda: sum(pool.map(np.sum, chunks)), repeats, a.nbytes) if threads > 1 else single
    b = np.zeros_like(a)
    copy = _timed_passes(lambda: np.copyto(b, a), repeats, 2 * a.nbytes)
    del a, b, chunks
    read = _series(multi)
    return {
        "read_gb_s": read["best"], "read": read, "read_single_thread": _series(single),
        "copy_gb_s": max(copy), "copy": _series(copy), "threads": threads, "array_mb": array_mb,
        "repeats": repeats, "machine": machine_key(), "numpy": np.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "method": f"numpy float64 sum over {array_mb} MB split across {threads} thread(s), best of {repeats} "
                  "after one untimed pass; copy = np.copyto counted as read + write",
    }


def cache_path() -> Path:
    from edgepack.runtime.session import cache_root

    return cache_root() / CACHE_FILE


def machine_bandwidth(*, refresh: bool = False, progress: ProgressFn = null_progress,
                      **measure_args: Any) -> dict[str, Any]:
    """This machine's bandwidth from the cache, measured (and cached) on first use or ``refresh``."""
    from edgepack.atomic import write_json

    path = cache_path()
    key = machine_key()
    cached: dict[str, Any] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}  # an unreadable cache is rebuilt, not trusted
    machines = cached.get("machines") if isinstance(cached.get("machines"), dict) else {}
    entry = machines.get(key)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("read_gb_s"), (int, float)):
        return {**entry, "cached": True, "cache": str(path)}
    progress("bandwidth", 0, 1)
    entry = measure_bandwidth(**measure_args)
    progress("bandwidth", 1, 1)
    write_json(path, {"machines": {**machines, key: entry}})
    return {**entry, "cached": False, "cache": str(path)}


# --- bytes read per decoded token, by format --------------------------------------------------
# GGUF tensors read one row per token (an embedding lookup) when the output head is separate.
GGUF_LOOKUP_TENSORS = {"token_embd.weight": "output.weight"}  # lookup table -> the head that unties it


def gguf_traffic(path: Path) -> dict[str, Any]:
    """Weight bytes per token and KV bytes per position of a GGUF (header only)."""
    import math

    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.memory import estimate_gguf_memory

    info = read_gguf(Path(path))
    names = {t.name for t in info.tensors}
    weights, lookups = 0, []
    for t in info.tensors:
        head = GGUF_LOOKUP_TENSORS.get(t.name)
        if head is not None and head in names and len(t.shape) >= 2:
            weights += t.nbytes // max(1, math.prod(t.shape[1:]))  # ggml order: ne0 is the row length
            lookups.append(t.name)
        else:
            weights += t.nbytes
    kv = estimate_gguf_memory(info, 1)["kv_cache_bytes"]
    return {"weight_bytes_per_token": weights, "kv_bytes_per_position": kv, "weight_bytes_total": info.tensor_bytes,
            "basis": "GGUF tensor bytes" + (f"; {', '.join(lookups)} counted as one row" if lookups else
                                            "; tied output head reads the whole embedding table")
                     + "; F16 KV cache (llama.cpp default)"}


def decode_efficiency(*, decode_tokens_per_s: float, weight_bytes_per_token: int, kv_bytes_per_position: int,
                      position: float, bandwidth_gb_s: float) -> dict[str, Any]:
    """Achieved GB/s while decoding (tok/s × bytes per token) as a fraction of ``bandwidth_gb_s``."""
    if bandwidth_gb_s <= 0:
        raise ValueError("bandwidth must be > 0")
    per_token = weight_bytes_per_token + kv_bytes_per_position * position
    achieved = decode_tokens_per_s * per_token / GB
    return {"efficiency": achieved / bandwidth_gb_s, "achieved_gb_s": achieved, "bandwidth_gb_s": bandwidth_gb_s,
            "bytes_per_token": int(per_token), "weight_bytes_per_token": weight_bytes_per_token,
            "kv_bytes_per_position": kv_bytes_per_position, "position": position,
            "decode_tokens_per_s": decode_tokens_per_s,
            "bound_tokens_per_s": bandwidth_gb_s * GB / per_token if per_token else None}


def artifact_efficiency(model_path: Path, fmt: str, measurements: dict[str, Any],
                        bandwidth: dict[str, Any]) -> dict[str, Any]:
    """Decode efficiency of one gate measurement (median decode rate, mean decode position)."""
    from edgepack.formats import get_format

    artifact_format = get_format(fmt)
    if not artifact_format.provides("traffic"):
        return {"efficiency": None, "note": f"no bytes-per-token estimator for format {fmt!r}"}
    traffic = artifact_format.part("traffic")(Path(model_path))
    # Decoded tokens after the first sit at positions prompt+1 .. prompt+decode-1.
    position = measurements["prompt_tokens"] + measurements["decode_tokens"] / 2.0
    out = decode_efficiency(decode_tokens_per_s=float(measurements["decode_tokens_per_s"]["p50"]),
                            weight_bytes_per_token=traffic["weight_bytes_per_token"],
                            kv_bytes_per_position=traffic["kv_bytes_per_position"], position=position,
                            bandwidth_gb_s=float(bandwidth["read_gb_s"]))
    out["basis"] = traffic["basis"]
    out["bandwidth_method"] = bandwidth.get("method")
    if out["efficiency"] > 1:
        out["note"] = "above 1: the weights fit in CPU caches, so main-memory bandwidth is not the bound"
    return out
