"""Resumable training checkpoints in ``RUN/checkpoints/step-N`` without pickles.

A checkpoint holds everything the next step depends on: the model (HF safetensors folder),
the AdamW state (tensors in ``optimizer.safetensors``, the rest in ``optimizer.json``), the
LR scheduler state and the torch RNG, and ``state.json`` (step, loss history, the identity
of the run it belongs to). The data position is a pure function of (seed, step), so the
step number is the data cursor. Each folder is written with :func:`atomic_dir` (``.complete``
last), so a kill during a save leaves the previous checkpoint as the latest complete one.
Nothing here unpickles: resuming reads safetensors and JSON only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir, is_complete, write_json

STEP_PREFIX = "step-"
STATE_FILE = "state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.safetensors"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name.removeprefix(STEP_PREFIX)
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and suffix.isdigit() and is_complete(p):
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int = 1) -> Path:
    """Write ``root/step-<step>`` atomically, then delete all but the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    final = Path(root) / f"{STEP_PREFIX}{step}"
    with atomic_dir(final, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        opt = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for pid, pstate in opt["state"].items():
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{pid}.{key}"] = value.detach().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        write_json(tmp / OPTIMIZER_META, {"param_groups": opt["param_groups"], "scalars": scalars,
                                          "param_ids": sorted(opt["state"])})
        write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / RNG_FILE))
        write_json(tmp / STATE_FILE, {**state, "step": step})
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def restore_training_state(path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG from a checkpoint; return its state.json."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / OPTIMIZER_TENSORS))
    meta = json.loads((path / OPTIMIZER_META).read_text())
    state: dict[int, dict[str, Any]] = {}
    for pid in meta["param_ids"]:
        state[pid] = dict(meta["scalars"].get(str(pid), {}))
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    torch.set_rng_state(load_file(str(path / RNG_FILE))["torch_cpu"])
    return read_state(path)
