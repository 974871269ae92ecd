"""The training memory planner: full fine-tuning or LoRA, micro-batch and gradient checkpointing.

``plan_training`` walks the candidates from the fastest, best-quality one down — full
fine-tuning before LoRA, no checkpointing before checkpointing, larger micro-batches before
smaller ones (each a divisor of the step's batch, the rest is gradient accumulation) — and
returns the first whose planned peak fits the profile's training memory (``[training] memory_mb``).
A budget nothing meets is refused before any model is loaded, with the smallest need and what
to change.

**The planned peak** is meant as an upper bound of the measured one (process RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA: distill/device.py, which also gives the budget there —
free device memory capped at the profile's). It is the sum of

* the process before any model is loaded (``baseline_mb``: Python, torch, transformers), and on
  the CPU what the training call loads after it, :data:`PROCESS_GROWTH_MB` (transformers' model
  code, the tokenizers, safetensors, the loss curve's matplotlib at save): the tests' tiny
  student (a few MB of tensors) peaks 150-195 MB above the baseline, more in a fresh clone;
* the persistent state: ``edgepack.memory.estimate_train``'s fp32 weights and gradients of the
  trainable parameters, the optimizer's state at its own bytes per trainable parameter
  (optim.OPTIMIZERS: 8 for fp32 AdamW, 4 for bf16 moments, 2 for 8-bit) and the online teacher's
  weights and one micro-batch of its logits at its dtype (``--teacher-precision``);
* the forward + backward transients of one micro-batch of ``T = micro_batch × seq_len`` tokens
  (:func:`transients`), the tensors autograd keeps for backward in a Llama decoder layer, ``a``
  bytes each (4 in fp32, 2 under bf16/fp16 autocast):

  - per layer and token ``(6·hidden + 5·q_width + 4·intermediate)·a`` (:data:`SAVED_PER_LAYER`):
    each RMSNorm keeps its input, the normalised row and the weighted row (3·hidden, twice);
    attention keeps RoPE'd queries, the keys and values repeated to every query head
    (transformers' ``repeat_kv``: a padding mask rules out SDPA's own GQA), SDPA's output and
    the contiguous copy ``o_proj`` reads (5·q_width); the MLP keeps the gate and up
    projections, SiLU's output and the product ``down_proj`` reads (4·intermediate);
  - with gradient checkpointing only each layer's input (hidden·a), plus one layer's full set,
    recomputed in backward;
  - one layer's full set again as backward's working set (the gradients of those activations);
  - the final norm (3·hidden per token) and the vocabulary-wide tensors, ``N × vocab × 4`` bytes
    each (the losses run in fp32; training takes the logits at answer positions only, so ``N`` is
    the most answer positions a micro-batch of the data has where the caller passes
    ``answer_lengths``, else every position, ``T``: a looser bound). :data:`LOGIT_COPIES` are
    alive at the head of backward — the logits, the CE's log-softmax (its 128-row chunks, all kept
    for backward), the logits' gradient, the full-size zeros each chunk's slice-backward scatters
    into, and the sparse KD's checkpointed chunk recomputation (a copy's worth); dense KD keeps
    two more (the student's tempered log-softmax and the teacher's probabilities,
    :data:`DENSE_KD_COPIES`); and in full fine-tuning the LM head's weight gradient
    (``vocab × hidden × 4``), computed whole before backward adds it into the tied embedding's
    ``.grad``;

* on the CPU, what glibc's heap keeps (:attr:`Transients.heap_retained_bytes`): blocks under
  glibc's largest dynamic mmap threshold (32 MiB) are carved from the heap and stay there when
  freed. Every step starts without gradients (``zero_grad(set_to_none=True)``): the first
  micro-batch's backward allocates the layers' gradients (heap-sized blocks) in the holes its
  freed activations leave, and the next micro-batch's activations, which no longer fit there,
  take new heap; the loss's 128-row chunks do the same. So the planner counts once more the
  heap-sized gradients (every trainable matrix under 32 MiB: all of them but a large vocabulary's
  embedding, or the LoRA adapters) and two vocabulary-wide copies (the CE's log-softmax chunks and
  the sparse KD's recomputed chunk). ``--mmap-threshold`` hands such blocks back; the planner is
  not told it and plans the default allocator. On an accelerator torch's caching allocator is
  measured by the bytes it has allocated, and nothing is added.

Measured against this arithmetic (bench/scale/memory.md: torch's live bytes from the profiler's
memory events, peak RSS with and without ``MALLOC_MMAP_THRESHOLD_``, random-init Llamas of 2-30
layers, hidden 64-576, SmolLM2's vocabulary): everything but the heap term is 0.89-1.03 of
torch's live peak given the answer positions; glibc keeps 170-560 MB beyond it, of which the heap
term covers 38-83%. So with every position counted (no ``answer_lengths``: what training passes
today) the plan bounded every measured RSS peak (0.35-0.95; bench/scale's 135M / 360M / 1B
students 0.82 / 0.90 / 0.93), while with ``answer_lengths`` it is tighter but not yet a bound everywhere
(0.98-1.16). Not counted: on-policy sampling's KV cache (sampling runs outside backward) and the
student's shared-prefix KV cache (a few MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgepack.errors import UsageError
from edgepack.memory import ModelShape, TrainEstimate, estimate_train

METHODS = ("full", "lora")
SAVED_PER_LAYER = (6, 5, 4)
"""Values a Llama decoder layer keeps for backward per token, as multiples of (hidden, query width
n_heads·head_dim, intermediate): module docstring."""
FINAL_NORM_PER_TOKEN = 3  # the last RMSNorm's input, normalised and weighted rows, × hidden
LOGIT_COPIES = 5
"""Vocabulary-wide fp32 tensors alive at the head of backward (module docstring)."""
DENSE_KD_COPIES = 2
"""More of them with dense KD: the student's tempered log-softmax and the teacher's probabilities."""
PROCESS_GROWTH_MB = 200.0
"""CPU: what a training call's process grows by besides the tensors (module docstring). Measured
on the tests' tiny student: 149 MB in a long-lived checkout's venv, 180 MB in a fresh clone's (the
same packages): the libraries' file-backed pages count in RSS, and more of them are mapped while
the files sit fresh in the page cache (``import torch`` alone: 218 vs 275 MB)."""
HEAP_BLOCK_LIMIT = 32 * 2**20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest block its dynamic threshold keeps in the heap."""
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


@dataclass(frozen=True)
class Transients:
    """One micro-batch's forward + backward memory beside the persistent state (module docstring)."""

    activations_bytes: int
    """Kept for backward (per layer, or each layer's input under checkpointing, plus one layer
    recomputed), backward's working set (one layer's worth) and the final norm."""
    logits_bytes: int
    """The vocabulary-wide tensors at the head of backward: the losses' fp32 copies and, in full
    fine-tuning, the LM head's weight gradient."""
    heap_retained_bytes: int
    """CPU only: what glibc's heap holds beyond the live tensors (module docstring)."""

    @property
    def total_bytes(self) -> int:
        return self.activations_bytes + self.logits_bytes + self.heap_retained_bytes

    def describe_mb(self) -> dict[str, float]:
        return {"activations": round(self.activations_bytes / MIB, 1), "logits": round(self.logits_bytes / MIB, 1),
                "heap_retained": round(self.heap_retained_bytes / MIB, 1)}


def transients(shape: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: bool, act_bytes: int = 4,
               dense_kd: bool = False, device: str = "cpu", lora: bool = False,
               trainable_params: int | None = None, answer_positions: int | None = None) -> Transients:
    """The forward + backward transients of one micro-batch of ``micro_batch × seq_len`` tokens
    (module docstring: what each term is). ``act_bytes``: 4 in fp32, 2 under bf16/fp16 autocast;
    ``dense_kd``: the loss compares full teacher logits (online teacher); ``device``: ``cpu`` adds
    what glibc's heap keeps; ``lora``/``trainable_params``: whose gradients that is (the adapters',
    or every parameter's); ``answer_positions``: the most answer positions a micro-batch has, where
    the data is known (None: every position, the bound that needs no data)."""
    from edgepack.distill.losses import DEFAULT_CHUNK

    tokens = micro_batch * seq_len
    hidden, width, inter = shape.hidden, shape.n_heads * shape.head_dim, shape.intermediate
    per_h, per_q, per_i = SAVED_PER_LAYER
    layer = tokens * (per_h * hidden + per_q * width + per_i * inter) * act_bytes  # one layer's saved set
    saved = shape.n_layers * (tokens * hidden * act_bytes) + layer if checkpointing else shape.n_layers * layer
    activations = saved + layer + tokens * FINAL_NORM_PER_TOKEN * hidden * 4
    positions = tokens if answer_positions is None else min(answer_positions, tokens)
    logits_one = positions * shape.vocab * 4
    # The head's weight gradient is computed whole before backward adds it into .grad (full fine-tuning:
    # LoRA's all-linear adapters leave the output layer frozen).
    head_grad = 0 if lora else shape.vocab * hidden * 4
    logits = (LOGIT_COPIES + (DENSE_KD_COPIES if dense_kd else 0)) * logits_one + head_grad
    retained = 0
    if device == "cpu":
        trainable = shape.params if trainable_params is None else trainable_params
        if not lora and shape.vocab * hidden * 4 > HEAP_BLOCK_LIMIT:  # the embedding's (and head's) gradient is mmapped
            trainable -= shape.embedding_params * (1 if shape.tied else 2)
        retained += 4 * max(trainable, 0)
        if DEFAULT_CHUNK * shape.vocab * 4 <= HEAP_BLOCK_LIMIT:  # the losses' 128-row chunks
            retained += 2 * logits_one  # the CE's log-softmax chunks, the sparse KD's recomputed chunk
    return Transients(activations, logits, retained)


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
                                     teacher_mode="cached" if teacher_mode == "cached" else "online",
                                     lora_fraction=_lora_fraction(student), checkpointing=ckpt, half=half)
                tr = transients(student, micro_batch=mb, seq_len=seq_len, checkpointing=ckpt, act_bytes=2 if half else 4,
                                dense_kd=teacher_mode == "online", device=device, lora=m == "lora",
                                trainable_params=est.gradients_bytes // 4, answer_positions=answers)
                est = _recounted(est, optimizer, teacher if teacher_mode == "online" else None, tdtype,
                                 mb * seq_len if answers is None else min(answers, mb * seq_len), tr)
                peak = baseline_mb + growth + est.total_bytes / MIB
                what = (f"{m}{_OPTIMIZER_NOTE.get(optimizer, '')}, micro-batch {mb}"
                        f"{', checkpointing' if ckpt else ''}")
                if est.fits:
                    return TrainPlan(m, mb, batch_size // mb, ckpt, round(peak, 1), budget_mb,
                                     round(baseline_mb, 1), tuple(rejected), optimizer,
                                     round(est.optimizer_bytes / MIB, 1),
                                     tdtype if teacher_mode == "online" and teacher is not None else None,
                                     round(est.teacher_bytes / MIB, 1), tr.describe_mb())
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
               tokens: int, tr: Transients) -> TrainEstimate:
    """``est`` with the optimizer's state at its own bytes per trainable parameter, the online
    teacher's weights and logits in ``teacher_dtype``, and this module's transients for its
    activations (memory.estimate_train counts fp32 AdamW, a teacher in the activations' precision
    and a coarser activation rule, which ``profiles fit`` still uses)."""
    from edgepack.distill.optim import optimizer_kind

    trainable = est.gradients_bytes // 4
    optim_b = optimizer_kind(optimizer).state_bytes * trainable
    teacher_b = est.teacher_bytes if teacher is None else \
        _DTYPE_BYTES[teacher_dtype] * (teacher.params + tokens * teacher.vocab)
    total = (est.total_bytes - est.optimizer_bytes - est.teacher_bytes - est.activations_bytes
             + optim_b + teacher_b + tr.total_bytes)
    return replace(est, optimizer_bytes=optim_b, teacher_bytes=teacher_b, activations_bytes=tr.total_bytes,
                   total_bytes=total, fits=total <= est.budget_bytes)
