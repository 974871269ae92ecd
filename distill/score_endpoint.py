"""The endpoint teacher as a scorer of given tokens, for on-policy distillation.

On-policy distillation (GKD) trains on completions the student sampled, so the teacher must
score tokens it did not choose: the distribution it would have had at each position. An
OpenAI-compatible endpoint does that with a completions request that echoes the prompt:
``POST URL/completions`` with the whole sequence as the token id list ``prompt``, ``echo:
true``, ``logprobs: k`` and ``max_tokens: 0`` (``1`` for a server that refuses 0; the generated
token is ignored). The sequence is the example's ``teacher_ids``: the teacher's prompt (the
student's, plus any teacher-only context turns, as when the data was made), then the sampled
answer, whose tokens are the student's. Two answer shapes are read:

- vLLM's ``choices[0].prompt_logprobs``: per position ``{"<token id>": {"logprob", "rank",
  "decoded_token"}}`` holding the top-k and the prompt token itself, the first position null —
  ids, so nothing is mapped by text;
- OpenAI's completions ``choices[0].logprobs`` (``edgepack serve``, vLLM, others): parallel
  lists ``tokens``, ``token_logprobs`` and ``top_logprobs`` (``{token text: logprob}`` maps);
  texts are mapped onto student ids as for endpoint answers (endpoint_targets.py: a text maps to
  the one student token that decodes to it, other texts' mass joins the tail; ``edgepack
  serve`` prints control tokens such as end-of-turn as "", so as alternatives they join the tail).

On-policy with an endpoint assumes the endpoint's model uses the student's tokenizer. Every
row is checked: each returned token must decode to the student's token at that position
(control tokens excepted: servers print them as "" or by name). A row that does not is masked
whole and counted, never used misaligned. :meth:`EndpointScorer.probe` asks once before
training: an endpoint that refuses echo, logprobs or token-id prompts, answers without prompt
logprobs, or whose tokens do not align, is refused with a UsageError — never downgraded.

Requests go through the endpoint teacher's HTTP plumbing (endpoint.py's EndpointClient: key
from the environment, no redirects, total deadline, retries with backoff, size cap), up to
``concurrency`` at once. Scores are log-probabilities at temperature 1 (vLLM's and llama.cpp's
logprobs are taken before any sampling temperature), the form losses.SparseTargets holds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from edgepack.distill.endpoint import (
    MAX_TOP_LOGPROBS,
    BadAnswer,
    EndpointClient,
    EndpointConfig,
    RefusalTest,
    Refused,
    response_cap,
    token_logprob,
)
from edgepack.distill.endpoint_targets import Row, sparse_row, sparse_targets, unique_pieces
from edgepack.errors import TeacherEndpointError, UsageError

if TYPE_CHECKING:
    import torch

    from edgepack.distill.batching import Example
    from edgepack.distill.losses import SparseTargets
    from edgepack.distill.teachers import TeacherSource

SCORE_HINT = "serve the teacher with vLLM or `edgepack serve`, or drop --on-policy"
_CANNOT_SCORE = (400, 404, 405, 422)
"""Answers to the probe that mean the endpoint cannot score this way (not a passing fault)."""

# One position of an answer: (the token's text or None, its logprob or None, the alternatives
# as (student id or None, logprob)).
_Position = tuple["str | None", "float | None", list[tuple["int | None", float]]]


class _NoScores(Exception):
    """Internal: an answer without prompt logprobs (the message says what is missing)."""


class EndpointScorer:
    """Scores given tokens with an ``openai:URL#MODEL`` teacher; see the module docstring."""

    kind = "endpoint"

    def __init__(self, source: TeacherSource, tokenizer: Any, *, k: int = MAX_TOP_LOGPROBS,
                 config: EndpointConfig | None = None) -> None:
        if source.url is None or source.model is None:
            raise UsageError(f"teacher {source.spec!r} is not an endpoint")
        if not 1 <= k <= MAX_TOP_LOGPROBS:
            raise UsageError(f"the endpoint scorer's k must be from 1 to {MAX_TOP_LOGPROBS} (got {k})")
        self.source, self.k = source, k
        self.config = config or EndpointConfig()
        self.config.check()
        self.url = f"{source.url}/completions"
        self.client = EndpointClient(self.url, source.model, self.config, too_large_hint=(
            "scoring a sequence returns a few KB per token; check that the URL is the API base of a "
            "completions server (e.g. http://host:8000/v1)"))
        self._tokenizer = tokenizer
        self._vocab = len(tokenizer)
        self._special = frozenset(tokenizer.all_special_ids)
        self._piece_to_id = unique_pieces(tokenizer)
        self._texts: dict[int, tuple[str, ...]] = {}
        self._max_tokens = 0  # 1 once a server refused 0
        self._lock = threading.Lock()
        self.stats = {"rows_scored": 0, "rows_unaligned": 0, "positions": 0, "positions_masked": 0}
        self.first_unaligned: str | None = None

    # --- public -------------------------------------------------------------------------

    def probe(self, example: Example) -> None:
        """Score ``example`` once; an endpoint that cannot score given tokens is a UsageError."""
        ids = list(example.teacher_ids)

        def cannot(what: str) -> UsageError:
            return UsageError(f"teacher endpoint {self.url} cannot score given tokens for on-policy "
                              f"distillation: {what}", hint=SCORE_HINT)

        named: list[str] = []

        def refused(status: int, message: str, param: str | None) -> bool:
            named.append(f"{param} {message}")
            return status in _CANNOT_SCORE

        try:
            answer = self._ask(ids, refused=refused)
        except Refused as exc:
            if self._max_tokens == 0 and "max_tokens" in named[-1]:
                self._max_tokens = 1  # a server that generates at least one token; that one is ignored
                return self.probe(example)
            raise cannot(f"a completions request with echo, logprobs and a token-id prompt was refused "
                         f"({exc})") from None
        try:
            positions = self._positions(answer, ids)
        except _NoScores as exc:
            raise cannot(str(exc)) from None
        except BadAnswer as exc:
            raise cannot(f"its prompt logprobs are invalid ({exc})") from None
        mismatch = self._mismatch(ids, positions)
        if mismatch is not None:
            raise cannot(f"the tokens it returned do not decode to the student's tokens ({mismatch}); its model "
                         "must use the student's tokenizer")

    def targets(self, indices: Sequence[int], examples: Sequence[Example]) -> tuple[SparseTargets, torch.Tensor]:
        """(SparseTargets, mask [N]) for the answer positions of ``examples``, in the order of
        ``batching.collate(...).targets``: the endpoint's top-k as student ids and the tail
        log-mass; mask 0 where there is no usable distribution (a row whose returned tokens do
        not decode to the student's is masked whole and counted). ``indices`` (the examples'
        places in the training set) are not needed: every call asks the endpoint afresh."""
        if not examples:
            return sparse_targets([], [], self.k + 1)
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(examples)),
                                thread_name_prefix="scorer") as pool:
            futures = [pool.submit(self._fetch, ex) for ex in examples]
            try:
                answers = [f.result() for f in futures]
            except BaseException:
                for f in futures:  # no new request starts; those in flight finish within their deadline
                    f.cancel()
                raise
        # Aligned here, in the calling thread: the tokenizer is not shared between threads.
        rows = [self._rows(ex, positions) for ex, positions in zip(examples, answers)]
        positions = sum(ex.answer_tokens for ex in examples)
        sparse, mask = sparse_targets(examples, rows, self.k + 1)  # k alternatives and the token itself
        with self._lock:
            self.stats["rows_scored"] += len(examples)
            self.stats["rows_unaligned"] += sum(r is None for r in rows)
            self.stats["positions"] += positions
            self.stats["positions_masked"] += positions - int(mask.sum().item())
        return sparse, mask

    def describe(self) -> dict[str, Any]:
        """Settings and counters for the training report (the key's variable name, never its value)."""
        with self._lock:
            stats = dict(self.stats)
            unaligned = self.first_unaligned
        return {"kind": self.kind, "url": self.url, "model": self.source.model, "k": self.k, **stats,
                "first_unaligned": unaligned, "max_tokens": self._max_tokens,
                "api_key_sent": self.client.key_sent, **self.client.counters(),
                "concurrency": self.config.concurrency, "timeout_s": self.config.timeout_s}

    # --- one row ------------------------------------------------------------------------

    def _ask(self, ids: list[int], refused: RefusalTest | None = None) -> dict[str, Any]:
        body = {"model": self.source.model, "prompt": ids, "echo": True, "logprobs": self.k,
                "max_tokens": self._max_tokens, "temperature": 0, "stream": False}
        return self.client.post(body, cap=response_cap(len(ids) + 1), cap_for=f"{len(ids)} scored tokens",
                                refused=refused)

    def _fetch(self, ex: Example) -> list[_Position]:
        """The endpoint's scores for every token of ``ex.teacher_ids`` (run in the pool's threads)."""
        ids = list(ex.teacher_ids)
        try:
            return self._positions(self._ask(ids), ids)
        except (_NoScores, BadAnswer) as exc:
            # The probe found prompt logprobs; an answer now without them or with invalid ones is
            # the endpoint failing, not this row.
            raise TeacherEndpointError(f"teacher endpoint {self.url}: the scoring answer is unusable ({exc})",
                                       hint=SCORE_HINT) from None

    def _rows(self, ex: Example, positions: list[_Position]) -> list[Row | None] | None:
        """The rows of ``ex``'s answer positions, or None when its tokens do not align."""
        mismatch = self._mismatch(ex.teacher_ids, positions)
        if mismatch is not None:
            with self._lock:
                self.first_unaligned = self.first_unaligned or mismatch
            return None
        # The teacher's answer tokens are the student's (batching.Example): position for position.
        answer = zip(ex.teacher_ids[ex.teacher_prompt:], positions[ex.teacher_prompt:])
        return [None if logprob is None else sparse_row(token, logprob, alternatives)
                for token, (_, logprob, alternatives) in answer]

    def _positions(self, answer: dict[str, Any], ids: list[int]) -> list[_Position]:
        """One entry per token of ``ids`` (what a server generated past them is ignored)."""
        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise _NoScores("its answer has no completion choice (choices[0])")
        if isinstance(choice.get("prompt_logprobs"), list):
            return self._id_positions(choice["prompt_logprobs"], ids)
        return self._text_positions(choice.get("logprobs"), ids)

    def _id_positions(self, entries: list[Any], ids: list[int]) -> list[_Position]:
        """vLLM's ``prompt_logprobs``: ``{"<id>": {"logprob", "decoded_token"}}`` per position."""
        if len(entries) < len(ids):
            raise _NoScores(f"prompt_logprobs for {len(entries)} of the {len(ids)} tokens sent")
        out: list[_Position] = [(None, None, [])]
        for j in range(1, len(ids)):
            entry = entries[j]
            if not isinstance(entry, dict) or len(entry) > 2 * (self.k + 1):
                raise BadAnswer(f"prompt_logprobs of token {j} is not a map of at most {self.k + 1} tokens")
            alternatives: list[tuple[int | None, float]] = []
            chosen: tuple[str | None, float] | None = None
            for key, item in entry.items():
                if not isinstance(item, dict):
                    raise BadAnswer(f"prompt_logprobs of token {j}: an entry is not an object")
                text = item.get("decoded_token")
                _, lp = token_logprob({"token": text if isinstance(text, str) else "",
                                       "logprob": item.get("logprob")}, j)
                i = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 10 else None
                if i is not None and i >= self._vocab:
                    i = None  # not a student token: its mass joins the tail
                if i == ids[j]:
                    chosen = (text if isinstance(text, str) else None, lp)
                alternatives.append((i, lp))
            if chosen is None:
                raise BadAnswer(f"prompt_logprobs of token {j} does not hold the token sent ({ids[j]})")
            alternatives.sort(key=lambda a: -a[1])
            out.append((chosen[0], chosen[1], alternatives[:self.k]))
        return out

    def _text_positions(self, obj: Any, ids: list[int]) -> list[_Position]:
        """The completions ``logprobs`` object: parallel ``tokens``/``token_logprobs``/``top_logprobs``."""
        if not isinstance(obj, dict):
            raise _NoScores("its answer has no logprobs (it ignored echo with logprobs)")
        tokens, chosen, top = obj.get("tokens"), obj.get("token_logprobs"), obj.get("top_logprobs")
        if not all(isinstance(x, list) for x in (tokens, chosen, top)):
            raise _NoScores("its logprobs lack the tokens/token_logprobs/top_logprobs lists")
        if min(len(tokens), len(chosen), len(top)) < len(ids):
            raise _NoScores(f"logprobs for {min(len(tokens), len(chosen), len(top))} tokens, not for the "
                            f"{len(ids)} prompt tokens sent (it did not echo the prompt's logprobs)")
        out: list[_Position] = []
        for j in range(len(ids)):
            text = tokens[j]
            if not isinstance(text, str):
                raise BadAnswer(f"logprobs of token {j}: the token is not text")
            if chosen[j] is None:
                out.append((text, None, []))  # the first token: nothing before it to predict it
                continue
            _, lp = token_logprob({"token": text, "logprob": chosen[j]}, j)
            alts = top[j]
            if not isinstance(alts, dict) or len(alts) > 2 * (self.k + 1):
                raise BadAnswer(f"logprobs of token {j}: top_logprobs is not a map of at most {self.k + 1} tokens")
            pairs = [token_logprob({"token": t, "logprob": v}, j) for t, v in alts.items()]
            pairs.sort(key=lambda a: -a[1])
            out.append((text, lp, [(self._piece_to_id.get(t), v) for t, v in pairs[:self.k]]))
        return out

    # --- alignment ----------------------------------------------------------------------

    def _mismatch(self, ids: list[int], positions: list[_Position]) -> str | None:
        """Where the returned tokens first differ from the student's, or None when they align."""
        for j, (token, (text, _, _)) in enumerate(zip(ids, positions)):
            if text is None or token in self._special:
                continue
            expected = self._student_texts(token, text)
            if text not in expected:
                return f"token {j}: the endpoint has {text[:40]!r} where the student has {expected[0][:40]!r}"
        return None

    def _student_texts(self, token: int, text: str) -> tuple[str, ...]:
        """What a server may print for the student's ``token``: its decoded text; its piece with
        SentencePiece's ``▁`` as a space (llama.cpp, and vLLM decoding in context, keep the
        leading space a lone decode drops); for a token holding part of a UTF-8 character, any
        text with U+FFFD or nothing (servers differ in how they show partial characters)."""
        texts = self._texts.get(token)
        if texts is None:
            decoded = self._tokenizer.decode([token])
            piece = self._tokenizer.convert_ids_to_tokens(token)
            spaced = piece.replace("\u2581", " ") if isinstance(piece, str) and "\u2581" in piece else None
            texts = (decoded,) if spaced is None else (decoded, spaced)
            self._texts[token] = texts
        if "\ufffd" in texts[0] and (text == "" or "\ufffd" in text):
            return (*texts, text)
        return texts
