"""The training planner's transients (edgepack/train_memory.py) against what torch and the process hold.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale/memory.py

For each shape (random-init Llama, SmolLM2's vocabulary, 2 micro-batches per step of 256-token
rows whose last 30% are answer positions) a fresh process runs three optimizer steps of the
trainer's own micro-step — ``batching.answer_hidden``, the tied LM head at answer positions, CE
and sparse forward KL against random top-32 targets (``losses``), backward, clipping, AdamW —
three times:

* ``live``: torch's profiler memory events over the third step give torch's live CPU bytes at
  their peak (what autograd and the optimizer hold; no allocator);
* ``rss``: the process's peak RSS with glibc's default malloc (what training reports on the CPU);
* ``rss_mmap``: the same with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks handed back: RSS ≈ live).

Each is compared with the planner's figure for the same inputs (its process growth left out: no
training call runs here, and each process's baseline is its RSS after imports). Writes
``bench/scale/memory.json`` and ``memory.md``.

``--cuda --out FILE`` (a GPU machine; python3 with torch and transformers, edgepack importable)
measures ``torch.cuda.max_memory_allocated`` over the third step instead, in fp32 and under bf16
autocast, for bench/scale's sizes (:data:`CUDA_SHAPES`), to set against the planner's device plan
(no heap term, no process growth). Not yet run: the one GPU call of this session got no machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 49152
ANSWER_FRACTION = 0.3
SHAPES = [  # hidden, layers, heads, kv heads, intermediate, micro-batch, checkpointing
    (64, 2, 4, 2, 128, 4, False),
    (256, 4, 4, 2, 768, 2, False),
    (576, 10, 9, 3, 1536, 1, False),
    (576, 10, 9, 3, 1536, 4, False),
    (576, 10, 9, 3, 1536, 2, True),
    (576, 30, 9, 3, 1536, 2, False),
]
CUDA_SHAPES = [  # bench/scale's sizes and two micro-batches of the 135M shape
    (576, 30, 9, 3, 1536, 2, False),
    (576, 30, 9, 3, 1536, 4, False),
    (576, 30, 9, 3, 1536, 4, True),
    (960, 32, 15, 5, 2560, 2, False),
    (2048, 14, 32, 32, 8192, 2, False),
]
SEQ = 256


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trainer_step(spec: list[int], device: str = "cpu", bf16: bool = False) -> tuple[Any, Any]:
    """(model, step): a random-init Llama of ``spec`` and one optimizer step of the trainer's
    micro-step (answer_hidden → head → sparse KD + CE, two micro-batches, clip, AdamW) on ``device``,
    under bf16 autocast for the forward where ``bf16`` (the losses in fp32, as train_step does).
    ``step()`` returns the answer positions per micro-batch."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepack.distill.batching import answer_hidden
    from edgepack.distill.losses import SparseTargets, blend, cross_entropy, sparse_forward_kl

    hidden, layers, heads, kv, inter, mb, ckpt = spec
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=VOCAB, head_dim=hidden // heads,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prompt = int(SEQ * (1 - ANSWER_FRACTION))
    seqs = [[int(x) for x in torch.randint(0, VOCAB, (SEQ,))] for _ in range(mb)]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def micro() -> int:
        with torch.device(device):
            with autocast:
                hid, batch = answer_hidden(model.get_decoder(), seqs, [prompt] * mb, 0, 0)
                logits = model.get_output_embeddings()(hid)
            n = logits.shape[0]
            targets = SparseTargets(torch.randint(0, VOCAB, (n, 32)), torch.log_softmax(torch.randn(n, 32), -1) - 0.1,
                                    torch.full((n,), -2.3))
            ce = cross_entropy(logits.float()[None], batch.targets[None], torch.ones(1, n))
            (blend(sparse_forward_kl(logits.float(), targets), ce, 0.2) * 0.5).backward()
        return n

    def step() -> int:
        n = micro() + micro()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n // 2

    return model, step


def worker(spec: list[int], mode: str) -> dict[str, Any]:
    """Three steps of the trainer's micro-step on a random-init Llama; the figure ``mode`` asks for."""
    import torch

    if mode.startswith("cuda"):
        return cuda_worker(spec, bf16=mode == "cuda_bf16")
    torch.set_num_threads(1)
    baseline = _rss_mb()
    model, step = _trainer_step(spec)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    step()
    step()
    if mode != "live":
        n = step()
        done.set()
        return {"answer_positions": n, "baseline_mb": round(baseline, 1), "peak_rss_mb": round(peak[0], 1)}
    from torch.profiler import ProfilerActivity, profile

    state = sum(p.numel() for p in model.parameters()) * 12  # weights + AdamW's m and v, alive at the step's start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        n = step()
    done.set()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = high = 0
    for _, delta in events:
        live += delta
        high = max(high, live)
    return {"answer_positions": n, "live_peak_mb": round((state + high) / 2**20, 1)}


def cuda_worker(spec: list[int], *, bf16: bool) -> dict[str, Any]:
    """The same three steps on CUDA (bf16 autocast for the forward where ``bf16``, the losses in fp32, as
    train_step does): torch.cuda.max_memory_allocated over the third step, what training reports there."""
    import torch

    _, step = _trainer_step(spec, "cuda", bf16)
    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    n = step()
    torch.cuda.synchronize()
    return {"answer_positions": n, "bf16": bf16, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def run_worker(spec: tuple, mode: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == "rss_mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps([int(x) for x in spec]), mode],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} {mode} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned(spec: tuple, answers: int | None = None) -> dict[str, Any]:
    """The planner's parts for the same inputs (full fine-tuning, fp32 AdamW, cached soft labels), the
    vocabulary-wide tensors at every position, or at ``answers`` positions (the data known)."""
    from edgepack.train_memory import transients
    from edgepack.profiles.fit import shape_from_config

    hidden, layers, heads, kv, inter, mb, ckpt = spec
    shape = shape_from_config({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                               "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": VOCAB,
                               "tie_word_embeddings": True})
    t = transients(shape, micro_batch=mb, seq_len=SEQ, checkpointing=bool(ckpt), trainable_params=shape.params,
                   answer_positions=answers)
    state = 16 * shape.params / 2**20  # weights, gradients, AdamW's m and v
    live = state + (t.activations_bytes + t.logits_bytes) / 2**20
    return {"params": shape.params, "state_mb": round(state, 1), **{f"{k}_mb": v for k, v in t.describe_mb().items()},
            "planned_live_mb": round(live, 1), "planned_mb": round(live + t.heap_retained_bytes / 2**20, 1)}


def render(results: dict[str, Any]) -> str:
    lines = ["# The training planner's transients against torch's live bytes and the process's peak RSS", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {results['machine'].get('cpu')}; torch {results['torch']}; load average at start "
             f"{results['load_average']}. Other jobs shared the two cores (memory figures do not move with load).", "",
             f"Each row: 2 micro-batches per step of {SEQ}-token rows (last {ANSWER_FRACTION:.0%} answer positions), "
             "the third optimizer step. MB above the process's RSS after imports. The planner counts every position's "
             "logits (it is given the row length, not the answer length).", "",
             "| hidden × layers, micro-batch | params | answer positions | torch live peak | planned live "
             "| live / planned | RSS peak (glibc default) | planned (+ heap kept) | RSS / planned "
             "| RSS peak (mmap threshold 64 KiB) | that / planned live | planned, answers known | RSS / that |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        h, layers, _, _, _, mb, ckpt = r["spec"]
        p = r["planned"]
        rss = r["rss"]["peak_rss_mb"] - r["rss"]["baseline_mb"]
        mm = r["rss_mmap"]["peak_rss_mb"] - r["rss_mmap"]["baseline_mb"]
        lines.append(f"| {h} × {layers}, {mb}{', checkpointing' if ckpt else ''} | {p['params'] / 1e6:.1f}M | "
                     f"{r['live']['answer_positions']} | {r['live']['live_peak_mb']} | {p['planned_live_mb']} | "
                     f"{r['live']['live_peak_mb'] / p['planned_live_mb']:.2f} | {rss:.1f} | {p['planned_mb']} | "
                     f"{rss / p['planned_mb']:.2f} | {mm:.1f} | {mm / p['planned_live_mb']:.2f} | "
                     f"{r['planned_answers']['planned_mb']} | {rss / r['planned_answers']['planned_mb']:.2f} |")
    return "\n".join(lines + [""] + results.get("notes", [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale" / "memory.json")
    parser.add_argument("--render-only", action="store_true", help="recompute the planner's figures and memory.md")
    parser.add_argument("--cuda", action="store_true",
                        help="measure torch.cuda.max_memory_allocated for CUDA_SHAPES in fp32 and bf16 autocast instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker[0]), args.worker[1])))
        return
    if args.render_only:
        write(args.out, json.loads(args.out.read_text()))
        return
    if args.cuda:
        rows = []
        for spec in CUDA_SHAPES:
            for mode in ("cuda", "cuda_bf16"):
                rows.append({"spec": list(spec), "mode": mode, **run_worker(spec, mode)})
                sys.stderr.write(f"{rows[-1]}\n")
        args.out.write_text(json.dumps({"command": "python3 bench/scale/memory.py --cuda"
                                        + "".join(f" {a}" for a in sys.argv[1:]), "rows": rows}, indent=2) + "\n")
        return
    import torch

    from edgepack.provenance import machine_info

    results: dict[str, Any] = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/scale/memory.py"
                               + "".join(f" {a}" for a in sys.argv[1:]),
                               "machine": machine_info(), "torch": torch.__version__,
                               "load_average": [round(x, 2) for x in os.getloadavg()], "rows": []}
    for spec in SHAPES:
        row = {"spec": list(spec), "planned": planned(spec)}
        for mode in ("live", "rss", "rss_mmap"):
            row[mode] = run_worker(spec, mode)
        results["rows"].append(row)
        sys.stderr.write(f"{spec}: {row}\n")
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out, results)


def write(out: Path, results: dict[str, Any]) -> None:
    """memory.json and memory.md, the planner's figures recomputed by the checked-out planner."""
    for row in results["rows"]:
        row["planned"] = planned(tuple(row["spec"]))
        row["planned_answers"] = planned(tuple(row["spec"]), answers=row["live"]["answer_positions"])
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))


if __name__ == "__main__":
    main()
