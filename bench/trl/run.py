"""Side-by-side benchmark: edgepack's KD recipes vs TRL 1.x, off-policy and on-policy, on the same job.

Every trainer distills the corrected teacher of a run (``--run``, default ``runs/workorders``:
``RUN/teacher-corrected``, SmolLM2-135M after teacher correction) into the *same* undistilled
student: the teacher depth-pruned to the blocks ``RUN/student/student.json`` keeps
(``prune_teacher(keep=...)``), saved once to a scratch HF folder, so no trainer pays for pruning and
all start from identical weights. Data: ``RUN/data/train.jsonl`` (system + user prompt, the
teacher's answer), the rows in the exact order edgepack's sampler (``batching.batch_indices``,
seed 0) consumes them; the TRL trainers read that list in order.

The pairs (report.MODES), each judged on its own:

* off-policy: ``edgepack`` (dense KD, teacher online, ``divergence="forward_kl"``, ``alpha=0``) vs
  ``trl-gkd``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0, beta=0, seq_kd=False`` (TRL 1.x's
  ``DistillationTrainer`` has no λ: it samples every step, so GKDTrainer is TRL 1.x's off-policy KD);
* on-policy (λ = 1): ``edgepack-onpolicy`` (``on_policy=1.0``, temperature 1, at most
  ``max_new_tokens`` sampled tokens, the HF teacher scores) vs ``trl-distill``:
  ``trl.DistillationTrainer`` with ``beta=0, temperature=1.0, max_completion_length`` the same,
  ``top_k=0, top_p=1.0``, ``shuffle_dataset=False``;
* with ``--topk``, also ``edgepack-topk`` (KD from cached top-k soft labels) vs ``trl-gkd``.

Same job for all: 4 rows per optimizer step as 2 micro-batches of 2 (TRL:
``per_device_train_batch_size=2``, ``gradient_accumulation_steps=2``), ``--steps`` steps, AdamW
lr 3e-4 with 10% warmup and cosine to 0.1×, weight decay 0, clip 1.0, fp32 on the CPU, no
gradient checkpointing (TRL's configs default ``bf16=True`` and ``gradient_checkpointing=True``;
both are switched off to match), ``--threads`` torch threads, loss = forward KL(teacher ‖ student)
at temperature 1 on the answer (or sampled) tokens only.

Measured per trainer, each in a fresh, niced process (workers.py), one after the other, rotating
the order over ``--rounds`` rounds (the machine's 2 cores are shared; ``os.getloadavg()`` is
recorded around every run):

* tokens/s = the student's non-pad input tokens (prompt + answer, or prompt + sampled completion)
  per second of training-step time (sampling included). edgepack's train_report counts exactly
  that (``tokens``) over ``wall_s`` (per step: sampling the batch, generating on on-policy steps,
  collate, forward, backward, clip, optimizer; no checkpoint saves). For TRL the same count is
  ``num_input_tokens_seen`` (GKDTrainer: ``include_num_input_tokens_seen="non_padding"``;
  DistillationTrainer adds prompt + completion tokens itself) over the time from
  ``on_epoch_begin`` to the last ``on_step_end``. Also reported, not judged: the rate over steps
  2..N, per CPU-second of the process (user + sys, all threads) and of each run's fastest step.
* peak memory = the process's peak RSS (``VmHWM`` from /proc/self/status) at the end (saving the
  student included) and at each step's end, plus RSS after imports and right before the first step.
* with ``--profile-steps N``, one more run per trainer under torch.profiler over steps 2..N.

Setup (TRL must not enter the project's .venv: it would move the pins)::

    python3.11 -m venv /tmp/trl1-venv
    PIP_FIND_LINKS=/opt/wheels /tmp/trl1-venv/bin/pip install torch==2.13.0   # the local CPU wheel
    /tmp/trl1-venv/bin/pip install trl==1.16.0 transformers==5.25.0 accelerate==1.16.0 datasets==5.2.0 \\
        peft==0.21.2 tokenizers==0.23.3

Run (the orchestrator and edgepack's side use .venv; the TRL side runs as a subprocess under
``--trl-python``)::

    nice -n 10 .venv/bin/python bench/trl/run.py            # --run runs/workorders --steps 6 --rounds 3

writes ``bench/trl/results.json`` and ``bench/trl/results.md`` (TRL 0.27's GKDTrainer results on
runs/demo are kept as ``results-trl0.27.*``). Scratch files go to ``--work`` (default: a temporary
folder, removed at the end); the run folder is only read. ``bench/trl/memory.py`` measures what
lowers edgepack's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from report import (BATCH_SIZE, MAX_LENGTH, MODES, NOTES, SEED, TEACHER,  # bench/trl/report.py (this folder is on sys.path)
                    render, summarize)

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers.py"
STUDENT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "chat_template.jinja", "generation_config.json")


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------- preparation (.venv)

def prepare(run: Path, work: Path, steps: int) -> dict[str, Any]:
    """The shared undistilled student folder and the rows in edgepack's order (for TRL)."""
    import torch
    from transformers import AutoTokenizer

    from edgepack.distill.batching import batch_indices, tokenize_rows
    from edgepack.distill.data import read_jsonl
    from edgepack.distill.student import derive_student

    teacher_dir = run / TEACHER
    info = json.loads((run / "student" / "student.json").read_text())
    keep = info["kept_layers"]
    student_dir = work / "student-undistilled"
    with torch.no_grad():
        model, description = derive_student(teacher_dir, keep=keep, out_dir=student_dir)
    del model
    for name in STUDENT_TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, student_dir / name)

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = read_jsonl(run / "data" / "train.jsonl")
    context_path = run / "data" / "teacher_context.json"
    context = json.loads(context_path.read_text())["messages"] if context_path.is_file() else []
    if context:
        # The TRL trainers feed the teacher the student's own input; teacher-only turns have no TRL equivalent.
        raise SystemExit(f"{context_path} holds teacher-only turns; the TRL comparison needs a run without them")
    examples, too_long = tokenize_rows(tok, rows, context, MAX_LENGTH)
    order = [examples[i] for step in range(steps) for i in batch_indices(len(examples), SEED, step, BATCH_SIZE)]
    trl_rows = [{"messages": rows[e.row]["messages"] + [{"role": "assistant", "content": rows[e.row]["response"]}]}
                for e in order]
    rows_path = work / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    steps_of = lambda f: [sum(f(e) for e in order[i:i + BATCH_SIZE]) for i in range(0, len(order), BATCH_SIZE)]  # noqa: E731
    # The student's part of what full fine-tuning with AdamW holds (fp32: weights, gradients, two moments),
    # and with the fp32 teacher loaded beside it.
    student_state = 4 * 4 * description["params"] / 2**20
    return {
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir), "rows_path": str(rows_path),
        "student": {"kept_layers": keep, "num_layers": description["num_layers"], "params": description["params"],
                    "teacher_params": description["teacher_params"]},
        "student_state_mb": round(student_state, 1),
        "state_floor_mb": round(student_state + 4 * description["teacher_params"] / 2**20, 1),
        "rows": len(rows), "rows_used": len(examples), "rows_too_long": too_long,
        "edgepack_tokens_expected": sum(len(e.student_ids) for e in order),
        "step_tokens": steps_of(lambda e: len(e.student_ids)),
        "step_prompt_tokens": steps_of(lambda e: e.student_prompt),
        "prompt_tokens": sum(e.student_prompt for e in order),
        "answer_tokens": sum(e.answer_tokens for e in order),
        "max_sequence": max(len(e.student_ids) for e in order),
        # On-policy completions are capped at edgepack's default: the longest answer of the data.
        "max_new_tokens": max(e.answer_tokens for e in examples),
        "max_prompt": max(e.student_prompt for e in examples),
    }


def make_run_dir(run: Path, dst: Path) -> Path:
    """A fresh run folder for train_student: a copy of RUN/data and a link to the teacher folder."""
    dst.mkdir(parents=True)
    shutil.copytree(run / "data", dst / "data")
    (dst / TEACHER).symlink_to((run / TEACHER).resolve(), target_is_directory=True)
    return dst


# ---------------------------------------------------------------------------- orchestration

def worker_of(kind: str) -> str:
    """The workers.py worker that runs a trainer kind (edgepack's modes are one worker with flags)."""
    return kind if kind.startswith("trl-") else "edgepack"


def run_worker(kind: str, python: str, spec: dict[str, Any], work: Path, tag: str, threads: int,
               env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = ["nice", "-n", "10", python, str(WORKERS), worker_of(kind), str(spec_path), str(out_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
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


def spec_for(kind: str, args: argparse.Namespace, prepared: dict[str, Any], work: Path, tag: str,
             steps: int) -> tuple[dict[str, Any], str]:
    """The worker spec of one run of ``kind`` and the python that runs it."""
    spec: dict[str, Any] = {
        "threads": args.threads, "steps": steps, "student_dir": prepared["student_dir"],
        "teacher_dir": prepared["teacher_dir"], "rows_path": prepared["rows_path"], "profile": args.profile,
        "step_tokens": prepared["step_tokens"], "step_prompt_tokens": prepared["step_prompt_tokens"],
        "max_new_tokens": prepared["max_new_tokens"], "soft_labels": kind == "edgepack-topk",
        "on_policy": 1.0 if kind == "edgepack-onpolicy" else 0.0, "on_policy_temperature": 1.0}
    if kind.startswith("trl-"):
        spec["out_dir"] = str(work / f"{tag}-out")
        return spec, args.trl_python
    spec["run_dir"] = str(make_run_dir(args.run, work / f"{tag}-run"))
    return spec, args.edgepack_python


def measure(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    log(f"prepare: student folder, ordered rows from {args.run}")
    prepared = prepare(args.run, work, args.steps)
    if prepared["max_new_tokens"] + prepared["max_prompt"] > MAX_LENGTH:
        # edgepack caps a completion at max_length - prompt; TRL does not: the caps would differ.
        raise SystemExit(f"prompt {prepared['max_prompt']} + {prepared['max_new_tokens']} new tokens exceed "
                         f"max_length {MAX_LENGTH}")
    kinds = [k for k in args.trainers.split(",") if k]
    runs: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        shift = (n - 1) % len(kinds)
        for position, kind in enumerate(kinds[shift:] + kinds[:shift], 1):  # each kind leads a round in turn
            tag = f"round{n}-{kind}"
            spec, python = spec_for(kind, args, prepared, work, tag, args.steps)
            log(f"round {n}: {kind} (load {load_average()})")
            result = run_worker(kind, python, spec, work, tag, args.threads)
            runs.append({**result, "round": n, "order": position})
            log(f"  {result['tokens_per_s']} tokens/s, peak RSS {result['peak_rss_mb']} MB, "
                f"step time {result['step_time_s']} s")
            if "run_dir" in spec:
                shutil.rmtree(spec["run_dir"], ignore_errors=True)
    profiles: dict[str, Any] = {}
    if args.profile_steps > 1:
        for kind in kinds:
            tag = f"profile-{kind}"
            spec, python = spec_for(kind, args, prepared, work, tag, min(args.profile_steps, args.steps))
            spec["profile_ops"] = True
            log(f"profile: {kind} (load {load_average()})")
            profiles[kind] = run_worker(kind, python, spec, work, tag, args.threads)
    return prepared, runs, profiles


def _memory_results(out: Path) -> dict[str, Any] | None:
    """results-memory.json beside ``out`` (memory.py's measurement of the trainer's memory options), if any."""
    path = out.with_name("results-memory.json")
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "workorders",
                        help="the run whose corrected teacher, student shape and train rows are used (only read)")
    parser.add_argument("--steps", type=int, default=6,
                        help="optimizer steps per run (6 keeps a TRL run around a minute on the shared 2-core machine)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trainers", default="edgepack,trl-gkd,edgepack-onpolicy,trl-distill",
                        help=f"comma-separated, of {', '.join([*MODES, 'trl-gkd', 'trl-distill'])}")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the rounds, one torch.profiler run per trainer over steps 2..N (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="cpu-x86-2c")
    parser.add_argument("--trl-python", default="/tmp/trl1-venv/bin/python")
    parser.add_argument("--edgepack-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "trl" / "results.json")
    parser.add_argument("--other-jobs", default="",
                        help="what else ran on the machine during the measurement, stated in results.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: recompute the summary of the --out JSON and rewrite it and results.md")
    args = parser.parse_args()
    from edgepack.atomic import write_json, write_text

    if args.render:  # the summary is derived from the runs' raw numbers: recompute it too
        results = json.loads(args.out.read_text())
        results["summary"] = summarize(results["runs"])
        write_json(args.out, results)
        write_text(args.out.with_suffix(".md"), render(results, _memory_results(args.out)))
        return

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
        prepared, runs, profiles = measure(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    trl_versions = next(r["versions"] for r in runs if r["trainer"].startswith("trl-"))
    try:
        run_name = str(args.run.resolve().relative_to(ROOT))
    except ValueError:
        run_name = str(args.run)
    results = {
        "command": "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv),
        "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": trl_versions, "run": run_name,
        "trl_python": args.trl_python, "threads": args.threads, "steps": args.steps, "edgepack_profile": args.profile,
        "load_average": {"start": load_start, "end": load_average()}, "other_jobs": args.other_jobs,
        "prepared": {k: v for k, v in prepared.items() if not k.endswith(("_dir", "_path"))},
        "runs": runs, "summary": summarize(runs),
        "profile": {k: {"ops": r["ops"], "load_average": r["load_average"], "tokens": r["tokens"]}
                    for k, r in profiles.items()},
        "notes": NOTES,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    write_text(args.out.with_suffix(".md"), render(results, _memory_results(args.out)))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
