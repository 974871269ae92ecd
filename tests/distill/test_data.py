"""Prompts JSONL validation, the split, and build_dataset's write-nothing-on-bad-input rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.atomic import is_complete
from edgepack.constants import (DATA_DIR, DATA_REPORT, HOLDOUT_FILE, TEACHER_CACHE_DIR, TEACHER_CONTEXT, TEACHER_DIR,
                                TRAIN_FILE)
from edgepack.distill.data import (PromptRow, build_dataset, load_prompts, read_jsonl, split_rows,
                                   with_teacher_context)
from edgepack.errors import DataError, ModelSourceError, RunDirError, TeacherEndpointError, UsageError

GOOD = {"prompt": "Pump P-1 vibration high", "label": "mechanical"}


def _write(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ({"text": "no prompt key"}, "exactly one of"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
    ({"prompt": "   "}, "non-empty string"),
    ({"prompt": 42}, "non-empty string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "last message"),
    ({"prompt": "ok", "label": 3}, "`label`"),
    ({"prompt": "ok", "reference": ""}, "`reference`"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_rows_are_skipped_with_line_numbers_or_fatal_when_strict(tmp_path: Path, line, reason: str) -> None:
    path = _write(tmp_path / "p.jsonl", [GOOD, line, {"prompt": "Breaker CB-1 tripped"}])
    loaded = load_prompts(path)
    assert [r.line for r in loaded.rows] == [1, 3]
    assert len(loaded.bad) == 1 and loaded.bad[0]["line"] == 2 and reason in loaded.bad[0]["reason"]
    with pytest.raises(DataError, match=r"p\.jsonl:2: ") as exc:
        load_prompts(path, strict=True)
    assert reason in str(exc.value)


def test_blank_lines_duplicates_and_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n   \n{"prompt": "a"}\n\xff\xfe\n{"prompt": "\xc3\xbcber"}\n')
    loaded = load_prompts(path)
    assert [r.messages[-1]["content"] for r in loaded.rows] == ["a", "über"]
    assert [(b["line"], b["reason"]) for b in loaded.bad] == [(4, "duplicate prompt"), (5, "not valid UTF-8")]


def test_rows_become_messages_with_optional_system(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [
        {"id": "x1", "prompt": "hello", "label": "network", "reference": "Category: network\nAction: Fix it."},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]},
    ])
    rows = load_prompts(path, system="SYS").rows
    assert rows[0] == PromptRow(id="x1", messages=[{"role": "system", "content": "SYS"},
                                                   {"role": "user", "content": "hello"}],
                                label="network", reference="Category: network\nAction: Fix it.", line=1)
    assert rows[1].messages[0] == {"role": "system", "content": "own"} and rows[1].id == "p-2"


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    _write(tmp_path / "allbad.jsonl", ["{", {"x": 1}])
    with pytest.raises(DataError, match="2 bad rows.*line 1"):
        load_prompts(tmp_path / "allbad.jsonl")


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"alarm {i}"} for i in range(50)])
    rows = load_prompts(path).rows
    a_train, a_hold = split_rows(rows, seed=3)
    b_train, b_hold = split_rows(rows, seed=3)
    c_train, c_hold = split_rows(rows, seed=4)
    assert [r.id for r in a_hold] == [r.id for r in b_hold] and [r.id for r in a_train] == [r.id for r in b_train]
    assert len(a_hold) == 10 and len(a_train) == 40
    assert not {r.id for r in a_hold} & {r.id for r in a_train}
    assert {r.id for r in a_hold} != {r.id for r in c_hold}


def test_teacher_context_goes_after_the_system_turn() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ctx = [{"role": "user", "content": "u0"}, {"role": "assistant", "content": "a0"}]
    assert [m["content"] for m in with_teacher_context(msgs, ctx)] == ["S", "u0", "a0", "U"]
    assert [m["content"] for m in with_teacher_context(msgs[1:], ctx)] == ["u0", "a0", "U"]


# -- build_dataset: nothing is written on bad input ------------------------------------------

@pytest.mark.parametrize("case", ["missing_teacher", "bad_strict_row", "empty_file", "missing_file", "bad_limit",
                                  "endpoint_teacher"])
def test_bad_input_writes_nothing(case: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    good = _write(tmp_path / "good.jsonl", [GOOD])
    teacher, data, kwargs = str(tiny_llama_dir), good, {}
    expected: type[Exception] = DataError
    if case == "missing_teacher":
        teacher, expected = str(tmp_path / "no-model"), ModelSourceError
    elif case == "bad_strict_row":
        data, kwargs = _write(tmp_path / "bad.jsonl", [GOOD, "{oops"]), {"strict": True}
    elif case == "empty_file":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "missing_file":
        data = tmp_path / "absent.jsonl"
    elif case == "bad_limit":
        kwargs, expected = {"limit": 0}, UsageError
    elif case == "endpoint_teacher":
        from edgepack.distill.endpoint import EndpointConfig  # an endpoint that is down (test_endpoint.py)

        teacher, kwargs = "openai:http://127.0.0.1:9/v1#m", {"endpoint": EndpointConfig(max_attempts=1)}
        expected = TeacherEndpointError
    run = tmp_path / "run"
    with pytest.raises(expected):
        build_dataset(teacher=teacher, data=data, run_dir=run, seed=0, **kwargs)
    assert not run.exists()


# Scripted teacher answers, keyed by prompt: (text, finished at EOS).
SCRIPT = {
    "Motor M-1 tripped on overcurrent": ("Category: electrical\nAction: Check the motor current.", True),
    "Pump P-2 bearing noisy": ("Category: mechanical\nAction: Replace the bearing of P-2.", True),
    "Air header at 4 bar": ("", True),
    "PLC-4 offline": ("Category: network\nAction: Check the cable and the cable and the", False),
    "Boiler too hot": ("Check it. Check it. Check it. Check it. Check it. Check it.", True),
    "Gauge PI-5 stuck": ("The gauge is stuck.", True),
    "Chiller warm": ("Category: electrical\nAction: Check the chiller supply.", True),
    "Switch port down": ("Category: network\nAction: Replace the patch cable.", True),
    "Breaker CB-9 open": ("Category: electrical\nAction: Reset CB-9 after checking the load.", True),
    "Fan vibration high": ("Category: thermal\nAction: Inspect the fan.", True),
}
LABELS = {"Motor M-1 tripped on overcurrent": "electrical", "Pump P-2 bearing noisy": "mechanical",
          "Air header at 4 bar": "hydraulic_pneumatic", "PLC-4 offline": "network", "Boiler too hot": "thermal",
          "Gauge PI-5 stuck": "instrumentation", "Chiller warm": "thermal", "Switch port down": "network",
          "Breaker CB-9 open": "electrical", "Fan vibration high": "mechanical"}


def script_teacher(monkeypatch: pytest.MonkeyPatch, script: dict[str, tuple[str, bool]],
                   opened: list[int] | None = None) -> list[list[dict]]:
    """Replace the HF generator with answers from ``script``; return the messages it is asked
    (``opened`` gets one entry per time the teacher is opened)."""
    from contextlib import contextmanager

    from edgepack.distill import generate as gen

    seen: list[list[dict]] = []

    @contextmanager
    def scripted(source, teacher_dir, params):
        if opened is not None:
            opened.append(1)

        def answer(messages):
            seen.append(messages)
            text, finished = script[messages[-1]["content"]]
            return gen.Generation(text=text, tokens=len(text.split()), finished=finished)
        yield answer

    monkeypatch.setitem(gen.GENERATORS, "hf", scripted)
    return seen


@pytest.fixture()
def scripted_teacher(monkeypatch: pytest.MonkeyPatch):
    """Replace the HF generator with scripted answers (the real one is tested below)."""
    return script_teacher(monkeypatch, SCRIPT)


def test_build_dataset_counts_every_drop_reason(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher) -> None:
    rows = [{"prompt": p, "label": LABELS[p]} for p in SCRIPT]
    data = _write(tmp_path / "p.jsonl", rows + ["{broken"])
    run = tmp_path / "run"
    calls: list[tuple] = []
    report = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0,
                           progress=lambda t, d, n=None: calls.append((t, d, n)))
    hold_ids = {r["id"] for r in read_jsonl(run / DATA_DIR / HOLDOUT_FILE)}
    train_prompts = [p for i, p in enumerate(SCRIPT) if f"p-{i + 1}" not in hold_ids]
    assert report["train_prompts"] == 8 and report["holdout_prompts"] == 2 and report["bad_rows"] == 1
    assert report["bad_row_details"] == [{"line": 11, "reason": "not valid JSON (Expecting property name "
                                                                 "enclosed in double quotes)"}]
    from edgepack.distill.filters import drop_reason

    expected: dict[str, int] = {}
    for p in train_prompts:
        reason = drop_reason(SCRIPT[p][0], finished=SCRIPT[p][1], label=LABELS[p], labels=frozenset(LABELS.values()))
        expected[reason or "kept"] = expected.get(reason or "kept", 0) + 1
    assert report["kept"] == expected.pop("kept")
    assert {k: v for k, v in report["drop_reasons"].items() if v} == expected
    assert report["dropped"] == sum(expected.values())
    train = read_jsonl(run / DATA_DIR / TRAIN_FILE)
    assert len(train) == report["kept"]
    for r in train:
        prompt = r["messages"][-1]["content"]
        assert r["response"] == SCRIPT[prompt][0] and r["label"] == LABELS[prompt]
    hold = read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    correct = sum(h["teacher_category"] == h["label"] for h in hold)
    assert report["teacher_holdout_accuracy"] == correct / 2
    assert all(h["response"] == SCRIPT[h["messages"][-1]["content"]][0].strip() for h in hold)
    assert is_complete(run / DATA_DIR) and is_complete(run / TEACHER_DIR)
    assert ("data: teacher answers", 10, 10) in calls
    again = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert again["skipped"] is True and again["kept"] == report["kept"]


def test_teacher_context_reaches_the_teacher_only(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.distill import data as data_mod

    ctx = [{"role": "user", "content": "Example alarm"}, {"role": "assistant", "content": "Category: x\nAction: y z"}]
    original = data_mod._load_inputs

    def with_ctx(*args, **kwargs):
        inputs = original(*args, **kwargs)
        inputs.context = ctx
        return inputs

    monkeypatch.setattr(data_mod, "_load_inputs", with_ctx)
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "run", seed=0)
    assert all(m[:2] == ctx for m in scripted_teacher)
    for r in read_jsonl(tmp_path / "run" / DATA_DIR / TRAIN_FILE):
        assert len(r["messages"]) == 1  # the stored prompt is the student's
    assert json.loads((tmp_path / "run" / DATA_DIR / TEACHER_CONTEXT).read_text())["messages"] == ctx


def test_hf_generator_is_greedy_transformers_generate(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.generate import DecodeParams, open_generator
    from edgepack.distill.teachers import materialize_teacher, resolve_teacher

    src = resolve_teacher(str(tiny_llama_dir))
    tdir = materialize_teacher(src, tmp_path / "teacher")
    msgs = [{"role": "user", "content": "Pump P-101 discharge pressure low"}]
    with open_generator(src, tdir, DecodeParams(max_new_tokens=6)) as generate:
        out = generate(msgs)
    assert out.tokens == 6 and out.finished is False  # random weights never say EOS this early
    tok = AutoTokenizer.from_pretrained(tdir)
    model = AutoModelForCausalLM.from_pretrained(tdir)
    ids = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True)])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_labelled_rows_with_a_babbling_teacher_are_all_dropped(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _write(tmp_path / "p.jsonl", [{"prompt": f"Alarm {i}", "label": "electrical"} for i in range(5)])
    run = tmp_path / "run"
    with pytest.raises(DataError, match="no usable answer"):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert not (run / DATA_DIR).exists()


def test_rerun_with_other_inputs_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from edgepack.atomic import atomic_dir, write_json
    from edgepack.errors import RunDirError

    data = _write(tmp_path / "p.jsonl", [GOOD])
    run = tmp_path / "run"
    with atomic_dir(run / DATA_DIR) as tmp:
        write_json(tmp / DATA_REPORT, {"identity": {"something": "else"}})
    with pytest.raises(RunDirError, match="another teacher or other inputs"):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)


def test_samples_per_prompt_drop_duplicates_and_the_holdout_is_checked(tmp_path: Path, tiny_llama_dir: Path,
                                                                        scripted_teacher) -> None:
    rows = [{"prompt": p, "label": LABELS[p]} for p in SCRIPT]
    data = _write(tmp_path / "p.jsonl", rows)
    one = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "one", seed=0)
    three = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "three", seed=0, samples=3)
    # The scripted teacher answers every sample alike: samples 1 and 2 repeat the kept answer.
    assert three["kept"] == one["kept"] and three["drop_reasons"]["duplicate"] == 2 * one["kept"]
    assert [d["temperature"] for d in three["decoding"]] == [0.0, 0.8, 0.8]
    assert len(scripted_teacher) == 10 + (3 * 8 + 2)  # holdout prompts are answered once (greedy)
    assert all(r["sample"] == 0 for r in read_jsonl(tmp_path / "three" / DATA_DIR / TRAIN_FILE))
    assert three["contamination"]["status"] == "clean" and three["contamination"]["holdout_rows"] == 2
    with pytest.raises(UsageError, match="--samples"):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "zero", seed=0, samples=0)
    assert not (tmp_path / "zero" / DATA_DIR).exists()


# -- user answer formats ------------------------------------------------------------------------

# Under --format-regex FREE_TEXT (no `label` group) each scripted answer is kept or dropped so:
FREE_TEXT = r"[A-Z].+\."
FREE_TEXT_EXPECTED = {
    "Motor M-1 tripped on overcurrent": None, "Pump P-2 bearing noisy": None, "Air header at 4 bar": "empty",
    "PLC-4 offline": "truncated", "Boiler too hot": "repetition",
    "Gauge PI-5 stuck": None,       # demo: format
    "Chiller warm": None,           # demo: label_mismatch (the regex states no label)
    "Switch port down": None, "Breaker CB-9 open": None,
    "Fan vibration high": None,     # demo: label_mismatch
}


def _train_prompts(run: Path) -> list[str]:
    hold = {r["messages"][-1]["content"] for r in read_jsonl(run / DATA_DIR / HOLDOUT_FILE)}
    return [p for p in SCRIPT if p not in hold]


def test_a_user_regex_replaces_the_demo_format_check(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher) -> None:
    from edgepack.task import RegexAnswer

    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    run = tmp_path / "run"
    report = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0,
                           answer_format=RegexAnswer(pattern=FREE_TEXT))
    train = _train_prompts(run)
    expected: dict[str, int] = {}
    for p in train:
        expected[FREE_TEXT_EXPECTED[p] or "kept"] = expected.get(FREE_TEXT_EXPECTED[p] or "kept", 0) + 1
    assert report["kept"] == expected.pop("kept")
    assert {k: v for k, v in report["drop_reasons"].items() if v} == expected
    assert report["format_check"] == {"kind": "regex", "pattern": FREE_TEXT, "label_from": None}
    assert report["identity"]["format_check"] == report["format_check"]
    assert report["teacher_holdout_accuracy"] is None and report["teacher_holdout_labelled"] == 0
    demo = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=tmp_path / "demo", seed=0)
    assert demo["format_check"]["kind"] == "demo" and "format_check" not in demo["identity"]
    assert demo["kept"] < report["kept"]


JSON_SCRIPT = {
    "Motor M-1 tripped on overcurrent": ('{"label": "electrical", "action": "Check the motor current."}', True),
    "Pump P-2 bearing noisy": ('{"label": "mechanical", "action": "Replace the bearing."}', True),
    "Air header at 4 bar": ('{"label": "hydraulic_pneumatic"}', True),                       # format
    "PLC-4 offline": ('{"label": "network", "action": "Check the link."', True),              # format (not JSON)
    "Boiler too hot": ('{"label": "electrical", "action": "Check the burner supply."}', True),  # label_mismatch
    "Gauge PI-5 stuck": ("Category: instrumentation\nAction: Calibrate the gauge.", True),    # format
    "Chiller warm": ('{"label": "thermal", "action": "Clean the condenser."}', True),
    "Switch port down": ('{"label": "network", "action": "Replace the patch cable."}', True),
    "Breaker CB-9 open": ('{"label": "water", "action": "Reset the breaker."}', True),        # format (label set)
    "Fan vibration high": ('{"label": "mechanical", "action": "Balance the fan."}', True),
}
JSON_EXPECTED = {"Air header at 4 bar": "format", "PLC-4 offline": "format", "Boiler too hot": "label_mismatch",
                 "Gauge PI-5 stuck": "format", "Breaker CB-9 open": "format"}
ANSWER_SCHEMA = {"type": "object", "required": ["label", "action"],
                 "properties": {"label": {"type": "string"}, "action": {"type": "string", "minLength": 8}}}


def test_a_json_schema_format_end_to_end(tmp_path: Path, tiny_llama_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.task import JsonAnswer

    script_teacher(monkeypatch, JSON_SCRIPT)
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in JSON_SCRIPT])
    run = tmp_path / "run"
    report = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0,
                           answer_format=JsonAnswer.from_file(schema))
    train = _train_prompts(run)
    expected: dict[str, int] = {}
    for p in train:
        expected[JSON_EXPECTED.get(p, "kept")] = expected.get(JSON_EXPECTED.get(p, "kept"), 0) + 1
    assert report["kept"] == expected.pop("kept")
    assert {k: v for k, v in report["drop_reasons"].items() if v} == expected
    assert report["format_check"]["kind"] == "json-schema" and len(report["format_check"]["sha256"]) == 64
    assert all(json.loads(r["response"])["label"] == r["label"] for r in read_jsonl(run / DATA_DIR / TRAIN_FILE))
    hold = read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    for h in hold:  # the holdout's teacher label is read through the user's format
        text = JSON_SCRIPT[h["messages"][-1]["content"]][0]
        try:
            stated = json.loads(text).get("label")
        except ValueError:
            stated = None
        assert h["teacher_category"] == stated
    assert report["teacher_holdout_labelled"] == len(hold) == 2


def test_a_rerun_with_another_format_is_refused(tmp_path: Path, tiny_llama_dir: Path, scripted_teacher) -> None:
    from edgepack.errors import RunDirError
    from edgepack.task import RegexAnswer

    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    run = tmp_path / "run"
    build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0,
                  answer_format=RegexAnswer(pattern=FREE_TEXT))
    for other in (RegexAnswer(pattern=FREE_TEXT + "$"), None):
        with pytest.raises(RunDirError, match="another teacher or other inputs"):
            build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0, answer_format=other)
    again = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0,
                          answer_format=RegexAnswer(pattern=FREE_TEXT))
    assert again["skipped"] is True


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--format-regex", "(unclosed", "--format-regex does not compile"),
    ("--format-schema", "{not json", "is not valid JSON"),
])
def test_cli_bad_format_exits_2_with_one_line(option: str, value: str, message: str, tmp_path: Path,
                                              tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    data = _write(tmp_path / "p.jsonl", [GOOD])
    if option == "--format-schema":
        (tmp_path / "s.json").write_text(value)
        value = str(tmp_path / "s.json")
    run = tmp_path / "run"
    rc = main(["distill", "data", "--teacher", str(tiny_llama_dir), "--data", str(data), "--out", str(run),
               option, value])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not run.exists()


# -- resumable generation: the answer cache -----------------------------------------------------

def _cache_files(run: Path) -> list[Path]:
    return sorted((run / TEACHER_CACHE_DIR).glob("*.json"))


def test_a_rerun_after_a_crash_regenerates_only_missing_answers(tmp_path: Path, tiny_llama_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    opened: list[int] = []
    seen = script_teacher(monkeypatch, SCRIPT, opened)
    data = _write(tmp_path / "p.jsonl", [{"prompt": p, "label": LABELS[p]} for p in SCRIPT])
    run = tmp_path / "run"
    first = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert len(seen) == 10 and first["teacher_cache"] == {"hits": 0, "misses": 10}
    train, hold = read_jsonl(run / DATA_DIR / TRAIN_FILE), read_jsonl(run / DATA_DIR / HOLDOUT_FILE)
    files = _cache_files(run)
    assert len(files) == 10
    # A crash before data/ was written, and three answers that never reached the cache.
    shutil.rmtree(run / DATA_DIR)
    lost = {json.loads(f.read_text())["request"]["messages"][-1]["content"] for f in files[:3]}
    for f in files[:3]:
        f.unlink()
    seen.clear()
    again = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert {m[-1]["content"] for m in seen} == lost and len(seen) == 3
    assert again["teacher_cache"] == {"hits": 7, "misses": 3}
    assert read_jsonl(run / DATA_DIR / TRAIN_FILE) == train and read_jsonl(run / DATA_DIR / HOLDOUT_FILE) == hold
    same = ("kept", "drop_reasons", "identity")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    # Every answer cached: the teacher is not even opened.
    shutil.rmtree(run / DATA_DIR)
    seen.clear()
    opened.clear()
    third = build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert seen == [] and opened == [] and third["teacher_cache"] == {"hits": 10, "misses": 0}
    assert read_jsonl(run / DATA_DIR / TRAIN_FILE) == train


def test_real_teacher_killed_midway_resumes_with_identical_answers(tmp_path: Path, tiny_llama_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real HF generator, killed after 2 answers: the rerun generates only the other ones, and
    the cached answers equal those of an uninterrupted run."""
    from contextlib import contextmanager

    from edgepack.distill import generate as gen

    real = gen.GENERATORS["hf"]
    calls: list[str] = []
    kill_after: list[int | None] = [2]

    @contextmanager
    def counted(source, teacher_dir, params):
        with real(source, teacher_dir, params) as generate:
            def answer(messages):
                if kill_after[0] is not None and len(calls) >= kill_after[0]:
                    raise KeyboardInterrupt  # the user's Ctrl-C, or a kill, mid-generation
                calls.append(messages[-1]["content"])
                return generate(messages)
            yield answer

    monkeypatch.setitem(gen.GENERATORS, "hf", counted)
    prompts = ["Motor M-1 tripped", "Pump P-2 noisy", "PLC-4 offline", "Boiler too hot", "Fan vibration high"]
    data = _write(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])  # split: 4 train, 1 holdout
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert len(_cache_files(run)) == 2 and not (run / DATA_DIR).exists()
    done_before = set(calls)
    calls.clear()
    kill_after[0] = None
    # The random tiny teacher never says EOS, so every answer is dropped as truncated and no
    # data/ is written; what is checked is which answers were generated and what was cached.
    with pytest.raises(DataError, match="no usable answer"):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=run, seed=0)
    assert len(calls) == 3 and not set(calls) & done_before and set(calls) | done_before == set(prompts)
    clean = tmp_path / "clean"
    with pytest.raises(DataError):
        build_dataset(teacher=str(tiny_llama_dir), data=data, run_dir=clean, seed=0)

    def cached(folder: Path) -> dict[str, dict]:
        return {f.name: json.loads(f.read_text())["generation"] for f in _cache_files(folder)}

    resumed, fresh = cached(run), cached(clean)
    assert len(resumed) == 5 and resumed == fresh
    assert all(g["tokens"] == 64 and not g["finished"] and g["text"] for g in resumed.values())
