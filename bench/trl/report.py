"""The TRL comparison's summary and markdown (bench/trl/run.py measures; this renders).

``summarize`` turns the per-round runs into means and ratios against issue #4's targets;
``render`` writes results.md. ``run.py --render`` re-renders a results.json without measuring.
"""

from __future__ import annotations

from typing import Any

TARGET_SPEEDUP = 1.5
"""edgepack's training tokens/s must be at least this multiple of TRL's (issue #4)."""
TARGET_MEMORY_RATIO = 0.7
"""... at most this fraction of TRL's peak memory."""
TEACHER = "teacher-corrected"
BATCH_SIZE, MICRO_BATCH, MAX_LENGTH, LR, SEED = 4, 2, 256, 3e-4, 0
"""The job both trainers run: rows per step, rows per micro-batch, max tokens, learning rate, seed."""


METRICS = {
    # key in a run's result: its label in the tables
    "tokens_per_s": "tokens/s, all steps",
    "tokens_per_s_after_step1": "tokens/s, steps 2..N",
    "tokens_per_cpu_s": "tokens per CPU-second",
    "best_step_tokens_per_s": "tokens/s of the fastest step",
    "peak_rss_mb": "process peak RSS MB (incl. saving the student)",
    "training_peak_rss_mb": "peak RSS MB at the last step's end (before saving)",
}


def with_derived(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` plus the rate of its fastest step (least disturbed by the other jobs, as timeit's minimum)."""
    rates = [t / s for t, s in zip(run["step_tokens"], run["step_seconds"])]
    return {**run, "best_step_tokens_per_s": round(max(rates), 2)}


SOFT_K = 32
"""Top-k of the cached soft labels in the cached mode (edgepack's default k)."""
MODES = {
    "edgepack": "dense KD, teacher online (like for like)",
    "edgepack-topk": f"KD from cached top-{SOFT_K} soft labels (no teacher in memory)",
}
"""edgepack's trainers in the comparison, each judged against TRL on its own."""


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round edgepack / TRL ratios of every metric for each edgepack mode that ran, their means
    over rounds, and the targets' verdicts (judged on the mean tokens/s and the mean process peak RSS,
    as issue #4 states them). The cached mode's tokens/s counts its share of the caching pass."""
    runs = [with_derived(r) for r in runs]
    rounds = sorted({r["round"] for r in runs})
    pick = {(r["round"], r["trainer"]): r for r in runs}
    kinds = [k for k in (*MODES, "trl") if all((n, k) in pick for n in rounds)]
    metrics = dict(METRICS, tokens_per_s_incl_cache="tokens/s incl. the soft-label cache pass")
    means = {kind: {key: round(sum(pick[n, kind].get(key, pick[n, kind]["tokens_per_s"]) for n in rounds)
                               / len(rounds), 2) for key in metrics}
             for kind in kinds}
    versus = {}
    for kind in (k for k in MODES if k in kinds):
        per_round = [{"round": n, **{key: round(pick[n, kind].get(key, pick[n, kind]["tokens_per_s"])
                                                / pick[n, "trl"][key if key in METRICS else "tokens_per_s"], 3)
                                     for key in metrics}} for n in rounds]
        ratio = {key: round(means[kind][key] / means["trl"][key if key in METRICS else "tokens_per_s"], 3)
                 for key in metrics}
        speed_key = "tokens_per_s_incl_cache"  # = tokens_per_s when nothing is cached
        versus[kind] = {
            "ratio_of_means": ratio, "per_round": per_round,
            "speedup": ratio[speed_key], "speedup_worst_round": min(p[speed_key] for p in per_round),
            "memory_ratio": ratio["peak_rss_mb"], "memory_ratio_worst_round": max(p["peak_rss_mb"] for p in per_round),
            "meets_speedup": ratio[speed_key] >= TARGET_SPEEDUP,
            "meets_memory": ratio["peak_rss_mb"] <= TARGET_MEMORY_RATIO,
        }
    return {"means": means, "versus_trl": versus, "modes": {k: MODES[k] for k in versus},
            "target_speedup": TARGET_SPEEDUP, "target_memory_ratio": TARGET_MEMORY_RATIO}


def render(results: dict[str, Any]) -> str:
    m, s, p = results["machine"], results["summary"], results["prepared"]
    v = results["versions"]
    lines = [
        "# edgepack KD vs TRL GKDTrainer (lmbda = 0) on the same model pair and data", "",
        f"Command: `{results['command']}`", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_mb']} MB, {m['system']} {m['release']}; "
        f"Python {m['python']}; torch {v['torch']}, {results['threads']} threads per trainer. "
        f"TRL {v['trl']}, transformers {v['transformers']}, accelerate {v['accelerate']}, datasets {v['datasets']} "
        f"(TRL side in `{results['trl_python']}`, edgepack side in `.venv`).", "",
        f"Load average (1/5/15 min): start {results['load_average']['start']}, end {results['load_average']['end']}"
        + ("; other agents' jobs shared the 2 cores, so absolute tokens/s are noisy" if
           max(results['load_average']['start'][0], results['load_average']['end'][0]) > 2.5 else
           " (no other heavy job; the trainers themselves keep the 1-minute load near 2)")
        + ". Each round runs the trainers back to back in fresh processes, each leading one round in turn, so "
        "the per-round ratios compare like with like.", "",
        f"Job: teacher `runs/demo/{TEACHER}` ({p['student']['teacher_params']:,} params) → the undistilled auto student "
        f"(blocks {p['student']['kept_layers']}, {p['student']['params']:,} params), identical starting weights on "
        f"both sides; {results['steps']} optimizer steps × {BATCH_SIZE} rows (micro-batch {MICRO_BATCH} × "
        f"{BATCH_SIZE // MICRO_BATCH} accumulation) from `runs/demo/data/train.jsonl` in the same order "
        f"({p['edgepack_tokens_expected']} student tokens, {p['answer_tokens']} answer tokens, longest row "
        f"{p['max_sequence']} tokens); AdamW lr {LR}, warmup 10 %, cosine to 0.1×, clip 1.0; fp32, no gradient "
        "checkpointing; loss forward KL(teacher ‖ student), T = 1, answer tokens only (edgepack "
        "`divergence=forward_kl, alpha=0`; TRL `beta=0, lmbda=0, seq_kd=False`).", "",
        "Tokens/s counts the student's non-pad input tokens (prompt + answer) per second of training-step time "
        "on both sides (edgepack: train_report `tokens / wall_s`; TRL: `num_input_tokens_seen` with "
        "`non_padding` over `on_epoch_begin` → last `on_step_end`). Tokens/CPU-s divides the same count by the "
        "process's CPU time (user + sys, all threads) over those steps: time the process waited for a core "
        "does not count, so it moves less with the other jobs; CPU use = CPU time / wall time (2.0 = both "
        "threads busy all the time). Peak memory is the process's peak RSS (VmHWM). KD losses are per answer "
        "token; TRL's logged loss is divided by its 2 accumulation steps (see the notes).", "",
        "| round | trainer | order | tokens | step time s | tokens/s | tokens/s steps 2..N | tokens/CPU-s "
        "| CPU use | peak RSS MB | peak RSS before save MB | RSS before step 1 MB | train call s | process s "
        "| first → last KD loss | load avg before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results["runs"]:
        losses = r["losses"]
        lines.append(
            f"| {r['round']} | {r['trainer']} | {r['order']} | {r['tokens']} | {r['step_time_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_s_after_step1']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
            f"{r['cpu_utilisation']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['training_peak_rss_mb']:.0f} | {r['rss_before_first_step_mb']:.0f} | "
            f"{r['train_call_s']:.1f} | {r['process_s']:.1f} | {losses[0]:.3f} → {losses[-1]:.3f} | "
            f"{r['load_average']['before'][0]} |")
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    for kind, cmp in s["versus_trl"].items():
        keys = list(cmp["per_round"][0])[1:]
        label = dict(METRICS, tokens_per_s_incl_cache="tokens/s incl. cache pass share")
        lines += ["", f"{kind} ({s['modes'][kind]}) / TRL per round (tokens/s: higher is better; memory: lower "
                  "is better):", "",
                  "| round | " + " | ".join(label[k] for k in keys) + " |", "|---:|" + "---:|" * len(keys),
                  *(f"| {q['round']} | " + " | ".join(f"{q[k]:.2f}×" for k in keys) + " |" for q in cmp["per_round"])]
    lines += ["", "| edgepack mode | target (issue #4) | measured (ratio of the means over rounds) | worst round | verdict |",
              "|---|---|---|---|---|"]
    for kind, cmp in s["versus_trl"].items():
        lines += [
            f"| {kind} | tokens/s ≥ {TARGET_SPEEDUP}× TRL | {cmp['speedup']:.2f}× "
            f"({s['means'][kind]['tokens_per_s_incl_cache']:.1f} vs {s['means']['trl']['tokens_per_s']:.1f}) | "
            f"{cmp['speedup_worst_round']:.2f}× | {ok(cmp['meets_speedup'])} |",
            f"| {kind} | peak memory ≤ {TARGET_MEMORY_RATIO}× TRL | {cmp['memory_ratio']:.2f}× "
            f"({s['means'][kind]['peak_rss_mb']:.0f} vs {s['means']['trl']['peak_rss_mb']:.0f} MB) | "
            f"{cmp['memory_ratio_worst_round']:.2f}× | {ok(cmp['meets_memory'])} |"]
    caches = [r["soft_label_cache"] for r in results["runs"] if r.get("soft_label_cache")]
    if caches:
        c = caches[0]
        lines += ["", f"The cached mode's soft labels: one teacher pass over all {c['rows']} train rows "
                  f"({c['tokens']} answer tokens, top-{SOFT_K} + tail mass) took "
                  f"{', '.join(str(x['s']) for x in caches)} s in its runs (peak RSS during it "
                  f"{max(x['peak_rss_mb'] for x in caches):.0f} MB); each run is charged the share for the "
                  f"{BATCH_SIZE * results['steps']} rows it trains on (`tokens/s incl. the cache pass`), which "
                  "the target is judged on. Over more epochs the pass is paid once."]
    lines.append("")
    prof = results.get("profile") or {}
    if len(prof) == 2 and all(v["ops"] for v in prof.values()):
        e, t = prof["edgepack"]["ops"], prof["trl"]["ops"]
        lines += [
            f"Where the time goes: torch.profiler over steps {e['profiled_steps']} of one extra run per trainer "
            f"(`--profile-steps`), same rows, self CPU time per op:", "",
            "| | edgepack | TRL | edgepack / TRL |", "|---|---:|---:|---:|",
            f"| matmul GFLOP | {e['matmul_gflop']} | {t['matmul_gflop']} | {e['matmul_gflop'] / t['matmul_gflop']:.2f} |",
            f"| matmul self CPU s | {e['matmul_self_cpu_s']} | {t['matmul_self_cpu_s']} | "
            f"{e['matmul_self_cpu_s'] / t['matmul_self_cpu_s']:.2f} |",
            f"| all ops self CPU s | {e['self_cpu_s']} | {t['self_cpu_s']} | {e['self_cpu_s'] / t['self_cpu_s']:.2f} |",
            f"| wall s (profiled steps) | {e['wall_s']} | {t['wall_s']} | {e['wall_s'] / t['wall_s']:.2f} |", "",
            "| edgepack op | self CPU s | share | calls | TRL op | self CPU s | share | calls |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
            *(f"| {a['op']} | {a['self_cpu_s']} | {a['share']:.1%} | {a['calls']} | {b['op']} | {b['self_cpu_s']} | "
              f"{b['share']:.1%} | {b['calls']} |" for a, b in zip(e["top_ops"][:10], t["top_ops"][:10])), "",
        ]
    floor = p["state_floor_mb"]
    lines += [f"Memory both trainers must hold (fp32 teacher + student weights, student gradients, two AdamW "
              f"moments): {floor:.0f} MB, {floor / s['means']['trl']['peak_rss_mb']:.2f}× TRL's mean peak. Above it: "
              f"edgepack {s['means']['edgepack']['peak_rss_mb'] - floor:.0f} MB, TRL "
              f"{s['means']['trl']['peak_rss_mb'] - floor:.0f} MB (imports, per-step tensors, allocator slack).", ""]
    if results.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


NOTES = [
    "TRL 0.27's GKDTrainer.compute_loss ignores `num_items_in_batch`, and the Trainer then skips dividing by "
    "`gradient_accumulation_steps` (Llama's forward accepts **kwargs), so its logged loss and its gradient "
    "before clipping are the sum of the 2 micro-batch means; the table shows the logged loss / 2, which "
    "matches edgepack's first-step loss to within a few tenths of a percent (same weights, same rows). Both "
    "sides clip at 1.0 and the gradient norms are far above it, so the updates differ little.",
    "Both trainers hold the same weights in memory (fp32 teacher, student, its gradients and two AdamW moments), "
    "so that floor dominates both peaks; the difference is what each builds per step. TRL's GKDTrainer runs both "
    "models over every position and keeps full [batch, sequence, vocab] fp32 logits, log-softmaxes and the "
    "element-wise KL; edgepack computes the LM head only at answer positions and runs the teacher only past "
    "the prompt prefix all rows share (its KV cache is computed once).",
    "edgepack trains under `torch.use_deterministic_algorithms(True)` (bit-identical resume) with PyTorch's "
    "`torch.utils.deterministic.fill_uninitialized_memory` off (its default fills every new tensor with NaN first, "
    "about 8% of a step in session 3's profile); the `aten::fill_` calls left are zero-initialisations "
    "(gradients, masks).",
    "edgepack's student runs the prompt prefix every row shares (the system prompt, 158 tokens of ~200) once "
    "per micro-batch and the rest of each row against its KV cache, with gradients flowing through the cache "
    "(`distill/batching.py: answer_hidden`; a test checks values and gradients against the full batch), and the "
    "teacher's prefix cache is computed once per run; with logits only at answer positions that is why its "
    "matmul FLOPs are about a third of TRL's.",
    "Memory: the cached mode holds no teacher; what it keeps is the student's fp32 weights (311 MB), AdamW's "
    "two moments (623 MB), the gradients accumulated across the 2 micro-batches (311 MB) and ~220 MB of "
    "torch + transformers imports, about 1.47 GB, plus one micro-batch's activations and the dense gradient "
    "transients of the tied 49152 × 576 embedding / output head (113 MB each) during backward. That floor "
    "alone is 0.48× TRL's peak, which leaves ~680 MB for activations and allocator slack to stay under 0.7×; "
    "the measured peak is ~890 MB above the floor. Lower would take another recipe (LoRA, gradient "
    "checkpointing, 8-bit optimizer states), which would no longer be the same training as TRL's.",
    "TRL's process also imports datasets/pandas/pyarrow (see 'RSS after imports' in results.json); that is "
    "part of its footprint as shipped.",
    "TRL's DataCollatorForChatML labels the assistant turn's trailing newline after <|im_end|> as well, so its "
    "token count is one token per row higher than edgepack's; each side's own count is used for its rate.",
    "GKDTrainer slices logits from the batch's longest prompt onward (`prompts.shape[1]`), so in a micro-batch "
    "whose rows have different prompt and answer lengths a few answer tokens of the shorter-prompt row fall "
    "outside its loss; the compute is unchanged, so the throughput comparison is unaffected, and its KD loss "
    "values are close to, not equal to, edgepack's.",
]
