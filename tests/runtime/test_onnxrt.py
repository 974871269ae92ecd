"""The onnx backend on tiny exported folders: KV-cache generation against full-prefix logits,
tokenizer parity with llama.cpp, stop tokens, measurement, gating, and external-data containment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepack.constants import FAIL, PASS
from edgepack.errors import InvalidModelFile, UnsafeModelError, UsageError
from edgepack.profiles import load_profile
from edgepack.formats import format_of
from edgepack.runtime.backends.base import available_formats, get_backend
from edgepack.runtime.onnx_graph import inspect_onnx, scan_onnx
from tests.runtime.helpers import HOLDOUT_ROWS, write_profile

MESSAGES = [{"role": "user", "content": "Pump P-101 bearing noise and vibration."}]


def load(folder: Path, threads: int = 1, n_ctx: int = 256) -> Any:
    return get_backend("onnx").load(folder, threads=threads, n_ctx=n_ctx)


def test_registered_by_format_and_found_by_marker(tiny_onnx: dict[str, Any]) -> None:
    from edgepack.runtime.backends.onnxrt import OnnxRuntimeBackend

    assert "onnx" in available_formats()
    assert get_backend("onnx") is OnnxRuntimeBackend
    assert format_of(tiny_onnx["path"]).name == "onnx"
    assert format_of(tiny_onnx["path"] / "model.onnx").name == "onnx"


def test_light_modules_import_no_heavy_runtime() -> None:
    code = ("import sys, edgepack.runtime.backends.base, edgepack.runtime.onnx_graph, edgepack.export.gate.search, "
            "edgepack.export.gate.report, edgepack.export.gate.bandwidth, edgepack.export.gate.gate\n"
            "heavy = [m for m in ('onnxruntime', 'llama_cpp', 'torch', 'transformers', 'matplotlib', 'onnx') "
            "if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fixture", ["tiny_onnx", "tiny_onnx_fp32"])
def test_greedy_with_kv_cache_equals_full_prefix_argmax(fixture: str, request: pytest.FixtureRequest) -> None:
    from edgepack.export.onnx.convert import onnx_logits

    folder = request.getfixturevalue(fixture)["path"]
    with load(folder) as backend:
        prompt = backend.chat_tokens(MESSAGES)
        got = list(backend.generate(prompt, max_tokens=10, stop_at_eos=False))
        again = list(backend.generate(prompt, max_tokens=10, stop_at_eos=False))
    expected, seq = [], list(prompt)
    for _ in range(10):  # no cache: the whole prefix through the graph each step
        nxt = int(np.argmax(onnx_logits(folder / "model.onnx", seq)[-1]))
        expected.append(nxt)
        seq.append(nxt)
    assert got == expected
    assert again == got


def test_sampling_is_reproducible_with_a_seed(tiny_onnx: dict[str, Any]) -> None:
    with load(tiny_onnx["path"]) as backend:
        prompt = backend.chat_tokens(MESSAGES)
        a = list(backend.generate(prompt, max_tokens=16, temperature=0.9, seed=7, stop_at_eos=False))
        b = list(backend.generate(prompt, max_tokens=16, temperature=0.9, seed=7, stop_at_eos=False))
        assert a == b and len(a) == 16
        with pytest.raises(UsageError):
            list(backend.generate(prompt, max_tokens=4, temperature=-1))
        with pytest.raises(UsageError, match="context holds 256"):
            backend.generate(list(range(3, 259)), max_tokens=4)


def test_tokenizer_template_and_stop_tokens_match_llama_cpp(tiny_onnx: dict[str, Any], tiny_gguf: Path) -> None:
    text = "Über-Temperatur am Schaltschrank 3 — Lüfter prüfen! 日本語 x² <|im_start|>user"
    with load(tiny_onnx["path"]) as onnx, get_backend("gguf").load(tiny_gguf, threads=1, n_ctx=256) as gguf:
        for parse_special in (False, True):
            assert onnx.tokenize(text, parse_special=parse_special) == gguf.tokenize(text, parse_special=parse_special)
        assert onnx.tokenize(text, parse_special=True) != onnx.tokenize(text, parse_special=False)
        assert onnx.chat_tokens(MESSAGES) == gguf.chat_tokens(MESSAGES)
        assert onnx.render_chat(MESSAGES) == gguf.render_chat(MESSAGES)
        assert onnx.special_tokens == gguf.special_tokens
        assert onnx.stop_tokens == gguf.stop_tokens == {0, 2}
        n_vocab = gguf.info["n_vocab"]
        assert [onnx.token_bytes(t) for t in range(n_vocab)] == [gguf.token_bytes(t) for t in range(n_vocab)]
        # Streaming never splits a UTF-8 character across pieces.
        ids = onnx.tokenize("日本語 x² ñ", add_special=False)
        assert "".join(onnx.decode_stream(iter(ids))) == "日本語 x² ñ"


def test_stream_chat_yields_text_and_stops_before_a_stop_token(tiny_onnx: dict[str, Any], tmp_path: Path) -> None:
    with load(tiny_onnx["path"]) as backend:
        pieces = list(backend.stream_chat(MESSAGES, max_tokens=12))
        greedy = list(backend.generate(backend.chat_tokens(MESSAGES), max_tokens=12, stop_at_eos=False))
    assert pieces and all(isinstance(p, str) for p in pieces)
    # A folder whose generation_config names a later greedy token as an end token stops before it.
    k = next((i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i]), 0)
    folder = tmp_path / "stop"
    shutil.copytree(tiny_onnx["path"], folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg["eos_token_id"] = [2, greedy[k]]
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    with load(folder) as backend:
        assert greedy[k] in backend.stop_tokens
        assert list(backend.generate(backend.chat_tokens(MESSAGES), max_tokens=12)) == greedy[:k]
        assert len(list(backend.generate(backend.chat_tokens(MESSAGES), max_tokens=12, stop_at_eos=False))) == 12


def test_threads_reach_onnxruntime(tiny_onnx: dict[str, Any]) -> None:
    with load(tiny_onnx["path"], threads=2) as backend:
        assert backend._session.get_session_options().intra_op_num_threads == 2
        info = backend.info
    assert info["providers"] == ["CPUExecutionProvider"] and info["gpu_offload_supported"] is False
    assert info["intra_op_threads"] == 2 and info["quant"] == "int4"


def test_scan_agrees_with_the_onnx_library(tiny_onnx: dict[str, Any], tiny_onnx_fp32: dict[str, Any]) -> None:
    import onnx

    for report, quant in ((tiny_onnx, "int4"), (tiny_onnx_fp32, "fp32")):
        path = report["path"] / "model.onnx"
        info = scan_onnx(path)
        model = onnx.load(str(path))
        ref = {t.name: (tuple(t.dims), t.data_type, len(t.raw_data)) for t in model.graph.initializer}
        assert {t.name: (t.dims, t.data_type, t.nbytes) for t in info.initializers} == ref
        assert [op for op, _, _ in info.nodes] == [n.op_type for n in model.graph.node]
        assert set(info.inputs) == {i.name for i in model.graph.input}
        assert info.quant == quant and info.external_locations == []


def test_truncated_or_garbage_model_is_invalid(tiny_onnx: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(tiny_onnx["path"], folder)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelFile, match="not a valid ONNX model"):
        load(folder)
    (folder / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidModelFile):
        load(folder)


# --- external data containment ------------------------------------------------------------
@pytest.fixture()
def external_copy(tiny_onnx_fp32: dict[str, Any], tmp_path: Path) -> Path:
    """The FP32 folder re-saved with its weights in ``weights.bin`` (ONNX external data)."""
    import onnx

    folder = tmp_path / "model"
    shutil.copytree(tiny_onnx_fp32["path"], folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return folder


def set_location(folder: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(folder / "model.onnx"))


def test_external_data_inside_the_folder_loads(external_copy: Path, tiny_onnx_fp32: dict[str, Any]) -> None:
    from edgepack.runtime.onnx_graph import onnx_traffic

    info = inspect_onnx(external_copy)
    assert set(info.external_locations) == {"weights.bin"}
    assert onnx_traffic(external_copy) == onnx_traffic(tiny_onnx_fp32["path"])  # sizes from external data too
    with load(external_copy) as a, load(tiny_onnx_fp32["path"]) as b:
        prompt = a.chat_tokens(MESSAGES)
        assert list(a.generate(prompt, max_tokens=6, stop_at_eos=False)) == \
            list(b.generate(prompt, max_tokens=6, stop_at_eos=False))


def _escape_cases(folder: Path) -> dict[str, str]:
    outside = folder.parent / "outside.bin"
    shutil.copy(folder / "weights.bin", outside)
    return {"dotdot": "../outside.bin", "nested": "sub/../../outside.bin", "absolute": str(outside.resolve()),
            "windows_drive": "C:\\outside.bin", "backslash_dotdot": "..\\outside.bin"}


@pytest.mark.parametrize("case", ["dotdot", "nested", "absolute", "windows_drive", "backslash_dotdot", "symlink"])
def test_external_data_escaping_the_folder_is_refused_before_onnxruntime(
        case: str, external_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    cases = _escape_cases(external_copy)
    if case == "symlink":
        os.remove(external_copy / "weights.bin")
        os.symlink(external_copy.parent / "outside.bin", external_copy / "weights.bin")
    else:
        set_location(external_copy, cases[case])

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("onnxruntime was handed a model that should have been refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(UnsafeModelError):
        load(external_copy)


def test_symlinked_model_file_and_missing_data_are_refused(external_copy: Path, tmp_path: Path) -> None:
    os.remove(external_copy / "weights.bin")
    with pytest.raises(InvalidModelFile, match="missing"):
        load(external_copy)
    other = tmp_path / "linked"
    other.mkdir()
    os.symlink(external_copy / "model.onnx", other / "model.onnx")
    with pytest.raises(UnsafeModelError, match="symlink"):
        inspect_onnx(other)


def test_gate_and_measurement_refuse_an_escaping_folder(external_copy: Path, tmp_path: Path) -> None:
    from edgepack.export.gate.gate import run_gate
    from edgepack.export.gate.measure import measure_artifact

    set_location(external_copy, _escape_cases(external_copy)["dotdot"])
    r = measure_artifact(external_copy, fmt="onnx", threads=1, n_ctx=128, prompt_tokens=8, decode_tokens=4,
                         runs=1, timeout_s=120)
    assert r["ok"] is False and r["error_type"] == "UnsafeModelError"
    profile = load_profile(str(write_profile(tmp_path, "easy", choices='["onnx:fp32"]')))
    with pytest.raises(UnsafeModelError):
        run_gate(artifact=external_copy, profile=profile, holdout=None, efficiency=False)


# --- measurement and gate ------------------------------------------------------------------
def test_measurement_of_an_onnx_folder_in_a_child(tiny_onnx: dict[str, Any]) -> None:
    from edgepack.export.gate.measure import measure_artifact

    r = measure_artifact(tiny_onnx["path"], fmt="onnx", threads=1, n_ctx=256, prompt_tokens=48, decode_tokens=24,
                         runs=3, min_seconds=0)
    assert r["ok"], r
    assert r["prompt_tokens"] == 48 and r["format"] == "onnx"
    for series in ("ttft_ms", "decode_tokens_per_s"):
        assert r[series]["n"] == 3 and 0 < r[series]["min"] <= r[series]["p50"] <= r[series]["max"]
    assert r["inter_token_ms"]["n"] == 3 * 23
    assert 0 < r["rss_before_load_mb"] <= r["rss_after_load_mb"] <= r["peak_rss_mb"] < 1024
    assert r["backend"]["backend"] == "onnxruntime" and r["backend"]["quant"] == "int4"
    assert r["gpu_offload"] is False and r["load_s"] > 0


def test_gate_on_an_onnx_folder(tiny_onnx: dict[str, Any], tmp_path: Path, cache_dir: Path) -> None:
    from edgepack.export.gate.gate import run_gate

    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT_ROWS))
    # 512: the gate asks with the demo task's system prompt (about 440 tiny-tokenizer tokens).
    easy = load_profile(str(write_profile(tmp_path, "easy", choices='["onnx:int4"]', min_relative_quality=0.0,
                                          context_length=512)))
    report = run_gate(artifact=tiny_onnx["path"], profile=easy, holdout=holdout)
    assert report["verdict"] == PASS, report["reasons"]
    assert (report["format"], report["quant"]) == ("onnx", "int4")
    assert report["model_sha256"] == report["artifact_sha256"] == tiny_onnx["sha256"]  # export.json's digest
    assert report["measurements"]["quality"]["holdout"] == str(holdout)
    assert report["efficiency"]["efficiency"] > 0 and report["efficiency"]["weight_bytes_per_token"] > 0
    assert report["spread"]["decode_tokens_per_s"]["stdev"] >= 0
    hard = load_profile(str(write_profile(tmp_path, "hard", choices='["onnx:int4"]', ttft_p95_ms=0.001,
                                          min_decode_tokens_per_s=10_000_000)))
    failed = run_gate(artifact=tiny_onnx["path"], profile=hard, holdout=None)
    assert failed["verdict"] == FAIL
    assert any(r.startswith("ttft_p95_ms") for r in failed["reasons"])
    assert any(r.startswith("decode_tokens_per_s") for r in failed["reasons"])


def test_open_model_on_a_bare_onnx_folder(tiny_onnx: dict[str, Any]) -> None:
    from edgepack.runtime.session import open_model

    with open_model(tiny_onnx["path"]) as session:
        answer = session.complete(MESSAGES, max_tokens=8)
        assert isinstance(answer, str)
        assert session.backend.n_ctx == 512  # the model's max_position_embeddings, below the default
        assert "KV cache" in session.memory_estimate["basis"]
