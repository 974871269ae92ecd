"""Text for measuring and calibrating exported models: rows in, token ids out.

Both the fidelity report (:mod:`edgepack.export.fidelity.report`) and the importance matrix
(:mod:`edgepack.export.gguf.imatrix`) read chat rows the way the distill stage writes them
(``RUN/data/train.jsonl`` / ``holdout.jsonl``: ``{"messages": [...], "response": str|null}``)
and turn them into token ids with the reference model's own chat template, rendered in
edgepack's bounded sandbox as transformers' ``apply_chat_template`` would (same text); message text
is tokenized with special-token parsing off, so only the template's markup makes control tokens.

A row is one of:

* ``{"messages": [{"role", "content"}, ...], "response": str | null}`` (a distill row);
* ``{"prompt": str, "response" | "reference": str | null}`` (a prompts-file row);
* ``{"text": str}`` (raw text, tokenized as the model adds specials to plain text).

:data:`BUILTIN_ROWS` is the small prompt set used when a run has no holdout file, and
:data:`TOKENIZER_STRINGS` the fixed strings whose token ids must agree between the
reference tokenizer and every artifact's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import DataError, ModelSourceError


@dataclass(frozen=True)
class EvalRow:
    """One piece of held-out or calibration text."""

    id: str
    messages: tuple[tuple[str, str], ...] | None = None
    """Chat turns (role, content); ``None`` for a raw-text row."""
    response: str | None = None
    """The assistant answer appended for log-likelihood text (teacher's or reference)."""
    text: str | None = None
    """Raw text (used as-is, no chat template)."""

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


# Used when a run has no holdout: short chats across the kinds of text a small assistant
# meets (plain English, numbers and units, code, non-ASCII), each with an answer so the
# log-likelihood comparison covers assistant text, not only prompts.
BUILTIN_ROWS: tuple[EvalRow, ...] = (
    EvalRow("builtin-1", (("user", "Pump P-101 discharge pressure is low while the motor current is normal. "
                                   "What should I check first?"),),
            "Check the suction strainer and the suction valve first: a blocked inlet starves the pump "
            "while the motor still draws its normal current."),
    EvalRow("builtin-2", (("user", "Convert 3.5 bar to psi and explain the steps."),),
            "1 bar is about 14.504 psi, so 3.5 bar x 14.504 = 50.76 psi."),
    EvalRow("builtin-3", (("system", "You are a concise assistant."),
                          ("user", "Write a Python function that returns the mean of a list.")),
            "def mean(values):\n    if not values:\n        raise ValueError(\"empty list\")\n"
            "    return sum(values) / len(values)"),
    EvalRow("builtin-4", (("user", "Was bedeutet \"Übertemperatur am Schaltschrank\"?"),),
            "Es bedeutet, dass die Temperatur im Schaltschrank über dem zulässigen Wert liegt; "
            "prüfen Sie Lüfter und Filter."),
    EvalRow("builtin-5", (("user", "List three causes of bearing vibration."),),
            "1. Misalignment of the shaft.\n2. Imbalance of the rotor.\n3. Worn or poorly lubricated bearings."),
    EvalRow("builtin-6", (("user", "Summarise: the PLC lost communication with remote I/O station 7 at 14:32 "
                                   "and recovered at 14:35."),),
            "Remote I/O station 7 was offline for about three minutes (14:32 to 14:35) before the link recovered."),
    EvalRow("builtin-7", (("user", "Hi! Who are you?"),),
            "I am a small assistant running on this device. How can I help?"),
    EvalRow("builtin-8", (("user", "Translate to French: the cooling fan is running but the oil is hot."),),
            "Le ventilateur de refroidissement tourne, mais l'huile est chaude."),
)

# Token-id agreement strings: unicode, whitespace runs, digit runs, contractions, code,
# newlines. The model's own special tokens and chat-templated texts are added per model.
TOKENIZER_STRINGS: tuple[str, ...] = (
    "Pump P-101 discharge pressure low alarm, motor current normal.",
    "  two  spaces   and\ttabs\n\nnewlines\r\nend",
    "1234567 and 3.14159, 1,000,000 and 0042",
    "Über-Temperatur 日本語 ñ x² — 🙂 emoji café naïve",
    "don't I'LL we've they'RE it's",
    "a\n\n\n  b   \n",
    "    indented():\n        return {\"k\": [1, 2]}  # comment",
    "Ελληνικά русский עברית العربية हिन्दी 한국어",
    " leading space",
    "trailing space ",
    " ",
    "\n",
    "",
)


def _row_from_obj(obj: Any, where: str) -> EvalRow:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    rid = str(obj.get("id") or where)
    response = obj.get("response")
    if response is None:
        response = obj.get("reference")
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: `response` must be a string or null")
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        turns = []
        for i, m in enumerate(obj["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs string `role` and `content`")
            turns.append((m["role"], m["content"]))
        return EvalRow(rid, tuple(turns), response or None)
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return EvalRow(rid, (("user", obj["prompt"]),), response or None)
    if isinstance(obj.get("text"), str) and obj["text"].strip():
        return EvalRow(rid, text=obj["text"])
    raise DataError(f"{where}: a row needs `messages`, `prompt` or `text`")


def load_rows(path: Path, limit: int | None = None) -> list[EvalRow]:
    """Rows of a JSONL file (first ``limit``); DataError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    rows: list[EvalRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            rows.append(_row_from_obj(obj, f"{path.name}:{lineno}"))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def as_rows(items: Sequence[Any]) -> list[EvalRow]:
    """Normalise prompts given in code: a string (raw text), a list of chat messages, a row
    dict (as in a JSONL file) or an :class:`EvalRow`."""
    rows: list[EvalRow] = []
    for i, item in enumerate(items):
        where = f"prompt {i}"
        if isinstance(item, EvalRow):
            rows.append(item)
        elif isinstance(item, str):
            rows.append(_row_from_obj({"id": where, "text": item}, where))
        elif isinstance(item, list):
            rows.append(_row_from_obj({"id": where, "messages": item}, where))
        else:
            rows.append(_row_from_obj(item, where))
    if not rows:
        raise DataError("no prompts given")
    return rows


def load_tokenizer(hf_dir: Path) -> Any:
    """The reference HF tokenizer (fast tokenizers only; no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {hf_dir}: {exc}") from exc


def _chat(tokenizer: Any, row: EvalRow, *, with_response: bool) -> tuple[list[dict[str, str]], bool]:
    """The messages of a chat row (with its response as the assistant turn when asked) and
    whether the template should add the generation prompt."""
    if not tokenizer.chat_template:
        raise ModelSourceError("the reference tokenizer has no chat template; chat rows cannot be rendered",
                               hint="pass raw-text prompts, or export a model with a chat template")
    messages = row.message_dicts()
    if with_response and row.response:
        return [*messages, {"role": "assistant", "content": row.response}], False
    return messages, True


def rendered_text(tokenizer: Any, row: EvalRow, *, with_response: bool) -> str:
    """The text of ``row`` as the model sees it (chat-templated unless raw)."""
    if row.messages is None:
        return row.text or ""
    messages, generation_prompt = _chat(tokenizer, row, with_response=with_response)
    from edgepack.runtime.chat.template import render_hf_chat

    return render_hf_chat(tokenizer, messages, add_generation_prompt=generation_prompt)


def encode_row(tokenizer: Any, row: EvalRow, *, with_response: bool, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``row``, truncated to ``max_tokens``. Chat rows through the chat template,
    which carries any BOS (as transformers' ``apply_chat_template(tokenize=True)`` does), with
    message text never parsed for special tokens (:func:`~edgepack.runtime.chat.tokens.hf_chat_ids`);
    raw text with the tokenizer's own special-token policy (it is the caller's whole prompt)."""
    if row.messages is None:
        ids = list(tokenizer.encode(row.text or "", add_special_tokens=True))
    else:
        from edgepack.runtime.chat.tokens import hf_chat_ids

        messages, generation_prompt = _chat(tokenizer, row, with_response=with_response)
        ids = hf_chat_ids(tokenizer, messages, add_generation_prompt=generation_prompt)
    return ids[:max_tokens] if max_tokens else ids
