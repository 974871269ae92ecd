"""Fidelity report on the tiny model: real llama.cpp / onnxruntime artifacts, and broken ones
that the report must catch (scrambled weights, a GGUF with a different vocabulary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.constants import ARTIFACTS_DIR, COMPLETE_MARKER, DATA_DIR, EXPORT_REPORT, FIDELITY_MARKDOWN, \
    FIDELITY_REPORT, HOLDOUT_FILE, RUN_TOML, STUDENT_DIR
from edgepack.errors import DataError, InvalidModelFile, UsageError
from edgepack.export.api import export_model
from edgepack.export.fidelity.report import TARGETS, count_parameters, fidelity_report
from edgepack.export.fidelity.metrics import LogitStats, first_divergence, fresh_starts, kld_rows, top2_margin
from edgepack.export.fidelity.prompts import BUILTIN_ROWS, as_rows, load_rows
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.gguf.quantize import quantize_gguf
from edgepack.export.onnx.convert import export_onnx

HOLDOUT = [
    {"id": "h1", "messages": [{"role": "user", "content": "Compressor C-12 tripped on high vibration."}],
     "response": "Category: mechanical\nAction: Inspect the drive-end bearing."},
    {"id": "h2", "messages": [{"role": "user", "content": "PLC rack 2 lost Profinet communication."}],
     "response": "Category: network\nAction: Check the switch port and cable to station 7."},
    {"id": "h3", "messages": [{"role": "user", "content": "Flow transmitter FT-204 drifts by 3.5%."}],
     "response": None},
]


def _scramble_tensor(path: Path, name: str, seed: int = 0) -> None:
    """Overwrite one F16 tensor of a GGUF with random values (header untouched)."""
    import gguf

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    offset, n_bytes = int(tensor.data_offset), int(tensor.n_bytes)
    noise = np.random.default_rng(seed).normal(0.0, 0.5, n_bytes // 2).astype(np.float16)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(noise.tobytes())


def _swap_vocab(hf_dir: Path, a: str, b: str) -> None:
    """Swap the ids of two tokens in tokenizer.json (merges still valid, ids differ)."""
    path = hf_dir / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tj), encoding="utf-8")


@pytest.fixture(scope="module")
def report(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fidelity")
    f16 = convert_hf_to_gguf(tiny_llama_dir, out / "tiny-F16.gguf", outtype="F16")
    q8 = quantize_gguf(f16, out / "tiny-Q8_0.gguf", "Q8_0", threads=1)
    q4 = quantize_gguf(f16, out / "tiny-Q4_0.gguf", "Q4_0", threads=1)
    onnx_dir = out / "tiny-onnx-int8"
    export_onnx(tiny_llama_dir, onnx_dir, quant="int8")
    scrambled = out / "tiny-scrambled-F16.gguf"
    shutil.copy(f16, scrambled)
    _scramble_tensor(scrambled, "token_embd.weight")  # tied: also the output head
    other_vocab = tmp_path_factory.mktemp("vocab") / "llama"
    shutil.copytree(tiny_llama_dir, other_vocab)
    _swap_vocab(other_vocab, "Pump", "ĠP")
    wrong_vocab = convert_hf_to_gguf(other_vocab, out / "tiny-wrongvocab-F16.gguf", outtype="F16")
    holdout = out / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT), encoding="utf-8")
    return fidelity_report(tiny_llama_dir, [f16, q8, q4, onnx_dir, scrambled, wrong_vocab], holdout, out / "report",
                           threads=1, command="pytest tests/export/fidelity/test_report.py")


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in report["artifacts"]}


def test_faithful_artifacts_measure_as_faithful(report: dict[str, Any]) -> None:
    arts = _by_name(report)
    f16, q8, q4, onnx = (arts[n] for n in ("tiny-F16.gguf", "tiny-Q8_0.gguf", "tiny-Q4_0.gguf", "tiny-onnx-int8"))
    assert [a["quant"] for a in (f16, q8, q4, onnx)] == ["F16", "Q8_0", "Q4_0", "int8"]
    assert f16["kld_reference"] == "transformers (float32)"
    assert f16["vs_transformers"]["max_abs_diff"] < 0.05 and f16["vs_transformers"]["top1_agreement"] >= 0.98
    assert f16["kld"] < 1e-4
    # the first unquantized GGUF in the list is the KLD base of the quantized ones
    assert q8["vs_reference_gguf"]["reference"] == "tiny-F16.gguf" and q8["kld"] == q8["vs_reference_gguf"]["kld_mean"]
    assert q8["kld"] < 0.002 < q4["kld"] < 0.1  # 8-bit far closer than 4-bit
    assert q4["vs_transformers"]["top1_agreement"] < q8["vs_transformers"]["top1_agreement"]
    assert onnx["kld_reference"] == "transformers (float32)" and onnx["kld"] < 0.002
    assert onnx["greedy"]["measured"] is True and onnx["greedy"]["prompts"] == len(HOLDOUT)  # KV-cache decode
    for a in (f16, q8, q4, onnx):
        assert a["tokenizer"]["ok"], a["tokenizer"]
        # every distinct context once; all positions (repeated prefixes included) kept beside
        assert a["vs_transformers"]["tokens"] == report["prompts"]["distinct_positions"]
        assert a["vs_transformers_all_positions"]["tokens"] == report["prompts"]["tokens"]
    assert f16["greedy"]["exact_match_rate"] == 1.0 and f16["greedy"]["prompts"] == len(HOLDOUT)
    assert [t["met"] for t in f16["targets"]] == [True] and q8["targets"][0]["metric"] == "kld"


def test_size_and_bits_per_weight_are_measured(report: dict[str, Any], tiny_llama_dir: Path) -> None:
    n_params = report["reference"]["parameters"]
    assert n_params == count_parameters(tiny_llama_dir) and 90_000 < n_params < 110_000
    for a in report["artifacts"]:
        assert a["bytes"] == sum(Path(a["path"], n).stat().st_size if Path(a["path"]).is_dir()
                                 else Path(a["path"]).stat().st_size for n in a["files"])
        assert a["bits_per_weight"] == pytest.approx(a["bytes"] * 8 / n_params)
    arts = _by_name(report)
    assert arts["tiny-F16.gguf"]["bits_per_weight"] > arts["tiny-Q8_0.gguf"]["bits_per_weight"] > \
        arts["tiny-Q4_0.gguf"]["bits_per_weight"]
    assert arts["tiny-onnx-int8"]["folder_bytes"] > arts["tiny-onnx-int8"]["bytes"]


def test_scrambled_weights_are_caught(report: dict[str, Any]) -> None:
    bad = _by_name(report)["tiny-scrambled-F16.gguf"]
    good = _by_name(report)["tiny-F16.gguf"]
    assert bad["quant"] == "F16" and bad["kld_reference"] == "transformers (float32)"  # not the KLD base
    assert bad["kld"] > 1.0 > 1000 * good["kld"]
    assert bad["vs_transformers"]["top1_agreement"] < 0.2
    assert bad["greedy"]["exact_match_rate"] == 0.0
    flips = bad["vs_transformers"]
    assert flips["top1_flips"] == round(flips["tokens"] * (1 - flips["top1_agreement"]))
    assert 0 < flips["top1_flip_reference_margin_median"] <= flips["top1_flip_reference_margin_max"]
    assert all(c["first_divergence"] is not None for c in bad["greedy"]["cases"])
    assert bad["tokenizer"]["ok"]  # same vocabulary: only the weights are wrong


def test_a_different_vocabulary_is_caught_with_the_first_mismatch(report: dict[str, Any], tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    bad = _by_name(report)["tiny-wrongvocab-F16.gguf"]
    assert bad["tokenizer"]["ok"] is False and bad["tokenizer"]["mismatches"] > 0
    first = bad["tokenizer"]["first_mismatch"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert first["string"].startswith("Pump") and first["index"] == 0
    assert first["reference_ids"][0] == tok.convert_tokens_to_ids("Pump")
    assert first["artifact_ids"][0] == tok.convert_tokens_to_ids("ĠP")
    # fed the same ids, the weights still agree: the report separates tokenizer from model
    assert bad["vs_transformers"]["top1_agreement"] >= 0.98


def test_report_files_and_markdown(report: dict[str, Any]) -> None:
    out = Path(report["artifacts"][0]["path"]).parent / "report"
    assert json.loads((out / FIDELITY_REPORT).read_text()) == json.loads(json.dumps(report))
    md = (out / FIDELITY_MARKDOWN).read_text()
    for a in report["artifacts"]:
        assert f"| {a['name']} | {a['format']} | {a['quant']} |" in md
    assert "**FAIL**" in md and "first mismatch in `Pump" in md
    assert "first divergence at new token" in md
    assert report["produced_by"]["command"] == "pytest tests/export/fidelity/test_report.py"
    assert "pytest tests/export/fidelity/test_report.py" in md
    assert report["prompts"]["source"].endswith("holdout.jsonl") and len(report["prompts"]["sha256"]) == 64
    assert report["prompts"]["sequences"] == len(HOLDOUT)


def test_export_model_writes_fidelity_for_a_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_TOML).write_text('schema = 1\nprofile = "pi5-8gb"\n')
    shutil.copytree(tiny_llama_dir, run / STUDENT_DIR)
    (run / STUDENT_DIR / COMPLETE_MARKER).write_text("ok\n")
    (run / DATA_DIR).mkdir()
    (run / DATA_DIR / HOLDOUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT), encoding="utf-8")
    report = export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None)
    out = run / ARTIFACTS_DIR
    fid = json.loads((out / FIDELITY_REPORT).read_text())
    assert (out / FIDELITY_MARKDOWN).is_file()
    assert fid["prompts"]["source"] == str(run / DATA_DIR / HOLDOUT_FILE)
    assert [a["name"] for a in fid["artifacts"]] == ["student-F16.gguf", "student-Q8_0.gguf"]
    summary = json.loads((out / EXPORT_REPORT).read_text())["fidelity"]
    assert summary == report["fidelity"] and summary["report"] == FIDELITY_REPORT
    assert [a["path"] for a in summary["artifacts"]] == ["student-F16.gguf", "student-Q8_0.gguf"]
    assert summary["artifacts"][1]["kld_reference"].startswith("student-F16.gguf")
    # without a holdout file the built-in prompts are used, and the report says so
    (run / DATA_DIR / HOLDOUT_FILE).unlink()
    export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None)
    fid = json.loads((out / FIDELITY_REPORT).read_text())
    assert fid["prompts"]["source"] == "builtin" and fid["prompts"]["sequences"] == len(BUILTIN_ROWS)
    assert any("built-in prompt set" in n for n in fid["notes"])


def test_bad_inputs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no artifacts"):
        fidelity_report(tiny_llama_dir, [], None)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InvalidModelFile, match="not a valid GGUF file"):  # the bounded header reader
        fidelity_report(tiny_llama_dir, [junk], None)
    with pytest.raises(UsageError, match="neither"):
        fidelity_report(tiny_llama_dir, [tmp_path], None)
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"id": "x", "label": "no text"}\n')
    with pytest.raises(DataError, match="messages"):
        load_rows(bad_rows)
    with pytest.raises(DataError, match="no prompts"):
        as_rows([])


def test_metrics() -> None:
    ref = np.array([[0.0, 0.0], [5.0, 1.0]])
    same = kld_rows(ref, ref)
    assert np.allclose(same, 0.0)
    q = np.log(np.array([[0.1, 0.9], [0.5, 0.5]]))
    expected0 = 0.5 * np.log(0.5 / 0.1) + 0.5 * np.log(0.5 / 0.9)
    assert kld_rows(ref, q)[0] == pytest.approx(expected0)
    assert kld_rows(ref + 3.0, ref)[1] == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    rng = np.random.default_rng(0)  # the chunked formula against the textbook one, over several chunks
    x, y = rng.normal(0, 3, (40, 300)), rng.normal(0, 3, (40, 300))
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    lq = y - np.log(np.exp(y).sum(-1, keepdims=True))
    np.testing.assert_allclose(kld_rows(x, y), (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-10)
    stats = LogitStats()
    stats.add(ref, q)
    s = stats.summary()
    assert s["tokens"] == 2 and s["top1_agreement"] == 0.5  # row 0: a tie (index 0) vs 0.9 at index 1
    assert s["top1_flips"] == 1 and s["top1_flip_reference_margin_max"] == 0.0  # the flip was a tie
    assert s["max_abs_diff"] == pytest.approx(abs(5.0 - np.log(0.5)))
    # a shared prefix is measured once: the second row repeats [5, 6], the third all of the first
    assert fresh_starts([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 8], [1, 2]]) == [0, 2, 4, 0]
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert top2_margin(np.array([1.0, 4.0, 3.5])) == pytest.approx(0.5)
    assert set(TARGETS) >= {("gguf", "F16"), ("gguf", "Q8_0"), ("gguf", "Q4_K_M")}
