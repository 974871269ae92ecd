"""Merge a peft LoRA adapter into its base model and save a plain HF dir (safetensors).

``merge_lora(adapter_dir, out_dir)`` checks the adapter against the base *before*
loading anything heavy: every ``lora_A``/``lora_B`` pair must target a weight that exists
in the base with matching in/out features, so an adapter trained for another model
fails with the tensor and both shapes named, not with a torch stack trace. The merged
model is built in ``<out>.tmp-<pid>.edgepack-tmp`` and renamed with a ``.complete`` marker.
The base comes from ``base_dir`` or the adapter's ``base_model_name_or_path``, which must
be a local directory (edgepack never downloads).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir
from edgepack.errors import InvalidModelFile, ModelSourceError, UnsafeModelError, UnsupportedArchitecture
from edgepack.progress import ProgressFn, null_progress
from edgepack.export.gguf.weights import SafetensorsCheckpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise UnsupportedArchitecture(f"adapter type {config.get('peft_type')!r} is not supported; only LORA merges")
    return config


def resolve_base(adapter_dir: Path, base_dir: Path | None) -> Path:
    """The base model dir of an adapter: explicit, or its local ``base_model_name_or_path``."""
    if base_dir is not None:
        base = Path(base_dir)
    else:
        name = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not name:
            raise ModelSourceError(f"{adapter_dir} does not name its base model", hint="pass the base model dir")
        base = Path(name)
        if not base.is_absolute():
            base = (Path(adapter_dir) / base) if (Path(adapter_dir) / base).is_dir() else base
    if not (base / "config.json").is_file():
        raise ModelSourceError(f"base model {base} is not a local HF model dir",
                               hint="edgepack does not download; pass the base model directory")
    return base


def check_adapter_matches_base(adapter_dir: Path, base_dir: Path) -> int:
    """Shape-check every LoRA pair against the base weights; returns the number of pairs."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickles = [p.name for p in adapter_dir.glob("adapter_model.bin")]
        if pickles:
            raise UnsafeModelError(f"{adapter_dir} holds a pickled adapter ({pickles[0]}); loading it can run code",
                                   hint="re-save the adapter with safe_serialization=True")
        raise ModelSourceError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with SafetensorsCheckpoint(adapter_dir) as adapter:
        for key in adapter.names():
            m = _LORA_KEY.match(key)
            if m:
                pairs.setdefault(m.group("module"), {})[m.group("ab")] = adapter.shapes[key]
    if not pairs:
        raise InvalidModelFile(f"{adapter_dir / ADAPTER_WEIGHTS} holds no lora_A/lora_B weights")
    with SafetensorsCheckpoint(base_dir) as base:
        for module, ab in sorted(pairs.items()):
            weight = f"{module}.weight"
            if weight not in base.shapes:
                raise InvalidModelFile(f"adapter targets {module}, which the base model {base_dir.name} does not have",
                                       hint="the adapter was trained for a different base model")
            if set(ab) != {"A", "B"}:
                raise InvalidModelFile(f"adapter has lora_{''.join(ab)} but not its pair for {module}")
            out_f, in_f = base.shapes[weight][:2]
            (r_a, a_in), (b_out, r_b) = ab["A"][:2], ab["B"][:2]
            if a_in != in_f or b_out != out_f or r_a != r_b:
                raise InvalidModelFile(
                    f"adapter does not fit {weight}: base is ({out_f}, {in_f}), lora_A is {ab['A']}, lora_B is {ab['B']}",
                    hint="the adapter was trained for a different base model")
    return len(pairs)


def merge_lora(adapter_dir: Path, out_dir: Path, *, base_dir: Path | None = None,
               progress: ProgressFn = null_progress) -> Path:
    """Merge a LoRA adapter into its base and save the result to ``out_dir`` (safetensors)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    read_adapter_config(adapter_dir)
    base = resolve_base(adapter_dir, base_dir)
    n_pairs = check_adapter_matches_base(adapter_dir, base)
    progress("merge", 0, n_pairs)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out_dir, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the adapter's tokenizer files win over the base's
            src = adapter_dir / name if (adapter_dir / name).is_file() else base / name
            if src.is_file():
                shutil.copy(src, tmp / name)
    progress("merge", n_pairs, n_pairs)
    return out_dir
