"""gate --search on a real run folder: tiny GGUF and ONNX artifacts from edgepack's exporters,
profiles with easy and impossible budgets, report reuse by sha256, and what pack reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import ARTIFACTS_DIR, EXPORT_REPORT, FAIL, GATE_DIR, PASS
from edgepack.profiles import Profile, load_profile
from edgepack.export.gate.search import NOT_EXPORTED, SKIPPED, pareto_front, search
from tests.runtime.helpers import write_profile

CHOICES = '["gguf:Q4_K_M", "gguf:Q8_0", "gguf:F16", "onnx:int4"]'


@pytest.fixture(scope="module")
def artifacts_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/artifacts with Q8_0 + F16 GGUFs and an int4 ONNX folder, recorded in export.json."""
    from edgepack.export.api import export_model

    run = tmp_path_factory.mktemp("search") / "run"
    export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q8_0"], out_dir=run / ARTIFACTS_DIR)
    export_model(source=tiny_llama_dir, fmt="onnx", quants=["int4"], out_dir=run / ARTIFACTS_DIR)
    return run


@pytest.fixture()
def run(artifacts_run: Path, tmp_path: Path, cache_dir: Path) -> Path:
    """A private copy of the run (searches write RUN/gate)."""
    dst = tmp_path / "run"
    shutil.copytree(artifacts_run, dst)
    return dst


def profile(folder: Path, name: str, **overrides: Any) -> Profile:
    return load_profile(str(write_profile(folder, name, **{"choices": CHOICES, **overrides})))


def test_first_passing_choice_wins_and_the_table_is_complete(run: Path, tmp_path: Path) -> None:
    result = search(profile=profile(tmp_path, "easy"), run_dir=run)
    rows = {r["choice"]: r for r in result["rows"]}
    assert [r["choice"] for r in result["rows"]] == json.loads(CHOICES)  # profile order, best quality first
    assert rows["gguf:Q4_K_M"]["status"] == NOT_EXPORTED and rows["gguf:Q4_K_M"]["verdict"] is None
    assert [rows[c]["verdict"] for c in ("gguf:Q8_0", "gguf:F16", "onnx:int4")] == [PASS, PASS, PASS]
    assert result["chosen"] == "gguf:Q8_0" and result["verdict"] == PASS
    assert Path(result["chosen_artifact"]).name.endswith("-Q8_0.gguf")
    for c in ("gguf:Q8_0", "gguf:F16", "onnx:int4"):
        r = rows[c]
        assert r["size_mb"] > 0 and r["ttft_p95_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["efficiency"] > 0 and Path(r["report"]).is_file() and not r["reused"]
        assert Path(r["report"]).with_suffix(".md").is_file() and Path(r["report"]).with_suffix(".png").is_file()
    assert result["pareto"] and set(result["pareto"]) <= set(rows)
    assert all(r["pareto"] == (r["choice"] in result["pareto"]) for r in result["rows"])
    assert result["pareto_axes"] == ["size_mb (lower)", "decode_tokens_per_s (higher)"]  # no holdout: no quality axis
    # `edgepack pack` reads RUN/gate/*.json (the .md/.png beside them are ignored) and agrees.
    from edgepack.export.pack.pack import choose_report, load_gate_reports

    picked = choose_report(load_gate_reports(run), profile(tmp_path, "easy"), None, allow_unverified=False)
    assert picked["artifact_name"] == Path(result["chosen_artifact"]).name


def test_falls_through_a_failing_first_choice(run: Path, tmp_path: Path) -> None:
    q8 = next((run / ARTIFACTS_DIR).glob("*-Q8_0.gguf"))
    q8.write_bytes(q8.read_bytes()[:4096])  # truncated: the measurement fails, so the gate FAILs
    result = search(profile=profile(tmp_path, "easy"), run_dir=run)
    rows = {r["choice"]: r for r in result["rows"]}
    assert rows["gguf:Q8_0"]["verdict"] == FAIL
    assert any("measurement failed" in reason for reason in rows["gguf:Q8_0"]["reasons"])
    assert result["chosen"] == "gguf:F16"
    assert any("changed since export" in n for n in result["notes"])
    assert "gguf:Q8_0" not in result["pareto"]  # nothing measured, so not on the front


def test_impossible_budgets_choose_nothing(run: Path, tmp_path: Path) -> None:
    hard = profile(tmp_path, "hard", ttft_p95_ms=0.001, min_decode_tokens_per_s=10_000_000, memory_budget_mb=1)
    result = search(profile=hard, run_dir=run)
    assert result["chosen"] is None and result["verdict"] == FAIL
    gated = [r for r in result["rows"] if r["status"] == "gated"]
    assert len(gated) == 3 and all(r["verdict"] == FAIL for r in gated)
    assert result["pareto"]  # the front is about the measurements, not the verdicts


def test_stop_at_first_skips_the_rest(run: Path, tmp_path: Path) -> None:
    onnx = next(p for p in (run / ARTIFACTS_DIR).iterdir() if p.is_dir())
    shutil.rmtree(onnx)  # recorded in export.json, gone from disk
    result = search(profile=profile(tmp_path, "easy"), run_dir=run, stop_at_first=True)
    statuses = [r["status"] for r in result["rows"]]
    assert statuses == [NOT_EXPORTED, "gated", SKIPPED, NOT_EXPORTED]
    assert any(f"{onnx.name} is recorded in export.json but missing" in n for n in result["notes"])
    assert sorted(p.name for p in (run / GATE_DIR).glob("*.json")) == [Path(result["rows"][1]["report"]).name]


def test_reports_are_reused_only_for_the_same_file_and_profile(run: Path, tmp_path: Path) -> None:
    easy = profile(tmp_path, "easy")
    first = search(profile=easy, run_dir=run)
    again = search(profile=easy, run_dir=run)
    assert [r["reused"] for r in again["rows"] if r["status"] == "gated"] == [True, True, True]
    assert [r["decode_tokens_per_s"] for r in again["rows"]] == [r["decode_tokens_per_s"] for r in first["rows"]]
    # A report judged under other rules (an older gate's policy) is not reused: the verdict could differ.
    q8 = Path(next(r["report"] for r in first["rows"] if r["choice"] == "gguf:Q8_0"))
    q8.write_text(json.dumps({**json.loads(q8.read_text()), "policy": "an older policy"}))
    rerun = {r["choice"]: r for r in search(profile=easy, run_dir=run)["rows"]}
    assert rerun["gguf:Q8_0"]["reused"] is False and rerun["gguf:F16"]["reused"] is True
    # Change the ONNX folder (one byte of its config): its digest changes, so it is gated again.
    onnx = next(p for p in (run / ARTIFACTS_DIR).iterdir() if p.is_dir())
    (onnx / "config.json").write_text((onnx / "config.json").read_text() + "\n")
    third = {r["choice"]: r for r in search(profile=easy, run_dir=run)["rows"]}
    assert third["onnx:int4"]["reused"] is False and third["gguf:Q8_0"]["reused"] is True
    # Another profile never overwrites this one's reports: it gets <artifact>.<profile>.json.
    other = search(profile=profile(tmp_path, "other"), run_dir=run)
    assert all(not r["reused"] for r in other["rows"] if r["status"] == "gated")
    names = sorted(p.name for p in (run / GATE_DIR).glob("*.json"))
    assert len(names) == 6 and sum(".other.json" in n for n in names) == 3


def test_a_holdout_given_now_needs_a_report_with_quality(run: Path, tmp_path: Path) -> None:
    from tests.runtime.helpers import HOLDOUT_ROWS

    from edgepack.task import save_task
    from tests.runtime.helpers import tiny_task

    save_task(tiny_task(), run / "task.json")  # the demo's prompt would not fit the tiny context
    easy = profile(tmp_path, "easy", choices='["gguf:Q8_0"]', min_relative_quality=0.0)
    search(profile=easy, run_dir=run)
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT_ROWS))
    result = search(profile=easy, run_dir=run, holdout=holdout)
    row = result["rows"][0]
    assert row["reused"] is False and row["quality"] is not None and result["holdout"] == str(holdout)
    assert row["metric"] == "accuracy" and row["score"] is not None  # the task's primary metric
    assert result["pareto_axes"][-1] == "quality (higher)"
    from edgepack.export.gate.report import search_markdown

    assert "| peak RSS MB | accuracy | × teacher |" in search_markdown(result)


def test_explicit_artifact_list_without_a_run(artifacts_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "arts"
    shutil.copytree(artifacts_run / ARTIFACTS_DIR, folder)
    (folder / EXPORT_REPORT).unlink()
    onnx = next(p for p in folder.iterdir() if p.is_dir())
    result = search(profile=profile(tmp_path, "easy", choices='["onnx:int4", "gguf:Q8_0"]'), artifacts=[onnx])
    assert result["chosen"] == "onnx:int4"  # quant read from the graph (MatMulNBits bits=4)
    assert [r["status"] for r in result["rows"]] == ["gated", NOT_EXPORTED]
    assert (folder / GATE_DIR / f"{onnx.name}.json").is_file()


def test_pareto_front_is_pure() -> None:
    # quality is the task's primary metric (score): it needs no teacher, unlike the relative quality
    rows = [{"choice": "a", "size_mb": 10.0, "decode_tokens_per_s": 50.0, "score": 0.9, "quality": None},
            {"choice": "b", "size_mb": 5.0, "decode_tokens_per_s": 80.0, "score": 0.8, "quality": None},
            {"choice": "c", "size_mb": 6.0, "decode_tokens_per_s": 70.0, "score": 0.8},   # dominated by b
            {"choice": "d", "size_mb": None, "decode_tokens_per_s": None, "score": None}]  # not measured
    front, axes = pareto_front(rows)
    assert front == ["a", "b"] and axes[-1] == "quality (higher)"
    rows[0]["score"] = None  # a missing quality drops the quality axis instead of inventing one
    front, axes = pareto_front(rows)
    assert front == ["b"] and len(axes) == 2
