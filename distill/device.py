"""Where training runs and in what precision: one decision, made before any model is loaded.

:func:`resolve_device` turns ``--device`` (or the profile's ``[training] device``) and
``--precision`` into a :class:`Device`: the torch device name, the autocast dtype (None: plain
fp32), whether a GradScaler is needed (fp16 autocast only: bf16 has fp32's exponent range), the
dtype the frozen teacher is held in, and whether the run is bit-reproducible. Everyone else asks
the Device (train_setup.py places the models, train_step.py autocasts and scales, train_save.py
reports); nothing else decides on a device name. :func:`ddp_backend` picks the data-parallel
backend from the device type.

Precision ``auto``: fp32 on the CPU (the deterministic default), bf16 on CUDA devices that
support it (Ampere and later) and fp16 + gradient scaling on older ones, fp16 on MPS. ``bf16``
on the CPU is allowed (CPU autocast), so the autocast path runs in CPU tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from edgepack.constants import TRAINING_DEVICES
from edgepack.errors import UsageError

DEVICES = TRAINING_DEVICES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``--teacher-precision``: the frozen teacher's dtype (``auto``: :attr:`Device.teacher_dtype`)."""
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Device:
    """The resolved training device and precision policy."""

    name: str
    """``cpu``, ``cuda`` or ``mps`` (a torch device type)."""
    precision: str
    """``fp32``, ``bf16`` or ``fp16``: the dtype the student's forward runs in (autocast)."""
    reason: str
    """Why this device/precision (what was asked, what was found)."""

    @property
    def type(self) -> str:
        return self.name

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype; None runs plain fp32 (no autocast)."""
        return None if self.precision == "fp32" else _DTYPES[self.precision]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not."""
        return self.precision == "fp16"

    @property
    def teacher_dtype(self) -> torch.dtype:
        """The frozen teacher: half precision on accelerators (it only runs forward), fp32 on the CPU."""
        return torch.float32 if self.name == "cpu" else _DTYPES[self.precision]

    def teacher_dtype_for(self, teacher_precision: str) -> torch.dtype:
        """The frozen teacher's dtype under ``--teacher-precision`` (checked by :func:`check_teacher_precision`).

        ``bf16`` on the CPU halves the teacher's weights and logits (-235 MB for bench/trl's 135M
        teacher); its logits are widened to fp32 inside the losses (losses.py), chunk by chunk."""
        return self.teacher_dtype if teacher_precision == "auto" else _DTYPES[teacher_precision]

    @property
    def bit_reproducible(self) -> bool:
        """Only the CPU's kernels are bit-deterministic here; GPU kernels (atomics, cuBLAS) are not."""
        return self.name == "cpu"

    @property
    def not_reproducible_reason(self) -> str | None:
        if self.bit_reproducible:
            return None
        return (f"{self.name} kernels (atomic adds, cuBLAS/Metal reductions) are not bit-deterministic: a rerun or "
                "resume continues at the same step, data position and RNG state, but the weights may differ in "
                "the last bits")

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward's autocast context (a no-op for fp32)."""
        dtype = self.autocast_dtype
        return nullcontext() if dtype is None else torch.autocast(device_type=self.name, dtype=dtype)

    def placement(self) -> AbstractContextManager[Any]:
        """Tensors made inside (batches, masks, targets) are made on this device; a no-op on the CPU."""
        return nullcontext() if self.name == "cpu" else torch.device(self.name)

    def grad_scaler(self) -> Any | None:
        """A torch.amp.GradScaler for fp16; None otherwise."""
        return torch.amp.GradScaler(self.name) if self.needs_grad_scaler else None

    def describe(self) -> dict[str, Any]:
        """train_report.json's device fields."""
        return {"device": self.name, "precision": self.precision, "device_reason": self.reason,
                "bit_reproducible": self.bit_reproducible,
                "bit_reproducible_reason": self.not_reproducible_reason}


CPU = Device("cpu", "fp32", "default")


def available_devices() -> list[str]:
    """The device types this process can train on."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems (HEAP_MAX_SIZE / 2)."""


def set_mmap_threshold(nbytes: int) -> None:
    """glibc's ``M_MMAP_THRESHOLD`` for this process (``mallopt``, what ``MALLOC_MMAP_THRESHOLD_``
    sets at start): every block of at least ``nbytes`` gets its own mmap and goes back to the OS
    when freed, instead of staying in the heap. Training's peak then holds fewer dead activation
    and gradient blocks (bench/trl/results-memory.md), at the cost of a page fault per fresh block.
    UsageError outside (0, 32 MiB] or where the C library has no ``mallopt`` (not glibc)."""
    import ctypes
    import ctypes.util

    if not 0 < nbytes <= MMAP_THRESHOLD_MAX:
        raise UsageError(f"--mmap-threshold {nbytes} is outside glibc's range (1 to {MMAP_THRESHOLD_MAX} bytes)",
                         hint="e.g. --mmap-threshold 65536 (64 KiB), or leave it out (0: glibc's default)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    m_mmap_threshold = -3  # malloc.h
    if mallopt is None or mallopt(m_mmap_threshold, nbytes) != 1:
        raise UsageError("--mmap-threshold needs glibc's mallopt (Linux); this C library does not take it",
                         hint="leave --mmap-threshold out on this system")


def resolve_device(requested: str | None, profile_device: str | None = "cpu", precision: str = "auto",
                   available: list[str] | None = None, cuda_bf16: bool | None = None) -> Device:
    """The Device for ``requested`` (None: the profile's ``[training] device``); UsageError when absent.

    ``auto`` takes the profile's device when present and the CPU otherwise (said in ``reason``).
    ``profile_device`` None means no profile (``distill data --correct-teacher`` on its own): then
    no ``--device`` is the CPU and ``auto`` the first accelerator found (cuda, then mps), else the CPU.
    ``available`` and ``cuda_bf16`` default to what this process finds; tests pass them.
    """
    found = available_devices() if available is None else available
    asked = (profile_device or "cpu") if requested is None else requested
    if asked not in DEVICES:
        raise UsageError(f"--device {asked!r} is not one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if asked == "auto" and profile_device is None:
        name = next((d for d in ("cuda", "mps") if d in found), "cpu")
        reason = f"auto: no profile; {'the first accelerator found' if name != 'cpu' else 'no accelerator found'}, {name}"
    elif asked == "auto":
        name = profile_device if profile_device in found else "cpu"
        reason = f"auto: profile device {profile_device}" + ("" if name == profile_device else " absent, using cpu")
    elif asked not in found:
        origin = "--device" if requested is not None else "the profile's [training] device"
        raise UsageError(f"{origin} {asked} is not available in this process (found: {', '.join(found)})",
                         hint="`--device cpu` (or auto) trains on the CPU (`distill train`, `distill data "
                              "--correct-teacher`, `pipeline`); or install a torch build for that device")
    else:
        origin = "--device" if requested is not None else "profile device" if profile_device else "no profile, default"
        name, reason = asked, f"{origin} {asked}"
    return Device(name, _precision(name, precision, cuda_bf16), reason)


def check_teacher_precision(device: Device, teacher_precision: str) -> None:
    """UsageError for an unknown ``--teacher-precision`` or fp16 on the CPU (its fp16 kernels are thin and slow)."""
    if teacher_precision not in TEACHER_PRECISIONS:
        raise UsageError(f"--teacher-precision {teacher_precision!r} is not one of {', '.join(TEACHER_PRECISIONS)}")
    if teacher_precision == "fp16" and device.name == "cpu":
        raise UsageError("--teacher-precision fp16 is for accelerators", hint="use fp32 or bf16 on the CPU")


def _precision(name: str, precision: str, cuda_bf16: bool | None) -> str:
    if name == "cpu":
        if precision == "fp16":  # CPU autocast's fp16 coverage is thin and no GradScaler exists for it
            raise UsageError("--precision fp16 is for accelerators", hint="use fp32 or bf16 on the CPU")
        return "fp32" if precision == "auto" else precision
    if precision != "auto":
        if name == "cuda" and precision == "bf16" and not _cuda_bf16(cuda_bf16):
            raise UsageError("--precision bf16: this CUDA device does not support bfloat16",
                             hint="use --precision fp16 (gradients are scaled) or fp32")
        return precision
    if name == "cuda":
        return "bf16" if _cuda_bf16(cuda_bf16) else "fp16"
    return "fp16"  # mps: bf16 autocast needs macOS 14+; fp16 is supported everywhere


def _cuda_bf16(given: bool | None) -> bool:
    return given if given is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def bitsandbytes_usable(device: Device) -> bool:
    """8-bit optimizer states are planned only on CUDA and only where bitsandbytes is installed."""
    import importlib.util

    return device.name == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def ddp_backend(device_type: str) -> str:
    """The torch.distributed backend for processes on ``device_type``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def device_memory_mb(device: Device, profile_mb: int, free_mb: int | None = None) -> tuple[int, str]:
    """The memory the planner plans within, and where the number came from.

    On CUDA the free device memory (``free_mb``; by default torch.cuda.mem_get_info), capped at
    the profile's ``memory_mb`` (the profile's board may be smaller than this GPU); elsewhere the
    profile's.
    """
    if device.name == "cuda":
        if free_mb is None:
            free_mb = int(torch.cuda.mem_get_info()[0] // (1 << 20))
        if free_mb < profile_mb:
            return free_mb, f"free CUDA memory ({free_mb} MB) below the profile's {profile_mb} MB"
        return profile_mb, f"profile memory_mb (free CUDA memory {free_mb} MB)"
    return profile_mb, "profile memory_mb"


def seeded(device: Device, seed: int) -> AbstractContextManager[Any]:
    """The training recipe's RNG context: on the CPU seeded and deterministic algorithms on
    (bit-identical weights); elsewhere seeded only — torch's deterministic mode raises on CUDA
    for cuBLAS without CUBLAS_WORKSPACE_CONFIG and for ops with no deterministic kernel, and the
    run is reported as not bit-reproducible anyway."""
    from edgepack.distill.batching import deterministic_torch

    if device.bit_reproducible:
        return deterministic_torch(seed)
    torch.manual_seed(seed)  # seeds every device's generator
    return nullcontext()


def reset_peak_memory(device: Device) -> None:
    """Start measuring the device's peak allocation (CUDA); the CPU's peak is RSS (train_save.py)."""
    if device.name == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: Device, rss_peak_mb: float) -> float:
    """The measured training peak the planner's estimate is compared with: torch.cuda.max_memory_allocated
    on CUDA, MPS's driver-allocated memory on Apple GPUs, the process's peak RSS on the CPU."""
    if device.name == "cuda":
        return torch.cuda.max_memory_allocated() / (1 << 20)
    if device.name == "mps":
        return torch.mps.driver_allocated_memory() / (1 << 20)
    return rss_peak_mb


def peak_measure(device: Device) -> str:
    """What :func:`peak_memory_mb` measured, for the report."""
    return {"cuda": "torch.cuda.max_memory_allocated", "mps": "torch.mps.driver_allocated_memory"}.get(
        device.name, "peak RSS")


def to_device(value: Any, where: torch.device | str) -> Any:
    """``value``'s tensors on ``where``: a tensor, a dataclass of tensors (losses.SparseTargets) or a
    tuple of those. Targets read from disk live on the CPU; the student's logits on the device.
    On the CPU nothing is copied (Tensor.to returns the tensor itself)."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return value.to(where)
    if isinstance(value, tuple):
        return tuple(to_device(v, where) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), where)
                                             for f in dataclasses.fields(value) if f.init})
    return value
