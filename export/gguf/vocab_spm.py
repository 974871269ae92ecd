"""SentencePiece-style vocabularies (Gemma, Llama 2, Phi-3) as llama.cpp's ``llama`` vocab.

These ship as a ``tokenizer.json`` BPE with ``byte_fallback`` (text with spaces as ``▁``, a
``<0xXX>`` token per byte for what the pieces cannot spell). llama.cpp's SPM tokenizer
(``llm_tokenizer_spm`` in ``src/llama-vocab.cpp``) merges the adjacent pair whose joined
text is a token with the highest *score*; HF merges the pair with the lowest merge rank.
Giving each token the score ``-rank`` of the first merge that makes it orders the two the
same way (HF's SentencePiece converter writes merges in piece-score order, which is what
llama.cpp's converter reads from ``tokenizer.model``). Tokens no merge makes score
``-len(merges)`` (bytes, specials, single characters are never a merge's result).

Which normalizer the family uses decides ``add_space_prefix``: Llama 2 / Phi-3 prepend
``▁``, Gemma does not (``convert_hf_to_gguf.py``'s Gemma3Model writes
``add_space_prefix = false``). Anything else raises
:class:`~edgepack.errors.UnsupportedArchitecture` naming what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.errors import UnsupportedArchitecture

SPM_SPACE = "\u2581"  # ▁, SentencePiece's visible space
_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
_PREPEND_SPACE = {"type": "Prepend", "prepend": SPM_SPACE}
# transformers' GemmaConverter (4.5x) also writes this pre-tokenizer; after either normalizer
# below has replaced every " " with ▁ it splits nothing (transformers#43062), so it is accepted.
_SPLIT_SPACE = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}

# HF normalizer → llama.cpp add_space_prefix, as the families ship them.
SPM_NORMALIZERS: tuple[tuple[Any, bool], ...] = (
    (_REPLACE_SPACE, False),                                                      # Gemma 2/3
    ({"type": "Sequence", "normalizers": [_PREPEND_SPACE, _REPLACE_SPACE]}, True),  # Llama 2, Phi-3
)


def is_sentencepiece_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """A ``tokenizer.json`` BPE with byte fallback: the SentencePiece families' form."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def spm_add_space_prefix(tokenizer_json: dict[str, Any], path: Path) -> bool:
    """``add_space_prefix`` for a SentencePiece-style ``tokenizer.json``; refuses forms llama.cpp
    would split differently (a pre-tokenizer, an unknown normalizer, missing byte tokens)."""
    normalizer = tokenizer_json.get("normalizer")
    for known, prefix in SPM_NORMALIZERS:
        if normalizer == known:
            break
    else:
        raise UnsupportedArchitecture(
            f"tokenizer.json BPE with byte_fallback (SentencePiece-style) in {path}: normalizer "
            f"{json.dumps(normalizer)[:200]} is not one llama.cpp applies",
            hint="supported: Replace(' ', '▁') (Gemma) or Prepend('▁') + Replace (Llama 2, Phi-3)")
    if tokenizer_json.get("pre_tokenizer") not in (None, _SPLIT_SPACE):
        raise UnsupportedArchitecture(f"{path} has a pre_tokenizer; llama.cpp's SentencePiece tokenizer has none")
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab") or {}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise UnsupportedArchitecture(f"{path} lacks byte tokens {', '.join(missing[:4])}…; "
                                      "llama.cpp's byte fallback needs all 256")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UnsupportedArchitecture(f"BPE option {key}={model[key]!r} has no llama.cpp equivalent")
    return prefix


def spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Per token, ``-rank`` of the first merge that produces it (see the module docstring)."""
    made: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ", 1)
        made.setdefault(a + b, rank)
    floor = -float(len(merges))
    return [-float(made[t]) if t in made else floor for t in tokens]


def spm_byte_types(tokens: list[str], types: list[int], byte_type: int, normal: int) -> list[int]:
    """Token types with ``<0xXX>`` tokens marked BYTE (llama.cpp's byte fallback looks them up)."""
    out = list(types)
    for i, text in enumerate(tokens):
        if out[i] == normal and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            out[i] = byte_type
    return out


def spm_merges_from_scores(tokens: list[str], scores: list[float], usable: list[bool]) -> list[list[str]]:
    """HF merges for a SentencePiece vocab, as transformers' SentencePiece converter derives them:
    every split of every piece into two pieces, pieces by descending score, then by the two ids."""
    index = {t: i for i, t in enumerate(tokens) if usable[i]}
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((-scores[i], index[left], index[right], left, right))
    merges.sort(key=lambda m: (m[0], m[1], m[2]))
    return [[left, right] for _, _, _, left, right in merges]


def spm_tokenizer_json(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool,
                       added: list[dict[str, Any]], unk: str | None, normal_types: tuple[int, ...]) -> dict[str, Any]:
    """The HF ``tokenizer.json`` equivalent to a SentencePiece GGUF vocab (the inverse of the export)."""
    usable = [t in normal_types for t in types]
    vocab = {text: i for i, text in enumerate(tokens)}
    normalizer = next(n for n, prefix in SPM_NORMALIZERS if prefix == add_space_prefix)
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                                      {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": spm_merges_from_scores(tokens, scores, usable)},
    }
