"""The one memory estimator against what edgepack's exporters really write.

Tiny random Llamas of awkward widths (hidden 96 and 160: not multiples of 256, so llama.cpp's
K-quants fall back; 256 wide with a 688-wide MLP: ``ffn_down`` rows not even a multiple of 32;
tied and untied embeddings; 9 layers so ``use_more_bits`` picks layers 0, 3, 6, 7, 8) are
exported with edgepack's own GGUF converter and quantizer and its ONNX exporter. Every GGUF
tensor must have the type :func:`gguf_tensor_types` predicts, and every predicted file size must
be within 10% of the real one, for every quantization a profile may choose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edgepack.formats import get_format
from edgepack.gguf_header import read_gguf
from edgepack.memory import (GGUF_QUANT_TYPES, ONNX_QUANT_BITS, ModelShape, gguf_tensor_types, model_matrices,
                             predict_gguf, predict_memory, predict_onnx, use_more_bits)
from edgepack.profiles import load_profile
from edgepack.profiles.fit import shape_from_hf_dir
from edgepack.runtime.memory import gguf_artifact_memory
from edgepack.runtime.onnx_graph import estimate_onnx_memory
from tests.tiny import build_tokenizer

TOLERANCE = 0.10  # issue #16: predicted file bytes within ±10% of the real file


@dataclass(frozen=True)
class Widths:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool


AWKWARD = {
    "h96-tied": Widths(96, 256, 3, 4, 2, True),
    "h160-untied": Widths(160, 416, 2, 4, 2, False),
    "h256-ff688-9layers": Widths(256, 688, 9, 8, 2, True),
}


def build_llama(out_dir: Path, w: Widths, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM of the given widths with tests/tiny.py's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, max_position_embeddings=512,
        tie_word_embeddings=w.tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module", params=sorted(AWKWARD))
def awkward(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelShape]:
    hf = build_llama(tmp_path_factory.mktemp(request.param) / "hf", AWKWARD[request.param])
    return hf, shape_from_hf_dir(hf)


@pytest.fixture(scope="module")
def awkward_ggufs(awkward: tuple[Path, ModelShape]) -> dict[str, Path]:
    """Every GGUF quantization a profile may choose that this llama.cpp can make."""
    from edgepack.export.gguf.convert import OUTTYPES, convert_hf_to_gguf
    from edgepack.export.gguf.quantize import quantize_gguf, supported_quants

    hf, _ = awkward
    out = {q: convert_hf_to_gguf(hf, hf.parent / f"m-{q}.gguf", outtype=q) for q in OUTTYPES}
    for q in supported_quants():
        out[q] = quantize_gguf(out["F16"], hf.parent / f"m-{q}.gguf", q)
    return out


def _within(predicted: int, actual: int) -> bool:
    return abs(predicted - actual) <= TOLERANCE * actual


def test_every_profile_gguf_quant_has_a_rule() -> None:
    assert set(get_format("gguf").quants) <= set(GGUF_QUANT_TYPES)
    assert set(get_format("onnx").quants) <= set(ONNX_QUANT_BITS)


def test_gguf_types_and_file_bytes(awkward: tuple[Path, ModelShape], awkward_ggufs: dict[str, Path]) -> None:
    _, shape = awkward
    assert set(awkward_ggufs) >= {"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q4_1"}
    for quant, path in awkward_ggufs.items():
        info = read_gguf(path)
        actual = {t.name: t.ggml_type for t in info.tensors if len(t.shape) > 1}
        assert actual == gguf_tensor_types(shape, quant), quant
        assert all(t.ggml_type == "F32" for t in info.tensors if len(t.shape) == 1)  # norms stay F32
        predicted = predict_gguf(shape, quant, 256)
        assert predicted.weights_bytes == info.tensor_bytes, quant
        assert _within(predicted.file_bytes, path.stat().st_size), (quant, predicted.file_bytes, path.stat().st_size)


def test_gguf_prediction_is_the_preflight_of_the_file(awkward: tuple[Path, ModelShape],
                                                      awkward_ggufs: dict[str, Path]) -> None:
    """One estimator: the prediction before export equals what open_model computes from the file."""
    _, shape = awkward
    for quant, path in awkward_ggufs.items():
        predicted = predict_memory("gguf", shape, quant, 384).as_dict()
        from_file = gguf_artifact_memory(path, 384)
        for key in ("weights_bytes", "kv_cache_bytes", "runtime_allowance_bytes", "total_bytes", "n_ctx"):
            assert predicted[key] == from_file[key], (quant, key)


def test_onnx_file_bytes(awkward: tuple[Path, ModelShape]) -> None:
    from edgepack.export.onnx.convert import export_onnx

    hf, shape = awkward
    for quant in ONNX_QUANT_BITS:
        folder = export_onnx(hf, hf.parent / f"onnx-{quant}", quant=quant)["path"]
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        predicted = predict_onnx(shape, quant, 256)
        assert _within(predicted.file_bytes, size), (quant, predicted.file_bytes, size)
        from_file = estimate_onnx_memory(folder, 256)
        assert _within(predicted.weights_bytes, from_file["weights_bytes"]), quant
        assert _within(predicted.total_bytes, from_file["total_bytes"]), quant


def test_use_more_bits_layers() -> None:
    # llama.cpp: the first and last eighth, then every third layer from n/8 on.
    assert [i for i in range(9) if use_more_bits(i, 9)] == [0, 3, 6, 7, 8]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


# The demo student (``make demo``): SmolLM2-135M cut to 14 blocks, 77,873,472 parameters.
# Real sizes from bench/export/results.json (bytes of the files edgepack wrote, decimal MB).
STUDENT = ModelShape(14, 576, 9, 3, 64, 1536, 49152, 77_873_472, 49152 * 576, True)
STUDENT_FILES_MB = {("gguf", "F16"): 157.557, ("gguf", "Q8_0"): 84.566, ("gguf", "Q6_K"): 81.567,
                    ("gguf", "Q5_K_M"): 69.222, ("gguf", "Q4_K_M"): 66.056, ("gguf", "Q4_0"): 59.794,
                    ("gguf", "IQ4_XS"): 59.545, ("onnx", "fp32"): 312.07, ("onnx", "int8"): 90.69,
                    ("onnx", "int4"): 72.328}


@pytest.mark.parametrize("fmt,quant", sorted(STUDENT_FILES_MB))
def test_demo_student_sizes(fmt: str, quant: str) -> None:
    predicted = predict_memory(fmt, STUDENT, quant, 2048).file_bytes / 1e6
    assert predicted == pytest.approx(STUDENT_FILES_MB[fmt, quant], rel=0.01)


def test_fallbacks_at_smollm_width() -> None:
    """Hidden 576 is not a multiple of 256: what made the old per-quant bits 28% low."""
    types = gguf_tensor_types(STUDENT, "Q4_K_M")
    assert types["token_embd.weight"] == "Q8_0"             # tied: Q6_K, 576 % 256 → Q8_0
    assert types["blk.1.attn_q.weight"] == "Q5_0"           # Q4_K falls back
    assert types["blk.0.attn_v.weight"] == "Q8_0"           # use_more_bits → Q6_K → Q8_0
    assert types["blk.1.ffn_down.weight"] == "Q4_K"         # 1536 rows: Q4_K fits
    assert types["blk.0.ffn_down.weight"] == "Q6_K"
    untied = replace(STUDENT, tied=False)
    assert gguf_tensor_types(untied, "Q4_K_M")["token_embd.weight"] == "Q5_0"
    assert gguf_tensor_types(untied, "Q4_K_M")["output.weight"] == "Q8_0"
    assert len(model_matrices(untied)) == len(model_matrices(STUDENT)) + 1


def test_unknown_quant_is_refused() -> None:
    with pytest.raises(ValueError, match="Q3_K_S"):
        predict_gguf(STUDENT, "Q3_K_S", 512)
    with pytest.raises(ValueError, match="fp16"):
        predict_onnx(STUDENT, "fp16", 512)


def test_every_shipped_profile_choice_is_predicted() -> None:
    for name in ("cpu-x86-2c", "cpu-arm-rpi5", "gpu-4gb", "gpu-8gb", "mac-m1-8gb", "mac-m2-16gb"):
        profile = load_profile(name)
        for choice in profile.choices:
            est = predict_memory(choice.format, STUDENT, choice.quant, profile.context_length)
            assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + est.runtime_allowance_bytes
            assert est.runtime_allowance_bytes >= get_format(choice.format).runtime_base_bytes
