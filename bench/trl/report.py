"""The TRL comparison's summary and markdown (bench/trl/run.py measures; this renders).

``summarize`` turns the per-round runs into means and ratios of each edgepack mode against the
TRL trainer that does the same job (``MODES``), judged against issue #19's targets; ``render``
writes results.md. ``run.py --render`` re-renders a results.json without measuring.
"""

from __future__ import annotations

from typing import Any

TARGET_SPEEDUP = 1.5
"""edgepack's training tokens/s must be at least this multiple of TRL's (issues #4, #19)."""
TARGET_MEMORY_RATIO = 0.7
"""... at most this fraction of TRL's peak memory."""
TEACHER = "teacher-corrected"
BATCH_SIZE, MICRO_BATCH, MAX_LENGTH, LR, SEED = 4, 2, 256, 3e-4, 0
"""The job every trainer runs: rows per step, rows per micro-batch, max tokens, learning rate, seed."""
SOFT_K = 32
"""Top-k of the cached soft labels in the cached mode (edgepack's default k)."""

TRL_TRAINERS = {
    "trl-gkd": "TRL `trl.experimental.gkd.GKDTrainer`, `lmbda=0` (off-policy: the teacher's answers)",
    "trl-distill": "TRL `trl.DistillationTrainer` (on-policy every step: the student samples, the teacher scores)",
}
"""The TRL trainers (workers.py runs them), by the name the runs record."""
MODES = {
    "edgepack": ("trl-gkd", "off-policy dense KD, teacher online"),
    "edgepack-onpolicy": ("trl-distill", "on-policy KD, λ = 1 (`on_policy=1.0`, hf scorer)"),
    "edgepack-topk": ("trl-gkd", f"off-policy KD from cached top-{SOFT_K} soft labels (no teacher in memory)"),
}
"""edgepack's modes in the comparison → (the TRL trainer it is judged against, what it is)."""

METRICS = {
    # key in a run's result: its label in the tables
    "tokens_per_s": "tokens/s, all steps",
    "tokens_per_s_after_step1": "tokens/s, steps 2..N",
    "tokens_per_cpu_s": "tokens per CPU-second",
    "best_step_tokens_per_s": "tokens/s of the fastest step",
    "s_per_step": "seconds per step",
    "peak_rss_mb": "process peak RSS MB (incl. saving the student)",
    "training_peak_rss_mb": "peak RSS MB at the last step's end (before saving)",
}
LOWER_IS_BETTER = {"s_per_step", "peak_rss_mb", "training_peak_rss_mb"}


OPTION_VARIANTS = {"optimizer=adamw-bf16": {"optimizer": "adamw-bf16"},
                   "teacher=bf16": {"teacher_precision": "bf16"}, "checkpointing=on": {"checkpointing": "on"},
                   "mmap=64k": {"mmap_threshold": 65536}}
"""memory.py's variants that are `distill train` options: TrainConfig fields the edgepack worker sets
(workers.worker_edgepack); a field's flag is ``--`` + its name with dashes."""

def with_derived(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` plus the rate of its fastest step (least disturbed by the other jobs, as timeit's minimum)
    and its mean seconds per optimizer step."""
    rates = [t / s for t, s in zip(run["step_tokens"], run["step_seconds"])]
    return {**run, "best_step_tokens_per_s": round(max(rates), 2),
            "s_per_step": round(run["step_time_s"] / len(run["step_seconds"]), 3)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round edgepack / TRL ratios of every metric for each edgepack mode that ran beside its TRL
    counterpart, their means over rounds, and the targets' verdicts (judged on the mean tokens/s and
    the mean process peak RSS). The cached mode's tokens/s counts its share of the caching pass."""
    runs = [with_derived(r) for r in runs]
    rounds = sorted({r["round"] for r in runs})
    pick = {(r["round"], r["trainer"]): r for r in runs}
    kinds = [k for k in (*MODES, *TRL_TRAINERS) if all((n, k) in pick for n in rounds)]
    metrics = dict(METRICS, tokens_per_s_incl_cache="tokens/s incl. the soft-label cache pass")

    def value(n: int, kind: str, key: str) -> float:
        run = pick[n, kind]
        return run[key] if run.get(key) is not None else run["tokens_per_s"]

    means = {kind: {key: round(sum(value(n, kind, key) for n in rounds) / len(rounds), 3) for key in metrics}
             for kind in kinds}
    versus = {}
    for kind, (trl, _) in MODES.items():
        if kind not in kinds or trl not in kinds:
            continue
        base = lambda key: key if key in METRICS else "tokens_per_s"  # noqa: E731
        per_round = [{"round": n, **{key: round(value(n, kind, key) / value(n, trl, base(key)), 3) for key in metrics}}
                     for n in rounds]
        ratio = {key: round(means[kind][key] / means[trl][base(key)], 3) for key in metrics}
        speed_key = "tokens_per_s_incl_cache"  # = tokens_per_s when nothing is cached
        versus[kind] = {
            "against": trl, "ratio_of_means": ratio, "per_round": per_round,
            "speedup": ratio[speed_key], "speedup_worst_round": min(p[speed_key] for p in per_round),
            "memory_ratio": ratio["peak_rss_mb"], "memory_ratio_worst_round": max(p["peak_rss_mb"] for p in per_round),
            "meets_speedup": ratio[speed_key] >= TARGET_SPEEDUP,
            "meets_memory": ratio["peak_rss_mb"] <= TARGET_MEMORY_RATIO,
        }
    return {"means": means, "versus_trl": versus, "modes": {k: MODES[k][1] for k in versus},
            "trl_trainers": {k: v for k, v in TRL_TRAINERS.items() if k in kinds},
            "target_speedup": TARGET_SPEEDUP, "target_memory_ratio": TARGET_MEMORY_RATIO}


def _run_row(r: dict[str, Any]) -> str:
    losses = r["losses"]
    completion = r.get("completion_tokens")
    return (f"| {r['round']} | {r['trainer']} | {r['order']} | {r['tokens']} | "
            f"{sum(completion) if completion else '–'} | {r['step_time_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['tokens_per_s_after_step1']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
            f"{r['cpu_utilisation']:.2f} | {r['peak_rss_mb']:.0f} | {r['training_peak_rss_mb']:.0f} | "
            f"{r['rss_before_first_step_mb']:.0f} | {r['train_call_s']:.1f} | {r['process_s']:.1f} | "
            f"{losses[0]:.3f} → {losses[-1]:.3f} | {r['load_average']['before'][0]} |")


def render(results: dict[str, Any], memory: dict[str, Any] | None = None) -> str:
    """results.md from results.json; ``memory``: results-memory.json (memory.py's measurement of the
    trainer's memory options), whose verdicts are added below the targets table."""
    m, s, p = results["machine"], results["summary"], results["prepared"]
    v = results["versions"]
    load = results["load_average"]
    busy = max(load["start"][0], load["end"][0]) > 2.5 or results.get("other_jobs")
    lines = [
        "# edgepack vs TRL 1.x: off-policy (GKDTrainer, λ = 0) and on-policy (DistillationTrainer) KD on the "
        "same model pair and data", "",
        f"Command: `{results['command']}`", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_mb']} MB, {m['system']} {m['release']}; "
        f"Python {m['python']}; torch {v['torch']}, {results['threads']} threads per trainer. "
        f"TRL {v['trl']}, transformers {v['transformers']}, accelerate {v['accelerate']}, datasets {v['datasets']}, "
        f"peft {v['peft']}, tokenizers {v['tokenizers']} (TRL side in `{results['trl_python']}`; edgepack side in "
        "`.venv`, transformers 4.57 as pinned).", "",
        f"Load average (1/5/15 min): start {load['start']}, end {load['end']}"
        + ("; " + results["other_jobs"] if results.get("other_jobs") else "")
        + ("; other jobs shared the 2 cores, so absolute tokens/s are noisy" if busy else
           " (no other heavy job; the trainers themselves keep the 1-minute load near 2)")
        + ". Each round runs every trainer back to back in fresh processes, the order rotating so each leads "
        "one round, so the per-round ratios compare like with like.", "",
        f"Job: teacher `{results['run']}/{TEACHER}` ({p['student']['teacher_params']:,} params) → the undistilled "
        f"auto student (blocks {p['student']['kept_layers']}, {p['student']['params']:,} params), identical starting "
        f"weights for every trainer; {results['steps']} optimizer steps × {BATCH_SIZE} rows (micro-batch "
        f"{MICRO_BATCH} × {BATCH_SIZE // MICRO_BATCH} accumulation) from `{results['run']}/data/train.jsonl` in "
        f"the same order ({p['edgepack_tokens_expected']} student tokens with the teacher's answers, "
        f"{p['prompt_tokens']} of them prompt, {p['answer_tokens']} answer; longest row {p['max_sequence']} tokens); "
        f"AdamW lr {LR}, warmup 10 %, cosine to 0.1×, weight decay 0, clip 1.0; fp32 on the CPU, no gradient "
        "checkpointing; loss forward KL(teacher ‖ student) at T = 1 on the answer (or sampled) tokens only.", "",
        "* Off-policy (the teacher's fixed answers): edgepack `divergence=forward_kl, alpha=0` against TRL's "
        "`GKDTrainer` with `lmbda=0, beta=0, seq_kd=False` — TRL 1.x's `DistillationTrainer` has no λ (every "
        "step samples), so GKDTrainer (still shipped, under `trl.experimental.gkd`) is TRL 1.x's off-policy KD.",
        f"* On-policy (λ = 1: every step the student samples a completion per prompt, the teacher scores it, KD on "
        f"those tokens only): edgepack `on_policy=1.0, on_policy_temperature=1.0, on_policy_max_new="
        f"{p['max_new_tokens']}` (the HF teacher scores) against `DistillationTrainer` with `beta=0, "
        f"temperature=1.0, max_completion_length={p['max_new_tokens']}, top_k=0, top_p=1.0` "
        f"({p['max_new_tokens']} = the longest answer in the data, edgepack's default). Both sample with "
        "transformers' `generate` (KV cache) and stop a row at <|im_end|>; the completions differ (different RNG "
        "streams), so each side's token count is its own.", "",
        "Tokens/s counts the student's non-pad input tokens (prompt + answer, or prompt + sampled completion) per "
        "second of training-step time (sampling included on on-policy steps): edgepack's train_report "
        "`tokens / wall_s`; TRL's `num_input_tokens_seen` (GKDTrainer: `include_num_input_tokens_seen=non_padding`; "
        "DistillationTrainer counts prompt + completion itself) over `on_epoch_begin` → the last `on_step_end`. "
        "Tokens/CPU-s divides the same count by the process's CPU time (user + sys, all threads): time the process "
        "waited for a core does not count, so it moves less with the other jobs; CPU use = CPU time / wall time. "
        "Peak memory is the process's peak RSS (VmHWM, saving the student included).", "",
        "| round | trainer | order | tokens | completion tokens | step time s | tokens/s | tokens/s steps 2..N "
        "| tokens/CPU-s | CPU use | peak RSS MB | peak RSS before save MB | RSS before step 1 MB | train call s "
        "| process s | first → last KD loss | load avg before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *(_run_row(r) for r in results["runs"]),
    ]
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    label = dict(METRICS, tokens_per_s_incl_cache="tokens/s incl. cache pass share")
    for kind, cmp in s["versus_trl"].items():
        keys = [k for k in cmp["per_round"][0] if k != "round"]
        lines += ["", f"{kind} ({s['modes'][kind]}) / {cmp['against']} per round (tokens/s: higher is better; "
                  "seconds and memory: lower is better):", "",
                  "| round | " + " | ".join(label[k] for k in keys) + " |", "|---:|" + "---:|" * len(keys),
                  *(f"| {q['round']} | " + " | ".join(f"{q[k]:.2f}×" for k in keys) + " |" for q in cmp["per_round"])]
    lines += ["", "| edgepack mode | against | target (issue #19) | measured (ratio of the means over rounds) "
              "| worst round | verdict |", "|---|---|---|---|---|---|"]
    for kind, cmp in s["versus_trl"].items():
        trl = cmp["against"]
        lines += [
            f"| {kind} | {trl} | tokens/s ≥ {TARGET_SPEEDUP}× TRL | {cmp['speedup']:.2f}× "
            f"({s['means'][kind]['tokens_per_s_incl_cache']:.1f} vs {s['means'][trl]['tokens_per_s']:.1f}) | "
            f"{cmp['speedup_worst_round']:.2f}× | {ok(cmp['meets_speedup'])} |",
            f"| {kind} | {trl} | peak memory ≤ {TARGET_MEMORY_RATIO}× TRL | {cmp['memory_ratio']:.2f}× "
            f"({s['means'][kind]['peak_rss_mb']:.0f} vs {s['means'][trl]['peak_rss_mb']:.0f} MB) | "
            f"{cmp['memory_ratio_worst_round']:.2f}× | {ok(cmp['meets_memory'])} |"]
    lines += _memory_options(memory, s)
    caches = [r["soft_label_cache"] for r in results["runs"] if r.get("soft_label_cache")]
    if caches:
        c = caches[0]
        lines += ["", f"The cached mode's soft labels: one teacher pass over all {c['rows']} train rows "
                  f"({c['tokens']} answer tokens, top-{SOFT_K} + tail mass) took "
                  f"{', '.join(str(x['s']) for x in caches)} s in its runs; each run is charged the share for the "
                  f"{BATCH_SIZE * results['steps']} rows it trains on (`tokens/s incl. the cache pass`), which "
                  "the target is judged on."]
    lines.append("")
    prof = {k: r for k, r in (results.get("profile") or {}).items() if r.get("ops")}
    for kind, cmp in s["versus_trl"].items():
        trl = cmp["against"]
        if kind not in prof or trl not in prof:
            continue
        e, t = prof[kind]["ops"], prof[trl]["ops"]
        lines += [
            f"Where the time goes, {kind} vs {trl}: torch.profiler over steps {e['profiled_steps']} of one extra "
            "run each (`--profile-steps`), same rows, self CPU time per op:", "",
            f"| | {kind} | {trl} | ratio |", "|---|---:|---:|---:|",
            f"| matmul GFLOP | {e['matmul_gflop']} | {t['matmul_gflop']} | {e['matmul_gflop'] / max(t['matmul_gflop'], 1e-9):.2f} |",
            f"| matmul self CPU s | {e['matmul_self_cpu_s']} | {t['matmul_self_cpu_s']} | "
            f"{e['matmul_self_cpu_s'] / max(t['matmul_self_cpu_s'], 1e-9):.2f} |",
            f"| all ops self CPU s | {e['self_cpu_s']} | {t['self_cpu_s']} | {e['self_cpu_s'] / t['self_cpu_s']:.2f} |",
            f"| wall s (profiled steps) | {e['wall_s']} | {t['wall_s']} | {e['wall_s'] / t['wall_s']:.2f} |", "",
            f"| {kind} op | self CPU s | share | calls | {trl} op | self CPU s | share | calls |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
            *(f"| {a['op']} | {a['self_cpu_s']} | {a['share']:.1%} | {a['calls']} | {b['op']} | {b['self_cpu_s']} | "
              f"{b['share']:.1%} | {b['calls']} |" for a, b in zip(e["top_ops"][:10], t["top_ops"][:10])), "",
        ]
    floor = p["state_floor_mb"]
    trl_peaks = {k: s["means"][k]["peak_rss_mb"] for k in s["trl_trainers"]}
    lines += [f"Memory every trainer with the teacher online must hold (fp32 teacher + student weights, student "
              f"gradients, two AdamW moments): {floor:.0f} MB, "
              + ", ".join(f"{floor / peak:.2f}× {k}'s mean peak" for k, peak in trl_peaks.items())
              + f". The student's own part (weights, gradients, moments: {p['student_state_mb']:.0f} MB) is "
              + ", ".join(f"{p['student_state_mb'] / peak:.2f}× {k}'s" for k, peak in trl_peaks.items()) + ".", ""]
    if results.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


def _memory_options(memory: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    """The peak-memory target again with `distill train`'s memory options (results-memory.json: the
    edgepack side re-measured, the same job; TRL's peaks are this file's means)."""
    if not memory:
        return []
    chosen = [r for r in memory["runs"] if r["variant"] != "baseline" and "+" in r["variant"]]
    if not chosen:
        return []
    lines = ["", f"With `distill train`'s memory options (bench/trl/results-memory.md, measured {memory['finished']}; "
             "the edgepack side re-measured alone on the same job, against TRL's means above: TRL's venv was "
             "removed since; a `+ name` is one of memory.py's other variants, not a trainer option: `checkpointing` "
             "patches gradient checkpointing on, `mmap-64k` sets MALLOC_MMAP_THRESHOLD_=65536):", "",
             "| edgepack mode | options | against | target (issue #19) | measured (mean over runs) | runs | verdict |",
             "|---|---|---|---|---|---:|---|"]
    groups: dict[tuple[str, str], list[float]] = {}
    for r in chosen:
        groups.setdefault((r["mode"], r["variant"]), []).append(r["peak_rss_mb"])
    kinds = {"off-policy": "edgepack", "on-policy": "edgepack-onpolicy"}
    for (mode, variant), peaks in groups.items():
        cmp = s["versus_trl"].get(kinds[mode])
        if cmp is None:
            continue
        trl = cmp["against"]
        mean, trl_peak = sum(peaks) / len(peaks), s["means"][trl]["peak_rss_mb"]
        parts = variant.split("+")
        options = " ".join(f"--{k.replace('_', '-')} {v}" for part in parts
                           for k, v in OPTION_VARIANTS.get(part, {}).items())
        options = f"`{options}`" + "".join(f" + {part}" for part in parts if part not in OPTION_VARIANTS)
        lines.append(f"| {kinds[mode]} | {options} | {trl} | peak memory ≤ {TARGET_MEMORY_RATIO}× TRL | "
                     f"{mean / trl_peak:.3f}× ({mean:.0f} vs {trl_peak:.0f} MB) | {len(peaks)} | "
                     f"{'met' if mean / trl_peak <= TARGET_MEMORY_RATIO else 'NOT met'} |")
    return lines


NOTES = [
    "TRL 1.x's `DistillationTrainer` is on-policy only: every optimizer step it generates one completion per prompt "
    "(once per generation batch of per_device_train_batch_size × gradient_accumulation_steps rows) and trains on "
    "those; it has no `lmbda`, `seq_kd` or `max_new_tokens` (its cap is `max_completion_length`). Off-policy KD "
    "in TRL 1.x is `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (its warning at `lmbda=1, temperature=1` "
    "points to DistillationTrainer as the replacement for the on-policy case only).",
    "DistillationTrainer's loss never materialises [batch, sequence, vocab] logits: the student's and teacher's "
    "last hidden states go through a chunked divergence that projects tiles of positions through each lm_head "
    "(`trl/kernels/chunked_divergence.py`); on the CPU (no Triton) every completion position of the padded "
    "batch is projected, padding included, then masked. GKDTrainer still runs both models' full heads over "
    "every position.",
    "edgepack's student runs the prompt prefix every row shares (the system prompt) once per micro-batch and the "
    "rest against its KV cache, with gradients flowing through the cache, and the teacher's prefix KV cache is "
    "computed once per run; the LM head runs at answer (or sampled) positions only. On on-policy steps edgepack "
    "samples per micro-batch (2 rows), TRL per generation batch (4 rows).",
    "edgepack trains under `torch.use_deterministic_algorithms(True)` (bit-identical resume) with PyTorch's "
    "`fill_uninitialized_memory` off; TRL runs with PyTorch's defaults.",
    "TRL's processes also import datasets/pandas/pyarrow (see 'RSS after imports' in results.json); that is part "
    "of its footprint as shipped. The TRL side runs transformers 5, the edgepack side the project's pinned "
    "transformers 4.57 (its venv is not changed for a benchmark).",
    "Learning-rate schedule: both sides warm up over 10 % of the steps (1 of 6), but transformers' warmup starts "
    "at lr 0 (its step 1 applies no update) while edgepack's reaches the full lr at step 1, so the loss curves "
    "differ from step 2 on; every step does the same work either way, so the throughput is unaffected. The "
    "first-step KD losses (same weights, same rows) agree to within 1 % off-policy, where GKDTrainer now "
    "divides by the tokens of the whole accumulated batch (`num_items_in_batch`, TRL 0.27 summed the "
    "micro-batch means).",
    "TRL's DataCollatorForChatML (GKDTrainer) labels the assistant turn's trailing newline after <|im_end|> as "
    "well, so its token count is one token per row higher than edgepack's; each side's own count is used for "
    "its rate.",
]
