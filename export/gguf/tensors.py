"""HF → GGUF tensor names, as one table.

Each row maps an HF state-dict name template to llama.cpp's GGUF name and lists the
GGUF architectures that carry the tensor (the same names as gguf-py's
``tensor_mapping.py``; ``{bid}`` is the block index). A checkpoint tensor that matches no
row for its architecture is an error, never silently dropped, except rows whose GGUF
name is ``None`` (buffers that older checkpoints saved and llama.cpp recomputes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgepack.errors import UnsupportedArchitecture

_ALL = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
_SPLIT = ("llama", "qwen2", "qwen3", "gemma3")  # separate q/k/v and gate/up projections
_NOT_GEMMA = ("llama", "qwen2", "qwen3", "phi3")

# (HF template, GGUF template, GGUF architectures that have it)
TENSOR_NAMES: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight", _ALL),                       # every family
    ("model.norm.weight", "output_norm.weight", _ALL),                              # every family
    ("lm_head.weight", "output.weight", _ALL),                                      # untied heads only
    ("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", _ALL),
    ("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", _SPLIT),
    ("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", _SPLIT),
    ("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", _SPLIT),
    ("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", _ALL),
    ("model.layers.{bid}.self_attn.q_proj.bias", "blk.{bid}.attn_q.bias", ("qwen2", "llama")),  # Qwen2; Llama attention_bias
    ("model.layers.{bid}.self_attn.k_proj.bias", "blk.{bid}.attn_k.bias", ("qwen2", "llama")),  # Qwen2; Llama attention_bias
    ("model.layers.{bid}.self_attn.v_proj.bias", "blk.{bid}.attn_v.bias", ("qwen2", "llama")),  # Qwen2; Llama attention_bias
    ("model.layers.{bid}.self_attn.o_proj.bias", "blk.{bid}.attn_output.bias", ("llama",)),      # Llama attention_bias
    ("model.layers.{bid}.self_attn.q_norm.weight", "blk.{bid}.attn_q_norm.weight", ("qwen3", "gemma3")),  # QK-norm
    ("model.layers.{bid}.self_attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight", ("qwen3", "gemma3")),  # QK-norm
    ("model.layers.{bid}.self_attn.qkv_proj.weight", "blk.{bid}.attn_qkv.weight", ("phi3",)),    # Phi-3 fused q|k|v
    ("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", _NOT_GEMMA),
    # Gemma 3 normalises after attention and before and after the MLP (sandwich norms)
    ("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.post_attention_norm.weight", ("gemma3",)),
    ("model.layers.{bid}.pre_feedforward_layernorm.weight", "blk.{bid}.ffn_norm.weight", ("gemma3",)),
    ("model.layers.{bid}.post_feedforward_layernorm.weight", "blk.{bid}.post_ffw_norm.weight", ("gemma3",)),
    ("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", _SPLIT),
    ("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", _SPLIT),
    ("model.layers.{bid}.mlp.gate_up_proj.weight", "blk.{bid}.ffn_up.weight", ("phi3",)),        # Phi-3 fused gate|up
    ("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", _ALL),
    ("model.layers.{bid}.self_attn.rotary_emb.inv_freq", None, _ALL),               # old Llama checkpoints: recomputed
)


@dataclass(frozen=True)
class _Row:
    pattern: re.Pattern[str]
    gguf: str | None
    archs: tuple[str, ...]


_ROWS = tuple(
    _Row(re.compile("^" + re.escape(hf).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$"), gguf, archs)
    for hf, gguf, archs in TENSOR_NAMES
)


def gguf_tensor_name(hf_name: str, gguf_arch: str) -> str | None:
    """The GGUF name of ``hf_name``; ``None`` for buffers that are skipped on purpose.

    Raises :class:`UnsupportedArchitecture` for a tensor the table has no row for.
    """
    for row in _ROWS:
        m = row.pattern.match(hf_name)
        if m and gguf_arch in row.archs:
            if row.gguf is None:
                return None
            return row.gguf.replace("{bid}", m.group("bid")) if "bid" in m.groupdict() else row.gguf
    raise UnsupportedArchitecture(
        f"tensor {hf_name!r} has no GGUF name for llama.cpp architecture {gguf_arch!r}",
        hint="the checkpoint has a layer the exporter does not know; add a row to export/gguf/tensors.py",
    )
