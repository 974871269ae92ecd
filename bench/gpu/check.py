"""The GPU device check of issue #18: one script, under 8 minutes on one CUDA GPU, one JSON.

    .venv/bin/python bench/gpu/check.py --out bench/gpu/results.json [--run runs/demo] [--budget-s 450]

Sections, each run through the real CLI in a subprocess, each recorded (or its error) in the JSON:

* ``data``: a scratch run of the demo pair (``builtin:smollm2-135m-instruct`` teacher, the demo
  domain, ``--limit`` prompts), unless ``--run`` names a finished one (its data and teacher are linked).
* ``train_cuda`` / ``train_cpu``: 20 KD steps on CUDA (``--device cuda``, bf16 or fp16 autocast)
  and ``--cpu-steps`` on the CPU of the same run; tokens/s of each, the CUDA run's planned vs
  measured peak (torch.cuda.max_memory_allocated) and its ratio (issue target 0.7-1.0).
* ``resume``: the CUDA training killed (SIGKILL) after its step-10 checkpoint, then ``--resume``:
  it must continue at step 10 and finish; its final loss beside the uninterrupted run's (not
  bit-identical on a GPU; the report says so).
* ``softlabels``: the soft-label cache built with the teacher on CUDA (a variant trained
  against it): wall time, bytes, the identity's teacher device/dtype.
* ``gate``: the student exported to Q4_K_M and gated on profile gpu-8gb (llama.cpp offload
  of every layer where llama-cpp-python was built with CUDA: ``make setup GPU=cuda``): TTFT,
  decode tok/s, and the GPU memory used during the gate (NVML via nvidia-ml-py when importable).
* ``correct``: teacher correction on CUDA (``distill data --correct-teacher --device cuda``,
  ``CORRECT_STEPS`` LoRA steps on a fresh scratch run of ``--limit`` demo prompts): the device,
  precision and loss curve its correction.json records, its LoRA wall time, the holdout score
  before and after, and the fp16 steps skipped for gradient overflow (GPUs without bf16).

With no CUDA device it refuses in one line, exit 2, before doing anything. It has not yet been
run on a GPU (README, "Training on a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EDGEPACK = [sys.executable, "-m", "edgepack"]
TEACHER = "builtin:smollm2-135m-instruct"
PROFILE = "gpu-8gb"
STEPS = 20
CORRECT_STEPS = 10


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu" / "results.json")
    p.add_argument("--run", type=Path, default=None, help="a finished run (data + teacher) to train beside")
    p.add_argument("--scratch", type=Path, default=ROOT / "runs" / "gpu-check")
    p.add_argument("--limit", type=int, default=64, help="training prompts of the scratch run")
    p.add_argument("--cpu-steps", type=int, default=3, help="CPU steps for the tokens/s comparison")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this")
    return p.parse_args(argv)


def cuda_or_refuse() -> str:
    """The CUDA device's name; exit 2 with one line when there is none."""
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu/check.py: no CUDA device in this process (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}); run it on a CUDA machine", file=sys.stderr)
        raise SystemExit(2)
    return torch.cuda.get_device_name(0)


def edgepack(*args: str, timeout: float) -> dict[str, Any]:
    """``edgepack ARGS --json``; its JSON, or RuntimeError with the last lines of stderr."""
    done = subprocess.run([*EDGEPACK, *args, "--json"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"edgepack {' '.join(args)} exit {done.returncode}: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout)


def prepare_run(args: argparse.Namespace) -> Path:
    run = args.scratch / "run"
    if args.run is not None:  # link a finished run's data and teacher, train here
        run.mkdir(parents=True, exist_ok=True)
        for name in ("data", "teacher"):
            if not (run / name).exists():
                (run / name).symlink_to((args.run / name).resolve())
        return run
    if not (run / "data" / ".complete").exists():
        edgepack("distill", "data", "--out", str(run), "--teacher", TEACHER, "--limit", str(args.limit), timeout=300)
    return run


def train(run: Path, variant: str, device: str, steps: int, *extra: str, timeout: float = 300) -> dict[str, Any]:
    r = edgepack("distill", "train", str(run), "-p", PROFILE, "--steps", str(steps), "--variant", variant,
                 "--device", device, *extra, timeout=timeout)
    keys = ("device", "precision", "bit_reproducible", "bit_reproducible_reason", "tokens_per_s", "wall_s",
            "final_loss", "peak_rss_mb", "peak_measure", "measured_over_planned_peak", "resumed_from_step")
    return {k: r.get(k) for k in keys} | {"planned_peak_mb": (r.get("plan") or {}).get("planned_peak_mb"),
                                          "plan": r.get("plan")}


def killed_and_resumed(run: Path) -> dict[str, Any]:
    """SIGKILL the CUDA training once its step-10 checkpoint is complete, then resume it."""
    ckpts = run / "checkpoints-kill"
    proc = subprocess.Popen([*EDGEPACK, "distill", "train", str(run), "-p", PROFILE, "--steps", str(STEPS),
                             "--variant", "kill", "--device", "cuda", "--json"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any((d / ".complete").exists() for d in ckpts.glob("step-*")):
            break
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = train(run, "kill", "cuda", STEPS, "--resume")
    return {"killed_mid_run": killed, **resumed}


def softlabels(run: Path) -> dict[str, Any]:
    report = train(run, "soft", "cuda", 5, "--soft-labels")
    index = json.loads((run / "softlabels" / "index.json").read_text())
    return {**report, "cache": {k: index.get(k) for k in ("wall_s", "bytes", "tokens", "k")},
            "teacher_device": index["identity"].get("teacher_device"),
            "teacher_dtype": index["identity"].get("teacher_dtype")}


def correct(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher correction's LoRA steps on CUDA; merge, GGUF and scoring stay on the CPU (correct.py)."""
    run = args.scratch / "correct"
    if run.exists():  # a fresh correction each time: a finished one would be reused, not timed
        shutil.rmtree(run)
    data = edgepack("distill", "data", "--out", str(run), "--teacher", TEACHER, "--limit", str(args.limit),
                    "--correct-teacher", "--correct-steps", str(CORRECT_STEPS), "--device", "cuda", timeout=360)
    c = json.loads((run / "teacher-corrected" / "correction.json").read_text())
    keys = ("device", "precision", "bit_reproducible", "bit_reproducible_reason", "steps", "rows_used",
            "first_loss", "final_loss", "train_s", "metric", "score_before", "score_after", "holdout_scored")
    return {k: c.get(k) for k in keys} | {
        "skipped_fp16_overflow": sum(1 for h in c["loss_curve"] if h.get("skipped_fp16_overflow")),
        "identity_device": c["identity"].get("device"), "data_kept": data.get("kept")}


class NvmlPeak:
    """Peak GPU memory used (NVML, 10 Hz) while a section runs; None without nvidia-ml-py."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception as exc:  # noqa: BLE001 - recorded: nvidia-ml-py absent or no driver
            self._nvml, self.error = None, f"NVML unavailable: {exc}"
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / (1 << 20)
            self.peak_mb = max(self.peak_mb or 0.0, used)
            time.sleep(0.1)

    def __enter__(self) -> NvmlPeak:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def gate(run: Path) -> dict[str, Any]:
    artifacts = run.parent / "artifacts"  # the CUDA-trained student (RUN/student-cuda), as Q4_K_M
    edgepack("export", str(run / "student-cuda"), "--format", "gguf", "--quant", "Q4_K_M", "--no-fidelity",
             "--out", str(artifacts), timeout=240)
    gguf = next(iter(sorted(artifacts.glob("*Q4_K_M*.gguf"))))
    with NvmlPeak() as nvml:
        report = edgepack("gate", str(gguf), "-p", PROFILE, "--holdout", str(run / "data" / "holdout.jsonl"),
                          timeout=240)
    m = report.get("measurements") or {}
    return {"gguf": str(gguf), "verdict": report.get("verdict"), "ttft_ms": m.get("ttft_ms"),
            "decode_tokens_per_s": m.get("decode_tokens_per_s"), "vram_mb_reported": m.get("vram_mb"),
            "gpu_layers": m.get("gpu_layers"), "nvml_peak_used_mb": nvml.peak_mb,
            "nvml_note": getattr(nvml, "error", None)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    gpu = cuda_or_refuse()
    t0 = time.monotonic()
    out: dict[str, Any] = {"gpu": gpu, "sections": {}}
    run = prepare_run(args)
    sections = [("train_cuda", lambda: train(run, "cuda", "cuda", STEPS)),
                ("train_cpu", lambda: train(run, "cpu", "cpu", args.cpu_steps)),
                ("resume", lambda: killed_and_resumed(run)),
                ("softlabels", lambda: softlabels(run)),
                ("gate", lambda: gate(run)),
                ("correct", lambda: correct(args))]
    for name, section in sections:
        if time.monotonic() - t0 > args.budget_s:
            out["sections"][name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            continue
        s0 = time.monotonic()
        try:
            out["sections"][name] = {**section(), "section_s": round(time.monotonic() - s0, 1)}
        except Exception as exc:  # noqa: BLE001 - each section's failure is a result, recorded
            out["sections"][name] = {"error": str(exc)[-800:], "section_s": round(time.monotonic() - s0, 1)}
    cuda, cpu = out["sections"].get("train_cuda", {}), out["sections"].get("train_cpu", {})
    if cuda.get("tokens_per_s") and cpu.get("tokens_per_s"):
        out["cuda_over_cpu_tokens_per_s"] = round(cuda["tokens_per_s"] / cpu["tokens_per_s"], 2)
    out["total_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 1 if any("error" in s for s in out["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
