"""The OpenAI wire format: validate request bodies, shape responses and stream chunks.

Parsing is strict, as OpenAI's own API is: an unknown argument, a wrong type, a value out of
range or a sampling option this server cannot honour is a 400 that names the field, never
silently ignored. Options that only matter at a value that changes nothing (``n: 1``,
``top_p: 1``, penalties of 0, ``logprobs: false``) are accepted at that value.

Defaults differ from OpenAI's in one place, on purpose: ``temperature`` defaults to 0
(greedy), the decoding the gate measured the bundle with (:data:`DEFAULT_TEMPERATURE`).
At ``temperature > 0`` llama.cpp samples with fixed filters (top-k 40, top-p 0.95, min-p 0.05).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

DEFAULT_TEMPERATURE = 0.0
MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**32 - 1  # llama.cpp seeds are uint32
MESSAGE_ROLES = ("system", "developer", "user", "assistant")

# Arguments accepted only at the value where they change nothing, and why others are refused.
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only one choice per request is generated"),
    "top_p": ((1, 1.0), "sampling filters are fixed (top-k 40, top-p 0.95, min-p 0.05)"),
    "frequency_penalty": ((0, 0.0), "penalties are not supported"),
    "presence_penalty": ((0, 0.0), "penalties are not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "logprobs": ((False, 0), "per-token logprobs are not returned; see edgepack.mean_token_logprob"),
    "top_logprobs": ((0,), "per-token logprobs are not returned"),
    "echo": ((False,), "echo is not supported"),
    "best_of": ((1,), "best_of is not supported"),
    "parallel_tool_calls": ((False, True), ""),
    "tool_choice": (("none",), "tools are not supported"),
    "tools": (([],), "tools are not supported"),
    "response_format": (({"type": "text"},), "structured output is not supported"),
}
_COMMON = ("model", "max_tokens", "temperature", "seed", "stop", "stream", "stream_options", "user")
CHAT_KEYS = frozenset(_COMMON + ("messages", "max_completion_tokens") + tuple(_NEUTRAL))
COMPLETION_KEYS = frozenset(_COMMON + ("prompt",) + tuple(_NEUTRAL))


class HttpReject(Exception):
    """Internal: end this HTTP request with ``status`` and an OpenAI error body.

    Raised and caught inside the server package only; ``reason`` is a metrics rejection
    reason (:data:`edgepack.runtime.server.metrics.REJECTION_REASONS`).
    """

    def __init__(self, status: int, message: str, *, reason: str, param: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.param = param
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.reason)


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _bad(message: str, param: str | None = None) -> HttpReject:
    return HttpReject(400, message, reason="invalid_request", param=param)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or text completion request."""

    kind: str                           # "chat" or "completion"
    model: str | None
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int | None              # None: the server default, capped by the context
    temperature: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise _bad(f"messages[{i}]: unsupported field(s) {', '.join(unknown)}", "messages")
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}", "messages")
        msg = {"role": role, "content": _content_text(m.get("content"), i)}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise _bad(f"messages[{i}].name must be a string", "messages")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a non-empty string or an array of non-empty strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"stop takes at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters",
                   "stop")
    return tuple(stops)


def parse_request(body: Any, kind: str) -> GenerationRequest:
    """Validate a decoded JSON body for ``kind`` (``chat`` or ``completion``); HttpReject(400)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    allowed = CHAT_KEYS if kind == "chat" else COMPLETION_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for key, (neutral, why) in _NEUTRAL.items():
        value = body.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise _bad(f"{key}={value!r} is not supported: {why}", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt must be a non-empty string (token arrays and batches are not supported)",
                       "prompt")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if kind == "chat" and body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("give max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens = body.get(max_key)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise _bad(f"{max_key} must be a positive integer", max_key)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise _bad(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}", "temperature")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise _bad(f"seed must be an integer from 0 to {MAX_SEED}", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options may only hold include_usage (a boolean)", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string", "user")
    return GenerationRequest(kind=kind, model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
                             temperature=float(temperature), seed=seed, stop=_stop(body.get("stop")),
                             stream=stream, include_usage=include_usage)


# --- responses ------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, text: str, finish_reason: str,
                    usage_: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) chat.completion or text_completion object."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": usage_, "edgepack": meta}


def chunk_body(kind: str, rid: str, created: int, model: str, *, text: str | None = None,
               role: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk carrying a text delta (or the opening role, or the finish reason)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [choice]}
