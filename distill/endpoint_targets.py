"""An endpoint teacher's top-k logprobs as sparse KD targets on the student's vocabulary.

An OpenAI-compatible endpoint returns, per generated token, the token as text and its top-k
alternatives as text with their logprobs (``teacher_logprobs`` / ``teacher_top_logprobs`` in
``data/train.jsonl``). Token text is not a token id, so each row is aligned before it is used:

1. the student's tokenization of the answer (what training predicts, see batching.py) must
   decode token by token to exactly the endpoint's token texts; otherwise the row is
   *unaligned* (a different tokenizer, a stripped leading space…) and contributes only
   cross-entropy — counted in the report, never silently misaligned;
2. each alternative's text maps to the one student token that decodes to it; texts that no
   token or several tokens decode to are dropped, and their probability joins the tail bucket;
3. the tail is ``1 − Σ p(top-k)``, the mass the endpoint did not describe.

The final end-of-turn token has no endpoint distribution (it is not among the returned
tokens); that position is masked out of the KD term and learned from cross-entropy.
Targets are log-probabilities at temperature 1, like the soft-label cache, so the sparse
forward KL of losses.py applies unchanged. Rows with fewer mappable alternatives than others
are padded with a repeated id at logprob −inf, which forward KL ignores exactly.

:func:`sparse_row` (one position) and :func:`sparse_targets` (the tensors for a batch) are
shared with the endpoint scorer of on-policy distillation (score_endpoint.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from edgepack.distill.batching import Example

if TYPE_CHECKING:
    import torch

    from edgepack.distill.losses import SparseTargets

_MIN_TAIL = 1e-12

Row = tuple[list[int], list[float], float]
"""One answer position's distribution: student token ids, their logprobs, the tail mass 1 − Σp."""


class EndpointTargets:
    """Sparse targets for training examples built from endpoint logprobs (see module docstring)."""

    def __init__(self, tokenizer: Any, rows: list[dict[str, Any]], examples: list[Example]) -> None:
        self._piece_to_id = unique_pieces(tokenizer)
        self._decode = lambda i: tokenizer.decode([i])
        self.rows: dict[int, list[Row] | None] = {}
        self.k = 1
        aligned = positions = 0
        retained = 0.0
        for ex in examples:
            targets = self._align(rows[ex.row], ex)
            self.rows[ex.row] = targets
            if targets is not None:
                aligned += 1
                positions += len(targets)
                retained += sum(1.0 - tail for _, _, tail in targets)
                self.k = max([self.k, *(len(ids) for ids, _, _ in targets)])
        self.stats = {"rows": len(examples), "aligned_rows": aligned, "unaligned_rows": len(examples) - aligned,
                      "positions": positions, "k": self.k,
                      "mass_retained": round(retained / positions, 4) if positions else None}

    def _align(self, row: dict[str, Any], ex: Example) -> list[Row] | None:
        chosen, top = row.get("teacher_logprobs"), row.get("teacher_top_logprobs")
        answer = ex.student_ids[ex.student_prompt:-1]  # without the end-of-turn token
        if not chosen or not top or len(chosen) != len(answer) or len(top) != len(answer):
            return None
        if any(self._decode(i) != text for i, (text, _) in zip(answer, chosen)):
            return None
        return [sparse_row(token_id, lp, [(self._piece_to_id.get(text), alt_lp) for text, alt_lp in alts])
                for token_id, (_, lp), alts in zip(answer, chosen, top)]

    def targets(self, indices: Sequence[int], examples: Sequence[Example]) -> tuple[SparseTargets, torch.Tensor]:
        """(SparseTargets, mask) for the answer positions of ``examples``, in ``collate`` order."""
        # The end-of-turn position, last, has no row: sparse_targets masks it.
        return sparse_targets(examples, [self.rows.get(ex.row) for ex in examples], self.k)


def sparse_row(token_id: int, logprob: float, alternatives: Iterable[tuple[int | None, float]]) -> Row:
    """One position's row: the ``(id, logprob)`` alternatives that have an id (None: the text maps
    to no single student token; its mass joins the tail), then the chosen token itself if it is
    not among them; duplicates and non-finite logprobs are dropped, tiny positive ones clamped."""
    ids: list[int] = []
    lps: list[float] = []
    for i, lp in [*alternatives, (token_id, logprob)]:
        if i is not None and i not in ids and math.isfinite(lp):
            ids.append(i)
            lps.append(min(float(lp), 0.0))
    mass = sum(math.exp(v) for v in lps)
    return ids, lps, max(1.0 - mass, 0.0)


def sparse_targets(examples: Sequence[Example], rows: Sequence[Sequence[Row | None] | None],
                   width: int) -> tuple[SparseTargets, torch.Tensor]:
    """(SparseTargets, mask) for the answer positions of ``examples``, in ``collate`` order.

    ``rows[e][j]`` is the row of example ``e``'s ``j``-th answer token; a row that is None or
    missing (``rows[e]`` shorter than the answer, or None) is masked (mask 0; the token itself at
    logprob 0 fills it). Rows are padded to ``width`` (at least the widest row) with their first
    id at logprob −inf.
    """
    import torch

    from edgepack.distill.losses import SparseTargets

    ids_rows: list[list[int]] = []
    lp_rows: list[list[float]] = []
    tails: list[float] = []
    mask: list[float] = []
    for ex, targets in zip(examples, rows, strict=True):
        n = ex.answer_tokens
        per_pos = list(targets or [])[:n]
        per_pos += [None] * (n - len(per_pos))
        for t, token in zip(per_pos, ex.student_ids[ex.student_prompt:]):
            if t is None:
                ids, lps, tail = [token], [0.0], 0.0
                mask.append(0.0)
            else:
                ids, lps, tail = t
                mask.append(1.0)
            pad = width - len(ids)
            ids_rows.append(ids + [ids[0]] * pad)
            lp_rows.append(lps + [float("-inf")] * pad)
            tails.append(math.log(tail) if tail > _MIN_TAIL else float("-inf"))
    sparse = SparseTargets(topk_ids=torch.tensor(ids_rows, dtype=torch.long),
                           topk_logprobs=torch.tensor(lp_rows, dtype=torch.float32),
                           tail_logmass=torch.tensor(tails, dtype=torch.float32))
    return sparse, torch.tensor(mask)


def unique_pieces(tokenizer: Any) -> dict[str, int]:
    """Token text → id for every text exactly one token decodes to."""
    seen: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text in seen:
            ambiguous.add(text)
        else:
            seen[text] = i
    return {t: i for t, i in seen.items() if t not in ambiguous}
