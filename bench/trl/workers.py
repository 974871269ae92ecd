"""The trainers of the TRL comparison, each run in a fresh process (bench/trl/run.py starts them).

``python bench/trl/workers.py KIND SPEC.json OUT.json`` runs one trainer on the job SPEC describes
and writes what it measured to OUT.json. ``edgepack`` runs under the project's .venv; ``trl-gkd``
and ``trl-distill`` under the TRL venv (``--trl-python``), so this module imports nothing from
edgepack or TRL at module level.

* ``edgepack``: ``train_student`` (dense KD with the teacher online; ``soft_labels`` in the spec:
  from cached top-k soft labels; ``on_policy`` in the spec: GKD on-policy steps, the student samples).
* ``trl-gkd``: TRL's ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (the teacher's fixed
  answers): TRL 1.x's only off-policy distillation trainer (``DistillationTrainer`` has no λ).
* ``trl-distill``: TRL 1.x's ``trl.DistillationTrainer``: every step on-policy (λ = 1), the student
  samples completions (transformers ``generate``), the teacher scores them, chunked divergence.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import BATCH_SIZE, LR, MAX_LENGTH, MICRO_BATCH, SEED, SOFT_K  # noqa: E402  (bench/trl/report.py)


def proc_status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_now() -> dict[str, float]:
    return {"rss_mb": proc_status_mb("VmRSS"), "peak_rss_mb": proc_status_mb("VmHWM")}


def ru_maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class StepProfiler:
    """torch.profiler over steps 2..N of a training run (``enabled``), else nothing: each op's self CPU
    time and call count, and the matmul FLOPs, so the trainers' work can be compared op by op."""

    TOP = 15

    def __init__(self, enabled: bool, steps: int) -> None:
        self.enabled, self.steps, self.prof, self.seconds = enabled and steps > 1, steps, None, 0.0

    def step_end(self, done: int) -> None:
        if not self.enabled:
            return
        import torch

        if done == 1:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True)
            self.prof.__enter__()
            self.seconds = -time.perf_counter()
        elif done == self.steps and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.seconds += time.perf_counter()

    def summary(self) -> dict[str, Any] | None:
        if self.prof is None:
            return None
        ops = [e for e in self.prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[: self.TOP]
        mm = [e for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
        return {"profiled_steps": f"2..{self.steps}", "wall_s": round(self.seconds, 2), "self_cpu_s": round(total, 2),
                "matmul_gflop": round(sum(e.flops for e in mm) / 1e9, 1),
                "matmul_self_cpu_s": round(sum(e.self_cpu_time_total for e in mm) / 1e6, 2),
                "top_ops": [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2), "calls": e.count,
                             "share": round(e.self_cpu_time_total / 1e6 / total, 4)} for e in top]}


def per_step(times: list[float], cpu: list[float], tokens: list[int]) -> dict[str, Any]:
    """Per-step wall and CPU seconds and tokens; rates without step 1 (one-off allocation and page-in
    costs) and per CPU second (the process's user + sys time over all threads: time the process was
    not scheduled does not count, so this rate moves less with the other jobs on a shared machine)."""
    secs = [b - a for a, b in zip(times, times[1:])]
    cpu_secs = [b - a for a, b in zip(cpu, cpu[1:])]
    rest_s = sum(secs[1:])
    return {"step_seconds": [round(x, 3) for x in secs], "step_cpu_seconds": [round(x, 3) for x in cpu_secs],
            "step_tokens": tokens,
            "tokens_per_s_after_step1": round(sum(tokens[1:]) / rest_s, 2) if rest_s else None,
            "tokens_per_cpu_s": round(sum(tokens) / sum(cpu_secs), 2),
            "cpu_utilisation": round(sum(cpu_secs) / sum(secs), 3)}


# ---------------------------------------------------------------------------- edgepack (.venv)

def worker_edgepack(spec: dict[str, Any]) -> dict[str, Any]:
    mem_imports0 = memory_now()
    import torch

    torch.set_num_threads(spec["threads"])
    from edgepack.distill.train import TrainConfig, train_student
    from edgepack.profiles import load_profile

    mem_imports = memory_now()
    marks: list[dict[str, Any]] = []
    cumulative: list[int] = []
    profiler = StepProfiler(spec.get("profile_ops", False), spec["steps"])

    def progress(task: str, done: int, total: int | None = None) -> None:
        if task == "train":
            marks.append({"step": done, "t": time.perf_counter(), "cpu": time.process_time(), **memory_now()})
            profiler.step_end(done)
        elif task == "train tokens":
            cumulative.append(done)

    soft = bool(spec.get("soft_labels"))
    on_policy = float(spec.get("on_policy", 0.0))
    cache: dict[str, Any] | None = None
    if soft:  # the teacher's pass that caches top-k soft labels for every train row, timed apart
        from edgepack.distill.softlabels import cache_soft_labels

        t0 = time.perf_counter()
        index = cache_soft_labels(Path(spec["run_dir"]), k=SOFT_K, seed=SEED, max_length=MAX_LENGTH)
        cache = {"s": round(time.perf_counter() - t0, 2), "rows": int(index["rows"]), "tokens": int(index["tokens"]),
                 "peak_rss_mb": proc_status_mb("VmHWM"), "rss_after_mb": proc_status_mb("VmRSS")}
    config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, micro_batch=MICRO_BATCH, max_length=MAX_LENGTH,
                         divergence="forward_kl", temperature=1.0, alpha=0.0, save_every=spec["steps"] + 1,
                         soft_labels=soft, soft_k=SOFT_K, on_policy=on_policy,
                         on_policy_temperature=spec.get("on_policy_temperature", 1.0),
                         on_policy_max_new=spec.get("max_new_tokens", 0),
                         on_policy_teacher="hf" if on_policy else "auto",
                         optimizer=spec.get("optimizer", "auto"),
                         teacher_precision=spec.get("teacher_precision", "auto"),
                         checkpointing=spec.get("checkpointing", "auto"),
                         mmap_threshold=spec.get("mmap_threshold", 0))
    t0 = time.perf_counter()
    report = train_student(run_dir=Path(spec["run_dir"]), profile=load_profile(spec["profile"]),
                           student=spec["student_dir"], steps=spec["steps"], seed=SEED, progress=progress,
                           config=config)
    call_s = time.perf_counter() - t0
    step_s = float(report["wall_s"])
    step_tokens = [b - a for a, b in zip([0, *cumulative], cumulative)]
    if len(marks) != spec["steps"] + 1 or len(step_tokens) != spec["steps"] or sum(step_tokens) != report["tokens"]:
        raise SystemExit(f"edgepack reported {len(marks) - 1} steps and {report['tokens']} tokens; the progress "
                         f"callback saw {step_tokens}")
    if not on_policy and step_tokens != spec["step_tokens"][: spec["steps"]]:
        raise SystemExit(f"edgepack trained on {step_tokens} tokens per step; the prepared order has "
                         f"{spec['step_tokens'][: spec['steps']]}")
    rows_trained = BATCH_SIZE * spec["steps"]
    # The cache pass is paid once per row and epoch: its share for the rows this run trains on.
    cache_share_s = cache["s"] * rows_trained / cache["rows"] if cache else 0.0
    prompt_tokens = spec["step_prompt_tokens"][: spec["steps"]]
    trainer = "edgepack-topk" if soft else "edgepack-onpolicy" if on_policy else "edgepack"
    return {
        "trainer": trainer, "tokens": report["tokens"], "step_time_s": step_s,
        "tokens_per_s": round(report["tokens"] / step_s, 2),
        "soft_label_cache": cache and {**cache, "share_s": round(cache_share_s, 2)},
        "tokens_per_s_incl_cache": round(report["tokens"] / (step_s + cache_share_s), 2),
        **per_step([m["t"] for m in marks], [m["cpu"] for m in marks], step_tokens),
        # On-policy steps train on prompt + the student's completion: the completion's share of the tokens.
        "completion_tokens": [t - p for t, p in zip(step_tokens, prompt_tokens)],
        "training_peak_rss_mb": marks[-1]["peak_rss_mb"],
        "train_call_s": round(call_s, 2), "process_s": round(time.perf_counter() - PROCESS_START, 2),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "rss_after_imports_mb": mem_imports["rss_mb"], "rss_at_start_mb": mem_imports0["rss_mb"],
        "rss_before_first_step_mb": marks[0]["rss_mb"], "peak_rss_before_first_step_mb": marks[0]["peak_rss_mb"],
        "step_end_rss_mb": [m["rss_mb"] for m in marks], "step_end_peak_rss_mb": [m["peak_rss_mb"] for m in marks],
        "ru_maxrss_mb": ru_maxrss_mb(),
        "losses": [h["kd"] for h in report["loss_curve"]],
        "on_policy_steps": [bool(h.get("on_policy")) for h in report["loss_curve"]],
        "ops": profiler.summary(),
        "own_report": {k: report.get(k) for k in ("tokens", "wall_s", "tokens_per_s", "peak_rss_mb", "mode",
                                                  "teacher_prefix_tokens", "student_prefix_tokens", "torch_threads",
                                                  "params", "on_policy", "plan", "optimizer",
                                                  "optimizer_state_mb", "teacher_dtype", "teacher_weights_mb")},
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- TRL (its own venv)

def _trl_clock(profiler: StepProfiler) -> Any:
    """A TrainerCallback timing every optimizer step (and the RSS at its end), keeping the logs."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin: float | None = None
            self.begin_cpu = 0.0
            self.begin_mem: dict[str, float] = {}
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self.mem: list[dict[str, float]] = []
            self.logs: list[dict[str, Any]] = []

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin, self.begin_cpu = time.perf_counter(), time.process_time()
            self.begin_mem = memory_now()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.tokens.append(int(state.num_input_tokens_seen))
            self.mem.append(memory_now())
            profiler.step_end(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            self.logs.append(dict(logs or {}))

    return Clock()


def _trl_common_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The TrainingArguments both TRL trainers share: the same job as edgepack's (report.py's constants)."""
    return dict(
        output_dir=spec["out_dir"], per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=BATCH_SIZE // MICRO_BATCH, max_steps=spec["steps"], num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.0, temperature=1.0, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
    )


def _trl_result(spec: dict[str, Any], trainer_name: str, trainer: Any, clock: Any, out: Any, call_s: float,
                mem_imports0: dict[str, float], mem_imports: dict[str, float], profiler: StepProfiler,
                extra: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    steps = spec["steps"]
    if clock.begin is None or len(clock.ends) != steps:
        raise SystemExit(f"TRL ran {len(clock.ends)} steps, expected {steps}")
    step_s = clock.ends[-1] - clock.begin
    tokens = int(trainer.state.num_input_tokens_seen)
    step_tokens = [b - a for a, b in zip([0, *clock.tokens], clock.tokens)]
    args = trainer.args
    return {
        "trainer": trainer_name, "tokens": tokens, "step_time_s": round(step_s, 3),
        "tokens_per_s": round(tokens / step_s, 2),
        **per_step([clock.begin, *clock.ends], [clock.begin_cpu, *clock.cpu], step_tokens),
        "training_peak_rss_mb": clock.mem[-1]["peak_rss_mb"],
        "train_call_s": round(call_s, 2), "process_s": round(time.perf_counter() - PROCESS_START, 2),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "rss_after_imports_mb": mem_imports["rss_mb"], "rss_at_start_mb": mem_imports0["rss_mb"],
        "rss_before_first_step_mb": clock.begin_mem["rss_mb"],
        "peak_rss_before_first_step_mb": clock.begin_mem["peak_rss_mb"],
        "step_end_rss_mb": [m["rss_mb"] for m in clock.mem], "step_end_peak_rss_mb": [m["peak_rss_mb"] for m in clock.mem],
        "ru_maxrss_mb": ru_maxrss_mb(),
        "losses": [lg["loss"] for lg in clock.logs if "loss" in lg],
        "grad_norms_logged": [lg["grad_norm"] for lg in clock.logs if "grad_norm" in lg],
        "logs": clock.logs,
        "ops": profiler.summary(),
        "own_report": dict(out.metrics),
        "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
        "versions": {d: md.version(d) for d in ("trl", "transformers", "torch", "accelerate", "datasets", "peft",
                                                 "tokenizers")},
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def _trl_models(spec: dict[str, Any]) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["rows_path"]).read_text().splitlines() if line.strip()]
    if len(rows) < spec["steps"] * BATCH_SIZE:
        raise SystemExit(f"{spec['rows_path']} has {len(rows)} rows, expected {spec['steps'] * BATCH_SIZE}")
    return tok, student, teacher, rows[: spec["steps"] * BATCH_SIZE]  # the first steps of edgepack's order


def worker_trl_gkd(spec: dict[str, Any]) -> dict[str, Any]:
    """GKDTrainer, lmbda = 0: KD on the teacher's answers (``messages`` rows, DataCollatorForChatML)."""
    mem_imports0 = memory_now()
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    mem_imports = memory_now()

    class InOrder(GKDTrainer):
        """The rows are already in edgepack's sampling order; read them as given."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    profiler = StepProfiler(spec.get("profile_ops", False), spec["steps"])
    clock = _trl_clock(profiler)
    tok, student, teacher, rows = _trl_models(spec)
    args = GKDConfig(**_trl_common_args(spec), lmbda=0.0, seq_kd=False, max_length=MAX_LENGTH + 8,
                     include_num_input_tokens_seen="non_padding")
    trainer = InOrder(model=student, teacher_model=teacher, args=args,
                      train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
                      processing_class=tok, callbacks=[clock])
    t0 = time.perf_counter()
    out = trainer.train()
    trainer.save_model(spec["out_dir"])  # as train_student saves its student: part of the job
    call_s = time.perf_counter() - t0
    return _trl_result(spec, "trl-gkd", trainer, clock, out, call_s, mem_imports0, mem_imports, profiler,
                       {"lmbda": args.lmbda, "beta": args.beta, "completion_tokens": None})


def worker_trl_distill(spec: dict[str, Any]) -> dict[str, Any]:
    """DistillationTrainer: the student samples a completion per prompt, the teacher scores it (λ = 1)."""
    mem_imports0 = memory_now()
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    mem_imports = memory_now()
    profiler = StepProfiler(spec.get("profile_ops", False), spec["steps"])
    clock = _trl_clock(profiler)
    tok, student, teacher, rows = _trl_models(spec)
    args = DistillationConfig(**_trl_common_args(spec), max_completion_length=spec["max_new_tokens"],
                              top_k=0, top_p=1.0, shuffle_dataset=False)
    # The prompt alone (system + user): the trainer applies the chat template with the generation prompt.
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1]} for r in rows])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tok, callbacks=[clock])
    t0 = time.perf_counter()
    out = trainer.train()
    trainer.save_model(spec["out_dir"])
    call_s = time.perf_counter() - t0
    result = _trl_result(spec, "trl-distill", trainer, clock, out, call_s, mem_imports0, mem_imports, profiler,
                         {"beta": args.beta, "max_completion_length": args.max_completion_length})
    # Its logged mean completion length is over the step's generation batch (all BATCH_SIZE rows).
    completion = [round(lg["completions/mean_length"] * BATCH_SIZE) for lg in clock.logs if "loss" in lg]
    prompt = [t - c for t, c in zip(result["step_tokens"], completion)]
    if prompt != spec["step_prompt_tokens"][: spec["steps"]]:
        raise SystemExit(f"TRL's prompts have {prompt} tokens per step, edgepack's "
                         f"{spec['step_prompt_tokens'][: spec['steps']]}: not the same prompts")
    return {**result, "completion_tokens": completion}


WORKERS = {"edgepack": worker_edgepack, "trl-gkd": worker_trl_gkd, "trl-distill": worker_trl_distill}
"""Worker name → the function that runs it (each in its own process)."""


def main() -> None:
    kind, spec_path, out_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = json.loads(spec_path.read_text())
    if kind not in WORKERS:
        raise SystemExit(f"unknown worker {kind!r}; known: {', '.join(WORKERS)}")
    result = WORKERS[kind](spec)
    out_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
