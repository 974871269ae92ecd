"""One memory estimator: the bytes an artifact file holds and the memory a process needs to run it.

Pure functions of a model's shape (:class:`ModelShape`), a quantization and a context length;
nothing here opens a model file. Every stage asks this module:

* ``profiles fit`` and the student sizer (``distill/student.py``) predict an artifact that is not
  exported yet through the format registry (:func:`predict_memory` → the format's
  ``predict_memory`` part: :func:`predict_gguf`, :func:`predict_onnx`);
* the runtime preflight and the bundle manifest estimate an artifact file they hold (the formats'
  ``artifact_memory`` parts, ``runtime/memory.py:gguf_artifact_memory`` and
  ``runtime/onnx_graph.py:estimate_onnx_memory``): they read the weight bytes and the shape from
  the file and call :func:`gguf_memory` / :func:`onnx_memory`;
* training memory (``distill/plan.py``'s planner, ``profiles fit``'s train row) is
  ``edgepack/train_memory.py``.

**What llama.cpp writes** (``llama_tensor_get_type`` and ``tensor_type_fallback`` in llama.cpp's
``src/llama-quant.cpp``): 1-D tensors (norms, biases) stay F32; the output head, and the token
embedding when it is tied to the head, become Q8_0 in a Q8_0 file and Q6_K otherwise; ``attn_v``
and ``ffn_down`` take more bits in some layers for Q4_K_M/Q5_K_M/IQ4_XS (``use_more_bits``); and
a matrix whose row length (``ne[0]``, its input width) is not a multiple of the type's block
(256 for K-quants and IQ4_XS) falls back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
IQ4_XS → IQ4_NL, and to F16 when even those blocks (32) do not divide it. :func:`gguf_tensor_types`
applies these rules; the test exports tiny models of awkward widths and compares every tensor.

**What edgepack's ONNX export writes** (``export/onnx/quantize.py``, defaults mirrored in the
``ONNX_*`` constants): every MatMul as ``MatMulNBits`` (blocks of :data:`ONNX_BLOCK` along K, an
fp32 scale and an integer zero point per block), ``down_proj``/``v_proj`` and the output head at
8 bits in an int4 graph, a tied embedding table stored once (it reads the head's 8-bit bytes).

**The runtime allowance** is what a process needs besides the weights and the KV cache: one
documented base per format, ``Format.runtime_base_bytes`` in ``edgepack/formats.py`` (the
interpreter, edgepack, the runtime library and its fixed buffers), plus what scales with the
model: the activations of one 512-token micro-batch (:func:`activation_bytes`, both formats),
the runtime's vocabulary tables, and the copies a runtime makes (below). Every estimate assumes a
prompt of :data:`UBATCH` tokens (llama.cpp evaluates longer prompts in such chunks), so fit, the
manifest and the preflight give the same number for the same file. Measured as the peak RSS
of edgepack's own measuring child (``export/gate/measure.py``: a fresh process loads the model,
answers a prompt of N tokens, reports ``ru_maxrss``), e.g.::

    python -c 'from pathlib import Path; from edgepack.export.gate.measure import measure_artifact as m;
        print(m(Path("MODEL"), fmt="gguf", threads=2, n_ctx=2048, prompt_tokens=500, decode_tokens=8,
                runs=1, max_runs=1, min_seconds=0)["peak_rss_mb"])'

on x86-64 (AVX2), CPython 3.11, llama-cpp-python 0.3.36, onnxruntime 1.31, for the demo student
(SmolLM2-derived, 14 layers, hidden 576, vocabulary 49,152; ``make demo``), the embedded teacher
and random Llamas of tests/edgepack/test_memory.py's builder (vocabulary 400). Peaks in MiB,
against this module's estimate (which assumes a 512-token prompt):

==============================  =====  ======  ======  ========
artifact                        n_ctx  prompt  peak    estimate
==============================  =====  ======  ======  ========
student Q8_0 (84.6 MB)          2048   500     191.9   192.5
student Q4_K_M (66.1 MB)        2048   500     178.2   178.6
student Q4_0 (59.8 MB)          2048   500     194.3   195.4
student F16 (157.6 MB)          2048   500     261.4   262.1
teacher Q4_1 (98.4 MB)          512    128     180.7   195.9
hidden 576, 8 layers, Q8_0      512    128     92.3    108.1
hidden 96, 3 layers, F16        512    128     57.5    62.1
student onnx int4 (72.3 MB)     2048   500     403.8   478.1 (415.1 at the 508 positions used)
hidden 576 onnx int4 / int8     512    128     128.7 / 142.5   145.0 / 162.5
hidden 576 onnx fp32            512    128     261.2   298.0
hidden 96 onnx int4             512    128     80.8    82.1
==============================  =====  ======  ======  ========

llama.cpp (``gguf`` base 58 MiB): a prompt costs 41 KB per token at hidden 576
(:data:`ACT_BYTES_PER_WIDTH`) and a 49,152-entry vocabulary about 17 MiB (:data:`GGUF_VOCAB_BYTES`).
On x86 AVX2 (and ARM NEON) ggml's CPU backend *repacks* Q4_0, IQ4_NL and Q4_K matrices into an
interleaved copy while the mapped originals stay resident (``CPU_REPACK model buffer`` in
llama.cpp's log; the student's Q4_0 peaks 16 MiB above its Q4_K_M with a 6 MB smaller file),
so those count twice (:data:`GGUF_REPACKED_TYPES`).

onnxruntime (``onnx`` base 76 MiB) holds about 1.75x the initializer bytes (the prepacked
MatMulNBits weights beside the parsed graph, :data:`ONNX_WEIGHT_COPY`), the fp32 KV cache twice
during a step (``past_key_values`` in, ``present`` out), and logits for every prompt position
(4 bytes x vocabulary per prompt token: +108 MiB from a 128- to a 500-token prompt for the
student); edgepack's ONNX backend also keeps two HF tokenizers and their tables
(:data:`ONNX_VOCAB_BYTES`). Its KV cache grows with the conversation, so at a full ``n_ctx`` the
estimate is what the process would reach, not what a short chat peaks at.

These are estimates, labelled so wherever they are reported; the gate measures the real peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

MIB = 2**20
UBATCH = 512
"""llama.cpp's default micro-batch: a prompt is evaluated in chunks of at most this many tokens."""


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
    """Every parameter, a tied embedding counted once (norms and biases included)."""
    embedding_params: int
    tied: bool
    """The output head reuses the token embedding (no separate ``lm_head``)."""


@dataclass(frozen=True)
class Matrix:
    """One weight matrix as llama.cpp names it; ``cols`` is the row length (the input width)."""

    name: str
    role: str
    layer: int
    cols: int
    rows: int


LAYER_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def model_matrices(shape: ModelShape) -> list[Matrix]:
    """Every 2-D weight of a Llama-family decoder, with the width it is stored at."""
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    h, ff = shape.hidden, shape.intermediate
    widths = {"attn_q": (h, q), "attn_k": (h, kv), "attn_v": (h, kv), "attn_output": (q, h),
              "ffn_gate": (h, ff), "ffn_up": (h, ff), "ffn_down": (ff, h)}
    out = [Matrix("token_embd.weight", "token_embd", -1, h, shape.vocab)]
    for layer in range(shape.n_layers):
        out += [Matrix(f"blk.{layer}.{role}.weight", role, layer, *widths[role]) for role in LAYER_ROLES]
    if not shape.tied:
        out.append(Matrix("output.weight", "output", -1, h, shape.vocab))
    return out


def vector_params(shape: ModelShape) -> int:
    """Parameters outside the matrices (norms, biases); both formats keep them in fp32."""
    return max(0, shape.params - sum(m.cols * m.rows for m in model_matrices(shape)))


# --- the estimate and the allowance -------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one process serving one sequence, and the artifact's size on disk."""

    weights_bytes: int
    """Tensor bytes of the artifact (what the runtime maps or loads)."""
    kv_cache_bytes: int
    runtime_allowance_bytes: int
    """Everything else: the format's base, activations, vocabulary tables and the copies the
    runtime makes of the weights or the cache (module docstring)."""
    total_bytes: int
    n_ctx: int
    basis: str
    """How the number was made, in words (shown with a refusal, recorded in the manifest)."""
    file_bytes: int | None = None
    """Predicted size of the artifact's file(s); None when estimated from an existing file."""

    def as_dict(self) -> dict[str, Any]:
        """The manifest / preflight form (``file_bytes`` left out when unknown)."""
        out = asdict(self)
        if self.file_bytes is None:
            del out["file_bytes"]
        return out


ACT_BYTES_PER_WIDTH = 64
"""Activation bytes per prompt token and unit of hidden width (~16 fp32 values): the student's
llama.cpp peak grew 15 MiB from a 128- to a 500-token prompt (41 KB per token, hidden 576)."""


def runtime_base_bytes(fmt: str) -> int:
    """The documented base of format ``fmt``: ``Format.runtime_base_bytes``."""
    from edgepack.formats import get_format

    return get_format(fmt).runtime_base_bytes


def activation_bytes(hidden: int) -> int:
    """Activations of one full micro-batch (:data:`UBATCH` tokens) at width ``hidden``."""
    return UBATCH * int(hidden) * ACT_BYTES_PER_WIDTH


def kv_cache_bytes(*, n_layers: int, n_ctx: int, n_kv_heads: int, key_dim: int, value_dim: int,
                   bytes_per_value: int) -> int:
    """K and V of every layer for ``n_ctx`` positions."""
    return n_layers * n_ctx * n_kv_heads * (key_dim + value_dim) * bytes_per_value


def shape_kv_bytes(shape: ModelShape, n_ctx: int, bytes_per_value: int) -> int:
    """:func:`kv_cache_bytes` of a :class:`ModelShape` (keys and values ``head_dim`` wide)."""
    return kv_cache_bytes(n_layers=shape.n_layers, n_ctx=n_ctx, n_kv_heads=shape.n_kv_heads,
                          key_dim=shape.head_dim, value_dim=shape.head_dim, bytes_per_value=bytes_per_value)


def predict_memory(fmt: str, shape: ModelShape, quant: str, n_ctx: int) -> MemoryEstimate:
    """The memory of an artifact not exported yet, from the format's ``predict_memory`` part."""
    from edgepack.formats import get_format

    return get_format(fmt).part("predict_memory")(shape, quant, n_ctx)


def _mb(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


# --- GGUF (llama.cpp) ---------------------------------------------------------------------

GGUF_QUANT_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K",
    "Q4_K_M": "Q4_K", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "IQ4_XS": "IQ4_XS",
}
"""File type → the ggml type of most matrices (``llama_ftype_get_default_type``)."""
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")  # written by edgepack's converter; never requantized
GGUF_FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
                                 "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
"""``tensor_type_fallback``: a 256-block type for a row length that 256 does not divide."""
GGUF_REPACKED_TYPES = ("Q4_0", "IQ4_NL", "Q4_K")
"""Types ggml's CPU backend repacks into an extra interleaved copy (x86 AVX2, ARM NEON)."""
GGUF_KV_BYTES = 2  # llama.cpp's default cache type is F16
GGUF_VOCAB_BYTES = 352
"""llama.cpp's memory per vocabulary entry (token texts, lookup maps, BPE merges, a logits row)."""
GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: each tensor's data starts on a multiple of it
# Header bytes: fixed keys and chat template, each vocabulary entry (token text, type, merge),
# each tensor's info (name, dims, type, offset). Teacher: 1,785,664 B for 49,152 entries, 272 tensors.
GGUF_HEADER_BASE, GGUF_HEADER_PER_TOKEN, GGUF_HEADER_PER_TENSOR = 2048, 34, 60


@cache
def _ggml_block(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, from gguf-py's table."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def gguf_type_bytes(type_name: str, cols: int, rows: int) -> int:
    """Data bytes of a ``rows`` x ``cols`` tensor of a ggml type (``cols`` a multiple of its block)."""
    block, size = _ggml_block(type_name)
    return rows * (cols // block) * size


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mix_type(m: Matrix, quant: str, shape: ModelShape, imatrix: bool) -> str:
    """``llama_tensor_get_type_impl`` for the file types a profile may choose (dense models)."""
    default = GGUF_QUANT_TYPES[quant]
    if m.role == "output" or (shape.tied and m.role == "token_embd"):
        if default == "Q8_0":
            return "Q8_0"
        return "Q8_0" if m.cols % _ggml_block(default)[0] else "Q6_K"
    n = shape.n_layers
    if m.role == "attn_v":
        if quant == "IQ4_XS" and shape.n_heads // max(shape.n_kv_heads, 1) >= 4:
            return "Q5_K"
        if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(m.layer, n):
            return "Q6_K"
    elif m.role == "ffn_down":
        if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(m.layer, n):
            return "Q6_K"
        if quant == "IQ4_XS" and m.layer < n // 8 and not imatrix:
            return "Q5_K"
        if quant == "Q4_0" and imatrix and m.layer < n // 8:
            return "Q4_1"
    return default


def _fallback(type_name: str, cols: int) -> str:
    """``tensor_type_fallback``: a type whose block divides the row length, else F16."""
    if cols % _ggml_block(type_name)[0] == 0:
        return type_name
    other = GGUF_FALLBACK.get(type_name)
    if other is None or cols % _ggml_block(other)[0]:
        return "F16"
    return other


def gguf_tensor_type(m: Matrix, quant: str, shape: ModelShape, *, imatrix: bool = False) -> str:
    """The ggml type llama.cpp stores matrix ``m`` at in a ``quant`` file (see module docstring)."""
    if quant not in GGUF_QUANT_TYPES:
        raise ValueError(f"no GGUF size rule for quantization {quant!r}; known: {', '.join(GGUF_QUANT_TYPES)}")
    if quant in GGUF_FLOAT_TYPES:
        return quant
    return _fallback(_mix_type(m, quant, shape, imatrix), m.cols)


def gguf_tensor_types(shape: ModelShape, quant: str, *, imatrix: bool = False) -> dict[str, str]:
    """Every matrix's ggml type in a ``quant`` file, by GGUF tensor name."""
    return {m.name: gguf_tensor_type(m, quant, shape, imatrix=imatrix) for m in model_matrices(shape)}


def gguf_tensor_bytes(shape: ModelShape, quant: str, *, imatrix: bool = False) -> tuple[int, int]:
    """(tensor data bytes, bytes of repacked matrices) of a ``quant`` file; vectors are F32."""
    total = repacked = 0
    for m in model_matrices(shape):
        kind = gguf_tensor_type(m, quant, shape, imatrix=imatrix)
        size = gguf_type_bytes(kind, m.cols, m.rows)
        total += size
        if kind in GGUF_REPACKED_TYPES and m.role != "token_embd":  # a lookup table is never repacked
            repacked += size
    return total + 4 * vector_params(shape), repacked


def gguf_file_bytes(shape: ModelShape, quant: str, *, imatrix: bool = False) -> int:
    """Predicted size of the ``quant`` GGUF file: header (vocabulary included) + padded tensor data."""
    matrices = model_matrices(shape)
    n_tensors = len(matrices) + 2 * shape.n_layers + 1  # + the norms
    header = GGUF_HEADER_BASE + shape.vocab * GGUF_HEADER_PER_TOKEN + n_tensors * GGUF_HEADER_PER_TENSOR
    padding = sum(-gguf_type_bytes(gguf_tensor_type(m, quant, shape, imatrix=imatrix), m.cols, m.rows)
                  % GGUF_ALIGNMENT for m in matrices)
    return header + gguf_tensor_bytes(shape, quant, imatrix=imatrix)[0] + padding


def gguf_memory(*, weights_bytes: int, repacked_bytes: int, kv_bytes: int, hidden: int, vocab: int,
                n_ctx: int, file_bytes: int | None = None, kv_note: str = "") -> MemoryEstimate:
    """llama.cpp's peak: mapped weights + repacked copies + F16 KV + base, activations, vocabulary."""
    base, act, vocab_b = runtime_base_bytes("gguf"), activation_bytes(hidden), vocab * GGUF_VOCAB_BYTES
    allowance = base + act + vocab_b + repacked_bytes
    basis = (f"weights {_mb(weights_bytes)} + {kv_note or 'F16 KV cache'} {_mb(kv_bytes)} at {n_ctx} ctx + "
             f"runtime allowance {_mb(allowance)} (base {_mb(base)}, activations of a {UBATCH}-token prompt "
             f"{_mb(act)}, vocabulary of {vocab} {_mb(vocab_b)}, repacked Q4 copies {_mb(repacked_bytes)}) (estimate)")
    return MemoryEstimate(weights_bytes, kv_bytes, allowance, weights_bytes + kv_bytes + allowance, n_ctx,
                          basis, file_bytes)


def predict_gguf(shape: ModelShape, quant: str, n_ctx: int, *, imatrix: bool = False) -> MemoryEstimate:
    """The gguf format's ``predict_memory`` part: a ``quant`` GGUF of ``shape`` at context ``n_ctx``."""
    weights, repacked = gguf_tensor_bytes(shape, quant, imatrix=imatrix)
    return gguf_memory(weights_bytes=weights, repacked_bytes=repacked, hidden=shape.hidden, vocab=shape.vocab,
                       kv_bytes=shape_kv_bytes(shape, n_ctx, GGUF_KV_BYTES), n_ctx=n_ctx,
                       file_bytes=gguf_file_bytes(shape, quant, imatrix=imatrix))


# --- ONNX (onnxruntime) -------------------------------------------------------------------

ONNX_QUANT_BITS: dict[str, int | None] = {"fp32": None, "int8": 8, "int4": 4}
ONNX_BLOCK = 32                             # OnnxQuantOptions.block_size
ONNX_HEAD_BITS = 8                          # OnnxQuantOptions.head_bits: head and embedding table
ONNX_WIDE_ROLES = ("attn_v", "ffn_down")    # OnnxQuantOptions.int8_layers: v_proj, down_proj
ONNX_KV_BYTES = 4                           # optimum's past_key_values are fp32
ONNX_VOCAB_BYTES = 1800
"""Per vocabulary entry: the ONNX backend's two HF tokenizers, its byte table, a logits row
(the student's 49,152 entries cost ~84 MiB more than a 400-entry tiny model's)."""
ONNX_LOGIT_BYTES = 4                        # fp32 logits for each prompt position
ONNX_WEIGHT_COPY = 0.75
"""Extra initializer bytes onnxruntime holds: the prepacked MatMulNBits weights beside the parsed
graph (int4/int8 peaks grew ~1.5-1.9x the initializers, fp32 ~1.5x)."""
# model.onnx bytes besides the initializers (nodes, names, shapes), measured on optimum's Llama
# graphs: 15 KB + 40 KB per layer (hidden 96-576; +2 KB per layer once quantized).
ONNX_GRAPH_BASE, ONNX_GRAPH_PER_LAYER, ONNX_GRAPH_QUANT_PER_LAYER = 15_000, 40_000, 2_000


def matmul_nbits_bytes(k: int, n: int, bits: int, block: int = ONNX_BLOCK) -> int:
    """Initializer bytes of a ``MatMulNBits`` weight K x N: packed blocks, fp32 scales, zero points."""
    k_blocks = -(-k // block)
    return n * (k_blocks * block * bits // 8 + 4 * k_blocks + math.ceil(k_blocks * bits / 8))


def _table_block(hidden: int) -> int | None:
    """``export/onnx/quantize.py:table_block_size``: the largest power-of-two block >= 16 dividing hidden."""
    block = ONNX_BLOCK
    while block >= 16:
        if hidden % block == 0:
            return block
        block //= 2
    return None


def onnx_weight_bytes(shape: ModelShape, quant: str) -> int:
    """Initializer bytes of edgepack's ``quant`` ONNX export of ``shape``."""
    if quant not in ONNX_QUANT_BITS:
        raise ValueError(f"no ONNX size rule for quantization {quant!r}; known: {', '.join(ONNX_QUANT_BITS)}")
    bits = ONNX_QUANT_BITS[quant]
    if bits is None:
        return 4 * shape.params
    head_bits = max(bits, ONNX_HEAD_BITS)
    total = 4 * vector_params(shape)
    for m in model_matrices(shape):
        if m.role == "token_embd":
            continue
        wide = m.role == "output" or m.role in ONNX_WIDE_ROLES
        total += matmul_nbits_bytes(m.cols, m.rows, head_bits if m.role == "output" else 8 if wide else bits)
    if shape.tied:  # the head is a MatMul of its own (the embedding transposed)
        total += matmul_nbits_bytes(shape.hidden, shape.vocab, head_bits)
    table = _table_block(shape.hidden)
    if table is None:
        total += 4 * shape.vocab * shape.hidden          # no block divides the width: fp32 table
    elif not (shape.tied and table == ONNX_BLOCK):       # tied on the head's blocks: shared, no copy
        total += matmul_nbits_bytes(shape.hidden, shape.vocab, head_bits, table)
    return total


def onnx_file_bytes(shape: ModelShape, quant: str) -> int:
    """Predicted bytes of ``model.onnx`` (and its external data): initializers + graph."""
    per_layer = ONNX_GRAPH_PER_LAYER + (ONNX_GRAPH_QUANT_PER_LAYER if ONNX_QUANT_BITS.get(quant) else 0)
    return onnx_weight_bytes(shape, quant) + ONNX_GRAPH_BASE + shape.n_layers * per_layer


def onnx_memory(*, weights_bytes: int, kv_bytes_per_position: int, hidden: int, vocab: int, n_ctx: int,
                file_bytes: int | None = None) -> MemoryEstimate:
    """onnxruntime's peak: weights ~1.75x, KV cache twice, base, activations, vocabulary, prompt logits."""
    base, act = runtime_base_bytes("onnx"), activation_bytes(hidden)
    vocab_b = vocab * (ONNX_VOCAB_BYTES + UBATCH * ONNX_LOGIT_BYTES)
    kv = kv_bytes_per_position * n_ctx
    allowance = base + act + vocab_b + int(ONNX_WEIGHT_COPY * weights_bytes) + kv
    basis = (f"initializers {_mb(weights_bytes)} + KV cache {kv_bytes_per_position} B/position × {n_ctx} ctx "
             f"{_mb(kv)} + runtime allowance {_mb(allowance)} (base {_mb(base)}, activations of a {UBATCH}-token "
             f"prompt {_mb(act)}, vocabulary of {vocab} and its prompt logits {_mb(vocab_b)}, onnxruntime's "
             f"prepacked weights and second KV cache) (estimate)")
    return MemoryEstimate(weights_bytes, kv, allowance, weights_bytes + kv + allowance, n_ctx, basis, file_bytes)


def predict_onnx(shape: ModelShape, quant: str, n_ctx: int) -> MemoryEstimate:
    """The onnx format's ``predict_memory`` part: a ``quant`` ONNX export of ``shape`` at ``n_ctx``."""
    per_position = shape_kv_bytes(shape, 1, ONNX_KV_BYTES)
    return onnx_memory(weights_bytes=onnx_weight_bytes(shape, quant), kv_bytes_per_position=per_position,
                       hidden=shape.hidden, vocab=shape.vocab, n_ctx=n_ctx, file_bytes=onnx_file_bytes(shape, quant))
