"""Setup of the KD recipe (train.py): from the run dir to a student ready for its first step.

Three parts, in the order the recipe calls them:

1. :func:`check_inputs` — RUN/data and the teacher are complete, the options agree, and the
   run's identity (teacher hash, student, steps, seed, profile, config) is known; nothing is
   loaded yet, so a wrong option fails in a moment.
2. :func:`read_training_data` — the student's tokenizer (the teacher's for ``auto``), the
   training mode (modes.py), the tokenized rows, and the sparse targets of the sparse modes
   (cached soft labels, built first when missing; an endpoint's top-k logprobs).
3. :func:`build_training` — the local teacher, the student (depth-pruned teacher sized for the
   profile, or a user's HF folder; or the last complete checkpoint with ``resume``), the memory
   plan (full or LoRA, micro-batch, gradient checkpointing), AdamW with a warmup + cosine
   schedule, and the mode's objective (train_loss.py).

Each returns a frozen dataclass that the next part and the step (train_step.py) read.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgepack.atomic import clean_stale, is_complete
from edgepack.constants import CHECKPOINT_DIR, DATA_DIR, TEACHER_CONTEXT, TRAIN_FILE
from edgepack.distill import checkpoint as ckpt
from edgepack.distill import onpolicy, optim
from edgepack.distill.batching import Example, TeacherPrefix, shared_prefix_len, tokenize_rows
from edgepack.distill.data import read_jsonl, teacher_dir_of
from edgepack.distill.device import CPU, Device, bitsandbytes_usable, check_teacher_precision
from edgepack.distill.losses import DIVERGENCES, SPARSE_DIVERGENCES
from edgepack.distill.modes import (SFT, SOFT_LABELS, TOP_LOGPROBS, TrainingMode, choose_mode, is_endpoint_run,
                                    read_data_report, tokenizer_mismatch)
from edgepack.distill.parallel import DataParallel
from edgepack.distill.plan import CHECKPOINTING, TrainPlan
from edgepack.distill.teachers import SOURCE_FILE
from edgepack.distill.train_loss import Objective, OnlineTeacher, Targets
from edgepack.distill.train_step import StepData, Trainee, TrainState
from edgepack.errors import DataError, RunDirError, UsageError
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    from edgepack.distill.train import TrainConfig


@dataclass(frozen=True)
class TrainRequest:
    """What :func:`edgepack.distill.train.train_student` was asked for (its config defaulted)."""

    run_dir: Path
    profile: Profile
    config: TrainConfig
    out: Path
    """RUN/student, or RUN/student-<variant>."""
    student: str = "auto"
    steps: int = 20
    seed: int = 0
    resume: bool = False
    variant: str | None = None
    method: str = "auto"
    mlp_keep: float = 1.0
    license: str | None = None
    """The Hub license id the student's model card states (None: the teacher's recorded one)."""
    device: Device = CPU
    """Where training runs and in what precision (device.py), resolved before anything is loaded."""

    @property
    def checkpoints(self) -> Path:
        """RUN/checkpoints, or RUN/checkpoints-<variant>."""
        return self.run_dir / (CHECKPOINT_DIR if self.variant is None else f"{CHECKPOINT_DIR}-{self.variant}")


@dataclass(frozen=True)
class RunInputs:
    """What the earlier stages left in the run dir, and the identity of this training run."""

    data_report: dict[str, Any]
    teacher_dir: Path | None
    """The local teacher's folder; None for an endpoint teacher (no weights)."""
    teacher_sha256: str
    identity: dict[str, Any]
    """Recorded in checkpoints and train_report.json; a rerun or resume must match it."""


@dataclass(frozen=True)
class TrainData:
    """The rows as the student's tokenizer sees them, and what the student learns from."""

    tokenizer: Any
    tokenizer_dir: Path
    pad_id: int
    rows: list[dict[str, Any]]
    examples: list[Example]
    """The rows that fit max_length, tokenized."""
    too_long: int
    mode: TrainingMode
    sparse: Targets | None = None
    """SoftLabels (soft-labels) or EndpointTargets (top-logprobs); None for the other modes."""
    on_policy: str | None = None
    """The scorer of on-policy steps (onpolicy.SCORERS); None: off-policy only."""

    @property
    def teacher_while_training(self) -> str:
        """How the teacher is held while training: the mode's, or ``online`` for the HF on-policy scorer."""
        return onpolicy.teacher_while_training(self.on_policy, self.mode)


@dataclass(frozen=True)
class TrainingRun:
    """Setup's result: everything a step reads, and where training starts."""

    trainee: Trainee
    objective: Objective
    data: StepData
    start: TrainState
    """Step 0, or the restored checkpoint's state."""


# ------------------------------------------------------------------ 1. inputs


def check_inputs(request: TrainRequest) -> RunInputs:
    """Check RUN/data, the teacher and the options; the run's identity. Loads no model."""
    data_dir = request.run_dir / DATA_DIR
    if not is_complete(data_dir):
        raise RunDirError(f"{data_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    data_report = read_data_report(request.run_dir)
    remote = is_endpoint_run(data_report)  # an endpoint teacher: its answers (and logprobs), no weights
    teacher_dir = None if remote else teacher_dir_of(request.run_dir)
    if teacher_dir is not None and not is_complete(teacher_dir):
        raise RunDirError(f"{teacher_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    if remote and request.student == "auto":
        raise UsageError("an endpoint teacher has no weights to derive an `auto` student from",
                         hint="pass --student PATH (an HF model folder) to train on the endpoint's answers")
    _check_options(request)
    onpolicy.check_options(request.config, endpoint_run=remote, steps=request.steps)
    teacher_sha = (data_report["teacher"]["sha256"] if teacher_dir is None
                   else json.loads((teacher_dir / SOURCE_FILE).read_text())["sha256"])
    from edgepack.distill.train import identity_config

    config = identity_config(request.config)
    identity = {"teacher_sha256": teacher_sha, "student": request.student, "steps": request.steps,
                "seed": request.seed, "profile": request.profile.name, "config": config}
    # Absent at their defaults, so runs from before these options still resume.
    identity.update({k: v for k, v in (("method", request.method), ("mlp_keep", request.mlp_keep))
                     if v not in ("auto", 1.0)})
    if request.mlp_keep != 1.0 and request.student != "auto":
        raise UsageError("--mlp-keep width-prunes an `auto` student; a user's --student is trained as it is")
    return RunInputs(data_report, teacher_dir, teacher_sha, identity)


def _check_options(request: TrainRequest) -> None:
    cfg = request.config
    if request.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {request.steps})")
    names = SPARSE_DIVERGENCES if cfg.soft_labels else {**DIVERGENCES, SFT: None}
    if cfg.batch_size % cfg.micro_batch or cfg.divergence not in names:
        raise UsageError("batch_size must be a multiple of micro_batch and divergence one of "
                         f"{', '.join(names)}")
    optim.candidates(cfg.optimizer, request.device.name, bitsandbytes_usable(request.device))  # UsageError
    check_teacher_precision(request.device, cfg.teacher_precision)
    if cfg.checkpointing not in CHECKPOINTING:
        raise UsageError(f"--checkpointing {cfg.checkpointing!r} is not one of {', '.join(CHECKPOINTING)}")
    if cfg.soft_labels and cfg.temperature != 1.0:
        raise UsageError("cached soft labels hold the teacher at temperature 1; a tempered teacher needs "
                         "the whole vocabulary", hint="use temperature 1 with --soft-labels, or train online")


# ------------------------------------------------------------------ 2. data


def read_training_data(request: TrainRequest, inputs: RunInputs, progress: ProgressFn = null_progress) -> TrainData:
    """Tokenize RUN/data/train.jsonl with the student's tokenizer; choose the mode; open its sparse targets."""
    from transformers import AutoTokenizer

    cfg = request.config
    # The student's tokenizer reads the data: the teacher's own for ``auto`` students.
    tokenizer_dir = inputs.teacher_dir if request.student == "auto" else student_folder(request.student)
    assert tokenizer_dir is not None  # check_inputs: an endpoint run has a --student folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tok, "chat_template", None):  # every row is rendered with it; checked before any work
        raise UsageError(f"{tokenizer_dir} has no chat template, which training renders every row with",
                         hint="use a chat/instruct model, or add its template to the folder (`chat_template` "
                              "in tokenizer_config.json, or chat_template.jinja)")
    problem = None if inputs.teacher_dir is None or request.student == "auto" else \
        tokenizer_mismatch(AutoTokenizer.from_pretrained(inputs.teacher_dir), tok)
    mode = choose_mode(data_report=inputs.data_report, divergence=cfg.divergence, soft_labels=cfg.soft_labels,
                       tokenizer_problem=problem)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data_dir = request.run_dir / DATA_DIR
    rows = read_jsonl(data_dir / TRAIN_FILE)
    context = json.loads((data_dir / TEACHER_CONTEXT).read_text())["messages"] \
        if (data_dir / TEACHER_CONTEXT).is_file() else []
    examples, too_long = tokenize_rows(tok, rows, context, cfg.max_length)
    if not examples:
        raise DataError(f"no training row fits max_length={cfg.max_length} tokens ({too_long} too long)")
    scorer = onpolicy.scorer_name(cfg, mode, request.run_dir)
    if cfg.teacher_precision != "auto" and onpolicy.teacher_while_training(scorer, mode) != "online":
        on = f", on-policy scorer {scorer}" if scorer else ""
        raise UsageError(f"--teacher-precision {cfg.teacher_precision}: this run ({mode.name} distillation{on}) "
                         "holds no teacher in torch while training",
                         hint="drop --teacher-precision: it sets the dtype of the online teacher (dense KD, hf scorer)")
    opener = SPARSE_TARGETS.get(mode.name)
    sparse = opener(request, tok, rows, examples, progress) if opener is not None else None
    return TrainData(tok, tokenizer_dir, pad_id, rows, examples, too_long, mode, sparse, scorer)


def _cached_soft_labels(request: TrainRequest, tok: Any, rows: list[dict[str, Any]], examples: list[Example],
                        progress: ProgressFn) -> Targets:
    from edgepack.distill.softlabels import cache_soft_labels
    from edgepack.distill.softlabels_read import open_soft_labels

    cfg = request.config
    cache_soft_labels(request.run_dir, k=cfg.soft_k, samples=cfg.soft_samples, seed=request.seed,
                      max_length=cfg.max_length, progress=progress, device=request.device)
    return open_soft_labels(request.run_dir, max_length=cfg.max_length)


def _endpoint_logprobs(request: TrainRequest, tok: Any, rows: list[dict[str, Any]], examples: list[Example],
                       progress: ProgressFn) -> Targets:
    from edgepack.distill.endpoint_targets import EndpointTargets

    return EndpointTargets(tok, rows, examples)


# The sparse modes' targets by exact mode name, opened before any model is loaded (the soft-label
# cache loads the teacher itself). Dense KD's targets are the teacher (build_training); the
# response-only mode has none.
SPARSE_TARGETS: dict[str, Callable[[TrainRequest, Any, list[dict[str, Any]], list[Example], ProgressFn], Targets]] = {
    SOFT_LABELS: _cached_soft_labels,
    TOP_LOGPROBS: _endpoint_logprobs,
}


# ------------------------------------------------------------------ 3. models, plan, optimizer


def build_training(request: TrainRequest, inputs: RunInputs, data: TrainData, *, baseline_mb: float,
                   parallel: DataParallel = DataParallel(), progress: ProgressFn = null_progress) -> TrainingRun:
    """The teacher, the student (new or resumed), its plan, AdamW and the objective (module docstring)."""
    from transformers import AutoModelForCausalLM

    # A local teacher is also what an ``auto`` student is pruned from (and what a user's
    # student is compared with); an endpoint has no weights.
    teacher = None
    if inputs.teacher_dir is not None:
        teacher = _load_teacher(inputs.teacher_dir,
                                weights=request.student == "auto" or data.teacher_while_training == "online")
    last = _last_checkpoint(request, parallel)
    if last is not None:
        model, description, plan = _resumed_student(request, inputs, data, teacher, last, baseline_mb)
    else:
        model, description, plan = _new_student(request, data, teacher, baseline_mb, progress)
    if data.teacher_while_training != "online":
        teacher = None  # only dense KD (or on-policy scoring in torch) reads it while training; the planner counts it so
        gc.collect()
    device = request.device
    # The student keeps fp32 master weights on the device (autocast lowers its forward); the frozen
    # teacher, which only runs forward, is held in the device's half precision (fp32 on the CPU), or
    # as --teacher-precision says. An ``auto`` student was pruned from the fp32 teacher above.
    model = model.to(device.name)
    if teacher is not None:
        teacher = teacher.to(device.name, dtype=device.teacher_dtype_for(request.config.teacher_precision))
    if plan.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainee = _trainee(model, description, plan, request)
    start = TrainState() if last is None else \
        TrainState.from_checkpoint(ckpt.restore_training_state(last, trainee.optimizer, trainee.scheduler))
    with device.placement():  # the teacher's shared-prefix KV cache is computed on the device
        objective = _objective(request, inputs, data, teacher)
    # The student runs the shared prompt prefix once per micro-batch (with gradients) rather
    # than once per row; checkpointed layers would drop the prefix's KV cache, so not then.
    student_prefix = 0 if plan.checkpointing or plan.micro_batch < 2 else \
        shared_prefix_len([e.student_ids for e in data.examples], [e.student_prompt for e in data.examples])
    return TrainingRun(trainee, objective, StepData(data.examples, request.seed, data.pad_id, student_prefix), start)


def _last_checkpoint(request: TrainRequest, parallel: DataParallel) -> Path | None:
    """The newest complete checkpoint of this run (half-written ones removed); refused without ``resume``."""
    root = request.checkpoints
    if parallel.is_main:
        clean_stale(root)  # half-written checkpoint folders of a killed run
    parallel.barrier()
    last = ckpt.latest_checkpoint(root)
    if last is not None and not request.resume:
        raise RunDirError(f"{root} holds checkpoints of an unfinished run",
                          hint="pass --resume to continue it, or delete the folder to start over")
    return last


def _load_teacher(folder: Path, *, weights: bool) -> Any:
    """The frozen teacher: its fp32 weights where something reads them (an ``auto`` student is
    pruned from them; dense KD and the hf scorer run them), else its shape alone on the meta
    device — parameter counts and the planner's arithmetic, no memory (a user's student trained
    on cached soft labels or endpoint logprobs never held a 1B teacher beside it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _resumed_student(request: TrainRequest, inputs: RunInputs, data: TrainData, teacher: Any, last: Path,
                     baseline_mb: float) -> tuple[Any, dict[str, Any], TrainPlan]:
    """The checkpoint's student and plan (optimizer state is restored once the optimizer exists)."""
    from transformers import AutoModelForCausalLM

    state = ckpt.read_state(last)
    if state["identity"] != inputs.identity:
        raise RunDirError(f"{last} belongs to a run with other settings",
                          hint="resume with the same settings, or delete the checkpoints folder")
    description = state["student"]
    planned = state.get("plan")  # None: a checkpoint from before the planner (full, as configured)
    if planned is not None and planned["method"] == "lora":  # the adapters; the base is rebuilt
        model = _lora_resume(description, teacher, data.tokenizer, last)
    else:
        model = AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32)
    plan = (TrainPlan(**{**planned, "rejected": tuple(planned["rejected"])}) if planned is not None
            else plan_for(model, teacher, data, request, baseline_mb, "full"))
    return model, description, plan


def _new_student(request: TrainRequest, data: TrainData, teacher: Any, baseline_mb: float,
                 progress: ProgressFn) -> tuple[Any, dict[str, Any], TrainPlan]:
    """A fresh student and the plan that fits it in the profile's training memory (LoRA adapters added)."""
    model, description = make_student(request, data, teacher, progress)
    plan = plan_for(model, teacher, data, request, baseline_mb, request.method)
    if plan.method == "lora":
        model = _with_lora(model)
    return model, description, plan


def _trainee(model: Any, description: dict[str, Any], plan: TrainPlan, request: TrainRequest) -> Trainee:
    cfg, steps = request.config, request.steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(plan.optimizer, params, cfg.lr, cfg.weight_decay)
    warmup = max(1, round(cfg.warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, cfg.min_lr_ratio))
    return Trainee(model, params, optimizer, scheduler, plan, description, request.device,
                   request.device.grad_scaler())


def lr_factor(step: int, total: int, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _objective(request: TrainRequest, inputs: RunInputs, data: TrainData, teacher: Any) -> Objective:
    """The mode's loss inputs (the online teacher for dense KD, the sparse targets, or CE alone) and
    the on-policy steps' sampling and scorer (onpolicy.py; an endpoint is probed here)."""
    cfg = request.config
    online = None if teacher is None else OnlineTeacher(teacher, TeacherPrefix(teacher, data.examples), data.pad_id)
    on_policy = onpolicy.open_on_policy(data.on_policy, cfg, run_dir=request.run_dir, examples=data.examples,
                                        tokenizer=data.tokenizer, pad_id=data.pad_id, seed=request.seed,
                                        online_teacher=online, data_report=inputs.data_report)
    if data.mode.teacher_while_training == "online":  # dense KD: the teacher runs beside the student
        assert online is not None
        return Objective(data.mode.name, DIVERGENCES[cfg.divergence], online, cfg.alpha, cfg.temperature, on_policy)
    divergence = SPARSE_DIVERGENCES[cfg.divergence] if data.sparse is not None else None
    return Objective(data.mode.name, divergence, data.sparse, cfg.alpha, cfg.temperature, on_policy)


def plan_for(model: Any, teacher: Any, data: TrainData, request: TrainRequest, baseline_mb: float,
             method: str) -> TrainPlan:
    """The memory plan (plan.py) for training ``model`` in ``mode`` within the profile's training memory."""
    from edgepack.distill.plan import plan_training
    from edgepack.distill.student import count_params
    from edgepack.profiles.fit import shape_from_config

    def shape(m: Any) -> Any:
        return shape_from_config(m.config.to_dict(), params=count_params(m))

    from edgepack.distill.device import device_memory_mb

    cfg, profile, device = request.config, request.profile, request.device
    budget_mb, _source = device_memory_mb(request.device, profile.train_memory_mb)
    # A llama.cpp scorer's mapped GGUF and logits live in the process beside the student.
    outside_torch = onpolicy.scorer_memory_mb(data.on_policy, request.run_dir, cfg,
                                              (teacher if teacher is not None else model).config)
    return plan_training(shape(model), teacher=shape(teacher) if teacher is not None else None,
                         teacher_mode=data.teacher_while_training, budget_mb=budget_mb,
                         baseline_mb=baseline_mb + outside_torch, batch_size=cfg.batch_size,
                         micro_batch=cfg.micro_batch, seq_len=cfg.max_length, method=method, profile_name=profile.name,
                         device=device.name, precision=device.precision,
                         optimizers=optim.candidates(cfg.optimizer, device.name, bitsandbytes_usable(device)),
                         teacher_dtype=str(device.teacher_dtype_for(cfg.teacher_precision)).removeprefix("torch."),
                         checkpointing=cfg.checkpointing)


def _with_lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    from edgepack.train_memory import LORA_RANK

    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def _lora_resume(description: dict[str, Any], teacher: Any, tok: Any, last: Path) -> Any:
    """The base student rebuilt exactly (kept blocks, or the user's folder) with the checkpoint's adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import prune_teacher

    if description["source"] == "auto":
        base, _ = prune_teacher(teacher, tok, keep=description["kept_layers"],
                                kept_channels=description.get("kept_channels"))
    else:
        base = AutoModelForCausalLM.from_pretrained(description["source"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, last, is_trainable=True)


def student_folder(spec: str) -> Path:
    """A user's ``--student``: an HF model folder (checked), or UsageError."""
    from edgepack.distill.teachers import check_hf_dir

    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--student must be `auto` or an HF model folder (got {spec!r})")
    check_hf_dir(path)
    return path


def make_student(request: TrainRequest, data: TrainData, teacher: Any,
                 progress: ProgressFn = null_progress) -> tuple[Any, dict[str, Any]]:
    """``auto``: the depth-pruned teacher; else an HF folder (a local teacher: no larger than it)."""
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import choose_num_layers, count_params, prune_teacher
    from edgepack.runtime.chat.tokens import hf_chat_ids

    if request.student == "auto":
        sizing = choose_num_layers(teacher, request.profile)
        # Calibration sees the ids training sees: message text never parsed for control tokens.
        texts = [hf_chat_ids(data.tokenizer, r["messages"] + [{"role": "assistant", "content": r["response"]}],
                             add_generation_prompt=False) for r in data.rows[: request.config.calibration_rows]]
        model, description = prune_teacher(teacher, data.tokenizer, calibration=texts,
                                           num_layers=sizing["num_layers"], max_length=request.config.max_length,
                                           mlp_keep=request.mlp_keep, progress=progress)
        return model, {"source": "auto", **description, "sizing": sizing}
    path = student_folder(request.student)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n, n_teacher = count_params(model), (count_params(teacher) if teacher is not None else None)
    if n_teacher is not None and n > n_teacher:
        raise UsageError(f"student {path} has {n:,} parameters, more than the teacher's {n_teacher:,}",
                         hint="a student is the smaller model: pick one with fewer parameters, or --student auto")
    return model, {"source": str(path), "method": "user-provided student", "params": n, "teacher_params": n_teacher,
                   "num_layers": model.config.num_hidden_layers}
