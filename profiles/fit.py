"""Will a model fit a profile? ``profiles fit``: read a model's shape, ask the one estimator, give a verdict.

``fit_model(path, profile)`` reads the model's shape (an HF dir, a GGUF file or an ONNX folder)
and returns ``{"deploy": [...], "train": {...}}``. The deploy numbers are :mod:`edgepack.memory`'s,
the estimator the student sizer, the manifest and the runtime preflight use too, and the train
row is :mod:`edgepack.train_memory`'s, the count ``distill train``'s planner makes: each profile choice is predicted through its format's ``predict_memory`` part, and an
artifact given as-is is estimated by its format's ``artifact_memory`` part, the very function
the runtime preflight calls before loading it. This module only reads shapes and compares the
estimates with the profile's budgets.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, ModelSourceError
from edgepack.formats import Format, format_of
from edgepack.memory import ModelShape, predict_memory
from edgepack.train_memory import PROCESS_GROWTH_MB, estimate_train
from edgepack.profiles import Profile

MIB = 2**20


@dataclass(frozen=True)
class DeployEstimate:
    """One row of the deploy table: an estimate (:class:`edgepack.memory.MemoryEstimate`) and the verdict."""

    format: str
    quant: str
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    """The runtime allowance (``runtime_allowance_bytes`` of the estimate)."""
    total_bytes: int
    fits: bool
    as_is: bool = False
    file_bytes: int | None = None
    """The artifact's size on disk: predicted, or the file's own for an as-is artifact."""
    basis: str = ""


def deploy_verdict(fmt: str, quant: str, estimate: dict[str, Any], budget_bytes: int, *,
                   as_is: bool = False, file_bytes: int | None = None) -> DeployEstimate:
    """An estimate (the ``MemoryEstimate`` dict form) against a memory budget."""
    total = int(estimate["total_bytes"])
    return DeployEstimate(fmt, quant, int(estimate["weights_bytes"]), int(estimate["kv_cache_bytes"]),
                          int(estimate["runtime_allowance_bytes"]), total, total <= budget_bytes, as_is,
                          file_bytes if file_bytes is not None else estimate.get("file_bytes"),
                          str(estimate.get("basis", "")))


# --- reading shapes ------------------------------------------------------------------------


def shape_from_config(cfg: dict[str, Any], params: int | None = None) -> ModelShape:
    """A ModelShape from an HF ``config.json`` dict (params counted from it if not given)."""
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    inter = int(cfg["intermediate_size"])
    vocab = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    emb = vocab * hidden
    if params is None:
        attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
        params = layers * (attn + 3 * hidden * inter + 2 * hidden) + emb * (1 if tied else 2) + hidden
    return ModelShape(layers, hidden, heads, kv, head_dim, inter, vocab, params, emb, tied)


def _hf_params(model_dir: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= int(d)
                total += n
    return total


def shape_from_hf_dir(model_dir: Path) -> ModelShape:
    """The shape an HF ``config.json`` describes (parameters counted from the safetensors when present)."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(f"{model_dir}: no config.json; not an HF model dir")
    try:
        cfg = json.loads(cfg_path.read_text())
        return shape_from_config(cfg, _hf_params(model_dir))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelSourceError(f"{cfg_path}: missing or bad field ({exc})",
                               hint="fit supports decoder-only transformer configs") from exc


def shape_from_gguf(path: Path) -> tuple[ModelShape, str]:
    """Shape and file type name of a GGUF, read from its header by the bounded reader (no weights)."""
    from edgepack.gguf_header import TOKENS_KEY, ArrayInfo, read_gguf

    info = read_gguf(path)

    def number(key: str, default: int | None = None) -> int:
        value = info.arch_value(key)
        if isinstance(value, list) and value:
            value = max(value)  # per-layer values (some hybrids): bound by the largest
        if isinstance(value, bool) or not isinstance(value, int):
            if default is None:
                raise InvalidModelFile(f"{path.name}: the GGUF metadata lacks {info.architecture}.{key}")
            return default
        return value

    hidden, heads = number("embedding_length"), number("attention.head_count")
    tokens = info.metadata.get(TOKENS_KEY)
    n_tokens = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else 0
    vocab = number("vocab_size", n_tokens)
    tied = all(t.name != "output.weight" for t in info.tensors)
    params = sum(_elements(t.shape) for t in info.tensors)
    shape = ModelShape(number("block_count"), hidden, heads, number("attention.head_count_kv", heads),
                       number("attention.key_length", hidden // heads), number("feed_forward_length"), vocab,
                       params, vocab * hidden, tied)
    return shape, info.quant or "unknown"


def _elements(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _read_model(model: Path) -> tuple[ModelShape, Format | None, str]:
    """(shape, the artifact's format or None for an HF dir, the quantization it holds)."""
    try:
        fmt: Format | None = format_of(model)
    except ModelSourceError:
        fmt = None
    if model.is_file():
        with open(model, "rb") as fh:
            if fh.read(4) == b"GGUF":
                shape, quant = shape_from_gguf(model)
                return shape, fmt, quant
    if fmt is None and not model.is_dir():
        raise ModelSourceError(f"{model}: not an HF model dir, a .gguf file or an ONNX model")
    return shape_from_hf_dir(model if model.is_dir() else model.parent), fmt, "as-is"


def _artifact_file_bytes(model: Path) -> int:
    """Bytes of the artifact itself: the file, or a folder's files."""
    if model.is_file():
        return model.stat().st_size
    return sum(f.stat().st_size for f in model.iterdir() if f.is_file())


def train_estimate(shape: ModelShape, profile: Profile) -> dict[str, Any]:
    """Training ``shape`` on the profile's training device, as ``distill train``'s planner counts its
    first candidate (edgepack/train_memory.py): full fine-tuning with fp32 AdamW, no checkpointing,
    micro-batch 4 of 256 tokens, an online teacher of the same shape in the device's precision. On
    the CPU the process's growth during training (PROCESS_GROWTH_MB) counts against the budget; the
    process before any model is loaded (Python, torch: a few hundred MB) is not known here and does
    not — ``distill train`` measures it and plans again, trying LoRA, smaller micro-batches and
    checkpointing."""
    cpu = profile.train_device == "cpu"
    growth = PROCESS_GROWTH_MB * MIB if cpu else 0
    budget = profile.train_memory_mb * MIB
    est = estimate_train(shape, budget_bytes=int(budget - growth), device=profile.train_device, teacher=shape,
                         teacher_mode="online", half=not cpu)
    row = {k: v for k, v in asdict(est).items() if k != "transients"}
    return {**row, "transients_mb": est.transients.describe_mb(), "budget_bytes": budget, "process_growth_bytes": growth,
            "note": "full fine-tuning, fp32 AdamW, micro-batch 4 × 256 tokens, online teacher of the same shape; "
                    "the process before loading (Python, torch) is not counted"}


def fit_model(model: Path, profile: Profile, context: int | None = None) -> dict[str, Any]:
    """Deploy and training estimates of ``model`` (HF dir, .gguf, ONNX) for ``profile``."""
    model = Path(model)
    if not model.exists():
        raise ModelSourceError(f"model not found: {model}")
    ctx = context or profile.context_length
    budget = profile.memory_budget_mb * MIB
    shape, fmt, quant = _read_model(model)
    deploy: list[DeployEstimate] = []
    notes: list[str] = []
    if fmt is not None and fmt.artifact_memory:
        estimate = fmt.part("artifact_memory")(model, ctx)
        deploy.append(deploy_verdict(fmt.name, quant, estimate, budget, as_is=True,
                                     file_bytes=_artifact_file_bytes(model)))
    elif fmt is not None:
        notes.append(f"format {fmt.name!r} gives no artifact_memory part: no estimate of {model.name} as it is")
    for choice in profile.choices:
        predicted = predict_memory(choice.format, shape, choice.quant, ctx)
        deploy.append(deploy_verdict(choice.format, choice.quant, predicted.as_dict(), budget))
    train = train_estimate(shape, profile)
    return {
        "model": str(model), "source": fmt.name if fmt is not None else "hf", "profile": profile.name,
        "context": ctx, "budget_mb": profile.memory_budget_mb, "shape": asdict(shape),
        "deploy": [asdict(d) for d in deploy],
        "train": train,
        "estimate": True, "threads": profile.threads, "cpu_count": os.cpu_count(), "notes": notes,
    }
