"""Latency and memory measurement of one artifact, in a fresh child process.

The gate never measures in its own process: the CLI has imported torch or transformers,
other models may be loaded, and peak RSS would be theirs too. :func:`measure_artifact` runs
``python -m edgepack.export.gate.measure ...`` and reads one JSON document from its stdout, so
``peak_rss_mb`` is the child's own peak: the interpreter, the runtime library and the model
(mmapped weights count once touched, as on the device). A child that hangs is killed at
the timeout; one that crashes or is OOM-killed becomes ``{"ok": false, "error": ...}`` naming
the signal; the parent never hangs and never raises for a bad artifact.

Peak RSS is the child's own high-water mark (``VmHWM`` on Linux; see :func:`_peak_rss_mb` for
why not ``ru_maxrss``).

What one run measures (after one warm-up run; at least ``runs`` timed runs, default 5, and more
until the timed runs add up to ``min_seconds``, default 10 s, or ``max_runs``, default 40, are
done: a fast model's runs last a fraction of a second each, and five of them are too few for a
p95 that repeats within ±10% from one gate to the next):

- TTFT: a prompt of exactly ``prompt_tokens`` tokens (filler text cut to length) is evaluated
  from an empty cache and the first token sampled; wall time to that first token.
- decode speed: the run continues greedily for ``decode_tokens`` tokens, end-of-sequence
  ignored so every run decodes the same count; rate = (tokens - 1) / (t_last - t_first).

The gaps between consecutive decoded tokens of every run are kept too (``inter_token_ms``),
for the latency plot. Each series is reported with p50, p95 (linear interpolation between order statistics; with
5 runs p95 lies between the two slowest), min, max, mean, stdev and the raw samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILLER = (
    "Maintenance log: pump P-101 discharge pressure dropped below the low alarm limit while "
    "motor current stayed normal; the operator checked the suction strainer, the coupling and "
    "the bearing temperatures, then logged vibration readings for the drive end and the "
    "non-drive end before the next shift. "
)
DEFAULT_RUNS = 5
DEFAULT_MIN_SECONDS = 10.0
DEFAULT_MAX_RUNS = 40
DEFAULT_DECODE_TOKENS = 64


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty list")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, Any]:
    """p50/p95/min/max/mean/stdev of a series, plus the samples themselves."""
    return {
        "p50": percentile(values, 50), "p95": percentile(values, 95),
        "min": min(values), "max": max(values), "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values), "samples": [round(v, 4) for v in values],
    }


def exact_prompt(backend: Any, n_tokens: int) -> list[int]:
    """Token ids of a natural-text prompt exactly ``n_tokens`` long (BOS included if used)."""
    if n_tokens <= 0:
        raise ValueError("prompt_tokens must be > 0")
    text = FILLER
    tokens = backend.tokenize(text, add_special=True)
    while len(tokens) < n_tokens:
        text += FILLER
        tokens = backend.tokenize(text, add_special=True)
    return tokens[:n_tokens]


def _peak_rss_mb() -> float:
    """This process image's peak RSS in MB.

    On Linux ``ru_maxrss`` is NOT the child's own: exec() folds the high-water mark of the
    pre-exec image (a fork or vfork of the parent, i.e. the parent's RSS) into it, so a gate
    started from a process holding torch would report the parent's 400+ MB. ``VmHWM`` in
    /proc/self/status belongs to the new address space only, so it is used where it exists.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # macOS: bytes


def measure_in_process(path: Path, *, fmt: str, threads: int, n_ctx: int, prompt_tokens: int,
                       decode_tokens: int = DEFAULT_DECODE_TOKENS, runs: int = DEFAULT_RUNS,
                       gpu_layers: int = 0, min_seconds: float = DEFAULT_MIN_SECONDS,
                       max_runs: int = DEFAULT_MAX_RUNS) -> dict[str, Any]:
    """The child's work: load, warm up, time at least ``runs`` runs and until ``min_seconds`` of
    timed runs or ``max_runs`` runs. Call only in a fresh process."""
    from edgepack.runtime.backends.base import get_backend

    if runs < 1 or decode_tokens < 2 or max_runs < runs or min_seconds < 0:
        raise ValueError("need runs >= 1, decode_tokens >= 2, max_runs >= runs and min_seconds >= 0")
    if prompt_tokens + decode_tokens > n_ctx:
        raise ValueError(f"prompt_tokens + decode_tokens ({prompt_tokens + decode_tokens}) exceed n_ctx {n_ctx}")
    backend_cls = get_backend(fmt)
    t0 = time.perf_counter()
    backend_cls.prepare()
    import_s = time.perf_counter() - t0
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    backend = backend_cls.load(path, threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers)
    load_s = time.perf_counter() - t0
    rss_after_load = _peak_rss_mb()
    prompt = exact_prompt(backend, prompt_tokens)

    ttft_ms: list[float] = []
    decode_tps: list[float] = []
    inter_token_ms: list[float] = []  # every gap between consecutive tokens, all runs
    timed_s = 0.0
    i = -1
    while True:  # run 0 warms caches and is not recorded
        i += 1
        if i > runs and (timed_s >= min_seconds or i > max_runs):
            break
        start = time.perf_counter()
        stamps: list[float] = []
        for _ in backend.generate(prompt, max_tokens=decode_tokens, temperature=0.0, stop_at_eos=False):
            stamps.append(time.perf_counter())
        if len(stamps) < 2:
            raise RuntimeError(f"the model produced {len(stamps)} tokens; cannot time decoding")
        if i == 0:
            continue
        timed_s += stamps[-1] - start
        ttft_ms.append((stamps[0] - start) * 1000.0)
        decode_tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        inter_token_ms += [(b - a) * 1000.0 for a, b in zip(stamps, stamps[1:])]
    info = backend.info
    gpu_offload = bool(info.get("gpu_offload_supported")) and gpu_layers != 0
    vram_mb = process_vram_mb(os.getpid()) if gpu_offload else None  # while the model is still loaded
    backend.close()
    return {
        "ok": True, "artifact": str(path), "format": fmt, "threads": threads, "n_ctx": n_ctx,
        "gpu_layers": gpu_layers, "prompt_tokens": len(prompt), "decode_tokens": decode_tokens,
        "warmup_runs": 1, "runs": len(ttft_ms), "min_runs": runs, "min_seconds": min_seconds,
        "max_runs": max_runs, "timed_s": timed_s, "import_s": import_s, "load_s": load_s,
        "ttft_ms": summarize(ttft_ms), "decode_tokens_per_s": summarize(decode_tps),
        "inter_token_ms": summarize(inter_token_ms),
        "rss_before_load_mb": rss_before, "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": _peak_rss_mb(), "backend": info, "gpu_offload": gpu_offload, "vram_mb": vram_mb,
        "timing": "TTFT = prompt evaluation from an empty cache + first sample (tokenization excluded); "
                  "decode = (tokens - 1) / time from first to last token, end-of-sequence ignored",
    }


def parse_compute_apps(csv_text: str, pid: int) -> float | None:
    """MiB used by ``pid`` in ``nvidia-smi --query-compute-apps=pid,used_memory`` CSV output."""
    total = None
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                total = (total or 0.0) + float(parts[1].split()[0])
            except (ValueError, IndexError):
                continue
    return total


def process_vram_mb(pid: int) -> float | None:
    """GPU memory this process holds, from nvidia-smi (None where that cannot be read)."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_compute_apps(out.stdout, pid) if out.returncode == 0 else None


def child_command(path: Path, *, fmt: str, threads: int, n_ctx: int, prompt_tokens: int,
                  decode_tokens: int = DEFAULT_DECODE_TOKENS, runs: int = DEFAULT_RUNS,
                  gpu_layers: int = 0, min_seconds: float = DEFAULT_MIN_SECONDS,
                  max_runs: int = DEFAULT_MAX_RUNS) -> list[str]:
    """The argv that measures ``path`` in a fresh interpreter."""
    return [sys.executable, "-m", "edgepack.export.gate.measure", str(Path(path).resolve()),
            "--format", fmt, "--threads", str(threads), "--n-ctx", str(n_ctx),
            "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens),
            "--runs", str(runs), "--gpu-layers", str(gpu_layers), "--min-seconds", str(min_seconds),
            "--max-runs", str(max(max_runs, runs))]


def run_child(cmd: list[str], *, timeout_s: float, what: str = "measurement") -> dict[str, Any]:
    """Run a measurement child; its JSON on success, else ``{"ok": False, "error": ...}``.

    The child gets its own session so a timeout kills it and anything it started. ``what``
    names the work in the error messages ("measurement", "holdout pass", ...).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        seconds = f"{timeout_s:.1f}".rstrip("0").rstrip(".")
        return _failure(f"{what} timed out after {seconds} s (child killed)", err, start)
    rc = proc.returncode
    if rc < 0:
        name = _signal_name(-rc)
        why = " (the out-of-memory killer is the usual sender)" if -rc == signal.SIGKILL else ""
        return _failure(f"{what} process was killed by {name}{why}", err, start)
    try:
        result = json.loads(out.decode("utf-8", errors="replace").strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return _failure(f"{what} process exited {rc} without a JSON result", err, start)
    if not isinstance(result, dict):
        return _failure(f"{what} process exited {rc} with a non-object result", err, start)
    if rc != 0 and result.get("ok"):
        return _failure(f"{what} process exited {rc}", err, start)
    result.setdefault("ok", False)
    result["wall_s"] = time.perf_counter() - start
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _failure(message: str, stderr: bytes | None, start: float) -> dict[str, Any]:
    tail = (stderr or b"").decode("utf-8", errors="replace").strip().splitlines()[-5:]
    return {"ok": False, "error": message, "stderr_tail": tail, "wall_s": time.perf_counter() - start}


def default_timeout_s(path: Path) -> float:
    """Generous wall-clock limit: 5 minutes plus 1 minute per GB of model on disk."""
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() \
        else Path(path).stat().st_size
    return 300.0 + 60.0 * size / 1e9


def measure_artifact(path: Path, *, fmt: str, threads: int, n_ctx: int, prompt_tokens: int,
                     decode_tokens: int = DEFAULT_DECODE_TOKENS, runs: int = DEFAULT_RUNS,
                     gpu_layers: int = 0, timeout_s: float | None = None,
                     min_seconds: float = DEFAULT_MIN_SECONDS, max_runs: int = DEFAULT_MAX_RUNS) -> dict[str, Any]:
    """Measure ``path`` in a fresh child process; see the module docstring for the numbers."""
    cmd = child_command(path, fmt=fmt, threads=threads, n_ctx=n_ctx, prompt_tokens=prompt_tokens,
                        decode_tokens=decode_tokens, runs=runs, gpu_layers=gpu_layers,
                        min_seconds=min_seconds, max_runs=max_runs)
    return run_child(cmd, timeout_s=timeout_s if timeout_s is not None else default_timeout_s(path))


def main(argv: list[str] | None = None) -> int:
    """Child entry point: measure, print one JSON line on the real stdout, exit 0/1."""
    parser = argparse.ArgumentParser(prog="python -m edgepack.export.gate.measure")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--format", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS)
    parser.add_argument("--max-runs", type=int, default=DEFAULT_MAX_RUNS)
    args = parser.parse_args(argv)
    return child_json_main(
        lambda: measure_in_process(args.artifact, fmt=args.format, threads=args.threads, n_ctx=args.n_ctx,
                                   prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                   runs=args.runs, gpu_layers=args.gpu_layers, min_seconds=args.min_seconds,
                                   max_runs=args.max_runs),
        lambda exc: {"peak_rss_mb": _peak_rss_mb()})


def child_json_main(work: Callable[[], dict[str, Any]],
                    error_fields: Callable[[Exception], dict[str, Any]] = lambda exc: {}) -> int:
    """A child's body: run ``work`` and print its dict as one JSON line on the real stdout (fd 1
    goes to stderr meanwhile: native libraries may print there); an exception becomes
    ``{"ok": False, "error", "error_type", **error_fields(exc)}`` and exit code 1 — data for the
    parent (:func:`run_child`), not a traceback."""
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        result, code = work(), 0
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__,
                  **error_fields(exc)}
        code = 1
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
