"""bench/scale's model sizes: SmolLM2-width Llama shapes, their parameter counts and HF configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """A Llama shape at SmolLM2's widths (vocab and tied embeddings come with the tokenizer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    reference: str
    """The released model whose widths these are."""


SIZES: dict[str, Shape] = {
    "135m": Shape(576, 30, 9, 3, 1536, "SmolLM2-135M"),
    "360m": Shape(960, 32, 15, 5, 2560, "SmolLM2-360M"),
    # SmolLM2-1.7B's width with 14 of its 24 layers: about 1.0B parameters.
    "1b": Shape(2048, 14, 32, 32, 8192, "SmolLM2-1.7B width, 14 layers"),
}
# A tiny shape for the script's own test (tests/bench/test_scale.py); not in the plots.
TEST_SIZES: dict[str, Shape] = {"tiny": Shape(64, 2, 4, 2, 128, "test only")}


def parse_sizes(text: str, known: dict[str, Shape]) -> list[str]:
    """``135m,360m,1b`` → names in SIZES; ValueError naming the unknown ones and the known ones."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"unknown size(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return names


def param_count(shape: Shape, vocab: int) -> int:
    """Parameters of a Llama with tied embeddings (no biases): embedding + per-layer + final norm."""
    head_dim = shape.hidden // shape.heads
    attn = shape.hidden * shape.heads * head_dim * 2 + shape.hidden * shape.kv_heads * head_dim * 2
    mlp = 3 * shape.hidden * shape.intermediate
    norms = 2 * shape.hidden
    return vocab * shape.hidden + shape.layers * (attn + mlp + norms) + shape.hidden


def llama_config(shape: Shape, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a SmolLM2 config.json: vocab, special ids, rope) with ``shape``'s widths."""
    return {**base, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "intermediate_size": shape.intermediate, "head_dim": shape.hidden // shape.heads,
            "tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "_model_name_or_path": f"random-init {shape.reference}"}
