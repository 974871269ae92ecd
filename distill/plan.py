"""The training memory planner: full fine-tuning or LoRA, micro-batch and gradient checkpointing.

``plan_training`` walks the candidates from the fastest, best-quality one down — full
fine-tuning before LoRA, no checkpointing before checkpointing, larger micro-batches before
smaller ones (each a divisor of the step's batch, the rest is gradient accumulation) — and
returns the first whose estimated peak fits the profile's training memory
(``[training] memory_mb``). The estimate is ``edgepack.memory.estimate_train`` (weights,
gradients, optimizer state, activations, the teacher held for online KD), with the optimizer's
state recounted at its own bytes per parameter (optim.OPTIMIZERS: 8 for fp32 AdamW, 4 for bf16
moments, 2 for 8-bit) and the online teacher at its dtype (``--teacher-precision``), plus the
process's resident memory before the tokenizer or any model is loaded (Python, torch). It is
meant as an upper bound — it counts full-sequence logits, while training computes them at answer
positions only — but on bench/trl's CPU job the measured peak is 1.11× (defaults) to 1.19× (bf16
moments and teacher) of it: the forward + backward transients are under-counted
(bench/trl/results-memory.md). Training reports it beside the measured peak (process RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA: distill/device.py, which also gives the budget there —
free device memory capped at the profile's).

A budget nothing meets is refused before any model is loaded, with the smallest need and
what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgepack.errors import UsageError
from edgepack.memory import ModelShape, TrainEstimate, estimate_train

METHODS = ("full", "lora")
CHECKPOINTING = {"auto": (False, True), "on": (True,), "off": (False,)}
"""``--checkpointing``: the gradient-checkpointing settings the planner may try, in order."""
LORA_RANK = 16
MIB = 2**20


@dataclass(frozen=True)
class TrainPlan:
    method: str
    """``full`` or ``lora`` (rank LORA_RANK on every linear layer, merged into the student at the end)."""
    micro_batch: int
    grad_accumulation: int
    checkpointing: bool
    planned_peak_mb: float
    """Baseline RSS + the estimate (an upper bound)."""
    budget_mb: float
    baseline_mb: float
    rejected: tuple[str, ...]
    """Faster candidates that did not fit, one line each."""
    optimizer: str = "adamw"
    """A name in optim.OPTIMIZERS: ``adamw`` (fp32 states), ``adamw-bf16`` (bf16 moments) or
    ``adamw8bit`` (bitsandbytes, CUDA only: full fine-tuning that fits with 8-bit states is tried
    before LoRA)."""
    optimizer_state_mb: float | None = None
    """The optimizer's planned state (its bytes per trainable parameter); None in plans from before it."""
    teacher_dtype: str | None = None
    """``float32``/``bfloat16``/``float16``: the dtype the planner counted the frozen teacher in (None:
    no teacher in memory, or a plan from before it)."""
    teacher_mb: float | None = None
    """The planned teacher: its weights and one micro-batch of its logits (0 when not held)."""

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _lora_fraction(shape: ModelShape) -> float:
    """Trainable share with rank-r adapters on q, k, v, o, gate, up, down of every block."""
    per_layer = LORA_RANK * ((shape.hidden + shape.n_heads * shape.head_dim) * 2
                             + (shape.hidden + shape.n_kv_heads * shape.head_dim) * 2
                             + (shape.hidden + shape.intermediate) * 3)
    return shape.n_layers * per_layer / max(shape.params, 1)


def plan_training(student: ModelShape, *, teacher: ModelShape | None, teacher_mode: str, budget_mb: float,
                  baseline_mb: float, batch_size: int, micro_batch: int, seq_len: int, device: str = "cpu",
                  method: str = "auto", profile_name: str = "", precision: str = "fp32",
                  optimizers: Sequence[str] = ("adamw",), teacher_dtype: str | None = None,
                  checkpointing: str = "auto") -> TrainPlan:
    """The first candidate that fits (see module docstring); UsageError when none does.

    ``teacher_mode``: ``online`` (dense KD: the teacher's weights and logits in memory),
    ``cached`` (soft labels from disk) or ``none`` (response-only, endpoint logprobs).
    ``precision``: the student's autocast precision (distill/device.py); bf16/fp16 halve the saved
    activations. ``optimizers``: the names (optim.OPTIMIZERS, optim.candidates) full fine-tuning
    may use, tried in order before LoRA (LoRA uses the first); each counts its own state bytes per
    trainable parameter. ``teacher_dtype``: the online teacher's dtype name (``float32``, ``bfloat16``,
    ``float16``: its weights and logits are counted at that width; None: the autocast precision's).
    ``checkpointing``: a key of CHECKPOINTING (checked by train_setup; ``on``/``off`` leave the
    planner no choice).
    On an accelerator ``budget_mb`` is device memory and ``baseline_mb`` 0 (the measured peak there is
    torch.cuda.max_memory_allocated).
    """
    if method not in ("auto", *METHODS):
        raise UsageError(f"training method must be auto, full or lora (got {method!r})")
    methods = METHODS if method == "auto" else (method,)
    micro_batches = [m for m in range(min(micro_batch, batch_size), 0, -1) if batch_size % m == 0]
    budget = budget_mb * MIB - baseline_mb * MIB
    half = precision != "fp32"
    tdtype = teacher_dtype or _PRECISION_DTYPES[precision]
    rejected: list[str] = []
    smallest: tuple[float, str] | None = None
    candidates = [(m, o) for m in methods for o in (optimizers if m == "full" else optimizers[:1])]
    for m, optimizer in candidates:
        for ckpt in CHECKPOINTING[checkpointing]:
            for mb in micro_batches:
                est = estimate_train(student, budget_bytes=int(budget), device=device, method=m, micro_batch=mb,
                                     seq_len=seq_len, teacher=teacher if teacher_mode != "none" else None,
                                     teacher_mode="cached" if teacher_mode == "cached" else "online",
                                     lora_fraction=_lora_fraction(student), checkpointing=ckpt, half=half)
                est = _recounted(est, optimizer, teacher if teacher_mode == "online" else None, tdtype, mb * seq_len)
                peak = baseline_mb + est.total_bytes / MIB
                what = (f"{m}{_OPTIMIZER_NOTE.get(optimizer, '')}, micro-batch {mb}"
                        f"{', checkpointing' if ckpt else ''}")
                if est.fits:
                    return TrainPlan(m, mb, batch_size // mb, ckpt, round(peak, 1), budget_mb,
                                     round(baseline_mb, 1), tuple(rejected), optimizer,
                                     round(est.optimizer_bytes / MIB, 1),
                                     tdtype if teacher_mode == "online" and teacher is not None else None,
                                     round(est.teacher_bytes / MIB, 1))
                rejected.append(f"{what}: {peak:.0f} MB")
                if smallest is None or peak < smallest[0]:
                    smallest = (peak, what)
    assert smallest is not None
    raise UsageError(f"training needs at least {smallest[0]:.0f} MB ({smallest[1]}), more than the "
                     f"{budget_mb:.0f} MB profile {profile_name} allows for training on {device}",
                     hint="raise [training] memory_mb in the profile, train against cached soft labels "
                          "(--soft-labels: no teacher in memory), --optimizer adamw-bf16, --teacher-precision "
                          "bf16, or a smaller student")


_OPTIMIZER_NOTE = {"adamw8bit": ", 8-bit AdamW", "adamw-bf16": ", bf16 AdamW moments"}
_PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _recounted(est: TrainEstimate, optimizer: str, teacher: ModelShape | None, teacher_dtype: str,
               tokens: int) -> TrainEstimate:
    """``est`` with the optimizer's state at its own bytes per trainable parameter and the online
    teacher's weights and logits in ``teacher_dtype`` (memory.estimate_train counts fp32 AdamW,
    and a teacher in the activations' precision)."""
    from edgepack.distill.optim import optimizer_kind

    trainable = est.gradients_bytes // 4
    optim_b = optimizer_kind(optimizer).state_bytes * trainable
    teacher_b = est.teacher_bytes if teacher is None else \
        _DTYPE_BYTES[teacher_dtype] * (teacher.params + tokens * teacher.vocab)
    total = est.total_bytes - est.optimizer_bytes - est.teacher_bytes + optim_b + teacher_b
    return replace(est, optimizer_bytes=optim_b, teacher_bytes=teacher_b, total_bytes=total,
                   fits=total <= est.budget_bytes)
