"""Gemma 3 (text) and Phi-3 through both exporters: GGUF conventions, refusals, ONNX via the CLI.

The F32 logits parity against transformers on llama.cpp is in test_convert.py (these
architectures are in ARCH_BUILDERS/VARIANT_BUILDERS); here are the llama.cpp conventions
that parity alone would not name when it breaks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import UnsupportedArchitecture
from edgepack.export.gguf.convert import convert_hf_to_gguf
from tests.export.helpers import PROMPTS, encode, hf_logits, llama_logits


def _gguf(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _edit_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_gemma3_metadata_norm_shift_and_sliding_window(arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hf_dir = arch_model_dirs["Gemma3ForCausalLM"]
    fields, tensors = _gguf(convert_hf_to_gguf(hf_dir, tmp_path / "g.gguf", outtype="F32"))
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.key_length"] == 16 and fields["gemma3.attention.value_length"] == 16
    assert fields["gemma3.rope.freq_base"] == 1000000.0
    assert fields["gemma3.block_count"] == 6
    assert "output.weight" not in tensors  # tied: config.json omits tie_word_embeddings (Gemma's default)
    hf = load_file(hf_dir / "model.safetensors")
    # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by w: every norm is stored +1.
    for hf_name, name in [("model.norm.weight", "output_norm.weight"),
                          ("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
                          ("model.layers.1.pre_feedforward_layernorm.weight", "blk.1.ffn_norm.weight"),
                          ("model.layers.1.post_attention_layernorm.weight", "blk.1.post_attention_norm.weight"),
                          ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight")]:
        np.testing.assert_allclose(np.asarray(tensors[name].data), hf[hf_name].numpy() + 1.0, rtol=0, atol=1e-7)
    # The embedding is stored unscaled; llama.cpp multiplies by sqrt(hidden) itself.
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data), hf["model.embed_tokens.weight"].numpy())


@pytest.mark.parametrize("name", ["Phi3ForCausalLM", "phi3-longrope"])
def test_phi3_fused_tensors_and_rope(name: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hf_dir = arch_model_dirs[name]
    config = json.loads((hf_dir / "config.json").read_text())
    fields, tensors = _gguf(convert_hf_to_gguf(hf_dir, tmp_path / "p.gguf", outtype="F32"))
    hf = load_file(hf_dir / "model.safetensors")
    assert fields["general.architecture"] == "phi3"
    assert fields["phi3.rope.scaling.original_context_length"] == 512
    assert fields["phi3.attention.sliding_window"] == 0
    # gguf-py stores shapes reversed (ne0 first): q|k|v rows stay fused, as do gate|up rows.
    assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (64, 64 + 2 * 2 * 16)
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, 2 * 128)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_qkv.weight"].data),
                                  hf["model.layers.0.self_attn.qkv_proj.weight"].numpy())
    rope = config.get("rope_scaling")
    if rope is None:
        assert fields["phi3.rope.dimension_count"] == 16
        assert "rope_factors_long.weight" not in tensors and "phi3.rope.scaling.attn_factor" not in fields
        return
    assert fields["phi3.rope.dimension_count"] == 12  # partial_rotary_factor 0.75 of head_dim 16
    np.testing.assert_array_equal(np.asarray(tensors["rope_factors_long.weight"].data), rope["long_factor"])
    np.testing.assert_array_equal(np.asarray(tensors["rope_factors_short.weight"].data), rope["short_factor"])
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(2) / np.log(512)))


@pytest.mark.parametrize("changes,match", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
    ({"rope_local_base_freq": 20000.0}, "rope_local_base_freq"),
    ({"layer_types": ["full_attention"] * 6}, "five layers of every six"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
])
def test_gemma3_configs_llama_cpp_would_compute_differently_are_refused(
        changes: dict, match: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = _edit_config(arch_model_dirs["Gemma3ForCausalLM"], tmp_path / "g", **changes)
    with pytest.raises(UnsupportedArchitecture, match=match):
        convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_phi3_unsupported_rope_scaling_is_refused(arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = _edit_config(arch_model_dirs["Phi3ForCausalLM"], tmp_path / "p",
                          rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(UnsupportedArchitecture, match="yarn"):
        convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf")


def test_a_phi3_named_dir_without_phi3_tokens_still_loads(arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp looks up </s>, <unk>, <s> with .at() when general.name contains "phi3"."""
    hf_dir = tmp_path / "Phi3-mini-student"
    shutil.copytree(arch_model_dirs["Phi3ForCausalLM"], hf_dir)
    path = convert_hf_to_gguf(hf_dir, tmp_path / "p.gguf", outtype="F32")
    fields, _ = _gguf(path)
    assert "phi3" not in fields["general.name"].lower() and "student" in fields["general.name"]
    ids = encode(hf_dir, PROMPTS[0])
    assert np.array_equal(llama_logits(path, ids).argmax(-1), hf_logits(hf_dir, ids).argmax(-1))


@pytest.mark.parametrize("name", ["Gemma3ForCausalLM", "Phi3ForCausalLM"])
def test_cli_exports_onnx_not_blocked_by_the_gguf_registry(name: str, arch_model_dirs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    done = subprocess.run([sys.executable, "-m", "edgepack", "export", str(arch_model_dirs[name]), "--format", "onnx",
                           "--quant", "fp32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    onnx_files = list(out.rglob("model.onnx"))
    assert len(onnx_files) == 1
    from edgepack.export.onnx.convert import onnx_logits

    ids = encode(arch_model_dirs[name], PROMPTS[0])
    ref = hf_logits(arch_model_dirs[name], ids)
    got = onnx_logits(onnx_files[0], ids)
    assert np.array_equal(ref.argmax(-1), np.asarray(got).argmax(-1)) and float(np.abs(ref - got).max()) < 1e-3


def test_onnx_refusal_names_optimum_types_not_the_gguf_list(arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from edgepack.export.onnx.arch import check_onnx_architecture

    hf_dir = _edit_config(arch_model_dirs["Phi3ForCausalLM"], tmp_path / "p", model_type="foo_lm",
                          architectures=["FooLMForCausalLM"])
    with pytest.raises(UnsupportedArchitecture) as err:
        check_onnx_architecture(json.loads((hf_dir / "config.json").read_text()))
    assert "foo_lm" in str(err.value)
    assert "phi3" in err.value.hint and "gemma3_text" in err.value.hint and "ForCausalLM" not in err.value.hint
    with pytest.raises(UnsupportedArchitecture, match="FooForCausalLM"):
        check_onnx_architecture({"model_type": "phi3", "architectures": ["FooForCausalLM"]})
    assert check_onnx_architecture({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}) == "phi3"
    assert check_onnx_architecture({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}) \
        == "gemma3_text"


@pytest.fixture(scope="module", params=[False, True], ids=["gemma-spm", "llama2-spm"])
def spm_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[bool, Path, Path]:
    """(space_prefix, HF dir, F32 GGUF): Gemma 3 with Gemma's tokenizer form, Phi-3 with Llama 2's."""
    from tests.export.helpers import build_gemma3, build_phi3, build_spm_tokenizer

    prefix = request.param
    root = tmp_path_factory.mktemp("spm")
    tok_dir = build_spm_tokenizer(root / "tok", space_prefix=prefix)
    hf_dir = (build_phi3 if prefix else build_gemma3)(tok_dir, root / "model")
    return prefix, hf_dir, convert_hf_to_gguf(hf_dir, root / "m-F32.gguf", outtype="F32")


def test_sentencepiece_vocab_tokenizes_like_transformers(spm_model: tuple[bool, Path, Path]) -> None:
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from tests.export.helpers import SPM_STRINGS

    prefix, hf_dir, path = spm_model
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items() if k in (
        "tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.pre")}
    assert field == {"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_space_prefix": prefix,
                     "tokenizer.ggml.pre": "default"}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<0x0A>")] == 6 and types[tokens.index("<start_of_turn>")] == 3
    tok = AutoTokenizer.from_pretrained(hf_dir)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        unseen = "ŵ∮ ẞ ⛽ the tokenizer never saw these"  # spelt with <0xXX> byte tokens
        for text in [*SPM_STRINGS, PROMPTS[0], PROMPTS[2], unseen]:
            ids = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            got = llm.detokenize(ids, special=True).decode()
            # llama-cpp-python's detokenize keeps the space add_space_prefix put in front of the
            # text (llama.cpp's own common_detokenize drops it); HF's Strip decoder drops it too.
            # (Around special tokens the two libraries place that space differently; ids agree.)
            if not (prefix and "<" in text):
                assert (got[1:] if prefix else got) == tok.decode(ids), text
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(tok.encode(unseen)))
    finally:
        llm.close()
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    ref, got = hf_logits(hf_dir, ids), llama_logits(path, ids)
    assert np.array_equal(ref.argmax(-1), got.argmax(-1)) and float(np.abs(ref - got).max()) < 1e-2


@pytest.mark.parametrize("edit,match", [
    (lambda tj: tj["model"]["vocab"].pop("<0x41>"), "<0x41>"),
    (lambda tj: tj.__setitem__("pre_tokenizer", {"type": "Whitespace"}), "pre_tokenizer"),
    (lambda tj: tj.__setitem__("normalizer", {"type": "NFKC"}), "byte_fallback"),
])
def test_sentencepiece_forms_llama_cpp_cannot_reproduce_are_refused(edit, match: str, spm_model, tmp_path: Path) -> None:
    from edgepack.export.gguf.vocab import gguf_vocab_from_hf

    hf_dir = tmp_path / "m"
    shutil.copytree(spm_model[1], hf_dir)
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    edit(tj)
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedArchitecture, match=match):
        gguf_vocab_from_hf(hf_dir)


def test_sentencepiece_gguf_vocab_rebuilds_the_hf_tokenizer(spm_model: tuple[bool, Path, Path], tmp_path: Path) -> None:
    """A Gemma-style GGUF teacher's tokenizer, rebuilt for distill data, splits text as llama.cpp does."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf
    from tests.export.helpers import SPM_STRINGS

    prefix, hf_dir, path = spm_model
    hf_tokenizer_from_gguf(path, tmp_path / "tok")
    rebuilt, original = AutoTokenizer.from_pretrained(tmp_path / "tok"), AutoTokenizer.from_pretrained(hf_dir)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in [*SPM_STRINGS, PROMPTS[0], "ŵ∮ ẞ ⛽ unseen"]:
            ids = rebuilt.encode(text, add_special_tokens=False)
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True) == \
                original.encode(text, add_special_tokens=False), text
            assert rebuilt.decode(ids) == original.decode(ids), text
    finally:
        llm.close()
    assert rebuilt.eos_token == "<eos>" and rebuilt.bos_token == "<bos>"
    assert rebuilt.chat_template == original.chat_template


@pytest.mark.slow
def test_real_gemma3_270m_round_trips_through_the_exporter(tmp_path: Path, real_gemma3_gguf: Path) -> None:
    """The real Gemma 3 270M GGUF → HF (its vocab rebuilt by edgepack, weights dequantized by
    transformers) → edgepack's F16 GGUF: the 262k SentencePiece vocab tokenizes exactly as the
    original GGUF does, and llama.cpp on the re-export agrees with transformers."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf
    from tests.export.helpers import SPM_STRINGS, TOKENIZER_STRINGS

    src = real_gemma3_gguf
    hf_dir = tmp_path / "gemma3-270m"
    hf_tokenizer_from_gguf(src, hf_dir)
    AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).save_pretrained(hf_dir)
    out = convert_hf_to_gguf(hf_dir, tmp_path / "gemma3-270m-F16.gguf", outtype="F16")
    original, reexport = (Llama(str(p), vocab_only=True, verbose=False) for p in (src, out))
    try:
        for text in [*TOKENIZER_STRINGS, *SPM_STRINGS, *PROMPTS, "naïve café ｆｕｌｌｗｉｄｔｈ \u200b"]:
            want = original.tokenize(text.encode(), add_bos=False, special=True)
            assert reexport.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        original.close()
        reexport.close()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt, add_special_tokens=False)
        ref, got = hf_logits(hf_dir, ids), llama_logits(out, ids)
        assert np.array_equal(ref.argmax(-1), got.argmax(-1)), prompt
        assert float(np.abs(ref - got).max()) < 0.25  # F16 weights and KV cache over 18 layers
