"""From data/train.jsonl rows to the tensors one KD step needs.

Each row becomes an :class:`Example`: the student's token ids (chat-templated prompt, then
the teacher's answer and EOS; message and answer text never parsed for control tokens) and the teacher's ids (the same, with the teacher-only context
turns inside the prompt). Both end in the same answer tokens, so the answer positions line
up one to one; loss is taken only there. The order of examples is a pure function of
(seed, step), which makes the step number the data cursor for resuming.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from edgepack.distill.data import with_teacher_context


@contextmanager
def deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch and turn on deterministic algorithms for a training recipe; restore the
    caller's setting afterwards (same seed → bit-identical weights on CPU)."""
    before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN by default, a guard against
    # reading memory no op wrote (~8% of a CPU training step, bench/trl). The kernels used
    # here write what they allocate; the bit-identical resume test holds without the fill.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before


@dataclass(frozen=True)
class Example:
    """One tokenized training row."""

    student_ids: list[int]
    student_prompt: int
    """Number of prompt tokens in ``student_ids`` (answer tokens follow)."""
    teacher_ids: list[int]
    teacher_prompt: int
    row: int = -1
    """Index of the row in the list given to :func:`tokenize_rows` (rows that are too long are skipped)."""

    @property
    def answer_tokens(self) -> int:
        return len(self.student_ids) - self.student_prompt


def _template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    # The runtime's ids for the same chat: message text never becomes control tokens.
    from edgepack.runtime.chat.tokens import hf_chat_ids

    return hf_chat_ids(tokenizer, messages)


def tokenize_rows(tokenizer: Any, rows: list[dict[str, Any]], context: list[dict[str, str]],
                  max_length: int) -> tuple[list[Example], int]:
    """Examples for ``rows``; rows whose student sequence exceeds ``max_length`` are skipped (counted)."""
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    too_long = 0
    for i, row in enumerate(rows):
        # The answer is text too: a typed "<|im_end|>" in it is not the end-of-turn token.
        answer = tokenizer(row["response"], add_special_tokens=False, split_special_tokens=True).input_ids + [eos]
        s_prompt = _template_ids(tokenizer, row["messages"])
        t_prompt = _template_ids(tokenizer, with_teacher_context(row["messages"], context)) if context else s_prompt
        if len(s_prompt) + len(answer) > max_length:
            too_long += 1
            continue
        out.append(Example(s_prompt + answer, len(s_prompt), t_prompt + answer, len(t_prompt), i))
    return out, too_long


def batch_indices(n_examples: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Example indices for optimizer step ``step``: seeded per-epoch shuffles, consumed in order."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n_examples)
        order = list(range(n_examples))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(order[offset])
    return out


@dataclass
class Batch:
    """Right-padded ids, attention mask, and a mask of positions that predict answer tokens."""

    ids: torch.Tensor
    attention: torch.Tensor
    predicts: torch.Tensor
    """Bool [B, S]: position t predicts answer token ids[t + 1]."""
    targets: torch.Tensor
    """The answer tokens, flattened in the order of ``predicts.nonzero()``."""


def collate(seqs: list[list[int]], prompt_lens: list[int], pad_id: int, offset: int = 0) -> Batch:
    """Pad ``seqs`` (each with ``offset`` leading tokens already removed) into a Batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    predicts = torch.zeros((len(seqs), width), dtype=torch.bool)
    targets = []
    for i, (s, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        first = n_prompt - offset - 1
        predicts[i, first:len(s) - 1] = True
        targets += s[first + 1:]
    return Batch(ids, attention, predicts, torch.tensor(targets, dtype=torch.long))


def common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


MIN_PREFIX_TOKENS = 16
"""A shared prefix shorter than this is not worth a separate forward pass."""


def shared_prefix_len(seqs: list[list[int]], prompt_lens: list[int]) -> int:
    """Tokens every sequence starts with (system prompt, demonstrations), 0 below MIN_PREFIX_TOKENS.

    At least one prompt token stays outside the prefix: the position before the first answer
    token predicts it, so it must be computed with the rest of the batch."""
    n = min(common_prefix_len(seqs), min(prompt_lens) - 1)
    return n if n >= MIN_PREFIX_TOKENS else 0


def answer_hidden(decoder: Any, seqs: list[list[int]], prompt_lens: list[int], pad_id: int,
                  prefix_len: int = 0, prefix_cache: Any = None) -> tuple[torch.Tensor, Batch]:
    """``decoder``'s last hidden states [N, H] at the answer-predicting positions of ``seqs``, in
    the order of ``collate(...).targets``, and the batch (targets, token counts).

    With ``prefix_len``, the first ``prefix_len`` tokens (the same in every sequence) run once,
    as a batch of one, and the rest of each sequence attends to their KV cache: the same result
    as the full batch, without computing the shared prompt once per row. ``prefix_cache`` is that
    cache when it is already known (a frozen teacher's, see TeacherPrefix); otherwise it is
    computed here, inside autograd, so a trained model's gradients flow through the prefix too.
    (Not with gradient checkpointing: transformers drops ``past_key_values`` in checkpointed layers.)
    """
    if not prefix_len:
        batch = collate(seqs, prompt_lens, pad_id)
        hidden = decoder(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False).last_hidden_state
        return hidden[batch.predicts], batch
    if prefix_cache is None:
        from transformers import DynamicCache

        # An explicit cache: Gemma 3 makes none by itself in training mode.
        cache = decoder(input_ids=torch.tensor([seqs[0][:prefix_len]]), use_cache=True,
                        past_key_values=DynamicCache(config=decoder.config)).past_key_values
    else:
        cache = copy.deepcopy(prefix_cache)  # extended in place by the forward below
    cache.batch_repeat_interleave(len(seqs))
    batch = collate([s[prefix_len:] for s in seqs], prompt_lens, pad_id, offset=prefix_len)
    attention = torch.cat([torch.ones(len(seqs), prefix_len, dtype=torch.long), batch.attention], dim=1)
    hidden = decoder(input_ids=batch.ids, attention_mask=attention, past_key_values=cache,
                     use_cache=True).last_hidden_state
    return hidden[batch.predicts], batch


class TeacherPrefix:
    """The teacher's KV cache for the prompt prefix every example shares (system prompt,
    demonstrations), computed once: per step the teacher only runs on the rest."""

    MIN_TOKENS = MIN_PREFIX_TOKENS

    def __init__(self, teacher: Any, examples: list[Example]) -> None:
        self.length = shared_prefix_len([e.teacher_ids for e in examples], [e.teacher_prompt for e in examples])
        self.cache = None
        if self.length:
            ids = torch.tensor([examples[0].teacher_ids[: self.length]])
            with torch.no_grad():
                out = teacher(input_ids=ids, use_cache=True)
            self.cache = out.past_key_values

    def logits(self, teacher: Any, examples: list[Example], pad_id: int) -> torch.Tensor:
        """Teacher logits [N, V] at the answer-predicting positions of ``examples``."""
        with torch.no_grad():
            hidden, _ = answer_hidden(teacher.get_decoder(), [e.teacher_ids for e in examples],
                                      [e.teacher_prompt for e in examples], pad_id, self.length, self.cache)
            return teacher.get_output_embeddings()(hidden)
