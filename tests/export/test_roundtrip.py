"""Slow: the embedded teacher GGUF → HF → edgepack's converter → llama.cpp, vs transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf
from tests.export.helpers import llama_logits


@pytest.mark.slow
def test_teacher_round_trip_logits(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = tmp_path / "teacher-hf"
    model = AutoModelForCausalLM.from_pretrained(builtin_teacher_gguf.parent, gguf_file=builtin_teacher_gguf.name,
                                                 dtype=torch.float32)
    model.save_pretrained(hf_dir, safe_serialization=True)
    hf_tokenizer_from_gguf(builtin_teacher_gguf, hf_dir)

    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "teacher-F16.gguf", outtype="F16")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Pump P-101 pressure is low. What should I check?"}],
                                  add_generation_prompt=True)
    assert ids[0] == 1  # <|im_start|>
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    got = llama_logits(gguf_path, ids, n_ctx=256)
    # F16 weights and llama.cpp's F16 KV cache; logits here span about ±40 (measured max diff ~0.09).
    assert float(np.abs(ref - got).max()) < 0.5
    assert float((ref.argmax(-1) == got.argmax(-1)).mean()) >= 0.95
