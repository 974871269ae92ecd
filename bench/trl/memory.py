"""What lowers edgepack's training peak RSS: each candidate change measured in a fresh process.

The TRL comparison (run.py) misses its memory target (peak ≤ 0.7× TRL's). This script runs
edgepack's trainer (workers.worker_edgepack: the same job, rows and student as run.py) once per
*variant*, each a change applied from outside ``distill/`` — an environment variable read by
glibc's malloc, or a patch installed in the worker process before training starts — and records:

* the process's peak RSS (VmHWM) and tokens/s, and the KD loss curve (a variant that changes
  the numerics shows it there);
* where the peak is reached: a sampler thread reads VmRSS every ``--sample-ms`` and keeps the
  highest value per *phase* (``generate``, ``forward+backward``, ``clip``, ``optimizer``), the
  phases marked by wrapping ``onpolicy.sample_completions``, ``clip_grad_norm_`` and the
  optimizer's ``step``; and VmHWM before and after every optimizer step.

Variants (``VARIANTS``, by exact name; ``+`` combines them, e.g. ``foreach-off+bf16-moments``):

=================  =====================================================================================
``baseline``        as shipped: ``torch.optim.AdamW`` (foreach on the CPU by default), fp32 moments
``foreach-off``     ``AdamW(foreach=False)``: one parameter at a time, so the update's temporaries
                    (``sqrt(v)``...) are one tensor's size, not all the parameters' at once
``bf16-moments``    AdamW with ``exp_avg`` / ``exp_avg_sq`` held in bf16 (the update computed in fp32
                    per parameter, then rounded back): the moments take half the memory
``teacher-bf16``    the frozen teacher held in bf16 (``Device.teacher_dtype``); its logits are cast
                    back to fp32 before the loss
``precision-bf16``  ``train_student(precision="bf16")``: the student's forward under CPU bf16 autocast
                    (fp32 master weights, gradients and moments; a recipe change, unlike the others)
``mmap-64k``        ``MALLOC_MMAP_THRESHOLD_=65536``: glibc serves every block ≥ 64 KiB with mmap and
                    returns it at free (the default threshold rises to 32 MiB as blocks are freed,
                    after which freed activations stay in the heap)
``mmap-1m``         ``MALLOC_MMAP_THRESHOLD_=1048576``: the same from 1 MiB up (fewer mmap calls and page faults)
``arena-1``         ``MALLOC_ARENA_MAX=1``: one malloc arena for all threads
``trim-step``       ``malloc_trim(0)`` after every optimizer step (returns free heap pages)
``checkpointing``   the planner's plan with gradient checkpointing on (what it picks when the profile's
                    memory is short): each block's activations recomputed in backward, and the student's
                    shared-prefix pass off (train_setup.py turns it off under checkpointing)
=================  =====================================================================================

Trainer options (``OPTION_VARIANTS``): the real ``distill train`` options, set in the worker's
TrainConfig (no patch): ``optimizer=adamw-bf16`` (optim.AdamWBf16: bf16 moments, stochastic
rounding, updated in 64K-element chunks) and ``teacher=bf16`` (``--teacher-precision bf16``).

Run (the machine's other jobs change tokens/s, not peaks; compare tokens/s within one call)::

    nice -n 10 .venv/bin/python bench/trl/memory.py --variants baseline,foreach-off,bf16-moments,...

writes ``bench/trl/memory.json`` and ``bench/trl/memory.md`` (``--out`` elsewhere: the trainer options'
measurement is ``--out bench/trl/results-memory.json``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import OPTION_VARIANTS  # noqa: E402  (bench/trl/report.py: the variants that are trainer options)

ROOT = HERE.parents[1]
ENV_VARIANTS = {"mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "mmap-1m": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                "arena-1": {"MALLOC_ARENA_MAX": "1"}}
"""Variants that are environment variables of the worker process (glibc reads them at start)."""


# ---------------------------------------------------------------------------- patches (worker process)

def _adamw_foreach_off() -> None:
    import torch

    class AdamWForeachOff(torch.optim.AdamW):
        def __init__(self, params: Any, **kw: Any) -> None:
            super().__init__(params, **{**kw, "foreach": False})

    torch.optim.AdamW = AdamWForeachOff


def _adamw_bf16_moments() -> None:
    import torch

    class AdamWBf16Moments(torch.optim.Optimizer):
        """AdamW (decoupled weight decay, bias-corrected) whose two moments are stored in bf16."""

        def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
            super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["step"] += 1
                    t = state["step"]
                    if wd:
                        p.mul_(1 - lr * wd)
                    m = state["exp_avg"].float().lerp_(p.grad, 1 - b1)
                    v = state["exp_avg_sq"].float().mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                    denom = v.sqrt_().div_(math.sqrt(1 - b2 ** t)).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                    del m, v, denom

    torch.optim.AdamW = AdamWBf16Moments


def _teacher_bf16() -> None:
    import torch

    from edgepack.distill import device, train_loss

    device.Device.teacher_dtype = property(lambda self: torch.bfloat16)
    original = train_loss.OnlineTeacher.targets

    def targets(self: Any, indices: Any, examples: Any) -> Any:
        return original(self, indices, examples).float()

    train_loss.OnlineTeacher.targets = targets


def _precision_bf16() -> None:
    import functools

    from edgepack.distill import train

    train.train_student = functools.partial(train.train_student, precision="bf16")


def _checkpointing() -> None:
    import dataclasses

    from edgepack.distill import plan

    original = plan.plan_training

    def with_checkpointing(*a: Any, **kw: Any) -> Any:
        return dataclasses.replace(original(*a, **kw), checkpointing=True)

    plan.plan_training = with_checkpointing


def _trim_each_step() -> None:
    libc = ctypes.CDLL("libc.so.6")
    PHASES.after_step.append(lambda: libc.malloc_trim(0))


TITLE = "What lowers edgepack's training peak RSS (bench/trl/memory.py)"

PATCHES = {"foreach-off": _adamw_foreach_off, "bf16-moments": _adamw_bf16_moments, "teacher-bf16": _teacher_bf16,
           "precision-bf16": _precision_bf16, "trim-step": _trim_each_step, "checkpointing": _checkpointing}
VARIANTS = ("baseline", *PATCHES, *ENV_VARIANTS, *OPTION_VARIANTS)


class Phases:
    """The phase the trainer is in (set by wrappers) and the highest VmRSS a sampler thread saw in each."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.peak: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.after_step: list[Any] = []
        self._stop = threading.Event()

    def sample(self, every_s: float) -> None:
        from workers import proc_status_mb

        while not self._stop.is_set():
            rss = proc_status_mb("VmRSS")
            if rss > self.peak.get(self.phase, 0.0):
                self.peak[self.phase] = rss
            time.sleep(every_s)

    def start(self, every_s: float) -> None:
        threading.Thread(target=self.sample, args=(every_s,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


PHASES = Phases()


def _instrument() -> None:
    """Mark the phases: generation, gradient clipping, the optimizer step (the rest is forward + backward)."""
    import torch

    from edgepack.distill import onpolicy
    from workers import memory_now

    def phase(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            before, PHASES.phase = PHASES.phase, name
            try:
                return fn(*a, **kw)
            finally:
                PHASES.phase = before
        return wrapped

    onpolicy.sample_completions = phase("generate", onpolicy.sample_completions)
    torch.nn.utils.clip_grad_norm_ = phase("clip", torch.nn.utils.clip_grad_norm_)
    from edgepack.distill.optim import AdamWBf16

    for optimizer_class in (torch.optim.AdamW, AdamWBf16):
        optimizer_class.step = _phase_step(optimizer_class.step, memory_now)


def _phase_step(plain_step: Any, memory_now: Any) -> Any:
    def step(self: Any, *a: Any, **kw: Any) -> Any:
        before = memory_now()
        PHASES.phase = "optimizer"
        try:
            return plain_step(self, *a, **kw)
        finally:
            for hook in PHASES.after_step:
                hook()
            PHASES.steps.append({"hwm_before_mb": before["peak_rss_mb"], "rss_before_mb": before["rss_mb"],
                                 **{k + "_after": v for k, v in memory_now().items()}})
            PHASES.phase = "forward+backward"

    return step


def worker(variant: str, spec_path: Path, out_path: Path, sample_ms: float) -> None:
    from workers import worker_edgepack

    names = variant.split("+")
    for name in names:
        if name in PATCHES:
            PATCHES[name]()
    _instrument()
    PHASES.phase = "forward+backward"
    PHASES.start(sample_ms / 1000)
    result = worker_edgepack(json.loads(spec_path.read_text()))
    PHASES.stop()
    out_path.write_text(json.dumps({**result, "variant": variant, "phase_peak_rss_mb": PHASES.peak,
                                    "optimizer_steps": PHASES.steps}, indent=2))


# ---------------------------------------------------------------------------- orchestration (.venv)

def run_variant(variant: str, mode: str, prepared: dict[str, Any], args: argparse.Namespace, work: Path,
                tag: str) -> dict[str, Any]:
    import subprocess

    from run import load_average, make_run_dir

    spec = {"threads": args.threads, "steps": args.steps, "student_dir": prepared["student_dir"],
            "teacher_dir": prepared["teacher_dir"], "rows_path": prepared["rows_path"], "profile": args.profile,
            "step_tokens": prepared["step_tokens"], "step_prompt_tokens": prepared["step_prompt_tokens"],
            "max_new_tokens": prepared["max_new_tokens"], "on_policy": 1.0 if mode == "on-policy" else 0.0,
            "run_dir": str(make_run_dir(args.run, work / f"{tag}-run")),
            **{k: v for name in variant.split("+") for k, v in OPTION_VARIANTS.get(name, {}).items()}}
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for name in variant.split("+"):
        env.update(ENV_VARIANTS.get(name, {}))
    cmd = ["nice", "-n", "10", args.edgepack_python, str(Path(__file__).resolve()), "worker", variant,
           str(spec_path), str(out_path), str(args.sample_ms)]
    available = _wait_for_memory(args.min_available_mb)
    load = load_average()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    r = json.loads(out_path.read_text())
    return {"variant": variant, "mode": mode, "tag": tag, "load_before": load, "mem_available_before_mb": available,
            "env": {k: v for n in variant.split("+") for k, v in ENV_VARIANTS.get(n, {}).items()},
            **{k: r[k] for k in ("peak_rss_mb", "training_peak_rss_mb", "tokens", "tokens_per_s", "tokens_per_cpu_s",
                                 "step_time_s", "rss_after_imports_mb", "rss_before_first_step_mb", "losses",
                                 "step_end_rss_mb", "step_end_peak_rss_mb", "phase_peak_rss_mb", "optimizer_steps",
                                 "completion_tokens")},
            "own_report": r.get("own_report")}


def _wait_for_memory(min_mb: float) -> float:
    """MemAvailable (MB) once it is at least ``min_mb``: other jobs share this machine, and a peak
    measured while the kernel reclaims pages is not the trainer's own."""
    from run import log

    while True:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) / 1024
        if available >= min_mb:
            return round(available)
        log(f"  waiting: {available:.0f} MB available, below {min_mb:.0f} MB")
        time.sleep(30)


def render(results: dict[str, Any]) -> str:
    base = {m: next((r for r in results["runs"] if r["variant"] == "baseline" and r["mode"] == m), None)
            for m in ("off-policy", "on-policy")}
    trl = results.get("trl_peaks_mb") or {}
    lines = [
        f"# {results.get('title', TITLE)}", "",
        f"Command: `{results['command']}`", "",
        f"Job: bench/trl's (run `{results['run']}`, {results['steps']} steps × 4 rows, micro-batch 2, full fine-tuning "
        f"of the {results['prepared']['student']['params']:,}-parameter student in fp32, dense KD with the fp32 "
        f"teacher online; on-policy: λ = 1, {results['prepared']['max_new_tokens']} new tokens). Each variant in a "
        f"fresh process; load average at start {results['load_average']['start']}, end "
        f"{results['load_average']['end']} (tokens/s moves with the other jobs; peaks do not).", "",
        "Phase peaks: the highest VmRSS a sampler thread saw (every "
        f"{results['sample_ms']} ms) while the trainer generated, ran forward + backward, clipped or stepped the "
        "optimizer.", "",
        "| mode | variant | peak RSS MB | vs baseline | " + "".join(f"vs {k} ({v:.0f} MB) | " for k, v in trl.items())
        + "tokens/s | RSS before step 1 MB | peak forward+backward | peak optimizer | peak generate "
        "| KD loss first → last | load before |",
        "|---|---|---:|---:|" + "---:|" * len(trl) + "---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results["runs"]:
        b = base.get(r["mode"])
        ph = r["phase_peak_rss_mb"]
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['peak_rss_mb']:.0f} | "
            f"{(r['peak_rss_mb'] - b['peak_rss_mb']) if b else 0:+.0f} | "
            + "".join(f"{r['peak_rss_mb'] / v:.2f}× | " for v in trl.values())
            + f"{r['tokens_per_s']:.1f} | {r['rss_before_first_step_mb']:.0f} | "
            f"{ph.get('forward+backward', 0):.0f} | {ph.get('optimizer', 0):.0f} | {ph.get('generate', 0) or '–'} | "
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} | {r['load_before'][0]} |")
    lines += _verdicts(results["runs"], trl)
    lines += ["", *results.get("findings", []), ""]
    return "\n".join(lines)


COUNTERPART = {"off-policy": "trl-gkd", "on-policy": "trl-distill"}
"""The TRL trainer each mode is compared with (run.py): GKDTrainer λ = 0, DistillationTrainer."""
TARGET = 0.7
"""Issue #19: edgepack's peak memory ≤ 0.7× TRL's on the same job."""


def _verdicts(runs: list[dict[str, Any]], trl: dict[str, float]) -> list[str]:
    """Each (mode, variant)'s mean peak over its runs against its mode's TRL trainer and the target,
    with the planner's estimate and what the trainer reported holding."""
    if not trl:
        return []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["variant"]), []).append(r)
    lines = ["", f"Against the target (issue #19: peak ≤ {TARGET}× the TRL trainer's on the same job; TRL's peaks "
             "are the means over rounds in results.json, measured on this machine before TRL's venv was removed):", "",
             "| mode | variant | runs | peak RSS MB (each) | mean | TRL trainer | TRL peak MB | ratio | verdict "
             "| planned peak MB | measured / planned | optimizer state MB | teacher held |",
             "|---|---|---:|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for (mode, variant), group in groups.items():
        name = COUNTERPART[mode]
        if name not in trl:
            continue
        mean = sum(r["peak_rss_mb"] for r in group) / len(group)
        ratio = mean / trl[name]
        own = group[-1].get("own_report") or {}
        planned = (own.get("plan") or {}).get("planned_peak_mb")
        teacher = f"{own['teacher_dtype']}, {own['teacher_weights_mb']:.0f} MB" if own.get("teacher_dtype") else "–"
        each = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in group)
        lines.append(f"| {mode} | {variant} | {len(group)} | {each} | "
                     f"{mean:.0f} | {name} | {trl[name]:.0f} | {ratio:.3f}× | "
                     f"{'met' if ratio <= TARGET else 'NOT met'} | {planned if planned is not None else '–'} | "
                     f"{f'{mean / planned:.2f}' if planned else '–'} | {own.get('optimizer_state_mb') or '–'} | "
                     f"{teacher} |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]))
        return
    from run import ROOT as _, load_average, log, prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "workorders")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="baseline,bf16-moments,teacher-bf16,mmap-64k,foreach-off,"
                        "mmap-1m,bf16-moments+teacher-bf16+mmap-64k,bf16-moments+teacher-bf16+mmap-1m,arena-1,trim-step,"
                        "precision-bf16")
    parser.add_argument("--modes", default="off-policy,on-policy", help="off-policy, on-policy or both (comma-separated)")
    parser.add_argument("--on-policy-variants", default="baseline,bf16-moments+teacher-bf16+mmap-64k,"
                        "bf16-moments+teacher-bf16+mmap-1m",
                        help="the variants of the on-policy mode (--variants: the off-policy mode's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="cpu-x86-2c")
    parser.add_argument("--sample-ms", type=float, default=5.0)
    parser.add_argument("--edgepack-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--trl-results", type=Path, default=HERE / "results.json",
                        help="the TRL peaks to compare with (results.json's means), when it exists")
    parser.add_argument("--out", type=Path, default=HERE / "memory.json")
    parser.add_argument("--render", action="store_true", help="rewrite memory.md from --out without measuring")
    parser.add_argument("--append", action="store_true", help="add these runs to those already in --out")
    parser.add_argument("--min-available-mb", type=float, default=5000,
                        help="wait before each variant until this much memory is available (shared machine)")
    parser.add_argument("--title", default=TITLE)
    args = parser.parse_args()
    from edgepack.atomic import write_json, write_text

    trl_peaks: dict[str, float] = {}
    if args.trl_results.is_file():
        means = json.loads(args.trl_results.read_text())["summary"]["means"]
        trl_peaks = {k: v["peak_rss_mb"] for k, v in means.items() if k.startswith("trl-")}
    if args.render:  # with the TRL peaks of --trl-results as they are now
        results = {**json.loads(args.out.read_text()), "trl_peaks_mb": trl_peaks}
        write_json(args.out, results)
        write_text(args.out.with_suffix(".md"), render(results))
        return
    for v in f"{args.variants},{args.on_policy_variants}".split(","):
        unknown = [n for n in v.split("+") if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant {'+'.join(unknown)}; known: {', '.join(VARIANTS)}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    command = "nice -n 10 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    earlier = json.loads(args.out.read_text()) if args.append and args.out.is_file() else {}
    runs: list[dict[str, Any]] = list(earlier.get("runs", []))
    commands = [*earlier.get("commands", [earlier["command"]] if earlier else []), command]
    with tempfile.TemporaryDirectory(prefix="edgepack-mem-bench-") as tmp:
        work = Path(tmp)
        prepared = prepare(args.run, work, args.steps)
        for mode in args.modes.split(","):
            variants = args.variants if mode == "off-policy" else args.on_policy_variants
            for i, variant in enumerate(variants.split(",")):
                log(f"{mode}: {variant} (load {load_average()})")
                r = run_variant(variant, mode, prepared, args, work, f"{mode}-{i}")
                log(f"  peak {r['peak_rss_mb']} MB, {r['tokens_per_s']} tokens/s, phases {r['phase_peak_rss_mb']}")
                runs.append(r)
                # Written after every variant, so an interrupted measurement keeps what it has.
                # --append keeps the earlier title (unless one is given) and findings.
                title = args.title if args.title != TITLE else earlier.get("title", TITLE)
                results = {"title": title, "findings": earlier.get("findings", []),
                           "command": " && ".join(commands), "commands": commands,
                           "started": earlier.get("started", started), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "run": run_label(args.run), "steps": args.steps, "sample_ms": args.sample_ms,
                           "threads": args.threads,
                           "load_average": {"start": earlier.get("load_average", {}).get("start", load_start),
                                            "end": load_average()}, "trl_peaks_mb": trl_peaks,
                           "prepared": {k: v for k, v in prepared.items() if not k.endswith(("_dir", "_path"))},
                           "runs": runs}
                write_json(args.out, results)
                write_text(args.out.with_suffix(".md"), render(results))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def run_label(run: Path) -> str:
    try:
        return str(run.resolve().relative_to(ROOT))
    except ValueError:
        return str(run)


if __name__ == "__main__":
    main()
