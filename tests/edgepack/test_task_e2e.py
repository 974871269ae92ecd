"""Every answer kind end to end on a tiny model: data → train → eval → export → gate → pack → run.

One ``edgepack pipeline`` run per kind (labels, regex, json, text), each with its own system prompt
(``--system-prompt``), its own holdout file (``--holdout``) and, for regex and json, the user's
format (``--format-regex`` / ``--format-schema``). The teacher is a tiny random-init Llama taught
the answers under that system prompt (tests/tiny.py), so its data survives the format filters; the
student is whatever two KD steps make of it, so the scores are low: what is checked is that every
stage scores the same task the same way:

* ``RUN/task.json`` is the kind the flags asked for, with the system prompt;
* eval and the gate score under that task (its sha256), and the teacher's recorded answers get the
  same scores from both;
* the bundle's manifest carries the task and the gated scores;
* ``edgepack run`` on the bundle, sent each holdout prompt bare, applies the task's system prompt
  and decoding, and its answers, scored by eval's scorer, give exactly the gate's numbers for
  the same artifact (and the pipeline's own run stage gives the same first answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgepack.profiles import PROFILE_DIR, load_profile

LABELS = ("electrical", "mechanical", "thermal", "network")
TRAIN_ROWS, HOLDOUT_ROWS = 8, 4
TEACH_STEPS = 80  # a 2-layer tiny Llama answers all 12 rows word for word after 60 (a 3-layer one too)
JSON_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
               "required": ["label", "unit"], "additionalProperties": False,
               "properties": {"label": {"enum": list(LABELS)}, "unit": {"type": "integer", "minimum": 0}}}


@dataclass(frozen=True)
class Kind:
    """One answer kind: how its rows look, how the teacher answers, and the pipeline flags that ask for it."""

    system: str
    answer: Any
    """(row index, label) → the reference answer the teacher is taught."""
    labelled: bool
    """Whether the rows carry a gold ``label``."""
    flags: dict[str, Any] = field(default_factory=dict)
    """PipelineConfig fields beyond the common ones (files are written by the fixture)."""


KINDS = {
    "labels": Kind("Triage the alarm. Answer with Category and Action lines.",
                   lambda i, label: f"Category: {label}\nAction: Inspect unit {i} now.", labelled=True),
    "regex": Kind("Name the fault class, then the unit to inspect.",
                  lambda i, label: f"{label}: inspect unit {i}", labelled=True,
                  flags={"format_regex": r"(?P<label>[a-z]+): inspect unit \d+"}),
    "json": Kind("Answer with one JSON object: the fault class and the unit.",
                 lambda i, label: json.dumps({"label": label, "unit": i}, separators=(",", ":")), labelled=False,
                 flags={"format_schema": "schema.json"}),
    "text": Kind("Say in one sentence what to inspect.",
                 lambda i, label: f"Inspect unit {i} for a {label} fault.", labelled=False),
}


def _rows(kind: Kind, start: int, stop: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, stop):
        label = LABELS[i % len(LABELS)]
        row = {"prompt": f"Alarm {i}: unit {i} reports a {label} fault on line {i % 3}.",
               "reference": kind.answer(i, label)}
        rows.append({**row, "label": label} if kind.labelled else row)
    return rows


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _profile(folder: Path) -> Path:
    """cpu-x86-2c gating one choice (GGUF Q8_0) with a zero relative-quality floor (a student of two
    KD steps answers little right, and the point here is how it is scored, not how well) and
    latency budgets no busy test machine misses (speed is the gate's own tests' business)."""
    edits = {'name = "cpu-x86-2c"': 'name = "tiny-task"', "min_relative_quality = 0.8": "min_relative_quality = 0.0",
             'choices = ["gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K_M", "gguf:Q4_K_M", "gguf:Q4_0", "onnx:int4"]':
             'choices = ["gguf:Q8_0"]', "context_length = 2048": "context_length = 512",
             "prompt_tokens = 128": "prompt_tokens = 16", "ttft_p95_ms = 1500": "ttft_p95_ms = 60000",
             "min_decode_tokens_per_s = 20": "min_decode_tokens_per_s = 0.1"}
    text = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    (folder / "tiny-task.toml").write_text(text)
    return folder / "tiny-task.toml"


@pytest.fixture(scope="module", params=list(KINDS))
def kind_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One pipeline run for one answer kind, with the task flags (module-scoped: one run per kind)."""
    from edgepack.pipeline import PipelineConfig, run_pipeline
    from tests.tiny import build_tiny_llama, teach_tiny

    name, kind = request.param, KINDS[request.param]
    folder = tmp_path_factory.mktemp(f"task-{name}")
    train, holdout = _rows(kind, 0, TRAIN_ROWS), _rows(kind, TRAIN_ROWS, TRAIN_ROWS + HOLDOUT_ROWS)
    teacher = build_tiny_llama(folder / "teacher", layers=3)  # the auto student keeps fewer blocks
    teach_tiny(teacher, [(r["prompt"], r["reference"]) for r in train + holdout], system=kind.system,
               steps=TEACH_STEPS)
    (folder / "system.txt").write_text(kind.system + "\n")
    (folder / "schema.json").write_text(json.dumps(JSON_SCHEMA))
    flags = {k: folder / v if k == "format_schema" else v for k, v in kind.flags.items()}
    cfg = PipelineConfig(profile=load_profile(str(_profile(folder))), teacher=str(teacher),
                         data=_jsonl(folder / "train.jsonl", train), run_dir=folder / "run", steps=2, seed=0,
                         system_prompt=folder / "system.txt", holdout=_jsonl(folder / "holdout.jsonl", holdout),
                         **flags)
    return {"name": name, "kind": kind, "cfg": cfg, "result": run_pipeline(cfg)}


def _run_cli(bundle: Path, prompt: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``edgepack run BUNDLE --prompt PROMPT --json``: the bare prompt, answered as a deployer would."""
    from edgepack.cli import main

    capsys.readouterr()
    assert main(["run", str(bundle), "--prompt", prompt, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_answer_kind_end_to_end(kind_run: dict[str, Any], cache_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.distill.data import read_jsonl
    from edgepack.distill.evaluate import answer_scores
    from edgepack.runtime.bundle.archive import verify_bundle
    from edgepack.task import TASK_FILE, load_task

    name, kind, run, result = kind_run["name"], kind_run["kind"], kind_run["cfg"].run_dir, kind_run["result"]
    # The data stage wrote the task the flags asked for.
    task = load_task(run / TASK_FILE)
    assert task.kind == name and task.system_prompt == kind.system
    if name == "regex":
        assert task.answer.pattern == kind.flags["format_regex"] and task.primary_metric == "label_accuracy"
    if name == "json":
        assert task.answer.schema == JSON_SCHEMA and task.answer.fields == ("label", "unit")
    assert result["verdict"] == "PASS" and result["packaged"] == "gguf:Q8_0", result["gates"]

    # eval and the gate scored under that task; the teacher's recorded answers score the same in both.
    evaluation = json.loads((run / "eval.json").read_text())
    row = result["summary"][0]
    quality = json.loads(Path(row["report"]).read_text())["measurements"]["quality"]
    assert evaluation["task"]["sha256"] == quality["task"]["sha256"] == task.sha256()
    assert quality["primary_metric"] == row["primary_metric"] == task.primary_metric
    assert evaluation["teacher"]["scores"] == quality["teacher_scores"]
    assert evaluation["teacher"]["primary"] == quality["teacher_primary"] and quality["teacher_primary"] > 0
    assert evaluation["distilled"]["scores"]["primary_metric"] == task.primary_metric

    # The bundle carries the task and the gated scores.
    bundle = Path(result["bundle"])
    manifest = verify_bundle(bundle)
    assert manifest["task"] == task.to_json()
    assert manifest["task_scores"]["primary"] == quality["primary"]
    assert manifest["task_scores"]["primary_metric"] == task.primary_metric

    # `edgepack run` applies the task to bare prompts, and its answers are the gated ones: eval's
    # scorer on them gives the gate's numbers for this artifact.
    holdout = read_jsonl(run / "data" / "holdout.jsonl")
    assert all(r["messages"][0] == {"role": "system", "content": kind.system} for r in holdout)
    outputs = [_run_cli(bundle, r["messages"][-1]["content"], capsys) for r in holdout]
    for out in outputs:
        assert out["task"] == name and out["system"] == kind.system
        assert out["decoding"] == task.decoding.to_json() and out["json_schema"] is (name == "json")
    answers = [out["completion"] for out in outputs]
    rescored = answer_scores(task, answers, holdout)
    assert rescored["scores"] == quality["scores"] and rescored["primary"] == quality["primary"]
    assert result["sample"]["completion"] == answers[0]
    if name == "json":  # decoded under the schema as a grammar (GGUF): every answer is valid
        assert quality["structured_output"]["decoding"] == "constrained"
        assert quality["structured_output"]["constrained"] == {"valid_json_rate": 1.0, "schema_valid_rate": 1.0}
        assert all(task.answer.check(a.strip())[0] for a in answers)
