"""Helpers for exporter tests: tiny random-init models of every registered architecture.

Each builder saves a 2-layer, hidden-64 HF dir (safetensors + the tiny byte-level BPE
tokenizer of ``tiny_llama_dir``), so conversions take well under a second.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# A fixed string set for tokenizer agreement: unicode, whitespace runs, digit runs,
# contractions, newlines, ChatML specials.
TOKENIZER_STRINGS = [
    "Pump P-101 discharge pressure low alarm, motor current normal.",
    "  two  spaces   and\ttabs\n\nnewlines\r\nend",
    "1234567 and 3.14159, 1,000,000 and 0042",
    "Über-Temperatur 日本語 ñ x² — 🙂 emoji",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'LL we've they'RE",
    "a\n\n\n  b   \n",
    "    indented():\n        return 42",
    "<|endoftext|>x<|im_end|>",
    " ",
    "\n",
]

PROMPTS = [
    "Pump P-101 discharge pressure low alarm",
    "<|im_start|>user\nCompressor C-12 tripped on high vibration<|im_end|>\n<|im_start|>assistant\n",
    "Category: electrical\nAction: Check the motor starter 1234567",
]


def _save_model(model_cls: Any, config: Any, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # widen random init so top-1 comparisons are meaningful (as tests/tiny.py)
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms and biases
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# TOKENIZER_STRINGS with Gemma's turn markers for ChatML's (llama.cpp makes any token spelt
# <|im_end|> a control token, so a SentencePiece vocab must not learn it as text).
SPM_STRINGS = [s for s in TOKENIZER_STRINGS if "<|" not in s] + [
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "Straße ø 中文 🚀 bytes the vocabulary never saw", "<bos>x<eos>",
]
SPM_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_spm_tokenizer(out: Path, *, space_prefix: bool) -> Path:
    """A SentencePiece-style tokenizer.json (BPE + byte fallback, spaces as ▁) trained on the test
    strings: Gemma's form (``space_prefix=False``) or Llama 2 / Phi-3's (a ``▁`` prepended).
    Specials first, then the 256 ``<0xXX>`` byte tokens, then the learned pieces (Gemma's order)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    norm = [normalizers.Replace(" ", "\u2581")]
    if space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    learner = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    learner.normalizer = normalizers.Sequence(norm) if space_prefix else norm[0]
    # Pieces are learned within words (as SentencePiece does), the tokenizer then has no pre-tokenizer.
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    corpus = [*SPM_STRINGS, *PROMPTS[::2]] * 3 + ["the pump the motor the valve alarm alarm pressure"] * 5
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[], show_progress=False))
    tj = json.loads(learner.to_str())
    pieces = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    order = [*SPM_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *(p for p in pieces if p not in SPM_SPECIALS)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(order))}
    # Merges as transformers' SentencePiece converter writes them: every split of every piece
    # into two pieces, pieces in score order (here: learned order), splits by (left id, right id).
    merges = [[a, b] for piece in pieces
              for a, b in sorted(((piece[:i], piece[i:]) for i in range(1, len(piece))
                                  if piece[:i] in vocab and piece[i:] in vocab),
                                 key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
    tj["model"]["vocab"], tj["model"]["merges"] = vocab, merges
    tj["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": True} for i, t in enumerate(SPM_SPECIALS)]
    tj["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(tj))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=list(SPM_SPECIALS[4:]),
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = SPM_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def _common(tok_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def build_llama_untied(tok_dir: Path, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_common(tok_dir), tie_word_embeddings=False, rope_theta=50000.0,
                      architectures=["LlamaForCausalLM"])
    return _save_model(LlamaForCausalLM, cfg, tok_dir, out, seed=1)


def build_llama3_rope(tok_dir: Path, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_common(tok_dir), tie_word_embeddings=True, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                      architectures=["LlamaForCausalLM"])
    return _save_model(LlamaForCausalLM, cfg, tok_dir, out, seed=2)


def build_mistral(tok_dir: Path, out: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_common(tok_dir), tie_word_embeddings=False, sliding_window=4096,
                        architectures=["MistralForCausalLM"])
    return _save_model(MistralForCausalLM, cfg, tok_dir, out, seed=3)


def build_qwen2(tok_dir: Path, out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_common(tok_dir), tie_word_embeddings=True, rope_theta=1000000.0,
                      architectures=["Qwen2ForCausalLM"])
    return _save_model(Qwen2ForCausalLM, cfg, tok_dir, out, seed=4)


def build_qwen3(tok_dir: Path, out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 with 4 heads: q_proj is 128 wide, unlike hidden 64 (exercises key_length).
    cfg = Qwen3Config(**_common(tok_dir), head_dim=32, tie_word_embeddings=True,
                      architectures=["Qwen3ForCausalLM"])
    return _save_model(Qwen3ForCausalLM, cfg, tok_dir, out, seed=5)


def build_gemma3(tok_dir: Path, out: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Six layers so that one is global (llama.cpp's pattern: five sliding, then one full) and a
    # window of 8 that the test prompts exceed; Q scaled by 1/sqrt(head_dim) as llama.cpp does.
    cfg = Gemma3TextConfig(**{**_common(tok_dir), "num_hidden_layers": 6}, head_dim=16,
                           query_pre_attn_scalar=16, sliding_window=8, rope_theta=1000000.0,
                           rope_local_base_freq=10000.0, tie_word_embeddings=True,
                           architectures=["Gemma3ForCausalLM"])
    return _save_model(Gemma3ForCausalLM, cfg, tok_dir, out, seed=6)


def build_phi3(tok_dir: Path, out: Path) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**_common(tok_dir), tie_word_embeddings=False, rope_theta=10000.0,
                     original_max_position_embeddings=512, architectures=["Phi3ForCausalLM"])
    return _save_model(Phi3ForCausalLM, cfg, tok_dir, out, seed=7)


def build_phi3_longrope(tok_dir: Path, out: Path) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi-3.5-mini's long-context shape: LongRoPE factors, partial rotary, 2x the original
    # context (the short factors apply below original_max_position_embeddings in both runtimes).
    common = {**_common(tok_dir), "max_position_embeddings": 1024}
    half = int(0.75 * 64) // 4 // 2
    cfg = Phi3Config(**common, tie_word_embeddings=False, partial_rotary_factor=0.75,
                     original_max_position_embeddings=512,
                     rope_scaling={"type": "longrope", "long_factor": [1.0 + i for i in range(half)],
                                   "short_factor": [1.0 + 0.25 * i for i in range(half)]},
                     architectures=["Phi3ForCausalLM"])
    return _save_model(Phi3ForCausalLM, cfg, tok_dir, out, seed=8)


# One builder per registered HF architecture (test_convert checks this covers the registry);
# extra variants exercise options of an architecture already covered.
ARCH_BUILDERS: dict[str, Callable[[Path, Path], Path]] = {
    "MistralForCausalLM": build_mistral,
    "Qwen2ForCausalLM": build_qwen2,
    "Qwen3ForCausalLM": build_qwen3,
    "Gemma3ForCausalLM": build_gemma3,
    "Phi3ForCausalLM": build_phi3,
}
VARIANT_BUILDERS: dict[str, Callable[[Path, Path], Path]] = {
    "llama-untied": build_llama_untied,
    "llama-llama3-rope": build_llama3_rope,
    "phi3-longrope": build_phi3_longrope,
}


def hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(gguf_path: Path, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def no_leftovers(folder: Path) -> list[str]:
    """Names of interrupted-write leftovers (``*.part-*`` / ``*.tmp-*``) in ``folder``."""
    return [p.name for p in Path(folder).iterdir() if ".part-" in p.name or ".tmp-" in p.name]


def make_lora_adapter(base_dir: Path, out: Path, targets: list[str], seed: int = 0) -> Path:
    """Save a rank-4 LoRA adapter for ``base_dir`` with random (non-zero) lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make the adapter actually change the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def encode(hf_dir: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the HF tokenizer of ``hf_dir`` (no BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir).encode(text, add_special_tokens=False)


def rewrite_tensor(path: Path, name: str, value: float) -> None:
    """Set the first element of an F32 tensor in a safetensors file, in place."""
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    start = 8 + header_len + header[name]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
