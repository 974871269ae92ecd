"""Counters, gauges and histograms of the model server, rendered in Prometheus text format.

``GET /metrics`` returns :meth:`Metrics.render`. No client library: the exposition format
(version 0.0.4) is a few lines of text, and the server must not grow a dependency for it.

Label values are closed sets chosen by the server (endpoint names from the route table,
status codes, rejection reasons from :data:`REJECTION_REASONS`), never request text, so a
client cannot blow up the number of series.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Why a request was refused or ended early; one counter series each.
REJECTION_REASONS: dict[str, str] = {
    "queue_full": "the model was busy and the wait queue was full (429)",
    "deadline": "the per-request deadline passed, in the queue or while generating (504)",
    "client_disconnect": "the client went away; generation stopped (recorded as status 499)",
    "body_too_large": "request body over the limit (413)",
    "invalid_request": "malformed JSON or invalid parameters (400)",
    "context_overflow": "prompt (plus max_tokens) does not fit the context (400)",
    "unauthorized": "missing or wrong API key (401)",
    "forbidden_host": "Host header not allowed on a loopback server without a key (403)",
    "unsupported_media_type": "POST body not sent as application/json (415)",
    "not_ready": "model still loading (503)",
    "too_many_connections": "connection caps: a new connection displaced the oldest one still sending its "
                            "request (per client address or in all), or max_connections requests were being "
                            "handled (503)",
    "request_timeout": "the request line and headers, or the body, did not arrive within their deadline (408)",
    "headers_too_large": "request line and headers over 64 KiB (431)",
    "shutting_down": "server stopping (503)",
    "not_found": "unknown path or model (404)",
    "method_not_allowed": "wrong method for the path (405)",
    "model_error": "the model or its chat template failed (500)",
    "internal_error": "an unexpected server error (500)",
}
FALLBACK_OUTCOMES = ("student", "teacher", "teacher_error")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` upper bounds, plus +Inf)."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {self.total!r}")
        out.append(f"{name}_count{braces} {running}")
        return out


class Metrics:
    """Everything ``/metrics`` shows; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.rejections: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)
        self.fallbacks: dict[str, int] = dict.fromkeys(FALLBACK_OUTCOMES, 0)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.queue_depth = 0
        self.running = 0
        self.connections = 0
        self.pending = 0
        self.model_loaded = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def reject(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise KeyError(f"unknown rejection reason {reason!r}")
        with self._lock:
            self.rejections[reason] += 1

    def fallback(self, outcome: str) -> None:
        if outcome not in FALLBACK_OUTCOMES:
            raise KeyError(f"unknown fallback outcome {outcome!r}")
        with self._lock:
            self.fallbacks[outcome] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def timing(self, endpoint: str, total_s: float, ttft_s: float | None) -> None:
        with self._lock:
            self.latency.setdefault(endpoint, Histogram()).observe(total_s)
            if ttft_s is not None:
                self.ttft.setdefault(endpoint, Histogram()).observe(ttft_s)

    def gauges(self, *, queue_depth: int | None = None, running: int | None = None,
               connections_delta: int = 0, pending: int | None = None, model_loaded: bool | None = None) -> None:
        with self._lock:
            if pending is not None:
                self.pending = pending
            if queue_depth is not None:
                self.queue_depth = queue_depth
            if running is not None:
                self.running = running
            if model_loaded is not None:
                self.model_loaded = int(model_loaded)
            self.connections += connections_delta

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            lines = [
                "# HELP edgepack_requests_total HTTP requests by endpoint and status code (499 = client went away).",
                "# TYPE edgepack_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'edgepack_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += ["# HELP edgepack_rejections_total Requests refused or ended early, by reason.",
                      "# TYPE edgepack_rejections_total counter"]
            lines += [f'edgepack_rejections_total{{reason="{r}"}} {n}' for r, n in self.rejections.items()]
            lines += ["# HELP edgepack_prompt_tokens_total Prompt tokens of requests that reached the model.",
                      "# TYPE edgepack_prompt_tokens_total counter",
                      f"edgepack_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP edgepack_completion_tokens_total Tokens generated by the model (cancelled requests included).",
                      "# TYPE edgepack_completion_tokens_total counter",
                      f"edgepack_completion_tokens_total {self.completion_tokens}",
                      "# HELP edgepack_fallback_total Low-confidence handling: answer kept, teacher used, teacher failed.",
                      "# TYPE edgepack_fallback_total counter"]
            lines += [f'edgepack_fallback_total{{outcome="{o}"}} {n}' for o, n in self.fallbacks.items()]
            for name, help_text, table in (
                ("edgepack_request_duration_seconds", "Time from request to the last byte of a generation.",
                 self.latency),
                ("edgepack_time_to_first_token_seconds", "Time from request to the first generated token.",
                 self.ttft),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for endpoint, hist in sorted(table.items()):
                    lines += hist.lines(name, f'endpoint="{endpoint}"')
            for name, help_text, value in (
                ("edgepack_queue_depth", "Requests waiting for the model.", self.queue_depth),
                ("edgepack_generations_running", "Generations on the model now (0 or 1).", self.running),
                ("edgepack_open_connections", "Requests being handled (a handler thread each).", self.connections),
                ("edgepack_pending_connections", "Connections still sending their request (no thread yet).",
                 self.pending),
                ("edgepack_model_loaded", "1 once the model has loaded and /health is ok.", self.model_loaded),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
