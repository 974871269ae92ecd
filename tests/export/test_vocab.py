"""edgepack.export.gguf.vocab: every pre-tokenizer row agrees with llama.cpp, both directions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import InvalidModelFile, UnsafeModelError, UnsupportedArchitecture
from edgepack.export.gguf.vocab import (
    PRE_TOKENIZERS,
    PreTokenizer,
    detect_pre_tokenizer,
    gguf_vocab_from_hf,
    hf_tokenizer_from_gguf,
    pre_tokenizer_by_name,
    read_gguf_vocab,
    supported_pre_tokenizers,
)
from edgepack.export.gguf.convert import convert_hf_to_gguf
from tests.export.helpers import TOKENIZER_STRINGS, _save_model
from tests.tiny import CHATML_TEMPLATE, CORPUS, SPECIAL_TOKENS


def _train_tokenizer(row: PreTokenizer, out_dir: Path, *, add_bos: bool) -> Path:
    """A small BPE tokenizer whose pre-tokenizer/normalizer are exactly ``row``'s HF JSON."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": row.normalizer, "pre_tokenizer": row.hf,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {}, "merges": []},
    }))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator((CORPUS + TOKENIZER_STRINGS) * 4, trainer=trainer)
    tj = json.loads(base.to_str())
    tj["model"]["ignore_merges"] = row.ignore_merges
    if add_bos:
        bos = "<|im_start|>"
        tj["post_processor"] = {"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}}}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def _tiny_model(tok_dir: Path, out_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    n = len(AutoTokenizer.from_pretrained(tok_dir))
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    return _save_model(LlamaForCausalLM, cfg, tok_dir, out_dir)


def _llama_ids(llm: Any, text: str, *, add_bos: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


@pytest.fixture(scope="module", params=[row.name for row in PRE_TOKENIZERS])
def row_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTokenizer, Path]:
    row = pre_tokenizer_by_name(request.param)
    root = tmp_path_factory.mktemp(row.name)
    tok_dir = _train_tokenizer(row, root / "tok", add_bos=row.name == "llama-bpe")
    return row, _tiny_model(tok_dir, root / "model")


def test_hf_tokenizer_and_llama_cpp_agree_for_every_row(row_model: tuple[PreTokenizer, Path], tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    row, hf_dir = row_model
    assert gguf_vocab_from_hf(hf_dir).pre == row.name
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", outtype="F16")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_STRINGS:
            assert tok.encode(text, add_special_tokens=False) == _llama_ids(llm, text, add_bos=False), text
            assert tok.encode(text) == _llama_ids(llm, text, add_bos=True), f"add_bos differs on {text!r}"
    finally:
        llm.close()


def test_rebuilt_hf_tokenizer_matches_llama_cpp_for_every_row(row_model: tuple[PreTokenizer, Path],
                                                               tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    row, hf_dir = row_model
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", outtype="F16")
    hf_tokenizer_from_gguf(gguf_path, tmp_path / "rebuilt")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path / "rebuilt")
    original = AutoTokenizer.from_pretrained(hf_dir)
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_STRINGS:
            ids = rebuilt.encode(text, add_special_tokens=False)
            assert ids == _llama_ids(llm, text, add_bos=False), text
            assert rebuilt.encode(text) == original.encode(text)
            assert rebuilt.decode(ids) == text
    finally:
        llm.close()
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert rebuilt.chat_template == CHATML_TEMPLATE
    # the rebuilt dir converts back to the same pre-tokenizer name
    assert detect_pre_tokenizer(json.loads((tmp_path / "rebuilt" / "tokenizer.json").read_text())).name == row.name


def test_unknown_pre_tokenizer_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitecture) as err:
        detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})
    assert all(row.name in err.value.hint for row in PRE_TOKENIZERS)
    with pytest.raises(UnsupportedArchitecture) as err:
        pre_tokenizer_by_name("falcon")
    assert "smollm" in err.value.hint and "qwen2" in err.value.hint


def test_aliases_resolve_to_their_row() -> None:
    assert pre_tokenizer_by_name("llama3").name == "llama-bpe"
    assert "deepseek-r1-qwen" in supported_pre_tokenizers()


def test_trim_offsets_does_not_change_detection() -> None:
    hf = json.loads(json.dumps(pre_tokenizer_by_name("qwen2").hf))
    hf["pretokenizers"][1]["trim_offsets"] = False  # as in Qwen2's own tokenizer.json
    assert detect_pre_tokenizer({"pre_tokenizer": hf}).name == "qwen2"


def _write_vocab_only_gguf(path: Path, pre: str, model: str = "gpt2") -> Path:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_with_unknown_pre_is_refused(tmp_path: Path) -> None:
    path = _write_vocab_only_gguf(tmp_path / "v.gguf", pre="falcon")
    with pytest.raises(UnsupportedArchitecture, match="falcon"):
        hf_tokenizer_from_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_vocab_of_another_tokenizer_model_is_refused(tmp_path: Path) -> None:
    # SentencePiece (llama) vocabularies are read since #19 (tests/export/test_gemma_phi.py); one
    # without its scores cannot be, and other tokenizer models are refused.
    path = _write_vocab_only_gguf(tmp_path / "v.gguf", pre="default", model="llama")
    with pytest.raises(InvalidModelFile, match="score per token"):
        read_gguf_vocab(path)
    path = _write_vocab_only_gguf(tmp_path / "t.gguf", pre="default", model="t5")
    with pytest.raises(UnsupportedArchitecture, match="neither byte-level BPE nor SentencePiece"):
        read_gguf_vocab(path)


def test_gguf_vocab_is_read_through_the_bounded_header_reader(tiny_gguf: Path, tmp_path: Path) -> None:
    import resource
    import time

    from tests.runtime.helpers import gguf_offsets, patch

    vocab = read_gguf_vocab(tiny_gguf)
    assert vocab.pre == "gpt-2" and vocab.tokens[2] == "<|im_end|>" and vocab.eos_id == 2
    assert len(vocab.token_types) == len(vocab.tokens) > 64 and vocab.merges  # long arrays kept whole
    # A token count the file cannot hold is refused before anything is allocated for it.
    bad = patch(tiny_gguf, tmp_path / "bad.gguf", gguf_offsets(tiny_gguf)["tokens_count"], "<Q", 1 << 62)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(InvalidModelFile, match="cannot hold"):
        read_gguf_vocab(bad)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024


def test_sentencepiece_hf_tokenizers_are_refused(tiny_llama_copy: Path) -> None:
    tj = json.loads((tiny_llama_copy / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (tiny_llama_copy / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedArchitecture, match="byte_fallback"):
        gguf_vocab_from_hf(tiny_llama_copy)
    (tiny_llama_copy / "tokenizer.json").unlink()
    (tiny_llama_copy / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(UnsupportedArchitecture, match="SentencePiece"):
        gguf_vocab_from_hf(tiny_llama_copy)


def test_normalizer_llama_cpp_cannot_apply_is_refused(tiny_llama_copy: Path) -> None:
    tj = json.loads((tiny_llama_copy / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Lowercase"}
    (tiny_llama_copy / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedArchitecture, match="Lowercase"):
        gguf_vocab_from_hf(tiny_llama_copy)


def test_vocab_is_padded_to_the_embedding_rows(tiny_llama_dir: Path) -> None:
    base = gguf_vocab_from_hf(tiny_llama_dir)
    padded = gguf_vocab_from_hf(tiny_llama_dir, vocab_size=len(base.tokens) + 3)
    assert padded.tokens[-3:] == [f"[PAD{i}]" for i in range(len(base.tokens), len(base.tokens) + 3)]
    assert padded.token_types[-3:] == [5, 5, 5]


def test_chat_template_is_the_one_transformers_renders(tiny_llama_copy: Path) -> None:
    """chat_template.jinja beats tokenizer_config.json, as in transformers' from_pretrained: the
    GGUF carries the template the student was trained and evaluated with."""
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_llama_copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (tiny_llama_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    trained_with = AutoTokenizer.from_pretrained(tiny_llama_copy).get_chat_template()
    assert gguf_vocab_from_hf(tiny_llama_copy).chat_template == trained_with == CHATML_TEMPLATE
    (tiny_llama_copy / "chat_template.jinja").unlink()
    assert gguf_vocab_from_hf(tiny_llama_copy).chat_template == "{{ messages[0]['content'] }}"


def test_broken_chat_template_fails_at_export(tiny_llama_copy: Path) -> None:
    (tiny_llama_copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(InvalidModelFile, match="does not parse"):
        gguf_vocab_from_hf(tiny_llama_copy)


@pytest.mark.parametrize("payload", [
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{% for m in messages %}{{ m.__class__.__mro__[1].__subclasses__() }}{% endfor %}",
])
def test_chat_template_injection_is_refused(payload: str, tiny_llama_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tiny_llama_copy / "chat_template.jinja").write_text(payload)
    with pytest.raises(UnsafeModelError):
        gguf_vocab_from_hf(tiny_llama_copy)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
def test_teacher_gguf_tokenizer_round_trip(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf_tokenizer_from_gguf(builtin_teacher_gguf, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # add_bos_token false
    llm = Llama(str(builtin_teacher_gguf), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_STRINGS:
            assert tok.encode(text, add_special_tokens=False) == _llama_ids(llm, text, add_bos=False), text
        assert tok.chat_template == llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    assert read_gguf_vocab(builtin_teacher_gguf).pre == "smollm"
    assert gguf_vocab_from_hf(tmp_path / "tok").pre == "smollm"
