"""Weight-only INT4/INT8 for an exported ONNX graph, with onnxruntime's MatMulNBits.

``quantize_onnx(src, dst, bits, options)`` rewrites every MatMul whose weight is a
constant into ``MatMulNBits`` (onnxruntime's ``MatMulNBitsQuantizer``, round-to-nearest
per block along K) and the token embedding into ``GatherBlockQuantized``:

* **integer zero points** (``symmetric=False``: uint4 + a 4-bit zero point per block) or
  none (``symmetric=True``). HQQ, the other calibration-free choice in onnxruntime, stores
  *float* zero points, which onnxruntime's CPU kernel cannot prepack: it dequantizes the
  whole weight on every call, 1-2 tok/s decoding a 78M model here vs 20-60 for RTN;
* ``accuracy_level=4`` lets the CPU kernel quantize activations to int8 per block and run
  integer dot products (MLAS ``SQNBIT_CompInt8``), the fast path on x86/ARM;
* ``int8_layers`` (default ``down_proj``, ``v_proj``) stay 8-bit in an int4 export, the
  tensors llama.cpp's Q4_K_M also widens (``ffn_down``, ``attn_v``);
* the **output head** (``head_bits``, default 8): for a model with tied embeddings the
  vocabulary matrix is both the embedding table and the last MatMul, and the last MatMul
  is where 4-bit error is the most visible (it lands on every logit directly). It is
  quantized once, as ``MatMulNBits``, and the embedding ``Gather`` becomes a
  ``GatherBlockQuantized`` reading the *same* packed bytes (through a Reshape from
  ``[N, k_blocks, blob]`` to ``[N, K * bits / 8]``, the layout both ops share), so the
  table is stored once instead of an fp32 embedding plus a quantized head. An untied
  model's embedding gets its own table at ``head_bits``.

Why these defaults (demo student, 77.9M SmolLM2-derived, fp32 ONNX 312 MB, holdout
accuracy 0.288; KLD / top-1 vs the fp32 graph over distinct holdout contexts; decode on 2
cores under a load average of 5-9, so speeds compare only roughly; bench/export/onnx_int4.py
reruns the study):

==================================  ======  =====  =====  ========  ========
variant                              MB      KLD    top-1  accuracy  decode
==================================  ======  =====  =====  ========  ========
all int4, fp32 embedding             164     0.37*  0.60*  -         26-37
all int4, shared int4 table          50.5    0.41   0.64   0.152     48
int4 + int8 head (shared table)      65.1    0.27   0.67   0.227     49
... + int8 down_proj                 71.5    0.21   0.72   0.273     21
... + int8 down_proj, v_proj         72.3    0.14   0.77   0.273     15-48
head8 only, symmetric (no zp)        63.5    0.43   0.64   -         55
head8 only, block 128                92.6    0.50   0.62   -         41
head8 only, accuracy_level 0         65.1    0.27   0.67   -         2.6
int8 (all)                           90.7    0.0065 0.945  0.288     28
==================================  ======  =====  =====  ========  ========

(* counted over all positions, repeats included. The block-128 row is larger because 128 does not divide the width 576, so the embedding
table cannot share the head's blocks and gets its own copy.) ``accuracy_level`` 0 barely
changes the logits but is ~20x slower: int8 activations are what makes MatMulNBits fast on
CPU. Symmetric 4-bit and block 128 lose accuracy without a speed gain worth it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.errors import UsageError

MAX_PROTO_BYTES = 1_800_000_000  # protobuf caps a model at 2 GB; above this use external data
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class OnnxQuantOptions:
    """How weight-only quantization is done (int4 and int8 alike)."""

    block_size: int = 32
    """Weights per scale along K: 32 follows llama.cpp's Q4_0/Q8_0 (better accuracy); 128
    halves the scale overhead and is onnxruntime's default."""
    symmetric: bool = False
    """True: no zero points (int4 in [-8, 7] around 0). False: a 4-bit integer zero point per
    block, which fits skewed blocks better at 0.125 extra bits per weight (block 32)."""
    accuracy_level: int = 4
    """MatMulNBits ``accuracy_level``: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
    (the fast CPU path)."""
    head_bits: int = 8
    """Bits of the output head / token embedding table (4 or 8); for ``int8`` it is 8."""
    int8_layers: tuple[str, ...] = ("down_proj", "v_proj")
    """HF module names (``down_proj``, ``v_proj``...) whose MatMuls stay 8-bit in an int4
    export, as llama.cpp's Q4_K_M keeps ``ffn_down``/``attn_v`` at 6 bits."""

    def check(self, bits: int) -> None:
        problems = []
        if self.block_size not in BLOCK_SIZES:
            problems.append(f"block size {self.block_size} (use one of {', '.join(map(str, BLOCK_SIZES))})")
        if self.accuracy_level not in ACCURACY_LEVELS:
            problems.append(f"accuracy level {self.accuracy_level} (use 0-4)")
        if self.head_bits not in (4, 8) or self.head_bits < bits:
            problems.append(f"head bits {self.head_bits} (use 4 or 8, not fewer than the layers' {bits})")
        if problems:
            raise UsageError("bad ONNX quantization options: " + "; ".join(problems))

    def describe(self, bits: int) -> dict[str, Any]:
        return {"bits": bits, "method": "rtn", "block_size": self.block_size, "symmetric": self.symmetric,
                "zero_points": "none" if self.symmetric else f"uint{bits} per block",
                "accuracy_level": self.accuracy_level, "head_bits": max(bits, self.head_bits),
                "int8_layers": list(self.int8_layers) if bits < 8 else []}


def untie_transposed_weights(model: Any) -> list[str]:
    """Replace ``MatMul(x, Transpose(W))`` with ``W`` a constant by a transposed constant.

    Returns the names of the rewritten MatMuls, so the quantizer sees a constant weight.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    rewritten = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        src = producer.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[src.input[0]])
        name = f"{node.name or 'matmul'}.weight_t".replace("/", "_")
        model.graph.initializer.append(numpy_helper.from_array(weight.transpose(perm).copy(), name))
        node.input[1] = name
        rewritten.append(node.name)
    # Drop Transposes nothing reads any more (the embedding Gather keeps its initializer).
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Transpose" and not set(n.output) & used]
    for n in dead:
        model.graph.node.remove(n)
    return rewritten


def _embedding_gather(model: Any) -> Any | None:
    """The Gather that reads a 2-D constant table with the graph's ``input_ids``."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2 \
                and node.input[1] == "input_ids":
            return node
    return None


def _head_matmul(model: Any, vocab: int) -> Any | None:
    """The last MatMul producing ``vocab`` outputs from a constant weight (the LM head)."""
    inits = {i.name: i for i in model.graph.initializer}
    heads = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and list(inits[n.input[1]].dims)[-1:] == [vocab]]
    return heads[-1] if heads else None


def _matmul_nbits(model: Any, nodes: list[str] | None, exclude: list[str], bits: int,
                  options: OnnxQuantOptions) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric,
                                     accuracy_level=options.accuracy_level or None, nodes_to_include=nodes,
                                     nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",) if nodes is None
                                     else ("__none__",))
    quantizer.process()
    return quantizer.model.model


def _table_from_head(model: Any, gather: Any, head: Any) -> None:
    """Point the embedding Gather at the head's MatMulNBits bytes (tied weights, stored once)."""
    from onnx import helper, numpy_helper
    import numpy as np

    attrs = {a.name: a.i for a in head.attribute}
    vocab = attrs["N"]
    b_name = head.input[1]
    shape = numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), f"{b_name}_table_shape")
    model.graph.initializer.append(shape)
    table = f"{b_name}_table"
    reshape = helper.make_node("Reshape", [b_name, shape.name], [table], name=f"{b_name}_as_table")
    inputs = [table, gather.input[1], head.input[2]]
    if len(head.input) > 3 and head.input[3]:
        inputs.append(head.input[3])
    node = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=f"{gather.name}_quantized",
                            domain="com.microsoft", bits=attrs["bits"], block_size=attrs["block_size"],
                            gather_axis=0, quantize_axis=1)
    at = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(at, node)
    model.graph.node.insert(at, reshape)


def table_block_size(hidden: int, block_size: int) -> int | None:
    """Block size for an embedding table of width ``hidden``: ``block_size`` when it divides
    it, else the largest smaller power of two >= 16 that does (MatMulNBits pads a partial
    last block, but a Gather's rows must come out exactly ``hidden`` wide); None if none."""
    block = block_size
    while block >= 16:
        if hidden % block == 0:
            return block
        block //= 2
    return None


def _table_untied(model: Any, gather: Any, bits: int, options: OnnxQuantOptions) -> None:
    """Quantize an embedding table on its own (rows = tokens, blocks along hidden);
    ``options.block_size`` must divide the width (see :func:`table_block_size`)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    table = numpy_helper.to_array(inits[gather.input[0]])
    vocab, hidden = table.shape
    # Quantize it as the weight of a MatMul [hidden, vocab] so the bytes have MatMulNBits' layout.
    probe = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="table")], "t",
                              [helper.make_tensor_value_info("x", 1, [1, hidden])],
                              [helper.make_tensor_value_info("y", 1, [1, vocab])],
                              [numpy_helper.from_array(table.T.copy(), "w")])
    q = _matmul_nbits(helper.make_model(probe), None, [], bits, options)
    mm = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    qinits = {i.name: i for i in q.graph.initializer}
    packed = numpy_helper.to_array(qinits[mm.input[1]]).reshape(vocab, -1)
    names = [f"{gather.input[0]}_q{bits}", gather.input[1], f"{gather.input[0]}_scales"]
    new = [numpy_helper.from_array(packed, names[0]),
           numpy_helper.from_array(numpy_helper.to_array(qinits[mm.input[2]]).reshape(vocab, -1), names[2])]
    if len(mm.input) > 3 and mm.input[3]:
        names.append(f"{gather.input[0]}_zero_points")
        new.append(numpy_helper.from_array(numpy_helper.to_array(qinits[mm.input[3]]).reshape(vocab, -1), names[3]))
    model.graph.initializer.extend(new)
    node = helper.make_node("GatherBlockQuantized", names, list(gather.output), name=f"{gather.name}_quantized",
                            domain="com.microsoft", bits=bits, block_size=options.block_size,
                            gather_axis=0, quantize_axis=1)
    at = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(at, node)
    model.graph.initializer.remove(inits[gather.input[0]])


def quantize_onnx(src: Path, dst: Path, bits: int, options: OnnxQuantOptions) -> dict[str, Any]:
    """Write ``dst``: ``src`` with weight-only ``bits``-bit MatMuls (head and embedding at
    ``options.head_bits``); returns op counts and what was done to the embedding."""
    import onnx

    options.check(bits)
    head_bits = max(bits, options.head_bits)
    model = onnx.load(str(src))
    untied = untie_transposed_weights(model)
    gather = _embedding_gather(model)
    inits = {i.name: i for i in model.graph.initializer}
    table_name = gather.input[0] if gather is not None else None
    vocab = int(inits[table_name].dims[0]) if table_name else None
    head = _head_matmul(model, vocab) if vocab else None
    head_name = head.name if head is not None else None
    # tied: the head's weight is the embedding table transposed (made constant above)
    tied = head is not None and head_name in untied
    wide = [n.name for n in model.graph.node if n.op_type == "MatMul" and bits < 8
            and any(f"/{layer}/" in n.name for layer in options.int8_layers)]  # optimum names /.../down_proj/MatMul
    if head_name and head_bits != bits:
        model = _matmul_nbits(model, [head_name], [], head_bits, options)
    if wide:
        model = _matmul_nbits(model, wide, [], 8, options)
    model = _matmul_nbits(model, None, [], bits, options)  # every MatMul still float
    embedding = "fp32"
    hidden = int(inits[table_name].dims[1]) if table_name else 0
    table_block = table_block_size(hidden, options.block_size) if table_name else None
    if gather is not None and table_block is None:
        embedding = f"fp32 (no block size >= 16 divides the width {hidden})"
    elif gather is not None:
        gather = next(n for n in model.graph.node if n.name == gather.name)
        head_q = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and head_name
                       and n.name.startswith(head_name)), None)
        if tied and head_q is not None and table_block == options.block_size:
            _table_from_head(model, gather, head_q)
            embedding = f"int{head_bits}, shared with the output head"
        else:
            _table_untied(model, gather, head_bits, replace(options, block_size=table_block))
            embedding = f"int{head_bits}, block {table_block}" + (
                f" (a separate copy: {options.block_size} does not divide the width {hidden})" if tied else "")
        still_used = {i for n in model.graph.node for i in n.input}
        for init in [i for i in model.graph.initializer if i.name == table_name and i.name not in still_used]:
            model.graph.initializer.remove(init)
    onnx.save_model(model, str(dst), save_as_external_data=model.ByteSize() > MAX_PROTO_BYTES,
                    location=dst.name + ".data")
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    return {"matmul_nbits": ops.count("MatMulNBits"), "matmul_float": ops.count("MatMul"),
            "gather_quantized": ops.count("GatherBlockQuantized"), "untied": len(untied), "embedding": embedding,
            "head": head_name, "head_rows": vocab,
            **options.describe(bits)}
