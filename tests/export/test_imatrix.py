"""Importance matrix from chat data: llama-imatrix's sums, its GGUF layout, and a measurable
effect on llama.cpp's quantization (KLD on held-out text)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.constants import ARTIFACTS_DIR, COMPLETE_MARKER, DATA_DIR, EXPORT_REPORT, RUN_TOML, STUDENT_DIR, \
    TRAIN_FILE
from edgepack.errors import DataError, RunDirError, UsageError
from edgepack.export.api import export_model
from edgepack.export.fidelity.metrics import kld_rows
from edgepack.export.fidelity.prompts import BUILTIN_ROWS, encode_row, load_tokenizer
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.gguf.imatrix import (ImatrixStats, build_imatrix, collect_imatrix, is_imatrix_file,
                                          read_imatrix_meta, write_imatrix)
from edgepack.export.gguf.quantize import load_imatrix, quantize_gguf
from tests.export.helpers import llama_logits

TRAIN = [
    {"id": f"t{i}", "messages": [{"role": "user", "content": text}], "response": answer}
    for i, (text, answer) in enumerate([
        ("Pump P-101 discharge pressure low alarm, motor current normal.", "Category: mechanical\nAction: Check the strainer."),
        ("Hydraulic unit HPU-3 oil temperature high, 78 degrees C.", "Category: thermal\nAction: Clean the oil cooler."),
        ("PLC rack 2 lost Profinet communication with station 7.", "Category: network\nAction: Check the switch port."),
        ("Flow transmitter FT-204 drifts by 3.5% against the meter.", "Category: instrumentation\nAction: Recalibrate FT-204."),
        ("Compressor C-12 tripped on high vibration, 11.2 mm/s.", "Category: mechanical\nAction: Inspect the bearing."),
        ("Motor M-7 breaker trips on start-up.", "Category: electrical\nAction: Megger the motor windings."),
    ] * 3)
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("imatrix") / TRAIN_FILE, TRAIN)


@pytest.fixture(scope="module")
def outlier_model(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a few large RMSNorm gains per layer: the outlier input channels
    real LLMs have, which is where an importance matrix earns its keep."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("outlier") / "llama"
    shutil.copytree(tiny_llama_dir, out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name in weights:
        if name.endswith("layernorm.weight"):
            gain = torch.ones_like(weights[name])
            gain[torch.randperm(gain.numel(), generator=gen)[:6]] = 8.0
            weights[name] = gain
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_sums_match_an_independent_computation(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_llama_dir)
    seqs = [encode_row(tok, r, with_response=True) for r in BUILTIN_ROWS[:3]]
    stats = collect_imatrix(tiny_llama_dir, seqs)
    n_tokens = sum(map(len, seqs))
    assert stats.chunks == 3 and stats.tokens == n_tokens
    assert set(stats.counts.values()) == {n_tokens}
    expected = {f"blk.{b}.{t}.weight" for b in range(2)
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(stats.sum2) == expected  # tied head: token_embd is never collected, as in llama.cpp
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    sum2 = {0: torch.zeros(64, dtype=torch.float64), 1: torch.zeros(64, dtype=torch.float64)}
    with torch.no_grad():
        for ids in seqs:
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in (0, 1):  # hidden_states[l] is the input of layer l; its attention sees the norm of it
                x = model.model.layers[layer].input_layernorm(hidden[layer])[0].double()
                sum2[layer] += (x * x).sum(0)
    for layer in (0, 1):
        for t in ("attn_q", "attn_k", "attn_v"):
            np.testing.assert_allclose(stats.sum2[f"blk.{layer}.{t}.weight"], sum2[layer].numpy(), rtol=1e-5)
    assert stats.sum2["blk.0.ffn_down.weight"].shape == (128,)  # ffn_down's input is the 128-wide FFN


def test_shared_prefix_is_run_once_with_the_same_sums(tiny_llama_dir: Path) -> None:
    from edgepack.export.fidelity.prompts import EvalRow
    from edgepack.export.gguf.imatrix import common_prefix

    tok = load_tokenizer(tiny_llama_dir)
    system = ("system", "Triage alarms from plant equipment. Answer with a category and one action.")
    rows = [EvalRow(r["id"], (system, ("user", r["messages"][0]["content"])), r["response"]) for r in TRAIN[:6]]
    seqs = [encode_row(tok, r, with_response=True) for r in rows]
    assert common_prefix(seqs) > 16 and common_prefix([[1, 2], [1, 2]]) == 1 and common_prefix([[1], [2]]) == 0
    shared = collect_imatrix(tiny_llama_dir, seqs)
    full = collect_imatrix(tiny_llama_dir, seqs, share_prefix=False)
    assert shared.shared_prefix == common_prefix(seqs) and full.shared_prefix == 0
    assert shared.counts == full.counts and shared.tokens == full.tokens == sum(map(len, seqs))
    for name in full.sum2:
        np.testing.assert_allclose(shared.sum2[name], full.sum2[name], rtol=1e-4)
        np.testing.assert_allclose(shared.sum[name], full.sum[name], rtol=1e-3, atol=1e-3)


def test_file_is_llama_imatrix_gguf_and_loads(tiny_llama_dir: Path, train_jsonl: Path, tmp_path: Path) -> None:
    import gguf

    summary = build_imatrix(tiny_llama_dir, tmp_path / "imatrix.gguf", train_jsonl, chunk_size=64)
    path = tmp_path / "imatrix.gguf"
    assert summary["chunks"] == len(TRAIN) and summary["entries"] == 14 and summary["chunk_size"] == 64
    meta = read_imatrix_meta(path)
    assert meta == {"type": "imatrix", "datasets": [str(train_jsonl)], "chunk_count": len(TRAIN),
                    "chunk_size": 64, "entries": 14}
    assert is_imatrix_file(path) and not is_imatrix_file(train_jsonl)
    reader = gguf.GGUFReader(path)
    assert "general.architecture" not in reader.fields  # as llama-imatrix writes it
    f16 = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "tiny-F16.gguf")
    cols = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(f16).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    tensors = {t.name: t for t in reader.tensors}
    assert {n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")} == set(cols)
    for name, ncols in cols.items():
        assert list(tensors[name + ".in_sum2"].shape) == [ncols, 1]  # ggml ne = [n_cols, n_mat]
        assert list(tensors[name + ".counts"].shape) == [1, 1]
        assert float(tensors[name + ".counts"].data.ravel()[0]) == summary["tokens"]
    values = load_imatrix(path)  # what quantize_gguf hands llama.cpp: in_sum2 / counts
    sums = np.asarray(tensors["blk.1.ffn_down.weight.in_sum2"].data, dtype=np.float64).ravel()
    np.testing.assert_allclose(values["blk.1.ffn_down.weight"], sums / summary["tokens"], rtol=1e-6)


def _held_out_kld(f16: Path, quantized: Path, ids_list: list[list[int]]) -> float:
    kl = [kld_rows(llama_logits(f16, ids, n_ctx=256), llama_logits(quantized, ids, n_ctx=256)) for ids in ids_list]
    return float(np.concatenate(kl).mean())


def test_imatrix_lowers_q4_0_kld_on_held_out_text(outlier_model: Path, train_jsonl: Path, tmp_path: Path) -> None:
    imatrix = tmp_path / "imatrix.gguf"
    build_imatrix(outlier_model, imatrix, train_jsonl)
    f16 = convert_hf_to_gguf(outlier_model, tmp_path / "F16.gguf")
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", "Q4_0", threads=1)
    weighted = quantize_gguf(f16, tmp_path / "weighted.gguf", "Q4_0", threads=1, imatrix=imatrix)
    # the negative control: the same file with each column's importance inverted
    inverted = tmp_path / "inverted.gguf"
    stats = ImatrixStats(chunks=1, tokens=1)
    for name, values in load_imatrix(imatrix).items():
        stats.sum2[name] = 1.0 / np.maximum(np.asarray(values), 1e-6)
        stats.sum[name] = np.zeros(len(values))
        stats.counts[name] = 1
    write_imatrix(inverted, stats, datasets=["inverted"], chunk_size=1)
    wrong = quantize_gguf(f16, tmp_path / "wrong.gguf", "Q4_0", threads=1, imatrix=inverted)
    tok = load_tokenizer(outlier_model)
    held_out = [encode_row(tok, r, with_response=True) for r in BUILTIN_ROWS]  # not the calibration text
    k_plain, k_weighted, k_wrong = (_held_out_kld(f16, q, held_out) for q in (plain, weighted, wrong))
    assert plain.stat().st_size == weighted.stat().st_size
    assert k_weighted < 0.9 * k_plain, (k_plain, k_weighted)
    assert k_wrong > k_weighted, (k_wrong, k_weighted)


def test_process_output_adds_an_untied_head(arch_model_dirs: dict[str, Path]) -> None:
    hf_dir = arch_model_dirs["llama-untied"]
    tok = load_tokenizer(hf_dir)
    seqs = [encode_row(tok, BUILTIN_ROWS[0], with_response=True)]
    assert "output.weight" not in collect_imatrix(hf_dir, seqs).sum2
    assert collect_imatrix(hf_dir, seqs, process_output=True).sum2["output.weight"].shape == (64,)


def _run(tiny_llama_dir: Path, root: Path, train: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    (run / RUN_TOML).write_text('schema = 1\nprofile = "pi5-8gb"\n')
    shutil.copytree(tiny_llama_dir, run / STUDENT_DIR)
    (run / STUDENT_DIR / COMPLETE_MARKER).write_text("ok\n")
    (run / DATA_DIR).mkdir()
    if train:
        _write_jsonl(run / DATA_DIR / TRAIN_FILE, TRAIN)
    return run


def test_export_with_imatrix_from_the_run_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _run(tiny_llama_dir, tmp_path)
    report = export_model(source=run, fmt="gguf", quants=["Q4_0"], out_dir=None, imatrix=True, fidelity=False)
    out = run / ARTIFACTS_DIR
    info = report["imatrix"]
    assert info["file"] == "student.imatrix.gguf" and info["computed"] is True
    assert info["datasets"] == [str(run / DATA_DIR / TRAIN_FILE)] and info["chunks"] == len(TRAIN)
    assert is_imatrix_file(out / info["file"])
    assert json.loads((out / EXPORT_REPORT).read_text())["imatrix"] == info
    q4 = next(a for a in report["artifacts"] if a["quant"] == "Q4_0")
    assert q4["imatrix"] == "student.imatrix.gguf"
    assert "imatrix" not in {a["format"] for a in report["artifacts"]}  # not a deployable artifact
    plain = quantize_gguf(out / "student-F16.gguf", tmp_path / "plain.gguf", "Q4_0", threads=1)
    assert plain.read_bytes() != (out / "student-Q4_0.gguf").read_bytes()
    # an existing imatrix file is used as is
    given = tmp_path / "given.imatrix.gguf"
    shutil.copy(out / info["file"], given)
    other = export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q4_0"], out_dir=tmp_path / "o",
                         calibration=given, fidelity=False)
    assert other["imatrix"]["computed"] is False and other["imatrix"]["sha256"] == info["sha256"]
    assert _tensor_bytes(tmp_path / "o" / f"{tiny_llama_dir.name}-Q4_0.gguf") == _tensor_bytes(out / "student-Q4_0.gguf")


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf  # the headers differ (general.name is the model's folder name); the weights must not

    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_imatrix_bad_inputs_fail_before_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _run(tiny_llama_dir, tmp_path, train=False)
    with pytest.raises(RunDirError, match=TRAIN_FILE):
        export_model(source=run, fmt="gguf", quants=["Q4_0"], out_dir=None, imatrix=True)
    with pytest.raises(UsageError, match="GGUF quantization only"):
        export_model(source=run, fmt="onnx", quants=["int4"], out_dir=None, imatrix=True)
    with pytest.raises(UsageError, match="calibration"):
        export_model(source=tiny_llama_dir, fmt="gguf", quants=["Q4_0"], out_dir=tmp_path / "o", imatrix=True)
    assert not (run / ARTIFACTS_DIR).exists() and not (tmp_path / "o").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        build_imatrix(tiny_llama_dir, tmp_path / "i.gguf", empty)
    with pytest.raises(DataError, match="no calibration tokens"):
        collect_imatrix(tiny_llama_dir, [[]])
    assert not (tmp_path / "i.gguf").exists()
