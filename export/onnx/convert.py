"""HF model dir → ONNX folder for onnxruntime, optionally with weight-only INT4/INT8 MatMuls.

``export_onnx(hf_dir, out_dir, quant)`` is the recipe:

1. resolve the architecture with the GGUF exporter's registry (same supported set,
   same error before any weight is read) and validate every weight (safetensors only,
   no NaN/Inf) — optimum would otherwise load whatever it finds;
2. export with optimum (task ``text-generation-with-past``: one ``model.onnx`` taking
   ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.<i>.key/value``
   of shape ``[batch, kv_heads, past_len, head_dim]``; returning ``logits`` and
   ``present.<i>.key/value``; the first step passes ``past_len = 0``);
3. measure the ONNX logits against PyTorch on a short prompt (recorded, and an error
   if the FP32 graph disagrees: that would be an exporter bug, not quantization noise);
4. for ``int4``/``int8``, make tied ``lm_head`` weights constant (optimum feeds the
   MatMul a ``Transpose`` of the embedding, which the quantizer skips) and rewrite every
   constant-weight MatMul to ``MatMulNBits`` with onnxruntime's ``MatMulNBitsQuantizer``,
   block 32: ``int8`` rounds to nearest (symmetric); ``int4`` uses HQQ (half-quadratic,
   calibration-free), because plain round-to-nearest 4-bit lost too much: on
   SmolLM2-135M, top-1 agreement with PyTorch was 0.64 (RTN) vs 0.89 (HQQ) on a chat
   prompt, llama.cpp's Q4_0 / Q4_K_M giving 0.68 / 0.93 on the same prompt;
5. build it all in ``<out>.tmp-<pid>`` and rename with a ``.complete`` marker.

The folder also carries ``config.json``, ``generation_config.json`` and the tokenizer
files (with the chat template), so a runtime needs nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir
from edgepack.errors import InvalidModelFile, RuntimeFailure, UsageError
from edgepack.progress import ProgressFn, null_progress
from edgepack.export.gguf.arch import arch_for_config
from edgepack.export.gguf.convert import read_config
from edgepack.export.gguf.weights import SafetensorsCheckpoint

# edgepack ONNX quant name → (MatMulNBits bits, method); None: keep FP32
ONNX_QUANTS: dict[str, tuple[int, str] | None] = {"fp32": None, "int8": (8, "rtn"), "int4": (4, "hqq")}
BLOCK_SIZE = 32
PARITY_PROMPT_IDS = 12  # tokens of the parity prompt fed to both PyTorch and onnxruntime
FP32_TOLERANCE = 1e-2   # max |logit diff| accepted between the FP32 graph and PyTorch
MAX_PROTO_BYTES = 1_800_000_000  # protobuf caps a model at 2 GB; above this use external data


def validate_weights(hf_dir: Path) -> int:
    """Read every tensor once: refuses pickles, truncation and NaN/Inf. Returns the count."""
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        for name in ckpt.names():
            ckpt.get(name)
        return len(ckpt.names())


def onnx_logits(model_path: Path, ids: list[int]) -> Any:
    """Logits ``[len(ids), vocab]`` of one prefill step through onnxruntime (empty past)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    n = len(ids)
    feeds: dict[str, Any] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([ids], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, n), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(n, dtype=np.int64)[None, :]
        elif inp.name.startswith("past_key_values."):
            _, heads, _, head_dim = inp.shape
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feeds[inp.name] = np.zeros((1, int(heads), 0, int(head_dim)), dtype=dtype)
        else:
            raise RuntimeFailure(f"unexpected ONNX input {inp.name!r} in {model_path}")
    return session.run(["logits"], feeds)[0][0].astype(np.float32)


def _torch_logits(hf_dir: Path, ids: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _parity_ids(hf_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.encode("Pump P-101 discharge pressure is low; what should I check first?", add_special_tokens=False)
    return ids[:PARITY_PROMPT_IDS]


def untie_transposed_weights(model: Any) -> int:
    """Replace ``MatMul(x, Transpose(W))`` with ``W`` a constant by a transposed constant.

    Returns how many MatMuls were rewritten, so the quantizer sees a constant weight.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    rewritten = 0
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
        rewritten += 1
    # Drop Transposes nothing reads any more (the embedding Gather keeps its initializer).
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Transpose" and not set(n.output) & used]
    for n in dead:
        model.graph.node.remove(n)
    return rewritten


def _quantize(src: Path, dst: Path, bits: int, method: str) -> dict[str, int]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    untied = untie_transposed_weights(model)
    if method == "hqq":
        quantizer = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=bits))
    else:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    proto = quantizer.model.model
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=proto.ByteSize() > MAX_PROTO_BYTES)
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    return {"matmul_nbits": ops.count("MatMulNBits"), "matmul_float": ops.count("MatMul"), "untied": untied}


def _files(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        out.append({"path": f.relative_to(folder).as_posix(), "bytes": f.stat().st_size, "sha256": h.hexdigest()})
    return out


def export_onnx(hf_dir: Path, out_dir: Path, quant: str = "int4",
                progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Export ``hf_dir`` to the ONNX folder ``out_dir``; returns what was built and measured."""
    import numpy as np
    from optimum.exporters.onnx import main_export

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if quant not in ONNX_QUANTS:
        raise UsageError(f"unknown ONNX quantization {quant!r}", hint=f"choose from {', '.join(ONNX_QUANTS)}")
    arch_for_config(read_config(hf_dir))
    progress("onnx", 0, 4)
    validate_weights(hf_dir)
    ids = _parity_ids(hf_dir)
    ref = _torch_logits(hf_dir, ids)
    with atomic_dir(out_dir, replace=True) as tmp, tempfile.TemporaryDirectory(dir=out_dir.parent,
                                                                              prefix=f"{out_dir.name}.tmp-fp32-") as raw:
        progress("onnx", 1, 4)
        main_export(str(hf_dir), output=raw, task="text-generation-with-past", device="cpu",
                    do_validation=False, local_files_only=True, trust_remote_code=False,
                    library_name="transformers")
        fp32 = Path(raw) / "model.onnx"
        if not fp32.is_file():
            raise RuntimeFailure(f"optimum wrote no model.onnx for {hf_dir.name}")
        fp32_logits = onnx_logits(fp32, ids)
        fp32_diff = float(np.abs(fp32_logits - ref).max())
        if fp32_diff > FP32_TOLERANCE:
            raise InvalidModelFile(f"the FP32 ONNX graph disagrees with PyTorch (max |logit diff| {fp32_diff:.3g})",
                                   hint="this is an exporter bug; export GGUF instead and report it")
        progress("onnx", 2, 4)
        scheme = ONNX_QUANTS[quant]
        ops: dict[str, int] = {}
        for f in Path(raw).iterdir():
            if f.is_file() and (scheme is None or not f.name.startswith("model.onnx")):
                shutil.copy(f, tmp / f.name)
        if scheme is not None:
            ops = _quantize(fp32, tmp / "model.onnx", *scheme)
        progress("onnx", 3, 4)
        got = onnx_logits(tmp / "model.onnx", ids)
        parity = {
            "prompt_tokens": len(ids),
            "fp32_vs_torch_max_abs_diff": fp32_diff,
            "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
            "top1_agreement_vs_torch": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    progress("onnx", 4, 4)
    files = [f for f in _files(out_dir) if f["path"] != ".complete"]
    digest = hashlib.sha256("".join(f"{f['path']}\t{f['sha256']}\n" for f in files).encode()).hexdigest()
    return {"path": out_dir, "bytes": sum(f["bytes"] for f in files), "sha256": digest,
            "files": files, "parity": parity, "ops": ops,
            "block_size": BLOCK_SIZE if scheme else None, "method": scheme[1] if scheme else None}
