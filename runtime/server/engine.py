"""The model side of the server: who may use the model next, and one generation on it.

A llama.cpp context is not thread-safe, so exactly one request generates at a time.
:class:`Scheduler` admits it, keeps a FIFO of at most ``max_queue`` waiting requests and
refuses the next one at once (the HTTP layer answers 429) instead of letting requests pile up
(llama-cpp-python's server serializes behind one lock with no bound, and two users can
freeze it: llama-cpp-python #1995). A waiter leaves the queue when its deadline passes,
its client disconnects or the server stops. A request takes its place (:meth:`Scheduler.reserve`)
before it is tokenized: tokenizing costs CPU too (quadratic in llama.cpp for text dense in
special tokens, issue #20 defect 10), so it counts against the same ``max_queue + 1`` places,
and a tokenization that outlives its request keeps its place until it ends.

:func:`run_job` runs one generation while holding the slot: it asks ``should_stop`` before
every token (deadline, client gone, shutdown), so a request never holds the model past its
deadline by more than one token, records each token's log-probability for the mean the
response reports (and, when the job asks, each token's logprob with its top alternatives),
passes the request's sampling options to the backend, and applies OpenAI ``stop`` strings
without ever emitting a character that turns out to be the start of a stop string.
"""

from __future__ import annotations

import codecs
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.runtime.backends.base import Backend, Sampling, TokenLogprob

POLL_S = 0.2  # how often a queued request re-checks its client and deadline
MAX_RETRY_AFTER_S = 30  # a 429's Retry-After cap; the openai SDK honours up to 60 s


class Stop(Exception):
    """Internal signal that a request ends early; the HTTP layer maps ``reason`` to a reply.

    Never leaves the server package. ``reason`` is a key of
    :data:`edgepack.runtime.server.metrics.REJECTION_REASONS`.
    """

    def __init__(self, reason: str, detail: str, completion_tokens: int = 0) -> None:
        super().__init__(detail)
        self.reason = reason
        self.completion_tokens = completion_tokens


class Scheduler:
    """One holder of the model at a time plus a bounded FIFO of waiters."""

    def __init__(self, max_queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._busy = False
        self._preparing = 0  # reserved places: requests being tokenized
        self._waiting: deque[object] = deque()
        self._closing = False
        self._on_change = on_change or (lambda queued, running: None)
        self._held_since = 0.0
        self._hold_s = 1.0  # running mean of how long one request holds the model (seconds)

    @property
    def closing(self) -> bool:
        return self._closing

    def _changed(self) -> None:
        self._on_change(len(self._waiting), int(self._busy))

    def reserve(self) -> Reservation:
        """A place for one request, taken before it is tokenized; :class:`Stop` ``queue_full``
        at once when ``max_queue + 1`` requests are being tokenized, waiting or generating."""
        with self._cond:
            if self._closing:
                raise Stop("shutting_down", "the server is shutting down")
            held = int(self._busy) + len(self._waiting) + self._preparing
            if held > self.max_queue:
                raise Stop("queue_full", f"the model is busy and {held - 1} requests are already waiting "
                                         f"(queue limit {self.max_queue}); retry later")
            self._preparing += 1
        return Reservation(self)

    def _unreserve(self) -> None:
        with self._cond:
            self._preparing -= 1
            self._cond.notify_all()

    def acquire(self, deadline: float, gone: Callable[[], bool], reservation: Reservation | None = None) -> None:
        """Wait for the model (FIFO) until ``deadline`` (time.monotonic); raise :class:`Stop`.

        Without a ``reservation`` one is taken first (refused at once with ``queue_full`` when
        the model is busy and ``max_queue`` requests already wait); with one, it is used up.
        """
        if reservation is None:
            reservation = self.reserve()
        ticket = object()
        with self._cond:
            reservation.used()
            self._preparing -= 1
            if self._closing:
                raise Stop("shutting_down", "the server is shutting down")
            self._waiting.append(ticket)
            self._changed()
            try:
                while self._busy or self._waiting[0] is not ticket:
                    if self._closing:
                        raise Stop("shutting_down", "the server is shutting down")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Stop("deadline", "the request's deadline passed while it waited for the model")
                    if gone():
                        raise Stop("client_disconnect", "the client disconnected while queued")
                    self._cond.wait(min(remaining, POLL_S))
                self._busy = True
                self._held_since = time.monotonic()
            finally:
                self._waiting.remove(ticket)
                self._changed()
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if self._busy:
                self._hold_s = 0.8 * self._hold_s + 0.2 * (time.monotonic() - self._held_since)
            self._busy = False
            self._changed()
            self._cond.notify_all()

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the line ahead of it at the recent hold time
        (1 to :data:`MAX_RETRY_AFTER_S`), so a client's few default retries land once places free up."""
        with self._cond:
            ahead = int(self._busy) + len(self._waiting) + self._preparing
            return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._hold_s * max(1, ahead) / 2)))

    def close(self) -> None:
        """Refuse new requests and wake every waiter (they leave with ``shutting_down``)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nobody holds, waits for or has reserved the model (within ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._busy or self._waiting or self._preparing:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, POLL_S))
        return True


class Reservation:
    """A request's place with a :class:`Scheduler`: used up by ``acquire``, or given back
    with :meth:`release` (idempotent, any thread)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._held = True

    def used(self) -> None:
        with self._lock:
            if not self._held:
                raise RuntimeError("this reservation was already used or released")
            self._held = False

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._scheduler._unreserve()

    def transfer(self) -> Reservation:
        """The same place under a new owner (this one is then spent): a tokenizing worker
        keeps the place of a request that ended before its tokens were ready."""
        self.used()
        return Reservation(self._scheduler)


@dataclass(frozen=True)
class Job:
    """One generation request, already validated and tokenized."""

    prompt_tokens: Sequence[int]
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    json_schema: dict[str, Any] | None = None
    """Decode under this JSON Schema (only set for a backend that constrains JSON)."""
    sampling: Sampling = Sampling()
    logprobs: int | None = None
    """Record each generated token's logprob with this many alternatives (None: do not)."""


@dataclass(frozen=True)
class Outcome:
    """What one finished generation produced."""

    text: str
    completion_tokens: int
    finish_reason: str
    """``stop`` (end-of-generation token or a stop string) or ``length`` (max_tokens)."""
    mean_logprob: float | None
    """Mean natural-log probability of the generated tokens; None if none or unknown."""
    first_token_s: float | None
    generate_s: float
    token_logprobs: tuple[TokenLogprob, ...] = ()
    """Per generated token, when the job asked for logprobs (a stop string's token included)."""


def run_job(backend: Backend, job: Job, *, should_stop: Callable[[], str | None],
            emit: Callable[[str], None] | None = None) -> Outcome:
    """Generate for ``job`` on ``backend`` (the caller holds the model); see the module docstring.

    ``should_stop`` returns a rejection reason to end early (raised as :class:`Stop`);
    ``emit`` receives text pieces as soon as they are final (streaming).
    """
    start = time.monotonic()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max((len(s) for s in job.stop), default=1) - 1
    pieces: list[str] = []
    pending = ""
    produced = 0
    logprob_sum, logprob_known = 0.0, True
    first_token_s: float | None = None
    hit_stop_string = False
    recorded: list[TokenLogprob] = []

    def out(text: str) -> None:
        if text:
            pieces.append(text)
            if emit is not None:
                emit(text)

    def stop_at(text: str) -> int:
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        return min(hits) if hits else -1

    tokens = backend.generate_with(job.prompt_tokens, max_tokens=job.max_tokens, temperature=job.temperature,
                                   seed=job.seed, repeat_penalty=job.repeat_penalty, json_schema=job.json_schema,
                                   sampling=job.sampling)
    try:
        for token in _checked(tokens, should_stop, lambda: produced):
            produced += 1
            if first_token_s is None:
                first_token_s = time.monotonic() - start
            if job.logprobs is not None:
                recorded.append(backend.top_logprobs(token, job.logprobs))
            lp = backend.last_token_logprob(token)
            if lp is None:
                logprob_known = False
            else:
                logprob_sum += lp
            pending += decoder.decode(backend.token_bytes(token))
            cut = stop_at(pending)
            if cut >= 0:
                out(pending[:cut])
                pending, hit_stop_string = "", True
                break
            # Keep back what could still become the start of a stop string.
            keep = min(hold, len(pending))
            out(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep:]
        if not hit_stop_string:
            pending += decoder.decode(b"", final=True)
            cut = stop_at(pending)
            hit_stop_string = cut >= 0
            out(pending if cut < 0 else pending[:cut])
    except Stop as stop:  # raised by should_stop or by ``emit`` (client gone mid-write)
        stop.completion_tokens = produced
        raise
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    finish = "length" if produced >= job.max_tokens and not hit_stop_string else "stop"
    return Outcome(text="".join(pieces), completion_tokens=produced, finish_reason=finish,
                   mean_logprob=(logprob_sum / produced) if produced and logprob_known else None,
                   first_token_s=first_token_s, generate_s=time.monotonic() - start, token_logprobs=tuple(recorded))


def _checked(tokens: Iterator[int], should_stop: Callable[[], str | None],
             produced: Callable[[], int]) -> Iterator[int]:
    """``tokens``, asking ``should_stop`` before each one is computed."""
    while True:
        reason = should_stop()
        if reason is not None:
            n = produced()
            raise Stop(reason, f"generation stopped after {n} tokens: {reason}", n)
        try:
            yield next(tokens)
        except StopIteration:
            return
