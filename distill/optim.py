"""The optimizers of ``distill train``, one registry keyed by exact names (``--optimizer``).

=============  ==========================================================  =====================
name           what                                                        state per parameter
=============  ==========================================================  =====================
``adamw``      torch.optim.AdamW, both moments in fp32 (the default)        8 bytes
``adamw-bf16`` :class:`AdamWBf16`: AdamW whose moments are stored in bf16   4 bytes
               (the update itself is computed in fp32)
``adamw8bit``  bitsandbytes' AdamW8bit (CUDA only; the planner's choice     2 bytes (+ <1 % scales)
               before LoRA when full fine-tuning fits with it)
=============  ==========================================================  =====================

``auto`` (the default) lets the planner (plan.py) choose as it always has: ``adamw``, then
``adamw8bit`` where bitsandbytes runs on CUDA. A named optimizer is the only one the planner
considers. The planner counts ``state_bytes`` per trainable parameter, so planned and measured
peaks stay comparable.

Why our own bf16 AdamW rather than a library's (bench/trl/optim_probe.json: the student's 77.9M
parameter shapes, one loaded core, torch 2.13 on the CPU): AdamWBf16 takes ~0.7 s per step and
+232 MB (state and step together) against torch AdamW's ~0.9 s and +758 MB; bitsandbytes 0.50's
AdamW8bit runs on the CPU but takes ~3.5 s per step and peaks at +821 MB (it dequantizes whole
tensors); torchao 0.18's AdamW8bit compiles its step with inductor (15-65 s for the first step,
~6.5 s per step after) and peaks at +546 MB; torchao's ``_AdamW(bf16_stochastic_round=True)``
rounds bf16 *parameters* and keeps fp32 moments for fp32 ones. Neither library's state is plain
tensors that the checkpoints' safetensors files (checkpoint.py: no pickles) hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from edgepack.errors import UsageError

AUTO = "auto"


@dataclass(frozen=True)
class OptimizerKind:
    """One row of the registry: how to build it, where it runs, what its state costs."""

    name: str
    summary: str
    state_bytes: int
    """Bytes of optimizer state per trainable parameter (the planner's count)."""
    build: Callable[[list[torch.nn.Parameter], float, float], torch.optim.Optimizer]
    """(params, lr, weight_decay) → the optimizer."""
    cuda_only: bool = False


def _adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _adamw_bf16(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return AdamWBf16(params, lr=lr, weight_decay=weight_decay)


def _adamw8bit(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, OptimizerKind] = {k.name: k for k in (
    OptimizerKind("adamw", "AdamW, fp32 moments", 8, _adamw),
    OptimizerKind("adamw-bf16", "AdamW, bf16 moments (stochastic rounding), fp32 update", 4, _adamw_bf16),
    OptimizerKind("adamw8bit", "bitsandbytes AdamW8bit (CUDA)", 2, _adamw8bit, cuda_only=True),
)}


def optimizer_kind(name: str) -> OptimizerKind:
    """The registry row for ``name``; UsageError listing the names otherwise."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {name!r}", hint=f"use one of {AUTO}, {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def candidates(requested: str, device: str, eight_bit_usable: bool) -> tuple[str, ...]:
    """The optimizers the planner may choose from, in order: ``auto`` → adamw (then adamw8bit where
    ``eight_bit_usable``: bitsandbytes on CUDA, device.bitsandbytes_usable); a name → that one, or
    UsageError where it cannot run."""
    if requested == AUTO:
        return ("adamw", "adamw8bit") if eight_bit_usable else ("adamw",)
    kind = optimizer_kind(requested)
    if kind.cuda_only and not eight_bit_usable:
        raise UsageError(f"--optimizer {requested} needs CUDA with bitsandbytes installed "
                         f"(this run trains on {device})",
                         hint="use --optimizer adamw-bf16 to halve AdamW's state elsewhere")
    return (requested,)


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    return optimizer_kind(name).build(params, lr, weight_decay)


# ------------------------------------------------------------------ AdamW with bf16 moments

CHUNK = 1 << 16
"""Elements updated at once: the fp32 copies of the moments exist for one chunk at a time, so the
step's temporaries are a few hundred KB (they stay in the core's cache between the ~15 elementwise
passes) instead of three copies of the largest tensor (the embedding)."""
DITHER = 1 << 20
"""Entries of the fixed table of random bits the stochastic rounding reads from."""


class AdamWBf16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) whose moments are stored
    in bf16: half of AdamW's state. Each step widens a chunk of the moments to fp32, updates them and
    the parameter exactly as torch.optim.AdamW does in fp32, and stores the moments back rounded to
    bf16 *stochastically*.

    Why stochastic rounding: bf16 has 8 mantissa bits, so a value moves only when it changes by more
    than ~0.2-0.4 %. The second moment decays by β2 = 0.999 (0.1 %) per step, so round-to-nearest
    freezes it once its increments fall below that (after a few hundred steps): the update then
    grows up to ~2× too large. Rounding up with probability equal to the remainder keeps the stored
    moment unbiased. The random bits are a fixed table (seeded once) read at an offset that is a
    function of (parameter, chunk, step) only, so the run stays deterministic and a resume from a
    checkpoint (which stores the step) is bit-identical without any generator state.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamWBf16 hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._dither: dict[torch.device, torch.Tensor] = {}
        # Optimizer.load_state_dict casts floating-point state to the parameter's dtype (fp32):
        # put the moments back in bf16 (exact, they were bf16 when saved).
        self.register_load_state_dict_post_hook(_moments_to_bf16)

    def dither(self, device: torch.device) -> torch.Tensor:
        """DITHER random integers in [0, 2^16), the same in every process (a fixed seed)."""
        if device not in self._dither:
            g = torch.Generator().manual_seed(0x5EED)
            self._dither[device] = torch.randint(0, 1 << 16, (DITHER,), dtype=torch.int32, generator=g).to(device)
        return self._dither[device]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBf16 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16,
                                                           memory_format=torch.contiguous_format)
                state["step"] += 1
                t = state["step"]
                step_size = lr / (1 - b1 ** t)
                bc2_sqrt = math.sqrt(1 - b2 ** t)
                if wd:
                    p.mul_(1 - lr * wd)
                flat_p, flat_g = _flat(p), _flat(p.grad)
                m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for c, start in enumerate(range(0, p.numel(), CHUNK)):
                    sl = slice(start, start + CHUNK)
                    g, m_stored, v_stored = flat_g[sl], m_all[sl], v_all[sl]
                    m = m_stored.float().lerp_(g, 1 - b1)
                    v = v_stored.float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    # m / (sqrt(v) / bc2_sqrt + eps) · step_size, with bc2_sqrt moved out of the
                    # elementwise passes (one pass fewer; torch's AdamW divides first).
                    flat_p[sl].addcdiv_(m, v.sqrt().add_(eps * bc2_sqrt), value=-step_size * bc2_sqrt)
                    offset = hash_offset(index, c, t)
                    m_stored.copy_(self._round_(m, offset))
                    v_stored.copy_(self._round_(v, offset ^ 0x2545F))
                if not flat_p.data_ptr() == p.data_ptr():  # a non-contiguous parameter was updated in a copy
                    p.copy_(flat_p.view_as(p))
        return loss

    def _round_(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """``x`` (fp32, overwritten) with its low 16 bits dithered and cut: its bf16 value, rounded
        stochastically (the copy into the bf16 state is then exact)."""
        table, n = self.dither(x.device), x.numel()
        offset %= DITHER
        bits = table[offset:offset + n]
        if bits.numel() < n:  # wrap around the table's end
            bits = torch.cat([bits, table[: n - bits.numel()]])
        # The low 16 bits are what bf16 drops. Adding a uniform [0, 2^16) to them and cutting them
        # rounds the magnitude up with probability remainder / 2^16, for either sign (float bit
        # patterns order magnitudes, across exponents too); zeros stay zero, infinities infinite.
        x.view(torch.int32).add_(bits).bitwise_and_(-65536)
        return x


def hash_offset(param: int, chunk: int, step: int) -> int:
    """A well-mixed 64-bit function of (parameter index, chunk, step): where the dither table is read."""
    h = (param * 0x9E3779B97F4A7C15 + chunk * 0xC2B2AE3D27D4EB4F + step * 0x165667B19E3779F9) & (2**64 - 1)
    h ^= h >> 31
    h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h ^ (h >> 29)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _moments_to_bf16(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = state[key].to(torch.bfloat16).contiguous()
        if isinstance(state.get("step"), torch.Tensor):  # an int is what we write; JSON keeps it so
            state["step"] = int(state["step"].item())
