"""The pipeline end to end on a tiny model (GGUF and ONNX exported, gated as `gate --search`),
its resume behaviour, and reproducing a run from its run.toml (`--config`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import COMPLETE_MARKER
from edgepack.profiles import PROFILE_DIR, load_profile

LABELS = ["electrical", "mechanical", "thermal", "network"]
CHOICES = ["gguf:Q8_0", "gguf:Q4_0", "onnx:int4"]
REPORT_KEYS = ["run_dir", "profile", "command", "machine", "started", "finished", "load_average", "seconds", "stages",
               "gates", "verdict", "chosen", "packaged", "bundle", "sample", "eval", "summary", "search", "warnings"]


def _rows(n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        rows.append({"prompt": f"Alarm {i}: unit {i} reports a {label} fault on line {i % 3}.",
                     "label": label, "reference": f"Category: {label}\nAction: Inspect unit {i} now."})
    return rows


def _prompts(path: Path, n: int) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in _rows(n)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama taught the 12 prompts' answers, so its data survives the filters."""
    from tests.tiny import build_tiny_llama, teach_tiny

    folder = build_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama", layers=4)
    return teach_tiny(folder, [(r["prompt"], r["reference"]) for r in _rows(12)])


def _lenient_profile(folder: Path) -> str:
    """cpu-x86-2c with a zero quality floor (a random-init model cannot classify anything),
    two GGUF choices and the ONNX one."""
    text = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
    text = text.replace('name = "cpu-x86-2c"', 'name = "tiny-cpu"')
    text = text.replace("min_relative_quality = 0.8", "min_relative_quality = 0.0")
    text = text.replace('choices = ["gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K_M", "gguf:Q4_K_M", "gguf:Q4_0", "onnx:int4"]',
                        "choices = " + json.dumps(CHOICES))
    path = folder / "tiny-cpu.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One pipeline run on the tiny teacher (module-scoped: the tests below read it, copy it or resume it)."""
    from edgepack.pipeline import PipelineConfig, run_pipeline

    folder = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(profile=load_profile(_lenient_profile(folder)), teacher=str(tiny_teacher),
                         data=_prompts(folder / "p.jsonl", 12), run_dir=folder / "run", steps=2, limit=None, seed=0)
    return {"cfg": cfg, "result": run_pipeline(cfg), "folder": folder}


def test_pipeline_end_to_end_on_tiny_model(finished_run: dict[str, Any]) -> None:
    from edgepack.runtime.bundle.archive import verify_bundle
    from edgepack.export.gate.gate import NO_HOLDOUT_REASON
    from edgepack.export.gate.search import QUALITY_AFTER_PASS

    result, run = finished_run["result"], finished_run["cfg"].run_dir
    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["distill data", "distill train", "eval", "export", "gate", "pack", "run"]
    assert result["verdict"] == "PASS", result["gates"]
    assert set(result["eval"]) >= {"teacher", "undistilled", "distilled", "gap_closed", "contamination"}
    assert result["eval"]["distilled"]["teacher_label_agreement"] is not None
    assert json.loads((run / "eval.json").read_text())["distilled"]["label_accuracy"] == \
        result["eval"]["distilled"]["label_accuracy"]
    # Every choice the profile allows was exported (GGUF and ONNX) and is a row of the table, in its order.
    exported = json.loads((run / "artifacts" / "export.json").read_text())["artifacts"]
    assert {(a["format"], a["quant"]) for a in exported} >= {("gguf", "Q8_0"), ("gguf", "Q4_0"), ("onnx", "int4")}
    rows = result["summary"]
    assert [r["choice"] for r in rows] == CHOICES
    assert [r["format"] for r in rows] == ["gguf", "gguf", "onnx"]
    for row in rows:
        assert row["size_mb"] > 0 and row["ttft_p95_ms"] > 0 and row["decode_tokens_per_s"] > 0, row
        assert row["peak_memory_mb"] > 0 and Path(row["report"]).is_file()
    # The first choice passes with the holdout answered; by default (until-pass) the later ones are
    # gated on latency and memory only, and say so.
    assert rows[0]["verdict"] == "PASS" and rows[0]["relative_quality"] is not None
    assert result["chosen"] == "gguf:Q8_0" and result["packaged"] == "gguf:Q8_0"
    for row in rows[1:]:
        assert row["relative_quality"] is None and QUALITY_AFTER_PASS in row["reasons"], row
        assert NO_HOLDOUT_REASON not in row["reasons"], row  # a holdout was given; the search skipped it
    assert result["search"]["search_quality"] == "until-pass"
    bundle = Path(result["bundle"])
    assert bundle.is_file() and bundle.name.endswith("-tiny-cpu-gguf-Q8_0.edgepack")
    manifest = verify_bundle(bundle)
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    for stage_dir in ("teacher", "data", "student"):
        assert (run / stage_dir / COMPLETE_MARKER).is_file()
    written = json.loads((run / "pipeline.json").read_text())
    assert written["bundle"] and written["summary"] == rows and written["machine"]["cpu_count"] >= 1
    assert list(written) == REPORT_KEYS  # pipeline.json's shape is the stages' typed results, assembled once
    assert all(list(s) == ["stage", "seconds", "summary"] and isinstance(s["summary"], str) for s in written["stages"])
    assert list(written["eval"]) == ["teacher", "undistilled", "distilled", "gap_closed", "contamination"]
    assert list(written["search"]) == ["pareto", "pareto_axes", "notes", "search_quality", "best_on_this_host",
                                       "holdout"]
    assert list(written["sample"]) == ["prompt", "completion"]
    assert written["command"].startswith("edgepack pipeline --profile ") and "--steps 2" in written["command"]
    assert isinstance(result["sample"]["completion"], str)


def test_rerun_resumes_without_recomputing(finished_run: dict[str, Any]) -> None:
    from edgepack.pipeline import run_pipeline

    run = finished_run["cfg"].run_dir
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    again = run_pipeline(finished_run["cfg"])
    assert again["bundle"] == finished_run["result"]["bundle"]
    assert all(r["reused"] for r in again["summary"])
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


def test_stage_calls_return_frozen_results(finished_run: dict[str, Any]) -> None:
    """Each stage call returns its own typed result (the rerun reuses every output on disk), and
    the next stage takes it as an argument: no stage fills a dict another one reads."""
    import dataclasses

    from edgepack.pipeline import EvalResult, GateResult, PackResult, evaluate, gate_search, pack_bundle

    cfg, result = finished_run["cfg"], finished_run["result"]
    evaluation = evaluate(cfg)
    assert isinstance(evaluation, EvalResult) and evaluation.as_report() == result["eval"]
    gate = gate_search(cfg)
    assert isinstance(gate, GateResult) and gate.chosen == result["chosen"] and gate.verdict == result["verdict"]
    assert [r["choice"] for r in gate.rows] == CHOICES and all(r["reused"] for r in gate.rows)
    packed = pack_bundle(cfg, gate)
    assert packed == PackResult(f"{Path(result['bundle']).name} (already packaged)", result["packaged"],
                                result["bundle"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        packed.bundle = "elsewhere"  # type: ignore[misc]
    stage_lines = {s["stage"]: s["summary"] for s in result["stages"]}
    assert evaluation.summary == stage_lines["eval"] and gate.summary == stage_lines["gate"]


@pytest.mark.parametrize("allow_unverified", [False, True])
def test_pack_takes_the_gate_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow_unverified: bool) -> None:
    """Nothing passed: nothing is packaged, unless an UNVERIFIED choice may be (then the best one is)."""
    import edgepack.export.pack.pack as pack_module
    from edgepack.pipeline import GateResult, PackResult, PipelineConfig, pack_bundle

    rows = [{"choice": "gguf:Q8_0", "verdict": "FAIL", "path": str(tmp_path / "a-Q8_0.gguf")},
            {"choice": "gguf:Q4_0", "verdict": "UNVERIFIED", "path": str(tmp_path / "a-Q4_0.gguf")},
            {"choice": "onnx:int4", "verdict": "UNVERIFIED", "path": str(tmp_path / "a-onnx-int4")}]
    gate = GateResult("", {"rows": rows, "chosen": None, "verdict": "FAIL"})
    cfg = PipelineConfig(profile=load_profile("cpu-x86-2c"), teacher="builtin:smollm2-135m-instruct", data=None,
                         run_dir=tmp_path / "run", allow_unverified=allow_unverified)
    packed: list[dict[str, Any]] = []

    def fake_pack_run(**kwargs: Any) -> dict[str, Any]:
        packed.append(kwargs)
        return {"bundle": str(tmp_path / "run" / "bundles" / "a.edgepack")}

    monkeypatch.setattr(pack_module, "pack_run", fake_pack_run)
    result = pack_bundle(cfg, gate)
    if not allow_unverified:
        assert result == PackResult("nothing packaged: no artifact passed the gate") and packed == []
        return
    assert result == PackResult("a.edgepack", "gguf:Q4_0", str(tmp_path / "run" / "bundles" / "a.edgepack"))
    assert [(k["artifact"], k["allow_unverified"]) for k in packed] == [(tmp_path / "a-Q4_0.gguf", True)]


def test_config_reproduces_the_settings_in_a_new_folder(finished_run: dict[str, Any], tmp_path: Path) -> None:
    """`edgepack pipeline --config RUN/run.toml --out NEW` writes the same settings to NEW/run.toml.

    NEW starts as a copy of RUN's stage outputs without its run.toml, so every stage is
    resumed (seconds, not a second training): the stages accept those outputs under the
    reproduced settings, and the command exits 0 with the same bundle choice.
    """
    from edgepack.cli import main
    from edgepack.runconfig import read_run_config

    run = finished_run["cfg"].run_dir
    new = tmp_path / "again"
    shutil.copytree(run, new, ignore=shutil.ignore_patterns("run.toml", "pipeline.json", "bundles"))
    assert main(["pipeline", "--config", str(run / "run.toml"), "--out", str(new), "--json"]) == 0
    first, second = read_run_config(run), read_run_config(new)
    volatile = {"created", "edgepack_version"}
    assert {k: v for k, v in second.items() if k not in volatile} == \
        {k: v for k, v in first.items() if k not in volatile}
    assert set(first) - volatile >= {"profile", "teacher", "data", "seed", "steps", "correct_teacher", "search_quality"}
    done = json.loads((new / "pipeline.json").read_text())
    assert done["packaged"] == "gguf:Q8_0" and done["stages"][0]["stage"] == "distill data"


def test_config_with_a_flag_overrides_that_key(finished_run: dict[str, Any], tmp_path: Path) -> None:
    from edgepack.pipeline import resolve_config

    run = finished_run["cfg"].run_dir
    cfg = resolve_config(config=run / "run.toml", run_dir=tmp_path / "b", overrides={"steps": 5, "seed": None})
    assert cfg.steps == 5 and cfg.seed == finished_run["cfg"].seed
    assert {k: v for k, v in cfg.settings().items() if k != "steps"} == \
        {k: v for k, v in finished_run["cfg"].settings().items() if k != "steps"}
    resumed = resolve_config(config=run / "run.toml", run_dir=None, overrides={})
    assert resumed.run_dir == run and resumed.settings() == finished_run["cfg"].settings()


def test_search_quality_all_answers_the_holdout_for_every_choice(finished_run: dict[str, Any], tmp_path: Path) -> None:
    from edgepack.export.gate.search import search

    original = finished_run["cfg"].run_dir
    run = tmp_path / "run"
    shutil.copytree(original, run)
    result = search(profile=finished_run["cfg"].profile, run_dir=run, holdout=original / "data" / "holdout.jsonl",
                    quality="all")
    assert [r["quality_measured"] for r in result["rows"]] == [True, True, True]
    assert [r["reused"] for r in result["rows"]] == [True, False, False]  # Q8_0's report already had quality
    assert result["pareto_axes"][-1] == "quality (higher)"


def test_until_pass_skips_the_holdout_where_latency_already_failed(finished_run: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """A choice that misses a latency budget FAILs whatever its quality: the holdout is not run for it."""
    from edgepack.export.gate.gate import NO_HOLDOUT_REASON
    from edgepack.export.gate.search import QUALITY_AFTER_MISS, search

    original = finished_run["cfg"].run_dir
    run = tmp_path / "run"
    shutil.copytree(original, run, ignore=shutil.ignore_patterns("gate"))
    text = Path(finished_run["cfg"].profile.source).read_text().replace("ttft_p95_ms = 1500", "ttft_p95_ms = 0.001")
    (tmp_path / "slow.toml").write_text(text)
    result = search(profile=load_profile(str(tmp_path / "slow.toml")), run_dir=run, quality="until-pass")
    assert [r["verdict"] for r in result["rows"]] == ["FAIL", "FAIL", "FAIL"]
    for row in result["rows"]:
        assert not row["quality_measured"] and QUALITY_AFTER_MISS in row["reasons"], row
        assert NO_HOLDOUT_REASON not in row["reasons"], row
        assert any(reason.startswith("ttft_p95_ms") for reason in row["reasons"])


@pytest.mark.parametrize("toml,needle", [
    ('profile = "cpu-x86-2c"\nstepz = 3\n', "unknown key 'stepz'"),
    ('profile = "cpu-x86-2c"\nsteps = "ten"\n', "steps = 'ten': must be an integer"),
    ('profile = "cpu-x86-2c"\ncorrect_teacher = "yes"\n', "correct_teacher"),
    ('profile = "cpu-x86-2c"\nsearch_quality = "some"\n', "search_quality"),
    ('teacher = "builtin:smollm2-135m-instruct"\n', "missing key 'profile'"),
    ('profile = "cpu-x86-2c"\n[extra]\nx = 1\n', "unknown key 'extra'"),
    ('profile = "cpu-x86-2c\n', "not valid TOML"),
])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str,
                                       needle: str) -> None:
    from edgepack.cli import main

    config = tmp_path / "run.toml"
    config.write_text(toml)
    out = tmp_path / "out"
    assert main(["pipeline", "--config", str(config), "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and needle in lines[0], lines
    assert len(lines) <= 2 and not out.exists()


def test_no_profile_and_no_out_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    assert main(["pipeline", "--out", str(tmp_path / "x")]) == 2
    assert "no profile given" in capsys.readouterr().err
    assert main(["pipeline", "--profile", "cpu-x86-2c"]) == 2
    assert "no run directory given" in capsys.readouterr().err


def test_pipeline_refuses_changed_settings(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.errors import RunDirError
    from edgepack.runconfig import write_run_config

    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, {"profile": "cpu-x86-2c", "teacher": "x", "seed": 1})
    from edgepack.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(profile=load_profile("cpu-x86-2c"), teacher=str(tiny_llama_dir),
                         data=_prompts(tmp_path / "p.jsonl", 4), run_dir=run, seed=2)
    with pytest.raises(RunDirError):
        run_pipeline(cfg)


def test_a_bundle_that_does_not_hold_the_gated_artifact_is_packed_again(finished_run: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """A rerun reused any file in bundles/ with the expected name, unverified (#20, run-dir trust):
    a stale or forged one was reported as the packaged bundle."""
    import dataclasses
    import shutil

    from edgepack.hashing import sha256_file
    from edgepack.pipeline import run_pipeline
    from edgepack.runtime.bundle.archive import inspect_bundle

    run = tmp_path / "run"
    shutil.copytree(finished_run["cfg"].run_dir, run, symlinks=True)
    bundle = run / Path(finished_run["result"]["bundle"]).relative_to(finished_run["cfg"].run_dir)
    good = bundle.read_bytes()
    bundle.write_bytes(good[: len(good) // 2])  # stale, truncated, or someone else's file
    again = run_pipeline(dataclasses.replace(finished_run["cfg"], run_dir=run))
    assert Path(again["bundle"]) == bundle
    manifest = inspect_bundle(bundle).manifest  # verifies, and holds the gated artifact's bytes
    entry = next(f for f in manifest["files"] if f["path"] == manifest["entrypoint"])
    assert entry["sha256"] == sha256_file(run / "artifacts" / manifest["entrypoint"])


def test_a_bundle_packed_under_another_task_is_packed_again(finished_run: dict[str, Any], tmp_path: Path) -> None:
    """A resumed pipeline reused a bundle that verified and held the artifact even when the run's
    task.json had changed since (the bundle carried the old task, or none)."""
    import dataclasses
    import shutil

    from edgepack.pipeline import gate_search, pack_bundle
    from edgepack.runtime.bundle.archive import inspect_bundle

    run = tmp_path / "run"
    shutil.copytree(finished_run["cfg"].run_dir, run, symlinks=True)
    cfg = dataclasses.replace(finished_run["cfg"], run_dir=run)
    gate = gate_search(cfg)  # the copy's holdout path differs, so its choice is gated (and packed) again
    pack_bundle(cfg, gate)
    assert pack_bundle(cfg, gate).summary.endswith("(already packaged)")
    task = json.loads((run / "task.json").read_text())
    task["system_prompt"] = "Answer tersely."
    (run / "task.json").write_text(json.dumps(task))
    packed = pack_bundle(cfg, gate)
    assert not packed.summary.endswith("(already packaged)")
    assert inspect_bundle(Path(packed.bundle)).manifest["task"]["system_prompt"] == "Answer tersely."


# -- distill data's task flags, passed through (issue #15) -----------------------------------------

def _scripted_teacher(monkeypatch: pytest.MonkeyPatch, answer: Any) -> list[list[dict[str, str]]]:
    """The HF teacher replaced by ``answer(prompt) -> text`` (the real one runs in the end-to-end tests)."""
    from contextlib import contextmanager

    from edgepack.distill import generate as gen

    asked: list[list[dict[str, str]]] = []

    @contextmanager
    def scripted(source: Any, teacher_dir: Path, params: Any) -> Any:
        def generate(messages: list[dict[str, str]]) -> Any:
            asked.append(messages)
            text = answer(messages[-1]["content"])
            return gen.Generation(text=text, tokens=len(text.split()), finished=True)
        yield generate

    monkeypatch.setitem(gen.GENERATORS, "hf", scripted)
    return asked


def _flag_config(folder: Path, teacher: Path, **flags: Any) -> Any:
    from edgepack.pipeline import PipelineConfig

    rows: list[Any] = [json.dumps({"prompt": r["prompt"], "label": r["label"]}) for r in _rows(10)]
    rows[2:2] = ["{broken"]
    rows[6:6] = ['["not an object"]']
    data = folder / "p.jsonl"
    data.write_text("\n".join(rows) + "\n")
    (folder / "system.txt").write_text("Answer as `label: action`.\n")
    (folder / "h.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(14)[10:]) + "\n")
    return PipelineConfig(profile=load_profile("cpu-x86-2c"), teacher=str(teacher), data=data, run_dir=folder / "run",
                          system_prompt=folder / "system.txt", holdout=folder / "h.jsonl", **flags)


def test_the_task_flags_reach_distill_data(tiny_llama_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--format-regex, --system-prompt and --holdout reach the data stage (task.json, the rows);
    without --strict the bad lines are skipped and named in the stage line and the warnings."""
    from edgepack.pipeline import distill_data
    from edgepack.task import TASK_FILE, load_task

    label_of = {r["prompt"]: r["label"] for r in _rows(14)}
    asked = _scripted_teacher(monkeypatch, lambda prompt: f"{label_of[prompt]}: inspect it now")
    cfg = _flag_config(tmp_path, tiny_llama_dir, format_regex=r"(?P<label>\w+): .+")
    result = distill_data(cfg)
    task = load_task(cfg.run_dir / TASK_FILE)
    assert task.kind == "regex" and task.answer.pattern == cfg.format_regex
    assert task.system_prompt == "Answer as `label: action`." and task.primary_metric == "label_accuracy"
    assert all(m[0]["content"] == task.system_prompt for m in asked)
    holdout = [json.loads(line) for line in (cfg.run_dir / "data" / "holdout.jsonl").read_text().splitlines()]
    assert [h["messages"][-1]["content"] for h in holdout] == [r["prompt"] for r in _rows(14)[10:]]
    assert result.report["train_prompts"] == 10 and result.report["bad_rows"] == 2
    assert result.summary.endswith(", 2 bad data lines skipped (lines 3, 7)"), result.summary
    assert any(w.startswith("2 bad data lines skipped (lines 3, 7;") for w in result.warnings)


def test_a_json_schema_reaches_distill_data(tiny_llama_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.pipeline import distill_data
    from edgepack.task import TASK_FILE, load_task

    label_of = {r["prompt"]: r["label"] for r in _rows(14)}
    _scripted_teacher(monkeypatch, lambda prompt: json.dumps({"label": label_of[prompt], "action": "Inspect it."}))
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "required": ["label", "action"], "additionalProperties": False,
                                  "properties": {"label": {"type": "string"}, "action": {"type": "string"}}}))
    cfg = _flag_config(tmp_path, tiny_llama_dir, format_schema=schema)
    distill_data(cfg)
    task = load_task(cfg.run_dir / TASK_FILE)
    assert task.kind == "json" and task.answer.fields == ("label", "action") and task.answer.file == "answer.json"


def test_strict_stops_at_the_first_bad_line_before_anything_is_written(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.errors import DataError
    from edgepack.pipeline import run_pipeline

    cfg = _flag_config(tmp_path, tiny_llama_dir, strict=True)
    with pytest.raises(DataError, match=r"p\.jsonl:3: not valid JSON"):
        run_pipeline(cfg)
    assert not cfg.run_dir.exists()


def test_the_task_flags_go_to_run_toml_and_the_command_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.pipeline import command_line, config_from_settings
    from edgepack.runconfig import load_pipeline_config, write_run_config

    cfg = _flag_config(tmp_path, tiny_llama_dir, format_regex=r"(?P<label>\w+): .+", strict=True)
    write_run_config(tmp_path, cfg.settings())
    back = config_from_settings(load_pipeline_config(tmp_path / "run.toml"), cfg.run_dir)
    assert back == cfg
    words = command_line(cfg.settings(), cfg.run_dir)
    for flag in (f"--format-regex '{cfg.format_regex}'", f"--system-prompt {cfg.system_prompt}",
                 f"--holdout {cfg.holdout}", "--strict"):
        assert flag in words, words
    assert "--format-schema" not in words


@pytest.mark.parametrize("flags,needle", [
    (["--format-regex", "(unclosed"], "--format-regex does not compile"),
    (["--format-schema", "{missing}"], "--format-schema file not found"),
    (["--format-regex", "x", "--format-schema", "{schema}"], "give --format-regex or --format-schema, not both"),
    (["--system-prompt", "{empty}"], "is empty"),
    (["--holdout", "{missing}"], "holdout file not found"),
    (["--data", "builtin:nope"], "unknown shipped domain 'builtin:nope'"),
    (["--data", "builtin:workorders", "--holdout", "{holdout}"], "builtin:workorders has its own holdout"),
])
def test_bad_task_flags_are_one_line_exit_2_and_write_nothing(tmp_path: Path, tiny_llama_dir: Path,
                                                              capsys: pytest.CaptureFixture[str], flags: list[str],
                                                              needle: str) -> None:
    from edgepack.cli import main

    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    (tmp_path / "holdout.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    files = {"missing": tmp_path / "absent.json", "empty": tmp_path / "empty.txt",
             "schema": tmp_path / "schema.json", "holdout": tmp_path / "holdout.jsonl"}
    flags = [f.format(**files) for f in flags]
    if "--data" not in flags:
        flags += ["--data", str(_prompts(tmp_path / "p.jsonl", 4))]
    out = tmp_path / "out"
    assert main(["pipeline", "--profile", "cpu-x86-2c", "--teacher", str(tiny_llama_dir), "--out", str(out),
                 *flags]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and needle in lines[0], lines
    assert not out.exists()


def test_the_gate_table_names_a_json_tasks_metric_within_80_columns(capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.commands.pipeline import _print_result

    def row(choice: str, primary: float | None) -> dict[str, Any]:
        fmt, quant = choice.split(":")
        return {"choice": choice, "artifact": f"student-{quant}.gguf", "format": fmt, "quant": quant, "size_mb": 80.6,
                "ttft_p95_ms": 140.2, "decode_tokens_per_s": 131.4, "peak_memory_mb": 176.6, "accuracy": None,
                "primary_metric": "field_f1" if primary is not None else None, "primary": primary,
                "relative_quality": 0.921 if primary is not None else None, "verdict": "PASS", "reasons": []}

    _print_result({"run_dir": "runs/workorders", "profile": "cpu-x86-2c", "bundle": "b.edgepack", "verdict": "PASS",
                   "packaged": "gguf:Q8_0", "stages": [{"stage": "gate", "seconds": 1.0, "summary": "ok"}],
                   "summary": [row("gguf:Q8_0", 0.537), row("gguf:Q6_K", None)]})
    lines = capsys.readouterr().out.splitlines()
    assert any("score = field_f1" in ln for ln in lines)
    assert any("score" in ln.split() and "×teach" in ln.split() for ln in lines)
    assert any("0.537" in ln and "PASS*" in ln for ln in lines)
    assert max(len(ln.rstrip()) for ln in lines) <= 80
