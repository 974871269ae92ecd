"""The category table of bench/reliability/run.py and how RELIABILITY.md is written from results.json.

Split from run.py (which runs the categories): which categories exist and in what order, which
earlier runs a ``--merge`` report still draws on, and the markdown itself. Imported by run.py;
``tests/reliability/test_report.py`` checks the run list and the markdown through run.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Attack families of issue #20: category -> (module beside this file, function(work) -> counts).
# Each function returns {"tried", "faults", "failures", "failure_list", "details"}.
FAMILIES: dict[str, tuple[str, str]] = {
    "bundle-differential": ("bundle_differential", "bundle_differential_category"),
    "template-bombs": ("template_bombs", "template_bombs_category"),
    "token-injection": ("token_injection", "token_injection_category"),
    "slowloris": ("slowloris", "slowloris_category"),
    "endpoint-drip": ("endpoint_drip", "endpoint_drip_category"),
    "bundle-trust": ("bundle_trust", "bundle_trust_category"),
    "run-dir-trust": ("run_dir_trust", "run_dir_trust_category"),
    "concurrency": ("run_dir_trust", "concurrency_category"),
}
# What a run without --only produced before the families existed (records without "produced").
FIRST_CATEGORIES = "kill-train,kill-export,kill-pack,server,gguf-native,disk-full,fuzz"
ALL_CATEGORIES = ",".join([FIRST_CATEGORIES, *FAMILIES])
RUN_KEYS = ("command", "loadavg_start", "loadavg_end", "seconds")


def live_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose categories are still in the report, each with ``categories``: those it
    produced that no later ``--merge`` run replaced (older records name them only in ``--only``)."""
    def produced(run: dict[str, Any]) -> list[str]:
        if "produced" in run:
            return run["produced"]
        words = run["command"].split()
        return (words[words.index("--only") + 1] if "--only" in words else FIRST_CATEGORIES).split(",")

    later: set[str] = set()
    out = []
    for run in reversed(runs):
        kept = [c for c in produced(run) if c not in later]
        later.update(produced(run))
        if kept:
            out.append(dict(run, produced=produced(run), categories=kept))
    return out[::-1]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    runs = results.get("runs") or [results]
    lines = ["# Reliability run", "", "Produced by `bench/reliability/run.py` (see its docstring for what each "
             "category does); the numbers below come from these runs (a later run with `--merge` replaced "
             "the categories it names; runs whose categories were all replaced are dropped):", ""]
    lines += [f"- `{r['command']}`: {r['seconds']} s, load average {r['loadavg_start']} at start, "
              f"{r['loadavg_end']} at end" + (f"; in this report: {', '.join(r['categories'])}"
                                                 if r.get("categories") else "") for r in runs]
    lines += ["", f"Machine: {results['machine']} (shared with other jobs; see the load averages)", "",
             "| category | inputs tried | faults injected | failures | time (s) |", "|---|---|---|---|---|"]
    order = ALL_CATEGORIES.split(",")
    results["categories"].sort(key=lambda c: order.index(c["category"]) if c["category"] in order else len(order))
    for c in results["categories"]:
        lines.append(f"| {c['category']} | {c['inputs_tried']} | {c['faults_injected']} | {c['failures']} | "
                     f"{c['seconds']} |")
    lines += [""]
    for c in results["categories"]:
        lines += [f"## {c['category']}", ""]
        if c["category"].startswith("kill-"):
            lines += [f"- duration of the uninterrupted call: {c['call_duration_s']} s (calibration run); kill time "
                      f"uniform in [0, window], the window shrunk to 0.9x any call seen finishing first "
                      f"(final {c.get('final_kill_window_s')} s)",
                      f"- trials: {c['inputs_tried']}, killed: {c['faults_injected']} (of which "
                      f"{c['kills_that_left_a_partial_write']} left a half-written temp file or folder behind), "
                      f"{c.get('kills_uniform')} at a uniformly random time in the call, {c.get('kills_inside_a_write')} "
                      f"targeted inside an atomic write (a temporary name had appeared"
                      + (f"; {c['kills_inside_the_final_save']} of them inside the final save of student/"
                         if c.get("kills_inside_the_final_save") else "")
                      + f"), finished before the kill: {c['completed_before_the_kill']}"]
        if c["category"] == "server":
            for name, v in c["per_check"].items():
                lines.append(f"- {name}: {v['tried']} tried, statuses {v['statuses']}, {v['failures']} wrong")
            lines.append(f"- server RSS: {c['rss_mb']['baseline']} MiB after warm-up, {c['rss_mb']['after_load']} MiB "
                         f"after the load; exit code on SIGTERM {c['server_exit_code']}")
        if c["category"] == "gguf-native":
            lines += [f"- mutated copies of the tiny Q8_0 GGUF: {c['inputs_tried']}; refused by edgepack's header "
                      f"check: {c['refused_by_header_check']}; passed on to llama.cpp (load + 2 tokens): "
                      f"{c['passed_to_llama_cpp']}, outcomes {c['llama_cpp_outcomes']}"]
        if c["category"] == "disk-full":
            lines.append(f"- pytest tests/reliability/test_disk_full.py: {c['pytest_summary']}")
        if c["category"] == "fuzz":
            lines.append(f"- {c['examples_per_property']} examples per property; pytest: {c['pytest_summary']}")
            for reader, outcomes in c["per_reader"].items():
                lines.append(f"- {reader}: {outcomes}")
        lines += [f"- {d}" for d in c.get("details", [])]
        if c["failure_details"]:
            lines += ["", "Failures:", ""] + [f"- {json.dumps(d) if not isinstance(d, str) else d}"
                                              for d in c["failure_details"]]
        notes = results.get("explanations", {}).get(c["category"])
        if notes:
            lines += ["", f"Explanation: {notes}"]
        lines.append("")
    path.write_text("\n".join(lines))
