"""The BENCHMARKS.md section on cost against model size (bench/scale), with its six-panel plot
(bench/benchmarks.py)."""

from __future__ import annotations

from typing import Any

from benchmarks_doc import NOT_RUN, Doc, provenance, table



def section_scale(doc: Doc, scale: dict[str, Any] | None) -> None:
    """bench/scale: cost against model size (random-init SmolLM2-shaped students), with one plot."""
    doc.add("## Cost vs model size")
    sizes = list(((scale or {}).get("sizes") or {}).values())
    if not sizes:
        doc.add(f"*{NOT_RUN}*: `bench/scale/results.json` (issue #18: training, soft labels, export and decode "
                "of random-init students at about 135M, 360M and 1B parameters).")
        return
    assert scale is not None
    sizes.sort(key=lambda r: r["params"])
    doc.add(provenance(scale) + f" {scale.get('threads')} torch thread(s); decoding with the gate's measurement on "
            f"{scale.get('gate_threads')} llama.cpp threads (and on 1). Every number is in `bench/scale/results.md`.",
            table(["size", "params", "soft labels s/1k tokens", "train tokens/s", "plan", "planned peak MB",
                   "measured peak MB", "measured / planned", "HF→F16 s", "→Q4_K_M s", "decode tok/s",
                   "efficiency", "decode tok/s (1 thread)", "efficiency (1 thread)"],
                  [[r["size"], f"{r['params'] / 1e6:.1f}M", r["softlabels"]["s_per_1k_answer_tokens"],
                    r["train"]["tokens_per_s"], f"{r['train']['plan']['method']}, mb {r['train']['plan']['micro_batch']}"
                    + (", checkpointing" if r["train"]["plan"].get("checkpointing") else ""),
                    r["train"]["planned_peak_mb"], r["train"]["measured_peak_mb"], r["train"]["measured_over_planned"],
                    r["export"]["convert_f16_s"], r["export"]["quantize_q4_k_m_s"],
                    (r.get("decode") or {}).get("decode_tokens_per_s"), (r.get("decode") or {}).get("efficiency"),
                    (r.get("decode_1_thread") or {}).get("decode_tokens_per_s"),
                    (r.get("decode_1_thread") or {}).get("efficiency")] for r in sizes],
                  right=set(range(1, 14)) - {4}),
            "\n".join(scale.get("findings") or []))
    x = [r["params"] / 1e6 for r in sizes]

    def draw(ax: Any) -> None:
        fig = ax.figure
        ax.remove()
        panels = fig.subplots(2, 3).ravel()
        series = [("training tokens/s", [("KD, cached soft labels", [r["train"]["tokens_per_s"] for r in sizes])]),
                  ("training peak MB", [("measured", [r["train"]["measured_peak_mb"] for r in sizes]),
                                        ("planned", [r["train"]["planned_peak_mb"] for r in sizes])]),
                  ("soft labels: s per 1k tokens", [("teacher = same size", [r["softlabels"]["s_per_1k_answer_tokens"]
                                                                             for r in sizes])]),
                  ("export seconds", [("HF→F16", [r["export"]["convert_f16_s"] for r in sizes]),
                                      ("F16→Q4_K_M", [r["export"]["quantize_q4_k_m_s"] for r in sizes])]),
                  ("decode tokens/s (Q4_K_M)", [("2 threads", [(r.get("decode") or {}).get("decode_tokens_per_s")
                                                               for r in sizes]),
                                                ("1 thread", [(r.get("decode_1_thread") or {}).get("decode_tokens_per_s")
                                                              for r in sizes])]),
                  ("decode efficiency", [("2 threads", [(r.get("decode") or {}).get("efficiency") for r in sizes]),
                                         ("1 thread", [(r.get("decode_1_thread") or {}).get("efficiency")
                                                       for r in sizes])])]
        for panel, (title, lines) in zip(panels, series):
            for label, ys in lines:
                pts = [(a, b) for a, b in zip(x, ys) if isinstance(b, (int, float))]
                panel.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            panel.set_xscale("log")
            panel.minorticks_off()
            panel.set_xticks(x, [f"{v:.0f}M" for v in x])
            panel.set_title(title, fontsize=9)
            panel.set_xlabel("parameters (M)", fontsize=8)
            panel.tick_params(labelsize=7)
            if len(lines) > 1:
                panel.legend(fontsize=7)
        panels[-1].axhline(0.6, color="grey", linestyle="--", linewidth=1)

    doc.image("scale_cost_vs_size.png", "training, soft-label, export and decode cost against model size", draw,
              size=(10, 5.6))
