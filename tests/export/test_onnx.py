"""ONNX export: optimum graph checked against PyTorch, weight-only INT4/INT8 via onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.atomic import is_complete
from edgepack.errors import InvalidModelFile, UnsupportedArchitecture, UsageError
from edgepack.export.onnx.convert import ONNX_QUANTS, export_onnx, onnx_logits
from edgepack.export.onnx.quantize import OnnxQuantOptions
from tests.export.helpers import ARCH_BUILDERS, PROMPTS, encode, hf_logits, no_leftovers, rewrite_tensor


@pytest.mark.parametrize("name", ["LlamaForCausalLM", *ARCH_BUILDERS])
def test_fp32_graph_matches_pytorch(name: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = arch_model_dirs[name]
    info = export_onnx(hf_dir, tmp_path / "onnx", quant="fp32")
    assert is_complete(tmp_path / "onnx") and info["parity"]["fp32_vs_torch_max_abs_diff"] < 1e-4
    for prompt in PROMPTS:
        ids = encode(hf_dir, prompt)
        assert float(np.abs(onnx_logits(tmp_path / "onnx" / "model.onnx", ids) - hf_logits(hf_dir, ids)).max()) < 1e-4


def _graph(folder: Path) -> tuple[list, dict]:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    return list(model.graph.node), {i.name: i for i in model.graph.initializer}


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _agreement(hf_dir: Path, model: Path, min_corr: float) -> float:
    agree = total = 0
    for prompt in PROMPTS:
        ids = encode(hf_dir, prompt)
        ref, got = hf_logits(hf_dir, ids), onnx_logits(model, ids)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > min_corr
    return agree / total


@pytest.mark.parametrize("quant,min_top1", [("int4", 0.5), ("int8", 0.9)])
def test_weight_only_quantization_defaults(quant: str, min_top1: float, tiny_llama_dir: Path, tmp_path: Path) -> None:
    info = export_onnx(tiny_llama_dir, tmp_path / quant, quant=quant)
    bits = int(quant[3:])
    # 2 layers x 7 linear layers + the (tied, made constant) lm_head; the embedding reads the head's bytes
    assert {k: info["ops"][k] for k in ("matmul_nbits", "matmul_float", "gather_quantized", "untied")} == \
        {"matmul_nbits": 15, "matmul_float": 5, "gather_quantized": 1, "untied": 1}
    assert info["ops"]["embedding"] == "int8, shared with the output head"
    files = {f["path"] for f in info["files"]}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    nodes, inits = _graph(tmp_path / quant)
    assert not [n for n in nodes if n.op_type == "Gather" and n.input[0] in inits]  # no float table left
    assert info["ops"]["int8_layers"] == (["down_proj", "v_proj"] if bits == 4 else [])
    for node in (n for n in nodes if n.op_type == "MatMulNBits"):
        a = _attrs(node)
        # int4 layers; the head and (as llama.cpp's Q4_K_M widens ffn_down / attn_v) down_proj, v_proj at 8 bits
        wide = a["N"] == info["ops"]["head_rows"] or "/down_proj/" in node.name or "/v_proj/" in node.name
        assert a["bits"] == (8 if wide else bits) and a["block_size"] == 32 and a["accuracy_level"] == 4
        # integer zero points (packed uint8), never float ones: onnxruntime prepacks these
        assert len(node.input) >= 4 and inits[node.input[3]].data_type == 2  # TensorProto.UINT8
    table = next(n for n in nodes if n.op_type == "GatherBlockQuantized")
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and _attrs(n)["N"] == info["ops"]["head_rows"])
    reshape = next(n for n in nodes if n.output[0] == table.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # stored once
    assert table.input[2] == head.input[2] and table.input[3] == head.input[3]
    assert _agreement(tiny_llama_dir, tmp_path / quant / "model.onnx", 0.95) >= min_top1
    fp32_bytes = (tiny_llama_dir / "model.safetensors").stat().st_size
    assert (tmp_path / quant / "model.onnx").stat().st_size < fp32_bytes / (2 if quant == "int4" else 1.5)


def test_int4_options_symmetric_block_16_int4_head(tiny_llama_dir: Path, arch_model_dirs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    options = OnnxQuantOptions(block_size=16, symmetric=True, accuracy_level=0, head_bits=4, int8_layers=())
    info = export_onnx(tiny_llama_dir, tmp_path / "sym", quant="int4", options=options)
    assert info["ops"]["embedding"] == "int4, shared with the output head" and info["block_size"] == 16
    nodes, inits = _graph(tmp_path / "sym")
    for node in (n for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized")):
        a = _attrs(node)
        assert a["bits"] == 4 and a["block_size"] == 16 and "accuracy_level" not in a
        assert len([i for i in node.input if i]) == 3  # symmetric: no zero points
    assert _agreement(tiny_llama_dir, tmp_path / "sym" / "model.onnx", 0.9) >= 0.4
    # an untied model: the embedding table is quantized on its own, the head separately
    untied = arch_model_dirs["llama-untied"]
    info = export_onnx(untied, tmp_path / "untied", quant="int4")
    assert info["ops"]["untied"] == 0 and info["ops"]["embedding"] == "int8, block 32"
    assert info["ops"]["gather_quantized"] == 1 and info["ops"]["matmul_nbits"] == 15
    assert _agreement(untied, tmp_path / "untied" / "model.onnx", 0.95) >= 0.5


def test_quantized_table_equals_dequantized_rows(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """GatherBlockQuantized over the head's bytes returns the rows the head multiplies with."""
    from onnx import helper, numpy_helper

    info = export_onnx(tiny_llama_dir, tmp_path / "q", quant="int4", options=OnnxQuantOptions(head_bits=4))
    nodes, inits = _graph(tmp_path / "q")
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and _attrs(n)["N"] == info["ops"]["head_rows"])
    a = _attrs(head)
    vocab, k = a["N"], a["K"]
    # head output for one-hot inputs = column j of W^T = row j of the dequantized table
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", *head.input[1:]], ["y"], domain="com.microsoft", **a),
         helper.make_node("Reshape", [head.input[1], "shape"], ["table"]),
         helper.make_node("GatherBlockQuantized", ["table", "ids", *head.input[2:]], ["rows"], domain="com.microsoft",
                          bits=a["bits"], block_size=a["block_size"], gather_axis=0, quantize_axis=1)],
        "check", [helper.make_tensor_value_info("x", 1, [k, k]), helper.make_tensor_value_info("ids", 7, [3])],
        [helper.make_tensor_value_info("y", 1, [k, vocab]), helper.make_tensor_value_info("rows", 1, [3, k])],
        [inits[i] for i in head.input[1:] if i] + [numpy_helper.from_array(np.array([vocab, -1]), "shape")])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, vocab - 1], dtype=np.int64)
    y, rows = sess.run(None, {"x": np.eye(k, dtype=np.float32), "ids": ids})
    np.testing.assert_allclose(rows, y[:, ids].T, rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_before_export(tiny_llama_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="int3"):
        export_onnx(tiny_llama_copy, tmp_path / "o", quant="int3")
    with pytest.raises(UsageError, match="block size 48.*head bits 2"):
        export_onnx(tiny_llama_copy, tmp_path / "o", quant="int4", options=OnnxQuantOptions(block_size=48, head_bits=2))
    assert sorted(ONNX_QUANTS) == ["fp32", "int4", "int8"]
    rewrite_tensor(tiny_llama_copy / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", float("nan"))
    with pytest.raises(InvalidModelFile, match="q_proj"):
        export_onnx(tiny_llama_copy, tmp_path / "o", quant="int4")
    config = json.loads((tiny_llama_copy / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (tiny_llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="FooForCausalLM"):
        export_onnx(tiny_llama_copy, tmp_path / "o", quant="int4")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path) == []
