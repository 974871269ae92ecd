"""distill data and the task: a user holdout, label spellings, the task contract the data writes,
--system-prompt, the shipped domains (builtin:NAME) and skipped-line warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.constants import DATA_DIR, DATA_REPORT, HOLDOUT_FILE, TRAIN_FILE
from edgepack.distill.data import build_dataset, read_jsonl
from edgepack.errors import DataError, RunDirError, UsageError
from tests.distill.test_data import GOOD, LABELS, SCRIPT, _write, script_teacher, scripted_teacher  # noqa: F401 - fixture


def test_a_user_holdout_file_replaces_the_split(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher) -> None:
    prompts = list(SCRIPT)
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in prompts[:7]])
    held = _write(tmp_path / "h.jsonl", [{"prompt": p, "label": LABELS[p]} for p in prompts[7:]] + ["{broken"])
    run = tmp_path / "run"
    report = build_dataset(teacher=str(tiny_llama_dir), data=data, holdout=held, run_dir=run, seed=0)
    assert report["train_prompts"] == 7 and report["holdout_prompts"] == len(prompts) - 7
    assert report["bad_row_details"] == [{"line": len(prompts) - 6, "reason": "not valid JSON (Expecting property "
                                          "name enclosed in double quotes)", "file": str(held)}]
    assert [r["messages"][-1]["content"] for r in read_jsonl(run / DATA_DIR / HOLDOUT_FILE)] == prompts[7:]
    assert "holdout:h.jsonl" in report["identity"]["inputs"]
    with pytest.raises(RunDirError, match="another teacher or other inputs"):  # the split is another input
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    with pytest.raises(UsageError, match="--holdout replaces the split"):
        build_dataset(teacher=str(tiny_llama_dir), data=None, holdout=held, run_dir=tmp_path / "r2")


def test_spellings_of_one_label_are_one_label_and_announced(tmp_path: Path, tiny_llama_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20: six case/look-alike spellings of one label became six labels, and the rows whose
    spelling differed from the teacher's answer were dropped as label_mismatch without a word."""
    spellings = ["thermal", "Thermal", "THERMAL", "tHeRmAl", "therm\u0430l", "\uff54\uff48\uff45\uff52\uff4d\uff41\uff4c"]
    rows, script = [], {}
    for i in range(12):
        prompt = f"Chiller {i} outlet temperature high"
        rows.append({"prompt": prompt, "label": spellings[i % 6]})
        script[prompt] = (f"Category: thermal\nAction: Clean the condenser of chiller {i}.", True)
    rows += [{"prompt": "Switch port down", "label": "network"}, {"prompt": "PLC-4 offline", "label": "Network"}]
    script.update({"Switch port down": ("Category: network\nAction: Replace the patch cable.", True),
                   "PLC-4 offline": ("Category: network\nAction: Check the PLC uplink.", True)})
    script_teacher(monkeypatch, script)
    run = tmp_path / "run"
    report = build_dataset(teacher=str(tiny_llama_dir), data=_write(tmp_path / "p.jsonl", rows), run_dir=run, seed=0)
    assert report["labels"] == ["network", "thermal"]
    assert report["dropped"] == 0 and report["kept"] == report["train_prompts"]
    assert report["label_spellings"]["thermal"] == {s: 2 for s in spellings[1:]}
    assert report["label_spellings"]["network"] == {"Network": 1}
    warning = next(w for w in report["warnings"] if "thermal" in w)
    assert "5 other spellings" in warning and "look-alike" in warning and "\\u0430" in warning
    stored = read_jsonl(run / DATA_DIR / TRAIN_FILE) + read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    assert {r["label"] for r in stored} == {"thermal", "network"}
    assert report["teacher_holdout_accuracy"] == 1.0


# -- the task contract (RUN/task.json, issue #15) ------------------------------------------------

def test_the_task_follows_the_data_and_the_flags(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher) -> None:
    from edgepack.task import TASK_FILE, load_task

    labelled = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    report = build_dataset(teacher=str(tiny_llama_dir), data=labelled, run_dir=tmp_path / "a", seed=0)
    task = load_task(tmp_path / "a" / TASK_FILE)
    assert task.kind == "labels" and task.answer.labels == tuple(sorted(set(LABELS.values())))
    assert task.primary_metric == "accuracy" and task.decoding.max_tokens == 48 and task.system_prompt is None
    assert report["identity"]["task"] == task.sha256() and report["task"]["kind"] == "labels"
    assert report["task"]["file"] == TASK_FILE

    free = _write(tmp_path / "f.jsonl", [{"prompt": p} for p in SCRIPT])
    build_dataset(teacher=str(tiny_llama_dir), data=free, run_dir=tmp_path / "b", seed=0)
    text = load_task(tmp_path / "b" / TASK_FILE)
    assert text.kind == "text" and text.primary_metric == "chrf" and text.decoding.max_tokens == 64

    from edgepack.task import answer_from_options

    build_dataset(teacher=str(tiny_llama_dir), data=labelled, run_dir=tmp_path / "c", seed=0,
                  answer_format=answer_from_options(regex=r"Category: (?P<label>\w+)\nAction: .+"))
    regex = load_task(tmp_path / "c" / TASK_FILE)
    assert regex.kind == "regex" and regex.answer.labels == task.answer.labels
    assert regex.primary_metric == "label_accuracy"


def test_a_system_prompt_file_reaches_every_row_and_the_task(tmp_path: Path, tiny_llama_dir: Path,
                                                             scripted_teacher) -> None:
    from edgepack.task import TASK_FILE, load_task, read_system_prompt

    prompt_file = tmp_path / "system.txt"
    prompt_file.write_text("Triage plant alarms.\nAnswer with a category and an action.\n\n", encoding="utf-8")
    system = read_system_prompt(prompt_file)
    assert system == "Triage plant alarms.\nAnswer with a category and an action."
    rows = [{"prompt": p, "label": LABELS[p]} for p in SCRIPT]
    rows[0] = {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": rows[0]["prompt"]}],
               "label": rows[0]["label"]}
    data = _write(tmp_path / "p.jsonl", rows)
    run = tmp_path / "run"
    build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0, system_prompt=system)
    stored = read_jsonl(run / DATA_DIR / TRAIN_FILE) + read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    firsts = {r["messages"][-1]["content"]: r["messages"][0] for r in stored}
    for prompt, first in firsts.items():  # a row's own system turn is kept
        assert first == {"role": "system", "content": "own" if prompt == list(SCRIPT)[0] else system}
    assert load_task(run / TASK_FILE).system_prompt == system
    with pytest.raises(RunDirError, match="another teacher or other inputs"):  # the prompt is part of the identity
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)


def test_data_built_before_the_task_contract_is_kept_and_gets_its_task(tmp_path: Path, tiny_llama_dir: Path,
                                                                       scripted_teacher) -> None:
    from edgepack.atomic import write_json
    from edgepack.task import TASK_FILE, load_task

    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    run = tmp_path / "run"
    first = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    task = load_task(run / TASK_FILE)
    # What an older edgepack left: no task in the identity, no task.json.
    report = json.loads((run / DATA_DIR / DATA_REPORT).read_text())
    del report["identity"]["task"]
    write_json(run / DATA_DIR / DATA_REPORT, report)
    (run / TASK_FILE).unlink()
    again = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert again["skipped"] is True and again["kept"] == first["kept"]
    assert load_task(run / TASK_FILE) == task
    with pytest.raises(RunDirError, match="another teacher or other inputs"):  # a flag that did not exist then
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0, system_prompt="New prompt.")


def test_the_demo_task_is_one_instance_of_the_contract() -> None:
    from edgepack.distill.data import DEMO_SHOTS, _load_inputs, load_demo_shots
    from edgepack.task import DEMO_LABELS, DEMO_SYSTEM_PROMPT, DEMO_TASK, build_task

    inputs = _load_inputs(None, strict=True, seed=0, limit=None)
    task = build_task(answer=None, labels=inputs.labels, system_prompt=DEMO_SYSTEM_PROMPT,
                      demonstrations=inputs.context)
    assert task.kind == "labels" and set(task.answer.labels) == set(DEMO_LABELS)
    assert task.demonstrations == tuple(load_demo_shots()) and len(task.demonstrations) == 2 * len(
        read_jsonl(DEMO_SHOTS))
    assert task.decoding == DEMO_TASK.decoding and task.primary_metric == DEMO_TASK.primary_metric == "accuracy"
    from dataclasses import replace

    assert replace(task, demonstrations=()) == DEMO_TASK
    assert all(r.messages[0] == {"role": "system", "content": DEMO_SYSTEM_PROMPT} for r in inputs.holdout)


@pytest.mark.parametrize(("content", "message"), [
    (None, "--system-prompt file not found"),
    (b"  \n\n", "is empty"),
    (b"\xff\xfe bad", "is not UTF-8 text"),
])
def test_cli_bad_system_prompt_exits_2_and_writes_nothing(content: bytes | None, message: str, tmp_path: Path,
                                                          tiny_llama_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    data = _write(tmp_path / "p.jsonl", [GOOD])
    prompt = tmp_path / "system.txt"
    if content is not None:
        prompt.write_bytes(content)
    run = tmp_path / "run"
    rc = main(["distill", "data", "--teacher", str(tiny_llama_dir), "--data", str(data), "--out", str(run),
               "--system-prompt", str(prompt)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0] and str(prompt) in errors[0]
    assert not run.exists()


# -- shipped domains (--data builtin:NAME) and skipped lines, reported (issue #15) ----------------

def test_builtin_demo_is_the_default_data() -> None:
    from edgepack.distill.data import _load_inputs

    assert _load_inputs("builtin:demo", strict=False, seed=0, limit=None) == \
        _load_inputs(None, strict=False, seed=0, limit=None)


def test_builtin_workorders_is_a_json_task_from_its_folder(tmp_path: Path, tiny_llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The second shipped domain runs from its files alone: rows with its system prompt, its shots as
    the teacher's demonstrations, a json task from schema.json, and the identity of its files."""
    from edgepack.distill.data import SHIPPED_DOMAINS, load_shots
    from edgepack.task import TASK_FILE, load_task

    domain = SHIPPED_DOMAINS["workorders"]
    script = {r["prompt"]: (r["reference"], True) for r in read_jsonl(domain.seed) + read_jsonl(domain.holdout)}
    asked = script_teacher(monkeypatch, script)
    run = tmp_path / "run"
    report = build_dataset(teacher=str(tiny_llama_dir), data="builtin:workorders", run_dir=run, seed=0, limit=6)
    system = (domain.folder / "system.txt").read_text(encoding="utf-8").rstrip()
    task = load_task(run / TASK_FILE)
    assert task.kind == "json" and task.primary_metric == "field_f1"
    assert task.answer.schema == json.loads((domain.folder / "schema.json").read_text())
    assert task.answer.fields == ("asset", "fault", "priority") and task.answer.file == "schema.json"
    assert task.answer.text_fields == ("action",)  # free text: chrF, not exact match
    assert task.system_prompt == system and task.demonstrations == tuple(load_shots(domain.shots))
    assert len(task.demonstrations) == 2 * len(read_jsonl(domain.shots))
    assert report["data"] == "builtin:workorders" and report["format_check"]["kind"] == "json-schema"
    assert report["kept"] == report["train_prompts"] == 6 and report["holdout_prompts"] == len(read_jsonl(domain.holdout))
    assert set(report["identity"]["inputs"]) == {"seed.jsonl", "holdout.jsonl", "shots.jsonl"}
    stored = read_jsonl(run / DATA_DIR / TRAIN_FILE) + read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    assert all(r["messages"][0] == {"role": "system", "content": system} and len(r["messages"]) == 2 for r in stored)
    assert all(m[0]["content"] == system and m[1:-1] == list(task.demonstrations) for m in asked)  # teacher only
    again = build_dataset(teacher=str(tiny_llama_dir), data=Path("builtin:workorders"), run_dir=run, seed=0, limit=6)
    assert again["skipped"] is True
    with pytest.raises(RunDirError, match="another teacher or other inputs"):  # another domain, another run
        build_dataset(teacher=str(tiny_llama_dir), data=None, run_dir=run, seed=0, limit=6)


@pytest.mark.parametrize(("data", "kwargs", "message"), [
    ("builtin:nope", {}, "unknown shipped domain 'builtin:nope'"),
    ("builtin:workorders", {"holdout": "h.jsonl"}, "builtin:workorders has its own holdout"),
])
def test_a_bad_builtin_domain_writes_nothing(data: str, kwargs: dict, message: str, tmp_path: Path,
                                             tiny_llama_dir: Path) -> None:
    run = tmp_path / "run"
    kwargs = {k: _write(tmp_path / v, [GOOD]) for k, v in kwargs.items()}
    with pytest.raises(UsageError, match=message) as info:
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0, **kwargs)
    assert not run.exists()
    if "unknown" in message:
        assert "builtin:demo, builtin:workorders" in info.value.hint


def test_skipped_lines_are_counted_and_named_in_the_warnings(tmp_path: Path, tiny_llama_dir: Path,
                                                             scripted_teacher) -> None:
    rows: list[str | dict] = [{"prompt": p, "label": LABELS[p]} for p in SCRIPT]
    for at in (2, 5, 6, 8, 9, 11):  # six bad lines among the good ones (1-based line numbers)
        rows.insert(at - 1, "{broken")
    holdout = _write(tmp_path / "h.jsonl", [{"prompt": "Pump P-2 bearing noisy", "label": "mechanical"}, "[1]"])
    data = _write(tmp_path / "p.jsonl", rows)
    report = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "run", seed=0,
                           holdout=holdout)
    assert report["bad_rows"] == 7 and [b["line"] for b in report["bad_row_details"]] == [2, 5, 6, 8, 9, 11, 2]
    warning = next(w for w in report["warnings"] if "bad data lines skipped" in w)
    assert warning.startswith("7 bad data lines skipped (lines 2, 5, 6, 8, 9 and 2 more; first: not valid JSON")
    assert "--strict" in warning
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "strict", seed=0, strict=True)


def test_cli_prints_the_skipped_lines(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT] + ["{broken"])
    assert main(["distill", "data", "--teacher", str(tiny_llama_dir), "--data", str(data),
                 "--out", str(tmp_path / "run")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 bad data line skipped (line 11; first: not valid JSON" in err
