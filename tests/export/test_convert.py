"""HF → GGUF conversion, checked against transformers on real llama.cpp."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InvalidModelFile, UnsafeModelError, UnsupportedArchitecture, UsageError
from edgepack.export.gguf.arch import ARCHITECTURES
from edgepack.export.gguf.convert import convert_hf_to_gguf
from tests.export.helpers import (
    ARCH_BUILDERS,
    PROMPTS,
    VARIANT_BUILDERS,
    encode,
    hf_logits,
    llama_logits,
    no_leftovers,
    rewrite_tensor,
)

ALL_MODELS = ["LlamaForCausalLM", *ARCH_BUILDERS, *VARIANT_BUILDERS]


def test_every_registered_architecture_has_a_test_model() -> None:
    assert set(ARCHITECTURES) == {"LlamaForCausalLM", *ARCH_BUILDERS}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_f32_logits_match_transformers(name: str, arch_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf_dir = arch_model_dirs[name]
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "m-F32.gguf", outtype="F32")
    worst = 0.0
    for prompt in PROMPTS:
        ids = encode(hf_dir, prompt)
        ref, got = hf_logits(hf_dir, ids), llama_logits(gguf_path, ids)
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(ref - got).max()))
        # llama.cpp keeps its KV cache in F16, so F32 weights still differ by ~1e-3.
        assert np.array_equal(ref.argmax(-1), got.argmax(-1)), f"{name}: top-1 differs on {prompt!r}"
    assert worst < 1e-2, f"{name}: max |logit diff| {worst}"


@pytest.mark.parametrize("outtype,tol", [("F16", 0.05), ("BF16", 0.3)])
def test_half_precision_outputs_load_and_agree(outtype: str, tol: float, tiny_llama_dir: Path,
                                               tmp_path: Path) -> None:
    import gguf

    path = convert_hf_to_gguf(tiny_llama_dir, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == outtype
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    ids = encode(tiny_llama_dir, PROMPTS[0])
    ref, got = hf_logits(tiny_llama_dir, ids), llama_logits(path, ids)
    assert float(np.abs(ref - got).max()) < tol
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_metadata_hparams_vocab_and_chat_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import gguf

    path = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype="F16")
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")
             and k != "tokenizer.ggml.merges"}
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert field["general.architecture"] == "llama"
    assert field["llama.block_count"] == config["num_hidden_layers"]
    assert field["llama.embedding_length"] == config["hidden_size"]
    assert field["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert field["llama.context_length"] == config["max_position_embeddings"]
    assert field["general.file_type"] == 1
    assert field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.bos_token_id"] == 1 and field["tokenizer.ggml.eos_token_id"] == 2
    assert field["tokenizer.ggml.add_bos_token"] is False
    template = (tiny_llama_dir / "chat_template.jinja").read_text()
    assert field["tokenizer.chat_template"] == template
    # tied embeddings: llama.cpp reuses token_embd, so no output.weight is written
    assert "output.weight" not in {t.name for t in reader.tensors}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert [types[tokens.index(s)] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [3, 3, 3]


def test_llama_cpp_sees_bos_eos_and_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from llama_cpp import Llama

    path = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype="F16")
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert llm.token_bos() == 1 and llm.token_eos() == 2
        assert llm.metadata["tokenizer.chat_template"] == (tiny_llama_dir / "chat_template.jinja").read_text()
    finally:
        llm.close()


def test_unsupported_architecture_raises_before_reading_weights(tiny_llama_copy: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_llama_copy / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (tiny_llama_copy / "config.json").write_text(json.dumps(config))
    (tiny_llama_copy / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(UnsupportedArchitecture) as err:
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")
    assert "FooForCausalLM" in str(err.value)
    assert all(name in err.value.hint for name in ARCHITECTURES)
    assert not list(tmp_path.glob("out.gguf*"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_rejected_naming_the_tensor(bad: float, tiny_llama_copy: Path, tmp_path: Path) -> None:
    rewrite_tensor(tiny_llama_copy / "model.safetensors", "model.layers.1.mlp.up_proj.weight", bad)
    with pytest.raises(InvalidModelFile, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert no_leftovers(tmp_path) == []


def test_truncated_safetensors_is_rejected(tiny_llama_copy: Path, tmp_path: Path) -> None:
    weights = tiny_llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InvalidModelFile, match="model.safetensors"):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and no_leftovers(tmp_path) == []


def test_corrupt_safetensors_header_is_rejected(tiny_llama_copy: Path, tmp_path: Path) -> None:
    weights = tiny_llama_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)  # header longer than the file
    weights.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")


def test_pickle_only_checkpoint_is_refused(tiny_llama_copy: Path, tmp_path: Path) -> None:
    (tiny_llama_copy / "model.safetensors").unlink()
    (tiny_llama_copy / "pytorch_model.bin").write_bytes(b"pickle payload that must never be loaded")
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin"):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")


def test_missing_tensor_is_reported(tiny_llama_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tiny_llama_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(InvalidModelFile, match=r"blk\.1\.attn_k\.weight"):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")


def test_unknown_tensor_is_an_error_not_dropped(tiny_llama_copy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = tiny_llama_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(4, 4)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UnsupportedArchitecture, match="mystery"):
        convert_hf_to_gguf(tiny_llama_copy, tmp_path / "out.gguf")


def test_bad_outtype_is_a_usage_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Q4_K_M"):
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "out.gguf", outtype="Q4_K_M")


def test_sharded_checkpoint_converts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "a.gguf", outtype="F32")
    b = convert_hf_to_gguf(sharded, tmp_path / "b.gguf", outtype="F32")
    ids = encode(tiny_llama_dir, PROMPTS[0])
    assert np.array_equal(llama_logits(a, ids), llama_logits(b, ids))


def test_progress_reports_every_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int | None]] = []
    convert_hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", progress=lambda t, d, n=None: calls.append((t, d, n)))
    assert calls[-1][1] == calls[-1][2] and calls[-1][2] == 2 * 9 + 2
