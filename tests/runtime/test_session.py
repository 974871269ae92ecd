"""open_model: bundles are verified, preflighted and cached; bare GGUFs load directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgepack.errors import BudgetError, BundleError, ModelSourceError
from edgepack.runtime import memory, session
from edgepack.runtime.bundle.archive import BundleFile, write_bundle
from edgepack.gguf_header import read_gguf
from edgepack.memory import kv_cache_bytes
from edgepack.runtime.memory import estimate_gguf_memory, gguf_artifact_memory, preflight
from edgepack.runtime.session import open_model

USER = [{"role": "user", "content": "Compressor C-12 tripped on high vibration."}]


@pytest.fixture()
def bundle(tiny_gguf: Path, tmp_path: Path) -> Path:
    header = read_gguf(tiny_gguf)
    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16", "profile": {"name": "t"},
                "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": 256, "threads": 1,
                            "memory_estimate": estimate_gguf_memory(header, 256)}}
    write_bundle(tmp_path / "tiny.edgepack", manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    return tmp_path / "tiny.edgepack"


def test_bare_gguf(tiny_gguf: Path) -> None:
    with open_model(tiny_gguf, threads=1) as s:
        assert s.manifest is None and s.name == "tiny-F16"
        assert s.backend.n_ctx == 512  # capped at the model's trained context (512), below the 2048 default
        assert s.memory_estimate and s.memory_estimate["kv_cache_bytes"] == kv_cache_bytes(
            n_layers=2, n_ctx=512, n_kv_heads=2, key_dim=16, value_dim=16, bytes_per_value=2)
        assert s.memory_estimate == gguf_artifact_memory(tiny_gguf, 512)  # the format's artifact_memory part
        pieces = list(s.stream_chat(USER, max_tokens=8))
        assert all(isinstance(p, str) for p in pieces)


def test_bundle_is_extracted_once_into_the_cache(bundle: Path, cache_dir: Path) -> None:
    with open_model(bundle) as s:
        first = s.complete(USER, max_tokens=8)
        assert s.backend.n_ctx == 256 and s.name == "tiny"
    (folder,) = list((cache_dir / "bundles").iterdir())
    model = folder / "tiny-F16.gguf"
    stamp = model.stat().st_mtime_ns
    with open_model(bundle) as s:
        assert s.complete(USER, max_tokens=8) == first
    assert model.stat().st_mtime_ns == stamp  # reused, not re-extracted
    import hashlib

    assert folder.name == hashlib.sha256(bundle.read_bytes()).hexdigest()


def test_tampered_cache_is_rebuilt(bundle: Path, cache_dir: Path, tiny_gguf: Path) -> None:
    with open_model(bundle):
        pass
    (folder,) = list((cache_dir / "bundles").iterdir())
    with open(folder / "tiny-F16.gguf", "ab") as fh:
        fh.write(b"junk")
    with open_model(bundle):
        pass
    assert (folder / "tiny-F16.gguf").read_bytes() == tiny_gguf.read_bytes()


def test_tampered_bundle_is_refused_before_loading(bundle: Path, cache_dir: Path) -> None:
    data = bytearray(bundle.read_bytes())
    data[-20000] ^= 0xFF  # inside the model member
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tiny-F16.gguf: sha256"):
        with open_model(bundle):
            pass
    assert not (cache_dir / "bundles").exists()


def test_memory_preflight_refuses_with_numbers(bundle: Path, tiny_gguf: Path, cache_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (10 * 1024 * 1024, "MemAvailable"))
    need = round((tiny_gguf.stat().st_size + memory.RUNTIME_ALLOWANCE_BYTES) / memory.MB)  # before extraction
    with pytest.raises(BudgetError, match=rf"needs about {need} MB but only 10 MB is available \(MemAvailable\)"):
        with open_model(bundle):
            pass
    assert not (cache_dir / "bundles").exists()  # refused before extraction
    with pytest.raises(BudgetError, match="KV cache 2 layers"):
        with open_model(tiny_gguf):
            pass


def test_preflight_is_a_plain_comparison() -> None:
    preflight(100, 100, what="m")
    with pytest.raises(BudgetError, match="m needs about 2 MB but only 1 MB"):
        preflight(2 << 20, 1 << 20, what="m")


def test_available_memory_is_positive() -> None:
    available, source = memory.available_memory_bytes()
    assert available > 0 and source


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "c"))
    assert session.cache_root() == tmp_path / "c"
    monkeypatch.delenv("EDGEPACK_CACHE")
    assert session.cache_root() == Path(os.path.expanduser("~")) / ".cache" / "edgepack"


def test_missing_or_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError):
        with open_model(tmp_path / "nope.gguf"):
            pass
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a model artifact"):
        with open_model(tmp_path / "model.bin"):
            pass


@pytest.mark.slow
def test_teacher_memory_estimate_matches_its_shape(builtin_teacher_gguf: Path) -> None:
    est = estimate_gguf_memory(read_gguf(builtin_teacher_gguf), 2048)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, F16 cache.
    assert est["kv_cache_bytes"] == 30 * 2048 * 3 * (64 + 64) * 2
    assert est["weights_bytes"] == 96_576_768
    # Q4_1 is not repacked: the allowance is the gguf base + activations + a 49,152-entry vocabulary.
    assert est["total_bytes"] == est["weights_bytes"] + est["kv_cache_bytes"] + est["runtime_allowance_bytes"]
    assert "vocabulary of 49152" in est["basis"] and "repacked Q4 copies 0.0 MiB" in est["basis"]


@pytest.mark.parametrize("n_ctx,requested,trained,expected,noted", [
    (None, None, 512, 512, False),        # bare model: the default, capped at the trained context
    (None, None, 8192, 2048, False),
    (None, None, None, 2048, False),
    (None, 256, 512, 256, False),         # a bundle may ask for less than the model allows
    (None, 10**6, 512, 512, True),        # ...never more (issue #20 defect 6)
    (None, 4096, None, 2048, True),       # the file does not say: the bare default is the ceiling
    (None, "big", 512, 512, True),
    (None, -5, 512, 512, True),
    (4096, 10**6, 512, 4096, False),      # the caller's --ctx is used as given; the preflight checks it
])
def test_choose_context(n_ctx: int | None, requested: object, trained: int | None, expected: int,
                        noted: bool) -> None:
    notes: list[str] = []
    assert session.choose_context(n_ctx, requested, trained, notes.append) == expected
    assert bool(notes) == noted


def test_choose_context_refuses_a_nonsense_cli_value() -> None:
    from edgepack.errors import UsageError

    with pytest.raises(UsageError, match="positive integer"):
        session.choose_context(0, None, 512, lambda _: None)


def test_cache_problem_names_the_file(bundle: Path, cache_dir: Path) -> None:
    from edgepack.runtime.bundle.archive import inspect_bundle

    check = inspect_bundle(bundle)
    with open_model(bundle):
        pass
    folder = cache_dir / "bundles" / check.sha256
    assert session.cache_problem(folder, check.members) is None
    data = bytearray((folder / "tiny-F16.gguf").read_bytes())
    data[-1] ^= 1
    (folder / "tiny-F16.gguf").write_bytes(bytes(data))
    assert session.cache_problem(folder, check.members) == "tiny-F16.gguf: sha256 differs from the bundle's"
