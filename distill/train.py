"""`edgepack distill train`: knowledge distillation into a smaller student.

One recipe, top to bottom (:func:`train_student`), each part a function of its own module:

1. setup (train_setup.py) — check RUN/data, the teacher and the options; read the rows with the
   student's tokenizer and choose what the student learns from (modes.py: the online teacher's
   logits, cached soft labels, an endpoint's top-k logprobs, or the teacher's text only); make
   the student (depth-pruned teacher sized for the profile, or a user's HF folder), plan its
   memory (full or LoRA), AdamW with a warmup + cosine schedule; with ``resume`` restore the
   last complete checkpoint.
2. step (train_step.py) — per step, ``batch_size`` rows in micro-batches: the student's logits
   at the answer positions only, the mode's loss from a registry keyed by mode name
   (train_loss.py: (1-α)·KD + α·CE on the teacher's tokens, CE alone when response-only),
   backward, gradient clipping, the optimizer step. A non-finite or exploding loss is not
   applied: training stops and the last good state is checkpointed. With ``on_policy`` (GKD's
   λ, onpolicy.py) a fraction of the steps first replaces each row's answer with a completion
   the student samples, and takes KD alone against the teacher's scores of those tokens (the
   local teacher, the run's GGUF through llama.cpp, or the endpoint). Under torchrun /
   accelerate launch the micro-batches of each step are spread over the processes and their
   gradients summed (parallel.py).
3. checkpoint (train_save.py) — every ``save_every`` steps, RUN/checkpoints/step-N (checkpoint.py).
4. save (train_save.py) — RUN/student (or RUN/student-<variant>) as a complete HF folder
   (safetensors, the student's tokenizer and chat template, student.json, train_report.json,
   loss_curve.png), atomically.

Logits are computed only at answer positions (the LM head is the largest matmul of a small
model), and the teacher's KV cache for the prompt prefix every row shares (system prompt,
demonstrations) is computed once. Training runs on ``device`` (device.py: ``--device``, else the
profile's ``[training] device``; refused before anything is loaded when absent), in fp32 on the
CPU by default and under bf16/fp16 autocast on accelerators. On the CPU the run is deterministic:
the same seed gives bit-identical weights, with or without an interruption and resume. On an
accelerator a resume continues at the same step, data position and RNG state, and the report
says the weights are not bit-reproducible.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import is_complete
from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
from edgepack.distill.modes import SFT
from edgepack.errors import RunDirError, RuntimeFailure, UsageError
from edgepack.locks import locked_stage
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    from edgepack.distill.parallel import DataParallel
    from edgepack.distill.train_setup import TrainingRun, TrainRequest
    from edgepack.distill.train_step import TrainState


# CLI loss names → divergence names (losses.DIVERGENCES / SPARSE_DIVERGENCES); ``sft`` is
# cross-entropy on the teacher's text only (the SFT-only baseline, modes.RESPONSE_ONLY).
LOSS_NAMES = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd", "sampled": "sampled_forward_kl", "sft": SFT}


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of the KD recipe (defaults: the demo, ~30 steps on 2 CPU cores)."""

    lr: float = 3e-4
    batch_size: int = 4
    """Rows per optimizer step."""
    micro_batch: int = 2
    """Rows per forward/backward; gradients accumulate over batch_size / micro_batch."""
    max_length: int = 256
    """Student prompt + answer tokens; longer rows are skipped (counted in the report)."""
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr × min_lr_ratio."""
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    divergence: str = "forward_kl"
    """Name in losses.DIVERGENCES (SPARSE_DIVERGENCES with soft labels), or ``sft``."""
    temperature: float = 1.0
    alpha: float = 0.2
    """Weight of cross-entropy on the teacher's tokens; 1 - alpha weights the KD term."""
    save_every: int = 10
    keep_checkpoints: int = 1
    calibration_rows: int = 16
    """Training rows used to rank blocks when the student is derived (``auto``)."""
    explode_factor: float = 10.0
    """Stop when a step's loss exceeds this multiple of the first step's loss."""
    soft_labels: bool = False
    """Distill against the cached sparse soft labels (RUN/softlabels, see softlabels.py) instead
    of the online teacher: top-k + tail for fkl/rkl/jsd, importance samples for
    ``sampled_forward_kl``. The cache is built first when missing (the teacher is needed once)."""
    soft_k: int = 32
    """Top-k tokens per answer position kept in the soft-label cache."""
    soft_samples: int = 0
    """Tokens drawn from the teacher per position for ``sampled_forward_kl`` (0: none cached)."""
    on_policy: float = 0.0
    """GKD's λ: the fraction of steps whose completions the student samples and the teacher
    scores (onpolicy.py); 0 trains off-policy only."""
    on_policy_temperature: float = 1.0
    """The student's sampling temperature on on-policy steps."""
    on_policy_max_new: int = 0
    """Most tokens a sampled completion has (0: the longest answer in the training data)."""
    on_policy_teacher: str = "auto"
    """Who scores the sampled tokens: ``hf``, ``gguf``, ``endpoint`` or ``auto`` (onpolicy.SCORERS)."""
    on_policy_after: int = 0
    """Off-policy warm-up: the first this many optimizer steps train on the teacher's answers
    whatever λ is; λ applies from this step on (0: from the first step)."""
    optimizer: str = "auto"
    """A name in optim.OPTIMIZERS (``adamw``: fp32 moments; ``adamw-bf16``: bf16 moments, half the
    state; ``adamw8bit``: bitsandbytes on CUDA), or ``auto``: the planner chooses (plan.py)."""
    teacher_precision: str = "auto"
    """The frozen teacher's dtype (device.TEACHER_PRECISIONS): ``auto`` is fp32 on the CPU and the
    autocast precision on accelerators; ``bf16`` halves it on the CPU (logits widened for the loss)."""
    checkpointing: str = "auto"
    """Gradient checkpointing (plan.CHECKPOINTING): ``auto`` lets the planner turn it on when the
    profile's memory is short; ``on`` always (each block recomputed in backward: less memory, more
    compute); ``off`` never."""
    mmap_threshold: int = 0
    """glibc's M_MMAP_THRESHOLD in bytes for the training process (device.set_mmap_threshold): blocks
    this large are returned to the OS when freed, which lowers the peak at some speed; 0: glibc's default."""


ON_POLICY_DEFAULTS = {"on_policy": 0.0, "on_policy_temperature": 1.0, "on_policy_max_new": 0, "on_policy_teacher": "auto",
                      "on_policy_after": 0}
"""The on-policy fields at their defaults are left out of a run's identity, so that runs trained
before on-policy distillation existed still resume and are still recognised as finished."""

IDENTITY_DEFAULTS = {**ON_POLICY_DEFAULTS, "optimizer": "auto", "teacher_precision": "auto",
                     "checkpointing": "auto", "mmap_threshold": 0}
"""Every TrainConfig field added after runs existed, at its default: left out of the run's identity
(train_setup.check_inputs), so those runs still resume and are still recognised as finished."""


def identity_config(config: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that make a run's identity: all of them but those at IDENTITY_DEFAULTS."""
    return {k: v for k, v in asdict(config).items() if IDENTITY_DEFAULTS.get(k, object()) != v}


def student_dir_name(variant: str | None = None) -> str:
    """``student``, or ``student-<variant>`` for a variant trained beside it (e.g. an SFT-only baseline)."""
    if variant is None:
        return STUDENT_DIR
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", variant):
        raise UsageError(f"--variant {variant!r} must be 1-32 characters of a-z, 0-9, _ and -, starting with a letter "
                         "or digit")
    return f"{STUDENT_DIR}-{variant}"


@locked_stage("distill train", lambda kw: kw["run_dir"], rank_zero_only=True)
def train_student(*, run_dir: Path, profile: Profile, student: str = "auto", steps: int = 20, seed: int = 0,
                  resume: bool = False, progress: ProgressFn = null_progress,
                  config: TrainConfig | None = None, variant: str | None = None,
                  method: str = "auto", mlp_keep: float = 1.0, license: str | None = None,
                  device: str | None = None, precision: str = "auto") -> dict[str, Any]:
    """Distill the teacher into a student sized for the profile; return train_report.json.

    ``variant`` trains into ``RUN/student-<variant>`` (checkpoints in ``RUN/checkpoints-<variant>``)
    instead of ``RUN/student``, so baselines (``--loss sft``) and other losses share one run's data
    and are compared by ``edgepack eval RUN --variants``. ``method`` forces ``full`` fine-tuning or
    ``lora``; ``auto`` lets the planner (plan.py) choose from the profile's training memory, along
    with the micro-batch and gradient checkpointing. ``mlp_keep`` < 1 also width-prunes an ``auto``
    student's MLPs to that fraction of their channels (width.py). ``license`` is the Hub license id
    the student's model card (README.md) states; by default the teacher's recorded one.
    ``device`` is cpu, cuda, mps or auto (None: the profile's ``[training] device``) and
    ``precision`` fp32, bf16, fp16 or auto (device.py); an absent device is refused before any work.
    """
    from edgepack.distill.device import (peak_memory_mb, reset_peak_memory, resolve_device, seeded,
                                         set_mmap_threshold)
    from edgepack.distill.parallel import from_env
    from edgepack.distill.train_save import peak_rss_mb, reset_peak_rss, rss_mb, save_student, train_report
    from edgepack.distill.train_setup import TrainRequest, build_training, check_inputs, read_training_data

    resolved = resolve_device(device, profile.train_device, precision)
    request = TrainRequest(run_dir=Path(run_dir), profile=profile, config=config or TrainConfig(),
                           out=Path(run_dir) / student_dir_name(variant), student=student, steps=steps, seed=seed,
                           resume=resume, variant=variant, method=method, mlp_keep=mlp_keep,
                           license=license, device=resolved)
    inputs = check_inputs(request)
    if is_complete(request.out):
        return _finished(request.out, inputs.identity)
    if request.config.mmap_threshold:  # before any model is allocated
        set_mmap_threshold(request.config.mmap_threshold)
    parallel = from_env(resolved)
    # The process before any model is loaded: the planner's fixed part (on an accelerator the
    # planner plans device memory, which starts empty).
    baseline_mb = rss_mb() if resolved.name == "cpu" else 0.0
    peak_is_this_call = reset_peak_rss()
    reset_peak_memory(resolved)
    with seeded(resolved, seed):
        data = read_training_data(request, inputs, progress)
        run = build_training(request, inputs, data, baseline_mb=baseline_mb, parallel=parallel, progress=progress)
        state = _train(request, inputs.identity, run, parallel, progress)
        report = train_report(request, inputs, data, run, state, peak_mb=peak_memory_mb(resolved, peak_rss_mb()),
                              peak_is_this_call=peak_is_this_call, world=parallel.world)
        if parallel.is_main:  # rank 0 writes the student; the others wait for it
            save_student(request, inputs, data, run.trainee, report)
        parallel.barrier()
        return report


def _finished(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The report of a student already trained with these settings (skipped); RunDirError for others."""
    report = json.loads((out / TRAIN_REPORT).read_text())
    if report.get("identity") != identity:
        raise RunDirError(f"{out} was trained with other settings",
                          hint="use the same --student/--steps/--seed/--profile, or a new run folder")
    return {**report, "skipped": True}


def _train(request: TrainRequest, identity: dict[str, Any], run: TrainingRun, parallel: DataParallel,
           progress: ProgressFn) -> TrainState:
    """Steps from where setup left off to ``request.steps``, checkpointing every ``save_every``."""
    from edgepack.distill.train_save import save_progress
    from edgepack.distill.train_step import train_step

    cfg, steps, state = request.config, request.steps, run.start
    progress("train", state.step, steps)
    while state.step < steps:
        result = train_step(run.trainee, run.data, run.objective, state, cfg, parallel)
        if result.problem:
            # The weights are still those after the last good step: keep them (unless this
            # call made no step, or that step was just saved).
            if state.step > run.start.step and state.step % cfg.save_every:
                save_progress(request.checkpoints, run.trainee, state, identity, keep=cfg.keep_checkpoints,
                              parallel=parallel)
            raise RuntimeFailure(f"training stopped at step {state.step + 1}: {result.problem}",
                                 hint=f"the last good state is checkpointed in {request.checkpoints}; lower the "
                                      "learning rate and rerun with --resume")
        state = result.state
        if state.step % cfg.save_every == 0 and state.step < steps:
            save_progress(request.checkpoints, run.trainee, state, identity, keep=cfg.keep_checkpoints,
                          parallel=parallel)
        progress("train", state.step, steps)
        progress("train tokens", state.tokens, None)
    return state
