"""Tokenizer conventions shared by HF tokenizers and llama.cpp's GGUF vocab.

Two directions, one table:

* :func:`gguf_vocab_from_hf` reads an HF model dir (``tokenizer.json`` +
  ``tokenizer_config.json``) into a :class:`GGUFVocab`, which
  :func:`write_gguf_vocab` writes as ``tokenizer.ggml.*`` keys (the exporter uses it).
* :func:`hf_tokenizer_from_gguf` rebuilds an HF ``PreTrainedTokenizerFast`` from a
  GGUF's vocab (the teacher materialiser uses it; transformers' own GGUF tokenizer
  converter gets bos/eos and the decoder wrong for SmolLM2).

llama.cpp does not run the HF pre-tokenizer; it picks a hard-coded regex list from the
``tokenizer.ggml.pre`` name (``llm_tokenizer_bpe`` in llama.cpp's ``src/llama-vocab.cpp``).
:data:`PRE_TOKENIZERS` pairs each name we support with the HF ``pre_tokenizer`` JSON that
splits text the same way; tests check the pairing on real llama.cpp for every row.

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``) goes both ways. A SentencePiece-style
``tokenizer.json`` (BPE with ``byte_fallback``: Gemma, Llama 2, Phi-3) is exported as
llama.cpp's ``llama`` vocab with scores (:mod:`edgepack.export.gguf.vocab_spm`), and such a
GGUF vocab (a Gemma 3 teacher) is rebuilt as that ``tokenizer.json``. A bare ``tokenizer.model`` and Unigram/WordPiece raise
:class:`~edgepack.errors.UnsupportedArchitecture`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, ModelSourceError, UnsupportedArchitecture
from edgepack.export.gguf.vocab_spm import (
    is_sentencepiece_bpe,
    spm_add_space_prefix,
    spm_byte_types,
    spm_scores,
    spm_tokenizer_json,
)
from edgepack.gguf_header import read_gguf

# llama.cpp token types (gguf.TokenType / LLAMA_TOKEN_TYPE_*).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer name and the HF pre-tokenizer that splits identically."""

    name: str
    """Value of ``tokenizer.ggml.pre``."""
    hf: dict[str, Any]
    """HF ``tokenizer.json`` ``pre_tokenizer`` object."""
    normalizer: dict[str, Any] | None = None
    """The HF normalizer the family ships (llama.cpp applies none; see ``qwen2``)."""
    ignore_merges: bool = False
    """llama.cpp sets ``ignore_merges`` for this name: whole words found in the vocab win."""
    aliases: tuple[str, ...] = ()
    """Other ``tokenizer.ggml.pre`` names llama.cpp maps to the same regex and flags."""


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        _byte_level(use_regex=False),
    ]}


# The regexes are the "original regex from tokenizer.json" that llama.cpp quotes next to
# its own adapted versions in llm_tokenizer_bpe; they differ only in how "(?i:...)" is spelt.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    # GPT-2 style byte-level BPE: ByteLevel's built-in GPT-2 regex (also what a
    # tokenizers-trained ByteLevel BPE uses, e.g. edgepack's tiny test models).
    PreTokenizer("gpt-2", _byte_level(use_regex=True)),
    # SmolLM / SmolLM2 (StarCoder-style): every digit alone, then the GPT-2 regex.
    PreTokenizer("smollm", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)]}),
    # Llama 3 / 3.1 / 3.2 (tiktoken-style: digits in runs of up to 3, case-insensitive contractions).
    PreTokenizer("llama-bpe", _split_then_bytes(_LLAMA3_REGEX), ignore_merges=True,
                 aliases=("llama3", "llama-v3")),
    # Qwen2 / Qwen2.5 / Qwen3: single digits; the HF tokenizer also NFC-normalises,
    # which llama.cpp skips (ids differ only on non-NFC input).
    PreTokenizer("qwen2", _split_then_bytes(_QWEN2_REGEX), normalizer={"type": "NFC"},
                 aliases=("deepseek-r1-qwen",)),
)

_BY_NAME: dict[str, PreTokenizer] = {n: row for row in PRE_TOKENIZERS for n in (row.name, *row.aliases)}


def supported_pre_tokenizers() -> list[str]:
    """The ``tokenizer.ggml.pre`` names this module can translate (aliases included)."""
    return sorted(_BY_NAME)


def pre_tokenizer_by_name(name: str) -> PreTokenizer:
    """Look up a ``tokenizer.ggml.pre`` name; unknown names raise with the supported list."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"GGUF pre-tokenizer {name!r} is not supported",
            hint=f"supported tokenizer.ggml.pre values: {', '.join(supported_pre_tokenizers())}",
        ) from None


def _canonical(obj: Any) -> Any:
    # trim_offsets only changes offsets, never ids; an absent "invert" means false.
    if isinstance(obj, dict):
        out = {k: _canonical(v) for k, v in obj.items() if k != "trim_offsets"}
        if out.get("type") == "Split":
            out.setdefault("invert", False)
        return out
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> PreTokenizer:
    """The table row whose HF ``pre_tokenizer`` matches ``tokenizer_json``'s exactly."""
    found = _canonical(tokenizer_json.get("pre_tokenizer"))
    for row in PRE_TOKENIZERS:
        if _canonical(row.hf) == found:
            return row
    raise UnsupportedArchitecture(
        f"no llama.cpp pre-tokenizer splits text like this tokenizer.json pre_tokenizer: "
        f"{json.dumps(tokenizer_json.get('pre_tokenizer'))[:300]}",
        hint="supported (tokenizer.ggml.pre → family): gpt-2 (GPT-2 ByteLevel), smollm (SmolLM2), "
             "llama-bpe (Llama 3), qwen2 (Qwen2/2.5/3)",
    )


@dataclass
class GGUFVocab:
    """A vocabulary as llama.cpp stores it (``tokenizer.ggml.*`` keys)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    model: str = "gpt2"
    notes: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    """Per-token scores (SentencePiece ``llama`` vocabularies only)."""
    add_space_prefix: bool | None = None
    """SentencePiece: prepend ``▁`` to the text before tokenizing (None: not written)."""

    def special_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


# --------------------------------------------------------------------------------------
# HF → GGUF
# --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc}") from exc


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def read_chat_template(hf_dir: Path) -> str | None:
    """The chat template an artifact exported from ``hf_dir`` carries, checked as the exporter needs.

    Read by the one folder reader (:func:`edgepack.runtime.chat.template.read_chat_template`:
    ``chat_template.jinja``, else ``tokenizer_config.json``, as transformers chooses) and refused
    here, at export, if it is hostile or cannot render a plain chat (:func:`check_chat_template`:
    llama.cpp and transformers will compile it), rather than on the device.
    """
    from edgepack.runtime.chat.check import COMPILERS, check_folder_template

    return check_folder_template(hf_dir, compilers=COMPILERS, strict=True, where="the model")


def check_chat_template(template: str) -> None:
    """Check ``template`` the way every loader does (:mod:`edgepack.runtime.chat.check`).

    The template will be compiled by llama-cpp-python (in the exported GGUF) and by
    transformers (``apply_chat_template``), and rendered by edgepack's bounded sandbox: a
    syntax error raises :class:`InvalidModelFile`; a template that reaches for Python internals
    (``__globals__``, ``__class__`` …, the GGUF template-injection CVEs) or that is a resource
    bomb (nested loops, huge powers or repeats, constant folding that allocates gigabytes)
    raises :class:`UnsafeModelError`; one that cannot render a plain chat (an OverflowError, a
    TypeError) raises :class:`InvalidModelFile`. A template that refuses a chat with its own
    ``raise_exception`` is not a finding.
    """
    from edgepack.runtime.chat.check import check_chat_templates

    check_chat_templates({"chat_template": template}, render="chat_template",
                         compilers=("llama_cpp", "transformers"), strict=True, where="the model")


def _add_bos_from_post_processor(post: dict[str, Any] | None, bos: str | None) -> bool:
    if not post or bos is None:
        return False
    for proc in post.get("processors", [post]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            return first == bos
    return False


def gguf_vocab_from_hf(hf_dir: Path, vocab_size: int | None = None) -> GGUFVocab:
    """Read an HF tokenizer into llama.cpp's vocab form.

    ``vocab_size`` (the model's embedding rows) pads the token list with ``[PAD<i>]``
    UNUSED tokens, as llama.cpp's converter does, so ``token_embd`` and the vocab agree.
    """
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        if (hf_dir / "tokenizer.model").is_file():
            raise UnsupportedArchitecture(
                f"{hf_dir} has only a SentencePiece tokenizer.model; edgepack exports byte-level BPE only",
                hint="use a model with a byte-level BPE tokenizer.json (Llama 3, SmolLM2, Qwen2/3)")
        raise ModelSourceError(f"{hf_dir} has no tokenizer.json",
                               hint="save the tokenizer with a fast tokenizer (tokenizer.save_pretrained)")
    tj = _read_json(tj_path)
    spm = is_sentencepiece_bpe(tj)
    space_prefix = spm_add_space_prefix(tj, tj_path) if spm else None
    pre = "default" if spm else _check_byte_level_bpe(tj, tj_path).name
    model = tj.get("model") or {}
    tokens, types = _token_table(model.get("vocab") or {}, tj.get("added_tokens", []), vocab_size, tj_path)
    seen = {text: i for i, text in enumerate(tokens)}
    merges = _merges(model.get("merges") or [], tj_path)
    scores = spm_scores(tokens, merges) if spm else None
    if spm:
        types = spm_byte_types(tokens, types, TOKEN_BYTE, TOKEN_NORMAL)
    config = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    model_cfg = _read_json(hf_dir / "config.json") if (hf_dir / "config.json").is_file() else {}

    def special(kind: str) -> int | None:
        text = _token_content(config.get(f"{kind}_token"))
        if text is not None:
            if text not in seen:
                raise ModelSourceError(f"{kind}_token {text!r} is not in the vocabulary")
            return seen[text]
        tid = model_cfg.get(f"{kind}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        return tid if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _add_bos_from_post_processor(tj.get("post_processor"), tokens[bos] if bos is not None else None)
    add_eos = config.get("add_eos_token") if isinstance(config.get("add_eos_token"), bool) else False
    return GGUFVocab(
        pre=pre, tokens=tokens, token_types=types, merges=[] if spm else merges,
        bos_id=bos, eos_id=eos, pad_id=special("pad"), unk_id=special("unk"),
        add_bos=add_bos, add_eos=add_eos, chat_template=read_chat_template(hf_dir),
        model="llama" if spm else "gpt2", scores=scores, add_space_prefix=space_prefix,
    )


def _check_byte_level_bpe(tj: dict[str, Any], tj_path: Path) -> PreTokenizer:
    """The pre-tokenizer row of a byte-level BPE ``tokenizer.json``; anything llama.cpp's gpt2
    vocabulary cannot reproduce raises UnsupportedArchitecture."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise UnsupportedArchitecture(
            f"tokenizer model {kind!r} in {tj_path} is not byte-level BPE",
            hint="edgepack converts byte-level BPE tokenizers only (tokenizer.ggml.model = gpt2)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UnsupportedArchitecture(f"BPE option {key}={model[key]!r} has no llama.cpp equivalent")
    decoder = tj.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise UnsupportedArchitecture(f"decoder {decoder.get('type')!r} is not ByteLevel; llama.cpp "
                                      "decodes gpt2 vocabularies byte-level")
    row = detect_pre_tokenizer(tj)
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer != row.normalizer:
        raise UnsupportedArchitecture(f"normalizer {json.dumps(normalizer)[:200]} is not applied by llama.cpp")
    if model.get("ignore_merges") and not row.ignore_merges:
        raise UnsupportedArchitecture(f"tokenizer sets ignore_merges but llama.cpp's {row.name!r} does not")
    return row


def _token_table(vocab: dict[str, int], added_tokens: list[dict[str, Any]], vocab_size: int | None,
                 tj_path: Path) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types by id, padded to ``vocab_size``; texts must be unique."""
    added = {int(t["id"]): t for t in added_tokens}
    size = max([*vocab.values(), *added.keys(), -1]) + 1
    if vocab_size is not None:
        if vocab_size < size:
            raise InvalidModelFile(f"tokenizer has {size} tokens but the model only {vocab_size} embedding rows")
        size = vocab_size
    if min([*vocab.values(), *added.keys(), 0]) < 0:
        raise InvalidModelFile(f"{tj_path} has negative token ids")
    # Ids no token uses are padding, as llama.cpp's converter writes them.
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, TOKEN_NORMAL
    for i, tok in added.items():
        tokens[i] = tok["content"]
        types[i] = TOKEN_CONTROL if tok.get("special") else TOKEN_USER_DEFINED
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in seen:
            raise UnsupportedArchitecture(f"token text {text!r} has ids {seen[text]} and {i}; "
                                          "llama.cpp needs unique token texts")
        seen[text] = i
    return tokens, types


def _merges(raw: list[Any], tj_path: Path) -> list[str]:
    """``tokenizer.json`` merges (``"a b"`` strings or ``["a", "b"]`` pairs) as llama.cpp stores them."""
    merges: list[str] = []
    for m in raw:
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if len(pair) != 2:
            raise InvalidModelFile(f"malformed merge {m!r} in {tj_path}")
        a, b = pair
        if " " in a or " " in b:
            raise UnsupportedArchitecture(f"merge {m!r} contains a space; llama.cpp cannot store it")
        merges.append(f"{a} {b}")
    return merges


def write_gguf_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add ``vocab`` as ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` keys to a GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, tid in (("bos", vocab.bos_id), ("eos", vocab.eos_id),
                      ("pad", vocab.pad_id), ("unk", vocab.unk_id)):
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


# --------------------------------------------------------------------------------------
# GGUF → HF
# --------------------------------------------------------------------------------------

_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                 "tokenizer.ggml.scores")


def read_gguf_vocab(gguf_path: Path) -> GGUFVocab:
    """Read the ``tokenizer.ggml.*`` keys of a GGUF file (its header only, through the bounded
    :func:`~edgepack.gguf_header.read_gguf`)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelSourceError(f"{gguf_path} does not exist")
    info = read_gguf(gguf_path, keep_arrays=_VOCAB_ARRAYS)
    meta = info.metadata
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise UnsupportedArchitecture(
            f"{gguf_path.name}: tokenizer.ggml.model {model!r} is neither byte-level BPE nor SentencePiece",
            hint="edgepack rebuilds HF tokenizers for gpt2 (byte-level BPE) and llama (SentencePiece) vocabularies")
    pre = meta.get("tokenizer.ggml.pre", "default" if model == "llama" else None)
    if not isinstance(pre, str):
        raise UnsupportedArchitecture(f"{gguf_path.name} has no tokenizer.ggml.pre",
                                      hint=f"supported: {', '.join(supported_pre_tokenizers())}")
    tokens = info.array("tokenizer.ggml.tokens") or []
    types = info.array("tokenizer.ggml.token_type")
    types = [TOKEN_NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    merges = info.array("tokenizer.ggml.merges") or []
    if not tokens or len(types) != len(tokens) or not all(isinstance(t, str) for t in (*tokens, *merges)):
        raise InvalidModelFile(f"{gguf_path.name}: token list and token types disagree or are empty")
    scores = info.array("tokenizer.ggml.scores")
    if model == "llama" and (scores is None or len(scores) != len(tokens)):
        raise InvalidModelFile(f"{gguf_path.name}: a SentencePiece vocab needs one score per token")

    def tid(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens) else None

    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise InvalidModelFile(f"{gguf_path.name}: tokenizer.chat_template holds a {type(template).__name__}, "
                               "not a template string")
    return GGUFVocab(
        pre=pre, tokens=list(tokens), token_types=types, merges=list(merges),
        bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
        pad_id=tid("padding_token_id"), unk_id=tid("unknown_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=template, model=model,
        scores=[float(x) for x in scores] if model == "llama" and scores is not None else None,
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)) if model == "llama" else None,
    )


def _bos_template(vocab: GGUFVocab) -> dict[str, Any] | None:
    """A post-processor that prepends BOS when the GGUF asks for it (None when it does not)."""
    if not vocab.add_bos or vocab.bos_id is None:
        return None
    bos = vocab.tokens[vocab.bos_id]
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [vocab.bos_id], "tokens": [bos]}},
    }


def tokenizer_json_from_vocab(vocab: GGUFVocab) -> dict[str, Any]:
    """The HF ``tokenizer.json`` object equivalent to a GGUF vocab (byte-level BPE or SentencePiece)."""
    if vocab.model == "llama":
        assert vocab.scores is not None
        added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
                 for i, (text, t) in enumerate(zip(vocab.tokens, vocab.token_types))
                 if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
        tj = spm_tokenizer_json(vocab.tokens, vocab.scores, vocab.token_types, bool(vocab.add_space_prefix),
                                added, vocab.special_text(vocab.unk_id), (TOKEN_NORMAL,))
        tj["post_processor"] = _bos_template(vocab)
        return tj
    row = pre_tokenizer_by_name(vocab.pre)
    index: dict[str, int] = {}
    for i, text in enumerate(vocab.tokens):
        if text in index:
            raise InvalidModelFile(f"token text {text!r} has ids {index[text]} and {i}")
        index[text] = i
    merges = []
    for m in vocab.merges:
        pos = m.find(" ", 1)  # llama.cpp splits at the first space after position 0
        if pos < 0:
            raise InvalidModelFile(f"malformed merge {m!r}")
        merges.append([m[:pos], m[pos + 1:]])
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
        for i, (text, t) in enumerate(zip(vocab.tokens, vocab.token_types))
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
    ]
    byte_level_post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    bos_post = _bos_template(vocab)
    post: dict[str, Any] = byte_level_post if bos_post is None else \
        {"type": "Sequence", "processors": [byte_level_post, bos_post]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": row.normalizer, "pre_tokenizer": row.hf, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": row.ignore_merges, "vocab": index, "merges": merges},
    }


def hf_tokenizer_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Rebuild the HF fast tokenizer of a byte-level BPE GGUF and save it into ``out_dir``.

    bos/eos/pad/unk come from the GGUF ids, ``add_bos_token`` from
    ``tokenizer.ggml.add_bos_token`` (baked into the post-processor, since
    ``PreTrainedTokenizerFast`` ignores the flag), the chat template from
    ``tokenizer.chat_template``. CONTROL tokens become special added tokens,
    USER_DEFINED ones non-special added tokens, so ``special=True`` tokenization in
    llama.cpp and HF ``encode`` split the same strings out.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    if vocab.chat_template is not None:
        check_chat_template(vocab.chat_template)
    tok = Tokenizer.from_str(json.dumps(tokenizer_json_from_vocab(vocab)))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=vocab.special_text(vocab.bos_id), eos_token=vocab.special_text(vocab.eos_id),
        pad_token=vocab.special_text(vocab.pad_id), unk_token=vocab.special_text(vocab.unk_id),
        add_bos_token=vocab.add_bos, add_eos_token=vocab.add_eos,
        clean_up_tokenization_spaces=False,
    )
    if vocab.chat_template is not None:
        fast.chat_template = vocab.chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
