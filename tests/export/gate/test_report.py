"""Gate and search reports: JSON unchanged, markdown with the spread, PNG latency plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgepack.profiles import load_profile
from edgepack.export.gate.gate import measurement_spread, run_gate
from edgepack.export.gate.report import gate_markdown, write_gate_reports, write_search_reports
from tests.runtime.helpers import write_profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gguf_report(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("report")
    profile = load_profile(str(write_profile(folder, "easy")))
    return run_gate(artifact=tiny_gguf, profile=profile, holdout=None, efficiency=False)


def test_gate_reports_are_written_beside_each_other(gguf_report: dict[str, Any], tmp_path: Path) -> None:
    assert isinstance(gguf_report, dict) and gguf_report["verdict"] == "PASS"
    paths = write_gate_reports(gguf_report, tmp_path / "gate")
    assert set(paths) == {"json", "md", "png"}
    assert paths["json"].name == f"{gguf_report['artifact_name']}.json"
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(gguf_report, default=str))
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC and paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert f"**{gguf_report['verdict']}**" in md and f"]({paths['png'].name})" in md
    ttft = gguf_report["measurements"]["ttft_ms"]
    assert "| TTFT (ms) |" in md and f"{ttft['stdev']:,.2f}" in md and f"{ttft['max']:,.2f}" in md
    assert "per-token decode time" in md and "load average" in md
    assert not list((tmp_path / "gate").glob("*.part-*"))


def test_custom_stem_for_a_report_path(gguf_report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_gate_reports(gguf_report, tmp_path, stem="my-report")
    assert [p.name for p in paths.values()] == ["my-report.json", "my-report.md", "my-report.png"]


def test_spread_is_reported(gguf_report: dict[str, Any]) -> None:
    spread = gguf_report["spread"]
    m = gguf_report["measurements"]
    for key in ("ttft_ms", "decode_tokens_per_s", "inter_token_ms"):
        assert spread[key]["stdev"] == m[key]["stdev"] and spread[key]["min"] <= spread[key]["max"]
        assert spread[key]["cv_percent"] == pytest.approx(100 * m[key]["stdev"] / m[key]["mean"])
    assert m["inter_token_ms"]["n"] == m["runs"] * (m["decode_tokens"] - 1)
    assert measurement_spread({"ok": False}) == {}


def test_failed_measurement_has_markdown_but_no_plot(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    profile = load_profile(str(write_profile(tmp_path, "easy")))
    report = run_gate(artifact=bad, profile=profile, holdout=None)
    assert report["verdict"] == "FAIL" and report["efficiency"] is None
    stale = tmp_path / "out" / "bad.gguf.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)  # a plot from an earlier run must not stay beside new numbers
    paths = write_gate_reports(report, tmp_path / "out")
    assert set(paths) == {"json", "md"} and not stale.exists()
    assert "Failed: " in paths["md"].read_text()


def test_markdown_names_an_off_scale_budget_and_efficiency() -> None:
    report = {"artifact_name": "m.gguf", "profile": "p", "verdict": "PASS", "checks": [], "reasons": [],
              "measurements": {"ok": True, "runs": 2, "prompt_tokens": 8, "decode_tokens": 3, "threads": 1,
                               "ttft_ms": {"p50": 1.0, "p95": 1.5, "mean": 1.25, "stdev": 0.35, "min": 1.0,
                                           "max": 1.5, "samples": [1.0, 1.5]}},
              "spread": {"ttft_ms": {"cv_percent": 28.0}},
              "efficiency": {"efficiency": 0.5, "achieved_gb_s": 5.0, "bandwidth_gb_s": 10.0,
                             "bytes_per_token": 2**20, "decode_tokens_per_s": 5000.0, "bound_tokens_per_s": 10000.0,
                             "position": 9.5, "basis": "test", "bandwidth_method": "test"}}
    md = gate_markdown(report)
    assert "| TTFT (ms) | 1.00 | 1.50 | 1.25 | 0.35 | 1.00 | 1.50 | 28.0% |" in md
    assert "**50.0%** of this machine's measured 10.00 GB/s" in md


def test_search_reports(tmp_path: Path) -> None:
    rows = [{"choice": "gguf:Q8_0", "artifact": "m-Q8_0.gguf", "size_mb": 100.0, "ttft_p95_ms": 300.0,
             "decode_tokens_per_s": 30.0, "peak_rss_mb": 200.0, "quality": 0.9, "score": 0.72,
             "metric": "field_f1", "efficiency": 0.4,
             "verdict": "FAIL", "status": "gated", "reasons": ["decode_tokens_per_s: 30.0 < 40"],
             "report": str(tmp_path / "gate" / "m-Q8_0.gguf.json"), "reused": False, "pareto": False},
            {"choice": "gguf:Q4_K_M", "artifact": "m-Q4_K_M.gguf", "size_mb": 60.0, "ttft_p95_ms": 250.0,
             "decode_tokens_per_s": 45.0, "peak_rss_mb": 150.0, "quality": None, "efficiency": 0.35,
             "verdict": "PASS", "status": "gated", "reasons": [], "report": None, "reused": True, "pareto": True},
            {"choice": "onnx:int4", "artifact": None, "size_mb": None, "ttft_p95_ms": None,
             "decode_tokens_per_s": None, "peak_rss_mb": None, "quality": None, "efficiency": None,
             "verdict": None, "status": "not exported", "reasons": [], "report": None, "reused": False,
             "pareto": False}]
    result = {"profile": "p", "verdict": "PASS", "chosen": "gguf:Q4_K_M", "rows": rows, "pareto": ["gguf:Q4_K_M"],
              "pareto_axes": ["size_mb (lower)", "decode_tokens_per_s (higher)"], "min_decode_tokens_per_s": 40,
              "host": {"reason": "host matches p"}, "notes": []}
    paths = write_search_reports(result, tmp_path)
    assert [p.name for p in paths.values()] == ["search-p.json", "search-p.md", "search-p.png"]
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    md = paths["md"].read_text()
    assert "**gguf:Q4_K_M** passes every budget" in md
    # the task's primary metric names its column (not "accuracy" for a json task), then × teacher
    assert "| peak RSS MB | field_f1 | × teacher | efficiency |" in md
    assert ("| gguf:Q8_0 | m-Q8_0.gguf | 100.0 | 300.0 | 30.0 | 200.0 | 0.720 | 0.900 | 40.0% | FAIL |  | "
            "m-Q8_0.gguf.json |") in md
    assert "| gguf:Q4_K_M | m-Q4_K_M.gguf | 60.0 | 250.0 | 45.0 | 150.0 | n/a | n/a |" in md
    assert "| onnx:int4 | - |" in md and "not exported" in md
    assert "- gguf:Q8_0: decode_tokens_per_s: 30.0 < 40" in md
