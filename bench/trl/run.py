"""Side-by-side benchmark: edgepack's KD recipe vs TRL's GKDTrainer (lmbda = 0) on the same job.

Both trainers distill the corrected demo teacher (``runs/demo/teacher-corrected``, SmolLM2-135M
after teacher correction) into the *same* undistilled student: the teacher depth-pruned to the
blocks ``runs/demo/student/student.json`` keeps (``prune_teacher(keep=...)``), saved once to a
scratch HF folder, so neither side pays for pruning and both start from identical weights. Data:
``runs/demo/data/train.jsonl`` (system + user prompt, the teacher's answer), the rows in the
exact order edgepack's sampler (``batching.batch_indices``, seed 0) consumes them; TRL reads
that list with a sequential sampler.

Same job on both sides: 4 rows per optimizer step as 2 micro-batches of 2 (TRL:
``per_device_train_batch_size=2``, ``gradient_accumulation_steps=2``), ``--steps`` steps, AdamW
lr 3e-4 with 10% warmup and cosine to 0.1×, weight decay 0, clip 1.0, fp32 on the CPU, no
gradient checkpointing, ``--threads`` torch threads, loss = forward KL(teacher ‖ student) at
temperature 1 on the answer tokens only (edgepack: ``divergence="forward_kl"``, ``alpha=0``;
TRL 0.27: ``beta=0``, which its ``generalized_jsd_loss`` special-cases to
``F.kl_div(student_logp, teacher_logp, log_target=True)`` = KL(teacher ‖ student) since
huggingface/trl#3043; before that PR beta=0 meant a different mixture), ``lmbda=0`` (no
on-policy generation: the teacher's fixed answers), ``seq_kd=False``. TRL's SFTConfig defaults
``bf16=True`` and ``gradient_checkpointing=True``; both are switched off to match.

Measured per trainer, each in a fresh, niced process, one after the other, alternating the
order over ``--rounds`` rounds (the machine's 2 cores are shared; ``os.getloadavg()`` is
recorded around every run):

* tokens/s = the student's non-pad input tokens (prompt + answer, the attention mask's sum) per
  second of training-step time. edgepack's train_report counts exactly that (``tokens``) over
  ``wall_s`` (per step: sampling the batch, collate, forward, backward, clip, optimizer; no
  checkpoint saves, ``save_every`` is set past the last step). For TRL the same count is the
  Trainer's ``num_input_tokens_seen`` with ``include_num_input_tokens_seen="non_padding"``, over
  the time from ``on_epoch_begin`` to the last ``on_step_end`` (fetching + collating batches,
  forward, backward, clip, optimizer, per-step logging). Both trainers' own throughput figures
  are kept in the JSON too (``train_samples_per_second`` etc. for TRL). Also reported, not judged:
  the rate over steps 2..N, per CPU-second of the process (user + sys, all threads: waiting for a
  core does not count) and of each run's fastest step (the least disturbed one, as timeit's minimum).
* peak memory = the process's peak RSS (``VmHWM`` from /proc/self/status) at the end (saving the
  student included) and at the last step's end, plus RSS after imports and right before the first
  step, to show what the peak is made of.
* wall time of the training call (``train_student`` / ``trainer.train()`` + ``save_model``) and of
  the process.
* with ``--profile-steps N``, one more run per trainer under torch.profiler over steps 2..N: self CPU
  time per op and the matmul FLOPs (where the time goes).

Setup (TRL must not enter the project's .venv: it would move the pins)::

    python3.11 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install torch==2.13.0        # the local CPU wheel (PIP_FIND_LINKS=/opt/wheels)
    /tmp/trl-venv/bin/pip install transformers==4.57.6 tokenizers==0.22.2 'trl==0.27.*' datasets \\
        accelerate==1.15.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6

Run (the orchestrator and edgepack's side use .venv; the TRL side runs as a subprocess under
``--trl-python``; this script imports nothing from edgepack at module level so the TRL venv can
run its worker mode)::

    nice -n 10 .venv/bin/python bench/trl/run.py            # --steps 6 --rounds 3 --profile-steps 3

writes ``bench/trl/results.json`` and ``bench/trl/results.md``. Scratch files go to ``--work``
(default: a temporary folder, removed at the end); ``runs/demo`` is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from report import (BATCH_SIZE, LR, MAX_LENGTH, MICRO_BATCH, NOTES, SEED, SOFT_K, TEACHER,  # bench/trl/report.py (this folder is on sys.path)
                    render, summarize)

ROOT = Path(__file__).resolve().parents[2]
PROCESS_START = time.perf_counter()
STUDENT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "chat_template.jinja", "generation_config.json")


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_now() -> dict[str, float]:
    return {"rss_mb": proc_status_mb("VmRSS"), "peak_rss_mb": proc_status_mb("VmHWM")}


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class StepProfiler:
    """torch.profiler over steps 2..N of a training run (``enabled``), else nothing: each op's self CPU
    time and call count, and the matmul FLOPs, so the two trainers' work can be compared op by op."""

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


# ---------------------------------------------------------------------------- preparation (.venv)

def prepare(demo: Path, work: Path, steps: int) -> dict[str, Any]:
    """The shared undistilled student folder and the rows in edgepack's order (for TRL)."""
    import torch
    from transformers import AutoTokenizer

    from edgepack.distill.batching import batch_indices, tokenize_rows
    from edgepack.distill.data import read_jsonl
    from edgepack.distill.student import derive_student

    teacher_dir = demo / TEACHER
    info = json.loads((demo / "student" / "student.json").read_text())
    keep = info["kept_layers"]
    student_dir = work / "student-undistilled"
    with torch.no_grad():
        model, description = derive_student(teacher_dir, keep=keep, out_dir=student_dir)
    del model
    for name in STUDENT_TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, student_dir / name)

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = read_jsonl(demo / "data" / "train.jsonl")
    context_path = demo / "data" / "teacher_context.json"
    context = json.loads(context_path.read_text())["messages"] if context_path.is_file() else []
    if context:
        # GKDTrainer feeds the teacher the student's own input; teacher-only turns have no TRL equivalent.
        raise SystemExit(f"{context_path} holds teacher-only turns; the TRL comparison needs a run without them")
    examples, too_long = tokenize_rows(tok, rows, context, MAX_LENGTH)
    order = [examples[i] for step in range(steps) for i in batch_indices(len(examples), SEED, step, BATCH_SIZE)]
    trl_rows = [{"messages": rows[e.row]["messages"] + [{"role": "assistant", "content": rows[e.row]["response"]}]}
                for e in order]
    rows_path = work / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    return {
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir), "rows_path": str(rows_path),
        "student": {"kept_layers": keep, "num_layers": description["num_layers"], "params": description["params"],
                    "teacher_params": description["teacher_params"]},
        # What full fine-tuning with AdamW must hold while the fp32 teacher is loaded: teacher weights,
        # student weights, gradients and two moments (4 bytes each).
        "state_floor_mb": round(4 * (description["teacher_params"] + 4 * description["params"]) / 2**20, 1),
        "rows": len(rows), "rows_used": len(examples), "rows_too_long": too_long,
        "edgepack_tokens_expected": sum(len(e.student_ids) for e in order),
        "step_tokens": [sum(len(e.student_ids) for e in order[i:i + BATCH_SIZE])
                        for i in range(0, len(order), BATCH_SIZE)],
        "answer_tokens": sum(e.answer_tokens for e in order),
        "max_sequence": max(len(e.student_ids) for e in order),
    }


def make_run_dir(demo: Path, dst: Path) -> Path:
    """A fresh run folder for train_student: a copy of RUN/data and a link to the teacher folder."""
    dst.mkdir(parents=True)
    shutil.copytree(demo / "data", dst / "data")
    (dst / TEACHER).symlink_to((demo / TEACHER).resolve(), target_is_directory=True)
    return dst


# ---------------------------------------------------------------------------- workers (fresh processes)

def worker_edgepack(spec: dict[str, Any]) -> dict[str, Any]:
    mem_imports0 = memory_now()
    set_threads(spec["threads"])
    import torch

    from edgepack.distill.train import TrainConfig, train_student
    from edgepack.profiles import load_profile

    mem_imports = memory_now()
    marks: list[dict[str, Any]] = []
    profiler = StepProfiler(spec.get("profile_ops", False), spec["steps"])

    def progress(task: str, done: int, total: int | None = None) -> None:
        if task == "train":
            marks.append({"step": done, "t": time.perf_counter(), "cpu": time.process_time(), **memory_now()})
            profiler.step_end(done)

    soft = bool(spec.get("soft_labels"))
    cache: dict[str, Any] | None = None
    if soft:  # the teacher's pass that caches top-k soft labels for every train row, timed apart
        from edgepack.distill.softlabels import cache_soft_labels

        t0 = time.perf_counter()
        index = cache_soft_labels(Path(spec["run_dir"]), k=SOFT_K, seed=SEED, max_length=MAX_LENGTH)
        cache = {"s": round(time.perf_counter() - t0, 2), "rows": int(index["rows"]), "tokens": int(index["tokens"]),
                 "peak_rss_mb": proc_status_mb("VmHWM"), "rss_after_mb": proc_status_mb("VmRSS")}
    config = TrainConfig(lr=LR, batch_size=BATCH_SIZE, micro_batch=MICRO_BATCH, max_length=MAX_LENGTH,
                         divergence="forward_kl", temperature=1.0, alpha=0.0, save_every=spec["steps"] + 1,
                         soft_labels=soft, soft_k=SOFT_K)
    t0 = time.perf_counter()
    report = train_student(run_dir=Path(spec["run_dir"]), profile=load_profile(spec["profile"]),
                           student=spec["student_dir"], steps=spec["steps"], seed=SEED, progress=progress,
                           config=config)
    call_s = time.perf_counter() - t0
    step_s = float(report["wall_s"])
    step_tokens = spec["step_tokens"][: spec["steps"]]
    if report["tokens"] != sum(step_tokens) or len(marks) != spec["steps"] + 1:
        raise SystemExit(f"edgepack trained on {report['tokens']} tokens in {len(marks) - 1} steps; the prepared "
                         f"order has {sum(step_tokens)} in {spec['steps']}")
    rows_trained = BATCH_SIZE * spec["steps"]
    # The cache pass is paid once per row and epoch: its share for the rows this run trains on.
    cache_share_s = cache["s"] * rows_trained / cache["rows"] if cache else 0.0
    return {
        "trainer": "edgepack-topk" if soft else "edgepack", "tokens": report["tokens"], "step_time_s": step_s,
        "tokens_per_s": round(report["tokens"] / step_s, 2),
        "soft_label_cache": cache and {**cache, "share_s": round(cache_share_s, 2)},
        "tokens_per_s_incl_cache": round(report["tokens"] / (step_s + cache_share_s), 2),
        **per_step([m["t"] for m in marks], [m["cpu"] for m in marks], step_tokens),
        "training_peak_rss_mb": marks[-1]["peak_rss_mb"],
        "train_call_s": round(call_s, 2), "process_s": round(time.perf_counter() - PROCESS_START, 2),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "rss_after_imports_mb": mem_imports["rss_mb"], "rss_at_start_mb": mem_imports0["rss_mb"],
        "rss_before_first_step_mb": marks[0]["rss_mb"], "peak_rss_before_first_step_mb": marks[0]["peak_rss_mb"],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "losses": [h["kd"] for h in report["loss_curve"]],
        "ops": profiler.summary(),
        "own_report": {k: report.get(k) for k in ("tokens", "wall_s", "tokens_per_s", "peak_rss_mb", "mode",
                                                  "teacher_prefix_tokens", "student_prefix_tokens", "torch_threads",
                                                  "params")},
        "torch_threads": torch.get_num_threads(),
    }


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    mem_imports0 = memory_now()
    set_threads(spec["threads"])
    import importlib.metadata as md

    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    mem_imports = memory_now()

    class InOrder(GKDTrainer):
        """The rows are already in edgepack's sampling order; read them as given."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    profiler = StepProfiler(spec.get("profile_ops", False), spec["steps"])

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin: float | None = None
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.begin_cpu = 0.0
            self.cpu: list[float] = []
            self.end_mem: dict[str, float] = {}
            self.begin_mem: dict[str, float] = {}
            self.logs: list[dict[str, Any]] = []

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin, self.begin_cpu = time.perf_counter(), time.process_time()
            self.begin_mem = memory_now()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.tokens.append(int(state.num_input_tokens_seen))
            self.end_mem = memory_now()
            profiler.step_end(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            self.logs.append(dict(logs or {}))

    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(spec["rows_path"]).read_text().splitlines() if line.strip()]
    steps = spec["steps"]
    if len(rows) < steps * BATCH_SIZE:
        raise SystemExit(f"{spec['rows_path']} has {len(rows)} rows, expected {steps * BATCH_SIZE}")
    rows = rows[: steps * BATCH_SIZE]  # the first steps of edgepack's order
    args = GKDConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=BATCH_SIZE // MICRO_BATCH, max_steps=steps, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=MAX_LENGTH + 8,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=SEED, include_num_input_tokens_seen="non_padding",
    )
    clock = Clock()
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[clock])
    t0 = time.perf_counter()
    out = trainer.train()
    trainer.save_model(spec["out_dir"])  # as train_student saves its student: part of the job
    call_s = time.perf_counter() - t0
    if clock.begin is None or len(clock.ends) != steps:
        raise SystemExit(f"TRL ran {len(clock.ends)} steps, expected {steps}")
    step_s = clock.ends[-1] - clock.begin
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "trainer": "trl", "tokens": tokens, "step_time_s": round(step_s, 3),
        "tokens_per_s": round(tokens / step_s, 2),
        **per_step([clock.begin, *clock.ends], [clock.begin_cpu, *clock.cpu],
                   [b - a for a, b in zip([0, *clock.tokens], clock.tokens)]),
        "training_peak_rss_mb": clock.end_mem["peak_rss_mb"],
        "train_call_s": round(call_s, 2), "process_s": round(time.perf_counter() - PROCESS_START, 2),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "rss_after_imports_mb": mem_imports["rss_mb"], "rss_at_start_mb": mem_imports0["rss_mb"],
        "rss_before_first_step_mb": clock.begin_mem["rss_mb"],
        "peak_rss_before_first_step_mb": clock.begin_mem["peak_rss_mb"],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # GKDTrainer.compute_loss ignores num_items_in_batch, and the Trainer then skips its division by the
        # accumulation steps (Llama's forward takes **kwargs): the logged loss (and the gradient, before
        # clipping) is the *sum* of the micro-batch means. Divided back here to compare with edgepack's mean.
        "losses": [round(lg["loss"] / args.gradient_accumulation_steps, 6) for lg in clock.logs if "loss" in lg],
        "losses_logged": [lg["loss"] for lg in clock.logs if "loss" in lg],
        "grad_norms_logged": [lg["grad_norm"] for lg in clock.logs if "grad_norm" in lg],
        "ops": profiler.summary(),
        "own_report": dict(out.metrics),
        "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
        "versions": {d: md.version(d) for d in ("trl", "transformers", "torch", "accelerate", "datasets", "peft")},
        "torch_threads": torch.get_num_threads(),
    }


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


def worker_main(kind: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result = {"edgepack": worker_edgepack, "trl": worker_trl}[kind](spec)
    out_path.write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------- orchestration

def run_worker(kind: str, python: str, spec: dict[str, Any], work: Path, tag: str, threads: int) -> dict[str, Any]:
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = ["nice", "-n", "10", python, str(Path(__file__).resolve()), "worker", kind, str(spec_path), str(out_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}
    load_before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {proc.returncode}); last output:\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(out_path.read_text())
    return {**result, "run": tag, "subprocess_wall_s": round(wall, 2),
            "load_average": {"before": load_before, "after": load_average()},
            "command": " ".join(shlex.quote(c) for c in cmd)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--steps", type=int, default=6,
                        help="optimizer steps per run (6 keeps a TRL run under 10 min on the shared 2-core machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="after the rounds, one torch.profiler run per trainer over steps 2..N (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="cpu-x86-2c")
    parser.add_argument("--trl-python", default="/tmp/trl-venv/bin/python")
    parser.add_argument("--edgepack-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "trl" / "results.json")
    parser.add_argument("--topk", action=argparse.BooleanOptionalAction, default=True,
                        help="also run edgepack from cached top-k soft labels (no teacher in memory while training)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: recompute the summary of the --out JSON and rewrite it and results.md")
    args = parser.parse_args()
    if args.render:  # the summary is derived from the runs' raw numbers: recompute it too
        from edgepack.atomic import write_json, write_text

        results = json.loads(args.out.read_text())
        results["summary"] = summarize(results["runs"])
        write_json(args.out, results)
        write_text(args.out.with_suffix(".md"), render(results))
        return

    from edgepack.atomic import write_json, write_text
    from edgepack.export.gate.gate import machine_info

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgepack-trl-bench-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=False)
    try:
        log("prepare: student folder, ordered rows")
        prepared = prepare(args.demo, work, args.steps)
        runs: list[dict[str, Any]] = []
        kinds = ["edgepack", "trl"] + (["edgepack-topk"] if args.topk else [])
        for n in range(1, args.rounds + 1):
            order = kinds[(n - 1) % len(kinds):] + kinds[:(n - 1) % len(kinds)]  # each kind leads a round in turn
            for position, kind in enumerate(order, 1):
                tag = f"round{n}-{kind}"
                spec: dict[str, Any] = {"threads": args.threads, "steps": args.steps, "student_dir": prepared["student_dir"],
                                        "teacher_dir": prepared["teacher_dir"], "rows_path": prepared["rows_path"],
                                        "profile": args.profile, "step_tokens": prepared["step_tokens"],
                                        "soft_labels": kind == "edgepack-topk"}
                if kind != "trl":
                    spec["run_dir"] = str(make_run_dir(args.demo, work / f"{tag}-run"))
                    python = args.edgepack_python
                else:
                    spec["out_dir"] = str(work / f"{tag}-out")
                    python = args.trl_python
                log(f"round {n}: {kind} (load {load_average()})")
                result = run_worker("trl" if kind == "trl" else "edgepack", python, spec, work, tag, args.threads)
                runs.append({**result, "round": n, "order": position})
                log(f"  {result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_mb']} MB, "
                    f"step time {result['step_time_s']} s")
                if kind != "trl":
                    shutil.rmtree(spec["run_dir"], ignore_errors=True)
        profiles: dict[str, Any] = {}
        if args.profile_steps > 1:
            for kind in ("edgepack", "trl"):
                tag = f"profile-{kind}"
                spec = {"threads": args.threads, "steps": min(args.profile_steps, args.steps), "profile_ops": True,
                        "student_dir": prepared["student_dir"], "teacher_dir": prepared["teacher_dir"],
                        "rows_path": prepared["rows_path"], "profile": args.profile,
                        "step_tokens": prepared["step_tokens"]}
                if kind == "edgepack":
                    spec["run_dir"] = str(make_run_dir(args.demo, work / f"{tag}-run"))
                else:
                    spec["out_dir"] = str(work / f"{tag}-out")
                log(f"profile: {kind} (load {load_average()})")
                python = args.edgepack_python if kind == "edgepack" else args.trl_python
                profiles[kind] = run_worker(kind, python, spec, work, tag, args.threads)
    finally:
        if tmp is not None:
            tmp.cleanup()
    trl_versions = next(r["versions"] for r in runs if r["trainer"] == "trl")
    results = {
        "command": "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv),
        "started": started, "machine": machine_info(), "versions": trl_versions,
        "trl_python": args.trl_python, "threads": args.threads, "steps": args.steps, "edgepack_profile": args.profile,
        "load_average": {"start": load_start, "end": load_average()},
        "prepared": {k: v for k, v in prepared.items() if not k.endswith(("_dir", "_path"))},
        "runs": runs, "summary": summarize(runs),
        "profile": {k: {"ops": r["ops"], "load_average": r["load_average"], "tokens": r["tokens"]}
                    for k, r in profiles.items()},
        "notes": NOTES,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    write_text(args.out.with_suffix(".md"), render(results))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
