"""Width pruning: remove the MLP channels that matter least (after depth pruning, optional).

A channel *c* of a gated MLP (``down(act(gate(x)) * up(x))``) is ranked by its activation
magnitude on calibration tokens — the mean of ``|act(gate(x))_c * up(x)_c|`` — times the
norm of the ``down`` column it feeds, i.e. how much it moves the block's output on real
text (Minitron ranks MLP neurons by activation magnitude). Every block keeps the same number
of channels (HF configs have one ``intermediate_size``), rounded to a multiple of
:data:`CHANNEL_MULTIPLE` so the rows of ``down`` stay whole quantization blocks in GGUF and
ONNX. The kept channel indices are recorded, so the undistilled student is rebuilt exactly.

Supported MLPs are registered by the exact HF architecture name (the projection names).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from edgepack.errors import UsageError

CHANNEL_MULTIPLE = 32
# HF architectures[0] → (gate, up, down) projection attribute names of ``layer.mlp``; gate ==
# up names a fused projection whose output rows are [gate; up] (each intermediate_size long).
GATED_MLPS: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("gate_proj", "up_proj", "down_proj"),    # Llama family, SmolLM2
    "MistralForCausalLM": ("gate_proj", "up_proj", "down_proj"),
    "Qwen2ForCausalLM": ("gate_proj", "up_proj", "down_proj"),    # Qwen2 / Qwen2.5
    "Qwen3ForCausalLM": ("gate_proj", "up_proj", "down_proj"),
    "Gemma3ForCausalLM": ("gate_proj", "up_proj", "down_proj"),   # Gemma 3 text (GELU-tanh gate)
    "Phi3ForCausalLM": ("gate_up_proj", "gate_up_proj", "down_proj"),  # Phi-3: one fused [gate; up] Linear
}


def _projections(model: Any) -> tuple[str, str, str]:
    arch = type(model).__name__
    if arch not in GATED_MLPS:
        raise UsageError(f"width pruning does not support {arch}", hint=f"supported: {', '.join(GATED_MLPS)}; "
                                                                        "or train without --mlp-keep")
    return GATED_MLPS[arch]


def channel_importance(model: Any, tokenizer: Any, texts: Sequence[str | Sequence[int]],
                       max_length: int = 256) -> list[Any]:
    """Per block, a [intermediate] tensor: mean |input of down| over real tokens × the down column norm."""
    import torch

    from edgepack.distill.student import calibration_ids, decoder_layers

    _, _, down_name = _projections(model)
    _, layers = decoder_layers(model)
    if not texts:
        raise UsageError("width pruning needs at least one calibration text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = calibration_ids(tokenizer, texts, max_length)
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in enc])
    sums = [torch.zeros(getattr(layer.mlp, down_name).in_features) for layer in layers]

    def hook(i: int) -> Any:
        def record(_mod: Any, args: tuple[Any, ...]) -> None:
            sums[i] += (args[0].float().abs() * mask[..., None]).sum(dim=(0, 1))
        return record

    handles = [getattr(layer.mlp, down_name).register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = float(mask.sum())
    return [s / n * getattr(layer.mlp, down_name).weight.detach().float().norm(dim=0)
            for s, layer in zip(sums, layers)]


def channels_to_keep(importance: Sequence[Any], fraction: float) -> list[list[int]]:
    """The most important ``fraction`` of each block's channels (sorted indices), a multiple of CHANNEL_MULTIPLE."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--mlp-keep must be in (0, 1] (got {fraction})")
    total = int(importance[0].numel())
    k = max(CHANNEL_MULTIPLE, round(fraction * total / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE)
    k = min(k, total)
    return [sorted(int(i) for i in imp.topk(k).indices) for imp in importance]


def prune_mlp(model: Any, keep: Sequence[Sequence[int]]) -> Any:
    """A new model with only the ``keep[i]`` MLP channels of block ``i`` (same count in every block)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import decoder_layers

    gate_name, up_name, down_name = _projections(model)
    prefix, layers = decoder_layers(model)
    sizes = {len(k) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise UsageError(f"width pruning needs one equal-sized channel list per block ({len(layers)} blocks)")
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = sizes.pop()
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = model.state_dict()
    index = [torch.tensor(list(k), dtype=torch.long) for k in keep]
    if gate_name == up_name:  # fused: keep channel c's gate row c and its up row c + intermediate
        width = model.config.intermediate_size
        index = [torch.cat([ix, ix + width]) for ix in index]
    for i in range(len(layers)):
        base = f"{prefix}.{i}.mlp."
        for name in dict.fromkeys((gate_name, up_name)):
            state[f"{base}{name}.weight"] = state[f"{base}{name}.weight"][index[i]]
            if f"{base}{name}.bias" in state:
                state[f"{base}{name}.bias"] = state[f"{base}{name}.bias"][index[i]]
        state[f"{base}{down_name}.weight"] = state[f"{base}{down_name}.weight"][:, index[i][:len(keep[i])]]
    with torch.no_grad():
        pruned.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned
