"""profiles fit: shapes read from real files, the verdict, and the estimate against measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.gguf_header import read_gguf
from edgepack.memory import ModelShape, predict_gguf, shape_kv_bytes
from edgepack.profiles import load_profile
from edgepack.profiles.fit import deploy_verdict, fit_model, shape_from_config, shape_from_gguf
from edgepack.runtime.memory import gguf_artifact_memory
from edgepack.train_memory import MIB, estimate_train, lora_fraction

SMOL = ModelShape(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536,
                  vocab=49152, params=134_515_008, embedding_params=49152 * 576, tied=True)


def test_kv_cache_formula() -> None:
    # 2 (K,V) x layers x ctx x kv_heads x head_dim x 2 bytes (f16)
    assert shape_kv_bytes(SMOL, 2048, 2) == 2 * 30 * 2048 * 3 * 64 * 2
    assert shape_kv_bytes(SMOL, 4096, 2) == 2 * shape_kv_bytes(SMOL, 2048, 2)


def test_deploy_verdict_orders_quants_and_compares_with_the_budget() -> None:
    sizes = [predict_gguf(SMOL, q, 2048).weights_bytes for q in ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    estimate = predict_gguf(SMOL, "Q4_K_M", 2048).as_dict()
    small = deploy_verdict("gguf", "Q4_K_M", estimate, budget_bytes=10 * 2**20)
    assert not small.fits and small.total_bytes == small.weights_bytes + small.kv_cache_bytes + small.overhead_bytes
    assert deploy_verdict("gguf", "Q4_K_M", estimate, budget_bytes=small.total_bytes).fits
    assert small.file_bytes == estimate["file_bytes"] and "estimate" in small.basis


def test_shape_from_config_counts_llama_params(tiny_llama_dir: Path) -> None:
    import torch  # noqa: F401  (only to make sure the model is loadable)
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert shape_from_config(cfg).params == sum(p.numel() for p in model.parameters())


def test_shape_from_gguf_matches_the_config(tiny_llama_dir: Path, tiny_gguf: Path) -> None:
    shape, quant = shape_from_gguf(tiny_gguf)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert quant == "F16"
    assert shape == shape_from_config(cfg)


def test_train_estimate_grows_with_batch_and_shrinks_with_lora() -> None:
    full = estimate_train(SMOL, budget_bytes=2**34, device="cpu", micro_batch=4)
    bigger = estimate_train(SMOL, budget_bytes=2**34, device="cpu", micro_batch=8)
    lora = estimate_train(SMOL, budget_bytes=2**34, device="cpu", method="lora")
    assert bigger.activations_bytes > full.activations_bytes
    assert lora.optimizer_bytes == 8 * int(SMOL.params * lora_fraction(SMOL)) < full.optimizer_bytes / 20
    assert full.total_bytes == (full.weights_bytes + full.gradients_bytes + full.optimizer_bytes
                                + full.activations_bytes + full.teacher_bytes)


def test_fit_train_row_is_the_planners_first_candidate(tiny_llama_dir: Path) -> None:
    """profiles fit and distill train count training memory with one function: the fit's train row
    is exactly what plan_training counts for full fine-tuning at micro-batch 4 (no second estimator)."""
    from edgepack.distill.plan import plan_training

    profile = load_profile("cpu-x86-2c")
    result = fit_model(tiny_llama_dir, profile)
    shape = ModelShape(**result["shape"])
    plan = plan_training(shape, teacher=shape, teacher_mode="online", budget_mb=profile.train_memory_mb,
                         baseline_mb=0, batch_size=4, micro_batch=4, seq_len=256, method="full",
                         checkpointing="off")
    tr = result["train"]
    assert (plan.method, plan.micro_batch, plan.checkpointing) == ("full", 4, False)
    assert plan.planned_peak_mb == round((tr["total_bytes"] + tr["process_growth_bytes"]) / MIB, 1)
    assert plan.transients_mb == tr["transients_mb"]
    assert tr["fits"] and tr["budget_bytes"] == profile.train_memory_mb * MIB


def test_fit_hf_dir(tiny_llama_dir: Path) -> None:
    result = fit_model(tiny_llama_dir, load_profile("cpu-x86-2c"))
    quants = [(d["format"], d["quant"]) for d in result["deploy"]]
    assert result["source"] == "hf"
    assert quants == [(c.format, c.quant) for c in load_profile("cpu-x86-2c").choices]
    assert all(d["fits"] and d["file_bytes"] > 0 for d in result["deploy"])
    assert {"weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
            "teacher_bytes", "total_bytes", "fits"} <= set(result["train"])


def test_fit_gguf_as_is_row_is_the_runtime_preflight(tiny_gguf: Path) -> None:
    """The file's own row is the number open_model's preflight computes, not a second estimate."""
    result = fit_model(tiny_gguf, load_profile("cpu-x86-2c"), context=256)
    first = result["deploy"][0]
    assert (first["format"], first["quant"], first["as_is"]) == ("gguf", "F16", True)
    assert first["file_bytes"] == tiny_gguf.stat().st_size
    preflight = gguf_artifact_memory(tiny_gguf, 256)
    assert first["total_bytes"] == preflight["total_bytes"]
    assert first["weights_bytes"] == read_gguf(tiny_gguf).tensor_bytes


def test_fit_onnx_folder(tiny_onnx: dict) -> None:
    result = fit_model(tiny_onnx["path"], load_profile("cpu-x86-2c"))
    first = result["deploy"][0]
    assert result["source"] == "onnx" and first["as_is"] and first["quant"] == "as-is"
    assert len(result["deploy"]) == 1 + len(load_profile("cpu-x86-2c").choices)


@pytest.mark.slow
def test_fit_gguf_first_entry_is_file_as_is(builtin_teacher_gguf: Path) -> None:
    result = fit_model(builtin_teacher_gguf, load_profile("cpu-x86-2c"))
    first = result["deploy"][0]
    assert first["quant"] == "Q4_1" and first["as_is"]
    assert first["file_bytes"] == builtin_teacher_gguf.stat().st_size
    assert first["weights_bytes"] == 96_576_768
    assert result["shape"]["n_layers"] == 30 and result["shape"]["vocab"] == 49152


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak at fork time.
_RSS_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=2048, n_threads=2, verbose=False)
prompt = "Pump P-101 discharge pressure low alarm. " * 12
llm.create_completion(prompt, max_tokens=64, temperature=0.0)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
"""


@pytest.mark.slow
def test_deploy_estimate_bounds_measured_rss(builtin_teacher_gguf: Path) -> None:
    """The estimate for the embedded GGUF at ctx 2048 vs the peak RSS of a fresh llama.cpp process:
    at least the peak (a ~130-token prompt, below the 512 the estimate assumes), within 20%."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(builtin_teacher_gguf)],
                         capture_output=True, text=True, timeout=300, check=True)
    measured = int(out.stdout.strip().splitlines()[-1])
    estimate = fit_model(builtin_teacher_gguf, load_profile("cpu-x86-2c"), context=2048)["deploy"][0]
    ratio = estimate["total_bytes"] / measured
    assert 1.0 <= ratio <= 1.2, f"estimate {estimate['total_bytes']} vs measured {measured} ({ratio:.2f})"


def test_fit_says_when_a_format_gives_no_estimate(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from edgepack import formats

    bare = dataclasses.replace(formats.get_format("gguf"), artifact_memory="")
    monkeypatch.setattr("edgepack.profiles.fit.format_of", lambda path: bare)
    result = fit_model(tiny_gguf, load_profile("cpu-x86-2c"))
    assert not any(d["as_is"] for d in result["deploy"])
    assert result["notes"] and "artifact_memory" in result["notes"][0]
