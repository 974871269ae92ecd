"""ONNX export: optimum graph checked against PyTorch, weight-only INT4/INT8 via onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.atomic import is_complete
from edgepack.errors import InvalidModelFile, UnsupportedArchitecture, UsageError
from edgepack.export.onnx.convert import ONNX_QUANTS, export_onnx, onnx_logits
from tests.export.helpers import ARCH_BUILDERS, PROMPTS, encode, hf_logits, no_leftovers, rewrite_tensor


@pytest.mark.parametrize("name", ["LlamaForCausalLM", *ARCH_BUILDERS])
def test_fp32_graph_matches_pytorch(name: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = arch_model_dirs[name]
    info = export_onnx(hf_dir, tmp_path / "onnx", quant="fp32")
    assert is_complete(tmp_path / "onnx") and info["parity"]["fp32_vs_torch_max_abs_diff"] < 1e-4
    for prompt in PROMPTS:
        ids = encode(hf_dir, prompt)
        assert float(np.abs(onnx_logits(tmp_path / "onnx" / "model.onnx", ids) - hf_logits(hf_dir, ids)).max()) < 1e-4


@pytest.mark.parametrize("quant,min_top1", [("int4", 0.5), ("int8", 0.9)])
def test_weight_only_quantization(quant: str, min_top1: float, tiny_llama_dir: Path, tmp_path: Path) -> None:
    info = export_onnx(tiny_llama_dir, tmp_path / quant, quant=quant)
    # 2 layers x 7 linear layers + the (tied, made constant) lm_head
    assert info["ops"] == {"matmul_nbits": 15, "matmul_float": 5, "untied": 1}
    files = {f["path"] for f in info["files"]}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    agree = total = 0
    for prompt in PROMPTS:
        ids = encode(tiny_llama_dir, prompt)
        ref, got = hf_logits(tiny_llama_dir, ids), onnx_logits(tmp_path / quant / "model.onnx", ids)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95
    assert agree / total >= min_top1
    fp32_bytes = (tiny_llama_dir / "model.safetensors").stat().st_size
    assert (tmp_path / quant / "model.onnx").stat().st_size < fp32_bytes


def test_bad_inputs_fail_before_export(tiny_llama_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="int3"):
        export_onnx(tiny_llama_copy, tmp_path / "o", quant="int3")
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
