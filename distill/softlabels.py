"""The sparse soft-label store: the teacher's distribution at every answer token, cached on disk.

``cache_soft_labels(run_dir)`` reads ``RUN/data/train.jsonl`` and the run's teacher, builds the
same :class:`~edgepack.distill.batching.Example` list training builds (``tokenize_rows`` with the
teacher-only context, the shared-prefix KV cache of ``TeacherPrefix``), and for every answer
position stores, at temperature 1:

* the top-k token ids (int32) and log-probabilities (fp16);
* the log of the mass outside the top-k (fp32), so losses can treat it as one explicit bucket;
* optionally, the distinct tokens among ``samples`` draws from the teacher (seeded per row, so
  deterministic whatever the shard layout), with the teacher's log-probability (fp16) and the
  draw count (uint8): weights count / S give an unbiased estimate of the forward KL and its
  gradient (``losses.sampled_forward_kl``);
* the answer token itself (int32), to check alignment with the training examples on read.

Layout of ``RUN/softlabels/``: ``shard-00000.safetensors`` … each holding ``shard_rows``
examples as flat tensors concatenated over positions, with ``row_offsets`` (per row) and
``sample_offsets`` (per position); every shard carries the store's identity in its header and
is written atomically, so a rerun keeps finished shards and computes only the missing ones.
``index.json`` (k, samples, teacher sha256, tokenizer identity, bytes, retained mass, timings)
and the ``.complete`` marker are written last.

:class:`~edgepack.distill.softlabels_read.SoftLabels` (softlabels_read.py) reads the store back: ``targets(indices)`` returns a
:class:`~edgepack.distill.losses.SparseTargets` whose rows line up with ``hidden[batch.predicts]``
for ``collate`` over the same examples, in the same order. Row *i* is example *i* of
``tokenize_rows(..., max_length)`` with the store's ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import atomic_path, clean_stale, is_complete, write_json, write_text
from edgepack.constants import (COMPLETE_MARKER, DATA_DIR, SOFTLABELS_DIR, SOFTLABELS_INDEX, TEACHER_CONTEXT,
                                TEACHER_SOURCE, TRAIN_FILE)
from edgepack.errors import DataError, RunDirError, UsageError
from edgepack.hashing import sha256_file
from edgepack.progress import ProgressFn, null_progress

if TYPE_CHECKING:
    from edgepack.distill.device import Device

FORMAT_VERSION = 1
DEFAULT_K = 32
DEFAULT_SHARD_ROWS = 256
DEFAULT_MAX_LENGTH = 256          # = TrainConfig.max_length: row i is training example i
MICRO_BATCH = 8                   # rows per teacher forward while caching
MAX_SAMPLES = 255                 # draw counts are stored as uint8
SHARD_NAME = "shard-{:05d}.safetensors"
META_KEY = "edgepack_softlabels"  # safetensors header metadata: {"identity": …, "rows": [start, end]}
RECOMPUTE_HINT = "rerun the soft-label caching: it recomputes damaged or missing shards and keeps the rest"


# ----------------------------------------------------------------------------- identity

def teacher_sha256(teacher_dir: Path) -> str:
    """The teacher's identity as its folder records it (``source.json``)."""
    try:
        return str(json.loads((Path(teacher_dir) / TEACHER_SOURCE).read_text(encoding="utf-8"))["sha256"])
    except (OSError, ValueError, KeyError) as exc:
        raise RunDirError(f"{teacher_dir / TEACHER_SOURCE} is missing or unreadable: {exc}",
                          hint="run `edgepack distill data` first") from exc


def tokenizer_identity(teacher_dir: Path) -> str:
    """sha256 over the tokenizer and chat-template files (the prompt ids depend on all of them)."""
    from edgepack.distill.teachers import HF_TOKENIZER_FILES

    h = hashlib.sha256()
    for name in HF_TOKENIZER_FILES:
        if (Path(teacher_dir) / name).is_file():
            h.update(f"{name}\0{sha256_file(Path(teacher_dir) / name)}\n".encode())
    return h.hexdigest()


def _teacher_dir(run_dir: Path) -> Path:
    data_dir = run_dir / DATA_DIR
    if not is_complete(data_dir):
        raise RunDirError(f"{data_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    from edgepack.distill.data import teacher_dir_of

    return teacher_dir_of(run_dir)


def _identity(run_dir: Path, teacher_dir: Path, *, k: int, samples: int, seed: int, max_length: int,
              shard_rows: int, device: Device | None = None) -> dict[str, Any]:
    data_dir = run_dir / DATA_DIR
    context = data_dir / TEACHER_CONTEXT
    return {
        "format": FORMAT_VERSION,
        "teacher_dir": teacher_dir.name,
        "teacher_sha256": teacher_sha256(teacher_dir),
        "tokenizer_sha256": tokenizer_identity(teacher_dir),
        "train_sha256": sha256_file(data_dir / TRAIN_FILE),
        "context_sha256": sha256_file(context) if context.is_file() else None,
        "k": k, "samples": samples, "seed": seed, "max_length": max_length, "shard_rows": shard_rows,
        "temperature": 1.0,
        **({} if device is None or device.name == "cpu" else {"teacher_device": device.name,  # CPU: no key
                                                              "teacher_dtype": str(device.teacher_dtype)}),
    }


# ----------------------------------------------------------------------------- caching

def sample_support(logprobs: Any, samples: int, generator: Any) -> tuple[Any, Any, Any]:
    """Draw ``samples`` tokens per row of ``logprobs`` [n, V] (with replacement).

    Returns (ids [U], counts [U], lengths [n]): the distinct tokens of each row in ascending
    id order, flattened over rows, how often each was drawn, and how many each row has.
    """
    import torch

    draws = torch.multinomial(logprobs.float().exp(), samples, replacement=True, generator=generator)
    ordered, _ = draws.sort(dim=-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ids = ordered[first]
    run = first.reshape(-1).long().cumsum(0) - 1
    counts = torch.bincount(run, minlength=ids.numel())
    return ids, counts, first.sum(-1)


def _row_generator(seed: int, row: int) -> Any:
    import torch

    digest = hashlib.sha256(f"edgepack-softlabels:{seed}:{row}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _sparsify(logits: Any, example_rows: list[int], lengths: list[int], *, k: int, samples: int,
              seed: int) -> dict[str, Any]:
    """Top-k, tail and samples from the teacher's logits [N, V] at one micro-batch's answer positions."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    if k >= logprobs.shape[-1]:
        tail = torch.full((logprobs.shape[0],), float("-inf"))
    else:
        # Exact tail from the tokens outside the top-k, not log1p(-Σ p_top) (cancellation).
        tail = torch.logsumexp(logprobs.scatter(-1, top_ids, float("-inf")), dim=-1)
    out = {"topk_ids": top_ids.to(torch.int32), "topk_logprobs": top_lp.to(torch.float16), "tail_logmass": tail}
    if samples:
        ids, counts, per_pos = [], [], []
        start = 0
        for row, n in zip(example_rows, lengths):
            i, c, m = sample_support(logprobs[start:start + n], samples, _row_generator(seed, row))
            ids.append(i)
            counts.append(c)
            per_pos.append(m)
            start += n
        flat_ids, per_pos_t = torch.cat(ids), torch.cat(per_pos)
        pos_of = torch.repeat_interleave(torch.arange(logprobs.shape[0]), per_pos_t)
        out.update(sample_ids=flat_ids.to(torch.int32), sample_logprobs=logprobs[pos_of, flat_ids].to(torch.float16),
                   sample_counts=torch.cat(counts).to(torch.uint8), sample_lengths=per_pos_t)
    return out


def _shard_tensors(parts: list[dict[str, Any]], lengths: list[int], answers: list[list[int]]) -> dict[str, Any]:
    """One shard's flat tensors from its micro-batches' sparse parts, with row/position offsets."""
    import torch

    out = {
        "row_offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64),
        "tokens": torch.tensor([t for a in answers for t in a], dtype=torch.int32),
    }
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_logprobs", "sample_counts"):
        if name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts]).contiguous()
    if "sample_lengths" in parts[0]:
        per_pos = torch.cat([p["sample_lengths"] for p in parts])
        out["sample_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), per_pos.cumsum(0)]).to(torch.int32)
    return out


def _shard_stats(tensors: dict[str, Any]) -> dict[str, Any]:
    import torch

    retained = -torch.expm1(tensors["tail_logmass"].double())  # 1 - tail mass, from the exact fp32 tail
    stats = {"tokens": int(retained.numel()), "retained_sum": float(retained.double().sum()),
             "retained_min": float(retained.min()) if retained.numel() else 1.0,
             "retained_hist": torch.histc(retained.float().clamp(0, 1), bins=20, min=0.0, max=1.0).long().tolist()}
    if "sample_ids" in tensors:
        stats["unique_samples"] = int(tensors["sample_ids"].numel())
    return stats


def _shard_header(meta: dict[str, str]) -> dict[str, Any]:
    try:
        header = json.loads(meta.get(META_KEY, "{}"))
    except ValueError:
        return {}
    return header if isinstance(header, dict) else {}


def _existing_shard(path: Path, identity: dict[str, Any], rows: tuple[int, int],
                    sha256: str | None) -> dict[str, Any] | None:
    """The stats of a finished shard that belongs to this store, None if it must be (re)computed."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    if sha256 is not None and sha256_file(path) != sha256:
        path.unlink()  # altered since an earlier pass indexed it
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (OSError, SafetensorError, ValueError):
        path.unlink()  # damaged (an external truncation): compute it again
        return None
    header = _shard_header(meta)
    if header.get("identity") != identity:
        raise RunDirError(f"{path} was cached with other settings (teacher, data, k, samples or seed)",
                          hint=f"delete {path.parent} to cache again, or rerun with the same settings")
    if header.get("rows") != list(rows):
        path.unlink()
        return None
    return _shard_stats(tensors)


def cache_soft_labels(run_dir: Path, *, k: int = DEFAULT_K, samples: int = 0, seed: int = 0,
                      shard_rows: int = DEFAULT_SHARD_ROWS, max_length: int = DEFAULT_MAX_LENGTH,
                      micro_batch: int = MICRO_BATCH, progress: ProgressFn = null_progress,
                      device: Device | None = None) -> dict[str, Any]:
    """Cache the teacher's sparse distribution at every answer token of RUN/data/train.jsonl.

    ``device`` (distill/device.py; None: the CPU) runs the teacher, in half precision on an
    accelerator (in the identity); top-k and sampling run on the CPU.
    Writes RUN/softlabels/ (shards, index.json, .complete) and returns the index. ``k`` top
    tokens per position plus the tail mass; ``samples`` > 0 also stores that many draws from
    the teacher per position. A rerun skips finished shards; a complete store with the same
    settings is returned as is (``skipped``).
    """
    from edgepack.distill.device import CPU

    run_dir, device = Path(run_dir), device or CPU
    if k < 1:
        raise UsageError(f"k must be at least 1 (got {k})")
    if not 0 <= samples <= MAX_SAMPLES:
        raise UsageError(f"samples must be between 0 and {MAX_SAMPLES} (got {samples})")
    if shard_rows < 1 or micro_batch < 1 or max_length < 2:
        raise UsageError("shard_rows and micro_batch must be at least 1, max_length at least 2")
    teacher_dir = _teacher_dir(run_dir)
    if not is_complete(teacher_dir):
        raise RunDirError(f"{teacher_dir} is missing or incomplete", hint="run `edgepack distill data` first")
    identity = _identity(run_dir, teacher_dir, k=k, samples=samples, seed=seed, max_length=max_length, device=device,
                         shard_rows=shard_rows)
    out = run_dir / SOFTLABELS_DIR
    if is_complete(out):
        whole = _whole_store(out, identity)
        if whole is not None:
            return whole
    known = _known_digests(out)
    import transformers  # noqa: F401  (before the clock: wall_s times the caching, not the import)
    t_start = time.perf_counter()
    rows, examples, too_long, teacher, pad_id = _load_teacher_inputs(run_dir, teacher_dir, k=k, max_length=max_length,
                                                                     device=device)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    run = _CachePass(teacher=teacher, examples=examples, pad_id=pad_id, progress=progress,
                     total_tokens=sum(e.answer_tokens for e in examples), device=device)
    run.advance(0, 0)
    shards: list[dict[str, Any]] = []
    stats: list[dict[str, Any]] = []
    for number, start in enumerate(range(0, len(examples), shard_rows)):
        end = min(start + shard_rows, len(examples))
        path = out / SHARD_NAME.format(number)
        found = _existing_shard(path, identity, (start, end), known.get(path.name))
        if found is None:
            found = _compute_shard(run, path, identity, (start, end), micro_batch=micro_batch)
        else:
            run.advance(end - start, found["tokens"])
        stats.append(found)
        shards.append({"file": path.name, "rows": [start, end], "tokens": found["tokens"],
                       "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    index = _index(identity, shards, stats, examples=len(examples), rows=len(rows), too_long=too_long,
                   vocab=teacher.get_output_embeddings().weight.shape[0], computed=run.computed, timing=run.timing,
                   wall_s=time.perf_counter() - t_start, computed_tokens=run.computed_tokens)
    write_json(out / SOFTLABELS_INDEX, index)
    write_text(out / COMPLETE_MARKER, "ok\n")  # last: the store is whole
    return index


def _whole_store(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """A complete store's index (``skipped``) if every shard is intact; None, with the marker
    removed, if one was deleted or damaged (just that one is recomputed). Other settings: RunDirError."""
    index = _read_index(out)
    if index.get("identity") != identity:
        raise RunDirError(f"{out} holds soft labels cached with other settings",
                          hint=f"delete {out} to cache again, or use the same k/samples/seed/max_length")
    if all((out / s["file"]).is_file() and sha256_file(out / s["file"]) == s["sha256"] for s in index["shards"]):
        return {**index, "skipped": True}
    (out / COMPLETE_MARKER).unlink()
    return None


def _known_digests(out: Path) -> dict[str, str]:
    """Shard digests of an earlier pass (its index), so a damaged shard is recomputed, not trusted."""
    try:
        index = _read_index(out) if (out / SOFTLABELS_INDEX).is_file() else {"shards": []}
        return {s["file"]: s["sha256"] for s in index["shards"]}
    except (RunDirError, KeyError, TypeError):
        return {}


def _load_teacher_inputs(run_dir: Path, teacher_dir: Path, *, k: int, max_length: int, device: Device
                         ) -> tuple[list[dict[str, Any]], list[Any], int, Any, int]:
    """(train rows, their Examples as training builds them, rows too long, the fp32 teacher, pad id)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import tokenize_rows
    from edgepack.distill.data import read_jsonl

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data_dir = run_dir / DATA_DIR
    rows = read_jsonl(data_dir / TRAIN_FILE)
    context = json.loads((data_dir / TEACHER_CONTEXT).read_text())["messages"] \
        if (data_dir / TEACHER_CONTEXT).is_file() else []
    examples, too_long = tokenize_rows(tok, rows, context, max_length)
    if not examples:
        raise DataError(f"no training row fits max_length={max_length} tokens ({too_long} too long)")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(
        device.name, dtype=device.teacher_dtype)  # a no-op on the CPU
    teacher.eval().requires_grad_(False)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise UsageError(f"k={k} is larger than the teacher's vocabulary ({vocab} tokens)")
    return rows, examples, too_long, teacher, pad_id


@dataclass
class _CachePass:
    """One pass's running state: the prefix cache (built for the first shard computed), timings, progress."""

    teacher: Any
    examples: list[Any]
    pad_id: int
    progress: ProgressFn
    total_tokens: int
    device: Device
    prefix: Any = None
    done_rows: int = 0
    done_tokens: int = 0
    computed: int = 0
    computed_tokens: int = 0
    timing: dict[str, Any] = field(default_factory=lambda: {"forward_s": 0.0, "sparsify_s": 0.0, "write_s": 0.0,
                                                            "teacher_input_tokens": 0, "teacher_prefix_tokens": None})

    def advance(self, rows: int, tokens: int) -> None:
        self.done_rows += rows
        self.done_tokens += tokens
        self.progress("soft labels: rows", self.done_rows, len(self.examples))
        self.progress("soft labels: tokens", self.done_tokens, self.total_tokens)


def _compute_shard(run: _CachePass, path: Path, identity: dict[str, Any], rows: tuple[int, int], *,
                   micro_batch: int) -> dict[str, Any]:
    """Run the teacher over examples ``rows``, write their shard and return its stats."""
    from edgepack.distill.batching import TeacherPrefix

    if run.prefix is None:
        with run.device.placement():
            run.prefix = TeacherPrefix(run.teacher, run.examples)
        run.timing["teacher_prefix_tokens"] = run.prefix.length
    start, end = rows
    parts = []
    for mb in range(start, end, micro_batch):
        part = run.examples[mb:min(mb + micro_batch, end)]
        t0 = time.perf_counter()
        with run.device.placement():
            logits = run.prefix.logits(run.teacher, part, run.pad_id).float().cpu()
        t1 = time.perf_counter()
        # Sparsified per micro-batch: a shard's dense logits would be rows × V fp32.
        parts.append(_sparsify(logits, list(range(mb, mb + len(part))), [e.answer_tokens for e in part],
                               k=identity["k"], samples=identity["samples"], seed=identity["seed"]))
        run.timing["forward_s"] += t1 - t0
        run.timing["sparsify_s"] += time.perf_counter() - t1
        run.timing["teacher_input_tokens"] += sum(len(e.teacher_ids) - run.prefix.length for e in part)
        run.advance(len(part), sum(e.answer_tokens for e in part))
    t0 = time.perf_counter()
    tensors = _shard_tensors(parts, [e.answer_tokens for e in run.examples[start:end]],
                             [e.student_ids[e.student_prompt:] for e in run.examples[start:end]])
    _write_shard(path, tensors, identity, rows)
    run.timing["write_s"] += time.perf_counter() - t0
    found = _shard_stats(tensors)
    run.computed += 1
    run.computed_tokens += found["tokens"]
    return found


def _write_shard(path: Path, tensors: dict[str, Any], identity: dict[str, Any], rows: tuple[int, int]) -> None:
    from safetensors.torch import save_file

    # One metadata key: safetensors writes its metadata map in hash order, and a shard must be
    # byte-identical when recomputed (resume), so everything goes into one sorted JSON string.
    meta = {META_KEY: json.dumps({"identity": identity, "rows": list(rows)}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _index(identity: dict[str, Any], shards: list[dict[str, Any]], stats: list[dict[str, Any]], *, examples: int,
           rows: int, too_long: int, vocab: int, computed: int, timing: dict[str, Any], wall_s: float,
           computed_tokens: int) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in stats)
    total_bytes = sum(s["bytes"] for s in shards)
    hist = [sum(col) for col in zip(*(s["retained_hist"] for s in stats))]
    k, samples = identity["k"], identity["samples"]
    # Per answer token: ids int32 + logprobs fp16 per top-k slot, tail fp32, answer token int32.
    topk_bytes = 6 * k + 4 + 4
    index: dict[str, Any] = {
        "identity": identity,
        "k": k, "samples": samples, "seed": identity["seed"], "max_length": identity["max_length"],
        "teacher_sha256": identity["teacher_sha256"], "tokenizer_sha256": identity["tokenizer_sha256"],
        "vocab_size": vocab,
        "rows": examples, "train_rows": rows, "rows_too_long": too_long, "tokens": tokens,
        "shards": shards,
        "bytes": total_bytes,
        "bytes_per_token": round(total_bytes / max(tokens, 1), 2),
        "bytes_per_token_topk": topk_bytes,
        "retained_mass": {"mean": round(sum(s["retained_sum"] for s in stats) / max(tokens, 1), 6),
                          "min": round(min(s["retained_min"] for s in stats), 6),
                          "p05": _hist_quantile(hist, 0.05), "hist20": hist},
    }
    if samples:
        unique = sum(s.get("unique_samples", 0) for s in stats)
        index["unique_samples_per_token"] = round(unique / max(tokens, 1), 3)
        # Per position: offset int32; per distinct draw: id int32 + logprob fp16 + count uint8.
        index["bytes_per_token_samples"] = round(4 + 7 * unique / max(tokens, 1), 2)
    fwd = timing["forward_s"]
    busy = fwd + timing["sparsify_s"] + timing["write_s"]
    index["timing"] = {
        "shards_computed": computed, "shards_reused": len(shards) - computed,
        "tokens_computed": computed_tokens,
        "wall_s": round(wall_s, 3), "forward_s": round(fwd, 3), "sparsify_s": round(timing["sparsify_s"], 3),
        "write_s": round(timing["write_s"], 3),
        "teacher_input_tokens": timing["teacher_input_tokens"],
        "teacher_prefix_tokens": timing["teacher_prefix_tokens"],
        "forward_tokens_per_s": round(computed_tokens / fwd, 1) if fwd else None,
        "cache_tokens_per_s": round(computed_tokens / busy, 1) if busy else None,
        "note": "tokens = answer tokens; cache_tokens_per_s counts forward + top-k/sampling + writing, "
                "forward_tokens_per_s the teacher forward alone (same examples, same micro-batches)",
    }
    return index


def _hist_quantile(hist: list[int], q: float) -> float:
    """Upper edge of the 20-bin histogram bin holding the ``q`` quantile (a 0.05-wide bound)."""
    total, seen = sum(hist), 0
    for i, n in enumerate(hist):
        seen += n
        if total and seen >= q * total:
            return round((i + 1) / len(hist), 2)
    return 1.0


# ----------------------------------------------------------------------------- reading

def _read_index(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / SOFTLABELS_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{folder / SOFTLABELS_INDEX} is missing or unreadable: {exc}",
                          hint=f"delete {folder} and cache the soft labels again") from exc
    if not isinstance(index, dict) or index.get("identity", {}).get("format") != FORMAT_VERSION:
        raise RunDirError(f"{folder / SOFTLABELS_INDEX} is not a soft-label index of format {FORMAT_VERSION}",
                          hint=f"delete {folder} and cache the soft labels again")
    return index
