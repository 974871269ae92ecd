"""The student: the teacher with its least important decoder blocks removed (depth pruning).

Block importance is the "block influence" of ShortGPT (Men et al., 2024): one minus the
cosine similarity between a block's input and output hidden states, averaged over the
tokens of a few calibration texts. A block that barely changes its input is cheap to drop.
The first and last blocks are always kept; the rest are ranked by importance. Weights are
copied, not re-initialized, so the student starts close to the teacher and KD only has to
repair the gap.

Works for any HF causal LM whose decoder exposes ``.layers`` (Llama, Qwen2, Mistral,
SmolLM, ...): the student config is the teacher's with ``num_hidden_layers`` (and the
per-layer lists in :data:`PER_LAYER_CONFIG_KEYS`) cut down.

Sizing for a profile (:func:`choose_num_layers`): the largest block count whose parameters
are at most ``MAX_PARAM_FRACTION`` of the teacher's and whose estimated deploy memory fits
the profile's ``memory_budget_mb``. The estimate (:func:`estimate_deploy_mb`, which asks the one
estimator in ``edgepack/memory.py``) is the weights as the profile's first (preferred) format and
quantization store them, the KV cache at ``context_length`` and the format's runtime
allowance; the gate measures the real number later.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import BudgetError, UsageError
from edgepack.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    import torch

    from edgepack.profiles import Profile

MAX_PARAM_FRACTION = 0.6
# Config entries that hold one value per decoder layer (sliced like the layers).
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "mlp_only_layers")


def decoder_layers(model: Any) -> tuple[str, Any]:
    """The decoder's block list and its state-dict prefix (e.g. ``model.layers``)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UsageError(f"{type(model).__name__} has no decoder `.layers`; cannot depth-prune it",
                         hint="pass --student with an HF folder instead of auto")
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    return prefix, layers


def count_params(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def layer_params(model: Any) -> tuple[int, list[int]]:
    """(parameters outside the blocks, parameters of each block)."""
    _, layers = decoder_layers(model)
    per = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return count_params(model) - sum(per), per


def estimate_deploy_mb(n_params: int, n_layers: int, config: Any, profile: Profile) -> float:
    """Deploy memory (MiB) of a student with this many parameters and blocks, at the profile's
    preferred (first) format and quantization and its context length: the one estimator's
    prediction (``edgepack.memory.predict_memory``, the format's ``predict_memory`` part)."""
    from edgepack.memory import predict_memory
    from edgepack.profiles.fit import shape_from_config

    cfg = {**config.to_dict(), "num_hidden_layers": n_layers}
    choice = profile.choices[0]
    est = predict_memory(choice.format, shape_from_config(cfg, params=n_params), choice.quant, profile.context_length)
    return est.total_bytes / 2**20


def choose_num_layers(teacher: Any, profile: Profile, max_fraction: float = MAX_PARAM_FRACTION) -> dict[str, Any]:
    """The largest block count that meets the parameter and memory budgets (see module doc)."""
    rest, per = layer_params(teacher)
    total = rest + sum(per)
    avg = sum(per) / len(per)
    for k in range(len(per) - 1, 0, -1):
        params = int(rest + k * avg)
        mem = estimate_deploy_mb(params, k, teacher.config, profile)
        if params <= max_fraction * total and mem <= profile.memory_budget_mb:
            return {"num_layers": k, "params_estimate": params, "teacher_params": total,
                    "deploy_mb_estimate": round(mem, 1), "max_param_fraction": max_fraction,
                    "deploy_choice": str(profile.choices[0]), "context_length": profile.context_length,
                    "memory_budget_mb": profile.memory_budget_mb}
    raise BudgetError(
        f"no depth-pruned student of this {len(per)}-block teacher is both <= {max_fraction:.0%} of its "
        f"{total:,} parameters and within {profile.memory_budget_mb} MB for profile {profile.name}",
        hint="pass --student with a smaller HF model sharing the teacher's tokenizer, or use a larger profile")


def calibration_ids(tokenizer: Any, texts: Sequence[str | Sequence[int]], max_length: int) -> list[list[int]]:
    """Token ids of calibration items: a text is tokenized as is, a list of ids (a chat already
    tokenized by :func:`~edgepack.runtime.chat.tokens.hf_chat_ids`) is taken as given."""
    return [(list(t) if not isinstance(t, str) else tokenizer(t, add_special_tokens=False).input_ids)[:max_length]
            for t in texts]


def layer_importance(model: Any, tokenizer: Any, texts: Sequence[str | Sequence[int]],
                     max_length: int = 256) -> list[float]:
    """Per-block 1 - cos(input, output), averaged over the non-pad tokens of ``texts`` (texts or ids)."""
    import torch

    if not texts:
        raise UsageError("layer importance needs at least one calibration text")
    _, layers = decoder_layers(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = calibration_ids(tokenizer, texts, max_length)
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    sums = [0.0] * len(layers)
    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(i: int) -> Any:
        def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(i: int) -> Any:
        def hook(_mod: Any, _args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs[i].float(), out.float(), dim=-1)
            sums[i] += float(((1.0 - cos) * mask).sum())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i)))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = float(mask.sum())
    return [s / n for s in sums]


def select_layers(importance: Sequence[float], num_layers: int) -> list[int]:
    """Keep the first and last block, then the most important others (ties: lower index)."""
    n = len(importance)
    if not 1 <= num_layers <= n:
        raise UsageError(f"cannot keep {num_layers} of {n} blocks")
    if num_layers == 1:
        return [max(range(n), key=lambda i: (importance[i], -i))]
    middle = sorted(range(1, n - 1), key=lambda i: (-importance[i], i))[: num_layers - 2]
    return sorted({0, n - 1, *middle})


def _student_config(config: Any, keep: list[int], n_teacher: int) -> Any:
    """The teacher's config for the blocks in ``keep``: per-layer entries sliced like the blocks.

    A config with a fixed sliding-window pattern (Gemma 3: five sliding layers, then one
    global) gets the pattern again for its new depth rather than the kept layers' types:
    llama.cpp's gemma3 graph computes the pattern from the layer index alone, so a sliced
    pattern could not be exported to GGUF.
    """
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep)
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n_teacher:
            setattr(cfg, key, [value[i] for i in keep])
    pattern = getattr(cfg, "_sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 0 and isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(len(keep))]
    return cfg


def build_student(teacher: Any, keep: Sequence[int]) -> Any:
    """A new model of the teacher's class holding copies of the blocks in ``keep``."""
    import torch
    from transformers import AutoModelForCausalLM

    prefix, layers = decoder_layers(teacher)
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[-1] >= len(layers) or keep[0] < 0:
        raise UsageError(f"invalid block selection {keep} for a {len(layers)}-block teacher")
    cfg = _student_config(teacher.config, keep, len(layers))
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    src = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        if name.startswith(prefix + "."):
            idx, rest = name[len(prefix) + 1:].split(".", 1)
            state[name] = src[f"{prefix}.{keep[int(idx)]}.{rest}"]
        else:
            state[name] = src[name]
    with torch.no_grad():
        student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def prune_teacher(teacher: Any, tokenizer: Any, *, calibration: Sequence[str | Sequence[int]] = (),
                  num_layers: int | None = None,
                  keep: Sequence[int] | None = None, max_length: int = 256, mlp_keep: float = 1.0,
                  kept_channels: Sequence[Sequence[int]] | None = None,
                  progress: ProgressFn = null_progress) -> tuple[Any, dict[str, Any]]:
    """Depth-prune a loaded teacher, then optionally width-prune its MLPs; return (student, description).

    Give either ``keep`` (explicit block indices) or ``num_layers`` plus ``calibration``
    texts (already chat-templated) or token ids to rank the blocks. ``mlp_keep`` < 1 keeps that fraction of
    each block's MLP channels, ranked on the calibration texts (width.py); ``kept_channels``
    (from an earlier description) rebuilds the same student without ranking again.
    """
    if (keep is None) == (num_layers is None):
        raise UsageError("depth pruning needs exactly one of keep= or num_layers=")
    _, layers = decoder_layers(teacher)
    importance: list[float] | None = None
    if keep is None:
        assert num_layers is not None
        progress("student: rank blocks", 0, 1)
        importance = layer_importance(teacher, tokenizer, calibration, max_length=max_length)
        keep = select_layers(importance, num_layers)
        progress("student: rank blocks", 1, 1)
    student = build_student(teacher, keep)
    if kept_channels is None and mlp_keep < 1.0:
        from edgepack.distill.width import channel_importance, channels_to_keep

        progress("student: rank MLP channels", 0, 1)
        kept_channels = channels_to_keep(channel_importance(student, tokenizer, calibration, max_length), mlp_keep)
        progress("student: rank MLP channels", 1, 1)
    if kept_channels is not None:
        from edgepack.distill.width import prune_mlp

        student = prune_mlp(student, kept_channels)
    n, n_teacher = count_params(student), count_params(teacher)
    return student, {
        "method": "depth pruning by block influence (1 - cos(in, out)); first and last block kept",
        "teacher_layers": len(layers),
        "kept_layers": list(keep),
        "num_layers": len(keep),
        "importance": [round(x, 6) for x in importance] if importance is not None else None,
        "calibration_texts": len(calibration),
        "params": n,
        "teacher_params": n_teacher,
        "param_fraction": round(n / n_teacher, 4),
        "mlp_channels": student.config.intermediate_size,
        "teacher_mlp_channels": teacher.config.intermediate_size,
        "kept_channels": [list(k) for k in kept_channels] if kept_channels is not None else None,
    }


def derive_student(teacher_dir: Path, *, calibration: Sequence[str] = (), num_layers: int | None = None,
                   keep: Sequence[int] | None = None, out_dir: Path | None = None,
                   progress: ProgressFn = null_progress) -> tuple[Any, dict[str, Any]]:
    """Depth-prune the HF teacher saved in ``teacher_dir`` (see :func:`prune_teacher`).

    With ``out_dir`` the student weights and config are also saved there (safetensors).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher.eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir) if keep is None else None
    student, description = prune_teacher(teacher, tok, calibration=calibration, num_layers=num_layers, keep=keep,
                                         progress=progress)
    if out_dir is not None:
        student.save_pretrained(out_dir, safe_serialization=True)
    return student, description
