"""Memory bandwidth: measured, cached per machine, and turned into decode efficiency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgepack.export.gate.bandwidth import (cache_path, decode_efficiency, gguf_traffic, machine_bandwidth,
                                        machine_key, measure_bandwidth)


def test_measured_bandwidth_is_positive_with_its_samples() -> None:
    r = measure_bandwidth(array_mb=64, repeats=3, threads=2)
    assert r["read_gb_s"] > 0 and r["copy_gb_s"] > 0 and r["read_single_thread"]["best"] > 0
    assert len(r["read"]["samples"]) == 3
    assert r["read"]["min"] <= r["read"]["median"] <= r["read"]["best"] == r["read_gb_s"]
    assert r["threads"] == 2 and r["array_mb"] == 64
    with pytest.raises(ValueError):
        measure_bandwidth(array_mb=1)


def test_bandwidth_is_cached_per_machine(cache_dir: Path) -> None:
    first = machine_bandwidth(array_mb=64, repeats=1)
    assert first["cached"] is False and cache_path() == cache_dir / "bandwidth.json"
    stored = json.loads(cache_path().read_text())
    assert stored["machines"][machine_key()]["read_gb_s"] == first["read_gb_s"]
    second = machine_bandwidth(array_mb=64, repeats=1)
    assert second["cached"] is True and second["read_gb_s"] == first["read_gb_s"]
    # Another machine's entry is kept beside this one; refresh measures again.
    stored["machines"]["other-host|cpu|64|1MB"] = {"read_gb_s": 1.0}
    cache_path().write_text(json.dumps(stored))
    third = machine_bandwidth(refresh=True, array_mb=64, repeats=1)
    assert third["cached"] is False
    assert set(json.loads(cache_path().read_text())["machines"]) == {machine_key(), "other-host|cpu|64|1MB"}


def test_an_unreadable_cache_is_measured_again(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True)
    (cache_dir / "bandwidth.json").write_text("{not json")
    assert machine_bandwidth(array_mb=64, repeats=1)["cached"] is False
    assert json.loads((cache_dir / "bandwidth.json").read_text())["machines"]


def test_decode_efficiency_arithmetic() -> None:
    e = decode_efficiency(decode_tokens_per_s=10.0, weight_bytes_per_token=1_000_000_000, kv_bytes_per_position=1000,
                          position=1000.0, bandwidth_gb_s=20.0)
    assert e["bytes_per_token"] == 1_001_000_000
    assert e["achieved_gb_s"] == pytest.approx(10.01)
    assert e["efficiency"] == pytest.approx(10.01 / 20.0)
    assert e["bound_tokens_per_s"] == pytest.approx(20e9 / 1_001_000_000)
    with pytest.raises(ValueError):
        decode_efficiency(decode_tokens_per_s=1, weight_bytes_per_token=1, kv_bytes_per_position=0, position=0,
                          bandwidth_gb_s=0)


def test_gguf_traffic_counts_an_untied_embedding_as_one_row(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.gguf_header import read_gguf
    from tests.tiny import build_tiny_llama

    tied = gguf_traffic(tiny_gguf)
    info = read_gguf(tiny_gguf)
    assert tied["weight_bytes_per_token"] == info.tensor_bytes  # the tied head reads the whole table
    assert tied["kv_bytes_per_position"] == 2 * 2 * (16 + 16) * 2  # layers × kv heads × (k+v dims) × F16
    untied_path = convert_hf_to_gguf(build_tiny_llama(tmp_path / "untied", tie=False), tmp_path / "u.gguf",
                                     outtype="F16")
    untied_info = read_gguf(untied_path)
    embd = next(t for t in untied_info.tensors if t.name == "token_embd.weight")
    untied = gguf_traffic(untied_path)
    assert untied["weight_bytes_per_token"] == untied_info.tensor_bytes - embd.nbytes + embd.nbytes // embd.shape[1]


def test_onnx_traffic_from_the_graph(tiny_onnx: dict[str, Any], tiny_onnx_fp32: dict[str, Any]) -> None:
    from edgepack.runtime.onnx_graph import onnx_traffic, scan_onnx

    fp32 = onnx_traffic(tiny_onnx_fp32["path"])
    assert fp32["kv_bytes_per_position"] == 2 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head dim × fp32
    assert fp32["weight_bytes_per_token"] == fp32["weight_bytes_total"]  # tied: the head reads the table
    int4 = onnx_traffic(tiny_onnx["path"])
    info = scan_onnx(tiny_onnx["path"] / "model.onnx")
    # The int4 export stores the embedding once, as the int8 head's MatMulNBits bytes (the
    # lookup reads them too): the head reads the whole table every token, so it counts in full.
    assert not any(t.name == "model.embed_tokens.weight" for t in info.initializers)
    matmul = {inputs[1] for op, inputs, _ in info.nodes if op == "MatMulNBits"}
    matmul_bytes = sum(t.nbytes for t in info.initializers if t.name in matmul)
    assert 0 < matmul_bytes <= int4["weight_bytes_per_token"] <= int4["weight_bytes_total"]


def test_gate_reports_decode_efficiency(tiny_gguf: Path, tmp_path: Path, cache_dir: Path) -> None:
    from edgepack.profiles import load_profile
    from edgepack.export.gate.gate import run_gate
    from tests.runtime.helpers import write_profile

    machine_bandwidth(array_mb=64, repeats=1)  # seed the cache so the gate does not measure 256 MB
    report = run_gate(artifact=tiny_gguf, profile=load_profile(str(write_profile(tmp_path, "easy"))), holdout=None)
    eff = report["efficiency"]
    m = report["measurements"]
    assert eff["position"] == m["prompt_tokens"] + m["decode_tokens"] / 2
    assert eff["decode_tokens_per_s"] == m["decode_tokens_per_s"]["p50"]
    assert eff["bandwidth_gb_s"] == json.loads((cache_dir / "bandwidth.json").read_text())["machines"][machine_key()]["read_gb_s"]
    assert eff["efficiency"] == pytest.approx(eff["achieved_gb_s"] / eff["bandwidth_gb_s"])
