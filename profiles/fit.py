"""Will a model fit a profile? Memory estimates for deploying and for training.

``fit_model(path, profile)`` reads the model's shape (HF dir, GGUF or ONNX) and returns
``{"deploy": [...], "train": {...}}``. The estimators themselves are pure functions of
shapes, dtypes and settings (:func:`estimate_deploy`, :func:`estimate_train`), so they are
tested without any model file and reused by the student sizer (``distill/student.py``) and
the training planner (``distill/plan.py``). The runtime preflight does not use them yet: it
estimates from the model file itself (``runtime/memory.py``, ``runtime/onnx_graph.py``) with
its own allowance (issue #16 asks for one estimator).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import ModelSourceError
from edgepack.profiles import Profile

MIB = 2**20

# Effective bits per weight of llama.cpp types (block scales included; K-quant mixes use
# the figures llama.cpp's quantize tool reports for 7B-class models).
GGUF_BITS: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
    "Q4_K_M": 4.89, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_XS": 4.25,
}
# ONNX: MatMulNBits/int8 quantize the linear layers only; embeddings stay fp32.
ONNX_LINEAR_BITS: dict[str, float] = {"fp32": 32.0, "int8": 8.0 + 32 / 128, "int4": 4.0 + 32 / 32}
# Process baseline measured on CPython 3.11 + llama_cpp import (ru_maxrss before load): ~40 MiB.
RUNTIME_BASE_BYTES: dict[str, int] = {"gguf": 40 * MIB, "onnx": 90 * MIB}
KV_BYTES_PER_VALUE: dict[str, int] = {"gguf": 2, "onnx": 4}   # llama.cpp f16 cache; ORT fp32


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates need to know about a decoder-only transformer."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: int
    embedding_params: int
    tied: bool


@dataclass(frozen=True)
class DeployEstimate:
    format: str
    quant: str
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    as_is: bool = False


def kv_cache_bytes(shape: ModelShape, context: int, fmt: str = "gguf", slots: int = 1) -> int:
    """K and V for every layer at ``context`` tokens (``slots`` parallel sequences)."""
    return 2 * shape.n_layers * context * shape.n_kv_heads * shape.head_dim * KV_BYTES_PER_VALUE[fmt] * slots


def compute_overhead_bytes(shape: ModelShape, context: int, fmt: str, prompt_tokens: int) -> int:
    """Runtime baseline + activation/compute buffers for a prompt of ``prompt_tokens``."""
    ubatch = min(max(prompt_tokens, 1), 512)
    # Per prompt token: residual + attention/MLP intermediates (~12·hidden floats) and the
    # attention scores over the context; plus the logits of the last position.
    act = ubatch * (12 * shape.hidden + shape.n_heads * context) * 4
    logits = 2 * shape.vocab * 4
    return RUNTIME_BASE_BYTES[fmt] + act + logits


def weights_bytes(shape: ModelShape, fmt: str, quant: str) -> int:
    """Bytes of the weights once converted to ``fmt`` at ``quant``."""
    if fmt == "gguf":
        return int(shape.params * GGUF_BITS[quant] / 8)
    bits = ONNX_LINEAR_BITS[quant]
    linear = shape.params - shape.embedding_params   # includes an untied LM head
    # The Gather table stays fp32; a tied LM head becomes a quantized MatMul copy of it.
    lm_head_copy = shape.embedding_params * bits / 8 if shape.tied else 0
    return int(linear * bits / 8 + shape.embedding_params * 4 + lm_head_copy)


def estimate_deploy(shape: ModelShape, fmt: str, quant: str, context: int, budget_bytes: int,
                    prompt_tokens: int = 128, weights_override: int | None = None) -> DeployEstimate:
    """Peak memory of one inference process serving one sequence at ``context``."""
    w = weights_override if weights_override is not None else weights_bytes(shape, fmt, quant)
    kv = kv_cache_bytes(shape, context, fmt)
    over = compute_overhead_bytes(shape, context, fmt, prompt_tokens)
    total = w + kv + over
    return DeployEstimate(fmt, quant, w, kv, over, total, total <= budget_bytes,
                          as_is=weights_override is not None)


@dataclass(frozen=True)
class TrainEstimate:
    device: str
    method: str
    micro_batch: int
    seq_len: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    teacher_bytes: int
    total_bytes: int
    budget_bytes: int
    fits: bool


def estimate_train(shape: ModelShape, *, budget_bytes: int, device: str, method: str = "full",
                   micro_batch: int = 4, seq_len: int = 256, teacher: ModelShape | None = None,
                   teacher_mode: str = "online", lora_fraction: float = 0.01,
                   checkpointing: bool = False) -> TrainEstimate:
    """fp32 AdamW training memory: weights, gradients, optimizer state, activations, teacher.

    ``teacher_mode`` "online" keeps the teacher's fp32 weights and dense logits in memory;
    "cached" reads sparse top-k soft labels from disk instead (a few MB per batch).
    """
    p = shape.params
    trainable = p if method == "full" else int(p * lora_fraction)
    weights = 4 * p
    grads = 4 * trainable
    optim = 8 * trainable                       # Adam m and v in fp32
    tokens = micro_batch * seq_len
    # Per layer and token: ~34·hidden bytes of saved activations at fp32 (Korthikanti et al.
    # count 34·h at fp16 for the MLP/attention inputs; we store fewer, in fp32) plus the
    # attention probabilities; checkpointing keeps only each block's input.
    per_layer = tokens * (shape.hidden * 4 if checkpointing else 17 * shape.hidden * 4
                          + shape.n_heads * seq_len * 4)
    logits = 3 * tokens * shape.vocab * 4       # student logits, their gradient, log-softmax
    acts = shape.n_layers * per_layer + logits
    teacher_b = 0
    if teacher is not None:
        teacher_b = (4 * teacher.params + tokens * teacher.vocab * 4) if teacher_mode == "online" \
            else tokens * 32 * 8
    total = weights + grads + optim + acts + teacher_b
    return TrainEstimate(device, method, micro_batch, seq_len, weights, grads, optim, acts,
                         teacher_b, total, budget_bytes, total <= budget_bytes)


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
    """Shape and file type name of a GGUF, read from its metadata (no weights loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on bad bytes
        from edgepack.errors import InvalidModelFile

        raise InvalidModelFile(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    arch = field("general.architecture")
    get = lambda k: field(f"{arch}.{k}")  # noqa: E731
    hidden, layers = int(get("embedding_length")), int(get("block_count"))
    heads = int(get("attention.head_count"))
    kv = int(get("attention.head_count_kv") or heads)
    head_dim = int(get("attention.key_length") or hidden // heads)
    tokens = field("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size") or (len(tokens) if tokens is not None else 0))
    params = sum(int(t.n_elements) for t in reader.tensors)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    shape = ModelShape(layers, hidden, heads, kv, head_dim, int(get("feed_forward_length")), vocab,
                       params, vocab * hidden, tied)
    ftype = field("general.file_type")
    return shape, _ftype_name(ftype)


def _ftype_name(ftype: Any) -> str:
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(ftype)).name  # e.g. MOSTLY_Q4_1
        return name.removeprefix("MOSTLY_").replace("ALL_", "")
    except (TypeError, ValueError):
        return "unknown"


def _onnx_files(path: Path) -> tuple[Path, int]:
    if path.is_dir():
        models = sorted(path.glob("*.onnx"))
        if not models:
            raise ModelSourceError(f"{path}: no .onnx file in this folder")
        model = models[0]
        folder = path
    else:
        model, folder = path, path.parent
    size = sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.suffix in (".onnx", ".onnx_data", ".data") or f.name.endswith(".onnx.data")))
    return model, size


def fit_model(model: Path, profile: Profile, context: int | None = None) -> dict[str, Any]:
    """Deploy and training estimates of ``model`` (HF dir, .gguf, ONNX) for ``profile``."""
    model = Path(model)
    if not model.exists():
        raise ModelSourceError(f"model not found: {model}")
    ctx = context or profile.context_length
    budget = profile.memory_budget_mb * MIB
    deploy: list[DeployEstimate] = []
    if model.is_file() and model.suffix == ".gguf":
        shape, ftype = shape_from_gguf(model)
        deploy.append(estimate_deploy(shape, "gguf", ftype, ctx, budget, profile.prompt_tokens,
                                      weights_override=model.stat().st_size))
        source = "gguf"
    elif model.suffix == ".onnx" or (model.is_dir() and any(model.glob("*.onnx"))):
        _, size = _onnx_files(model)
        cfg_dir = model if model.is_dir() else model.parent
        shape = shape_from_hf_dir(cfg_dir)
        deploy.append(estimate_deploy(shape, "onnx", "as-is", ctx, budget, profile.prompt_tokens,
                                      weights_override=size))
        source = "onnx"
    elif model.is_dir():
        shape = shape_from_hf_dir(model)
        source = "hf"
    else:
        raise ModelSourceError(f"{model}: not an HF model dir, a .gguf file or an ONNX model")
    for choice in profile.choices:
        deploy.append(estimate_deploy(shape, choice.format, choice.quant, ctx, budget, profile.prompt_tokens))
    train = estimate_train(shape, budget_bytes=profile.train_memory_mb * MIB, device=profile.train_device,
                           teacher=shape, teacher_mode="online")
    return {
        "model": str(model), "source": source, "profile": profile.name, "context": ctx,
        "budget_mb": profile.memory_budget_mb, "shape": asdict(shape),
        "deploy": [asdict(d) for d in deploy],
        "train": {**asdict(train), "note": "teacher of the same size, online dense logits"},
        "estimate": True, "threads": profile.threads, "cpu_count": os.cpu_count(),
    }
