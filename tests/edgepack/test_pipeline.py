"""The walking skeleton end to end on a tiny model, and its resume behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.constants import COMPLETE_MARKER
from edgepack.profiles import PROFILE_DIR, load_profile

LABELS = ["electrical", "mechanical", "thermal", "network"]


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


def _lenient_profile(tmp_path: Path) -> str:
    """cpu-x86-2c with a zero quality floor: a random-init model cannot classify anything."""
    text = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
    text = text.replace('name = "cpu-x86-2c"', 'name = "tiny-cpu"')
    text = text.replace("min_relative_quality = 0.8", "min_relative_quality = 0.0")
    text = text.replace('choices = ["gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K_M", "gguf:Q4_K_M", "gguf:Q4_0", "onnx:int4"]',
                        'choices = ["gguf:Q8_0", "gguf:Q4_0"]')
    path = tmp_path / "tiny-cpu.toml"
    path.write_text(text)
    return str(path)


def test_pipeline_end_to_end_on_tiny_model(tiny_teacher: Path, tmp_path: Path) -> None:
    from edgepack.pipeline import PipelineConfig, run_pipeline
    from edgepack.runtime.bundle import verify_bundle

    profile = load_profile(_lenient_profile(tmp_path))
    run = tmp_path / "run"
    cfg = PipelineConfig(profile=profile, teacher=str(tiny_teacher), data=_prompts(tmp_path / "p.jsonl", 12),
                         run_dir=run, steps=2, limit=None, seed=0)
    result = run_pipeline(cfg)
    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["distill data", "distill train", "eval", "export", "gate", "pack", "run"]
    assert result["verdict"] == "PASS", result["gates"]
    assert set(result["eval"]) >= {"teacher", "undistilled", "distilled", "gap_closed", "contamination"}
    assert result["eval"]["distilled"]["teacher_label_agreement"] is not None
    assert json.loads((run / "eval.json").read_text())["distilled"]["label_accuracy"] == \
        result["eval"]["distilled"]["label_accuracy"]
    row = result["summary"][0]
    assert row["verdict"] == "PASS" and row["quant"] == "Q8_0"
    assert row["size_mb"] > 0 and row["ttft_p95_ms"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["peak_memory_mb"] > 0
    bundle = Path(result["bundle"])
    assert bundle.is_file() and bundle.name.endswith(".edgepack")
    manifest = verify_bundle(bundle)
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    for stage_dir in ("teacher", "data", "student"):
        assert (run / stage_dir / COMPLETE_MARKER).is_file()
    assert (run / "run.toml").is_file() and json.loads((run / "pipeline.json").read_text())["bundle"]
    assert isinstance(result["sample"]["completion"], str)

    # A rerun resumes: every stage finds its output and nothing is recomputed.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    again = run_pipeline(cfg)
    assert again["bundle"] == result["bundle"]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


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
