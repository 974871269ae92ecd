"""Reading HF checkpoints safely: safetensors only, every failure a typed error.

:class:`SafetensorsCheckpoint` indexes the ``*.safetensors`` files of an HF dir (single
file or sharded with ``model.safetensors.index.json``) from their headers alone, and
loads one tensor at a time so converting a model never holds two copies of it. Pickle
checkpoints (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused: loading them runs code.
A truncated or corrupt file, or a tensor with NaN/Inf, raises
:class:`~edgepack.errors.InvalidModelFile` naming the file and tensor.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import InvalidModelFile, ModelSourceError, UnsafeModelError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F32", "F16", "BF16")


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The safetensors shards of ``hf_dir``; refuses pickle-only checkpoints."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModelFile(f"{index} is not a valid safetensors index: {exc}") from exc
        files = []
        for name in sorted(set(weight_map.values())):
            path = (hf_dir / name).resolve()
            if path.parent != hf_dir.resolve():
                raise UnsafeModelError(f"{index.name} points outside the model dir: {name!r}")
            if not path.is_file():
                raise InvalidModelFile(f"shard {name} listed in {index.name} is missing")
            files.append(path)
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeModelError(
            f"{hf_dir} holds only pickle checkpoints ({', '.join(pickles)}); loading them can run code",
            hint="re-save the model with save_pretrained(..., safe_serialization=True)")
    raise ModelSourceError(f"{hf_dir} has no *.safetensors weights")


class SafetensorsCheckpoint:
    """Lazy, validated access to the tensors of an HF dir's safetensors files.

    Use as a context manager; :attr:`shapes` and :attr:`dtypes` come from the headers.
    """

    def __init__(self, hf_dir: Path) -> None:
        self.files = safetensors_files(hf_dir)
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        from safetensors import SafetensorError, safe_open

        try:
            for path in self.files:
                try:
                    handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise InvalidModelFile(f"{path.name} is truncated or corrupt: {exc}") from exc
                for name in handle.keys():
                    if name in self._where:
                        raise InvalidModelFile(f"tensor {name!r} appears in two shards")
                    sl = handle.get_slice(name)
                    self._where[name] = (path, handle)
                    self.shapes[name] = tuple(int(d) for d in sl.get_shape())
                    self.dtypes[name] = str(sl.get_dtype())
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, *, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor; NaN/Inf or a read failure raises InvalidModelFile naming it."""
        import torch
        from safetensors import SafetensorError

        path, handle = self._where[name]
        if self.dtypes[name] not in FLOAT_DTYPES:
            raise InvalidModelFile(f"tensor {name!r} in {path.name} has dtype {self.dtypes[name]}; "
                                   f"expected one of {', '.join(FLOAT_DTYPES)}")
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise InvalidModelFile(f"cannot read tensor {name!r} from {path.name}: {exc}") from exc
        if check_finite and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidModelFile(f"tensor {name!r} in {path.name} has {bad} NaN/Inf values",
                                   hint="the checkpoint is corrupt or training diverged; re-train or re-save it")
        return tensor
