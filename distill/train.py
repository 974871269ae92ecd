"""`edgepack distill train`: knowledge distillation into a smaller student.

One recipe, top to bottom:

1. setup   — read RUN/data (and a local teacher), make the student (depth-pruned teacher sized
             for the profile, or a user's HF folder), choose what it learns from (modes.py:
             the online teacher's logits, cached soft labels, an endpoint's top-k logprobs, or
             the teacher's text only), AdamW with a warmup + cosine schedule; with ``resume``
             restore the last complete checkpoint.
2. train   — per step, ``batch_size`` rows in micro-batches: the student's logits at the answer
             positions only, loss = (1-α)·KD + α·CE on the teacher's tokens (CE alone when
             response-only), gradient clipping, a checkpoint every ``save_every`` steps.
             A non-finite or exploding loss stops training; the last good state is kept.
             Under torchrun / accelerate launch the micro-batches of each step are spread
             over the processes and their gradients summed (parallel.py).
3. save    — RUN/student (or RUN/student-<variant>) as a complete HF folder (safetensors, the
             student's tokenizer and chat template, student.json, train_report.json,
             loss_curve.png), atomically.

Logits are computed only at answer positions (the LM head is the largest matmul of a small
model), and the teacher's KV cache for the prompt prefix every row shares (system prompt,
demonstrations) is computed once. Training runs on the CPU (a profile's ``train_device`` of
cuda/mps is recorded as a note, not used yet). The run is deterministic: the same seed gives
bit-identical weights, with or without an interruption and resume.
"""

from __future__ import annotations

import gc
import json
import math
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir, clean_stale, is_complete, is_temp_name, write_json
from edgepack.constants import (CHECKPOINT_DIR, DATA_DIR, LOSS_CURVE_PNG, STUDENT_DIR, STUDENT_INFO, TEACHER_CONTEXT,
                                TRAIN_FILE, TRAIN_REPORT)
from edgepack.distill.curves import loss_curve_png
from edgepack.distill.modes import DENSE, RESPONSE_ONLY, SFT, SOFT_LABELS, TOP_LOGPROBS, TrainingMode
from edgepack.distill.plan import TrainPlan
from edgepack.distill.teachers import SOURCE_FILE
from edgepack.errors import DataError, RunDirError, RuntimeFailure, UsageError
from edgepack.locks import locked_stage
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress



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
    soft_labels: bool = False
    """Distill against the cached sparse soft labels (RUN/softlabels, see softlabels.py) instead
    of the online teacher: top-k + tail for fkl/rkl/jsd, importance samples for
    ``sampled_forward_kl``. The cache is built first when missing (the teacher is needed once)."""
    soft_k: int = 32
    soft_samples: int = 0
    """Stop when a step's loss exceeds this multiple of the first step's loss."""


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
                  method: str = "auto", mlp_keep: float = 1.0) -> dict[str, Any]:
    """Distill the teacher into a student sized for the profile; return train_report.json.

    ``variant`` trains into ``RUN/student-<variant>`` (checkpoints in ``RUN/checkpoints-<variant>``)
    instead of ``RUN/student``, so baselines (``--loss sft``) and other losses share one run's data
    and are compared by ``edgepack eval RUN --variants``. ``method`` forces ``full`` fine-tuning or
    ``lora``; ``auto`` lets the planner (plan.py) choose from the profile's training memory, along
    with the micro-batch and gradient checkpointing. ``mlp_keep`` < 1 also width-prunes an ``auto``
    student's MLPs to that fraction of their channels (width.py).
    """
    import torch

    from edgepack.distill import checkpoint as ckpt
    from edgepack.distill.batching import (TeacherPrefix, answer_hidden, batch_indices, deterministic_torch,
                                           shared_prefix_len, tokenize_rows)
    from edgepack.distill.data import read_jsonl, teacher_dir_of
    from edgepack.distill.losses import DIVERGENCES, SPARSE_DIVERGENCES, blend, cross_entropy
    from edgepack.distill.modes import choose_mode, is_endpoint_run, read_data_report, tokenizer_mismatch
    from edgepack.distill.parallel import from_env

    cfg = config or TrainConfig()
    run_dir = Path(run_dir)
    data_dir, out = run_dir / DATA_DIR, run_dir / student_dir_name(variant)
    # ------------------------------------------------------------------ setup
    if not is_complete(data_dir):
        raise RunDirError(f"{data_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    data_report = read_data_report(run_dir)
    remote = is_endpoint_run(data_report)  # an endpoint teacher: its answers (and logprobs), no weights
    teacher_dir = None if remote else teacher_dir_of(run_dir)
    if teacher_dir is not None and not is_complete(teacher_dir):
        raise RunDirError(f"{teacher_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    if remote and student == "auto":
        raise UsageError("an endpoint teacher has no weights to derive an `auto` student from",
                         hint="pass --student PATH (an HF model folder) to train on the endpoint's answers")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {steps})")
    names = SPARSE_DIVERGENCES if cfg.soft_labels else {**DIVERGENCES, SFT: None}
    if cfg.batch_size % cfg.micro_batch or cfg.divergence not in names:
        raise UsageError("batch_size must be a multiple of micro_batch and divergence one of "
                         f"{', '.join(names)}")
    if cfg.soft_labels and cfg.temperature != 1.0:
        raise UsageError("cached soft labels hold the teacher at temperature 1; a tempered teacher needs "
                         "the whole vocabulary", hint="use temperature 1 with --soft-labels, or train online")
    teacher_sha = (data_report["teacher"]["sha256"] if remote
                   else json.loads((teacher_dir / SOURCE_FILE).read_text())["sha256"])
    identity = {"teacher_sha256": teacher_sha, "student": student, "steps": steps, "seed": seed,
                "profile": profile.name, "config": asdict(cfg)}
    # Absent at their defaults, so runs from before these options still resume.
    identity.update({k: v for k, v in (("method", method), ("mlp_keep", mlp_keep)) if v not in ("auto", 1.0)})
    if mlp_keep != 1.0 and student != "auto":
        raise UsageError("--mlp-keep width-prunes an `auto` student; a user's --student is trained as it is")
    if is_complete(out):
        report = json.loads((out / TRAIN_REPORT).read_text())
        if report.get("identity") != identity:
            raise RunDirError(f"{out} was trained with other settings",
                              hint="use the same --student/--steps/--seed/--profile, or a new run folder")
        return {**report, "skipped": True}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    parallel = from_env()
    baseline_mb = _rss_mb()  # the process before any model is loaded: the planner's fixed part
    peak_is_this_call = _reset_peak_rss()
    with deterministic_torch(seed):
        # The student's tokenizer reads the data: the teacher's own for ``auto`` students.
        tokenizer_dir = teacher_dir if student == "auto" else _student_dir(student)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not getattr(tok, "chat_template", None):  # every row is rendered with it; checked before any work
            raise UsageError(f"{tokenizer_dir} has no chat template, which training renders every row with",
                             hint="use a chat/instruct model, or add its template to the folder (`chat_template` "
                                  "in tokenizer_config.json, or chat_template.jinja)")
        problem = None if remote or student == "auto" else \
            tokenizer_mismatch(AutoTokenizer.from_pretrained(teacher_dir), tok)
        mode = choose_mode(data_report=data_report, divergence=cfg.divergence, soft_labels=cfg.soft_labels,
                           tokenizer_problem=problem)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = read_jsonl(data_dir / TRAIN_FILE)
        context = json.loads((data_dir / TEACHER_CONTEXT).read_text())["messages"] \
            if (data_dir / TEACHER_CONTEXT).is_file() else []
        examples, too_long = tokenize_rows(tok, rows, context, cfg.max_length)
        if not examples:
            raise DataError(f"no training row fits max_length={cfg.max_length} tokens ({too_long} too long)")
        soft: Any = None
        if mode.name == SOFT_LABELS:
            from edgepack.distill.softlabels import cache_soft_labels, open_soft_labels

            cache_soft_labels(run_dir, k=cfg.soft_k, samples=cfg.soft_samples, seed=seed, max_length=cfg.max_length,
                              progress=progress)
            soft = open_soft_labels(run_dir, max_length=cfg.max_length)
        elif mode.name == TOP_LOGPROBS:
            from edgepack.distill.endpoint_targets import EndpointTargets

            soft = EndpointTargets(tok, rows, examples)
        # A local teacher is also what an ``auto`` student is pruned from (and what a user's
        # student is compared with), so it is loaded either way; an endpoint has no weights.
        teacher = None
        if teacher_dir is not None:
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
            teacher.eval().requires_grad_(False)

        ckpt_root = run_dir / (CHECKPOINT_DIR if variant is None else f"{CHECKPOINT_DIR}-{variant}")
        if parallel.is_main:
            clean_stale(ckpt_root)  # half-written checkpoint folders of a killed run
        parallel.barrier()
        last = ckpt.latest_checkpoint(ckpt_root)
        if last is not None and not resume:
            raise RunDirError(f"{ckpt_root} holds checkpoints of an unfinished run",
                              hint="pass --resume to continue it, or delete the folder to start over")
        if last is not None:
            state = ckpt.read_state(last)
            if state["identity"] != identity:
                raise RunDirError(f"{last} belongs to a run with other settings",
                                  hint="resume with the same settings, or delete the checkpoints folder")
            description = state["student"]
            planned = state.get("plan")  # None: a checkpoint from before the planner (full, as configured)
            if planned is not None and planned["method"] == "lora":  # the adapters; the base is rebuilt
                model = _lora_resume(description, teacher, tok, last)
            else:
                model = AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32)
            plan = (TrainPlan(**{**planned, "rejected": tuple(planned["rejected"])}) if planned is not None
                    else _plan(model, teacher, mode, profile, cfg, baseline_mb, "full"))
        else:
            model, description = _make_student(student, teacher, tok, rows, profile, cfg, progress, mlp_keep)
            plan = _plan(model, teacher, mode, profile, cfg, baseline_mb, method)
            if plan.method == "lora":
                model = _with_lora(model)
        if mode.name != DENSE:
            teacher = None  # only dense KD reads the teacher while training (the planner counts it so)
            gc.collect()
        if plan.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        micro = plan.micro_batch
        model.train()

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, round(cfg.warmup_fraction * steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup, cfg))
        history: list[dict[str, Any]] = []
        start, elapsed, tokens_seen = 0, 0.0, 0
        if last is not None:
            state = ckpt.restore_training_state(last, optimizer, scheduler)
            start, history, elapsed, tokens_seen = state["step"], state["history"], state["elapsed"], state["tokens"]
        divergence = DIVERGENCES.get(cfg.divergence)
        prefix = TeacherPrefix(teacher, examples) if mode.name == DENSE else None
        # The student runs the shared prompt prefix once per micro-batch (with gradients) rather
        # than once per row; checkpointed layers would drop the prefix's KV cache, so not then.
        student_prefix = 0 if plan.checkpointing or micro < 2 else \
            shared_prefix_len([e.student_ids for e in examples], [e.student_prompt for e in examples])

        # ------------------------------------------------------------------ train
        def checkpoint(step: int) -> None:
            if parallel.is_main:  # the other ranks hold the same state
                ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                                     {"identity": identity, "student": description, "history": history,
                                      "elapsed": elapsed, "tokens": tokens_seen, "plan": plan.describe()},
                                     keep=cfg.keep_checkpoints)
            parallel.barrier()

        progress("train", start, steps)
        for step in range(start, steps):
            t0 = time.perf_counter()
            indices = batch_indices(len(examples), seed, step, cfg.batch_size)
            chosen = [examples[i] for i in indices]
            n_answer = sum(e.answer_tokens for e in chosen)  # over the global batch, on every rank
            totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
            step_tokens = 0
            micro_batches = [(indices[mb:mb + micro], chosen[mb:mb + micro]) for mb in range(0, len(chosen), micro)]
            for part_indices, part in parallel.my_share(micro_batches):
                hidden, batch = answer_hidden(model.get_decoder(), [e.student_ids for e in part],
                                              [e.student_prompt for e in part], pad_id,
                                              student_prefix if len(part) > 1 else 0)
                s_logits = model.get_output_embeddings()(hidden)
                ones = torch.ones(1, s_logits.shape[0])
                ce = cross_entropy(s_logits[None], batch.targets[None], ones)
                if mode.name == DENSE:
                    t_logits = prefix.logits(teacher, part, pad_id)
                    kd = divergence(s_logits[None], t_logits[None], ones, temperature=cfg.temperature)
                elif mode.name == SOFT_LABELS:  # cached sparse targets, aligned with ``hidden[batch.predicts]`` (checked)
                    kd = SPARSE_DIVERGENCES[cfg.divergence](s_logits, soft.targets(part_indices, part))
                elif mode.name == TOP_LOGPROBS:  # unaligned rows and end-of-turn positions are masked out
                    targets, kd_mask = soft.targets(part_indices, part)
                    kd = SPARSE_DIVERGENCES[cfg.divergence](s_logits, targets, kd_mask)
                else:  # response-only: the teacher's text is all there is to learn from
                    kd = torch.zeros(())
                loss = ce if mode.name == RESPONSE_ONLY else blend(kd, ce, cfg.alpha)
                weight = s_logits.shape[0] / n_answer  # the step loss is a mean over all answer tokens
                (loss * weight).backward()
                for key, value in (("loss", loss), ("kd", kd), ("ce", ce)):
                    totals[key] += float(value.detach()) * weight
                step_tokens += sum(len(e.student_ids) for e in part)
            parallel.sum_gradients(params)
            *sums, step_tokens = parallel.sum_values([*totals.values(), step_tokens])
            totals = dict(zip(totals, sums))
            tokens_seen += int(step_tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
            bad = _divergence_problem(totals["loss"], grad_norm, history, cfg)
            if bad:
                optimizer.zero_grad(set_to_none=True)
                # The weights are still those after the last good step: keep them.
                if step > start and step % cfg.save_every:  # (not already saved at this step)
                    checkpoint(step)
                raise RuntimeFailure(f"training stopped at step {step + 1}: {bad}",
                                     hint=f"the last good state is checkpointed in {ckpt_root}; lower the "
                                          "learning rate and rerun with --resume")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - t0
            history.append({"step": step + 1, **{k: round(v, 6) for k, v in totals.items()},
                            "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4)})
            if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
            progress("train", step + 1, steps)
            progress("train tokens", tokens_seen, None)

        # ------------------------------------------------------------------ save
        report = {
            "identity": identity,
            "steps": steps,
            "params": description["params"],
            "teacher_params": description["teacher_params"],
            "final_loss": history[-1]["loss"],
            "first_loss": history[0]["loss"],
            "loss_curve": history,
            "rows": len(rows), "rows_used": len(examples), "rows_too_long": too_long,
            "mode": mode.name,
            "mode_reason": mode.reason,
            "teacher_prefix_tokens": prefix.length if prefix is not None else None,
            "student_prefix_tokens": student_prefix,
            "soft_labels": None if mode.name != SOFT_LABELS else {"k": soft.k, "samples": soft.samples,
                                                                 "divergence": cfg.divergence},
            "endpoint_logprobs": soft.stats if mode.name == TOP_LOGPROBS else None,
            "tokens": tokens_seen,
            "wall_s": round(elapsed, 2),
            "tokens_per_s": round(tokens_seen / elapsed, 1) if elapsed else None,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_rss_scope": "this training call" if peak_is_this_call else "the whole process (peak not resettable here)",
            "plan": plan.describe(),
            "measured_over_planned_peak": round(_peak_rss_mb() / plan.planned_peak_mb, 3),
            "device": "cpu",
            "device_note": None if profile.train_device == "cpu" else
            f"profile {profile.name} trains on {profile.train_device}; this version trains on the CPU only",
            "torch_threads": torch.get_num_threads(),
            "resumed_from_step": start or None,
        }
        report["data_parallel_processes"] = parallel.world
        if not parallel.is_main:
            parallel.barrier()  # rank 0 writes the student
            return report
        for stale in out.parent.glob(f"{out.name}.tmp-*"):  # a final save that was killed
            if is_temp_name(stale.name):  # edgepack's own temporary name, never a user's folder
                shutil.rmtree(stale, ignore_errors=True)
        if plan.method == "lora":
            model = model.merge_and_unload()  # RUN/student is always a plain HF model
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _copy_tokenizer(tokenizer_dir, tmp)
            write_json(tmp / STUDENT_INFO, {**description, "teacher": str(teacher_dir or data_report["teacher"]["spec"]),
                                            "teacher_sha256": teacher_sha, "mode": mode.name,
                                            "train_config": asdict(cfg)})
            write_json(tmp / TRAIN_REPORT, report)
            loss_curve_png(history, tmp / LOSS_CURVE_PNG,
                           f"{out.name}: {mode.name} ({cfg.divergence}), {description['params'] / 1e6:.1f}M parameters")
        parallel.barrier()
        return report


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the peak is this call's (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """VmHWM (since the last reset) on Linux, else the process's lifetime ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _plan(model: Any, teacher: Any, mode: TrainingMode, profile: Profile, cfg: TrainConfig, baseline_mb: float,
          method: str) -> TrainPlan:
    from edgepack.distill.plan import plan_training
    from edgepack.distill.student import count_params
    from edgepack.profiles.fit import shape_from_config

    def shape(m: Any) -> Any:
        return shape_from_config(m.config.to_dict(), params=count_params(m))

    teacher_mode = {DENSE: "online", SOFT_LABELS: "cached"}.get(mode.name, "none")
    return plan_training(shape(model), teacher=shape(teacher) if teacher is not None else None,
                         teacher_mode=teacher_mode, budget_mb=profile.train_memory_mb, baseline_mb=baseline_mb,
                         batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, seq_len=cfg.max_length,
                         method=method, profile_name=profile.name)


def _with_lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    from edgepack.distill.plan import LORA_RANK

    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def _lora_resume(description: dict[str, Any], teacher: Any, tok: Any, last: Path) -> Any:
    """The base student rebuilt exactly (kept blocks, or the user's folder) with the checkpoint's adapters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import prune_teacher

    if description["source"] == "auto":
        base, _ = prune_teacher(teacher, tok, keep=description["kept_layers"],
                                kept_channels=description.get("kept_channels"))
    else:
        base = AutoModelForCausalLM.from_pretrained(description["source"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, last, is_trainable=True)


def _lr_factor(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _divergence_problem(loss: float, grad_norm: float, history: list[dict[str, Any]], cfg: TrainConfig) -> str | None:
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    if history and loss > cfg.explode_factor * max(history[0]["loss"], 1e-3):
        return f"the loss exploded to {loss:.4g} (first step: {history[0]['loss']:.4g})"
    return None


def _student_dir(spec: str) -> Path:
    from edgepack.distill.teachers import check_hf_dir

    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--student must be `auto` or an HF model folder (got {spec!r})")
    check_hf_dir(path)
    return path


def _make_student(spec: str, teacher: Any, tok: Any, rows: list[dict[str, Any]], profile: Profile,
                  cfg: TrainConfig, progress: ProgressFn, mlp_keep: float = 1.0) -> tuple[Any, dict[str, Any]]:
    """``auto``: the depth-pruned teacher; else an HF folder (a local teacher: no larger than it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import choose_num_layers, count_params, prune_teacher

    if spec == "auto":
        sizing = choose_num_layers(teacher, profile)
        from edgepack.runtime.chat.tokens import hf_chat_ids

        # Calibration sees the ids training sees: message text never parsed for control tokens.
        texts = [hf_chat_ids(tok, r["messages"] + [{"role": "assistant", "content": r["response"]}],
                             add_generation_prompt=False) for r in rows[: cfg.calibration_rows]]
        model, description = prune_teacher(teacher, tok, calibration=texts, num_layers=sizing["num_layers"],
                                           max_length=cfg.max_length, mlp_keep=mlp_keep, progress=progress)
        return model, {"source": "auto", **description, "sizing": sizing}
    path = _student_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n, n_teacher = count_params(model), (count_params(teacher) if teacher is not None else None)
    if n_teacher is not None and n > n_teacher:
        raise UsageError(f"student {path} has {n:,} parameters, more than the teacher's {n_teacher:,}",
                         hint="a student is the smaller model: pick one with fewer parameters, or --student auto")
    return model, {"source": str(path), "method": "user-provided student", "params": n, "teacher_params": n_teacher,
                   "num_layers": model.config.num_hidden_layers}


def _copy_tokenizer(teacher_dir: Path, dst: Path) -> None:
    from edgepack.distill.teachers import HF_TOKENIZER_FILES

    for name in HF_TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, dst / name)
