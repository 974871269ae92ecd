"""export/gguf/vocab_spm.py: the Split(" ") pre-tokenizer that transformers' GemmaConverter writes.

transformers 4.5x converts a Gemma ``tokenizer.model`` to a ``tokenizer.json`` whose pre-tokenizer
splits on " " after the normalizer has already replaced every " " with ▁ (a no-op,
transformers#43062). It is accepted and the GGUF tokenizes as transformers does; a split that
does change the pieces is still refused. (bench/export/converter_parity.py compares such a GGUF
with llama.cpp's own converter, tensor for tensor.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import UnsupportedArchitecture
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.gguf.vocab import gguf_vocab_from_hf

SPLIT_SPACE = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}


def _with_pre_tokenizer(tok_dir: Path, pre_tokenizer: dict) -> Path:
    path = tok_dir / "tokenizer.json"
    tj = json.loads(path.read_text())
    tj["pre_tokenizer"] = pre_tokenizer
    path.write_text(json.dumps(tj))
    return tok_dir


@pytest.mark.parametrize("space_prefix", [False, True], ids=["gemma-spm", "llama2-spm"])
def test_split_on_space_after_the_normalizer_is_accepted(space_prefix: bool, tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from tests.export.helpers import PROMPTS, SPM_STRINGS, build_gemma3, build_phi3, build_spm_tokenizer

    tok_dir = _with_pre_tokenizer(build_spm_tokenizer(tmp_path / "tok", space_prefix=space_prefix), SPLIT_SPACE)
    hf_dir = (build_phi3 if space_prefix else build_gemma3)(tok_dir, tmp_path / "model")
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", outtype="F32")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.backend_tokenizer.pre_tokenizer is not None  # the form under test really is loaded
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in [*SPM_STRINGS, PROMPTS[0], PROMPTS[2], "  two  spaces ŵ∮ unseen"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok.encode(text, add_special_tokens=False), text
    finally:
        llm.close()


def test_a_split_that_changes_the_pieces_is_still_refused(tmp_path: Path) -> None:
    from tests.export.helpers import build_spm_tokenizer

    # Splitting the normalized text on ▁ keeps a word's ▁ out of the next piece: llama.cpp cannot.
    on_metaspace = {**SPLIT_SPACE, "pattern": {"String": "\u2581"}}
    tok_dir = _with_pre_tokenizer(build_spm_tokenizer(tmp_path / "tok", space_prefix=False), on_metaspace)
    with pytest.raises(UnsupportedArchitecture, match="pre_tokenizer"):
        gguf_vocab_from_hf(tok_dir)
