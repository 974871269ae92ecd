"""Cost vs model size on this CPU: random-init Llama students at SmolLM2 widths (issue #18, item 5).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/scale/run.py --sizes 135m,360m,1b

writes ``bench/scale/results.json`` and ``results.md``. Nothing is downloaded: each size is a
random-init ``LlamaForCausalLM`` with SmolLM2's tokenizer (vocab 49152, tied embeddings), copied
from a run's teacher folder (``--tokenizer-from``, default ``runs/workorders/teacher``). Per size,
in a scratch run folder ``runs/scale/<size>/`` (``--scratch``; gitignored, big files removed when
the size is done) built from a copy of ``--run``'s data (the first ``--rows`` training rows):

1. **teacher** = a random-init model of that size (seed 0), **student** = another (seed 1); both
   are the same shape, so the soft-label cost grows with size as the training cost does.
2. **soft labels**: ``distill.softlabels.cache_soft_labels`` (top-32 + tail, no samples) in a
   fresh process: wall time (model load included), the teacher forward / sparsify / write split,
   bytes on disk and per answer token, time per 1k answer tokens.
3. **training**: ``edgepack distill train RUN --student <init> --soft-labels --steps N --profile P``
   (the real CLI, a fresh process): tokens/s, the planner's choice (full / LoRA, micro-batch,
   checkpointing), its planned peak and the measured peak RSS, from train_report.json.
4. **export**: ``export.api.export_gguf_artifacts`` (what ``edgepack export --format gguf --quant
   Q4_K_M`` runs): HF → F16 GGUF time, F16 → Q4_K_M time, file sizes, tensor types.
5. **gate decode**: ``export.gate.measure.measure_artifact`` (the gate's child-process measurement:
   the profile's prompt length and threads, 64 decoded tokens with end-of-sequence ignored) and
   ``bandwidth.artifact_efficiency`` against ``machine_bandwidth()``.
6. **per-token cost split** (``--worker overhead``): the same prompt and greedy chain as the gate,
   timing separately ``Llama.eval([token])`` (llama_decode + llama-cpp-python's logits copy),
   llama.cpp's own decode time (``llama_perf_context``) and ``llama_sampler_sample``; against the
   bandwidth bound ``bytes per token / read GB/s``. Also run on the 78M demo student
   (``--demo-gguf``) so its 0.41 efficiency can be explained from measured parts.

A size already in ``--out`` is kept (the script is resumable per size); ``--redo`` recomputes it.
``--train-only`` measures stages 1-3 again (soft labels, training, the planner's estimate) and
keeps each size's export and decode figures; ``--decode-only`` measures stages 5-6 again on the
kept Q4_K_M files; ``--replan`` adds the checked-out planner's estimate to every recorded size.

This file is the command line; the parts live beside it, one concept each: ``scale_shapes.py``
(the sizes), ``scale_runs.py`` (the scratch run of random-init models), ``scale_workers.py``
(measurements in a fresh process), ``scale_stages.py`` (training, decode, one size end to end),
``scale_report.py`` (results.md and the findings) and ``scale_machine.py`` (load, memory, log).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scale_*.py modules beside this script

from scale_machine import log  # noqa: E402
from scale_report import write_results  # noqa: E402
from scale_shapes import SIZES, TEST_SIZES, parse_sizes  # noqa: E402
from scale_stages import (data_lengths, demo_overhead, measure_decode, measure_size, measure_training,  # noqa: E402
                          replan)
from scale_workers import worker_cache, worker_export, worker_overhead  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="135m,360m,1b")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale" / "results.json")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "workorders", help="run whose data is copied")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "runs" / "workorders" / "teacher")
    parser.add_argument("--scratch", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--rows", type=int, default=12, help="training rows copied (steps × batch 4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", default="cpu-x86-2c")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads for caching, training, export")
    parser.add_argument("--gate-threads", type=int, default=2, help="llama.cpp threads (the profile's)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="the profile's [latency] prompt_tokens")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the per-token split")
    parser.add_argument("--decode-timeout", type=float, default=600, help="seconds per decode measurement")
    parser.add_argument("--dtype", default="bfloat16", help="on-disk dtype of the random-init folders")
    parser.add_argument("--min-available-mb", type=int, default=19000, help="wait for this much before ~1B training")
    parser.add_argument("--demo-gguf", type=Path, default=Path("/work/tmp/m1/runs/demo/artifacts/student-Q4_K_M.gguf"))
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json")
    parser.add_argument("--replan", action="store_true",
                        help="add the checked-out planner's estimate for every recorded size, also given the "
                             "data's row and answer lengths (no training)")
    parser.add_argument("--decode-only", action="store_true",
                        help="measure decode again on the kept Q4_K_M files (and the demo's); keep the rest")
    parser.add_argument("--train-only", action="store_true",
                        help="measure soft labels and training again (stages 1-3); keep export and decode")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--test-sizes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "cache":
            out = worker_cache(Path(rest[0]))
        elif kind == "export":
            out = worker_export(Path(rest[0]))
        elif kind == "overhead":
            out = worker_overhead(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            raise SystemExit(f"unknown worker {kind!r}")
        print(json.dumps(out))
        return

    known = TEST_SIZES if args.test_sizes else SIZES
    try:
        sizes = parse_sizes(args.sizes, known)
    except ValueError as exc:
        parser.error(str(exc))

    import torch

    from edgepack.provenance import machine_info

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("sizes", {})
    command = f"OMP_NUM_THREADS={args.threads} nice -n 5 .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.render_only:
        write_results(args.out, results)
        return
    if args.replan:
        lengths = data_lengths(args.run, args.tokenizer_from, results.get("rows", args.rows))
        for r in results["sizes"].values():
            r["train"]["replanned"] = replan(r, results.get("profile", args.profile), args.tokenizer_from, lengths)
        write_results(args.out, results)
        return
    if args.decode_only:
        results["decode_commands"] = [*results.get("decode_commands", []), command]
    elif not args.train_only:
        results["command"] = command
    results.update({"machine": machine_info(), "torch": torch.__version__, "threads": args.threads,
                    "gate_threads": args.gate_threads, "profile": args.profile, "steps": args.steps,
                    "rows": args.rows, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens})
    if args.decode_only:
        for name in sizes:
            gguf = args.scratch / name / "run" / "artifacts" / "student-Q4_K_M.gguf"
            if name in results["sizes"] and gguf.is_file():
                results["sizes"][name].update(measure_decode(name, gguf, args))
                write_results(args.out, results)
        if args.demo_gguf and args.demo_gguf.is_file():
            results["demo"] = demo_overhead(args.demo_gguf, args)
        write_results(args.out, results)
        return
    if args.train_only:
        results["train_commands"] = [*results.get("train_commands", []), command]
        for name in sizes:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            results["sizes"].setdefault(name, {}).update({**measure_training(name, known[name], args),
                                                          "train_started": started, "train_command": command})
            write_results(args.out, results)
        return
    for name in sizes:
        if name in results["sizes"] and not args.redo:
            log(f"{name}: kept from {args.out}")
            continue
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        results["sizes"][name] = {**measure_size(name, known[name], args), "started": started,
                                  "took_s": round(time.perf_counter() - t0, 1), "command": command}
        write_results(args.out, results)
    if args.demo_gguf and args.demo_gguf.is_file() and ("demo" not in results or args.redo):
        log("demo: gate decode and per-token split")
        results["demo"] = demo_overhead(args.demo_gguf, args)
    write_results(args.out, results)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
