"""Fixtures for exporter tests (builders live in tests/export/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.helpers import ARCH_BUILDERS, VARIANT_BUILDERS


@pytest.fixture(scope="session")
def arch_model_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF dirs keyed by architecture / variant name (LlamaForCausalLM = the shared tiny model)."""
    root = tmp_path_factory.mktemp("archs")
    dirs = {"LlamaForCausalLM": tiny_llama_dir}
    for name, build in {**ARCH_BUILDERS, **VARIANT_BUILDERS}.items():
        dirs[name] = build(tiny_llama_dir, root / name)
    return dirs
