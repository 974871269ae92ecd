"""Reading a finished RUN/softlabels store back (the store itself is written by softlabels.py).

:class:`SoftLabels` checks the index and every shard's identity on open and returns the
cached sparse targets of a batch of training examples; :func:`open_soft_labels` opens a run's.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepack.atomic import is_complete
from edgepack.constants import COMPLETE_MARKER, SOFTLABELS_DIR, SOFTLABELS_INDEX
from edgepack.distill.softlabels import (RECOMPUTE_HINT, _read_index, _shard_header, _teacher_dir, teacher_sha256,
                                         tokenizer_identity)
from edgepack.errors import InvalidModelFile, RunDirError
from edgepack.hashing import sha256_file


class SoftLabels:
    """Read access to a complete RUN/softlabels store, validated on open.

    ``teacher_sha256`` / ``tokenizer_sha256`` / ``max_length``, when given, must match what the
    store was cached with (else RunDirError). Every shard's size (and with ``verify`` its sha256)
    is checked against the index (else InvalidModelFile naming the shard).
    """

    def __init__(self, folder: Path, *, teacher_sha256: str | None = None, tokenizer_sha256: str | None = None,
                 max_length: int | None = None, verify: bool = True) -> None:
        self.folder = Path(folder)
        if not is_complete(self.folder):
            raise RunDirError(f"{self.folder} is missing or incomplete (no {COMPLETE_MARKER} marker)",
                              hint="cache the soft labels first; a rerun resumes from the finished shards")
        self.index = _read_index(self.folder)
        expected = {"teacher_sha256": teacher_sha256, "tokenizer_sha256": tokenizer_sha256, "max_length": max_length}
        for key, want in expected.items():
            have = self.index["identity"].get(key)
            if want is not None and have != want:
                raise RunDirError(f"{self.folder} was cached with {key} {have}, this run has {want}",
                                  hint=f"delete {self.folder} and cache the soft labels again for this run")
        self._starts: list[int] = []
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise InvalidModelFile(f"soft-label shard {path} is missing",
                                       hint=RECOMPUTE_HINT)
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise InvalidModelFile(f"soft-label shard {path} is truncated or altered ({size} bytes, "
                                       f"the index says {shard['bytes']})",
                                       hint=RECOMPUTE_HINT)
            if verify and sha256_file(path) != shard["sha256"]:
                raise InvalidModelFile(f"soft-label shard {path} does not match its sha256 in the index",
                                       hint=RECOMPUTE_HINT)
            self._starts.append(shard["rows"][0])
        self._open: dict[int, tuple[Any, dict[str, Any]]] = {}

    @property
    def k(self) -> int:
        return int(self.index["k"])

    @property
    def samples(self) -> int:
        return int(self.index["samples"])

    def __len__(self) -> int:
        return int(self.index["rows"])

    def _shard(self, number: int) -> tuple[Any, dict[str, Any]]:
        from safetensors import SafetensorError, safe_open

        if number not in self._open:
            path = self.folder / self.index["shards"][number]["file"]
            try:
                fh = safe_open(str(path), framework="pt")
                meta = fh.metadata() or {}
                small = {"row_offsets": fh.get_tensor("row_offsets")}
                if "sample_offsets" in fh.keys():
                    small["sample_offsets"] = fh.get_tensor("sample_offsets").long()
            except (OSError, SafetensorError, ValueError) as exc:
                raise InvalidModelFile(f"soft-label shard {path} cannot be read: {exc}",
                                       hint=RECOMPUTE_HINT) from exc
            header = _shard_header(meta)
            if header.get("identity") != self.index["identity"] or \
                    header.get("rows") != self.index["shards"][number]["rows"]:
                raise InvalidModelFile(f"soft-label shard {path} belongs to another store than {SOFTLABELS_INDEX}",
                                       hint=f"delete {self.folder} and cache the soft labels again")
            self._open[number] = (fh, small)
        return self._open[number]

    def row(self, i: int) -> Any:
        """The teacher's sparse targets at example ``i``'s answer positions (SparseTargets)."""
        import torch

        from edgepack.distill.losses import SparseTargets

        if not 0 <= i < len(self):
            raise IndexError(f"soft-label row {i} out of range (the store holds {len(self)})")
        number = bisect.bisect_right(self._starts, i) - 1
        fh, small = self._shard(number)
        local = i - self._starts[number]
        p0, p1 = (int(x) for x in small["row_offsets"][local:local + 2])
        out: dict[str, Any] = {
            "topk_ids": fh.get_slice("topk_ids")[p0:p1].long(),
            "topk_logprobs": fh.get_slice("topk_logprobs")[p0:p1].float(),
            "tail_logmass": fh.get_slice("tail_logmass")[p0:p1].float(),
            "tokens": fh.get_slice("tokens")[p0:p1].long(),
        }
        if "sample_offsets" in small:
            offsets = small["sample_offsets"][p0:p1 + 1]
            q0, q1 = int(offsets[0]), int(offsets[-1])
            lengths = offsets[1:] - offsets[:-1]
            width = int(lengths.max()) if lengths.numel() else 0
            # Row-major boolean assignment fills each position's slots left to right, in file order.
            filled = torch.arange(width)[None, :] < lengths[:, None]
            ids = torch.zeros(p1 - p0, width, dtype=torch.long)
            lps = torch.zeros(p1 - p0, width)
            weights = torch.zeros(p1 - p0, width)
            ids[filled] = fh.get_slice("sample_ids")[q0:q1].long()
            lps[filled] = fh.get_slice("sample_logprobs")[q0:q1].float()
            weights[filled] = fh.get_slice("sample_counts")[q0:q1].float() / self.samples
            out.update(sample_ids=ids, sample_logprobs=lps, sample_weights=weights)
        return SparseTargets(**out)

    def targets(self, indices: Sequence[int], examples: Sequence[Any] | None = None) -> Any:
        """Targets for rows ``indices``, concatenated in order: row-aligned with
        ``hidden[collate(...).predicts]`` over ``[examples[i] for i in indices]``.

        With ``examples`` (the Examples of those rows), each row's stored answer tokens are
        checked against them, so a store cached from other data can never be silently misaligned.
        """
        from edgepack.distill.losses import SparseTargets

        parts = [self.row(i) for i in indices]
        if examples is not None:
            if len(examples) != len(parts):
                raise ValueError(f"{len(examples)} examples for {len(parts)} rows")
            for i, e, p in zip(indices, examples, parts):
                if p.tokens.tolist() != list(e.student_ids[e.student_prompt:]):
                    raise RunDirError(f"soft-label row {i} does not match training example {i}'s answer tokens",
                                      hint=f"the data or max_length changed since caching; delete {self.folder} "
                                           "and cache again")
        return SparseTargets.cat(parts)


def open_soft_labels(run_dir: Path, *, max_length: int | None = None, verify: bool = True) -> SoftLabels:
    """The run's soft-label store, checked against the run's teacher and tokenizer."""
    run_dir = Path(run_dir)
    teacher_dir = _teacher_dir(run_dir)
    return SoftLabels(run_dir / SOFTLABELS_DIR, teacher_sha256=teacher_sha256(teacher_dir),
                      tokenizer_sha256=tokenizer_identity(teacher_dir), max_length=max_length, verify=verify)
