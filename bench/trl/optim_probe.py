"""Which AdamW with smaller state works on the CPU: library 8-bit optimizers against distill/optim.py's.

Each optimizer runs in a fresh process on parameters shaped like bench/trl's student (the 77.9M
parameters of the 14-block SmolLM2 student: the tied 49152 × 576 embedding, 14 blocks of q/k/v/o,
gate/up/down and two norms, the final norm), with fixed random gradients, for ``--steps`` steps, and
reports: RSS after the steps over RSS before the first one (the optimizer's state, plus whatever it
imported or compiled), the peak over the same baseline (the state plus the step's temporaries), and
the seconds per step. torch runs with 1 thread.

The libraries are not dependencies of edgepack: install their wheels outside the venv
(``pip install --no-deps --target DIR bitsandbytes==0.50.2 torchao==0.18.0``) and pass ``--packages DIR``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trl/optim_probe.py --packages /tmp/memopt-pkgs

writes bench/trl/optim_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("adamw", "adamw-bf16", "bnb-adamw8bit", "torchao-adamw8bit")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def _student_shapes() -> list[tuple[int, ...]]:
    block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]
    return [(49152, 576), *(block * 14), (576,)]


def _make(name: str, params: list[Any]) -> Any:
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    if name == "adamw-bf16":
        from edgepack.distill.optim import AdamWBf16

        return AdamWBf16(params, lr=1e-3, weight_decay=0.0)
    if name == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.0)
    import torchao.optim

    return torchao.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.0)


def worker(name: str, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in _student_shapes()]
    opt = _make(name, params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        seconds.append(round(time.perf_counter() - t0, 2))
    return {"optimizer": name, "params": sum(p.numel() for p in params),
            "rss_after_steps_over_before_mb": round(_status_mb("VmRSS") - before),
            "peak_over_before_mb": round(_status_mb("VmHWM") - before), "step_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packages", type=Path, help="folder holding bitsandbytes and torchao (pip --target)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=HERE / "optim_probe.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.packages:
            sys.path.insert(0, str(args.packages))
        print(json.dumps(worker(args.worker, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    results = []
    for name in args.optimizers.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
        if args.packages:
            cmd += ["--packages", str(args.packages)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"optimizer": name, "error": (done.stderr or done.stdout)[-500:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    load = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps({"command": " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python", *sys.argv]),
                                    "load_average_end": load, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
