"""Per-token logprobs in OpenAI's two shapes, from the backend's :class:`TokenLogprob` records.

- completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  parallel lists; ``top_logprobs`` is a ``{token text: logprob}`` map per position (texts that
  decode alike collapse into one key, as in OpenAI's own shape), None where the logprob is None
  (a prompt's first token under ``echo``);
- chat (``logprobs: true, top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.

A token's text is its bytes decoded as UTF-8 with replacement: a token holding part of a
character shows U+FFFD, and its ``bytes`` (chat) keep the exact value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgepack.runtime.backends.base import Backend, TokenLogprob


def token_text(backend: Backend, token: int) -> str:
    return backend.token_bytes(token).decode("utf-8", "replace")


def completion_logprobs(backend: Backend, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The completions ``logprobs`` object; ``text_offset`` counts characters of the choice's text."""
    tokens, offsets, offset = [], [], 0
    for entry in entries:
        text = token_text(backend, entry.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [None if e.logprob is None else {token_text(backend, t): lp for t, lp in e.top} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(backend: Backend, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object."""
    def one(token: int, logprob: float | None) -> dict[str, Any]:
        raw = backend.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                        for e in entries], "refusal": None}
