"""Markdown rendering of a fidelity report (``fidelity.md``), a pure function of the dict."""

from __future__ import annotations

from typing import Any


def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _code(text: Any) -> str:
    s = repr(str(text))[1:-1]
    return "`" + s.replace("`", "'").replace("|", "\\|") + "`"


def render_markdown(report: dict[str, Any]) -> str:
    """``fidelity.md``: summary table, targets, tokenizer and greedy details, provenance."""
    ref, prompts, by = report["reference"], report["prompts"], report["produced_by"]
    lines = [
        "# Export fidelity",
        "",
        f"Reference: `{ref['hf_dir']}` ({ref['backend']}, {ref['dtype']}, {ref['parameters']:,} parameters). "
        f"Text: {prompts['source']} ({prompts['sequences']} sequences, {prompts['tokens']} tokens, at most "
        f"{prompts['max_tokens']} each; {prompts['greedy_prompts']} greedy prompts; "
        f"{prompts['tokenizer_strings']} tokenizer strings).",
        "",
        "KLD is KL(reference ‖ artifact) in nats per token, mean over all positions; quantized GGUFs are "
        "measured against the unquantized GGUF when one was exported (column *KLD vs*).",
        "",
        "| artifact | format | quant | size MB | bits/weight | KLD | KLD vs | top-1 | top-1 vs transformers "
        "| max abs logit diff vs transformers | tokenizer | greedy exact |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for a in report["artifacts"]:
        vt, g = a["vs_transformers"], a["greedy"]
        greedy = _pct(g.get("exact_match_rate")) if g.get("measured") else "not measured"
        lines.append(
            f"| {a['name']} | {a['format']} | {a['quant']} | {a['size_mb']:.2f} | {a['bits_per_weight']:.2f} "
            f"| {_num(a['kld'])} | {a['kld_reference']} | {_pct(a['top1'])} | {_pct(vt.get('top1_agreement'))} "
            f"| {_num(vt.get('max_abs_diff'))} | {'pass' if a['tokenizer']['ok'] else '**FAIL**'} | {greedy} |")
    targets = [(a["name"], t) for a in report["artifacts"] for t in a["targets"]]
    if targets:
        lines += ["", "## Targets (reported, not enforced)", "",
                  "| artifact | metric | measured | target | met |", "|---|---|---:|---|---|"]
        lines += [f"| {name} | {t['metric']} | {_num(t['measured'])} | {t['op']} {t['target']} | {_num(t['met'])} |"
                  for name, t in targets]
    lines += ["", "## Top-1 disagreements with transformers", "",
              "Where the artifact's most likely token differs from the reference's, the reference's own margin "
              "between its top two logits there (small = a near-tie that any rounding can flip).", ""]
    for a in report["artifacts"]:
        vt = a["vs_transformers"]
        lines.append(f"- {a['name']}: {vt.get('top1_flips')} of {vt.get('tokens')} positions; reference margin "
                     f"median {_num(vt.get('top1_flip_reference_margin_median'), '.3g')}, "
                     f"max {_num(vt.get('top1_flip_reference_margin_max'), '.3g')}")
    lines += ["", "## Tokenizer", ""]
    for a in report["artifacts"]:
        tk = a["tokenizer"]
        status = "pass" if tk["ok"] else "**FAIL**"
        lines.append(f"- {a['name']}: {status}: {tk['strings'] - tk['mismatches']}/{tk['strings']} strings identical; "
                     f"special tokens added to plain text: reference {tk['special_policy']['reference_ids']}, "
                     f"artifact {tk['special_policy']['artifact_ids']}")
        fm = tk.get("first_mismatch")
        if fm:
            lines.append(f"  - first mismatch in {_code(fm['string'][:80])} at token {fm['index']}: reference "
                         f"{fm['reference_ids']} {fm['reference_pieces']} vs artifact {fm['artifact_ids']} "
                         f"{fm['artifact_pieces']}")
    lines += ["", "## Greedy decoding", ""]
    for a in report["artifacts"]:
        g = a["greedy"]
        if not g.get("measured"):
            lines.append(f"- {a['name']}: not measured ({g.get('reason')})")
            continue
        lines.append(f"- {a['name']}: {_pct(g['exact_match_rate'])} of {g['prompts']} prompts identical "
                     f"(up to {g['max_new_tokens']} new tokens, stop at end-of-generation)")
        for c in g["cases"]:
            if c["match"]:
                continue
            margin = c.get("reference_margin_at_divergence")
            lines.append(f"  - {c['id']}: first divergence at new token {c['first_divergence']} (reference top-1/top-2 "
                         f"margin there {_num(margin, '.3g')}): after {_code(c['common_prefix'][-60:])} reference "
                         f"{_code(c['reference_text'])} vs artifact {_code(c['artifact_text'])}")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    host, versions = by["host"], by["versions"]
    lines += ["", "## Provenance", "",
              f"- command: `{by['command']}`",
              f"- created {report['created']} in {report['seconds']} s on {host['platform']} "
              f"({host['cpu_count']} CPUs, load average {host['load_average_1_5_15']})",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"- prompts sha256: {prompts.get('sha256')}", ""]
    return "\n".join(lines)
