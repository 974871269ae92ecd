"""Hostile endpoint teachers (issue #20, defect 5 and the endpoint findings beside it).

Imported by run.py (category ``endpoint-drip``); also runnable on its own::

    nice -n 5 .venv/bin/python bench/reliability/endpoint_drip.py

Every case runs the real endpoint client (``EndpointTeacher`` through ``open_generator``)
against a real TCP server on 127.0.0.1 (tests/reliability/drip_server.py) whose reply is
scripted byte by byte. Phases:

1. drips: the status line, header lines, a body with a Content-Length, a body read until
   close, one-byte chunks, a dripped chunk-size line, stall-then-resume with every pause
   shorter than the deadline, an answer a little too slow, silence, a dripped TLS handshake,
   each at several speeds. With ``--timeout`` 1.5 s and one try, each must end with one
   TeacherEndpointError naming the URL and the deadline within the deadline + 4 s; with two
   tries, the retry must happen. A control (a whole answer sent slowly but within the
   deadline) must succeed.
2. size: declared, chunked and until-close bodies over the cap, and one a byte over it, must
   be refused (one connection: not retried) with the cap in the message; one just under it
   is accepted.
3. logprobs and text: NaN, ±Infinity, 1e999, strings, booleans, null, lists, positive values,
   at the chosen token and among alternatives, first and last position; tokens that are not
   text, longer than 1024 characters (1 KiB + 1, 64 KiB, 1 MiB), more positions than tokens
   asked for, lone surrogates in a token or the text: each answer must be marked invalid, its
   cache entry strict JSON. Controls (a 1024-character token, logprob -9999 and 0, more
   alternatives than asked) must be accepted.
4. end to end: ``build_dataset`` over 30 prompts, a third answered with NaN/Infinity logprobs:
   train.jsonl must be strict JSON, the refused rows counted as ``invalid_answer`` and warned
   about, the run still ``top-logprobs``.
5. memory: the 1 MiB-token answer in a child process; its traced peak must stay under
   8 × the answer's size + 4 MiB (the issue measured 1.17 GB).

``tried`` counts every case, controls included; ``faults`` the hostile ones; ``failures``
every check that did not hold, each listed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reliability.drip_server import (DripServer, body_bytes, chunked, completion, drip,  # noqa: E402
                                           forever, head, whole)

DEADLINE_S = 1.5
SLACK_S = 4.0  # a loaded two-core machine; without a total deadline these never end
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}
GOOD = body_bytes(completion())
Plan = Callable[[int, bytes], Any]


class _Tally:
    def __init__(self) -> None:
        self.tried = self.faults = 0
        self.failures: list[str] = []
        self.details: list[str] = []

    def case(self, name: str, problem: str | None, *, hostile: bool = True) -> None:
        self.tried += 1
        self.faults += hostile
        if problem:
            self.failures.append(f"{name}: {problem}")


def _ask(plan: Plan, work: Path, *, attempts: int = 1, timeout: float = DEADLINE_S, max_new_tokens: int = 64,
         scheme: str = "http") -> tuple[Any, BaseException | None, float, int, int]:
    """(generation or None, error or None, seconds, connections, port) of one prompt against ``plan``."""
    from edgepack.distill.endpoint import EndpointConfig
    from edgepack.distill.generate import DecodeParams, open_generator
    from edgepack.distill.teachers import resolve_teacher

    cfg = EndpointConfig(timeout_s=timeout, max_attempts=attempts, top_logprobs=5, **FAST)
    with DripServer(plan) as server:
        t0 = time.monotonic()
        gen, error = None, None
        try:
            with open_generator(resolve_teacher(server.spec(scheme)), work, DecodeParams(max_new_tokens=max_new_tokens),
                                endpoint=cfg) as generate:
                gen = generate([{"role": "user", "content": "Boiler too hot"}])
        except Exception as exc:  # noqa: BLE001 - what it was is the measurement
            error = exc
        return gen, error, time.monotonic() - t0, server.connections, server.port


# --- 1. drips ------------------------------------------------------------------------------------

def _drip_plans() -> dict[str, Plan]:
    plans: dict[str, Plan] = {}
    for every in (0.05, 0.2, 0.5):
        plans[f"status-line every {every}s"] = lambda n, b, e=every: forever(b"HTTP/1.1 200 OK\r\n", e)
        plans[f"header-lines every {every}s"] = lambda n, b, e=every: forever(b"X-Pad: a\r\n", e,
                                                                              first=b"HTTP/1.1 200 OK\r\n")
        plans[f"body (content-length) every {every}s"] = lambda n, b, e=every: [(0.0, head(len(GOOD))),
                                                                                 *drip(GOOD, e)]
        plans[f"body until close every {every}s"] = lambda n, b, e=every: [(0.0, head(None)), *drip(GOOD, e)]
        plans[f"one-byte chunks every {every}s"] = lambda n, b, e=every: [(0.0, head(chunked=True)),
                                                                          *chunked(GOOD, 1, e)]
        plans[f"chunk-size line dripped every {every}s"] = lambda n, b, e=every: forever(b"0", e,
                                                                                         first=head(chunked=True))
        plans[f"TLS record dripped every {every}s"] = lambda n, b, e=every: forever(b"\x02", e,
                                                                                    first=b"\x16\x03\x03\x40\x00")
    for pause in (0.4, 0.9, 1.4):  # every pause under the deadline (and the per-read timeout)
        plans[f"stall-then-resume, pauses of {pause}s"] = lambda n, b, p=pause: [
            (p, head(len(GOOD))), *((p, GOOD[i:i + 16]) for i in range(0, len(GOOD), 16))]
    plans["headers whole, then silence"] = lambda n, b: [(0.0, head(len(GOOD))), (3600.0, b"")]
    plans["half the body, then silence"] = lambda n, b: [(0.0, head(len(GOOD)) + GOOD[:len(GOOD) // 2]),
                                                        (3600.0, b"")]
    plans["silence"] = lambda n, b: [(3600.0, b"")]
    plans["status line, then silence"] = lambda n, b: [(0.0, b"HTTP/1.1 200 OK\r\n"), (3600.0, b"")]
    plans["a whole answer, 20% too slow"] = lambda n, b: [(0.0, head(len(GOOD))), *_spread(GOOD, DEADLINE_S * 1.2)]
    return plans


def _spread(body: bytes, seconds: float, pieces: int = 12) -> list[tuple[float, bytes]]:
    """``body`` in ``pieces`` parts spread evenly over ``seconds``."""
    step = math.ceil(len(body) / pieces)
    return [(seconds / pieces, body[i:i + step]) for i in range(0, len(body), step)]


def _drips(t: _Tally, work: Path) -> None:
    plans = _drip_plans()

    def run(item: tuple[int, str, Plan]) -> tuple[str, str | None, float]:
        i, name, plan = item
        scheme = "https" if name.startswith("TLS") else "http"
        gen, error, seconds, _, port = _ask(plan, work / f"drip-{i}", scheme=scheme)
        msg = str(error) if error is not None else ""
        if error is None:
            return name, "an answer came back", seconds
        if type(error).__name__ != "TeacherEndpointError":
            return name, f"{type(error).__name__}: {msg[:120]}", seconds
        if f"127.0.0.1:{port}/v1/chat/completions" not in msg or f"within {DEADLINE_S:g} s" not in msg:
            return name, f"unclear error: {msg[:160]}", seconds
        if "--timeout" not in (error.hint or ""):  # type: ignore[attr-defined]
            return name, "the hint does not name --timeout", seconds
        if seconds > DEADLINE_S + SLACK_S:
            return name, f"gave up after {seconds:.1f} s", seconds
        return name, None, seconds

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, [(i, n, p) for i, (n, p) in enumerate(plans.items())]))
    for name, problem, _ in results:
        t.case(f"drip {name}", problem)
    worst = max(s for _, _, s in results)
    t.details.append(f"drip patterns: {len(results)} at --timeout {DEADLINE_S:g} with one try; every one cut off, "
                     f"slowest give-up {worst:.1f} s")
    # Two tries: the retry policy applies to a try that ran out of time.
    _, error, seconds, conns, _ = _ask(plans["body (content-length) every 0.2s"], work / "drip-retry", attempts=2)
    t.case("drip with two tries", None if error is not None and conns == 2 and "2 attempts" in str(error)
           and seconds < 2 * DEADLINE_S + SLACK_S else f"{conns} connections, {seconds:.1f} s, {error!s:.120}")
    # Control: a whole answer sent slowly, but within the deadline.
    gen, error, *_ = _ask(lambda n, b: [(0.0, head(len(GOOD))), *_spread(GOOD, DEADLINE_S * 0.4)], work
                          / "drip-control")
    t.case("control: a slow answer within the deadline", None if gen is not None else f"refused: {error!s:.160}",
           hostile=False)
    t.details.append(f"two tries: {conns} connections, gave up after {seconds:.1f} s; an answer spread over "
                     f"{DEADLINE_S * 0.4:g} s accepted")


# --- 2. size -------------------------------------------------------------------------------------

def _sizes(t: _Tally, work: Path) -> None:
    from edgepack.distill.endpoint import response_cap

    cap = response_cap(64)
    mib = 0x100000
    over = body_bytes(completion("x" * (cap + 1)))[: cap + 1]
    cases: dict[str, tuple[Plan, bool]] = {
        "declared 100 MiB": (lambda n, b: [(0.0, head(100 * mib)), (3600.0, b"")], True),
        "declared 2^63": (lambda n, b: [(0.0, head(2 ** 63)), (3600.0, b"")], True),
        "chunked 20 MiB": (lambda n, b: [(0.0, head(chunked=True)),
                                         *((0.0, b"100000\r\n" + b" " * mib + b"\r\n") for _ in range(20))], True),
        "until close 20 MiB": (lambda n, b: [(0.0, head(None)), *((0.0, b" " * mib) for _ in range(20))], True),
        "one byte over the cap": (lambda n, b: whole(over), True),
        "logprobs for 100000 positions (8 MiB)": (
            lambda n, b: whole(body_bytes(completion(logprobs=[_lp("a", -0.1)] * 100000))), True),
    }
    for name, (plan, _) in cases.items():
        _, error, seconds, conns, port = _ask(plan, work / "size", timeout=60)
        ok = (error is not None and "more than" in str(error) and f"127.0.0.1:{port}" in str(error) and conns == 1
              and seconds < SLACK_S + 2)
        t.case(f"size {name}", None if ok else f"{conns} connections, {seconds:.1f} s, {error!s:.160}")
    text = "y" * (cap - len(body_bytes(completion(""))) - 64)
    gen, error, *_ = _ask(lambda n, b: whole(body_bytes(completion(text))), work / "size-ok", timeout=60)
    t.case("control: an answer just under the cap", None if gen is not None else f"refused: {error!s:.160}",
           hostile=False)
    t.details.append(f"oversized answers: {len(cases)} refused at once and not retried (cap {cap:,} bytes for 64 "
                     "tokens asked for; 16 MiB at most)")


# --- 3. logprobs and text ------------------------------------------------------------------------

def _lp(token: Any, logprob: Any, alts: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob,
            "top_logprobs": [{"token": a, "logprob": v} for a, v in (alts or [(token, logprob)])]}


def _logprob_cases() -> dict[str, tuple[list[dict[str, Any]], str, bool]]:
    """name → (logprobs content, answer text, expected invalid)."""
    text = "Category: thermal"
    ok = [_lp("Category:", -0.01), _lp(" thermal", -0.2, [(" thermal", -0.2), (" network", -2.5)])]
    bad_values: dict[str, Any] = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf"),
                                  "string NaN": "NaN", "string -inf": "-inf", "string number": "-0.5",
                                  "true": True, "false": False, "null": None, "list": [-0.1], "object": {"v": -1},
                                  "positive 3.5": 3.5, "huge positive": 1e300, "400-digit integer": -10 ** 400}
    cases: dict[str, tuple[list[dict[str, Any]], str, bool]] = {}
    for label, value in bad_values.items():
        cases[f"chosen logprob {label}, first position"] = ([_lp("Category:", value), ok[1]], text, True)
        cases[f"chosen logprob {label}, last position"] = ([ok[0], _lp(" thermal", value)], text, True)
        cases[f"alternative logprob {label}"] = ([ok[0], _lp(" thermal", -0.2, [(" thermal", -0.2), (" x", value)])],
                                                 text, True)
    for label, size in (("1 KiB + 1", 1025), ("64 KiB", 1 << 16), ("1 MiB", 1 << 20)):
        cases[f"chosen token of {label}"] = ([_lp("x" * size, -0.1), ok[1]], text, True)
        cases[f"alternative token of {label}"] = ([ok[0], _lp(" thermal", -0.2, [("y" * size, -1.0)])], text, True)
    for label, token in (("int", 7), ("null", None), ("list", ["a"]), ("lone surrogate", "a\ud800")):
        cases[f"chosen token {label}"] = ([_lp(token, -0.1), ok[1]], text, True)
        cases[f"alternative token {label}"] = ([ok[0], _lp(" thermal", -0.2, [(token, -1.0)])], text, True)
    cases["66 positions for 64 tokens"] = ([_lp("a", -0.1)] * 66, text, True)
    cases["1000 positions"] = ([_lp("a", -0.1)] * 1000, text, True)
    cases["a position that is not an object"] = ([ok[0], "thermal"], text, True)
    cases["top_logprobs not a list"] = ([ok[0], {"token": "a", "logprob": -1.0, "top_logprobs": "x"}], text, True)
    cases["text with a lone surrogate"] = (ok, "Category: therm\ud800al", True)
    # controls
    cases["control: a 1024-character token"] = ([_lp("z" * 1024, -0.1), ok[1]], text, False)
    cases["control: logprob -9999 (OpenAI's -inf)"] = ([ok[0], _lp(" thermal", -9999.0)], text, False)
    cases["control: logprob 0"] = ([_lp("Category:", 0), ok[1]], text, False)
    cases["control: 20 alternatives for 5 asked"] = ([_lp("a", -0.1, [(f"t{i}", -i - 0.5) for i in range(20)])],
                                                     text, False)
    cases["control: 64 positions for 64 tokens"] = ([_lp("a", -0.1)] * 64, text, False)
    return cases


def _logprobs(t: _Tally, work: Path) -> None:
    from edgepack.distill.endpoint import is_invalid_answer

    cases = _logprob_cases()
    for i, (name, (content, text, invalid)) in enumerate(cases.items()):
        reply = body_bytes(completion(text, logprobs=content))
        folder = work / f"lp-{i}"
        gen, error, *_ = _ask(lambda n, b, r=reply: whole(r), folder, timeout=30)
        if gen is None:
            t.case(name, f"{type(error).__name__}: {error!s:.160}", hostile=invalid)
            continue
        problem = None
        if invalid and not (is_invalid_answer(gen) and gen.token_logprobs is None):
            problem = "accepted"
        elif not invalid and is_invalid_answer(gen):
            problem = f"refused: {gen.no_logprobs_reason}"
        try:
            for path in folder.glob("*.json"):
                json.loads(path.read_text(), parse_constant=_not_json)
                path.read_text(encoding="utf-8").encode("utf-8")
        except (ValueError, UnicodeError) as exc:
            problem = f"cache entry not strict JSON ({exc})"
        t.case(f"logprobs {name}", problem, hostile=invalid)
    hostile = sum(v[2] for v in cases.values())
    t.details.append(f"logprobs and text: {hostile} hostile answers marked invalid, {len(cases) - hostile} controls "
                     "accepted; every cache entry strict JSON")


def _not_json(name: str) -> None:
    raise ValueError(f"{name} in the file")


# --- 4. end to end -------------------------------------------------------------------------------

def _end_to_end(t: _Tally, work: Path) -> None:
    from edgepack.constants import DATA_DIR, TRAIN_FILE
    from edgepack.distill.data import build_dataset
    from edgepack.distill.endpoint import EndpointConfig

    good = [_lp("Answer", -0.01), _lp(" ok", -0.3)]
    variants = [float("nan"), float("inf"), float("-inf")]

    def plan(n: int, body: bytes) -> list[tuple[float, bytes]]:
        prompt = json.loads(body)["messages"][-1]["content"]
        i = int(prompt.split()[1])
        content = [_lp("Answer", variants[i % 3]), good[1]] if i % 3 == 0 else good
        return whole(body_bytes(completion(f"Answer to {prompt}.", logprobs=content)))

    data = work / "e2e.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Alarm {i} on line {i % 4}"}) + "\n" for i in range(30)))
    run = work / "e2e-run"
    problem = None
    try:
        with DripServer(plan) as server:
            report = build_dataset(teacher=server.spec(), data=data, run_dir=run,
                                   endpoint=EndpointConfig(concurrency=3, **FAST))
        rows = [json.loads(line, parse_constant=_not_json)
                for line in (run / DATA_DIR / TRAIN_FILE).read_text(encoding="utf-8").splitlines()]
        refused = report["drop_reasons"]["invalid_answer"]
        bad_in_train = [r for r in rows if int(r["messages"][-1]["content"].split()[1]) % 3 == 0]
        if bad_in_train or refused != report["train_prompts"] - len(rows) or not refused:
            problem = f"{len(bad_in_train)} NaN rows kept, {refused} counted"
        elif report["distillation"] != "top-logprobs" or not any("invalid" in w for w in report["warnings"]):
            problem = f"mode {report['distillation']}, warnings {report['warnings']}"
        t.details.append(f"build_dataset, 30 prompts, every third answered with NaN/Infinity: {refused} training rows "
                         f"refused (invalid_answer) and warned about, {len(rows)} kept, train.jsonl strict JSON")
    except Exception as exc:  # noqa: BLE001
        problem = f"{type(exc).__name__}: {exc!s:.160}"
    t.case("build_dataset with NaN/Infinity answers", problem)


# --- 5. memory -----------------------------------------------------------------------------------

def _memory(t: _Tally, work: Path) -> None:
    from tests.reliability.test_endpoint_drip import BAD_LOGPROBS, MEASURE

    reply = work / "mb-token.json"
    reply.write_bytes(body_bytes(completion(logprobs=BAD_LOGPROBS["megabyte-token"])))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(reply), str(work / "mb-cache")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    problem = None
    try:
        result = json.loads(out.stdout.splitlines()[-1])
        size = reply.stat().st_size
        if not result["reason"].startswith("the endpoint's answer is invalid") or result["peak"] > 8 * size + (4 << 20):
            problem = f"peak {result['peak']:,} bytes, reason {result['reason']!r}"
        t.details.append(f"1 MiB tokens ({size / 2**20:.1f} MiB answer): refused, traced peak "
                         f"{result['peak'] / 2**20:.1f} MiB (was 1.17 GB)")
    except (IndexError, ValueError, KeyError):
        problem = f"the child failed: {out.stderr[-300:]}"
    t.case("memory of a 1 MiB-token answer", problem)


def endpoint_drip_category(work: Path) -> dict[str, Any]:
    """Run every phase (see the module docstring); the run.py category dict."""
    t0 = time.monotonic()
    work = Path(work) / "endpoint-drip"
    work.mkdir(parents=True, exist_ok=True)
    t = _Tally()
    for phase in (_drips, _sizes, _logprobs, _end_to_end, _memory):
        phase(t, work)
    return {"tried": t.tried, "faults": t.faults, "failures": len(t.failures), "failure_list": t.failures,
            "details": t.details, "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    print(json.dumps(endpoint_drip_category(Path(tempfile.mkdtemp())), indent=1))
