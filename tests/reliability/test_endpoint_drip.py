"""Hostile endpoint teachers: slow drips, oversized answers, NaN/Infinity logprobs, giant tokens.

Issue #20 defect 5: a server that sends its answer a byte at a time kept ``distill data``
waiting forever at ``--timeout 5``, because a socket timeout bounds each read, not the
request. Here a real TCP server (tests/reliability/drip_server.py) drips headers, bodies and
chunks; every request must end within its total deadline with one clear error. The full
counts of these patterns run in bench/reliability/endpoint_drip.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import DATA_DIR, TEACHER_CACHE_DIR, TRAIN_FILE
from edgepack.distill.data import build_dataset
from edgepack.distill.endpoint import MAX_RESPONSE_BYTES, EndpointConfig, is_invalid_answer, response_cap
from edgepack.distill.generate import DecodeParams, open_generator
from edgepack.distill.teachers import resolve_teacher
from edgepack.errors import TeacherEndpointError
from tests.reliability.drip_server import (DripServer, body_bytes, chunked, completion, drip, forever, head,
                                           whole)

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}
GOOD = body_bytes(completion())
# Generous: 2 s deadlines, at most 2 tries. Without a total deadline these never end.
HANG_BOUND_S = 15.0

DRIPS = {
    # the status line and headers, a byte every 0.5 s, without end
    "status-line": lambda n, body: forever(b"HTTP/1.1 200 OK\r\n", 0.5),
    "header-lines": lambda n, body: forever(b"X-Padding: a\r\n", 0.5, first=b"HTTP/1.1 200 OK\r\n"),
    # proper headers, then the body a byte every 0.5 s
    "body": lambda n, body: [(0.0, head(len(GOOD))), *drip(GOOD, 0.5)],
    "body-until-close": lambda n, body: [(0.0, head(None)), *drip(GOOD, 0.5)],
    "chunks": lambda n, body: [(0.0, head(chunked=True)), *chunked(GOOD, 1, 0.5)],
    # stalls shorter than the deadline, each followed by a little progress: a per-read timeout
    # of 2 s never fires, yet the answer takes 1.5 s × 40
    "stall-then-resume": lambda n, body: [(1.5, head(len(GOOD))), *((1.5, GOOD[i:i + 4])
                                                                    for i in range(0, len(GOOD), 4))],
    # accepted, then nothing at all
    "silent": lambda n, body: [(3600.0, b"")],
}


def _ask(server: DripServer, cfg: EndpointConfig, tmp_path: Path, scheme: str = "http",
         params: DecodeParams | None = None) -> Any:
    with open_generator(resolve_teacher(server.spec(scheme)), tmp_path / "cache", params or DecodeParams(),
                        endpoint=cfg) as generate:
        return generate([{"role": "user", "content": "Boiler too hot"}])


@pytest.mark.parametrize("pattern", sorted(DRIPS))
def test_a_drip_is_cut_at_the_total_deadline(pattern: str, tmp_path: Path) -> None:
    with DripServer(DRIPS[pattern]) as server:
        t0 = time.monotonic()
        with pytest.raises(TeacherEndpointError) as err:
            _ask(server, EndpointConfig(timeout_s=2, max_attempts=2, **FAST), tmp_path)
        elapsed = time.monotonic() - t0
        assert server.connections == 2  # the retry policy still applies to a request that ran out of time
    msg = str(err.value)
    assert elapsed < HANG_BOUND_S, f"{pattern}: gave up after {elapsed:.1f} s"
    assert f"http://127.0.0.1:{server.port}/v1/chat/completions" in msg and "\n" not in msg
    assert "within 2 s" in msg and "2 attempts" in msg and "--timeout" in err.value.hint
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_tls_handshake_drip_is_cut_too(tmp_path: Path) -> None:
    """An https URL whose server drips the start of a TLS record: the handshake is under the deadline."""
    with DripServer(lambda n, body: forever(b"\x02", 0.5, first=b"\x16\x03\x03\x40\x00")) as server:
        t0 = time.monotonic()
        with pytest.raises(TeacherEndpointError, match="within 2 s"):
            _ask(server, EndpointConfig(timeout_s=2, max_attempts=1, **FAST), tmp_path, scheme="https")
        assert time.monotonic() - t0 < HANG_BOUND_S


def test_cli_timeout_2_gives_up_on_a_drip_with_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Alarm {i}"}) + "\n" for i in range(6)))
    run = tmp_path / "run"
    env = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "300"}
    with DripServer(DRIPS["body"]) as server:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "edgepack", "distill", "data", "--teacher", server.spec(),
                              "--data", str(data), "--out", str(run), "--timeout", "2"],
                             capture_output=True, text=True, env=env, timeout=240)
        elapsed = time.monotonic() - t0
    # 5 tries × 2 s, the backoff between them (at most 7.5 s) and the interpreter's start-up
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert out.returncode == 2, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert f"127.0.0.1:{server.port}/v1/chat/completions" in errors[0] and "within 2 s" in errors[0]
    assert "--timeout" in out.stderr
    assert not (run / DATA_DIR).exists()


# --- size --------------------------------------------------------------------------------------------

OVERSIZED = {
    "declared": lambda n, body: [(0.0, head(100 * 1024 * 1024)), (0.0, b"{" * 1024), (3600.0, b"")],
    "chunked": lambda n, body: [(0.0, head(chunked=True)),
                                *((0.0, b"100000\r\n" + b" " * 0x100000 + b"\r\n") for _ in range(20))],
    "until-close": lambda n, body: [(0.0, head(None)), *((0.0, b" " * 0x100000) for _ in range(20))],
}


@pytest.mark.parametrize("pattern", sorted(OVERSIZED))
def test_an_oversized_answer_is_refused_at_once(pattern: str, tmp_path: Path) -> None:
    with DripServer(OVERSIZED[pattern]) as server:
        t0 = time.monotonic()
        with pytest.raises(TeacherEndpointError) as err:
            _ask(server, EndpointConfig(timeout_s=60, max_attempts=3, **FAST), tmp_path)
        assert time.monotonic() - t0 < HANG_BOUND_S
        assert server.connections == 1  # a retry would not shrink it
    cap = response_cap(DecodeParams().max_new_tokens)
    assert cap < MAX_RESPONSE_BYTES and f"more than {cap / 2**20:.3g} MiB" in str(err.value)
    assert f"127.0.0.1:{server.port}" in str(err.value) and "new tokens" in str(err.value)


# --- logprobs ------------------------------------------------------------------------------------------

def _lp(token: str, logprob: Any, alts: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob,
            "top_logprobs": [{"token": t, "logprob": v} for t, v in (alts or [(token, logprob)])]}


GOOD_LOGPROBS = [_lp("Category:", -0.01), _lp(" thermal", -0.2, [(" thermal", -0.2), (" network", -2.0)])]
BAD_LOGPROBS = {
    "nan": [_lp("Category:", float("nan")), GOOD_LOGPROBS[1]],
    "infinity": [_lp("Category:", float("inf")), GOOD_LOGPROBS[1]],
    "minus-infinity": [GOOD_LOGPROBS[0], _lp(" thermal", float("-inf"))],
    "nan-alternative": [GOOD_LOGPROBS[0], _lp(" thermal", -0.2, [(" thermal", -0.2), (" x", float("nan"))])],
    "string": [_lp("Category:", "nan"), GOOD_LOGPROBS[1]],
    "bool": [_lp("Category:", True), GOOD_LOGPROBS[1]],
    "null": [_lp("Category:", None), GOOD_LOGPROBS[1]],
    "positive": [_lp("Category:", 3.5), GOOD_LOGPROBS[1]],
    "megabyte-token": [_lp("x" * (1 << 20), -0.1), GOOD_LOGPROBS[1]],
    "megabyte-alternative": [GOOD_LOGPROBS[0], _lp(" thermal", -0.2, [("y" * (1 << 20), -1.0)])],
    "token-not-text": [_lp(["a"] * 3, -0.1), GOOD_LOGPROBS[1]],
    "too-many-tokens": [_lp("a", -0.1)] * 5000,
}


@pytest.mark.parametrize("case", sorted(BAD_LOGPROBS))
def test_invalid_logprobs_are_refused(case: str, tmp_path: Path) -> None:
    reply = body_bytes(completion(logprobs=BAD_LOGPROBS[case]))
    with DripServer(lambda n, body: whole(reply)) as server:
        gen = _ask(server, EndpointConfig(top_logprobs=5, **FAST), tmp_path, params=DecodeParams(max_new_tokens=64))
    assert gen.token_logprobs is None and gen.top_logprobs is None and is_invalid_answer(gen)
    assert gen.text == completion()["choices"][0]["message"]["content"]
    for path in (tmp_path / "cache").iterdir():  # what the cache keeps is strict JSON
        json.loads(path.read_text(), parse_constant=_refuse)


MEASURE = r"""
import json, sys, tracemalloc
from pathlib import Path
from edgepack.distill.endpoint import EndpointConfig
from edgepack.distill.generate import DecodeParams, open_generator
from edgepack.distill.teachers import resolve_teacher
from tests.reliability.drip_server import DripServer, whole

reply = Path(sys.argv[1]).read_bytes()
with DripServer(lambda n, body: whole(reply)) as server, open_generator(
        resolve_teacher(server.spec()), Path(sys.argv[2]), DecodeParams(max_new_tokens=64),
        endpoint=EndpointConfig(top_logprobs=5, max_attempts=1)) as generate:
    generate([{"role": "user", "content": "warm-up"}])  # imports and first-use set-up, outside the window
    tracemalloc.start()
    gen = generate([{"role": "user", "content": "Boiler too hot"}])
    print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "reason": gen.no_logprobs_reason}))
"""


@pytest.mark.parametrize("case", ["megabyte-token", "megabyte-alternative", "too-many-tokens"])
def test_giant_tokens_are_refused_cheaply(case: str, tmp_path: Path) -> None:
    """Issue #20: 1 MB "tokens" cost 1.17 GB. Measured in a child process (nothing else allocating)."""
    reply = tmp_path / "reply.json"
    reply.write_bytes(body_bytes(completion(logprobs=BAD_LOGPROBS[case])))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(reply), str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["reason"].startswith("the endpoint's answer is invalid")
    size = reply.stat().st_size
    assert result["peak"] < 8 * size + (4 << 20), f"{result['peak'] / 2**20:.0f} MiB for a {size / 2**20:.1f} MiB answer"


def test_valid_logprobs_still_pass(tmp_path: Path) -> None:
    reply = body_bytes(completion(logprobs=GOOD_LOGPROBS))
    with DripServer(lambda n, body: whole(reply)) as server:
        gen = _ask(server, EndpointConfig(top_logprobs=5, **FAST), tmp_path)
    assert gen.token_logprobs == [("Category:", -0.01), (" thermal", -0.2)] and not is_invalid_answer(gen)


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_nan_logprobs_never_reach_train_jsonl(tmp_path: Path) -> None:
    """Rows whose logprobs are NaN/Infinity are refused, counted and announced; train.jsonl is strict JSON."""
    def plan(n: int, body: bytes) -> list[tuple[float, bytes]]:
        prompt = json.loads(body)["messages"][-1]["content"]
        bad = BAD_LOGPROBS[["nan", "infinity", "minus-infinity"][n % 3]] if "odd" in prompt else GOOD_LOGPROBS
        return whole(body_bytes(completion(f"Answer to {prompt}.", logprobs=bad)))

    data = tmp_path / "p.jsonl"
    prompts = [f"Alarm {i} {'odd' if i % 2 else 'even'}" for i in range(12)]
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    run = tmp_path / "run"
    with DripServer(plan) as server:
        report = build_dataset(teacher=server.spec(), data=data, run_dir=run,
                               endpoint=EndpointConfig(concurrency=2, **FAST))
    lines = (run / DATA_DIR / TRAIN_FILE).read_text().splitlines()
    rows = [json.loads(line, parse_constant=_refuse) for line in lines]
    train_odd = report["train_prompts"] - len(rows)
    assert train_odd > 0 and all("odd" not in r["messages"][-1]["content"] for r in rows)
    assert report["drop_reasons"]["invalid_answer"] == train_odd
    assert report["distillation"] == "top-logprobs"  # the refused rows do not degrade the others
    assert any("invalid" in w and str(train_odd) in w for w in report["warnings"])
    for path in (run / TEACHER_CACHE_DIR).rglob("*.json"):
        json.loads(path.read_text(), parse_constant=_refuse)


@pytest.mark.parametrize("pattern", ["status-line", "body", "stall-then-resume", "silent"])
def test_the_servers_fallback_teacher_has_a_total_deadline_too(pattern: str) -> None:
    """``serve --fallback`` asked its teacher with a per-read timeout only: a drip held the request."""
    from edgepack.errors import RuntimeFailure
    from edgepack.runtime.server.fallback import ask_teacher, parse_fallback

    with DripServer(DRIPS[pattern]) as server:
        t0 = time.monotonic()
        with pytest.raises(RuntimeFailure, match="within 2 s"):
            ask_teacher(parse_fallback(server.spec()), "chat",
                        {"messages": [{"role": "user", "content": "Boiler too hot"}]}, timeout_s=2)
        assert time.monotonic() - t0 < HANG_BOUND_S


def test_the_fallback_teacher_still_answers_inside_its_deadline() -> None:
    from edgepack.runtime.server.fallback import ask_teacher, parse_fallback

    with DripServer(lambda n, body: whole(GOOD)) as server:
        answer = ask_teacher(parse_fallback(server.spec()), "chat",
                             {"messages": [{"role": "user", "content": "Boiler too hot"}]}, timeout_s=5)
    assert answer["choices"][0]["message"]["content"] == completion()["choices"][0]["message"]["content"]
