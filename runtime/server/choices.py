"""Requests that are answered whole, in one reply of several parts: ``n`` choices, a list of
prompts (text or token ids), ``logprobs``, ``echo``.

:func:`answer_choices` runs such a request for :class:`~edgepack.runtime.server.stream.Generation`
(which handles the single-prompt, single-choice request, streamed or not). The request takes
one place in line; every prompt is tokenized (or its token ids checked) under the request's
deadline, then the model is held once for all of it: for each prompt, its prompt logprobs when
``echo`` and ``logprobs`` are both asked (one decode, :meth:`Backend.prompt_logprobs`), then
``n`` generations (seed, when given, is ``seed + i`` for choice ``i`` so sampled choices differ
yet repeat). ``max_tokens: 0`` with ``echo`` generates nothing: the reply is the prompt and its
logprobs, what lm-eval's loglikelihood scoring reads. Choices are indexed prompt-major, as
OpenAI orders them (prompt ``p``, choice ``i`` → ``index = p * n + i``).

The teacher fallback is not consulted here (it judges one answer); ``edgepack.fallback`` says so.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgepack.errors import RuntimeFailure, UsageError
from edgepack.runtime.backends.base import Backend, TokenLogprob
from edgepack.runtime.server.api import MAX_SEED, GenerationRequest, HttpReject, new_id
from edgepack.runtime.server.decoding import Plan, structured_headers
from edgepack.runtime.server.engine import Job, Outcome, Stop
from edgepack.runtime.server.logprobs import chat_logprobs, completion_logprobs, token_text
from edgepack.runtime.server.request import PeerWatch, check_token_ids, fit_job, tokenize_within

if TYPE_CHECKING:
    from edgepack.runtime.server.stream import Generation

NO_FALLBACK = "not consulted: the request asked for n > 1, several prompts, logprobs or echo"


def _jobs(gen: Generation, backend: Backend, plan: Plan, watch: PeerWatch) -> list[Job]:
    """One job per prompt, tokenized under the request's place in line; the model is then held."""
    app, req = gen.app, plan.request
    reservation = app.scheduler.reserve()
    try:
        jobs = []
        for prompt in (req.prompts if req.kind == "completion" else (None,)):
            if isinstance(prompt, tuple):
                tokens = check_token_ids(prompt, backend.vocab_size)
            else:
                one = req if prompt is None else replace(req, prompt=prompt)
                tokens = tokenize_within(app, one, reservation, gen.deadline, watch.gone)
            jobs.append(fit_job(tokens, plan, app))
        app.scheduler.acquire(gen.deadline, watch.gone, reservation)
    finally:
        reservation.release()
    return jobs


def _generate_all(gen: Generation, backend: Backend, req: GenerationRequest, jobs: list[Job],
                  watch: PeerWatch) -> list[tuple[Job, list[TokenLogprob] | None, Outcome]]:
    """Every choice of every prompt (the caller holds the model)."""
    done = []
    for job in jobs:
        prompt_lp = None
        if req.echo and req.logprobs is not None:
            try:
                prompt_lp = backend.prompt_logprobs(job.prompt_tokens, req.logprobs)
            except (UsageError, RuntimeFailure) as exc:
                raise HttpReject(500, str(exc), reason="model_error", error_type="server_error") from None
        for i in range(req.n):
            one = replace(job, seed=None if job.seed is None else (job.seed + i) % (MAX_SEED + 1))
            if one.max_tokens == 0:
                outcome = Outcome(text="", completion_tokens=0, finish_reason="length", mean_logprob=None,
                                  first_token_s=None, generate_s=0.0)
            else:
                outcome = gen._generate(backend, one, watch, None)
            done.append((job, prompt_lp, outcome))
    return done


def answer_choices(gen: Generation, backend: Backend, plan: Plan, watch: PeerWatch) -> None:
    """Run ``plan``'s request whole and send one reply with all its choices (see the module docstring)."""
    app, req = gen.app, plan.request
    try:
        jobs = _jobs(gen, backend, plan, watch)
    except Stop as stop:
        gen._count_stop(stop, 0)
        gen._reply_stop(stop)
        return
    queued_s = time.monotonic() - gen.t0
    gen.gen_started = time.monotonic()
    try:
        done = _generate_all(gen, backend, req, jobs, watch)
    except Stop as stop:
        gen._count_stop(stop, 0)
        app.scheduler.release()
        gen._reply_stop(stop)
        return
    except BaseException:
        app.scheduler.release()
        raise
    app.scheduler.release()
    choices = [_choice(backend, req, index, job, prompt_lp, outcome)
               for index, (job, prompt_lp, outcome) in enumerate(done)]
    outcomes = [outcome for _, _, outcome in done]
    meta = gen._meta(outcomes[0], queued_s)
    meta.update(fallback=NO_FALLBACK if app.config.fallback is not None else None,
                choices_mean_token_logprob=[None if o.mean_logprob is None else round(o.mean_logprob, 6)
                                            for o in outcomes])
    prompt_tokens = sum(len(job.prompt_tokens) for job in jobs)
    completion_tokens = sum(o.completion_tokens for o in outcomes)
    body = {"id": new_id(req.kind), "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": app.model_id, "system_fingerprint": None, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}, "edgepack": meta}
    gen._observe(outcomes[0])
    gen.http.send_json(200, body, structured_headers(plan.structured))


def _choice(backend: Backend, req: GenerationRequest, index: int, job: Job,
            prompt_lp: list[TokenLogprob] | None, outcome: Outcome) -> dict[str, Any]:
    if req.kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": outcome.text},
                "logprobs": None if req.logprobs is None else chat_logprobs(backend, outcome.token_logprobs),
                "finish_reason": outcome.finish_reason}
    prefix = "".join(token_text(backend, t) for t in job.prompt_tokens) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(backend, [*(prompt_lp or []), *outcome.token_logprobs])
    return {"index": index, "text": prefix + outcome.text, "logprobs": logprobs,
            "finish_reason": outcome.finish_reason}
