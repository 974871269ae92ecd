"""The gate's holdout pass: teacher agreement, a child process that crashes or hangs, and the
KL divergence against the unquantized student (given, or found as RUN/student)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import FAIL, PASS
from edgepack.errors import DataError, ModelSourceError, UsageError
from edgepack.profiles import load_profile
from edgepack.export.gate.gate import auto_reference, run_gate
from edgepack.export.gate.quality import evaluate_holdout, load_holdout
from edgepack.export.gate.quality_child import answer_timeout_s, holdout_kld
from edgepack.task import DEMO_TASK, JsonAnswer, Task, TextAnswer
from tests.runtime.helpers import write_profile

# Each row carries its own short system turn, as the demo's holdout carries the demo prompt (the
# gate would prepend the demo's ~450-token prompt, more than the tiny profiles' 256-token context).
SYSTEM = {"role": "system", "content": "Name the alarm's category."}
ROWS = [
    {"id": "h1", "messages": [SYSTEM, {"role": "user", "content": "Pump P-101 bearing noise and vibration."}],
     "label": "mechanical", "response": "Category: mechanical\nAction: Inspect the bearings."},
    {"id": "h2", "messages": [SYSTEM, {"role": "user", "content": "Motor starter contacts are burnt."}],
     "label": "electrical", "response": "Category: electrical\nAction: Replace the contacts."},
    {"id": "h3", "messages": [SYSTEM, {"role": "user", "content": "PLC rack 2 lost Profinet communication."}],
     "label": None, "response": "Category: network\nAction: Check the switch port."},
]


def write_holdout(path: Path, rows: list[dict[str, Any]] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- (a) agreement with the teacher, counted on answers we choose ------------------------------
class ScriptedBackend:
    """Answers each prompt with a fixed text (the counting is under test, not a model), and
    records how it was asked (the Backend.stream_chat keywords)."""

    format = "scripted"
    constrains_json = False

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def stream_chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                    repeat_penalty: float = 1.0, json_schema: dict[str, Any] | None = None) -> Iterator[str]:
        prompt = messages[-1]["content"]
        self.asked.append(prompt)
        self.calls.append({"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                           "repeat_penalty": repeat_penalty, "json_schema": json_schema})
        yield from self.pieces(self.answer(prompt, json_schema))

    def answer(self, prompt: str, json_schema: dict[str, Any] | None) -> str:
        return self.answers[prompt]

    def pieces(self, text: str) -> list[str]:
        return text.split(" ")  # pieces, as a runtime streams them


def test_teacher_agreement_counts_rows_whose_teacher_names_a_label(tmp_path: Path) -> None:
    rows = load_holdout(write_holdout(tmp_path / "h.jsonl", [
        {"prompt": "p1", "label": "mechanical", "response": "Category: mechanical"},   # agree, correct
        {"prompt": "p2", "label": "electrical", "response": "Category: mechanical"},   # agree, both wrong
        {"prompt": "p3", "label": "electrical", "response": "Category: electrical"},   # disagree, wrong
        {"prompt": "p4", "response": "Category: Network."},                            # agree, no gold label
        {"prompt": "p5", "label": "thermal", "response": "I am not sure."},            # teacher names no label; correct
        {"prompt": "p6", "response": "Hmm."},                                          # nothing to compare: not asked
    ]))
    backend = ScriptedBackend({"p1": "Category: mechanical", "p2": "Category:mechanical", "p3": "Category: thermal",
                               "p4": "category: network", "p5": "Category: thermal\nAction: cool it"})
    q = evaluate_holdout(backend, rows)
    assert backend.asked == ["p1", "p2", "p3", "p4", "p5"]
    assert (q["answered"], q["labelled"], q["correct"], q["accuracy"]) == (5, 4, 2, 0.5)
    assert (q["teacher_agreement_rows"], q["teacher_agreed"], q["teacher_agreement"]) == (4, 3, 0.75)
    assert (q["teacher_rows"], q["teacher_accuracy"], q["relative"]) == (4, 0.5, 1.0)
    assert any("2 teacher responses name no label" in n for n in q["notes"])  # p5 and p6


def test_no_teacher_label_means_no_agreement_figure(tmp_path: Path) -> None:
    rows = load_holdout(write_holdout(tmp_path / "h.jsonl", [{"prompt": "p1", "label": "x", "response": "hmm"}]))
    q = evaluate_holdout(ScriptedBackend({"p1": "Category: x"}), rows)
    assert q["accuracy"] == 1.0 and q["teacher_agreement"] is None and q["teacher_agreement_rows"] == 0
    assert any("agreement with the teacher not computed" in n for n in q["notes"])


class TextBackend(ScriptedBackend):
    """Streams each answer in pieces that keep their spaces (the text is scored as a whole)."""

    def pieces(self, text: str) -> list[str]:
        return re.split(r"(?<= )", text)


def test_the_gate_scores_every_answer_kind_through_the_task(tmp_path: Path) -> None:
    text = Task(answer=TextAnswer())
    rows = load_holdout(write_holdout(tmp_path / "t.jsonl", [
        {"prompt": "p1", "reference": "Replace the bearing of pump P-101."},
        {"prompt": "p2", "response": "Reset the breaker."},  # no reference: compared with the teacher's answer
    ]), text)
    q = evaluate_holdout(TextBackend({"p1": "Replace the bearing of pump P-101.", "p2": "Reset the fuse."}),
                         rows, text)
    assert q["task"]["kind"] == "text" and q["primary_metric"] == "chrf" and q["scores"]["reference_from"] == {
        "reference": 1, "teacher": 1}
    assert 0.5 < q["primary"] < 1.0 and q["scores"]["rouge_l"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert q["accuracy"] is None and q["teacher_agreement"] is None  # a text task states no label
    assert q["relative"] == pytest.approx(q["primary"] / q["teacher_primary"])

    schema = {"type": "object", "required": ["asset", "fault"], "additionalProperties": False,
              "properties": {"asset": {"type": "string"}, "fault": {"enum": ["leak", "noise"]}}}
    as_json = Task(answer=JsonAnswer(schema=schema, fields=("asset", "fault")))
    rows = load_holdout(write_holdout(tmp_path / "j.jsonl", [
        {"prompt": "p1", "reference": '{"asset": "P-101", "fault": "leak"}'},
        {"prompt": "p2", "reference": '{"asset": "CV-3", "fault": "noise"}'},
        {"prompt": "p3", "response": '{"asset": "AHU-2", "fault": "noise"}'},
    ]), as_json)
    backend = TextBackend({"p1": '{"asset": "P-101", "fault": "leak"}', "p2": '{"asset": "CV-3", "fault": "hum"}',
                           "p3": "not json"})
    q = evaluate_holdout(backend, rows, as_json)
    sc = q["scores"]
    assert (sc["valid_json_rate"], sc["schema_valid_rate"]) == pytest.approx((2 / 3, 1 / 3))
    assert sc["field_exact"] == pytest.approx({"asset": 2 / 3, "fault": 1 / 3})
    assert q["primary"] == sc["field_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_the_tasks_decoding_and_system_prompt_are_applied(tmp_path: Path) -> None:
    from edgepack.task import Decoding

    task = Task(answer=TextAnswer(), system_prompt="Answer tersely.",
                decoding=Decoding(max_tokens=7, temperature=0.3, stop=("\nAction",), repeat_penalty=1.1))
    rows = load_holdout(write_holdout(tmp_path / "h.jsonl", [
        {"prompt": "p1", "reference": "Category: thermal"},
        {"messages": [{"role": "system", "content": "Own prompt."}, {"role": "user", "content": "p2"}],
         "reference": "x"}]), task)
    backend = TextBackend({"p1": "Category: thermal\nAction: cool it", "p2": "x"})
    q = evaluate_holdout(backend, rows, task)
    first, second = backend.calls
    assert first["messages"] == [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "p1"}]
    assert second["messages"][0] == {"role": "system", "content": "Own prompt."}  # a row's own system turn wins
    assert (first["max_tokens"], first["temperature"], first["repeat_penalty"], first["json_schema"]) == (7, 0.3, 1.1,
                                                                                                         None)
    assert q["examples"][0]["answer"] == "Category: thermal" and q["primary"] == 1.0  # cut at the stop string
    assert q["decoding"] == ("temperature 0.3, max 7 tokens, repeat penalty 1.1, stop at ['\\nAction'], the task's "
                             "system prompt")
    assert q["structured_output"] is None  # not a json task


SCHEMA = {"type": "object", "required": ["asset", "fault"], "additionalProperties": False,
          "properties": {"asset": {"type": "string"}, "fault": {"enum": ["leak", "noise"]}}}
JSON_TASK = Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset", "fault")))


class GrammarBackend(TextBackend):
    """A backend that constrains JSON: under a schema it answers the valid JSON, without one the
    scripted (sometimes broken) text, as a model decoding with and without a grammar would."""

    format = "gguf"
    constrains_json = True

    def __init__(self, answers: dict[str, str], constrained: dict[str, str]) -> None:
        super().__init__(answers)
        self.constrained = constrained

    def answer(self, prompt: str, json_schema: dict[str, Any] | None) -> str:
        return self.constrained[prompt] if json_schema is not None else self.answers[prompt]


def test_a_json_task_is_gated_under_its_schema_and_reports_the_rate_without_it(tmp_path: Path) -> None:
    rows = load_holdout(write_holdout(tmp_path / "j.jsonl", [
        {"prompt": "p1", "reference": '{"asset": "P-101", "fault": "leak"}'},
        {"prompt": "p2", "reference": '{"asset": "CV-3", "fault": "noise"}'}]), JSON_TASK)
    backend = GrammarBackend({"p1": '{"asset": "P-101", "fault": "leak"}', "p2": "asset CV-3, noise"},
                             {"p1": '{"asset": "P-101", "fault": "leak"}', "p2": '{"asset": "CV-3", "fault": "noise"}'})
    seen: list[tuple[str, int, int]] = []
    q = evaluate_holdout(backend, rows, JSON_TASK, progress=lambda what, done, total: seen.append((what, done, total)))
    assert [c["json_schema"] for c in backend.calls] == [SCHEMA, SCHEMA, None, None]  # under the schema, then without
    assert seen[-1] == ("gate: holdout", 4, 4)
    assert q["scores"]["valid_json_rate"] == 1.0 and q["primary"] == 1.0  # the verdict judges the constrained pass
    so = q["structured_output"]
    assert so["decoding"] == "constrained" and so["constrained"] == {"valid_json_rate": 1.0, "schema_valid_rate": 1.0}
    assert so["unconstrained"]["valid_json_rate"] == 0.5 and so["unconstrained"]["schema_valid_rate"] == 0.5
    assert so["unconstrained"]["primary"] == pytest.approx(0.5)
    assert q["decoding"].endswith("under the task's JSON schema")


def test_a_json_task_on_a_backend_that_cannot_constrain_says_unconstrained(tmp_path: Path) -> None:
    rows = load_holdout(write_holdout(tmp_path / "j.jsonl", [
        {"prompt": "p1", "reference": '{"asset": "P-101", "fault": "leak"}'}]), JSON_TASK)
    backend = TextBackend({"p1": "no json here"})
    backend.format = "onnx"
    q = evaluate_holdout(backend, rows, JSON_TASK)
    assert [c["json_schema"] for c in backend.calls] == [None]  # one pass, nothing to constrain with
    so = q["structured_output"]
    assert so["decoding"] == "unconstrained" and so["constrained"] is None
    assert so["unconstrained"] == {"valid_json_rate": 0.0, "schema_valid_rate": 0.0}
    assert "the onnx runtime cannot constrain decoding to a JSON schema" in so["note"]
    assert q["decoding"].endswith("JSON unconstrained")


def test_what_cannot_be_computed_is_said_per_budget(tmp_path: Path) -> None:
    fresh = load_holdout(write_holdout(tmp_path / "f.jsonl", [{"prompt": "p1", "label": "thermal"}]))
    q = evaluate_holdout(ScriptedBackend({"p1": "Category: thermal"}), fresh)
    assert q["primary"] == 1.0 and q["unmeasured"]["score"] is None
    assert q["unmeasured"]["relative_quality"].startswith("the holdout rows carry no teacher responses")
    unscored = load_holdout(write_holdout(tmp_path / "u.jsonl", [{"prompt": "p1", "response": "Category: thermal"}]))
    q = evaluate_holdout(ScriptedBackend({"p1": "Category: thermal"}), unscored)
    assert q["primary"] is None and q["unmeasured"]["score"] == q["unmeasured"]["relative_quality"] == (
        "accuracy not measured: none of the 1 answered rows could be scored for it (a labels task scores against "
        "a gold `label`)")


def test_eval_and_the_gate_give_the_same_number(tiny_gguf: Path, tmp_path: Path) -> None:
    """The same artifact and holdout: answers scored by eval's scorer path equal the gate's child's scores."""
    from edgepack.distill.evaluate import answer_scores
    from edgepack.export.gate.quality_child import answer_holdout
    from edgepack.runtime.backends.base import get_backend

    holdout = [{"id": f"h{i}", "prompt": p, "label": label, "reference": ref, "response": f"Category: {label}"}
               for i, (p, label, ref) in enumerate([
                   ("Pump P-101 bearing noise and vibration.", "mechanical", "Inspect the pump bearings."),
                   ("Motor starter contacts are burnt.", "electrical", "Replace the starter contacts."),
                   ("PLC rack 2 lost Profinet communication.", "network", "Check the switch port.")])]
    from tests.runtime.helpers import tiny_task

    # tiny_task: the demo's contract with a one-line system prompt, which the gate prepends
    for task in (Task(answer=TextAnswer()), tiny_task()):
        rows = load_holdout(write_holdout(tmp_path / f"{task.kind}.jsonl", holdout), task)
        gate = answer_holdout(tiny_gguf, fmt="gguf", rows=rows, threads=1, n_ctx=256, task=task)
        assert "error" not in gate, gate
        with get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256, gpu_layers=0) as backend:
            # as the bundle answers: the task's system prompt before a row without one
            answers = ["".join(backend.stream_chat(task.prompt_messages(r["messages"]),
                                                   max_tokens=task.decoding.max_tokens, temperature=0.0))
                       for r in rows]
        assert [e["answer"] for e in gate["examples"]] == [a[:200] for a in answers]
        scored = answer_scores(task, answers, rows)
        assert scored["primary"] == gate["primary"] and scored["scores"] == gate["scores"]
        if task.kind == "text":
            assert 0.0 < gate["primary"] < 1.0  # a random model's text: a number that could differ, and does not


def test_a_gate_under_a_runs_task_json(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.task import save_task

    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "data").mkdir()
    artifact = run / "artifacts" / "tiny-F16.gguf"
    shutil.copy(tiny_gguf, artifact)
    holdout = write_holdout(run / "data" / "holdout.jsonl", [{"prompt": "p1", "reference": "Check the pump."},
                                                            {"prompt": "p2", "response": "Reset the breaker."}])
    save_task(Task(answer=TextAnswer()), run / "task.json")
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    report = run_gate(artifact=artifact, profile=profile, holdout=holdout, efficiency=False)
    q = report["measurements"]["quality"]
    assert q["task_source"] == str((run / "task.json").resolve()) and q["task"]["kind"] == "text"
    assert q["primary_metric"] == "chrf" and q["primary"] is not None and q["scores"]["scored_rows"] == 2
    (run / "task.json").write_text('{"schema_version": 1}')
    with pytest.raises(DataError, match="task.json: not a valid task: .*'answer' is a required property"):
        run_gate(artifact=artifact, profile=profile, holdout=holdout, efficiency=False)


# --- the holdout pass runs in a child -----------------------------------------------------------
@pytest.fixture(scope="module")
def gated(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gate-quality")
    profile = load_profile(str(write_profile(folder, "tiny-ok", min_relative_quality=0.0)))
    with pytest.MonkeyPatch.context() as mp:
        # Loading a model in the gate's own process is not allowed: only the children may.
        import edgepack.runtime.backends.base as base

        def refuse(*_: Any, **__: Any) -> Any:
            raise AssertionError("the gate loaded a model in its own process")

        mp.setattr(base, "get_backend", refuse)
        return run_gate(artifact=tiny_gguf, profile=profile, holdout=write_holdout(folder / "h.jsonl"),
                        efficiency=False)


def test_the_holdout_is_answered_in_a_child_with_a_row_scaled_timeout(gated: dict[str, Any], tiny_gguf: Path) -> None:
    assert gated["verdict"] == PASS, gated["reasons"]
    q = gated["measurements"]["quality"]
    assert (q["rows"], q["answered"], q["labelled"], q["teacher_rows"]) == (3, 3, 2, 2)
    # a random-init model never answers "Category: ...": it agrees with the teacher on no row
    assert (q["teacher_agreement"], q["teacher_agreement_rows"], q["unparsed"]) == (0.0, 3, 3)
    assert q["timeout_s"] == pytest.approx(300 + 60 * tiny_gguf.stat().st_size / 1e9 + 30 * 3)
    assert q["timeout_s"] == pytest.approx(answer_timeout_s(tiny_gguf, 3))
    assert 0 < q["wall_s"] < q["timeout_s"]
    assert gated["reference"] is None and "kld_vs_reference" not in q  # not under RUN/artifacts/


def test_the_markdown_reports_agreement(gated: dict[str, Any]) -> None:
    from edgepack.export.gate.report import gate_markdown

    md = gate_markdown(gated)
    assert "## Quality on the holdout" in md
    assert "agreement with the teacher: 0.000 (0 of 3 rows whose teacher response names a label" in md


# --- (b), (c) a child that crashes or hangs -----------------------------------------------------
def _sabotage_children(monkeypatch: pytest.MonkeyPatch, folder: Path, code: str) -> None:
    """Make every holdout child (and only those) run ``code`` at interpreter start-up."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import os, signal, sys, time\n"
        "if 'edgepack.export.gate.quality_child' in getattr(sys, 'orig_argv', []):\n"
        f"    {code}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize(("code", "expected"), [
    ("os.abort()", "holdout pass process was killed by SIGABRT"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "holdout pass process was killed by SIGKILL (the out-of-memory killer"),
    ("os._exit(3)", "holdout pass process exited 3 without a JSON result"),
])
def test_a_crashed_holdout_child_is_a_fail_with_the_reason(tiny_gguf: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, code: str,
                                                           expected: str) -> None:
    _sabotage_children(monkeypatch, tmp_path / "site", code)
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    report = run_gate(artifact=tiny_gguf, profile=profile, holdout=write_holdout(tmp_path / "h.jsonl"),
                      efficiency=False)
    assert report["measurements"]["ok"] is True  # the latency child was not touched
    assert report["verdict"] == FAIL
    assert report["reasons"][0].startswith(f"relative_quality: the holdout could not be answered: {expected}")
    q = report["measurements"]["quality"]
    assert q["error"].startswith(expected) and q["wall_s"] < 60


def test_a_hung_holdout_child_is_killed_at_the_timeout(tiny_gguf: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "child.pid"
    _sabotage_children(monkeypatch, tmp_path / "site", f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                                       "time.sleep(600)")
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    start = time.monotonic()
    report = run_gate(artifact=tiny_gguf, profile=profile, holdout=write_holdout(tmp_path / "h.jsonl"),
                      efficiency=False, quality_timeout_s=1.5)
    assert time.monotonic() - start < 120  # latency measurement + 1.5 s, not the child's 600 s
    assert report["verdict"] == FAIL
    assert ("the holdout could not be answered: holdout pass timed out after 1.5 s (child killed)"
            in report["reasons"][0])
    q = report["measurements"]["quality"]
    assert 1.5 <= q["wall_s"] < 30 and q["timeout_s"] == 1.5
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped, not left behind


# --- (d) KLD vs the unquantized student ---------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir: Path, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/student (the tiny HF model) and RUN/artifacts/student-Q4_0.gguf quantized from its F16."""
    from edgepack.export.gguf.quantize import quantize_gguf

    run = tmp_path_factory.mktemp("kld") / "run"
    shutil.copytree(tiny_llama_dir, run / "student")
    (run / "artifacts").mkdir()
    quantize_gguf(tiny_gguf, run / "artifacts" / "student-Q4_0.gguf", "Q4_0", threads=1)
    write_holdout(run / "holdout.jsonl")
    return run


def test_auto_reference_is_the_runs_student(run_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    assert auto_reference(run_dir / "artifacts" / "student-Q4_0.gguf") == (run_dir / "student").resolve()
    assert auto_reference(run_dir / "artifacts" / "student-onnx-int4") == (run_dir / "student").resolve()
    assert auto_reference(run_dir / "artifacts" / "student.edgepack") is None  # bundles: only when given
    assert auto_reference(tiny_gguf) is None
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "student").mkdir()  # no config.json: not a model
    assert auto_reference(tmp_path / "artifacts" / "x.gguf") is None


def test_kld_is_small_for_f16_and_larger_for_q4(run_dir: Path, tiny_llama_dir: Path, tiny_gguf: Path) -> None:
    rows = load_holdout(run_dir / "holdout.jsonl")
    f16 = holdout_kld(tiny_llama_dir, tiny_gguf, rows=rows, threads=1)
    q4 = holdout_kld(tiny_llama_dir, run_dir / "artifacts" / "student-Q4_0.gguf", rows=rows, threads=1)
    for k in (f16, q4):
        assert "error" not in k, k
        assert k["rows"] == 3 and k["positions"] > 20 and k["compared_with"] == "transformers (float32)"
        assert k["tokenizer_ok"] is True
    assert 0.0 <= f16["kld_mean"] < 1e-4 and f16["top1_agreement"] >= 0.98
    assert q4["kld_mean"] > 10 * max(f16["kld_mean"], 1e-6)
    assert q4["positions"] == f16["positions"]


def test_gate_of_a_run_artifact_measures_kld_against_run_student(run_dir: Path) -> None:
    from edgepack.export.gate.report import gate_markdown

    profile = load_profile(str(write_profile(run_dir, "p", min_relative_quality=0.0)))
    report = run_gate(artifact=run_dir / "artifacts" / "student-Q4_0.gguf", profile=profile,
                      holdout=run_dir / "holdout.jsonl", efficiency=False)
    assert report["verdict"] == PASS, report["reasons"]  # KLD is reported, not judged
    student = str((run_dir / "student").resolve())
    assert report["reference"] == {"path": student, "source": "auto"}
    kld = report["measurements"]["quality"]["kld_vs_reference"]
    assert kld["source"] == "auto" and kld["reference"] == student
    assert kld["kld_mean"] > 1e-4 and 0.0 <= kld["top1_agreement"] <= 1.0 and kld["positions"] > 20
    assert "not a budget" in kld["note"]
    md = gate_markdown(report)
    assert f"reference: `{student}` (auto)" in md and "mean KLD" in md


def test_a_failed_kld_pass_is_reported_not_judged() -> None:
    from edgepack.export.gate.gate import decide

    quality = {"accuracy": 0.9, "teacher_accuracy": 0.9, "relative": 1.0, "notes": [],
               "kld_vs_reference": {"reference": "RUN/student", "error": "KLD pass timed out after 9 s (child killed)"}}
    m = {"ok": True, "ttft_ms": {"p95": 1.0}, "decode_tokens_per_s": {"p50": 100.0}, "peak_rss_mb": 10.0,
         "gpu_offload": False, "quality": quality}
    verdict, _, reasons = decide(m, load_profile("cpu-x86-2c"), True, "ok")
    assert verdict == PASS
    assert reasons == ["KLD vs reference RUN/student not measured (reported only, not a budget): "
                       "KLD pass timed out after 9 s (child killed)"]


def test_a_reference_needs_a_holdout_and_a_model(tiny_gguf: Path, tmp_path: Path) -> None:
    profile = load_profile(str(write_profile(tmp_path, "p")))
    with pytest.raises(UsageError, match="--reference needs --holdout"):
        run_gate(artifact=tiny_gguf, profile=profile, holdout=None, reference=tmp_path)
    with pytest.raises(ModelSourceError, match="neither an HF model dir"):
        run_gate(artifact=tiny_gguf, profile=profile, holdout=write_holdout(tmp_path / "h.jsonl"),
                 reference=tmp_path)


def test_cli_gates_a_bundle_with_a_given_reference(run_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle

    bundle = run_dir / "artifacts" / "tiny.edgepack"  # under RUN/artifacts/, yet no auto reference
    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16", "profile": {"name": "t"},
                "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS"}
    write_bundle(bundle, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    try:
        profile = write_profile(tmp_path, "p", min_relative_quality=0.0)
        report = tmp_path / "out" / "tiny.json"
        out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(bundle), "--profile", str(profile),
                              "--holdout", str(run_dir / "holdout.jsonl"), "--reference", str(run_dir),
                              "--report", str(report)],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    finally:
        bundle.unlink()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agreement with the teacher 0.000 (3 rows)" in out.stdout
    assert "KLD vs reference" in out.stdout and "(auto)" not in out.stdout
    data = json.loads(report.read_text())
    kld = data["measurements"]["quality"]["kld_vs_reference"]
    assert data["reference"]["source"] == kld["source"] == "given"
    assert kld["reference"] == str(run_dir / "student") and 0.0 <= kld["kld_mean"] < 1e-4  # the F16 inside


@pytest.mark.parametrize(("case", "fragment"), [
    ("row", "data/holdout.jsonl:2: has no `label` and no teacher `response`"),
    ("labels", "task.json: the label set has duplicates ('thermal' and 'Thermal' are one label)"),
    ("regex", "task.json: answer.pattern does not compile"),
    ("schema", "task.json: answer.schema is not a valid JSON Schema"),
])
def test_cli_gate_bad_input_exits_2_with_one_line_and_writes_nothing(case: str, fragment: str, tiny_gguf: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    holdout = write_holdout(run / "data" / "holdout.jsonl", [{"prompt": "p1", "label": "thermal"}, {"prompt": "p2"}]
                            if case == "row" else [{"prompt": "p1", "label": "thermal"}])
    answers = {"labels": {"kind": "labels", "labels": ["thermal", "Thermal"]},
               "regex": {"kind": "regex", "pattern": "(?P<label>"},
               "schema": {"kind": "json", "schema": {"type": "nope"}}}
    if case in answers:
        task = {**DEMO_TASK.to_json(), "answer": answers[case],
                "primary_metric": {"labels": "accuracy", "regex": "match_rate", "schema": "field_f1"}[case]}
        (run / "task.json").write_text(json.dumps(task))
    report = tmp_path / "out" / "gate.json"
    profile = write_profile(tmp_path, "p", min_relative_quality=0.0)
    rc = main(["gate", str(tiny_gguf), "--profile", str(profile), "--holdout", str(holdout), "--report", str(report)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err
    assert not report.parent.exists()


# --- a json task gated in the real runtimes -----------------------------------------------------
SMALL_SCHEMA = {"type": "object", "required": ["asset", "fault"], "additionalProperties": False,
                "properties": {"asset": {"type": "string", "maxLength": 8}, "fault": {"enum": ["leak", "noise"]}}}


def _json_run(tmp_path: Path, artifact: Path) -> tuple[Path, Path, Any]:
    """A run folder holding ``artifact`` under artifacts/, a json task.json, fresh holdout rows with
    references (no teacher answers), and a profile judged by a floor only."""
    from edgepack.task import Decoding, save_task

    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "data").mkdir()
    target = run / "artifacts" / artifact.name
    (shutil.copytree if artifact.is_dir() else shutil.copy)(artifact, target)
    save_task(Task(answer=JsonAnswer(schema=SMALL_SCHEMA, fields=("asset", "fault")),
                   system_prompt="Extract the work order as JSON.", decoding=Decoding(max_tokens=48)),
              run / "task.json")
    holdout = write_holdout(run / "data" / "holdout.jsonl", [
        {"prompt": "Pump P-101 is leaking at the seal.", "reference": '{"asset": "P-101", "fault": "leak"}'},
        {"prompt": "Fan F-7 makes a grinding noise.", "reference": '{"asset": "F-7", "fault": "noise"}'}])
    text = write_profile(tmp_path, "floor", min_relative_quality=0.5, choices='["gguf:F16", "onnx:int4"]').read_text()
    (tmp_path / "floor.toml").write_text(text.replace("min_relative_quality = 0.5", "min_score = 0.0"))
    return target, holdout, load_profile(str(tmp_path / "floor.toml"))


def test_a_json_task_on_gguf_is_gated_under_the_grammar_with_both_rates(tiny_gguf: Path, tmp_path: Path) -> None:
    artifact, holdout, profile = _json_run(tmp_path, tiny_gguf)
    report = run_gate(artifact=artifact, profile=profile, holdout=holdout, efficiency=False)
    assert report["verdict"] == PASS, report["reasons"]  # a floor needs no teacher answers
    q = report["measurements"]["quality"]
    so = q["structured_output"]
    assert so["decoding"] == "constrained" and q["decoding"].endswith("under the task's JSON schema")
    # random weights, yet every answer is schema-valid JSON: llama.cpp's grammar forces it
    assert so["constrained"] == {"valid_json_rate": 1.0, "schema_valid_rate": 1.0} == {
        k: q["scores"][k] for k in ("valid_json_rate", "schema_valid_rate")}
    assert so["unconstrained"]["valid_json_rate"] is not None and so["unconstrained"]["primary"] is not None
    assert q["timeout_s"] == pytest.approx(answer_timeout_s(artifact, 2 * 2))  # two rows, two passes
    from edgepack.export.gate.report import gate_markdown

    assert "- JSON under the task's schema (grammar; the verdict judges these): valid JSON 1.000" in gate_markdown(report)


def test_a_json_task_on_onnx_is_gated_unconstrained_and_says_so(tiny_onnx: dict[str, Any], tmp_path: Path) -> None:
    artifact, holdout, profile = _json_run(tmp_path, Path(tiny_onnx["path"]))
    report = run_gate(artifact=artifact, profile=profile, holdout=holdout, efficiency=False)
    q = report["measurements"]["quality"]
    so = q["structured_output"]
    assert so["decoding"] == "unconstrained" and so["constrained"] is None
    assert "the onnx runtime cannot constrain decoding to a JSON schema" in so["note"]
    assert q["decoding"].endswith("JSON unconstrained") and q["primary_metric"] == "field_f1"
    assert so["unconstrained"]["valid_json_rate"] == q["scores"]["valid_json_rate"]
