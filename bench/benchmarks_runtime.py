"""The BENCHMARKS.md sections on the runtime (bench/benchmarks.py): decode efficiency against the
measured memory bandwidth and the gate's stability over repeated runs (bench/gate/results*.json),
and serving (bench/serve)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks_doc import NOT_RUN, Doc, _num, provenance, table



def gate_files(bench: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in sorted((bench / "gate").glob("results*.json"))]


def section_efficiency(doc: Doc, gates: list[tuple[str, dict[str, Any]]]) -> None:
    doc.add("## Runtime decode efficiency vs measured memory bandwidth")
    if not gates:
        doc.add(f"*{NOT_RUN}*: no `bench/gate/results*.json`.")
        return
    doc.add("Efficiency = decode tokens/s × bytes read per token ÷ this machine's measured read bandwidth "
            "(issue #6 target for the GGUF student: ≥ 0.6).")
    bars = []
    for name, g in gates:
        c = g.get("c") or {}
        bw = c.get("bandwidth") or {}
        threads = (g.get("settings") or {}).get("threads")
        rows = [[rt, e.get("decode_tokens_per_s"), (e.get("bytes_per_token") or 0) / 2**20, e.get("achieved_gb_s"),
                 e.get("efficiency"), e.get("bound_tokens_per_s")]
                for rt, e in c.items() if isinstance(e, dict) and "efficiency" in e]
        doc.add(f"`bench/gate/{name}` ({threads} threads). " + provenance(g),
                f"Bandwidth: {_num(bw.get('read_gb_s'), '.2f')} GB/s read ({bw.get('method', 'method not recorded')}).",
                table(["runtime", "decode tok/s", "MiB read/token", "achieved GB/s", "efficiency", "bound tok/s"],
                      [[*r[:4], _num(100 * r[4], ".1f") + "%" if isinstance(r[4], (int, float)) else None, r[5]]
                       for r in rows]))
        bars += [(f"{r[0]} ({threads}t)", r[4]) for r in rows if isinstance(r[4], (int, float))]
        b = g.get("b") or {}
        side = [[rt, r.get("artifact"), r.get("size_mb"), (r.get("ttft_ms") or {}).get("p95"),
                 (r.get("decode_tokens_per_s") or {}).get("p50"), r.get("peak_rss_mb"), r.get("note")]
                for rt, r in (b.get("rows") or {}).items()]
        if side:
            doc.add("ONNX int4 vs llama.cpp Q4_K_M, same model:",
                    table(["runtime", "artifact", "size MB", "TTFT p95 ms", "decode tok/s", "peak RSS MB", "note"],
                          side, right={2, 3, 4, 5}))

    def draw(ax: Any) -> None:
        ax.barh([b[0] for b in bars], [100 * b[1] for b in bars])
        ax.axvline(60, color="grey", linestyle="--", linewidth=1, label="target 60% (GGUF)")
        ax.set_xlabel("decode efficiency (% of measured bandwidth)")
        ax.set_title("Decode efficiency")
        ax.legend(fontsize=8)

    if bars:
        doc.image("decode_efficiency.png", "decode efficiency per runtime", draw, size=(6.4, 3.2))


def section_stability(doc: Doc, gates: list[tuple[str, dict[str, Any]]]) -> None:
    doc.add("## Gate stability over repeated runs")
    runs = [(name, g, g["d"]) for name, g in gates if isinstance(g.get("d"), dict) and g["d"].get("runs")]
    if not runs:
        doc.add(f"*{NOT_RUN}*: no repeated gates in `bench/gate/results*.json`.")
        return
    for name, g, d in runs:
        doc.add(f"`bench/gate/{name}`: the same artifact gated {len(d['runs'])} times on {d.get('profile')} "
                f"({d.get('threads')} threads). " + provenance(g),
                table(["run", "verdict", "TTFT p95 ms", "decode p50 tok/s", "peak RSS MB", "load avg at start"],
                      [[i + 1, r.get("verdict"), r.get("ttft_p95_ms"), r.get("decode_p50"), r.get("peak_rss_mb"),
                        r.get("load_average_at_start")] for i, r in enumerate(d["runs"])], right={2, 3, 4}))
        spread = [[metric, s.get("mean"), s.get("stdev"), s.get("min"), s.get("max"), s.get("max_dev_from_mean_percent")]
                  for metric in ("ttft_p95_ms", "decode_tokens_per_s") if isinstance(s := d.get(metric), dict)]
        doc.add(table(["metric", "mean", "stdev", "min", "max", "largest deviation %"], spread),
                f"Target: {d.get('target', 'not recorded')}: **{'met' if d.get('within_target') else 'not met'}**.")

    def draw(ax: Any) -> None:
        n = max(len(d["runs"]) for _, _, d in runs)
        ax.axhspan(-10, 10, color="grey", alpha=0.15, label="±10% target")
        for name, _, d in runs:
            for key, label in (("decode_p50", "decode tok/s"), ("ttft_p95_ms", "TTFT p95")):
                values = [r.get(key) for r in d["runs"]]
                if any(v is None for v in values):
                    continue
                mean = statistics.mean(values)
                ax.plot(range(1, len(values) + 1), [100 * (v / mean - 1) for v in values], marker="o",
                        label=f"{label}, {name}")
        ax.set_xticks(range(1, n + 1))
        ax.set_xlabel("gate run")
        ax.set_ylabel("deviation from the mean (%)")
        ax.set_title("Gate stability: repeated gates of one artifact")
        ax.legend(fontsize=7)

    doc.image("gate_stability.png", "decode tok/s over repeated gates", draw, size=(6.4, 3.4))



def section_serve(doc: Doc, serve: dict[str, Any] | None) -> None:
    if not doc.section("Serving (`edgepack serve`)", serve):
        return
    a = serve.get("a") or {}
    rounds = (serve.get("b") or {}).get("rounds") or []
    ratios = [r["server_tokens_per_s"] / r["direct_tokens_per_s"] for r in rounds
              if r.get("server_tokens_per_s") and r.get("direct_tokens_per_s")]
    doc.add(provenance(serve),
            table(["burst", "max queue", "completed", "refused", "hung", "answers = serial", "wall s", "ok"],
                  [[k, v.get("max_queue"), v.get("completed"), v.get("refused"), len(v.get("hung") or []),
                    v.get("completed_equal_serial"), v.get("wall_s"), v.get("ok")]
                   for k, v in a.items() if isinstance(v, dict) and "completed" in v]),
            f"Server vs in-process decode tokens/s over {len(ratios)} alternating rounds: median ratio "
            f"{_num(statistics.median(ratios) if ratios else None, '.3f')}.")
