"""One generation request, from the queue to the last byte: whole answers and SSE streams.

A request with ``n > 1``, several or token-id prompts, ``logprobs`` or ``echo`` is handed to
:func:`~edgepack.runtime.server.choices.answer_choices` once parsed and planned (never
streamed); unknown fields it carried are named in the reply's ``X-Edgepack-Ignored-Fields``
header and a warning on the ``edgepack.serve`` logger.

:class:`Generation` runs ``POST /v1/chat/completions`` and ``/v1/completions`` for a
:class:`~edgepack.runtime.server.http.Handler`: it parses the request, resolves it against the
bundle's task and its ``response_format`` (:mod:`~edgepack.runtime.server.decoding`), checks it
(:mod:`~edgepack.runtime.server.request`), takes a place in line
(:class:`~edgepack.runtime.server.engine.Scheduler`), tokenizes under the request's deadline,
waits for the model, generates
(:func:`~edgepack.runtime.server.engine.run_job`), and either streams Server-Sent Events
(``data: {...}`` chunks, then ``data: [DONE]``) or answers once. With a teacher fallback the
answer is only known once complete, so a stream is buffered and sent after the decision.

While a generation runs it polls the socket before every token: a client that closed the
connection ends the generation (recorded as status 499) and frees the model. A request that
ends early (queue full, deadline, shutdown) is told why: a status line when nothing was sent
yet, else the stream's last event (no ``[DONE]`` follows, as with OpenAI).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from edgepack.errors import RuntimeFailure
from edgepack.runtime.server.api import (IGNORED_HEADER, GenerationRequest, HttpReject, chunk_body, completion_body,
                                         error_body, new_id, parse_request, usage)
from edgepack.runtime.server.choices import answer_choices
from edgepack.runtime.server.decoding import plan_request, structured_headers
from edgepack.runtime.server.engine import Job, Outcome, Stop, run_job
from edgepack.runtime.server.fallback import consult_teacher, teacher_text, teacher_usage
from edgepack.runtime.server.request import PeerWatch, check_prompt_size, fit_job, tokenize_within

if TYPE_CHECKING:
    from edgepack.runtime.server.http import Handler

_log = logging.getLogger("edgepack.serve")

_STOP_REPLY = {  # Stop reason -> (status, OpenAI error type)
    "queue_full": (429, "rate_limit_error"),
    "deadline": (504, "timeout_error"),
    "shutting_down": (503, "server_error"),
}


class Generation:
    """One generation request on ``handler``; :meth:`run` answers it completely."""

    def __init__(self, handler: Handler, kind: str) -> None:
        self.http = handler
        self.app = handler.app
        self.kind = kind
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.app.config.timeout_s
        self.gen_started = self.t0
        self.stream_ids: tuple[str, int] = ("", 0)
        self.structured: dict[str, Any] | None = None  # edgepack.structured_output of the reply

    def run(self) -> None:
        """Parse, check, queue, generate, reply; an HttpReject propagates to the handler."""
        app = self.app
        with app.using_model() as backend:
            req = parse_request(self.http.read_json(), self.kind)
            if req.ignored:
                names = ", ".join(req.ignored)
                self.http.reply_headers[IGNORED_HEADER] = names
                _log.warning("%s: ignored unknown request field(s): %s", self.http.endpoint, names)
            if req.model is not None and req.model != app.model_id:
                raise HttpReject(404, f"model {req.model!r} is not served here; this server serves "
                                      f"{app.model_id!r}", reason="not_found", param="model")
            plan = plan_request(app, backend, req)
            req, self.structured = plan.request, plan.structured
            check_prompt_size(req, app.n_ctx)
            watch = PeerWatch(self.http.connection)
            if not req.single:
                answer_choices(self, backend, plan, watch)
                return
            # With a fallback the answer is only known once complete, so a stream is buffered.
            live = req.stream and app.config.fallback is None
            try:
                # The place in line comes first: tokenizing is work too, under the same deadline.
                reservation = app.scheduler.reserve()
                try:
                    tokens = tokenize_within(app, req, reservation, self.deadline, watch.gone)
                    job = fit_job(tokens, plan, app)
                    app.scheduler.acquire(self.deadline, watch.gone, reservation)
                finally:
                    reservation.release()  # nothing left to release once used or taken over
            except Stop as stop:
                self._count_stop(stop, 0)
                self._reply_stop(stop)
                return
            stopped: Stop | None = None
            try:
                queued_s = time.monotonic() - self.t0
                if live:
                    self._open_stream(req, self.structured)
                outcome = self._generate(backend, job, watch, req if live else None)
            except Stop as stop:
                stopped = stop
                self._count_stop(stop, len(job.prompt_tokens))  # counted before the next request runs
            finally:
                app.scheduler.release()
            if stopped is not None:
                self._reply_stop(stopped)
                return
            if live:
                self._finish_stream(req, job, outcome, queued_s, None)
                return
        self._answer(req, job, outcome, queued_s)

    # --- generating ---------------------------------------------------------------------
    def _should_stop(self, watch: PeerWatch) -> str | None:
        if self.app.cancel.is_set():
            return "shutting_down"
        if time.monotonic() >= self.deadline:
            return "deadline"
        if watch.gone():
            return "client_disconnect"
        return None

    def _generate(self, backend: Any, job: Job, watch: PeerWatch, stream: GenerationRequest | None) -> Outcome:
        """Generate (the caller holds the model); with ``stream``, send each piece as an SSE chunk."""
        emit = None
        if stream is not None:
            kind, (rid, created), model = stream.kind, self.stream_ids, self.app.model_id

            def emit(text: str) -> None:
                self._sse(chunk_body(kind, rid, created, model, text=text))
        self.gen_started = time.monotonic()
        try:
            outcome = run_job(backend, job, should_stop=lambda: self._should_stop(watch), emit=emit)
        except RuntimeFailure as exc:
            self.app.metrics.tokens(len(job.prompt_tokens), 0)
            raise HttpReject(500, str(exc), reason="model_error", error_type="server_error") from None
        self.app.metrics.tokens(len(job.prompt_tokens), outcome.completion_tokens)
        return outcome

    def _count_stop(self, stop: Stop, prompt_tokens: int) -> None:
        self.app.metrics.reject(stop.reason)
        if prompt_tokens:
            self.app.metrics.tokens(prompt_tokens, stop.completion_tokens)
        if stop.reason == "client_disconnect":
            self.http.status = 499  # nginx's "client closed request", also when a stream had begun
            self.http.record()

    def _reply_stop(self, stop: Stop) -> None:
        """Tell a client whose request ended early why (nobody to tell after a disconnect)."""
        if stop.reason == "client_disconnect":
            return
        status, error_type = _STOP_REPLY[stop.reason]
        message = str(stop)
        if stop.reason == "deadline":
            message = f"the request ran past its {self.app.config.timeout_s:g} s deadline ({stop})"
        if self.http.streaming:  # a reader that stalled the stream must not stall this too
            self.http.connection.settimeout(1.0)
        retry = self.app.scheduler.retry_after_s() if status == 429 else 1
        self.http.fail(status, error_body(message, error_type, code=stop.reason),
                       {"Retry-After": str(retry)} if status in (429, 503) else None)

    def _client_gone(self) -> None:
        self.app.metrics.reject("client_disconnect")
        self.http.status = 499

    # --- streaming ----------------------------------------------------------------------
    def _sse(self, obj: Any) -> None:
        try:
            self.http.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
        except (OSError, ValueError) as exc:
            gone = isinstance(exc, TimeoutError) and time.monotonic() >= self.deadline
            raise Stop("deadline" if gone else "client_disconnect", f"stream write failed: {exc}") from None

    def _open_stream(self, req: GenerationRequest, structured: dict[str, Any] | None) -> None:
        """Status line, headers and the opening chunk of an SSE reply."""
        self.stream_ids = (new_id(req.kind), int(time.time()))
        rid, created = self.stream_ids
        remaining = max(0.05, self.deadline - time.monotonic())
        self.http.connection.settimeout(min(self.app.config.read_timeout_s, remaining))
        self.http.start_reply(200, "text/event-stream", {"X-Accel-Buffering": "no", **structured_headers(structured)})
        self._sse(chunk_body(req.kind, rid, created, self.app.model_id, role=True))

    def _finish_stream(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float,
                       decided: dict[str, Any] | None) -> None:
        rid, created = self.stream_ids
        model = self.app.model_id
        if decided is None:  # live stream: the text went out already
            text, finish = None, outcome.finish_reason
            use, meta = usage(len(job.prompt_tokens), outcome.completion_tokens), self._meta(outcome, queued_s)
        else:
            text, finish, use, meta = decided["text"], decided["finish"], decided["usage"], decided["meta"]
        try:
            if text:
                self._sse(chunk_body(req.kind, rid, created, model, text=text))
            last = chunk_body(req.kind, rid, created, model, finish_reason=finish)
            if req.include_usage:
                self._sse(last)
                last = dict(chunk_body(req.kind, rid, created, model), choices=[])
            last.update(usage=use, edgepack=meta)
            self._sse(last)
            self._observe(outcome)
            self.http.record()
            self.http.wfile.write(b"data: [DONE]\n\n")
        except (Stop, OSError):
            self._client_gone()

    # --- whole answers ------------------------------------------------------------------
    def _answer(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float) -> None:
        """Reply with the student's answer, or the teacher's when the fallback takes over."""
        decided = self._decide(req, job, outcome, queued_s)
        structured = decided["meta"]["structured_output"]
        if req.stream:  # fallback configured: the stream was buffered to decide first
            try:
                self._open_stream(req, structured)
            except Stop:
                self._client_gone()
                return
            self._finish_stream(req, job, outcome, queued_s, decided)
            return
        body = completion_body(req.kind, new_id(req.kind), self.app.model_id, decided["text"], decided["finish"],
                               decided["usage"], decided["meta"])
        self._observe(outcome)
        self.http.send_json(200, body, structured_headers(structured))

    def _observe(self, outcome: Outcome) -> None:
        ttft = None if outcome.first_token_s is None else self.gen_started - self.t0 + outcome.first_token_s
        self.app.metrics.timing(self.http.endpoint, time.monotonic() - self.t0, ttft)

    def _meta(self, outcome: Outcome, queued_s: float) -> dict[str, Any]:
        decode_s = outcome.generate_s - (outcome.first_token_s or 0.0)
        timings = {"queued_ms": round(queued_s * 1000, 2),
                   "first_token_ms": None if outcome.first_token_s is None
                   else round(outcome.first_token_s * 1000, 2),
                   "generate_ms": round(outcome.generate_s * 1000, 2),
                   "decode_tokens_per_s": round((outcome.completion_tokens - 1) / decode_s, 2)
                   if outcome.completion_tokens > 1 and decode_s > 0 else None}
        return dict(self.app.identity, served_by="student",
                    mean_token_logprob=None if outcome.mean_logprob is None else round(outcome.mean_logprob, 6),
                    fallback=None, timings=timings, structured_output=self.structured)

    def _decide(self, req: GenerationRequest, job: Job, outcome: Outcome, queued_s: float) -> dict[str, Any]:
        """Student or teacher: text, finish reason, usage and metadata of the reply."""
        app = self.app
        student_usage = usage(len(job.prompt_tokens), outcome.completion_tokens)
        meta = self._meta(outcome, queued_s)
        student = {"text": outcome.text, "finish": outcome.finish_reason, "usage": student_usage, "meta": meta}
        if app.config.fallback is None or app.config.fallback_min_logprob is None:
            return student
        verdict = consult_teacher(app.config.fallback, app.config.fallback_min_logprob, req,
                                  max_tokens=job.max_tokens, mean_logprob=outcome.mean_logprob,
                                  remaining_s=self.deadline - time.monotonic())
        app.metrics.fallback(verdict.outcome)
        meta["fallback"] = verdict.info
        if verdict.answer is None:
            return student
        text, finish = teacher_text(verdict.answer, req.kind)
        t_usage = teacher_usage(verdict.answer)
        verdict.info.update(student_usage=student_usage, teacher_usage_missing=t_usage is None)
        structured = meta["structured_output"]
        if structured is not None:  # the teacher is asked without the schema (fallback.py)
            structured = dict(structured, constrained=False, unenforced=[],
                              note="answered by the teacher fallback, which is not constrained to the schema")
        return {"text": text, "finish": finish, "usage": t_usage,
                "meta": dict(meta, served_by="teacher", structured_output=structured)}
