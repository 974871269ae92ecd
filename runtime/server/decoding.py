"""What one request decodes with: the bundle's task, the request's own fields, its response_format.

:func:`plan_request` runs after parsing and before anything is tokenized. Every request goes
through the session's task (:meth:`~edgepack.runtime.server.serve.ModelServer.apply_task`, i.e.
:meth:`edgepack.runtime.session.ModelSession.apply_task`): a chat gets the task's system prompt
unless it sends its own system message, and every request (chat or raw completion) takes the
task's decoding for each field it leaves out (``max_tokens``, ``temperature``,
``repeat_penalty``, ``stop``). A raw completion has no turns, so no system prompt is added to it.

JSON output is asked for by the request's ``response_format`` (``json_object`` or
``json_schema``), else by a ``json`` task (its schema, by default). ``response_format: text``
asks for none, even on a json task's bundle. The schema is checked on every backend (a bad one
is a 400 naming ``response_format``); a backend that ``constrains_json`` (llama.cpp) decodes
under it as a grammar, and one that does not (ONNX) answers unconstrained and says so. The
grammar leaves some keywords unenforced (``Backend.unenforced_keywords``: llama-cpp-python's
converter drops ``minimum``/``maximum`` and a few others); a ``strict: true`` schema that uses
them is a 400, as OpenAI refuses keywords it cannot honour under strict, and otherwise the reply
names them. Whenever JSON was asked for, the reply's ``X-Edgepack-Structured-Output`` header
(:data:`STRUCTURED_HEADER`) is ``constrained``, ``constrained; unenforced=minimum,...`` or
``unconstrained``, and the ``edgepack.structured_output`` object says who asked, for what, what
was not enforced and why. :func:`announce_unconstrained` logs it
once when the server starts on a backend that cannot constrain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgepack.errors import UsageError
from edgepack.runtime.server.api import GenerationRequest, HttpReject

if TYPE_CHECKING:
    from edgepack.runtime.backends.base import Backend
    from edgepack.runtime.server.serve import ModelServer

STRUCTURED_HEADER = "X-Edgepack-Structured-Output"


@dataclass(frozen=True)
class Plan:
    """A request resolved against the task: what :func:`~edgepack.runtime.server.request.fit_job` builds on."""

    request: GenerationRequest
    """The request as the model answers it: the task's system turn, temperature and stop filled in."""
    default_max_tokens: int
    """max_tokens when the request gives none (the task's, else the server's), capped by the context."""
    repeat_penalty: float
    json_schema: dict[str, Any] | None
    """The schema decoding is constrained by (None: unconstrained)."""
    structured: dict[str, Any] | None
    """``edgepack.structured_output`` of the reply; None when no JSON was asked for."""


def announce_unconstrained(backend: Backend, warn: Callable[[str], None] | None) -> None:
    """Log once, at start-up, that ``backend`` answers JSON requests unconstrained (if it does)."""
    if warn is not None and not backend.constrains_json:
        warn(f"the {backend.format} backend cannot constrain decoding to a JSON schema: requests with "
             f"response_format json_object/json_schema (and a json task's requests) are answered unconstrained, "
             f"marked {STRUCTURED_HEADER}: unconstrained")


def plan_request(app: ModelServer, backend: Backend, req: GenerationRequest) -> Plan:
    """Resolve ``req`` against the served task and its ``response_format``; HttpReject(400) when
    the two cannot be honoured (a bad decoding value, a schema that is not one)."""
    try:
        messages, decoding, task_schema = app.apply_task(
            # max_tokens 0 (echo: score the prompt only) is the request's own; the task checks the rest.
            req.messages if req.kind == "chat" else [], max_tokens=req.max_tokens or None, temperature=req.temperature,
            repeat_penalty=req.repeat_penalty, default_max_tokens=app.config.default_max_tokens)
    except UsageError as exc:
        raise HttpReject(400, str(exc), reason="invalid_request") from None
    resolved = replace(req, messages=messages if req.kind == "chat" else None, temperature=decoding.temperature,
                       repeat_penalty=decoding.repeat_penalty,
                       stop=req.stop if req.stop is not None else tuple(decoding.stop))
    _check_backend_options(backend, req)
    schema, structured = _json_schema(app, backend, req, task_schema)
    return Plan(request=resolved, default_max_tokens=decoding.max_tokens, repeat_penalty=decoding.repeat_penalty,
                json_schema=schema, structured=structured)


def _check_backend_options(backend: Backend, req: GenerationRequest) -> None:
    """400 naming the backend for a sampling option or logprobs it cannot honour (never ignored)."""
    missing = [name for name in req.sampling.given() if name not in backend.sampling_options]
    if missing:
        raise HttpReject(400, f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not supported by the "
                              f"{backend.format} backend of this model; leave "
                              f"{'it' if len(missing) == 1 else 'them'} out", reason="invalid_request",
                         param=missing[0])
    if req.logprobs is not None and not backend.serves_logprobs:
        raise HttpReject(400, f"logprobs are not returned by the {backend.format} backend of this model "
                              "(see edgepack.mean_token_logprob instead)", reason="invalid_request", param="logprobs")


def _json_schema(app: ModelServer, backend: Backend, req: GenerationRequest,
                 task_schema: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(schema to decode under, ``structured_output``) for ``req`` on ``backend``."""
    fmt = req.response_format
    if fmt is not None:
        if fmt.schema is None:  # "text": the request asks for no JSON
            return None, None
        try:
            backend.check_json_schema(fmt.schema)
        except UsageError as exc:
            raise HttpReject(400, f"response_format: {exc}", reason="invalid_request",
                             param="response_format") from None
        schema, asked_by, kind = fmt.schema, "response_format", fmt.type
    else:
        task = app.session.task if app.session is not None else None
        if task is None or task.kind != "json":
            return None, None
        if task_schema is not None:
            try:  # checked when the bundle loaded; compiling it is the backend's part, cached
                backend.check_json_schema(task_schema)
            except UsageError as exc:
                raise HttpReject(500, f"the bundle's task schema cannot be decoded under: {exc}", reason="model_error",
                                 error_type="server_error") from None
        schema, asked_by, kind = task_schema, "task", "json_schema"
    constrained = backend.constrains_json and schema is not None
    unenforced = backend.unenforced_keywords(schema) if constrained else ()
    if unenforced and fmt is not None and fmt.strict:
        raise HttpReject(400, f"response_format: strict is true, but decoding here cannot enforce "
                              f"{', '.join(unenforced)}; drop them from the schema, or send strict: false to "
                              "decode under the rest of it", reason="invalid_request", param="response_format")
    note = None
    if not constrained:
        note = (f"the {backend.format} backend cannot constrain decoding: the answer may not be valid JSON "
                "or may not fit the schema")
    elif unenforced:
        note = f"the grammar does not enforce {', '.join(unenforced)}: the answer may break them"
    structured = {"requested_by": asked_by, "type": kind, "constrained": constrained,
                  "unenforced": list(unenforced), "note": note}
    return (schema if constrained else None), structured


def structured_headers(structured: dict[str, Any] | None) -> dict[str, str]:
    """The reply header that says whether the answer was decoded under the schema."""
    if structured is None:
        return {}
    if not structured["constrained"]:
        return {STRUCTURED_HEADER: "unconstrained"}
    unenforced = structured["unenforced"]
    return {STRUCTURED_HEADER: "constrained" + (f"; unenforced={','.join(unenforced)}" if unenforced else "")}
