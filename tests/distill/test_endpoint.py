"""Endpoint teachers (openai:URL#MODEL): retries, timeouts, cache, logprobs, concurrency, keys.

A mock OpenAI-compatible server (stdlib http.server in a thread) is scripted per test and
records every request; the last tests run the real thing: ``edgepack serve`` on the tiny GGUF
(and, marked slow, on the embedded teacher) answering ``build_dataset`` end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import DATA_DIR, DATA_REPORT, HOLDOUT_FILE, TEACHER_CACHE_DIR, TEACHER_DIR, TRAIN_FILE
from edgepack.distill.data import build_dataset, read_jsonl
from edgepack.distill.endpoint import EndpointConfig
from edgepack.distill.generate import DecodeParams, open_generator
from edgepack.distill.teachers import resolve_teacher
from edgepack.errors import DataError, TeacherEndpointError, UsageError
from tests.runtime.server.helpers import launch

FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}
PROMPTS = ["Motor M-1 tripped on overcurrent", "Pump P-2 bearing noisy", "Air header at 4 bar",
           "PLC-4 offline", "Boiler too hot", "Gauge PI-5 stuck", "Chiller warm", "Switch port down",
           "Breaker CB-9 open", "Fan vibration high"]


Reply = tuple[int, Any]  # (status, JSON body); a body of None closes the connection unanswered


def completion(text: str, *, logprobs: int | None = None, finish: str = "stop") -> dict[str, Any]:
    """An OpenAI chat.completion; with ``logprobs`` = K, per-token logprobs with K+2 alternatives."""
    words = text.split(" ")
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {"content": [
            {"token": w, "logprob": -0.1 * i, "bytes": list(w.encode()),
             "top_logprobs": [{"token": f"{w}{j}", "logprob": -0.1 * i - j} for j in range(logprobs + 2)]}
            for i, w in enumerate(words)]}
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}}


class MockEndpoint:
    """A scripted OpenAI-compatible server; ``script(request, n)`` returns the reply to request n."""

    def __init__(self, script: Callable[[dict[str, Any], int], Reply], delay_s: float = 0.0) -> None:
        self.script, self.delay_s = script, delay_s
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with mock.lock:
                    n = len(mock.requests)
                    mock.requests.append({"path": self.path, "body": body})
                    mock.auth.append(self.headers.get("Authorization"))
                    mock.in_flight += 1
                    mock.max_in_flight = max(mock.max_in_flight, mock.in_flight)
                try:
                    time.sleep(mock.delay_s)
                    status, reply = mock.script(body, n)
                finally:
                    with mock.lock:
                        mock.in_flight -= 1
                if reply is None:
                    self.close_connection = True
                    return
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def spec(self) -> str:
        return f"openai:http://127.0.0.1:{self.server.server_address[1]}/v1#teacher-m"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def mock() -> Iterator[Callable[..., MockEndpoint]]:
    servers: list[MockEndpoint] = []

    def make(script: Callable[[dict[str, Any], int], Reply], delay_s: float = 0.0) -> MockEndpoint:
        servers.append(MockEndpoint(script, delay_s))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def echo(logprobs: bool = True) -> Callable[[dict[str, Any], int], Reply]:
    """Answers every prompt with a fixed two-word text, with logprobs when asked (and ``logprobs``)."""
    def script(body: dict[str, Any], n: int) -> Reply:
        k = body.get("top_logprobs") if logprobs and body.get("logprobs") else None
        return 200, completion(f"answer to {body['messages'][-1]['content']}", logprobs=k)
    return script


def prompts_file(path: Path, n: int = len(PROMPTS)) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:n]))
    return path


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# --- one request --------------------------------------------------------------------------------

def test_retries_500_and_429_then_succeeds(mock, tmp_path: Path) -> None:
    replies = [(500, {"error": {"message": "boom"}}), (429, {"error": {"message": "slow down"}}),
               (200, completion("Category: thermal", logprobs=3))]
    server = mock(lambda body, n: replies[n])
    cfg = EndpointConfig(top_logprobs=3, **FAST)
    with open_generator(resolve_teacher(server.spec), tmp_path / "cache", DecodeParams(max_new_tokens=7, seed=3),
                        endpoint=cfg) as generate:
        gen = generate([{"role": "user", "content": "Boiler too hot"}])
        stats = generate.describe()
    assert (gen.text, gen.tokens, gen.finished, gen.no_logprobs_reason) == ("Category: thermal", 2, True, None)
    assert gen.token_logprobs == [("Category:", 0.0), ("thermal", -0.1)]
    assert [len(alts) for alts in gen.top_logprobs] == [3, 3]  # the mock sent 5; trimmed to K
    assert (stats["requests"], stats["retries"]) == (3, 2)
    body = server.requests[-1]["body"]
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    assert body == {"model": "teacher-m", "messages": [{"role": "user", "content": "Boiler too hot"}],
                    "max_tokens": 7, "temperature": 0.0, "seed": 3, "stream": False, "logprobs": True,
                    "top_logprobs": 3}
    rows = gen.soft_labels()
    assert rows["teacher_top_logprobs"][1][0] == ["thermal0", -0.1]


def test_persistent_500_gives_up_after_max_attempts(mock, tmp_path: Path) -> None:
    server = mock(lambda body, n: (503, {"error": {"message": "overloaded"}}))
    cfg = EndpointConfig(max_attempts=3, **FAST)
    with open_generator(resolve_teacher(server.spec), tmp_path, DecodeParams(), endpoint=cfg) as generate:
        with pytest.raises(TeacherEndpointError) as err:
            generate([{"role": "user", "content": "x"}])
    msg = str(err.value)
    assert len(server.requests) == 3 and err.value.exit_code == 2 and "\n" not in msg
    assert f"{server.spec[7:].split('#')[0]}/chat/completions" in msg and "HTTP 503 (overloaded)" in msg
    assert "3 attempts" in msg and err.value.hint


def test_client_errors_are_not_retried(mock, tmp_path: Path) -> None:
    server = mock(lambda body, n: (404, {"error": {"message": "model 'teacher-m' not found"}}))
    with open_generator(resolve_teacher(server.spec), tmp_path, DecodeParams(), endpoint=EndpointConfig(**FAST)) as g:
        with pytest.raises(TeacherEndpointError, match="HTTP 404") as err:
            g([{"role": "user", "content": "x"}])
    assert len(server.requests) == 1 and "/v1" in err.value.hint


def test_timeout_is_a_clear_error(mock, tmp_path: Path) -> None:
    server = mock(echo(), delay_s=1.5)
    cfg = EndpointConfig(timeout_s=0.3, max_attempts=2, **FAST)
    with open_generator(resolve_teacher(server.spec), tmp_path, DecodeParams(), endpoint=cfg) as generate:
        with pytest.raises(TeacherEndpointError) as err:
            generate([{"role": "user", "content": "x"}])
    assert "timeout" in str(err.value) and "0.3 s" in str(err.value) and len(server.requests) == 2
    assert not list(tmp_path.iterdir())  # nothing cached from a failed request


def test_bad_settings_are_usage_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = resolve_teacher("openai:http://127.0.0.1:9/v1#m")
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    for cfg, match in ((EndpointConfig(concurrency=0), "--concurrency"), (EndpointConfig(timeout_s=0), "--timeout"),
                       (EndpointConfig(api_key_env="MY_TEACHER_KEY"), "MY_TEACHER_KEY is not set")):
        with pytest.raises(UsageError, match=match):
            with open_generator(src, tmp_path, DecodeParams(), endpoint=cfg):
                pass


# --- build_dataset --------------------------------------------------------------------------------

def test_endpoint_down_exits_2_and_writes_no_data(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-m", "edgepack", "distill", "data", "--teacher",
                          f"openai:http://127.0.0.1:{port}/v1#m", "--data", str(prompts_file(tmp_path / "p.jsonl")),
                          "--out", str(run), "--timeout", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"http://127.0.0.1:{port}/v1/chat/completions" in errors[0]
    assert "unreachable" in errors[0] and "Traceback" not in out.stderr
    assert not (run / DATA_DIR).exists() and not (run / TEACHER_DIR).exists()
    assert not list(run.rglob("*.tmp-*")) and not list(run.rglob("*.part-*"))


def test_cache_makes_a_rerun_free_and_resumes_after_a_failure(mock, tmp_path: Path) -> None:
    fail = {"on": True}

    def script(body: dict[str, Any], n: int) -> Reply:
        if fail["on"] and body["messages"][-1]["content"] == PROMPTS[6]:
            return 400, {"error": {"message": "content policy", "param": "messages"}}
        return echo()(body, n)

    server = mock(script)
    data, run = prompts_file(tmp_path / "p.jsonl"), tmp_path / "run"
    cfg = EndpointConfig(concurrency=1, **FAST)
    with pytest.raises(TeacherEndpointError, match="HTTP 400"):
        build_dataset(teacher=server.spec, data=data, run_dir=run, endpoint=cfg)
    assert not (run / DATA_DIR).exists()
    cached = len(files_under(run / TEACHER_CACHE_DIR))
    assert 0 < cached < len(PROMPTS)  # answers before the failure were kept
    fail["on"] = False
    first = len(server.requests)
    report = build_dataset(teacher=server.spec, data=data, run_dir=run, endpoint=cfg)
    assert len(server.requests) - first == len(PROMPTS) - cached  # only the missing ones were asked
    assert report["teacher_endpoint"]["cache_hits"] == cached and report["distillation"] == "top-logprobs"
    assert report["teacher_cache"] == {"hits": cached, "misses": len(PROMPTS) - cached}
    assert report["teacher_dir"] is None and not (run / TEACHER_DIR).exists()
    train = read_jsonl(run / DATA_DIR / TRAIN_FILE)
    assert all(r["response"] == "answer to " + r["messages"][-1]["content"] for r in train)
    assert all(len(r["teacher_top_logprobs"]) == len(r["teacher_logprobs"]) == len(r["response"].split(" "))
               for r in train)
    # A rerun after data/ is removed pays nothing: every answer comes from the cache.
    import shutil

    shutil.rmtree(run / DATA_DIR)
    before = len(server.requests)
    again = build_dataset(teacher=server.spec, data=data, run_dir=run, endpoint=cfg)
    assert len(server.requests) == before
    assert again["teacher_endpoint"]["cache_hits"] == len(PROMPTS) and again["teacher_endpoint"]["requests"] == 0
    assert again["teacher_cache"] == {"hits": len(PROMPTS), "misses": 0}
    assert read_jsonl(run / DATA_DIR / TRAIN_FILE) == train


def test_no_logprobs_is_announced_as_response_only(mock, tmp_path: Path) -> None:
    server = mock(echo(logprobs=False))
    run = tmp_path / "run"
    report = build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=run,
                           endpoint=EndpointConfig(**FAST))
    assert report["distillation"] == "response-only"
    assert "without per-token logprobs" in report["distillation_reason"]
    assert json.loads((run / DATA_DIR / DATA_REPORT).read_text())["distillation"] == "response-only"
    assert all("teacher_top_logprobs" not in r for r in read_jsonl(run / DATA_DIR / TRAIN_FILE))


def test_refused_logprobs_fall_back_once_and_say_why(mock, tmp_path: Path) -> None:
    """Like `edgepack serve`: a 400 naming logprobs; asked again without, and not asked again."""
    def script(body: dict[str, Any], n: int) -> Reply:
        if body.get("logprobs"):
            return 400, {"error": {"message": "logprobs=True is not supported", "param": "logprobs"}}
        return echo(logprobs=False)(body, n)

    server = mock(script)
    report = build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=tmp_path / "run",
                           endpoint=EndpointConfig(concurrency=1, **FAST))
    assert report["distillation"] == "response-only"
    assert "refused logprobs: HTTP 400 (logprobs=True is not supported)" in report["distillation_reason"]
    assert sum(bool(r["body"].get("logprobs")) for r in server.requests) == 1
    assert len(server.requests) == len(PROMPTS) + 1


def test_concurrency_bound_is_respected(mock, tmp_path: Path) -> None:
    server = mock(echo(), delay_s=0.15)
    report = build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=tmp_path / "run",
                           endpoint=EndpointConfig(concurrency=3, **FAST))
    assert 2 <= server.max_in_flight <= 3 and report["teacher_endpoint"]["max_in_flight"] <= 3
    assert len(server.requests) == len(PROMPTS)
    # answers land on their own rows whatever order they arrived in
    for r in read_jsonl(tmp_path / "run" / DATA_DIR / TRAIN_FILE) + read_jsonl(tmp_path / "run" / DATA_DIR / HOLDOUT_FILE):
        assert r["response"] == "answer to " + r["messages"][-1]["content"]


def test_api_key_is_sent_as_bearer_and_never_written(mock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + "q7Zr4" * 6
    monkeypatch.setenv("MY_TEACHER_KEY", secret)
    server = mock(echo())
    run = tmp_path / "run"
    report = build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=run,
                           endpoint=EndpointConfig(api_key_env="MY_TEACHER_KEY", **FAST))
    assert set(server.auth) == {f"Bearer {secret}"}
    assert report["teacher_endpoint"]["api_key_sent"] is True
    assert report["teacher_endpoint"]["api_key_env"] == "MY_TEACHER_KEY"
    written = files_under(run)
    assert len(written) > len(PROMPTS)  # the cache entries and data/
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in json.dumps(report)


def test_generate_many_keeps_order_and_asks_a_repeated_prompt_once(mock, tmp_path: Path) -> None:
    server = mock(echo(), delay_s=0.02)
    batch = [[{"role": "user", "content": p}] for p in ("a", "b", "a", "c", "b")]
    seen: list[int] = []
    with open_generator(resolve_teacher(server.spec), tmp_path, DecodeParams(), endpoint=EndpointConfig(**FAST)) as g:
        gens = g.generate_many(batch, seen.append)
    assert [x.text for x in gens] == ["answer to a", "answer to b", "answer to a", "answer to c", "answer to b"]
    assert len(server.requests) == 3 and seen[-1] == 3 and seen == sorted(seen)


def test_no_key_variable_sends_no_authorization(mock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEPACK_TEACHER_API_KEY", raising=False)
    server = mock(echo())
    with open_generator(resolve_teacher(server.spec), tmp_path, DecodeParams(), endpoint=EndpointConfig()) as g:
        g([{"role": "user", "content": "x"}])
    assert server.auth == [None]


def test_endpoint_teacher_refuses_correction_and_training(mock, tmp_path: Path) -> None:
    from edgepack.distill.train import train_student
    from edgepack.profiles import load_profile

    server = mock(echo())
    data, run = prompts_file(tmp_path / "p.jsonl"), tmp_path / "run"
    with pytest.raises(UsageError, match="--correct-teacher needs the teacher's weights"):
        build_dataset(teacher=server.spec, data=data, run_dir=run, correct=True)
    assert server.requests == []
    build_dataset(teacher=server.spec, data=data, run_dir=run, endpoint=EndpointConfig(**FAST))
    with pytest.raises(UsageError, match="endpoint teacher has no weights"):  # no `auto` student from it
        train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=1)


def test_cli_warns_about_response_only(mock, tmp_path: Path) -> None:
    server = mock(echo(logprobs=False))
    env = {**os.environ, "EDGEPACK_DEBUG": "0", "COLUMNS": "300"}
    out = subprocess.run([sys.executable, "-m", "edgepack", "distill", "data", "--teacher", server.spec,
                          "--data", str(prompts_file(tmp_path / "p.jsonl")), "--out", str(tmp_path / "run"),
                          "--concurrency", "2", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["distillation"] == "response-only"  # stdout stays one JSON document
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning: response-only distillation")]
    assert len(warnings) == 1 and "without per-token logprobs" in warnings[0]
    assert server.max_in_flight <= 2


# --- a real server ----------------------------------------------------------------------------------

def test_edgepack_serve_as_the_teacher(tiny_gguf: Path, tmp_path: Path) -> None:  # noqa: F811
    """`edgepack serve` on the tiny GGUF answers build_dataset; its answers equal llama.cpp's own.

    edgepack's server returns the chat logprobs the endpoint teacher asks for (#17), so every
    answer carries per-token logprobs and their top-k alternatives over real HTTP. The tiny
    random model never says EOS within 64 tokens, so every training answer is dropped as
    truncated and build_dataset stops with a DataError; the cache keeps them all.
    """
    from edgepack.runtime.session import open_model

    server = launch(tiny_gguf, tmp_path, n_ctx=2048, threads=1, max_queue=1, timeout_s=60.0)
    try:
        spec = f"openai:{server.url}/v1#{tiny_gguf.stem}"
        data, run = prompts_file(tmp_path / "p.jsonl", 5), tmp_path / "run"
        with pytest.raises(DataError, match="no usable answer for 4 prompts .dropped: truncated 4"):
            build_dataset(teacher=spec, data=data, run_dir=run, endpoint=EndpointConfig(concurrency=3, **FAST))
        assert not (run / DATA_DIR).exists()
        entries = [json.loads(p.read_text()) for p in files_under(run / TEACHER_CACHE_DIR)]
        with open_generator(resolve_teacher(spec), run / TEACHER_CACHE_DIR, DecodeParams(),
                            endpoint=EndpointConfig(concurrency=3, **FAST)) as generate:
            gen = generate([{"role": "user", "content": PROMPTS[0]}])
            assert generate.describe()["requests"] == 0  # from the cache
    finally:
        assert server.stop() == 0
    assert len(entries) == 5
    assert all(e["generation"]["no_logprobs_reason"] is None for e in entries)
    for e in entries:
        g = e["generation"]
        assert g["tokens"] == 64 and not g["finished"]
        assert len(g["token_logprobs"]) == len(g["top_logprobs"]) == 64
        for (token, logprob), alternatives in zip(g["token_logprobs"], g["top_logprobs"]):
            best = [lp for _, lp in alternatives]
            # greedy decoding: the chosen token is the most likely one, listed first among the alternatives
            assert logprob <= 0 and best == sorted(best, reverse=True) and logprob == pytest.approx(best[0], abs=1e-4)
    with open_model(tiny_gguf, threads=1, n_ctx=2048) as session:
        expected = session.complete([{"role": "user", "content": PROMPTS[0]}], max_tokens=64, temperature=0.0, seed=0)
    assert gen.text == expected and gen.tokens == 64


@pytest.mark.slow
def test_edgepack_serve_with_the_embedded_teacher(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    """The embedded teacher behind `edgepack serve`: a complete data folder with the served
    top-k logprobs, ready for top-logprobs distillation."""
    server = launch(builtin_teacher_gguf, tmp_path, n_ctx=2048, threads=2, max_queue=4, timeout_s=120.0)
    try:
        spec = f"openai:{server.url}/v1#{builtin_teacher_gguf.stem}"
        data = tmp_path / "p.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"In one short sentence: what should a technician check when "
                                                      f"{p.lower()}?"}) + "\n" for p in PROMPTS[:6]))
        report = build_dataset(teacher=spec, data=data, run_dir=tmp_path / "run",
                               endpoint=EndpointConfig(concurrency=2))
    finally:
        assert server.stop() == 0
    assert report["distillation"] == "top-logprobs" and report["distillation_reason"] is None
    assert report["kept"] >= 1 and report["teacher_endpoint"]["requests"] == 6  # one request per prompt
    rows = read_jsonl(tmp_path / "run" / DATA_DIR / TRAIN_FILE)
    assert all(r["response"] and r["teacher_logprobs"] and r["teacher_top_logprobs"] for r in rows)
