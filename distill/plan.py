"""The training memory planner: full fine-tuning or LoRA, micro-batch and gradient checkpointing.

``plan_training`` walks the candidates from the fastest, best-quality one down — full
fine-tuning before LoRA, no checkpointing before checkpointing, larger micro-batches before
smaller ones (each a divisor of the step's batch, the rest is gradient accumulation) — and
returns the first whose planned peak fits the profile's training memory (``[training] memory_mb``).
A budget nothing meets is refused before any model is loaded, with the smallest need and what
to change.

**The planned peak** (meant as an upper bound of the measured one: process RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA) is the process before any model is loaded
(``baseline_mb``: Python, torch, transformers), on the CPU what the training call loads after it
(``PROCESS_GROWTH_MB``), and ``edgepack.train_memory.estimate_train``: the first-principles count
of the step's tensors that ``profiles fit`` shows too — its module docstring has the arithmetic and
how it was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgepack.errors import UsageError
from edgepack.memory import ModelShape
from edgepack.train_memory import MIB, PROCESS_GROWTH_MB, estimate_train

METHODS = ("full", "lora")
CHECKPOINTING = {"auto": (False, True), "on": (True,), "off": (False,)}
"""``--checkpointing``: the gradient-checkpointing settings the planner may try, in order."""


@dataclass(frozen=True)
class TrainPlan:
    method: str
    """``full`` or ``lora`` (rank train_memory.LORA_RANK on every linear layer, merged into the student at the end)."""
    micro_batch: int
    grad_accumulation: int
    checkpointing: bool
    planned_peak_mb: float
    """Baseline RSS + the process's growth on the CPU + the estimate (meant as an upper bound: module docstring)."""
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
    transients_mb: dict[str, float] | None = None
    """The planned forward + backward transients by part (:class:`Transients`); None in plans from before it."""

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def plan_training(student: ModelShape, *, teacher: ModelShape | None, teacher_mode: str, budget_mb: float,
                  baseline_mb: float, batch_size: int, micro_batch: int, seq_len: int, device: str = "cpu",
                  method: str = "auto", profile_name: str = "", precision: str = "fp32",
                  optimizers: Sequence[str] = ("adamw",), teacher_dtype: str | None = None,
                  checkpointing: str = "auto", answer_lengths: Sequence[int] | None = None) -> TrainPlan:
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
    ``answer_lengths``: each training row's answer tokens, where the data is known: a micro-batch of
    ``m`` rows then counts the vocabulary-wide tensors at the ``m`` longest answers' positions
    rather than at every position of ``m × seq_len`` (pass the longest row as ``seq_len`` too);
    tighter, but not yet an upper bound everywhere (module docstring).
    On an accelerator ``budget_mb`` is device memory and ``baseline_mb`` 0 (the measured peak there is
    torch.cuda.max_memory_allocated).
    """
    from edgepack.distill.optim import optimizer_kind

    if method not in ("auto", *METHODS):
        raise UsageError(f"training method must be auto, full or lora (got {method!r})")
    methods = METHODS if method == "auto" else (method,)
    micro_batches = [m for m in range(min(micro_batch, batch_size), 0, -1) if batch_size % m == 0]
    growth = PROCESS_GROWTH_MB if device == "cpu" else 0.0
    budget = (budget_mb - baseline_mb - growth) * MIB
    half = precision != "fp32"
    tdtype = teacher_dtype or _PRECISION_DTYPES[precision]
    rejected: list[str] = []
    smallest: tuple[float, str] | None = None
    candidates = [(m, o) for m in methods for o in (optimizers if m == "full" else optimizers[:1])]
    for m, optimizer in candidates:
        for ckpt in CHECKPOINTING[checkpointing]:
            for mb in micro_batches:
                answers = None if answer_lengths is None else sum(sorted(answer_lengths, reverse=True)[:mb])
                est = estimate_train(student, budget_bytes=int(budget), device=device, method=m, micro_batch=mb,
                                     seq_len=seq_len, teacher=teacher if teacher_mode != "none" else None,
                                     teacher_mode=teacher_mode, checkpointing=ckpt, half=half,
                                     optimizer_state_bytes=optimizer_kind(optimizer).state_bytes,
                                     teacher_dtype_bytes=_DTYPE_BYTES[tdtype], answer_positions=answers)
                peak = baseline_mb + growth + est.total_bytes / MIB
                what = (f"{m}{_OPTIMIZER_NOTE.get(optimizer, '')}, micro-batch {mb}"
                        f"{', checkpointing' if ckpt else ''}")
                if est.fits:
                    return TrainPlan(m, mb, batch_size // mb, ckpt, round(peak, 1), budget_mb,
                                     round(baseline_mb, 1), tuple(rejected), optimizer,
                                     round(est.optimizer_bytes / MIB, 1),
                                     tdtype if teacher_mode == "online" and teacher is not None else None,
                                     round(est.teacher_bytes / MIB, 1), est.transients.describe_mb())
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
