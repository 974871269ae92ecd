"""Fidelity report: how faithfully each exported artifact reproduces the model it came from.

``fidelity_report(reference, artifacts, prompts, out_dir)`` measures, on held-out chat text
(``RUN/data/holdout.jsonl`` prompt + teacher response, or a small built-in set):

* **logits** of every artifact against the transformers reference (float32): mean / p99 /
  max KL divergence, top-1 agreement and max |logit difference| per position. Quantized
  GGUFs are also compared with the unquantized GGUF in the list (F16 preferred), which is
  llama-perplexity's ``--kl-divergence`` convention and isolates quantization error from
  conversion error; that KLD is the headline number when such a file exists. Every
  distinct context counts once: holdout rows share a prefix (the system prompt), and a
  position inside a prefix already measured in an earlier row repeats the same logits, so
  it is skipped (:func:`~edgepack.export.fidelity.metrics.fresh_starts`); the numbers over
  all positions, repeats included, are kept beside them (``*_all_positions``);
* **size**: bytes, MB and bits per weight (``bytes * 8 / parameters of the reference``);
* **tokenizer**: token ids of the artifact's own tokenizer (llama.cpp's vocab for GGUF,
  the folder's HF tokenizer for ONNX) against the reference tokenizer's, on a fixed string
  set plus the model's special tokens and every chat-templated evaluation text, and the
  special tokens each adds to plain text; the first mismatch is shown;
* **greedy output** of a few chat prompts, reference (transformers ``generate``) vs each
  artifact (an argmax loop in llama.cpp or onnxruntime with its KV cache), all stopping at
  their end-of-generation tokens: exact-match
  rate and the first divergence, with the reference's top-1/top-2 logit margin there (a
  tiny margin means a numerical near-tie, not a broken export).

Both models get the same token ids (the reference tokenizer's), so the logit and greedy
comparisons measure the weights and graph; the tokenizer check measures the tokenizer.
Every number comes from a run recorded in ``produced_by`` (command, library versions,
host, load average); :data:`TARGETS` are reported as met / not met, never enforced.
Reference logits are cached on disk (one ``.npy`` per sequence) so only one model is in
memory at a time.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.atomic import write_json, write_text
from edgepack.constants import DATA_DIR, FIDELITY_MARKDOWN, FIDELITY_REPORT, HOLDOUT_FILE
from edgepack.errors import ModelSourceError, UsageError
from edgepack.progress import ProgressFn, null_progress
from edgepack.provenance import host_info, package_versions
from edgepack.export.fidelity.metrics import LogitStats, first_divergence, fresh_starts
from edgepack.export.fidelity.models import ArtifactFacts, Greedy, TorchReference
from edgepack.formats import Format, format_of
from edgepack.export.fidelity.prompts import (BUILTIN_ROWS, TOKENIZER_STRINGS, EvalRow, as_rows, encode_row,
                                              load_rows, rendered_text)

SCHEMA = 2  # 2: logit metrics over distinct contexts, all-position numbers in *_all_positions
DEFAULT_MAX_PROMPTS = 16      # held-out rows whose logits are compared
DEFAULT_MAX_TOKENS = 256      # tokens per compared sequence at most
DEFAULT_GREEDY_PROMPTS = 4    # chat prompts decoded greedily by reference and each artifact
DEFAULT_MAX_NEW_TOKENS = 48   # greedy tokens per prompt at most
TEXT_PREVIEW = 160            # characters of generated text kept in the report

# (format, quant) → (metric, comparison, target). The export issue's targets for a real
# model; a random-init test model is not expected to meet them.
TARGETS: dict[tuple[str, str], tuple[tuple[str, str, float], ...]] = {
    ("gguf", "F16"): (("top1_vs_transformers", ">=", 0.995),),
    ("gguf", "Q8_0"): (("kld", "<=", 0.005),),
    ("gguf", "Q4_K_M"): (("kld", "<=", 0.08),),
}


class _LogitCache:
    """Logits of one model per sequence, kept as .npy files and read back memory-mapped."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.dir.mkdir()

    def put(self, i: int, logits: Any) -> None:
        import numpy as np

        np.save(self.dir / f"{i}.npy", np.asarray(logits, dtype=np.float32))

    def get(self, i: int) -> Any:
        import numpy as np

        return np.load(self.dir / f"{i}.npy", mmap_mode="r")


def count_parameters(hf_dir: Path) -> int:
    """Parameters of an HF checkpoint as the GGUF holds them (tied head counted once,
    skipped buffers excluded), from the safetensors headers alone."""
    import math

    from edgepack.export.gguf.arch import arch_for_config
    from edgepack.export.gguf.convert import read_config
    from edgepack.export.gguf.tensors import gguf_tensor_name
    from edgepack.export.gguf.weights import SafetensorsCheckpoint

    arch = arch_for_config(read_config(hf_dir))
    total = 0
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        for name, shape in ckpt.shapes.items():
            gguf_name = gguf_tensor_name(name, arch.gguf_arch)
            if gguf_name is None or (gguf_name == "output.weight" and arch.tied):
                continue
            total += math.prod(shape)
    return total


def _resolve(source: Path, prompts: Sequence[Any] | Path | None) -> tuple[Path, list[EvalRow] | Path | None]:
    from edgepack.export.api import resolve_source

    hf_dir, _, default_out = resolve_source(Path(source))
    if prompts is None and default_out is not None:  # a run dir: its holdout when there is one
        holdout = Path(source) / DATA_DIR / HOLDOUT_FILE
        return hf_dir, holdout if holdout.is_file() else None
    return hf_dir, prompts


def _load_prompt_rows(prompts: Sequence[Any] | Path | None, max_prompts: int) -> tuple[list[EvalRow], dict[str, Any]]:
    from edgepack.export.api import sha256_file

    if prompts is None:
        rows = list(BUILTIN_ROWS)[:max_prompts]
        return rows, {"source": "builtin", "sha256": None}
    if isinstance(prompts, (str, Path)):
        rows = load_rows(Path(prompts), limit=max_prompts)
        return rows, {"source": str(prompts), "sha256": sha256_file(Path(prompts))}
    rows = as_rows(list(prompts))[:max_prompts]
    return rows, {"source": "given", "sha256": None}


def _tokenizer_strings(tokenizer: Any, texts: list[str]) -> list[str]:
    specials = list(tokenizer.all_special_tokens) + list(tokenizer.get_added_vocab())
    joined = "".join(f"{s}text {i}\n" for i, s in enumerate(dict.fromkeys(specials)))
    return list(dict.fromkeys([*TOKENIZER_STRINGS, *specials, joined, *texts]))


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    n = len(tokenizer)
    return [tokenizer.convert_ids_to_tokens(i) if 0 <= i < n else f"<{i}>" for i in ids]


def _tokenizer_check(tokenizer: Any, artifact: Any, strings: list[str]) -> dict[str, Any]:
    mismatches, first = 0, None
    for s in strings:
        ref = list(tokenizer.encode(s, add_special_tokens=False))
        got = artifact.tokenize(s, add_special=False)
        if ref != got:
            mismatches += 1
            if first is None:
                i = first_divergence(ref, got) or 0
                lo = max(0, i - 3)
                first = {"string": s[:200], "index": i,
                         "reference_ids": ref[lo:i + 4], "artifact_ids": got[lo:i + 4],
                         "reference_pieces": _pieces(tokenizer, ref[lo:i + 4]),
                         "artifact_pieces": _pieces(tokenizer, got[lo:i + 4])}
    probe = "Hello world"
    ref_policy = list(tokenizer.encode(probe, add_special_tokens=True))
    art_policy = artifact.tokenize(probe, add_special=True)
    return {"ok": mismatches == 0 and ref_policy == art_policy, "strings": len(strings), "mismatches": mismatches,
            "first_mismatch": first,
            "special_policy": {"ok": ref_policy == art_policy, "text": probe,
                               "reference_ids": ref_policy, "artifact_ids": art_policy}}


def _greedy_check(tokenizer: Any, artifact: Any, rows: list[EvalRow], prompt_ids: list[list[int]],
                  references: list[Greedy], max_new_tokens: int) -> dict[str, Any]:
    cases = []
    for row, ids, ref in zip(rows, prompt_ids, references):
        got = artifact.greedy(ids, max_new_tokens)
        if got is None:
            return {"measured": False, "reason": f"{artifact.format} artifacts cannot be decoded here"}
        div = first_divergence(ref.tokens, got.tokens)
        match = div is None and ref.finished == got.finished
        case: dict[str, Any] = {
            "id": row.id, "prompt_tokens": len(ids), "match": match, "first_divergence": div,
            "reference_tokens": len(ref.tokens), "artifact_tokens": len(got.tokens),
            "reference_stopped": ref.finished, "artifact_stopped": got.finished,
        }
        if div is not None:
            case["reference_margin_at_divergence"] = ref.margins[div] if div < len(ref.margins) else None
            case["reference_text"] = tokenizer.decode(ref.tokens[div:div + 12])
            case["artifact_text"] = tokenizer.decode(got.tokens[div:div + 12])
            case["common_prefix"] = tokenizer.decode(ref.tokens[:div])[-TEXT_PREVIEW:]
        else:
            case["text"] = tokenizer.decode(ref.tokens)[:TEXT_PREVIEW]
        cases.append(case)
    n = len(cases)
    return {"measured": True, "prompts": n, "max_new_tokens": max_new_tokens,
            "exact_match_rate": (sum(c["match"] for c in cases) / n) if n else None, "cases": cases}


def _targets(fmt: str, quant: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    values = {"kld": entry.get("kld"), "top1_vs_transformers": entry["vs_transformers"].get("top1_agreement")}
    out = []
    for metric, op, target in TARGETS.get((fmt, quant), ()):
        value = values.get(metric)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"metric": metric, "measured": value, "op": op, "target": target, "met": met})
    return out


def _produced_by(command: str | None) -> dict[str, Any]:
    return {"function": "edgepack.export.fidelity.report.fidelity_report",
            "command": command if command is not None else shlex.join(sys.argv),
            "versions": package_versions(("edgepack", "torch", "transformers", "llama-cpp-python", "onnxruntime",
                                          "gguf", "numpy")),
            "host": host_info()}


@dataclass
class _Plan:
    """What every artifact is measured on (fixed before any artifact is opened)."""

    tokenizer: Any
    rows: list[EvalRow]
    sequences: list[list[int]]
    fresh: list[int]
    """Per sequence, the first position whose context no earlier sequence shares."""
    chat_rows: list[EvalRow]
    greedy_ids: list[list[int]]
    strings: list[str]
    n_params: int
    n_ctx: int
    max_new_tokens: int
    threads: int | None


def _plan(ref: TorchReference, rows: list[EvalRow], hf_dir: Path, *, max_tokens: int, greedy_prompts: int,
          max_new_tokens: int, threads: int | None, notes: list[str]) -> _Plan:
    tok = ref.tokenizer
    full = [encode_row(tok, r, with_response=True) for r in rows]
    kept = [(r, ids) for r, ids in zip(rows, full) if ids]
    if not kept:
        raise UsageError("the prompts tokenize to nothing")
    truncated = sum(1 for _, ids in kept if len(ids) > max_tokens)
    if truncated:
        notes.append(f"{truncated} of {len(kept)} sequences were cut to {max_tokens} tokens")
    rows = [r for r, _ in kept]
    sequences = [ids[:max_tokens] for _, ids in kept]
    chat_rows = [r for r in rows if r.messages is not None][:greedy_prompts] or rows[:greedy_prompts]
    greedy_ids = [encode_row(tok, r, with_response=False, max_tokens=max_tokens) for r in chat_rows]
    strings = _tokenizer_strings(tok, [rendered_text(tok, r, with_response=True) for r in rows]
                                 + [rendered_text(tok, r, with_response=False) for r in chat_rows])
    n_ctx = max(max(map(len, sequences)), max(map(len, greedy_ids), default=0) + max_new_tokens) + 16
    return _Plan(tok, rows, sequences, fresh_starts(sequences), chat_rows, greedy_ids, strings, count_parameters(hf_dir), n_ctx,
                 max_new_tokens, threads)


def fidelity_report(reference: Path, artifacts: list[Path], prompts: Sequence[Any] | Path | None = None,
                    out_dir: Path | None = None, *, max_prompts: int = DEFAULT_MAX_PROMPTS,
                    max_tokens: int = DEFAULT_MAX_TOKENS, greedy_prompts: int = DEFAULT_GREEDY_PROMPTS,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, threads: int | None = None,
                    command: str | None = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """Compare every artifact (GGUF files, ONNX folders) with ``reference`` (a run dir or an
    HF dir) on ``prompts`` (chat messages, texts, row dicts or a JSONL path; a run dir's
    holdout or the built-in set when ``None``). Writes ``fidelity.json`` and ``fidelity.md``
    to ``out_dir`` when given; returns the report dict."""
    start = time.perf_counter()
    hf_dir, prompts = _resolve(Path(reference), prompts)
    artifacts = [Path(a) for a in artifacts]
    if not artifacts:
        raise UsageError("no artifacts to measure", hint="export first, or pass artifact paths")
    kinds = [_fidelity_format(a) for a in artifacts]
    facts = [k.part("fidelity_model").describe(a) for k, a in zip(kinds, artifacts)]
    rows, prompt_info = _load_prompt_rows(prompts, max_prompts)
    notes: list[str] = []
    if prompt_info["source"] == "builtin":
        notes.append("no holdout file: measured on edgepack's built-in prompt set, not the run's data")
    base_idx = _kld_base(facts)
    base = artifacts[base_idx] if base_idx is not None else None
    for fmt in dict.fromkeys(k for k, f in zip(kinds, facts) if f.quantized):
        if base_idx is None or kinds[base_idx] != fmt:
            notes.append(f"no unquantized {fmt.label} among the artifacts: quantized {fmt.label}s are compared "
                         "with transformers only")
    total_steps = 1 + len(artifacts)
    progress("fidelity", 0, total_steps)

    with tempfile.TemporaryDirectory(prefix="edgepack-fidelity-") as tmp:
        ref = TorchReference(hf_dir, threads=threads)
        plan = _plan(ref, rows, hf_dir, max_tokens=max_tokens, greedy_prompts=greedy_prompts,
                     max_new_tokens=max_new_tokens, threads=threads, notes=notes)
        torch_cache = _LogitCache(Path(tmp), "transformers")
        for i, ids in enumerate(plan.sequences):
            torch_cache.put(i, ref.logits(ids))
        ref_greedy = [ref.greedy(ids, max_new_tokens) for ids in plan.greedy_ids]
        eos_ids = ref.eos_ids
        ref.close()  # one model in memory at a time
        progress("fidelity", 1, total_steps)

        base_cache = _LogitCache(Path(tmp), "base")
        entries: dict[int, dict[str, Any]] = {}
        order = sorted(range(len(artifacts)), key=lambda i: artifacts[i] != base)  # the KLD base first
        for step, idx in enumerate(order, start=2):
            path = artifacts[idx]
            quantized = facts[idx].quantized and base_idx is not None and kinds[base_idx] == kinds[idx]
            role = "base" if idx == base_idx else ("quantized" if quantized else "plain")
            entries[idx] = _measure(plan, path, kinds[idx], facts[idx], role, base,
                                    torch_cache, base_cache, ref_greedy)
            progress("fidelity", step, total_steps)

    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": {"hf_dir": str(hf_dir), "backend": "transformers", "dtype": "float32",
                      "parameters": plan.n_params, "eos_ids": eos_ids},
        "prompts": {**prompt_info, "rows": len(plan.rows), "sequences": len(plan.sequences),
                    "tokens": sum(map(len, plan.sequences)),
                    "distinct_positions": sum(len(s) - f for s, f in zip(plan.sequences, plan.fresh)),
                    "max_tokens": max_tokens,
                    "greedy_prompts": len(plan.chat_rows), "tokenizer_strings": len(plan.strings)},
        "settings": {"max_prompts": max_prompts, "max_tokens": max_tokens, "greedy_prompts": greedy_prompts,
                     "max_new_tokens": max_new_tokens, "threads": threads},
        "artifacts": [entries[i] for i in range(len(artifacts))],
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 2),
        "produced_by": _produced_by(command),
    }
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def _fidelity_format(path: Path) -> Format:
    """The artifact's format, which must say how to load it for a fidelity comparison."""
    try:
        fmt = format_of(path)
    except ModelSourceError as exc:
        raise UsageError(f"{path} is neither a model file nor a model folder of a registered format: {exc}",
                         hint="pass GGUF files or ONNX folders as exported by `edgepack export`") from None
    if not fmt.provides("fidelity_model"):
        raise UsageError(f"{path.name}: format {fmt.name!r} has no fidelity model to compare with the reference",
                         hint="a format needs fidelity_model set to 'module:Class' to be measured")
    return fmt


def _kld_base(facts: list[ArtifactFacts]) -> int | None:
    """Index of the artifact quantized ones are compared with: the best ranked, first given."""
    ranked = [(f.base_rank, i) for i, f in enumerate(facts) if f.base_rank is not None]
    return min(ranked)[1] if ranked else None


def _measure(plan: _Plan, path: Path, fmt: Format, facts: ArtifactFacts, role: str, base: Path | None,
             torch_cache: _LogitCache, base_cache: _LogitCache, ref_greedy: list[Greedy]) -> dict[str, Any]:
    """One artifact: logits vs transformers (and vs the base artifact when quantized), tokenizer,
    greedy. ``role`` is ``base`` (its logits become the KLD base), ``quantized`` or ``plain``."""
    model = fmt.part("fidelity_model")(path, n_ctx=plan.n_ctx, threads=plan.threads)
    try:
        vs_torch, vs_base = LogitStats(), LogitStats()          # distinct contexts (headline)
        vs_torch_all, vs_base_all = LogitStats(), LogitStats()  # every position, repeats included
        for i, ids in enumerate(plan.sequences):
            logits = model.logits(ids)
            start = plan.fresh[i]
            ref = torch_cache.get(i)
            vs_torch_all.add(ref, logits)
            if start < len(ids):
                vs_torch.add(ref[start:], logits[start:])
            if role == "base":
                base_cache.put(i, logits)
            elif role == "quantized":
                base_logits = base_cache.get(i)
                vs_base_all.add(base_logits, logits)
                if start < len(ids):
                    vs_base.add(base_logits[start:], logits[start:])
        tokenizer = _tokenizer_check(plan.tokenizer, model, plan.strings)
        greedy = _greedy_check(plan.tokenizer, model, plan.chat_rows, plan.greedy_ids, ref_greedy,
                               plan.max_new_tokens)
    finally:
        model.close()
    entry = _entry(path, fmt.name, facts.quant, list(facts.files), plan.n_params, vs_torch, vs_base, base,
                   tokenizer, greedy)
    entry["vs_transformers_all_positions"] = _headline(vs_torch_all.summary())
    if vs_base_all.tokens:
        entry["vs_reference_gguf_all_positions"] = _headline(vs_base_all.summary())
    return entry


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("kld_mean", "kld_p99", "kld_max", "top1_agreement", "top1_flips", "max_abs_diff", "tokens")
    return {k: summary.get(k) for k in keys}


def _entry(path: Path, fmt: str, quant: str, files: list[Path], n_params: int, vs_torch: LogitStats,
           vs_base: LogitStats, base: Path | None, tokenizer: dict[str, Any], greedy: dict[str, Any]) -> dict[str, Any]:
    from edgepack.export.api import sha256_file

    # Size = the files holding the model (a GGUF also carries its vocab; an ONNX folder's
    # tokenizer and config files are counted apart, in folder_bytes).
    size = sum(p.stat().st_size for p in files)
    torch_summary = vs_torch.summary()
    entry: dict[str, Any] = {
        "path": str(path), "name": path.name, "format": fmt, "quant": quant,
        "files": {p.name: sha256_file(p) for p in files},
        "bytes": size, "size_mb": size / 1e6, "bits_per_weight": size * 8 / n_params,
        "vs_transformers": torch_summary,
    }
    if path.is_dir():
        entry["folder_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if vs_base.tokens:
        entry["vs_reference_gguf"] = {"reference": base.name if base else None, **vs_base.summary()}
        entry["kld"], entry["top1"] = entry["vs_reference_gguf"]["kld_mean"], entry["vs_reference_gguf"]["top1_agreement"]
        entry["kld_reference"] = f"{base.name if base else '?'} (llama.cpp)"
    else:
        entry["kld"], entry["top1"] = torch_summary.get("kld_mean"), torch_summary.get("top1_agreement")
        entry["kld_reference"] = "transformers (float32)"
    entry["tokenizer"] = tokenizer
    entry["greedy"] = greedy
    entry["targets"] = _targets(fmt, quant, entry)
    return entry


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``fidelity.json`` and ``fidelity.md`` (atomically) into ``out_dir``."""
    from edgepack.export.fidelity.markdown import render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / FIDELITY_REPORT, report)
    write_text(out_dir / FIDELITY_MARKDOWN, render_markdown(report))
    return out_dir / FIDELITY_REPORT, out_dir / FIDELITY_MARKDOWN
