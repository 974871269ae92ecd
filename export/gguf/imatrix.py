"""Importance matrix from the distillation data, written in llama.cpp's GGUF imatrix format.

llama.cpp's quantizer can weight each weight column's rounding error by how large that
column's input activations are, the "importance matrix". ``llama-imatrix`` measures it by
running the model over text and, for every matrix multiplication whose weight is a
``blk.*`` tensor, accumulating per input column the sum of squared activations and the
number of tokens (``collect_imatrix`` in llama.cpp's ``tools/imatrix/imatrix.cpp``).
:func:`collect_imatrix` accumulates exactly those sums with PyTorch forward pre-hooks on the
HF model's ``nn.Linear`` layers (in float64), over the run's own data, so the quantizer
protects the columns that matter for the distilled task. HF names become GGUF names through
the exporter's table (:mod:`.tensors`); the Llama Q/K row permutation does not move input
columns, so the sums need no reordering.

The file (:func:`write_imatrix`) is what current ``llama-imatrix`` writes: ``general.type =
"imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (uint32), and per weight ``<name>.in_sum2`` (F32, ne = [n_cols, 1]),
``<name>.counts`` (F32, ne = [1, 1]) and ``<name>.in_sum`` (F32, sums of activations,
used only by ``llama-imatrix --show-statistics``). :func:`~.quantize.load_imatrix` and
llama-quantize read it.

Differences from ``llama-imatrix``, on purpose: a "chunk" here is one calibration example
(a chat-templated prompt + response, truncated to ``chunk_size`` tokens) rather than a fixed
window of a text file, and sequences shorter than 16 tokens are kept (llama.cpp skips
batches under 16 tokens because during its own run those are generation steps).
A prefix shared by every example (the system prompt of distillation data) is computed
once and counted once per example, which gives the same sums for a fraction of the compute.
Like ``llama-imatrix`` without ``--process-output``, the output head is not measured
(``process_output=True`` adds it for untied heads; a tied head is ``token_embd``, which
llama.cpp never collects).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_path
from edgepack.errors import DataError, InvalidModelFile
from edgepack.gguf_header import read_gguf
from edgepack.progress import ProgressFn, null_progress
from edgepack.export.fidelity.models import torch_threads
from edgepack.export.fidelity.prompts import EvalRow, encode_row, load_rows, load_tokenizer
from edgepack.export.gguf.arch import arch_for_config
from edgepack.export.gguf.convert import read_config
from edgepack.export.gguf.tensors import gguf_tensor_name

# llama.cpp's key names (tools/imatrix/imatrix.cpp, LLM_KV_IMATRIX_*).
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
SUFFIX_SUM = ".in_sum"

DEFAULT_CHUNK_SIZE = 512   # tokens per calibration example at most (llama-imatrix's default -c)
DEFAULT_MAX_ROWS = 256     # calibration examples read at most (each is one forward pass)


@dataclass
class ImatrixStats:
    """Per GGUF weight name: sums of squared inputs and of inputs per column, token count."""

    sum2: dict[str, Any] = field(default_factory=dict)
    sum: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    tokens: int = 0
    shared_prefix: int = 0
    """Tokens common to every sequence that were run once (see :func:`collect_imatrix`)."""


def _linear_targets(model: Any, gguf_arch: str, tied: bool, process_output: bool) -> dict[str, Any]:
    """GGUF weight name → nn.Linear module, for every layer llama-imatrix would collect."""
    import torch

    targets: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = gguf_tensor_name(f"{name}.weight", gguf_arch)
        if gguf_name is None:
            continue
        if gguf_name.startswith("blk.") or (process_output and gguf_name == "output.weight" and not tied):
            targets[gguf_name] = module
    return targets


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least one token."""
    if not sequences:
        return 0
    first, n = sequences[0], min(map(len, sequences))
    i = 0
    while i < n and all(seq[i] == first[i] for seq in sequences):
        i += 1
    return max(0, min(i, n - 1))


def collect_imatrix(hf_dir: Path, sequences: list[list[int]], *, process_output: bool = False,
                    share_prefix: bool = True, threads: int | None = None,
                    progress: ProgressFn = null_progress) -> ImatrixStats:
    """Run the HF model (float32) over ``sequences`` and accumulate llama-imatrix's sums.

    With ``share_prefix``, a prefix common to every sequence (the chat template's system
    prompt, in distillation data) is run once and its sums counted once per sequence; each
    sequence's remainder continues from the cached keys/values. The activations are those
    of the full sequences (up to float rounding), for a fraction of the compute.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    arch = arch_for_config(config)
    sequences = [list(s) for s in sequences if s]
    if not sequences:
        raise DataError("no calibration tokens to compute an importance matrix from")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    model.eval()
    targets = _linear_targets(model, arch.gguf_arch, arch.tied, process_output)
    if not targets:
        raise InvalidModelFile(f"{hf_dir.name} has no linear layers with GGUF names to measure")
    sum2 = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in targets.items()}
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in targets.items()}
    counts = dict.fromkeys(targets, 0)
    weight = [1]  # how many sequences the tokens now running stand for

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sum2[name] += weight[0] * (x * x).sum(dim=0)
            sums[name] += weight[0] * x.sum(dim=0)
            counts[name] += weight[0] * int(x.shape[0])
        return hook

    decoder = model.get_decoder()  # the LM head's input is only needed with process_output

    def run(ids: list[int], cache: Any) -> None:
        hidden = decoder(input_ids=torch.tensor([ids], dtype=torch.long), past_key_values=cache,
                         use_cache=cache is not None).last_hidden_state
        if process_output:
            model.lm_head(hidden)

    n_prefix = common_prefix(sequences) if share_prefix and len(sequences) > 1 else 0
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets.items()]
    stats = ImatrixStats(chunks=len(sequences), tokens=sum(map(len, sequences)))
    try:
        with torch.no_grad(), torch_threads(threads):
            cache = None
            if n_prefix:
                cache = DynamicCache()
                weight[0] = len(sequences)
                run(sequences[0][:n_prefix], cache)
                weight[0] = 1
            for i, ids in enumerate(sequences):
                progress("imatrix", i, len(sequences))
                run(ids[n_prefix:], cache)
                if cache is not None:
                    cache.crop(n_prefix)
    finally:
        for h in handles:
            h.remove()
    progress("imatrix", len(sequences), len(sequences))
    stats.shared_prefix = n_prefix
    for name in targets:
        values = sum2[name].numpy()
        if not np.isfinite(values).all():
            raise InvalidModelFile(f"activations into {name} overflowed (NaN/Inf) on the calibration text",
                                   hint="the model is numerically broken; check it with `edgepack eval`")
        stats.sum2[name] = values
        stats.sum[name] = sums[name].numpy()
        stats.counts[name] = counts[name]
    return stats


def write_imatrix(path: Path, stats: ImatrixStats, *, datasets: list[str], chunk_size: int) -> Path:
    """Write ``stats`` as a GGUF imatrix at ``path`` (atomically); returns ``path``."""
    import gguf
    import numpy as np

    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(tmp, "imatrix")
        # llama-imatrix writes no general.architecture; GGUFWriter adds one in __init__.
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        try:
            writer.add_type("imatrix")
            writer.add_array(KEY_DATASETS, list(datasets))
            writer.add_uint32(KEY_CHUNK_COUNT, int(stats.chunks))
            writer.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
            for name in sorted(stats.sum2):  # llama-imatrix sorts names too
                # numpy shape (n_mat, n_cols) is ggml ne = [n_cols, n_mat]; dense weights have n_mat = 1.
                writer.add_tensor(name + SUFFIX_SUM2, np.asarray(stats.sum2[name], dtype=np.float32)[None, :])
                writer.add_tensor(name + SUFFIX_COUNTS, np.array([[stats.counts[name]]], dtype=np.float32))
                writer.add_tensor(name + SUFFIX_SUM, np.asarray(stats.sum[name], dtype=np.float32)[None, :])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(path)


def read_imatrix_meta(path: Path) -> dict[str, Any]:
    """``imatrix.*`` metadata of a GGUF imatrix (datasets, chunk count and size, entries)."""
    try:
        info = read_gguf(Path(path), keep_arrays=(KEY_DATASETS,))
    except InvalidModelFile as exc:
        raise InvalidModelFile(f"{Path(path).name} is not a GGUF file: {exc}") from exc
    datasets = info.arrays.get(KEY_DATASETS, info.metadata.get(KEY_DATASETS))
    return {"type": info.metadata.get("general.type"), "datasets": datasets,
            "chunk_count": info.metadata.get(KEY_CHUNK_COUNT), "chunk_size": info.metadata.get(KEY_CHUNK_SIZE),
            "entries": sum(1 for t in info.tensors if t.name.endswith(SUFFIX_SUM2))}


def is_imatrix_file(path: Path) -> bool:
    """True when ``path`` is a GGUF file whose ``general.type`` is ``imatrix``."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            return False
    try:
        return read_imatrix_meta(path)["type"] == "imatrix"
    except InvalidModelFile:
        return False


def build_imatrix(hf_dir: Path, out_path: Path, data: Path | list[EvalRow], *,
                  max_rows: int | None = DEFAULT_MAX_ROWS, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  process_output: bool = False, threads: int | None = None,
                  progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Compute and write the importance matrix of ``hf_dir`` over chat-templated
    prompt + response text from ``data`` (a JSONL file such as ``RUN/data/train.jsonl``, or
    rows); returns a summary (path, datasets, chunks, tokens, entries, seconds)."""
    from edgepack.export.api import sha256_file

    start = time.perf_counter()
    if isinstance(data, (str, Path)):
        rows = load_rows(Path(data), limit=max_rows)
        datasets = [str(data)]
        data_sha = sha256_file(Path(data))
    else:
        rows = list(data)[:max_rows] if max_rows else list(data)
        datasets = [f"<{len(rows)} rows given in code>"]
        data_sha = None
    tokenizer = load_tokenizer(hf_dir)
    sequences = [encode_row(tokenizer, r, with_response=True, max_tokens=chunk_size) for r in rows]
    stats = collect_imatrix(hf_dir, sequences, process_output=process_output, threads=threads, progress=progress)
    write_imatrix(out_path, stats, datasets=datasets, chunk_size=chunk_size)
    return {"path": str(out_path), "datasets": datasets, "dataset_sha256": data_sha, "rows": len(rows),
            "chunks": stats.chunks, "chunk_size": chunk_size, "tokens": stats.tokens,
            "shared_prefix_tokens": stats.shared_prefix,
            "entries": len(stats.sum2), "process_output": process_output,
            "seconds": round(time.perf_counter() - start, 3), "sha256": sha256_file(Path(out_path))}
