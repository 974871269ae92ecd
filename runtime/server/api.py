"""The OpenAI wire format: validate request bodies, shape responses and stream chunks.

Parsing checks every field it knows as OpenAI's own API does: a wrong type or a value out of
range is a 400 that names the field. A field it does not know is ignored and named (the reply's
:data:`IGNORED_HEADER` and a log line), as vLLM does; tools and functions are refused (400),
and ``logit_bias``/``best_of`` are accepted only at the value that changes nothing.

Sampling: ``top_p``, ``top_k``, ``min_p``, ``presence_penalty``, ``frequency_penalty`` (a
:class:`~edgepack.runtime.backends.base.Sampling`, refused by a backend that cannot honour
them), ``seed``, ``stop`` and ``repeat_penalty`` (llama.cpp's, as llama-server spells it; > 0,
1 = none). ``n`` (at most :data:`MAX_N`), a list of prompts or token-id prompts, ``echo`` and
``logprobs`` make a request that is answered whole (:mod:`~edgepack.runtime.server.choices`;
not streamed). ``response_format`` takes OpenAI's three shapes (:func:`parse_response_format`):
``text``, ``json_object`` and ``json_schema`` (``name``, optional ``description``, ``schema``,
``strict``).

Defaults differ from OpenAI's on purpose: a field the request leaves out (``max_tokens``,
``temperature``, ``repeat_penalty``, ``stop``) is None here and takes the bundle's task decoding,
the one the gate measured (:mod:`edgepack.runtime.server.decoding`); without a task, greedy and
no penalty (:class:`edgepack.task.Decoding`'s defaults). At ``temperature > 0`` a filter the
request leaves out keeps llama-cpp-python's default (top-k 40, top-p 0.95, min-p 0.05).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edgepack.runtime.backends.base import Sampling

MAX_TEMPERATURE = 2.0
# OpenAI allows 4 stop strings; lm-eval's generate_until sends a task's whole `until` list, and vLLM and
# llama-server set no limit. Each is searched in the text held back, not in the whole answer.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**32 - 1  # llama.cpp seeds are uint32
MAX_REPEAT_PENALTY = 10.0  # llama.cpp takes any float; past this every seen token is all but banned
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""What ``json_object`` (and a ``json_schema`` without a schema) decodes under: any JSON object."""
MESSAGE_ROLES = ("system", "developer", "user", "assistant")

MAX_N = 8  # choices per request (each is one more generation on the one model slot)
MAX_PROMPTS = 64  # prompts in one /v1/completions request (lm-eval batches a few)
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat top_logprobs allows
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2 to 2

# Arguments accepted only at the value where they change nothing, and why others are refused.
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": (({},), "logit_bias is not supported"),
    "best_of": ((1,), "best_of is not supported; use n"),
    "parallel_tool_calls": ((False, True), ""),
    "tool_choice": (("none",), "tools are not supported"),
    "tools": (([],), "tools are not supported"),
    "functions": (([],), "functions (tools) are not supported"),
    "function_call": (("none",), "functions (tools) are not supported"),
}
_SAMPLING = ("n", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "logprobs")
_COMMON = ("model", "max_tokens", "temperature", "seed", "stop", "stream", "stream_options", "user",
           "repeat_penalty", "response_format") + _SAMPLING
CHAT_KEYS = frozenset(_COMMON + ("messages", "max_completion_tokens", "top_logprobs") + tuple(_NEUTRAL))
COMPLETION_KEYS = frozenset(_COMMON + ("prompt", "echo") + tuple(_NEUTRAL))
IGNORED_HEADER = "X-Edgepack-Ignored-Fields"
"""Names the request fields this server does not know and ignored (as vLLM does), comma-separated."""


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
class ResponseFormat:
    """A request's ``response_format``: ``text``, or JSON under ``schema``."""

    type: str                           # one of RESPONSE_FORMATS
    schema: dict[str, Any] | None = None
    """The schema to decode under (``json_object``: :data:`JSON_OBJECT_SCHEMA`); None for text."""
    name: str | None = None
    strict: bool | None = None
    """Accepted as sent; a backend that constrains JSON always decodes under the schema."""


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or text completion request. None means the request left a field out
    (the task's decoding, or the server's default, decides it)."""

    kind: str                           # "chat" or "completion"
    model: str | None
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float | None
    seed: int | None
    stop: tuple[str, ...] | None
    stream: bool
    include_usage: bool
    repeat_penalty: float | None = None
    response_format: ResponseFormat | None = None
    prompts: tuple[str | tuple[int, ...], ...] = ()
    """Every prompt of a completion (text, or token ids sent as they are); ``prompt`` is the
    first when there is one text prompt."""
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    """Per-token logprobs with this many alternatives each (0: the chosen token only); None: none."""
    sampling: Sampling = Sampling()
    ignored: tuple[str, ...] = ()
    """Unknown top-level fields, ignored and named in :data:`IGNORED_HEADER`."""

    @property
    def single(self) -> bool:
        """One text prompt (or a chat), one choice, no logprobs, no echo: the path that may stream."""
        return self.n == 1 and not self.echo and self.logprobs is None and \
            (self.kind == "chat" or (len(self.prompts) == 1 and isinstance(self.prompts[0], str)))


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


def _stop(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a non-empty string or an array of non-empty strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"stop takes at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters",
                   "stop")
    return tuple(stops)


def parse_response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` shapes; HttpReject(400) naming what is wrong. The schema
    itself is checked later, by the backend that decodes under it."""
    if value is None:
        return None
    param = "response_format"
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise _bad(f"response_format must be an object whose type is one of {', '.join(RESPONSE_FORMATS)}", param)
    kind = value["type"]
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    if set(value) - allowed:
        raise _bad(f"response_format of type {kind} takes no field(s) {', '.join(sorted(set(value) - allowed))}", param)
    if kind == "text":
        return ResponseFormat("text")
    if kind == "json_object":
        return ResponseFormat("json_object", dict(JSON_OBJECT_SCHEMA))
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema must be an object with a name and a schema", param)
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:
        raise _bad(f"response_format.json_schema: unsupported field(s) {', '.join(unknown)}", param)
    name = spec.get("name")
    if not (isinstance(name, str) and SCHEMA_NAME.fullmatch(name)):
        raise _bad("response_format.json_schema.name is required: 1-64 characters of a-z, A-Z, 0-9, _ and -", param)
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise _bad("response_format.json_schema.description must be a string", param)
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema must be a JSON Schema object", param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad("response_format.json_schema.strict must be a boolean", param)
    return ResponseFormat("json_schema", dict(JSON_OBJECT_SCHEMA) if schema is None else schema, name, strict)


def _repeat_penalty(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not 0 < value <= MAX_REPEAT_PENALTY:
        raise _bad(f"repeat_penalty must be a number above 0 and at most {MAX_REPEAT_PENALTY:g} (1 = none)",
                   "repeat_penalty")
    return float(value)


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """``prompt`` as OpenAI takes it: a string, a list of strings, a token-id list, or a list
    of token-id lists. Token ids are checked against the vocabulary later, by the server."""
    bad = _bad("prompt must be a non-empty string, a list of strings, a list of token ids or a list of "
               f"token-id lists (at most {MAX_PROMPTS} prompts)", "prompt")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise bad
    if len(items) > MAX_PROMPTS:
        raise bad
    out: list[str | tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) and t >= 0 for t in item):
            out.append(tuple(item))
        else:
            raise bad
    return tuple(out)


def _number(body: dict[str, Any], key: str, low: float, high: float, what: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise _bad(f"{key} must be {what}", key)
    return float(value)


def _sampling(body: dict[str, Any]) -> Sampling:
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise _bad("top_k must be an integer (0 or -1: no limit)", "top_k")
    return Sampling(top_p=_number(body, "top_p", 0.0, 1.0, "a number from 0 to 1"),
                    top_k=None if top_k is None else max(top_k, 0),
                    min_p=_number(body, "min_p", 0.0, 1.0, "a number from 0 to 1"),
                    presence_penalty=_number(body, "presence_penalty", -MAX_PENALTY, MAX_PENALTY,
                                             f"a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}"),
                    frequency_penalty=_number(body, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY,
                                              f"a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}"))


def _logprobs(body: dict[str, Any], kind: str) -> int | None:
    """How many alternatives per token to return (None: no logprobs). Chat: ``logprobs: true``
    with ``top_logprobs: k``; completions: ``logprobs: k``."""
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "chat":
        if value is not None and not isinstance(value, bool):
            raise _bad("logprobs must be a boolean (the number of alternatives is top_logprobs)", "logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise _bad(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
        if top and not value:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if value else None
    if value is None or value is False:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise _bad(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "logprobs")
    return value


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad(f"n must be an integer from 1 to {MAX_N} (choices per request on this server)", "n")
    return n


def _max_tokens(body: dict[str, Any], kind: str, echo: bool) -> int | None:
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if kind == "chat" and body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("give max_tokens or max_completion_tokens, not both", "max_tokens")
    max_tokens = body.get(max_key)
    # 0 only with echo: the prompt's own logprobs, nothing generated (loglikelihood scoring).
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < (0 if echo else 1)):
        raise _bad(f"{max_key} must be a positive integer (0 only with echo: true)", max_key)
    return max_tokens


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
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
    return stream, include_usage


def parse_request(body: Any, kind: str) -> GenerationRequest:
    """Validate a decoded JSON body for ``kind`` (``chat`` or ``completion``); HttpReject(400).
    Unknown top-level fields are ignored and listed in ``ignored``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    allowed = CHAT_KEYS if kind == "chat" else COMPLETION_KEYS
    ignored = tuple(sorted(k[:64] for k in set(body) - allowed))
    for key, (neutral, why) in _NEUTRAL.items():
        value = body.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise _bad(f"{key}={value!r} is not supported: {why}", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")
    messages, prompts = None, ()
    if kind == "chat":
        messages = _messages(body.get("messages"))
    else:
        prompts = _prompts(body.get("prompt"))
    echo = body.get("echo", False) if kind == "completion" else False
    if not isinstance(echo, bool):
        raise _bad("echo must be a boolean", "echo")
    max_tokens = _max_tokens(body, kind, echo)
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE):
        raise _bad(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}", "temperature")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise _bad(f"seed must be an integer from 0 to {MAX_SEED}", "seed")
    stream, include_usage = _stream(body)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string", "user")
    req = GenerationRequest(kind=kind, model=model, messages=messages,
                            prompt=prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else None,
                            max_tokens=max_tokens, temperature=None if temperature is None else float(temperature),
                            seed=seed, stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage,
                            repeat_penalty=_repeat_penalty(body.get("repeat_penalty")),
                            response_format=parse_response_format(body.get("response_format")), prompts=prompts,
                            n=_choices(body), echo=echo, logprobs=_logprobs(body, kind), sampling=_sampling(body),
                            ignored=ignored)
    if stream and not req.single:
        raise _bad("stream: true is not supported with n > 1, several or token-id prompts, logprobs or echo; "
                   "send stream: false", "stream")
    return req


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
