"""Resumable training checkpoints in ``RUN/checkpoints/step-N`` without pickles.

A checkpoint holds everything the next step depends on: the model (HF safetensors folder),
the AdamW state (tensors in ``optimizer.safetensors``, the rest in ``optimizer.json``), the
LR scheduler state and the torch RNG, and ``state.json`` (step, loss history, the identity
of the run it belongs to). The data position is a pure function of (seed, step), so the
step number is the data cursor. Each folder is written with :func:`atomic_dir` (``.complete``
last), so a kill during a save leaves the previous checkpoint as the latest complete one.
Nothing here unpickles: resuming reads safetensors and JSON only.

A save that cannot be written (disk full, permissions) raises RunDirError naming the step and
the checkpoint that is still intact; the half-written folder is removed. A complete checkpoint
whose files cannot be read back raises RunDirError naming it.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir, is_complete, write_json
from edgepack.errors import RunDirError

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
    from safetensors import SafetensorError

    final = Path(root) / f"{STEP_PREFIX}{step}"
    try:
        with atomic_dir(final, replace=True) as tmp:
            _write(tmp, step, model, optimizer, scheduler, state)
    except (OSError, SafetensorError) as exc:
        # safetensors reports ENOSPC as its own error type ("... (os error 28)"), not OSError.
        previous = latest_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise RunDirError(f"could not write checkpoint {final.name} in {root}: {_reason(exc)}; {kept}",
                          hint="free disk space (or fix permissions), then rerun with --resume") from exc
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

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
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CUDA run (distill/device.py)
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / RNG_FILE))
    write_json(tmp / STATE_FILE, {**state, "step": step})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    text = str(exc)
    return "no space left on device" if "os error 28" in text or "No space left" in text else text


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if not isinstance(state, dict):
        raise _damaged(path, f"{STATE_FILE} is not a JSON object")
    return state


def _damaged(path: Path, why: object) -> RunDirError:
    return RunDirError(f"checkpoint {path} is damaged: {why}",
                       hint="delete that folder to resume from an earlier checkpoint, or delete the "
                            "checkpoints folder to start over")


def restore_training_state(path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG from a checkpoint; return its state.json."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path / OPTIMIZER_TENSORS))
        meta = json.loads((path / OPTIMIZER_META).read_text(encoding="utf-8"))
        state: dict[int, dict[str, Any]] = {}
        for pid in meta["param_ids"]:
            state[pid] = dict(meta["scalars"].get(str(pid), {}))
        for name, value in tensors.items():
            pid, key = name.split(".", 1)
            state.setdefault(int(pid), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text(encoding="utf-8")))
        rng = load_file(str(path / RNG_FILE))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
    return read_state(path)
