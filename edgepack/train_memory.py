"""Training memory from first principles: one estimate for ``distill train``'s planner and ``profiles fit``.

:func:`estimate_train` counts what one training step of a decoder-only student holds at its peak —
for a given method (full fine-tuning or LoRA), micro-batch, sequence length, gradient
checkpointing, autocast precision, optimizer and teacher — from the model's shape alone (no model
is loaded). ``distill/plan.py`` walks the candidates with it and keeps the first that fits the
profile's training memory; ``profiles fit`` shows the default candidate for a model before any
training. Both read this module, so they cannot disagree.

**The planned peak** is meant as an upper bound of the measured one (process RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA: distill/device.py, which also gives the budget there —
free device memory capped at the profile's). It is the sum of

* the process before any model is loaded (``baseline_mb``: Python, torch, transformers), and on
  the CPU what the training call loads after it, :data:`PROCESS_GROWTH_MB` (transformers' model
  code, the tokenizers, safetensors, the loss curve's matplotlib at save): the tests' tiny
  student (a few MB of tensors) peaks 150-195 MB above the baseline, more in a fresh clone;
* the persistent state: the student's fp32 weights, the fp32 gradients of the trainable
  parameters, the optimizer's state at its own bytes per trainable parameter
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

from dataclasses import dataclass

from edgepack.memory import ModelShape

MIB = 2**20
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
LOSS_CHUNK_ROWS = 128
"""The rows the losses (distill/losses.py ``DEFAULT_CHUNK``) take their vocabulary-wide softmaxes in."""
LORA_RANK = 16
"""The adapters' rank on every linear layer of a block (distill/train_setup.py builds them)."""
ADAMW_STATE_BYTES = 8
"""fp32 AdamW's two moments per trainable parameter (distill/optim.py gives each optimizer's own)."""
SOFT_LABEL_BYTES_PER_POSITION = 32 * 8
"""A micro-batch's cached top-k targets per answer position (k = 32 ids and logprobs, read from disk)."""


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
        if LOSS_CHUNK_ROWS * shape.vocab * 4 <= HEAP_BLOCK_LIMIT:  # the losses' 128-row chunks
            retained += 2 * logits_one  # the CE's log-softmax chunks, the sparse KD's recomputed chunk
    return Transients(activations, logits, retained)


def lora_fraction(shape: ModelShape) -> float:
    """Trainable share with rank-:data:`LORA_RANK` adapters on q, k, v, o, gate, up, down of every block."""
    per_layer = LORA_RANK * ((shape.hidden + shape.n_heads * shape.head_dim) * 2
                             + (shape.hidden + shape.n_kv_heads * shape.head_dim) * 2
                             + (shape.hidden + shape.intermediate) * 3)
    return shape.n_layers * per_layer / max(shape.params, 1)


@dataclass(frozen=True)
class TrainEstimate:
    """Peak memory of one training step's tensors, its parts, and whether it fits ``budget_bytes``
    (the process itself — Python, torch, :data:`PROCESS_GROWTH_MB` — is the caller's to add)."""

    device: str
    method: str
    micro_batch: int
    seq_len: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    """The micro-batch's forward + backward transients (``transients``' total)."""
    teacher_bytes: int
    total_bytes: int
    budget_bytes: int
    fits: bool
    transients: Transients


def estimate_train(shape: ModelShape, *, budget_bytes: int, device: str, method: str = "full",
                   micro_batch: int = 4, seq_len: int = 256, teacher: ModelShape | None = None,
                   teacher_mode: str = "online", checkpointing: bool = False, half: bool = False,
                   optimizer_state_bytes: int = ADAMW_STATE_BYTES, teacher_dtype_bytes: int | None = None,
                   answer_positions: int | None = None) -> TrainEstimate:
    """One training step of ``shape`` (module docstring): fp32 weights, fp32 gradients of the
    trainable parameters (every one, or LoRA's adapters), the optimizer's state
    (``optimizer_state_bytes`` per trainable parameter), the teacher and one micro-batch's
    transients.

    ``teacher_mode``: ``online`` (the teacher's weights and one micro-batch of its logits at
    ``teacher_dtype_bytes``, by default the autocast precision's), ``cached`` (top-k soft labels
    read from disk) or ``none`` (no teacher in memory). ``half``: bf16/fp16 autocast on an
    accelerator — saved activations at half precision, the losses (and so the logits) in fp32.
    ``answer_positions``: the most answer positions a micro-batch has, where the data is known."""
    act = 2 if half else 4
    trainable = shape.params if method == "full" else int(shape.params * lora_fraction(shape))
    tokens = micro_batch * seq_len
    positions = tokens if answer_positions is None else min(answer_positions, tokens)
    online = teacher is not None and teacher_mode == "online"
    tr = transients(shape, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing, act_bytes=act,
                    dense_kd=teacher_mode == "online", device=device, lora=method == "lora", trainable_params=trainable,
                    answer_positions=answer_positions)
    teacher_b = 0
    if online:
        assert teacher is not None
        teacher_b = (teacher_dtype_bytes or act) * (teacher.params + positions * teacher.vocab)
    elif teacher is not None and teacher_mode == "cached":
        teacher_b = tokens * SOFT_LABEL_BYTES_PER_POSITION
    weights, grads, optim = 4 * shape.params, 4 * trainable, optimizer_state_bytes * trainable
    total = weights + grads + optim + tr.total_bytes + teacher_b
    return TrainEstimate(device, method, micro_batch, seq_len, weights, grads, optim, tr.total_bytes,
                         teacher_b, total, budget_bytes, total <= budget_bytes, tr)
