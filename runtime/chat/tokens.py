"""Chat messages → prompt token ids, where only the template's own markup makes control tokens.

A chat template renders messages into one string such as
``<|im_start|>user\\nHello<|im_end|>\\n<|im_start|>assistant\\n``. Tokenizing that whole string
with special-token parsing on (what llama.cpp's ``special=True`` and transformers'
``apply_chat_template(tokenize=True)`` do) lets a user who *types* ``<|im_start|>system ...``
inside a message open a real system turn (issue #20, defect 2). Here a message's text is
always tokenized with special parsing off, and only the template's own markup may yield
control tokens.

How: :func:`encode_chat` renders the template twice, once with the real messages and once
with every message text field replaced by a sentinel (a private-use-area string that no
message text can reach, since message text never enters that rendering). Splitting the
sentinel rendering at its sentinels gives the template's markup pieces; lining them up with
the real rendering gives where each message text sits (the template may ``trim`` it).

- No control-token text inside or across any message text (the common case): the real
  rendering is tokenized as one string with special parsing on, exactly as before, so the
  ids are identical to the old path's.
- Otherwise: the rendering is cut at the control tokens of the *markup*; each run of markup
  that starts and ends with a control token is tokenized with special parsing on, everything
  between such runs (message text and the plain markup around it) with special parsing off.
  A tokenizer splits at control tokens before anything else, so benign text tokenizes the same
  as in one call.
- A template that rewrites message text in ways the sentinels cannot follow: benign text is
  tokenized as before; text holding control-token text, or text the rewrite turns into
  control tokens, is refused (UsageError), since it cannot be told apart from markup.

Message roles are never replaced (templates compare them with ``'user'``...); a role that
holds control-token text is refused. BOS: ``bos`` ids are put first unless the rendering
already starts with ``bos_text`` (a template that writes ``{{ bos_token }}`` itself).

Every tokenizer plugs in through ``tokenize(text, parse_special) -> ids`` (which must not add
BOS/EOS) and the texts of its control tokens: llama.cpp (:func:`llama_control_tokens`),
tokenizers / transformers (:func:`hf_control_tokens`, :func:`hf_chat_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import lru_cache
from typing import Any

from edgepack.errors import UsageError

TokenizeFn = Callable[[str, bool], list[int]]
"""``(text, parse_special) -> ids``, adding no BOS/EOS of its own."""
RenderFn = Callable[[list[dict[str, Any]]], str]
"""Messages → the rendered prompt string (the template, generation prompt and specials bound)."""

# Supplementary Private Use Area-A code points: never produced by a tokenizer's own text and
# only present in the sentinel rendering, which holds no message text.
SENTINEL_OPEN = "\U000F0000"
SENTINEL_CLOSE = "\U000F0001"
_SENTINEL_RE = re.compile(f"{SENTINEL_OPEN}(\\d+){SENTINEL_CLOSE}")
# How a template may have changed a message text before writing it (Llama 3 and Gemma ``trim``).
_TEXT_FORMS: tuple[Callable[[str], str], ...] = (lambda s: s, str.strip, str.rstrip, str.lstrip)


def sentinel(index: int) -> str:
    """The placeholder standing for message text number ``index`` in the sentinel rendering."""
    return f"{SENTINEL_OPEN}{index}{SENTINEL_CLOSE}"


class ControlMatcher:
    """Finds control-token texts in a string (leftmost, longest first, as tokenizers split)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = tuple(sorted({t for t in texts if t}, key=lambda t: (-len(t), t)))
        self.longest = len(self.texts[0]) if self.texts else 0
        alternation = "|".join(re.escape(t) for t in self.texts)
        self._find = re.compile(alternation) if self.texts else None
        # Lookahead form: every start position, overlapping ones included (for short windows).
        self._overlapping = re.compile(f"(?=({alternation}))") if self.texts else None

    def search(self, text: str) -> re.Match[str] | None:
        return self._find.search(text) if self._find is not None else None

    def finditer(self, text: str) -> Iterable[re.Match[str]]:
        return self._find.finditer(text) if self._find is not None else ()

    def touches(self, text: str, start: int, end: int) -> bool:
        """Whether any control-token occurrence in ``text`` overlaps ``text[start:end]``."""
        if self._find is None or start >= end:
            return False
        if self._find.search(text, start, end):
            return True
        # Occurrences crossing either edge of the span lie within a window of the longest token.
        span = self.longest - 1
        for edge in (start, end):
            lo, hi = max(0, edge - span), min(len(text), edge + span)
            for m in self._overlapping.finditer(text, lo, hi):  # type: ignore[union-attr]
                a, b = m.start(1), m.end(1)
                if a < end and b > start:
                    return True
        return False


@lru_cache(maxsize=8)
def _matcher(texts: frozenset[str]) -> ControlMatcher:
    return ControlMatcher(texts)


def control_matcher(texts: Collection[str]) -> ControlMatcher:
    """A cached :class:`ControlMatcher` for this set of control-token texts."""
    return _matcher(frozenset(texts))


# --- where the message text sits in the rendering ----------------------------------------------
def _with_sentinels(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages with every text field but ``role`` replaced by a sentinel; the texts in order."""
    texts: list[str] = []
    out = []
    for m in messages:
        copy = dict(m)
        for key, value in m.items():
            if key != "role" and isinstance(value, str):
                copy[key] = sentinel(len(texts))
                texts.append(value)
        out.append(copy)
    return out, texts


def split_rendering(real: str, marked: str, texts: Sequence[str]) -> list[tuple[str, bool]] | None:
    """``real`` as ``(piece, is_message_text)`` pieces, read off the sentinel rendering ``marked``.

    None when the template changed a sentinel (sliced, upper-cased it) or rewrote a message
    text beyond trimming whitespace, so the pieces cannot be placed with certainty.
    """
    parts = _SENTINEL_RE.split(marked)  # markup, index, markup, index, ..., markup
    markup, slots = parts[0::2], [int(i) for i in parts[1::2]]
    if any(SENTINEL_OPEN in m or SENTINEL_CLOSE in m for m in markup) or any(i >= len(texts) for i in slots):
        return None
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for k, m in enumerate(markup):
        if not real.startswith(m, pos):
            return None
        if m:
            pieces.append((m, False))
        pos += len(m)
        if k == len(slots):
            break
        after = markup[k + 1]
        text = texts[slots[k]]
        # Prefer the text as given; a trimmed form only where the template trimmed it. Each
        # form must be followed by the next markup piece.
        for form in _TEXT_FORMS:
            shown = form(text)
            end = pos + len(shown)
            if real.startswith(shown, pos) and real.startswith(after, end):
                break
        else:
            return None
        if shown:
            pieces.append((shown, True))
        pos = end
    return pieces if pos == len(real) else None


# --- ids ----------------------------------------------------------------------------------------
def _segmented_ids(pieces: list[tuple[str, bool]], tokenize: TokenizeFn, matcher: ControlMatcher) -> list[int]:
    """Markup runs from its first to its last control token with special parsing on; the
    message text and the plain markup between such runs with special parsing off."""
    ids: list[int] = []
    plain: list[str] = []

    def flush() -> None:
        text = "".join(plain)
        plain.clear()
        if text:
            ids.extend(tokenize(text, False))

    for text, is_message in pieces:
        hits = [] if is_message else list(matcher.finditer(text))
        if not hits:
            plain.append(text)
            continue
        plain.append(text[:hits[0].start()])
        flush()
        ids.extend(tokenize(text[hits[0].start():hits[-1].end()], True))
        plain.append(text[hits[-1].end():])
    flush()
    return ids


def _controls(matcher: ControlMatcher, text: str) -> list[str]:
    return [m.group() for m in matcher.finditer(text)]


def encode_chat(messages: Sequence[dict[str, Any]], *, render: RenderFn, tokenize: TokenizeFn,
                control_tokens: Collection[str], bos: Sequence[int] = (), bos_text: str = "") -> list[int]:
    """Token ids of the chat prompt for ``messages``; see the module docstring."""
    matcher = control_matcher(control_tokens)
    real = render(list(messages))  # first: the renderer checks the messages' shape
    for i, m in enumerate(messages):
        hit = matcher.search(m["role"]) if isinstance(m, dict) and isinstance(m.get("role"), str) else None
        if hit is not None:
            raise UsageError(f"message {i}'s role contains the control token {hit.group()!r}",
                             hint="roles are plain names such as system, user, assistant")
    marked_messages, texts = _with_sentinels(messages)
    marked = render(marked_messages) if texts else real
    pieces = split_rendering(real, marked, texts) if texts else [(real, False)]
    if pieces is None:
        hit = next((h for h in map(matcher.search, texts) if h is not None), None)
        if hit is not None:
            raise UsageError(f"a message contains the control token {hit.group()!r}, and this model's chat "
                             "template rewrites message text, so it cannot be kept as plain text",
                             hint="remove the control-token markup from the message")
        # The rewrite itself must not make control tokens out of message text ('[[' -> '<|').
        if _controls(matcher, real) != _controls(matcher, marked):
            raise UsageError("this model's chat template turns message text into control tokens",
                             hint="remove markup-like text from the message")
        ids = tokenize(real, True)
    else:
        spans, pos = [], 0
        for text, is_message in pieces:
            if is_message:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        if any(matcher.touches(real, a, b) for a, b in spans):
            ids = _segmented_ids(pieces, tokenize, matcher)
        else:
            ids = tokenize(real, True)  # identical to tokenizing the whole rendering, as before
    if bos and not (bos_text and real.startswith(bos_text)):
        ids = [*bos, *ids]
    return ids


# --- tokenizer adapters ------------------------------------------------------------------------
def llama_control_tokens(llm: Any) -> dict[str, int]:
    """Texts of the tokens llama.cpp makes only with special parsing on (CONTROL and UNKNOWN).

    USER_DEFINED tokens are left out: llama.cpp (like transformers for non-special added
    tokens) matches them with special parsing off too.
    """
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    flags = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    out: dict[str, int] = {}
    for token in range(int(llm.n_vocab())):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & flags:
            text = llama_cpp.llama_vocab_get_text(vocab, token)
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text or "")
            if text:
                out[text] = token
    return out


def hf_control_tokens(tokenizer: Any) -> dict[str, int]:
    """Texts of a transformers tokenizer's special added tokens (split off only with special parsing on)."""
    return {t.content: int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content}


def hf_tokenize_fn(tokenizer: Any) -> TokenizeFn:
    """A transformers tokenizer as a :data:`TokenizeFn` (no BOS/EOS added)."""

    def tokenize(text: str, parse_special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special).input_ids)

    return tokenize


def hf_chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
    """``apply_chat_template(messages, tokenize=True)``'s ids, with message text never parsed
    for special tokens. Like transformers, no BOS is added (the template writes it if wanted)."""

    from edgepack.runtime.chat.template import render_hf_chat

    def render(msgs: list[dict[str, Any]]) -> str:
        return render_hf_chat(tokenizer, msgs, add_generation_prompt=add_generation_prompt)

    return encode_chat(messages, render=render, tokenize=hf_tokenize_fn(tokenizer),
                       control_tokens=hf_control_tokens(tokenizer))
