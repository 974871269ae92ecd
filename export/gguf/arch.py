"""Architectures the GGUF exporter knows, registered by the exact HF ``architectures[0]``.

Each architecture is a small class: the llama.cpp architecture name it becomes, whether
Q/K weights need llama.cpp's RoPE permutation, the hyperparameters it writes, and the
tensors every block must have. :func:`register` is the decorator (as llama.cpp's
``convert_hf_to_gguf.py`` registers one class per HF model class); :func:`arch_for_config`
resolves a ``config.json`` before any weight is read and raises
:class:`~edgepack.errors.UnsupportedArchitecture` listing what is supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgepack.errors import InvalidModelFile, UnsupportedArchitecture

if TYPE_CHECKING:
    import torch

ARCHITECTURES: dict[str, type[Arch]] = {}


def register(*hf_names: str) -> Callable[[type[Arch]], type[Arch]]:
    """Class decorator: make ``cls`` the exporter for each HF architecture name."""

    def wrap(cls: type[Arch]) -> type[Arch]:
        for name in hf_names:
            if name in ARCHITECTURES:
                raise ValueError(f"architecture {name} registered twice")
            ARCHITECTURES[name] = cls
        return cls

    return wrap


def arch_for_config(config: dict[str, Any]) -> Arch:
    """The registered exporter for ``config["architectures"][0]``."""
    archs = config.get("architectures") or []
    name = archs[0] if archs else None
    cls = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnsupportedArchitecture(
            f"architecture {name!r} is not supported by the GGUF exporter",
            hint=f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return cls(config)


def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's "llama" graph applies RoPE to interleaved pairs (GPT-J style); HF Llama
    # rotates halves. Reorder each head's rows from [x0..x_{d/2-1}, y0..] to [x0, y0, x1, y1, ...],
    # exactly LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py.
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


class Arch:
    """Base exporter: Llama-shaped decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    gguf_arch: str = "llama"
    permute_qk: bool = False
    activation: tuple[str, str] = ("hidden_act", "silu")
    """(config key, the one value llama.cpp's graph for this architecture computes)."""
    tied_by_default: bool = False
    """``tie_word_embeddings`` when config.json omits it (the HF config class's default)."""
    block_tensors: tuple[str, ...] = (
        "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
        "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    )

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        try:
            self.n_layer = int(config["num_hidden_layers"])
            self.n_embd = int(config["hidden_size"])
            self.n_head = int(config["num_attention_heads"])
            self.n_ff = int(config["intermediate_size"])
            self.n_vocab = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidModelFile(f"config.json lacks a required field: {exc}") from exc
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        self.tied = bool(config.get("tie_word_embeddings", self.tied_by_default))
        key, want = self.activation
        act = config.get(key, want)
        if act != want:
            raise UnsupportedArchitecture(f"{key} {act!r}: llama.cpp's {self.gguf_arch} graph uses {want}")

    @property
    def hf_name(self) -> str:
        return self.config["architectures"][0]

    def rope_theta(self) -> float:
        rp = self.config.get("rope_parameters") or {}
        return float(self.config.get("rope_theta") or rp.get("rope_theta") or 10000.0)

    def rope_scaling(self) -> dict[str, Any] | None:
        rs = self.config.get("rope_scaling") or None
        if rs and (rs.get("rope_type") or rs.get("type")) == "default":
            return None
        return rs

    def write_hparams(self, writer: Any) -> None:
        """Add ``<arch>.*`` hyperparameter keys to a GGUFWriter."""
        import gguf

        writer.add_context_length(int(self.config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_freq_base(self.rope_theta())
        writer.add_layer_norm_rms_eps(float(self.config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(self.n_vocab)
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim != self.n_embd // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        rs = self.rope_scaling()
        if rs is None:
            return
        kind = rs.get("rope_type") or rs.get("type")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rs["factor"]))
        elif kind == "llama3" and self.gguf_arch == "llama":
            pass  # expressed as the rope_freqs.weight tensor, see extra_tensors()
        else:
            raise UnsupportedArchitecture(f"rope_scaling type {kind!r} is not supported for {self.hf_name}",
                                          hint="supported rope_scaling: none, linear, llama3 (Llama)")

    def required_tensors(self) -> set[str]:
        names = {"token_embd.weight", "output_norm.weight"}
        if not self.tied:
            names.add("output.weight")
        for b in range(self.n_layer):
            names.update(f"blk.{b}.{t}" for t in self.block_tensors)
        return names

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Rewrite a tensor into llama.cpp's layout (the Q/K permutation for Llama)."""
        if self.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                return _permute(tensor, self.n_head)
            if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                return _permute(tensor, self.n_head_kv)
        return tensor

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold (none by default)."""
        return {}


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaArch(Arch):
    """Llama 1–3, SmolLM/SmolLM2 and Mistral (llama.cpp converts Mistral as ``llama``;
    Mistral's sliding window is ignored there, which is exact up to ``sliding_window`` tokens)."""

    gguf_arch = "llama"
    permute_qk = True

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        rs = self.rope_scaling()
        if not rs or (rs.get("rope_type") or rs.get("type")) != "llama3":
            return {}
        import torch

        # Llama 3.1 frequency smoothing as per-dimension factors, as convert_hf_to_gguf.py does.
        dim, base = self.head_dim, self.rope_theta()
        factor = float(rs.get("factor", 8.0))
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        factors = []
        for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
            wavelen = 2 * math.pi / float(freq)
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


@register("Qwen2ForCausalLM")
class Qwen2Arch(Arch):
    """Qwen2 / Qwen2.5: NeoX-style RoPE (no permutation), biases on q/k/v."""

    gguf_arch = "qwen2"
    block_tensors = (*Arch.block_tensors, "attn_q.bias", "attn_k.bias", "attn_v.bias")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if config.get("use_sliding_window"):
            raise UnsupportedArchitecture("Qwen2 with use_sliding_window=true is not supported")


@register("Qwen3ForCausalLM")
class Qwen3Arch(Arch):
    """Qwen3 (dense): NeoX-style RoPE, RMSNorm on q and k per head, explicit head_dim."""

    gguf_arch = "qwen3"
    block_tensors = (*Arch.block_tensors, "attn_q_norm.weight", "attn_k_norm.weight")


@register("Gemma3ForCausalLM")
class Gemma3Arch(Arch):
    """Gemma 3 text (270M/1B; the text tower of the larger ones is ``Gemma3ForConditionalGeneration``).

    As llama.cpp's ``Gemma3Model``: NeoX RoPE (no permutation), q/k RMSNorm, four norms per
    block, tied embeddings. llama.cpp itself scales the embedding by sqrt(hidden), uses
    sliding-window attention on five layers of every six with RoPE base 10000 there, and the
    config's ``rope_theta`` on the sixth; a config it would compute differently is refused.
    """

    gguf_arch = "gemma3"
    tied_by_default = True
    activation = ("hidden_activation", "gelu_pytorch_tanh")
    block_tensors = (*Arch.block_tensors, "attn_q_norm.weight", "attn_k_norm.weight",
                     "post_attention_norm.weight", "post_ffw_norm.weight")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.n_swa = int(config.get("sliding_window") or 0)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                raise UnsupportedArchitecture(f"Gemma 3 with {key}={config[key]}: llama.cpp's gemma3 graph has no softcapping")
        # llama.cpp's gemma3 graph fixes these (llama-model.cpp, LLM_ARCH_GEMMA3): pattern 6,
        # local base 10000, and Q scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 27B).
        scalar = float(config.get("query_pre_attn_scalar") or self.head_dim)
        wanted = self.n_embd // self.n_head if self.n_layer == 62 else self.head_dim
        problems = []
        if scalar != wanted:
            problems.append(f"query_pre_attn_scalar {scalar:g} (llama.cpp uses {wanted})")
        if float(config.get("rope_local_base_freq") or 10000.0) != 10000.0:
            problems.append(f"rope_local_base_freq {config['rope_local_base_freq']} (llama.cpp uses 10000)")
        pattern = ["full_attention" if self.n_swa == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                   for i in range(self.n_layer)]
        if config.get("layer_types") and list(config["layer_types"]) != pattern:
            problems.append("layer_types is not sliding on five layers of every six")
        if problems:
            raise UnsupportedArchitecture(f"Gemma 3 config differs from llama.cpp's gemma3 graph: {'; '.join(problems)}")

    def rope_theta(self) -> float:
        return float(self.config.get("rope_theta") or 1_000_000.0)

    def write_hparams(self, writer: Any) -> None:
        super().write_hparams(writer)  # linear rope_scaling there applies to the global layers only
        if self.head_dim == self.n_embd // self.n_head:  # convert_hf_to_gguf.py always writes them for gemma3
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_sliding_window(self.n_swa)

    def transform(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Gemma3RMSNorm computes x * (1 + w); llama.cpp's RMSNorm computes x * w, so the
        # converter stores w + 1 (norm_shift in convert_hf_to_gguf.py), in F32.
        if hf_name.endswith("norm.weight"):
            import torch

            return tensor.to(torch.float32) + 1.0
        return tensor


@register("Phi3ForCausalLM")
class Phi3Arch(Arch):
    """Phi-3 / Phi-3.5-mini and Phi-4-mini: fused ``qkv_proj`` (``attn_qkv``) and ``gate_up_proj``
    (``ffn_up``, which llama.cpp's phi3 graph splits itself), NeoX RoPE, optional partial
    rotary and LongRoPE factors as the ``rope_factors_long/short`` tensors (as
    ``Phi3MiniModel`` in llama.cpp's converter). llama.cpp ignores Phi's sliding window."""

    gguf_arch = "phi3"
    block_tensors = ("attn_norm.weight", "attn_qkv.weight", "attn_output.weight",
                     "ffn_norm.weight", "ffn_up.weight", "ffn_down.weight")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.rope_dims = int(float(config.get("partial_rotary_factor") or 1.0) * self.n_embd) // self.n_head
        self.orig_ctx = int(config.get("original_max_position_embeddings")
                            or config.get("max_position_embeddings", 4096))
        rs = self.rope_scaling()
        if rs is not None and (rs.get("rope_type") or rs.get("type")) not in ("longrope", "su"):
            raise UnsupportedArchitecture(f"Phi-3 rope_scaling type {rs.get('rope_type') or rs.get('type')!r}",
                                          hint="supported rope_scaling: none, longrope")
        if rs is not None and not (len(rs.get("long_factor") or []) == len(rs.get("short_factor") or [])
                                   == self.rope_dims // 2):
            raise InvalidModelFile(f"rope_scaling long_factor/short_factor must each have {self.rope_dims // 2} values")

    def write_hparams(self, writer: Any) -> None:
        cfg = self.config
        writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
        writer.add_rope_scaling_orig_ctx_len(self.orig_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_block_count(self.n_layer)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
        writer.add_rope_dimension_count(self.rope_dims)
        writer.add_rope_freq_base(self.rope_theta())
        writer.add_vocab_size(self.n_vocab)
        writer.add_sliding_window(int(cfg.get("sliding_window") or 0))  # 0 marks Phi-4 in llama.cpp
        if self.rope_scaling() is not None:
            scale = int(cfg.get("max_position_embeddings", 4096)) / self.orig_ctx
            # LongRoPE's attention factor, as HF's _compute_longrope_parameters and llama.cpp.
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(self.orig_ctx)) if scale > 1.0 else 1.0)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        rs = self.rope_scaling()
        if rs is None:
            return {}
        import torch

        return {"rope_factors_long.weight": torch.tensor(rs["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rs["short_factor"], dtype=torch.float32)}
