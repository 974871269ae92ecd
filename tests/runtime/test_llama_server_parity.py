"""The bundle gives its gated answers in llama.cpp's own server too (issue #15, "Done when").

A tiny run gets a task whose system prompt and decoding are its own (a system prompt, a short
max_tokens, a stop string taken from the model's own answer so that it really cuts one), is
gated and packed. The bundle is then deployed as its Modelfile says: llama-server (llama.cpp's
C++ server, built by ``make llama-server``) loads the GGUF, the Modelfile's SYSTEM is sent as the
system turn and its PARAMETERs as llama-server's request fields and flags
(:mod:`tests.runtime.llama_server`). For the holdout's prompts and three more, the greedy answers
of llama-server, ``edgepack run`` and ``edgepack serve`` (both sent the bare user message: the
bundle's task supplies the rest) and, for the holdout rows, the answers in the gate's report must
be the same text.

Twice: at the task's repeat penalty 1.0 (what the shipped tasks use), and at 1.1 (llama.cpp's
and Ollama's default), where llama-server answers some prompt differently than at 1.0, so the
Modelfile's repeat_penalty is shown to matter and to be decoded alike by all of them. llama-server
counts the prompt's last tokens in the penalty window too; llama-cpp-python's ``Llama.generate``
counts only the answer's, and answers some prompt of this case differently (checked here, so the
case keeps telling the two apart).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from itertools import islice, takewhile
from pathlib import Path

import pytest

from edgepack.atomic import write_json
from edgepack.constants import ARTIFACTS_DIR, DATA_DIR, GATE_DIR, HOLDOUT_FILE, M_ENTRYPOINT, M_GATE
from edgepack.profiles import Profile, load_profile
from edgepack.task import TASK_FILE, Decoding, Task, build_task, save_task
from tests.runtime.helpers import HOLDOUT_ROWS, make_run_dir, write_profile
from tests.runtime.llama_server import (LoopbackServer, Modelfile, free_port, llama_server, llama_server_binary,
                                        read_modelfile, request_body)

pytestmark = pytest.mark.slow  # two gated and packed runs, four ways of answering each prompt

SYSTEM = "You sort plant alarms. Answer: Category: <label>."
MAX_TOKENS = 24
PENALTIES = (1.0, 1.1)
# The holdout prompts (make_run_dir's holdout; the gate's report keeps their answers) and three
# more, so that a repeat penalty has prompts to show itself on.
PROMPTS: dict[str, list[dict[str, str]]] = {
    **{row["id"]: row["messages"] for row in HOLDOUT_ROWS},
    **{f"x{i}": [{"role": "user", "content": text}] for i, text in enumerate(
        ["Boiler B-2 feed pump coupling is misaligned.", "Breaker CB-7 trips when the conveyor starts.",
         "Gearbox G-3 oil shows metal particles."], 1)}}


def make_task(decoding: Decoding) -> Task:
    return replace(build_task(answer=None, labels=frozenset({"electrical", "mechanical"}), system_prompt=SYSTEM),
                   decoding=decoding)


@pytest.fixture(scope="session")  # before the session's tiny models: a missing binary stops at once
def binary() -> Path:
    return llama_server_binary()


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    # Random-init weights score 0 on the holdout, so the quality floor is 0 here.
    return load_profile(str(write_profile(tmp_path_factory.mktemp("profiles"), "tiny-parity",
                                          min_relative_quality=0.0)))


@pytest.fixture(scope="module")
def stop(tiny_gguf: Path) -> tuple[str, str, str]:
    """(stop string, prompt id, that prompt's answer without it): two printable ASCII characters
    that first occur inside a greedy answer of the tiny F16 GGUF (the artifact the runs export),
    so that the task's stop string cuts it."""
    from edgepack.runtime.session import open_model

    with open_model(tiny_gguf, threads=1, n_ctx=256, task=make_task(Decoding(max_tokens=MAX_TOKENS))) as session:
        for pid, prompt in PROMPTS.items():
            messages, decoding, _ = session.apply_task(prompt)
            text = "".join(session.answer(messages, decoding))
            for i in range(1, len(text) - 1):
                piece = text[i:i + 2]
                if piece.isascii() and piece.isprintable() and piece.strip() == piece and '"' not in piece \
                        and text.find(piece) == i:
                    return piece, pid, text
    pytest.fail("no greedy answer of the tiny model holds two printable ASCII characters to stop at")


@dataclass(frozen=True)
class Deployed:
    """One packed bundle and every answer to :data:`PROMPTS` (by id)."""

    task: Task
    modelfile: Modelfile
    llama_server: dict[str, str]
    llama_server_penalty_1: dict[str, str]
    """llama-server at repeat_penalty 1.0, everything else as the Modelfile says."""
    answer_only_window: dict[str, str]
    """``Llama.generate`` at the task's penalty: only the answer's tokens in the penalty window."""
    run: dict[str, str]
    serve: dict[str, str]
    gate: dict[str, str]
    """The answers the gate's report keeps (its examples: the holdout's first rows)."""


def pack(run: Path, profile: Profile) -> Path:
    from edgepack.export.pack.pack import pack_run

    return Path(pack_run(run_dir=run, profile=profile, artifact=None, allow_unverified=False)["bundle"])


def retask(run: Path, dest: Path, task: Task, profile: Profile) -> Path:
    """A copy of ``run`` with ``task`` as RUN/task.json, its artifacts gated again under it."""
    from edgepack.export.gate.gate import run_gate

    copy = Path(shutil.copytree(run, dest))
    shutil.rmtree(copy / "bundles", ignore_errors=True)
    save_task(task, copy / TASK_FILE)
    for artifact in (copy / ARTIFACTS_DIR).glob("*.gguf"):  # the report name make_run_dir gives
        report = run_gate(artifact=artifact, profile=profile, holdout=copy / DATA_DIR / HOLDOUT_FILE, efficiency=False)
        write_json(copy / GATE_DIR / f"{artifact.name}.json", report)
    return copy


def edgepack_run(bundle: Path, prompt: str, env: dict[str, str]) -> str:
    """``edgepack run BUNDLE --prompt ... --json``: the task's system prompt and decoding apply."""
    out = subprocess.run([sys.executable, "-m", "edgepack", "run", str(bundle), "--prompt", prompt, "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["completion"])


def answer_only_window(model: Path, modelfile: Modelfile, task: Task) -> dict[str, str]:
    """What llama-cpp-python's ``Llama.generate`` answers with the task's penalty: it counts only
    the answer's own tokens in the penalty window. Same prompt tokens (edgepack's chat rendering,
    which the parity test shows llama-server agrees with), same text decoding and stop cut."""
    import llama_cpp

    from edgepack.runtime.session import open_model

    decoding, answers = task.decoding, {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_threads=1, verbose=False)
    try:
        with open_model(model, threads=1, n_ctx=256, no_task=True) as session:
            backend = session.backend
            for pid, prompt in PROMPTS.items():
                tokens = backend.chat_tokens(request_body(modelfile, prompt)["messages"])
                stream = llm.generate(tokens, temp=0.0, repeat_penalty=decoding.repeat_penalty)
                answer = islice(takewhile(lambda t: t not in backend.stop_tokens, stream), decoding.max_tokens)
                answers[pid] = decoding.cut("".join(backend.decode_stream(answer)))
    finally:
        llm.close()
    return answers


def deploy(bundle: Path, task: Task, binary: Path, folder: Path) -> Deployed:
    from edgepack.runtime.bundle.archive import extract_bundle, verify_bundle

    manifest = verify_bundle(bundle)
    extracted = extract_bundle(bundle, folder / "extracted")
    modelfile = read_modelfile((extracted / "Modelfile").read_text(encoding="utf-8"))
    with llama_server(binary, extracted / manifest[M_ENTRYPOINT], modelfile, folder / "llama-server.log") as server:
        theirs = {rid: server.chat(request_body(modelfile, m)) for rid, m in PROMPTS.items()}
        at_1 = {rid: server.chat({**request_body(modelfile, m), "repeat_penalty": 1.0}) for rid, m in PROMPTS.items()}
    only_answer = answer_only_window(extracted / manifest[M_ENTRYPOINT], modelfile, task)
    env = {**os.environ, "EDGEPACK_CACHE": str(folder / "cache")}
    runs = {rid: edgepack_run(bundle, m[-1]["content"], env) for rid, m in PROMPTS.items()}
    port = free_port()
    with LoopbackServer([sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", str(port)], port,
                        folder / "serve.log", env=env) as served:
        serves = {rid: served.chat({"messages": m}) for rid, m in PROMPTS.items()}  # bare user turns
    gate = {e["id"]: e["answer"] for e in manifest[M_GATE]["measurements"]["quality"]["examples"]}
    return Deployed(task, modelfile, theirs, at_1, only_answer, runs, serves, gate)


@pytest.fixture(scope="module")
def deployed(binary: Path, tiny_llama_dir: Path, stop: tuple[str, str, str], profile: Profile,
             tmp_path_factory: pytest.TempPathFactory) -> dict[float, Deployed]:
    """A run gated and packed under the task at each of :data:`PENALTIES`, deployed and asked."""
    out: dict[float, Deployed] = {}
    run: Path | None = None
    for penalty in PENALTIES:
        task = make_task(Decoding(max_tokens=MAX_TOKENS, repeat_penalty=penalty, stop=(stop[0],)))
        folder = tmp_path_factory.mktemp(f"penalty-{penalty}")
        # F16: the same weights as the tiny GGUF the stop string was chosen on
        run = make_run_dir(folder / "run", tiny_llama_dir, [Path(str(profile.source))], quants=("F16",), task=task) \
            if run is None else retask(run, folder / "run", task, profile)
        out[penalty] = deploy(pack(run, profile), task, binary, folder)
    return out


def test_the_modelfile_carries_the_task(deployed: dict[float, Deployed]) -> None:
    for penalty, d in deployed.items():
        mf, decoding = d.modelfile, d.task.decoding
        assert mf.system == SYSTEM
        assert [float(v) for v in mf.values("temperature")] == [decoding.temperature]
        assert [float(v) for v in mf.values("repeat_penalty")] == [penalty]
        assert [int(v) for v in mf.values("num_predict")] == [MAX_TOKENS]
        assert set(decoding.stop) <= set(mf.values("stop"))


def test_llama_server_run_serve_and_the_gate_give_the_same_answers(deployed: dict[float, Deployed]) -> None:
    differ = []
    for penalty, d in deployed.items():
        assert set(d.gate) == {row["id"] for row in HOLDOUT_ROWS}  # the gate's report keeps the holdout's answers
        for rid, theirs in d.llama_server.items():
            answers = {"llama-server": theirs, "edgepack run": d.run[rid], "edgepack serve": d.serve[rid],
                       **({"gate": d.gate[rid]} if rid in d.gate else {})}
            if len(set(answers.values())) > 1:
                differ.append(f"repeat_penalty {penalty}, {rid}: {answers}")
    assert not differ, "answers differ:\n" + "\n".join(differ)


def test_the_stop_string_cut_an_answer(deployed: dict[float, Deployed], stop: tuple[str, str, str]) -> None:
    piece, rid, uncut = stop
    assert deployed[1.0].llama_server[rid] == uncut[:uncut.index(piece)] != uncut


def test_the_repeat_penalty_changes_some_answer(deployed: dict[float, Deployed]) -> None:
    def changed(d: Deployed) -> list[str]:
        return [rid for rid, text in d.llama_server.items() if text != d.llama_server_penalty_1[rid]]

    assert changed(deployed[1.0]) == []  # the same request asked twice
    assert changed(deployed[1.1]), "repeat_penalty 1.1 changed no answer of llama-server: the case shows nothing"


def test_counting_only_the_answer_in_the_penalty_window_would_differ(deployed: dict[float, Deployed]) -> None:
    d = deployed[1.1]
    assert any(d.answer_only_window[pid] != d.llama_server[pid] for pid in PROMPTS), \
        "Llama.generate's penalty window gives llama-server's answers here: the case no longer tells them apart"
    assert deployed[1.0].answer_only_window == deployed[1.0].llama_server  # no penalty, no difference
