"""Teacher fallback: forward a request the student answered with low confidence.

``--fallback openai:URL#MODEL`` names an OpenAI-compatible endpoint (``URL`` is its base,
ending in ``/v1`` as for the ``openai`` client; ``MODEL`` the model it serves). When the
student's mean token log-probability is below the configured minimum, or the student said
nothing, the server sends the same request (non-streamed) to the teacher and returns the
teacher's answer with ``edgepack.served_by = "teacher"``; a failing teacher leaves the
student's answer in place and the failure in ``edgepack.fallback.error`` -- never a silent
swap either way. Both outcomes are counted in ``/metrics``.

Kinds are a registry keyed by the exact prefix before ``:`` (:data:`FALLBACK_KINDS`).
Redirects are not followed, so an API key is only ever sent to the configured host.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgepack.errors import RuntimeFailure, UsageError

if TYPE_CHECKING:
    from edgepack.runtime.server.api import GenerationRequest

MAX_TEACHER_RESPONSE_BYTES = 8 * 1024 * 1024
ENDPOINT_PATHS = {"chat": "/chat/completions", "completion": "/completions"}


@dataclass(frozen=True)
class FallbackTarget:
    """Where low-confidence requests go."""

    spec: str
    base_url: str
    model: str
    api_key: str | None = None

    def describe(self) -> str:
        return self.spec


def _openai_target(rest: str, spec: str, api_key: str | None) -> FallbackTarget:
    url, sep, model = rest.partition("#")
    parts = urlsplit(url)
    if not sep or not model or parts.scheme not in ("http", "https") or not parts.netloc \
            or parts.query or parts.fragment:
        raise UsageError(f"bad fallback {spec!r}",
                         hint="write openai:http://HOST:PORT/v1#MODEL (an OpenAI-compatible base URL and a model)")
    return FallbackTarget(spec=spec, base_url=url.rstrip("/"), model=model, api_key=api_key)


FALLBACK_KINDS: dict[str, Callable[[str, str, str | None], FallbackTarget]] = {
    "openai": _openai_target,
}


def parse_fallback(spec: str, api_key: str | None = None) -> FallbackTarget:
    """A :class:`FallbackTarget` from ``KIND:...``; UsageError naming the known kinds."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in FALLBACK_KINDS:
        raise UsageError(f"unknown fallback kind in {spec!r}; known: {', '.join(sorted(FALLBACK_KINDS))}",
                         hint="write openai:http://HOST:PORT/v1#MODEL")
    return FALLBACK_KINDS[kind](rest, spec, api_key)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def ask_teacher(target: FallbackTarget, kind: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST ``payload`` (model replaced by the teacher's) and return the teacher's JSON answer.

    Raises RuntimeFailure on a network error, a non-200 status, a timeout or a body that is
    not an OpenAI completion with text in its first choice.
    """
    body = dict(payload, model=target.model, stream=False)
    request = urllib.request.Request(target.base_url + ENDPOINT_PATHS[kind], method="POST",
                                     data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    if target.api_key:
        request.add_header("Authorization", f"Bearer {target.api_key}")
    from edgepack.http_deadline import BodyTooLarge, Deadline, DeadlinePassed, deadline_opener, read_body

    # One total deadline: a per-read timeout lets a teacher that drips a byte at a time hold
    # the request (and its queue place) forever.
    deadline = Deadline(max(0.1, timeout_s))
    try:
        with deadline, deadline_opener(deadline, _NoRedirect()).open(request, timeout=deadline.seconds) as resp:
            raw = read_body(resp, deadline, MAX_TEACHER_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        raise RuntimeFailure(f"teacher {target.spec} answered HTTP {exc.code}") from exc
    except BodyTooLarge as exc:
        raise RuntimeFailure(f"teacher {target.spec} sent more than {MAX_TEACHER_RESPONSE_BYTES} bytes "
                             f"({exc.detail})") from exc
    except (DeadlinePassed, urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        if deadline.expired:
            raise RuntimeFailure(f"teacher {target.spec} did not answer within {deadline.seconds:g} s") from exc
        raise RuntimeFailure(f"teacher {target.spec} unreachable: {exc}") from exc
    try:
        answer = json.loads(raw)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeFailure(f"teacher {target.spec} sent no completion: {type(exc).__name__}") from exc
    if not isinstance(text, str):
        raise RuntimeFailure(f"teacher {target.spec} sent a non-text completion")
    return answer


def teacher_text(answer: dict[str, Any], kind: str) -> tuple[str, str]:
    """(text, finish_reason) of a teacher answer already checked by :func:`ask_teacher`."""
    choice = answer["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    finish = choice.get("finish_reason")
    return text, finish if finish in ("stop", "length") else "stop"


def teacher_usage(answer: dict[str, Any]) -> dict[str, int] | None:
    """The teacher's usage block when it has the three integer counts, else None."""
    u = answer.get("usage")
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    if isinstance(u, dict) and all(isinstance(u.get(k), int) and not isinstance(u.get(k), bool) for k in keys):
        return {k: u[k] for k in keys}
    return None


@dataclass
class Verdict:
    """What the fallback decided for one answer."""

    outcome: str
    """``student`` (confident enough), ``teacher`` (answer replaced) or ``teacher_error``."""
    info: dict[str, Any] = field(default_factory=dict)
    """The ``edgepack.fallback`` object of the reply."""
    answer: dict[str, Any] | None = None
    """The teacher's JSON answer when it replaced the student's."""


def consult_teacher(target: FallbackTarget, min_logprob: float, request: GenerationRequest, *,
                    max_tokens: int, mean_logprob: float | None, remaining_s: float) -> Verdict:
    """Keep the student's answer, or ask the teacher when it is not confident enough.

    No tokens (``mean_logprob`` None) counts as not confident. The teacher gets the same
    messages or prompt, ``max_tokens``, temperature, seed and stop strings, and whatever is
    left of the request's deadline.
    """
    info: dict[str, Any] = {"teacher": target.describe(), "min_logprob": min_logprob, "used": False,
                            "stream_buffered": request.stream}
    if mean_logprob is not None and mean_logprob >= min_logprob:
        return Verdict("student", info)
    info["reason"] = ("the student produced no tokens" if mean_logprob is None
                      else f"mean token logprob {mean_logprob:.3f} < {min_logprob}")
    payload: dict[str, Any] = {"max_tokens": max_tokens, "temperature": request.temperature}
    payload.update({"messages": request.messages} if request.kind == "chat" else {"prompt": request.prompt})
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.stop:
        payload["stop"] = list(request.stop)
    try:
        if remaining_s <= 0:
            raise RuntimeFailure("no time left before the request's deadline")
        answer = ask_teacher(target, request.kind, payload, remaining_s)
    except RuntimeFailure as exc:
        info["error"] = str(exc)
        return Verdict("teacher_error", info)
    info.update(used=True, teacher_model=answer.get("model"), student_mean_token_logprob=mean_logprob)
    return Verdict("teacher", info, answer)
