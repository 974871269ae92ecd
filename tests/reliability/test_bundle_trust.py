"""Bundle trust: numbers inside a (validly signed) bundle never size an allocation, and the
extraction cache is checked against the verified bundle's hashes on every use.

Issue #20 defects 6 and 8, and the unsigned-check notice: a bundle whose manifest claims
``runtime.context_length=10^6`` and ``memory_estimate.total_bytes=1`` used to pass the
preflight and grow to 10.7 GB; a cached GGUF patched in place with its mtime restored used to
be loaded by ``run --key``; a signed bundle run without ``--key`` said nothing. The forged
bundles are real tiny-GGUF bundles, re-signed with a test key (``bundle_forge``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import BudgetError, BundleError
from edgepack.runtime import memory
from edgepack.runtime.backends.llamacpp import LlamaCppBackend
from edgepack.gguf_header import read_gguf
from edgepack.runtime.memory import estimate_gguf_memory
from edgepack.runtime.session import open_model
from tests.reliability.bundle_forge import (apply_tamper, cached_folder, flip_byte, forge_bundle, make_keys,
                                            tamper_variants)

USER = [{"role": "user", "content": "Pump P-101 bearing noise."}]
TRAINED_CTX = 512  # the tiny Llama's max_position_embeddings, written to its GGUF
HOSTILE = {"context_length": 1_000_000, "memory_estimate": {"total_bytes": 1}}
RSS_BOUND = 256 << 20  # generous: `edgepack run` on the tiny bundle peaks near 90 MB; at 10^6 ctx, 380 MB


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny Llama as an F16 GGUF (as tests/conftest.py builds it)."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", outtype="F16")


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EDGEPACK_CACHE so bundle extraction never touches ~/.cache."""
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every llama.cpp load's arguments; a load past the model's trained context fails the
    test *before* llama.cpp allocates (so the unfixed code cannot take gigabytes here)."""
    seen: list[dict[str, Any]] = []
    real = LlamaCppBackend.load.__func__  # type: ignore[attr-defined]

    def guarded(cls: type, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> Any:
        seen.append({"n_ctx": n_ctx, "threads": threads, "gpu_layers": gpu_layers})
        if n_ctx > TRAINED_CTX:
            pytest.fail(f"llama.cpp was asked for a {n_ctx}-token context; the model file allows {TRAINED_CTX}")
        return real(cls, path, threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers)

    monkeypatch.setattr(LlamaCppBackend, "load", classmethod(guarded))
    yield seen


@pytest.fixture()
def preflights(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts every memory preflight compared (the real comparison still runs)."""
    seen: list[int] = []
    real = memory.preflight

    def spy(required: int, available: int, **kw: Any) -> None:
        seen.append(required)
        real(required, available, **kw)

    monkeypatch.setattr(memory, "preflight", spy)
    return seen


# --- defect 6: manifest-controlled memory ----------------------------------------------------

def test_forged_context_and_estimate_do_not_size_the_load(tmp_path: Path, tiny_gguf: Path, keys: tuple[Path, Path],
                                                          cache_dir: Path, loads: list[dict[str, Any]],
                                                          preflights: list[int]) -> None:
    bundle = forge_bundle(tmp_path / "forged.edgepack", tiny_gguf, runtime=HOSTILE, private_key=keys[0])
    notes: list[str] = []
    with open_model(bundle, key=keys[1], warn=notes.append) as s:
        assert s.backend.n_ctx == TRAINED_CTX
        assert s.complete(USER, max_tokens=4) is not None
    assert [c["n_ctx"] for c in loads] == [TRAINED_CTX]
    honest = estimate_gguf_memory(read_gguf(tiny_gguf), TRAINED_CTX)["total_bytes"]
    assert max(preflights) == honest  # recomputed from the model file, not the manifest's 1 byte
    assert s.memory_estimate is not None and s.memory_estimate["total_bytes"] == honest
    assert any("1000000" in n and str(TRAINED_CTX) in n for n in notes), notes


def test_forged_estimate_does_not_pass_the_preflight(tmp_path: Path, tiny_gguf: Path, keys: tuple[Path, Path],
                                                     cache_dir: Path, loads: list[dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = forge_bundle(tmp_path / "forged.edgepack", tiny_gguf, runtime=HOSTILE, private_key=keys[0])
    # Less than the honest estimate of loading it, however little the manifest claims.
    available = (estimate_gguf_memory(read_gguf(tiny_gguf), TRAINED_CTX)["total_bytes"] >> 20) - 1
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (available << 20, "MemAvailable"))
    with pytest.raises(BudgetError, match=f"but only {available} MB is available"):
        with open_model(bundle, key=keys[1]):
            pass
    assert loads == []


@pytest.mark.parametrize("runtime", [
    {"threads": 4096}, {"threads": -3}, {"threads": 0}, {"threads": "8"}, {"context_length": 0},
    {"context_length": -1}, {"context_length": 2**40}, {"context_length": "1000000"}, {"context_length": 1e6},
    {"context_length": True}, {"n_gpu_layers": 999, "n_batch": 10**9, "n_ubatch": 10**9},
    {"memory_estimate": {"total_bytes": -1}}, {"memory_estimate": "tiny"}, {"memory_estimate": ...},
    {"context_length": ..., "threads": ...},
], ids=repr)
def test_forged_runtime_numbers_are_bounded_or_refused(runtime: dict[str, Any], tmp_path: Path, tiny_gguf: Path,
                                                      keys: tuple[Path, Path], cache_dir: Path,
                                                      loads: list[dict[str, Any]]) -> None:
    bundle = forge_bundle(tmp_path / "forged.edgepack", tiny_gguf, runtime=runtime, private_key=keys[0])
    try:
        with open_model(bundle, key=keys[1]) as s:
            assert 1 <= s.backend.n_ctx <= TRAINED_CTX
    except BundleError:
        return  # the manifest schema refused the value: also safe
    (call,) = loads
    assert 1 <= call["threads"] <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 64)
    assert call["gpu_layers"] == 0  # the manifest says device "cpu"; no numeric field sets offload


@pytest.mark.parametrize("ctx", [2, 17, 300])
def test_a_context_llama_cpp_pads_is_still_a_clean_limit(ctx: int, tmp_path: Path, tiny_gguf: Path,
                                                         cache_dir: Path) -> None:
    """llama.cpp pads a context up to a multiple of 256; llama-cpp-python's buffer is not
    padded, and a prompt between the two used to escape as a bare numpy ValueError."""
    from edgepack.errors import UsageError

    bundle = forge_bundle(tmp_path / "small.edgepack", tiny_gguf, runtime={"context_length": ctx})
    long_prompt = [{"role": "user", "content": "Pump P-101 bearing noise and vibration. " * (ctx // 4 + 1)}]
    with open_model(bundle) as s:
        assert s.backend.n_ctx == ctx
        with pytest.raises(UsageError, match=f"the context holds {ctx}"):
            s.complete(long_prompt, max_tokens=2)


def _peak_rss(cmd: list[str], env: dict[str, str], bound: int, timeout_s: float = 120.0) -> tuple[int, int, str]:
    """Run ``cmd``, polling its RSS; kill it past ``bound`` (so a regression cannot take the
    machine). Returns (exit code, peak RSS, stderr)."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak, deadline = 0, time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        if peak > bound:
            proc.kill()
            break
        time.sleep(0.005)
    if proc.poll() is None and time.monotonic() >= deadline:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, peak, err


def test_forged_bundle_run_stays_within_a_bounded_rss(tmp_path: Path, tiny_gguf: Path,
                                                      keys: tuple[Path, Path]) -> None:
    bundle = forge_bundle(tmp_path / "forged.edgepack", tiny_gguf, runtime=HOSTILE, private_key=keys[0])
    env = dict(os.environ, EDGEPACK_CACHE=str(tmp_path / "cache"))
    code, peak, err = _peak_rss([sys.executable, "-m", "edgepack", "run", str(bundle), "--prompt", "hi",
                                 "--max-tokens", "4", "--key", str(keys[1])], env, RSS_BOUND)
    assert peak <= RSS_BOUND, f"child RSS reached {peak >> 20} MB (killed at {RSS_BOUND >> 20} MB)"
    assert code == 0, err


# --- defect 8: the extraction cache ------------------------------------------------------------

def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EDGEPACK_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def test_patched_cache_with_restored_mtime_is_caught_by_run_key(tmp_path: Path, tiny_gguf: Path,
                                                                keys: tuple[Path, Path]) -> None:
    bundle = forge_bundle(tmp_path / "b.edgepack", tiny_gguf, private_key=keys[0])
    cache = tmp_path / "cache"
    first = _cli("run", str(bundle), "--prompt", "hi", "--max-tokens", "2", "--key", str(keys[1]), cache=cache)
    assert first.returncode == 0, first.stderr
    cached = cached_folder(cache, bundle) / tiny_gguf.name
    header = read_gguf(cached)
    flip_byte(cached, header.data_offset + 101)  # inside a tensor: still loads, different weights
    second = _cli("run", str(bundle), "--prompt", "hi", "--max-tokens", "2", "--key", str(keys[1]), cache=cache)
    assert second.returncode == 0, second.stderr
    assert "re-extracting" in second.stderr and tiny_gguf.name in second.stderr
    assert cached.read_bytes() == tiny_gguf.read_bytes()  # what was loaded is what was signed


@pytest.mark.parametrize("name,recipe", tamper_variants(1 << 20, 4096)[:1] + [
    ("flip in tensor data", {"op": "flip", "offset": -1, "restore": True}),
    ("truncate", {"op": "truncate", "keep": 16, "restore": True}),
    ("symlink to a patched copy", {"op": "symlink"}),
    ("symlink to an identical copy", {"op": "symlink-same"}),
    ("extra file", {"op": "extra"}),
    ("folder symlink", {"op": "folder-symlink"}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_tampered_cache_is_re_extracted_and_announced(name: str, recipe: dict[str, Any], tmp_path: Path,
                                                      tiny_gguf: Path, cache_dir: Path) -> None:
    bundle = forge_bundle(tmp_path / "b.edgepack", tiny_gguf)
    with open_model(bundle):
        pass
    folder = cached_folder(cache_dir, bundle)
    apply_tamper(folder, tiny_gguf.name, recipe, tmp_path / "outside")
    notes: list[str] = []
    with open_model(bundle, warn=notes.append) as s:
        assert s.complete(USER, max_tokens=2) is not None
    assert any("re-extracting" in n for n in notes), notes
    assert not folder.is_symlink() and not (folder / tiny_gguf.name).is_symlink()
    assert (folder / tiny_gguf.name).read_bytes() == tiny_gguf.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted([".complete", "manifest.json", tiny_gguf.name])


def test_intact_cache_is_reused_silently(tmp_path: Path, tiny_gguf: Path, cache_dir: Path) -> None:
    bundle = forge_bundle(tmp_path / "b.edgepack", tiny_gguf)
    with open_model(bundle):
        pass
    model = cached_folder(cache_dir, bundle) / tiny_gguf.name
    inode = model.stat().st_ino
    notes: list[str] = []
    with open_model(bundle, warn=notes.append):
        pass
    assert model.stat().st_ino == inode and [n for n in notes if "carries no task" not in n] == []


# --- a signed bundle run without --key says so --------------------------------------------------

def test_signed_bundle_without_key_is_announced(tmp_path: Path, tiny_gguf: Path, keys: tuple[Path, Path]) -> None:
    bundle = forge_bundle(tmp_path / "b.edgepack", tiny_gguf, private_key=keys[0])
    unchecked = _cli("run", str(bundle), "--prompt", "hi", "--max-tokens", "2", cache=tmp_path / "cache")
    assert unchecked.returncode == 0, unchecked.stderr
    assert "signature was NOT checked" in unchecked.stderr and "--key" in unchecked.stderr
    checked = _cli("run", str(bundle), "--prompt", "hi", "--max-tokens", "2", "--key", str(keys[1]),
                   cache=tmp_path / "cache")
    assert checked.returncode == 0 and "NOT checked" not in checked.stderr


def test_unsigned_check_notice_reaches_every_entry_point(tmp_path: Path, tiny_gguf: Path, keys: tuple[Path, Path],
                                                         cache_dir: Path) -> None:
    from edgepack.export.gate.gate import _materialize
    from edgepack.runtime.server.serve import ServeConfig, make_server

    signed = forge_bundle(tmp_path / "s.edgepack", tiny_gguf, private_key=keys[0])
    plain = forge_bundle(tmp_path / "p.edgepack", tiny_gguf)
    for bundle, key, expect in ((signed, None, True), (signed, keys[1], False), (plain, None, False)):
        notes: list[str] = []
        with open_model(bundle, key=key, warn=notes.append):  # run and chat
            pass
        with _materialize(bundle, key, warn=notes.append):  # gate
            pass
        with make_server(bundle, ServeConfig(port=0, threads=1, public_key=key)) as server:  # serve
            server.load(warn=notes.append)
        flagged = [n for n in notes if "NOT checked" in n]
        assert len(flagged) == (3 if expect else 0), (bundle.name, key, notes)
        assert all(bundle.name in n and "--key" in n for n in flagged)
