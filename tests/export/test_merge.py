"""merge_lora: a peft LoRA adapter merged into the tiny base, then through llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from edgepack.atomic import is_complete
from edgepack.errors import InvalidModelFile, ModelSourceError, UnsafeModelError
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.merge import merge_lora
from tests.export.helpers import PROMPTS, build_qwen3, hf_logits, llama_logits, make_lora_adapter


def _peft_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_merged_model_matches_the_adapter_and_exports(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    adapter = make_lora_adapter(tiny_llama_dir, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    merged = merge_lora(adapter, tmp_path / "merged")
    assert is_complete(merged) and (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    ids = AutoTokenizer.from_pretrained(merged).encode(PROMPTS[1], add_special_tokens=False)
    with_adapter = _peft_logits(tiny_llama_dir, adapter, ids)
    merged_logits = hf_logits(merged, ids)
    assert float(np.abs(with_adapter - merged_logits).max()) < 1e-3
    assert float(np.abs(hf_logits(tiny_llama_dir, ids) - merged_logits).max()) > 0.1  # the adapter mattered
    gguf_path = convert_hf_to_gguf(merged, tmp_path / "merged-F32.gguf", outtype="F32")
    got = llama_logits(gguf_path, ids)
    assert np.array_equal(got.argmax(-1), merged_logits.argmax(-1))


def test_adapter_for_another_base_is_rejected_with_shapes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    other = build_qwen3(tiny_llama_dir, tmp_path / "qwen3")  # q_proj is (128, 64) there, (64, 64) here
    adapter = make_lora_adapter(other, tmp_path / "adapter", ["q_proj"])
    with pytest.raises(InvalidModelFile, match=r"q_proj\.weight.*\(64, 64\)"):
        merge_lora(adapter, tmp_path / "merged", base_dir=tiny_llama_dir)
    assert not (tmp_path / "merged").exists()


def test_adapter_targeting_missing_module_is_rejected(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.export.helpers import build_qwen3

    adapter = make_lora_adapter(tiny_llama_dir, tmp_path / "adapter", ["q_proj"])
    base = tmp_path / "pruned"
    shutil.copytree(tiny_llama_dir, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in load_file(base / "model.safetensors").items() if "layers.1.self_attn.q_proj" not in k}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidModelFile, match=r"layers\.\d\.self_attn\.q_proj"):
        merge_lora(adapter, tmp_path / "merged")


def test_pickled_adapter_and_missing_base_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_lora_adapter(tiny_llama_dir, tmp_path / "adapter", ["q_proj"])
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UnsafeModelError, match="adapter_model.bin"):
        merge_lora(adapter, tmp_path / "merged")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"  # a hub id: never downloaded
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="not a local HF model dir"):
        merge_lora(adapter, tmp_path / "merged")
