"""Teacher scores for given tokens from a GGUF teacher through llama.cpp (on-policy distillation).

On an on-policy step (onpolicy.py) the student samples completions; :class:`GgufScorer` then
runs the run's GGUF teacher over each example's ``teacher_ids`` (the teacher's prompt, then the
student's completion) and returns the teacher's distribution at every position that predicts a
completion token, as :class:`~edgepack.distill.losses.SparseTargets` (top-k ids and
log-probabilities plus the log of the tail mass, temperature 1, float32). The rows come in the
order of ``batching.collate(...).targets`` for the same examples, so they line up with the
student's ``hidden[batch.predicts]``. The teacher never enters torch memory: llama.cpp holds
the weights (mapped from the file) and only ``[answer positions, V]`` float32 logits cross over.

How llama.cpp is driven, and why:

* The context is opened with ``logits_all`` **off** and the scorer builds its own
  ``llama_batch`` asking for logits only at the answer-predicting positions: with
  ``logits_all`` on, llama-cpp-python keeps an ``n_ctx × V`` float32 buffer (1.6 GB for
  SmolLM2 at its trained context) and computes the output head for every prompt token.
* The KV cache keeps the tokens of the previous example; the next one evaluates only the part
  after their common prefix (all rows share the system prompt and demonstrations), and the
  stale cells past it are removed first (``llama_memory_seq_rm``). Positions whose logits are
  needed are always evaluated now, so the prefix kept stops before the first of them.
* The KV cache is float32 by default (llama.cpp's default is f16): on an F32 GGUF, llama.cpp's
  log-probs then match transformers' to ~2e-6 (f16: ~1e-3). Scoring contexts are training
  sequences (hundreds of tokens), so the doubled cache is small — size ``n_ctx`` to them.
  ``kv_cache="f16"`` reproduces llama-server and the runtime backend bit for bit. On a quantized
  teacher neither is closer to the dequantized fp32 model: llama.cpp's quantized matmuls round
  the activations to 8 bits (SmolLM2-135M Q4_1: ~0.1 nats mean, ~0.5 max on top-k log-probs
  against transformers on the dequantized weights, with either cache).

The GGUF's vocabulary must be the student tokenizer's, id for id (token texts as stored in
``tokenizer.ggml.tokens`` and in ``tokenizer.json``), or token-level scores would silently
misalign; anything else is refused. The one difference allowed is llama.cpp's padding: ids past
the tokenizer's end that the GGUF marks unused (embedding rows padded to a round size, as the
exporter writes them). Their teacher mass stays in the tail bucket, never in the top-k, so
every top-k id is a token the student's tokenizer knows.

:func:`run_teacher_gguf` finds the GGUF a run's local teacher came from (``source.json``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.constants import TEACHER_SOURCE
from edgepack.errors import RunDirError, RuntimeFailure, UsageError
from edgepack.hashing import sha256_file

if TYPE_CHECKING:
    from edgepack.distill.batching import Example
    from edgepack.distill.losses import SparseTargets

KIND = "gguf"
DEFAULT_K = 32
DEFAULT_BATCH = 512
# KV cache element type by name (ggml type ids of llama_cpp.GGML_TYPE_F32 / GGML_TYPE_F16).
KV_CACHE_TYPES = {"f32": 0, "f16": 1}
_TOKENS_KEY = "tokenizer.ggml.tokens"
_TYPES_KEY = "tokenizer.ggml.token_type"
_MISMATCH_HINT = ("on-policy scores are compared token id by token id: use the GGUF of the student tokenizer's "
                  "family, or --on-policy-teacher hf")


class GgufScorer:
    """The teacher's sparse distribution at given tokens, from a GGUF through llama.cpp (module docstring)."""

    kind = KIND

    def __init__(self, gguf_path: Path, tokenizer: Any, *, k: int = DEFAULT_K, n_ctx: int = 0,
                 threads: int | None = None, n_batch: int = DEFAULT_BATCH, kv_cache: str = "f32") -> None:
        """Open ``gguf_path`` in llama.cpp on the CPU.

        ``tokenizer``: the student's HF tokenizer (its ids must be the GGUF's); ``k``: top-k kept
        per position; ``n_ctx``: the context (0: the GGUF's trained context; pass the longest
        teacher sequence to keep the KV cache small); ``threads``: llama.cpp threads (None: the
        CPUs this process may use); ``n_batch``: tokens per llama.cpp decode call; ``kv_cache``:
        the KV cache's element type, a key of :data:`KV_CACHE_TYPES` (module docstring).
        """
        from edgepack.gguf_header import read_gguf
        from edgepack.runtime.chat.check import check_gguf_templates

        self.path = Path(gguf_path)
        if k < 1:
            raise UsageError(f"k must be at least 1 (got {k})")
        if n_ctx < 0 or n_batch < 1:
            raise UsageError(f"n_ctx must be 0 (the trained context) or more, n_batch at least 1 "
                             f"(got {n_ctx}, {n_batch})")
        if kv_cache not in KV_CACHE_TYPES:
            raise UsageError(f"unknown KV cache type {kv_cache!r}", hint=f"use one of {', '.join(KV_CACHE_TYPES)}")
        # The bounded header reader first: a hostile file is refused before native code parses it,
        # and the vocabulary is compared before any weights are loaded.
        header = read_gguf(self.path, keep_arrays=(_TOKENS_KEY, _TYPES_KEY))
        self.n_known = check_vocab(self.path, header.array(_TOKENS_KEY) or [], header.array(_TYPES_KEY), tokenizer)
        if k > self.n_known:
            raise UsageError(f"k={k} is larger than the vocabulary ({self.n_known} tokens)")
        # llama-cpp-python compiles the GGUF's chat templates inside Llama(): check them first.
        check_gguf_templates(header)
        self.k, self.kv_cache = k, kv_cache
        self._llm, self._threads = _open_llama(self.path, n_ctx=n_ctx, threads=threads, n_batch=n_batch,
                                               kv_type=KV_CACHE_TYPES[kv_cache])
        import llama_cpp

        self._lib = llama_cpp
        self.n_vocab = int(self._llm.n_vocab())
        if self.n_vocab != len(header.array(_TOKENS_KEY) or []):
            self.close()
            raise UsageError(f"{self.path.name}: llama.cpp reads {self.n_vocab} tokens, the GGUF header lists "
                             f"{len(header.array(_TOKENS_KEY) or [])}", hint=_MISMATCH_HINT)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._llm.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self._llm.ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._cached: list[int] = []  # the tokens whose KV cells hold positions 0..len-1 of sequence 0
        self.stats = {"examples": 0, "positions": 0, "tokens_evaluated": 0, "tokens_reused": 0,
                      "decode_s": 0.0, "sparsify_s": 0.0}

    # ------------------------------------------------------------------ scoring

    def targets(self, indices: Sequence[int], examples: Sequence[Example]) -> SparseTargets:
        """The teacher's top-k + tail at the answer-predicting positions of ``examples``, in
        ``collate`` order (``indices`` are the examples' rows in the training set; unused here:
        the scores depend on the tokens alone)."""
        import torch

        from edgepack.distill.losses import SparseTargets

        del indices
        if self._llm is None:
            raise UsageError("this GgufScorer was closed", hint="open a new one")
        ids, lps, tails = [torch.empty((0, self.k), dtype=torch.long)], [torch.empty((0, self.k))], [torch.empty(0)]
        for e in examples:
            logits = self._answer_logits(e.teacher_ids, e.teacher_prompt)
            t0 = time.perf_counter()
            # One example at a time: a micro-batch's dense logits would be positions × V float32.
            i, lp, tail = topk_tail(torch.from_numpy(logits), self.k, self.n_known)
            ids.append(i)
            lps.append(lp)
            tails.append(tail)
            self.stats["sparsify_s"] += time.perf_counter() - t0
            self.stats["positions"] += int(i.shape[0])
        self.stats["examples"] += len(examples)
        return SparseTargets(topk_ids=torch.cat(ids), topk_logprobs=torch.cat(lps), tail_logmass=torch.cat(tails))

    def _answer_logits(self, ids: Sequence[int], prompt: int) -> Any:
        """float32 logits [len(ids) - prompt, V] at positions prompt-1 .. len(ids)-2 of ``ids``."""
        import numpy as np

        ids = [int(t) for t in ids]
        first, end = prompt - 1, len(ids) - 1  # the positions that predict ids[prompt:]
        if first < 0 or end <= first:
            raise UsageError(f"an example needs a prompt token and at least one answer token "
                             f"(got {len(ids)} tokens, prompt {prompt})")
        if len(ids) > self.n_ctx:
            raise UsageError(f"a teacher sequence has {len(ids)} tokens; the scorer's llama.cpp context holds "
                             f"{self.n_ctx}", hint="open the GgufScorer with n_ctx at least the longest teacher "
                                                   "sequence (teacher prompt + completion)")
        if bad := [t for t in ids if not 0 <= t < self.n_vocab]:
            raise UsageError(f"token id {bad[0]} is outside the teacher's vocabulary ({self.n_vocab} tokens)")
        keep = self._keep_prefix(ids, first)
        out = np.empty((end - first, self.n_vocab), dtype=np.float32)
        t0 = time.perf_counter()
        try:
            row = 0
            for start in range(keep, end, self.n_batch):
                stop = min(start + self.n_batch, end)
                wanted = self._decode(ids, start, stop, first)
                if wanted:
                    logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._llm.ctx),
                                                   shape=(wanted, self.n_vocab))
                    out[row:row + wanted] = logits
                    row += wanted
        except BaseException:
            self._forget()  # the cache holds a partial sequence now
            raise
        self._cached = ids[:end]
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["tokens_evaluated"] += end - keep
        self.stats["tokens_reused"] += keep
        return out

    def _keep_prefix(self, ids: list[int], first: int) -> int:
        """How many cached tokens to keep for ``ids`` (their KV stays, the rest is removed)."""
        keep = 0
        limit = min(len(self._cached), first)  # positions from ``first`` on are evaluated for their logits
        while keep < limit and self._cached[keep] == ids[keep]:
            keep += 1
        mem = self._lib.llama_get_memory(self._llm.ctx)
        if not self._lib.llama_memory_seq_rm(mem, 0, keep, -1):
            # Some memories (recurrent models) cannot drop a suffix: start from an empty cache.
            self._forget()
            keep = 0
        self._cached = self._cached[:keep]
        return keep

    def _decode(self, ids: list[int], start: int, stop: int, first: int) -> int:
        """Decode ids[start:stop] at their positions; logits for positions >= ``first``. Returns their count."""
        batch = self._batch
        wanted = 0
        for j, pos in enumerate(range(start, stop)):
            batch.token[j] = ids[pos]
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = pos >= first
            wanted += pos >= first
        batch.n_tokens = stop - start
        rc = self._lib.llama_decode(self._llm.ctx, batch)
        if rc != 0:
            raise RuntimeFailure(f"llama.cpp could not evaluate {stop - start} tokens of {self.path.name} "
                                 f"(llama_decode returned {rc})",
                                 hint="a larger n_ctx may be needed, or the machine is out of memory")
        return wanted

    def _forget(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._llm.ctx), True)
        self._cached = []

    # ------------------------------------------------------------------ report and lifetime

    def describe(self) -> dict[str, Any]:
        """What train_report.json records about the scorer: the file, its identity, the settings, the work done."""
        import llama_cpp

        stats = dict(self.stats)
        evaluated = stats["tokens_evaluated"]
        decode_s = stats["decode_s"]
        return {
            "kind": KIND, "path": str(self.path), "sha256": _sha256(self.path), "bytes": self.path.stat().st_size,
            "k": self.k, "n_ctx": self.n_ctx, "n_batch": self.n_batch, "threads": self._threads,
            "n_vocab": self.n_vocab, "tokenizer_tokens": self.n_known, "kv_cache": self.kv_cache,
            "llama_cpp_python": llama_cpp.__version__,
            **{key: round(v, 3) if isinstance(v, float) else v for key, v in stats.items()},
            "tokens_per_s": round(evaluated / decode_s, 1) if decode_s else None,
            "note": "tokens_evaluated: teacher tokens llama.cpp ran; tokens_reused: prefix tokens whose KV cache "
                    "was kept from the previous example; positions: scored answer positions",
        }

    def close(self) -> None:
        """Free llama.cpp's context and model (idempotent)."""
        llm, self._llm = getattr(self, "_llm", None), None
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            self._lib.llama_batch_free(batch)
        if llm is not None:
            llm.close()

    def __enter__(self) -> GgufScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _open_llama(path: Path, *, n_ctx: int, threads: int | None, n_batch: int, kv_type: int) -> tuple[Any, int]:
    import llama_cpp

    from edgepack.runtime.backends.base import default_threads

    threads = threads or default_threads()
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, logits_all=False,
                              type_k=kv_type, type_v=kv_type, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise RuntimeFailure(f"llama.cpp could not load {path.name}: {exc}",
                             hint="check the file was exported for this llama.cpp version "
                                  f"(llama-cpp-python {llama_cpp.__version__})") from exc
    return llm, threads


def check_vocab(path: Path, tokens: Sequence[str], types: Sequence[int] | None, tokenizer: Any) -> int:
    """The number of ids the GGUF's vocabulary (``tokens``, ``types`` from its header) shares with the
    HF ``tokenizer``, which must be all of the tokenizer's; UsageError naming the first difference."""
    from edgepack.export.gguf.vocab import TOKEN_UNUSED

    n_known = len(tokenizer)
    if len(tokens) < n_known:
        raise UsageError(f"{path.name} has {len(tokens)} tokens, the student's tokenizer {n_known}: not the same "
                         "vocabulary", hint=_MISMATCH_HINT)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_known)))
    for i, (ours, theirs) in enumerate(zip(pieces, tokens)):
        if ours != theirs:
            raise UsageError(f"{path.name}'s vocabulary differs from the student's tokenizer: token {i} is "
                             f"{theirs!r} in the GGUF, {ours!r} in the tokenizer", hint=_MISMATCH_HINT)
    extra = [i for i in range(n_known, len(tokens)) if types is None or int(types[i]) != TOKEN_UNUSED]
    if extra:
        raise UsageError(f"{path.name} has {len(tokens) - n_known} tokens past the student tokenizer's {n_known}, "
                         f"and token {extra[0]} ({tokens[extra[0]]!r}) is not padding", hint=_MISMATCH_HINT)
    return n_known


def topk_tail(logits: Any, k: int, n_known: int | None = None) -> tuple[Any, Any, Any]:
    """(top-k ids int64 [N, k], their log-probs float32 [N, k], log tail mass float32 [N]) of
    ``logits`` [N, V] at temperature 1; the top-k is taken among the first ``n_known`` ids only
    (None: all), every other id's mass is in the tail."""
    import torch

    logits = logits.float()
    # log p = logit - logsumexp(logits): the top-k of the logits are the top-k of the log-probs,
    # so no [N, V] log-softmax is materialized (the V-wide passes dominate on a large vocabulary).
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    known = logits if n_known is None else logits[:, :n_known]
    top, top_ids = known.topk(k, dim=-1)
    top_lp = top - log_z
    if k >= logits.shape[-1]:
        tail = torch.full((logits.shape[0],), float("-inf"))
    else:
        # Exact tail from the tokens outside the top-k, not log1p(-Σ p_top) (cancellation), as
        # softlabels._sparsify computes it.
        tail = (torch.logsumexp(logits.scatter(-1, top_ids, float("-inf")), dim=-1, keepdim=True) - log_z)[:, 0]
    return top_ids.long(), top_lp, tail


@lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _sha256(path: Path) -> str:
    """The file's sha256, hashed once per process while its size and mtime stay the same."""
    st = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------- the run's teacher

def run_teacher_gguf(run_dir: Path) -> Path | None:
    """The GGUF file the run's local teacher (``RUN/teacher``, or ``RUN/teacher-corrected``
    after teacher correction) was materialized from, as its ``source.json`` records it; None
    for a teacher that came from an HF folder.

    A ``builtin:`` teacher is the GGUF inside its PyPI package; a corrected teacher's GGUF lies
    in its folder. RunDirError when the file is gone or its sha256 is no longer the recorded one.
    """
    from edgepack.distill.data import teacher_dir_of
    from edgepack.distill.teachers import builtin_teacher_path
    from edgepack.errors import ModelSourceError

    teacher_dir = teacher_dir_of(Path(run_dir))
    source_path = teacher_dir / TEACHER_SOURCE
    try:
        source = json.loads(source_path.read_text(encoding="utf-8"))
        kind, spec, recorded_sha = source["kind"], str(source.get("spec") or ""), source["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{source_path} is missing or unreadable: {exc}",
                          hint="run `edgepack distill data` first") from exc
    if kind != KIND:
        return None
    if spec.startswith("builtin:"):
        try:
            path = builtin_teacher_path(spec.removeprefix("builtin:"))
        except ModelSourceError as exc:
            raise RunDirError(f"{source_path}: the run's teacher {spec} is gone ({exc})", hint=exc.hint) from exc
    else:
        path = Path(source.get("path") or "")
        path = path if path.is_absolute() else teacher_dir / path  # a corrected teacher's GGUF: a name in its folder
    if not path.is_file():
        raise RunDirError(f"the run's teacher GGUF {path} no longer exists ({source_path} records it)",
                          hint="put the file back, or rerun `edgepack distill data` with the teacher in a new run folder")
    if _sha256(path) != recorded_sha:
        raise RunDirError(f"the run's teacher GGUF {path} has changed since the run's data was made "
                          f"(sha256 differs from {source_path})",
                          hint="restore the original file, or make the data again in a new run folder")
    return path
