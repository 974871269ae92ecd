"""Stop strings in `distill data` (``--stop``, run.toml ``stop``): every teacher kind ends an answer
before the first stop string it writes and marks it finished; the stop strings are part of the
decoding, so of data/'s identity and the answer cache's keys; bad ones are refused before the
teacher is read.

The teachers are real: llama.cpp on the tiny GGUF, transformers on the tiny Llama folder, and
``edgepack serve`` on the tiny GGUF for the endpoint kind. Their random weights babble and never
say EOS, so stop strings taken from that babble are ones they write: ``Lü`` ends their answer to
``PROMPTS[0]`` (``'\x05\x05…\x05LüfLüf…'``, ``Lü`` inside the token ``Lüf``), ``t`` and ``i`` two others.
A scripted server stands in for endpoints that answer in ways ``edgepack serve`` does not (a stop
string inside a token, a server that ignores ``stop``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import DATA_DIR, TEACHER_CACHE_DIR, TEACHER_DIR, TRAIN_FILE
from edgepack.distill.answer_cache import answer_key
from edgepack.distill.data import build_dataset, read_jsonl
from edgepack.distill.endpoint import EndpointConfig
from edgepack.distill.generate import DecodeParams, Generation, open_generator
from edgepack.distill.teachers import materialize_teacher, resolve_teacher
from edgepack.errors import DataError, RunDirError, UsageError
from tests.distill.test_endpoint import FAST, PROMPTS, mock, prompts_file  # noqa: F401
from tests.runtime.server.helpers import call, launch

USER = [{"role": "user", "content": PROMPTS[0]}]
STOP = "Lü"
BABBLE_STOPS = (STOP, "t", "i")  # each ends some of the tiny GGUF's answers to PROMPTS[:5]


def _answer(spec: str, folder: Path, params: DecodeParams, **options: Any) -> Generation:
    with open_generator(resolve_teacher(spec), folder, params, **options) as generate:
        return generate(USER)


def _before_stop(text: str) -> str:
    """The babble before :data:`STOP` (which it must hold, after some text)."""
    assert STOP in text and text.index(STOP) > 0, text
    return text[:text.index(STOP)]


# --- each teacher kind ----------------------------------------------------------------------------

def test_llamacpp_stops_at_the_stop_string(tiny_gguf: Path, tmp_path: Path) -> None:
    from llama_cpp import Llama

    src = resolve_teacher(str(tiny_gguf))
    folder = materialize_teacher(src, tmp_path / "teacher")
    full = _answer(str(tiny_gguf), folder, DecodeParams())
    assert not full.finished and full.tokens == 64
    kept = _before_stop(full.text)
    gen = _answer(str(tiny_gguf), folder, DecodeParams(stop=(STOP,)))
    assert (gen.text, gen.finished) == (kept, True)
    llm = Llama(model_path=str(tiny_gguf), n_ctx=64, verbose=False)
    try:
        assert gen.tokens == len(llm.tokenize(kept.encode(), add_bos=False, special=False)) < 64
    finally:
        llm.close()
    # The earliest of several stop strings wins, and one the teacher never writes changes nothing.
    assert _answer(str(tiny_gguf), folder, DecodeParams(stop=("never written", "f", STOP))).text == kept
    assert _answer(str(tiny_gguf), folder, DecodeParams(stop=("never written",))) == full


def test_transformers_stops_at_the_stop_string_and_cuts_it_off(tiny_llama_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, GenerationMixin

    generated: list[int] = []  # new tokens of each real generate() call
    real = GenerationMixin.generate

    def counted(self: Any, inputs: Any, **kwargs: Any) -> Any:
        out = real(self, inputs, **kwargs)
        generated.append(out.shape[1] - inputs.shape[1])
        return out

    monkeypatch.setattr(GenerationMixin, "generate", counted)
    src = resolve_teacher(str(tiny_llama_dir))
    folder = materialize_teacher(src, tmp_path / "teacher")
    full = _answer(str(tiny_llama_dir), folder, DecodeParams())
    assert not full.finished and full.tokens == 64
    kept = _before_stop(full.text)  # transformers matches a stop string that ends inside a token
    gen = _answer(str(tiny_llama_dir), folder, DecodeParams(stop=(STOP,)))
    assert (gen.text, gen.finished) == (kept, True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert gen.tokens == len(tok(kept, add_special_tokens=False)["input_ids"]) < 64
    # generate() itself stopped, right after the token that completes the stop string (kept in its output)
    assert generated[0] == 64 and generated[1] < 64


def test_edgepack_serve_stops_and_its_logprobs_are_cut_with_the_text(tiny_gguf: Path, tmp_path: Path) -> None:
    """``stop`` goes to the real server; it returns the stop string's tokens among the logprobs,
    which the teacher drops so that the kept positions spell the kept text."""
    server = launch(tiny_gguf, tmp_path, n_ctx=2048, threads=1, max_queue=1, timeout_s=60.0)
    try:
        spec = f"openai:{server.url}/v1#{tiny_gguf.stem}"
        cfg = EndpointConfig(concurrency=1, top_logprobs=3, **FAST)
        full = _answer(spec, tmp_path / "cache", DecodeParams(), endpoint=cfg)
        kept = _before_stop(full.text)
        gen = _answer(spec, tmp_path / "cache", DecodeParams(stop=(STOP,)), endpoint=cfg)
        raw = call(server.port, "POST", "/v1/chat/completions",
                   {"model": tiny_gguf.stem, "messages": USER, "max_tokens": 64, "temperature": 0, "seed": 0,
                    "stop": [STOP], "logprobs": True, "top_logprobs": 3}).json()["choices"][0]
    finally:
        assert server.stop() == 0
    assert (gen.text, gen.finished, gen.no_logprobs_reason) == (kept, True, None)
    assert gen.token_logprobs is not None and gen.top_logprobs is not None
    assert "".join(t for t, _ in gen.token_logprobs) == kept
    assert gen.tokens == len(gen.token_logprobs) == len(gen.top_logprobs) > 0
    assert gen.token_logprobs == full.token_logprobs[:gen.tokens]  # the same positions as without stop
    served = raw["logprobs"]["content"]
    assert raw["message"]["content"] == kept and len(served) > gen.tokens  # the server kept the stop's tokens


def test_an_endpoint_gets_stop_only_when_asked(mock, tmp_path: Path) -> None:  # noqa: F811
    server = mock(lambda body, n: (200, _completion(["Category", ":", " x"], finish="stop")))
    cfg = EndpointConfig(concurrency=1, **FAST)
    _answer(server.spec, tmp_path / "a", DecodeParams(), endpoint=cfg)
    _answer(server.spec, tmp_path / "b", DecodeParams(stop=("\n", "END")), endpoint=cfg)
    assert "stop" not in server.requests[0]["body"]  # a request (and its cache key) as before --stop
    assert server.requests[1]["body"]["stop"] == ["\n", "END"]


def _completion(tokens: list[str], *, text: str | None = None, finish: str = "stop") -> dict[str, Any]:
    content = [{"token": t, "logprob": -0.5, "top_logprobs": [{"token": t, "logprob": -0.5}]} for t in tokens]
    return {"choices": [{"index": 0, "finish_reason": finish, "logprobs": {"content": content},
                         "message": {"role": "assistant", "content": "".join(tokens) if text is None else text}}],
            "usage": {"completion_tokens": len(tokens)}}


@pytest.mark.parametrize("tokens,text,finish,kept,positions,reason", [
    # the stop string's own token returned among the logprobs (as edgepack serve does): dropped
    (["Category", ": x", "\n", "Action"], "Category: x", "stop", "Category: x", 2, None),
    # a server that ignored `stop` ran on to the token cap: cut here, and finished
    (["Category", ": x", "\n", "Action"], None, "length", "Category: x", 2, None),
    # the stop string begins inside a token: no logprobs line up with the kept text, so none are used
    (["Category", ": x.\n", "Action"], "Category: x.", "stop", "Category: x.", None,
     "token 1, ': x.\\n', runs past it"),
])
def test_endpoint_logprobs_stay_aligned_with_the_kept_text(mock, tmp_path: Path, tokens: list[str],  # noqa: F811
                                                           text: str | None, finish: str, kept: str,
                                                           positions: int | None, reason: str | None) -> None:
    server = mock(lambda body, n: (200, _completion(tokens, text=text, finish=finish)))
    gen = _answer(server.spec, tmp_path, DecodeParams(stop=("\n",)), endpoint=EndpointConfig(concurrency=1, **FAST))
    assert (gen.text, gen.finished) == (kept, True)
    if positions is None:
        assert gen.token_logprobs is None and gen.top_logprobs is None
        assert gen.no_logprobs_reason is not None and reason in gen.no_logprobs_reason
        assert gen.tokens == len(tokens)  # no positions to count: the server's count
    else:
        assert gen.no_logprobs_reason is None and gen.tokens == positions
        assert gen.token_logprobs is not None and "".join(t for t, _ in gen.token_logprobs) == kept
        assert gen.top_logprobs is not None and len(gen.top_logprobs) == positions


# --- the data stage ---------------------------------------------------------------------------------

def test_stop_is_part_of_the_decoding_and_of_datas_identity(tiny_gguf: Path, tmp_path: Path) -> None:
    """The tiny GGUF's answers are all truncated without a stop string; with one the stage keeps
    them. Changing the stop strings refuses the finished data/ (a new folder regenerates)."""
    data, run = prompts_file(tmp_path / "p.jsonl", 5), tmp_path / "run"
    with pytest.raises(DataError, match=r"dropped: truncated 4\)"):
        build_dataset(teacher=str(tiny_gguf), data=data, run_dir=tmp_path / "without")
    report = build_dataset(teacher=str(tiny_gguf), data=data, run_dir=run, stop=BABBLE_STOPS, samples=2)
    assert report["kept"] >= 1
    assert [d["stop"] for d in report["decoding"]] == [list(BABBLE_STOPS)] * 2  # the samples stop too
    assert report["identity"]["decoding"] == report["decoding"]
    rows = read_jsonl(run / DATA_DIR / TRAIN_FILE)
    assert rows and not any(s in r["response"] for r in rows for s in BABBLE_STOPS)
    assert build_dataset(teacher=str(tiny_gguf), data=data, run_dir=run, stop=BABBLE_STOPS, samples=2)["skipped"]
    with pytest.raises(RunDirError, match="built from another teacher or other inputs"):
        build_dataset(teacher=str(tiny_gguf), data=data, run_dir=run, stop=BABBLE_STOPS[:2], samples=2)
    # The refused rerun asked nothing: every cached answer is one asked with these stop strings.
    entries = [json.loads(p.read_text()) for p in (run / TEACHER_CACHE_DIR).glob("*.json")]
    assert {tuple(e["request"]["decoding"]["stop"]) for e in entries} == {BABBLE_STOPS}


def test_the_answer_cache_key_changes_with_stop_and_not_without_it() -> None:
    plain = DecodeParams().describe()
    assert "stop" not in plain  # data/ identities and cached answers from before --stop stay valid
    assert DecodeParams(stop=("\n",)).describe()["stop"] == ["\n"]
    keys = {answer_key("sha256:x", DecodeParams(stop=stop).describe(), USER) for stop in ((), ("\n",), ("\n\n",))}
    assert len(keys) == 3


@pytest.mark.parametrize("stop,needle", [
    (("",), "a stop string (--stop) must not be empty"),
    (("a", "b", "c", "d", "e"), "at most 4 stop strings (--stop) are allowed (got 5)"),
])
def test_bad_stop_strings_are_refused_before_the_teacher_is_read(tmp_path: Path, stop: tuple[str, ...],
                                                                 needle: str) -> None:
    # A teacher that does not exist: had it been resolved first, that would be the error.
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_dataset(teacher=str(tmp_path / "absent.gguf"), data=prompts_file(tmp_path / "p.jsonl", 3),
                      run_dir=tmp_path / "run", stop=stop)
    assert not (tmp_path / "run" / TEACHER_DIR).exists()


@pytest.mark.parametrize("stops,needle", [
    ([""], "a stop string (--stop) must not be empty"),
    (["1", "2", "3", "4", "5"], "at most 4 stop strings (--stop) are allowed (got 5)"),
])
def test_the_cli_refuses_bad_stop_strings_in_one_line(tmp_path: Path, tiny_gguf: Path,
                                                      capsys: pytest.CaptureFixture[str], stops: list[str],
                                                      needle: str) -> None:
    from edgepack.cli import main

    out = tmp_path / "run"
    flags = [w for s in stops for w in ("--stop", s)]
    assert main(["distill", "data", "--teacher", str(tiny_gguf), "--data", str(prompts_file(tmp_path / "p.jsonl", 3)),
                 "--out", str(out), *flags]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not out.exists()


# --- the pipeline (run.toml) ------------------------------------------------------------------------

def test_run_toml_stop_round_trips_and_reaches_the_data_stage(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.pipeline import PipelineConfig, command_line, config_from_settings, distill_data
    from edgepack.profiles import load_profile
    from edgepack.runconfig import load_pipeline_config, write_run_config

    cfg = PipelineConfig(profile=load_profile("cpu-x86-2c"), teacher=str(tiny_gguf),
                         data=prompts_file(tmp_path / "p.jsonl", 5), run_dir=tmp_path / "run",
                         stop=(*BABBLE_STOPS, "\n\t"))
    write_run_config(tmp_path, cfg.settings())
    assert 'stop = ["Lü", "t", "i", "\\n\t"]' in (tmp_path / "run.toml").read_text()
    assert config_from_settings(load_pipeline_config(tmp_path / "run.toml"), cfg.run_dir) == cfg
    words = shlex.split(command_line(cfg.settings(), cfg.run_dir))  # the command a shell runs again
    assert [words[i + 1] for i, w in enumerate(words) if w == "--stop"] == list(cfg.stop)
    result = distill_data(cfg)
    assert result.report["decoding"][0]["stop"] == [*BABBLE_STOPS, "\n\t"] and result.report["kept"] >= 1
    # A run.toml from before the key resumes (absent = no stop strings).
    plain = PipelineConfig(profile=cfg.profile, teacher=cfg.teacher, data=cfg.data, run_dir=tmp_path / "plain")
    assert "stop" not in plain.settings() or plain.settings()["stop"] is None
    assert "--stop" not in command_line(plain.settings(), plain.run_dir)


@pytest.mark.parametrize("toml,needle", [
    ('stop = [""]', "stop = ['']: a stop string (--stop) must not be empty"),
    ('stop = ["1", "2", "3", "4", "5"]', "at most 4 stop strings"),
    ('stop = "\\n"', "stop = '\\n': must be a list of strings"),
    ("stop = [1]", "stop = [1]: must be a list of strings"),
])
def test_bad_stop_in_run_toml_is_one_line_naming_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    from edgepack.runconfig import load_pipeline_config

    path = tmp_path / "run.toml"
    path.write_text(f'profile = "cpu-x86-2c"\n{toml}\n')
    with pytest.raises(UsageError) as info:
        load_pipeline_config(path)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_pipeline_cli_refuses_a_bad_stop_before_anything_is_written(tmp_path: Path, tiny_gguf: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    out = tmp_path / "out"
    assert main(["pipeline", "--profile", "cpu-x86-2c", "--teacher", str(tiny_gguf), "--out", str(out),
                 "--data", str(prompts_file(tmp_path / "p.jsonl", 3)), "--stop", ""]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and "stop = ['']: a stop string (--stop) must not be empty" in lines[0], lines
    assert not out.exists()
