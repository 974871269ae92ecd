"""export_model: run dirs and HF dirs → artifacts + export.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgepack.constants import FIDELITY_MARKDOWN, FIDELITY_REPORT, ARTIFACTS_DIR, COMPLETE_MARKER, EXPORT_REPORT, RUN_TOML, STUDENT_DIR
from edgepack.errors import ModelSourceError, RunDirError, UsageError
from edgepack.export.api import export_model
from tests.export.helpers import make_lora_adapter, no_leftovers


def _make_run(tiny_llama_dir: Path, root: Path, *, complete: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    (run / RUN_TOML).write_text('schema = 1\nprofile = "pi5-8gb"\n')
    shutil.copytree(tiny_llama_dir, run / STUDENT_DIR)
    if complete:
        (run / STUDENT_DIR / COMPLETE_MARKER).write_text("ok\n")
    return run


def test_run_export_writes_artifacts_and_report(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _make_run(tiny_llama_dir, tmp_path)
    calls: list[tuple[str, int, int | None]] = []
    report = export_model(source=run, fmt="gguf", quants=["Q8_0", "Q4_K_M"], out_dir=None,
                          progress=lambda t, d, n=None: calls.append((t, d, n)))
    out = run / ARTIFACTS_DIR
    assert json.loads((out / EXPORT_REPORT).read_text()) == report
    assert [a["path"] for a in report["artifacts"]] == ["student-F16.gguf", "student-Q8_0.gguf", "student-Q4_K_M.gguf"]
    for art in report["artifacts"]:
        data = (out / art["path"]).read_bytes()
        assert art["bytes"] == len(data) and art["sha256"] == hashlib.sha256(data).hexdigest()
        assert art["format"] == "gguf"
    assert report["artifacts"][1]["quant"] == "Q8_0" and report["artifacts"][1]["fallback_tensors"] == 0
    # the tiny model's rows are not multiples of 256: the K-quant fallback is reported, not hidden
    assert report["artifacts"][2]["fallback_tensors"] > 0
    assert any(n.startswith("Q4_K_M:") for n in report["notes"])
    assert report["model"] == "student" and report["source"] == str(run)
    assert ("export", 3, 3) in calls
    assert no_leftovers(out) == []


def test_incomplete_student_is_a_run_dir_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _make_run(tiny_llama_dir, tmp_path, complete=False)
    with pytest.raises(RunDirError, match="student"):
        export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None)
    assert not (run / ARTIFACTS_DIR).exists()


def test_hf_dir_export_is_named_after_the_dir_and_needs_out(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="output folder"):
        export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q8_0"], out_dir=None)
    report = export_model(source=tiny_llama_dir, fmt="gguf", quants=["q8_0"], out_dir=tmp_path / "out")
    assert [a["path"] for a in report["artifacts"]] == [f"{tiny_llama_dir.name}-F16.gguf", f"{tiny_llama_dir.name}-Q8_0.gguf"]


def test_bad_arguments_fail_before_any_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Q9_Z"):
        export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q8_0", "Q9_Z"], out_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="tflite"):
        export_model(source=tiny_llama_dir, fmt="tflite", quants=["Q8_0"], out_dir=tmp_path / "o")
    with pytest.raises(ModelSourceError):
        export_model(source=tmp_path / "nowhere", fmt="gguf", quants=["Q8_0"], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_onnx_export_records_a_folder_artifact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(UsageError, match="not an ONNX quantization"):
        export_model(source=tiny_llama_dir, fmt="onnx", quants=["Q4_K_M"], out_dir=out)
    export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q8_0"], out_dir=out)
    report = export_model(source=tiny_llama_dir, fmt="onnx", quants=[], out_dir=out)
    onnx = [a for a in report["artifacts"] if a["format"] == "onnx"]
    assert [(a["path"], a["quant"]) for a in onnx] == [(f"{tiny_llama_dir.name}-onnx-int4", "int4")]
    folder = out / onnx[0]["path"]
    for f in onnx[0]["files"]:
        data = (folder / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert onnx[0]["bytes"] == sum(f["bytes"] for f in onnx[0]["files"])
    assert onnx[0]["parity"]["fp32_vs_torch_max_abs_diff"] < 1e-4
    assert {a["quant"] for a in report["artifacts"]} == {"F16", "Q8_0", "int4"}  # the GGUF entries are kept
    assert no_leftovers(out) == []


def test_re_export_keeps_other_entries_and_cleans_stale_parts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q8_0"], out_dir=out)
    (out / "stale.gguf.part-999999999.edgepack-tmp").write_bytes(b"half a file")  # a dead pid's write
    report = export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q4_0"], out_dir=out)
    quants = [a["quant"] for a in report["artifacts"]]
    assert sorted(quants) == ["F16", "Q4_0", "Q8_0"]
    assert no_leftovers(out) == []


def test_float_only_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    report = export_model(source=tiny_llama_dir, fmt="gguf", quants=["F32"], out_dir=tmp_path / "out")
    assert [a["quant"] for a in report["artifacts"]] == ["F32"]


def test_lora_adapter_dir_is_merged_then_exported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_lora_adapter(tiny_llama_dir, tmp_path / "my-adapter", ["q_proj", "v_proj"])
    out = tmp_path / "out"
    report = export_model(source=adapter, fmt="gguf", quants=["Q8_0"], out_dir=out)
    assert [a["path"] for a in report["artifacts"]] == ["my-adapter-F16.gguf", "my-adapter-Q8_0.gguf"]
    assert any("LoRA adapter" in n for n in report["notes"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [EXPORT_REPORT, FIDELITY_MARKDOWN, FIDELITY_REPORT, "my-adapter-F16.gguf", "my-adapter-Q8_0.gguf"])
