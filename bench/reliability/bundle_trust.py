"""Bundle trust: forged (validly signed) manifests and a tampered extraction cache.

Imported by run.py (category ``bundle-trust``); also runnable on its own::

    .venv/bin/python bench/reliability/bundle_trust.py

Three groups of hostile inputs, all on a real tiny-GGUF bundle re-signed with a test key so
that verification passes (issue #20 defects 6 and 8):

- **forged runtime numbers**: every numeric (and a few non-numeric) values of each manifest
  field the runtime reads or could be thought to read (``runtime.context_length``,
  ``memory_estimate.*``, ``threads``, ``n_gpu_layers``/``n_batch``/``n_ubatch``, ``device``).
  A failure is a load whose context exceeds what the model file allows, whose threads exceed
  this machine's CPUs, whose preflight compared anything but the estimate recomputed from the
  model file, that offloads to a GPU for a CPU bundle, that passes the preflight when the model
  file's own estimate does not fit, or any error other than a typed edgepack error. A clean
  ``BundleError`` (the manifest schema refusing the value) is a pass. A few of the worst cases
  also run ``edgepack run`` in a child whose peak RSS is watched (killed past the bound).
- **cache tampering**: bytes flipped at several offsets (mtime restored or not), truncation,
  the model or the whole cache folder replaced by a symlink, an extra file, a deleted file, a
  missing completion marker. A failure is an open that loads bytes other than the signed ones
  or does not announce the rebuild.
- **the unchecked signature**: a signed bundle opened without a key must be announced by
  run/chat (``open_model``), gate (``_materialize``) and serve (``ModelServer.load``); with
  the key, or unsigned, it must not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RSS_BOUND = 256 << 20  # `edgepack run` on the tiny bundle peaks near 90 MB; at 10^6 ctx it took 380 MB
HUGE = [2**21, 2**21 + 1, 2**31, 2**31 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 10**30]


def forged_runtimes() -> list[tuple[str, dict[str, Any]]]:
    """(label, runtime overrides): every value tried for every field (``...`` deletes the key)."""
    odd: list[Any] = [0, -1, -(2**31), 1.5, 1e6, float("inf"), "1000000", "", True, False, None, [], {}, [4096]]
    cases: list[tuple[str, dict[str, Any]]] = []
    for v in [1, 2, 255, 256, 511, 512, 513, 1024, 4096, 8192, 65536, 10**6, *HUGE, *odd, ...]:
        cases.append((f"context_length={v!r}", {"context_length": v}))
    for v in [1, 0, -1, 2**70, "1", None, 1.5, []]:
        cases.append((f"memory_estimate.total_bytes={v!r}", {"memory_estimate": {"total_bytes": v}}))
    cases += [("memory_estimate='tiny'", {"memory_estimate": "tiny"}), ("memory_estimate deleted", {"memory_estimate": ...}),
              ("memory_estimate.total_bytes deleted", {"memory_estimate": {}}),
              ("memory_estimate parts zero", {"memory_estimate": {"total_bytes": 1, "weights_bytes": 0,
                                                                  "kv_cache_bytes": 0, "n_ctx": 10**6}})]
    for v in [1, 2, 3, 64, 4096, 10**9, 2**63, 0, -1, "8", 2.5, True, None, ...]:
        cases.append((f"threads={v!r}", {"threads": v}))
    for field in ("n_gpu_layers", "gpu_layers", "n_batch", "n_ubatch", "batch_size", "n_seq_max", "n_parallel"):
        for v in (10**9, -1, 0, 2**63):
            cases.append((f"{field}={v!r}", {field: v}))
    for v in ("cpu", "tpu", "", None, 5, ["cuda"], ...):
        cases.append((f"device={v!r}", {"device": v}))
    cases += [("the issue's case: ctx 10^6 + total_bytes 1", {"context_length": 10**6, "memory_estimate": {"total_bytes": 1}}),
              ("ctx 2^21 + total_bytes 1 + threads 4096", {"context_length": 2**21, "memory_estimate": {"total_bytes": 1},
                                                          "threads": 4096}),
              ("runtime deleted entirely", {"context_length": ..., "threads": ..., "device": ..., "memory_estimate": ...})]
    return cases


@contextmanager
def _recording() -> Iterator[dict[str, list[Any]]]:
    """Record every llama.cpp load's arguments and every preflight's number (real calls still
    run, except a load past ``limit_ctx``, which is refused before llama.cpp allocates)."""
    from edgepack.runtime import memory
    from edgepack.runtime.backends.llamacpp import LlamaCppBackend

    seen: dict[str, list[Any]] = {"loads": [], "preflights": [], "limit_ctx": [512]}
    real_load, real_preflight = LlamaCppBackend.load.__func__, memory.preflight  # type: ignore[attr-defined]

    def load(cls: type, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> Any:
        seen["loads"].append({"n_ctx": n_ctx, "threads": threads, "gpu_layers": gpu_layers})
        if n_ctx > seen["limit_ctx"][0]:
            raise _Unsafe(f"llama.cpp asked for a {n_ctx}-token context")
        return real_load(cls, path, threads=threads, n_ctx=n_ctx, gpu_layers=gpu_layers)

    def preflight(required: int, available: int, **kw: Any) -> None:
        seen["preflights"].append(required)
        real_preflight(required, available, **kw)

    LlamaCppBackend.load = classmethod(load)  # type: ignore[assignment]
    memory.preflight = preflight
    try:
        yield seen
    finally:
        LlamaCppBackend.load = classmethod(real_load)  # type: ignore[assignment]
        memory.preflight = real_preflight


class _Unsafe(Exception):
    """A load the recorder stopped because it would have allocated past the model file's bounds."""


@contextmanager
def _available(nbytes: int | None) -> Iterator[None]:
    from edgepack.runtime import memory

    real = memory.available_memory_bytes
    if nbytes is not None:
        memory.available_memory_bytes = lambda: (nbytes, "bench")  # type: ignore[assignment]
    try:
        yield
    finally:
        memory.available_memory_bytes = real  # type: ignore[assignment]


def _cpus() -> int:
    from edgepack.runtime.backends.base import default_threads

    return default_threads()


def _forged_manifest_cases(model: Path, keys: tuple[Path, Path], work: Path, fail: Callable[[str], None],
                           details: list[str]) -> tuple[int, int]:
    from edgepack.errors import BudgetError, BundleError, EdgepackError, UsageError
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.memory import estimate_gguf_memory
    from edgepack.runtime.session import open_model
    from tests.reliability.bundle_forge import forge_bundle

    header = read_gguf(model)
    trained = int(header.arch_value("context_length"))
    honest_at = {c: estimate_gguf_memory(header, c)["total_bytes"] for c in (trained, 256)}
    tried = refused = too_small = 0
    ctx_used: dict[int, int] = {}
    for label, runtime in forged_runtimes():
        tried += 1
        bundle = forge_bundle(work / "forged.edgepack", model, runtime=runtime, private_key=keys[0])
        with _recording() as seen, _available(None):
            try:
                with open_model(bundle, key=keys[1]) as s:
                    try:
                        s.complete([{"role": "user", "content": "hi"}], max_tokens=2)
                    except UsageError:  # a context too small for the prompt: a clean exit 2
                        too_small += 1
            except BundleError:
                refused += 1
                continue
            except _Unsafe as exc:
                fail(f"{label}: {exc}")
                continue
            except EdgepackError as exc:
                fail(f"{label}: unexpected {type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - an untyped error is what is being counted
                fail(f"{label}: untyped {type(exc).__name__}: {exc}")
                continue
        (load,) = seen["loads"]
        ctx_used[load["n_ctx"]] = ctx_used.get(load["n_ctx"], 0) + 1
        if load["threads"] > _cpus() or load["threads"] < 1:
            fail(f"{label}: {load['threads']} threads on a {_cpus()}-CPU machine")
        device = runtime.get("device", "cpu")
        if load["gpu_layers"] != 0 and device not in ("cuda", "metal"):
            fail(f"{label}: GPU offload {load['gpu_layers']} for device {device!r}")
        expected = estimate_gguf_memory(header, load["n_ctx"])["total_bytes"]
        if seen["preflights"][-1] != expected:
            fail(f"{label}: the preflight compared {seen['preflights'][-1]} B, the model file says {expected} B")
    # Tight memory: the model file's own estimate does not fit; no manifest number may change that.
    for label, runtime in [("total_bytes 1", {"memory_estimate": {"total_bytes": 1}}),
                           ("ctx 10^6 + total_bytes 1", {"context_length": 10**6, "memory_estimate": {"total_bytes": 1}}),
                           ("ctx 1 + total_bytes 0", {"context_length": 1, "memory_estimate": {"total_bytes": 0}}),
                           ("estimate deleted", {"memory_estimate": ...})]:
        tried += 1
        bundle = forge_bundle(work / "forged.edgepack", model, runtime=runtime, private_key=keys[0])
        ctx = min(runtime.get("context_length", 256), trained) if isinstance(runtime.get("context_length"), int) else 256
        need = estimate_gguf_memory(header, ctx)["total_bytes"]
        with _recording() as seen, _available(need - 1):
            try:
                with open_model(bundle, key=keys[1]):
                    fail(f"tight memory, {label}: loaded with {need - 1} B available, the model file needs {need} B")
            except BudgetError:
                pass
            except Exception as exc:  # noqa: BLE001
                fail(f"tight memory, {label}: {type(exc).__name__}: {exc}")
    details.append(f"forged runtime fields: {tried} bundles, {refused} refused by the manifest schema, the rest "
                   f"loaded at contexts {dict(sorted(ctx_used.items()))} (model file: {trained}; honest estimate "
                   f"{honest_at[trained] >> 20} MB); {too_small} too small for the prompt: a clean UsageError")
    return tried, tried


def _peak_rss(cmd: list[str], env: dict[str, str], bound: int, timeout_s: float = 180.0) -> tuple[int, int, str]:
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak, end = psutil.Process(proc.pid), 0, time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < end:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        if peak > bound:
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, peak, err


def _child_rss_cases(model: Path, keys: tuple[Path, Path], work: Path, fail: Callable[[str], None],
                     details: list[str]) -> tuple[int, int]:
    from tests.reliability.bundle_forge import forge_bundle

    peaks = []
    cases = [("ctx 10^6 + total_bytes 1", {"context_length": 10**6, "memory_estimate": {"total_bytes": 1}}),
             ("ctx 2^21 + threads 4096", {"context_length": 2**21, "threads": 4096}),
             ("honest", {})]
    for label, runtime in cases:
        bundle = forge_bundle(work / "rss.edgepack", model, runtime=runtime, private_key=keys[0])
        env = dict(os.environ, EDGEPACK_CACHE=str(work / "rss-cache"), PYTHONPATH=str(ROOT))
        code, peak, err = _peak_rss([sys.executable, "-m", "edgepack", "run", str(bundle), "--prompt", "hi",
                                     "--max-tokens", "4", "--key", str(keys[1])], env, RSS_BOUND)
        peaks.append(f"{label} {peak >> 20} MB")
        if peak > RSS_BOUND or code != 0:
            fail(f"child `run` on {label}: exit {code}, peak RSS {peak >> 20} MB (bound {RSS_BOUND >> 20} MB) "
                 f"{err.strip()[-200:]}")
    details.append(f"`edgepack run` child peak RSS (bound {RSS_BOUND >> 20} MB): " + ", ".join(peaks))
    return len(cases), len(cases) - 1  # the honest bundle is the control


def _cache_cases(model: Path, keys: tuple[Path, Path], work: Path, fail: Callable[[str], None],
                 details: list[str]) -> tuple[int, int]:
    from edgepack.errors import EdgepackError
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.session import open_model
    from tests.reliability.bundle_forge import apply_tamper, cached_folder, flip_byte, forge_bundle, tamper_variants

    bundle = forge_bundle(work / "cached.edgepack", model, private_key=keys[0])
    original = model.read_bytes()
    header = read_gguf(model)
    variants = tamper_variants(len(original), header.data_offset)
    cache = work / "cache"
    os.environ["EDGEPACK_CACHE"] = str(cache)
    tried = 0
    for label, recipe in variants:
        tried += 1
        shutil.rmtree(cache, ignore_errors=True)
        scratch = work / "outside"
        shutil.rmtree(scratch, ignore_errors=True)
        with open_model(bundle, key=keys[1]):
            pass
        folder = cached_folder(cache, bundle)
        apply_tamper(folder, model.name, recipe, scratch)
        notes: list[str] = []
        try:
            with open_model(bundle, key=keys[1], warn=notes.append) as s:
                s.complete([{"role": "user", "content": "hi"}], max_tokens=2)
        except EdgepackError as exc:
            fail(f"cache, {label}: refused instead of rebuilt ({type(exc).__name__}: {exc})")
            continue
        except Exception as exc:  # noqa: BLE001
            fail(f"cache, {label}: untyped {type(exc).__name__}: {exc}")
            continue
        cached = folder / model.name
        if folder.is_symlink() or cached.is_symlink() or cached.read_bytes() != original:
            fail(f"cache, {label}: the loaded file is not the signed one")
        elif not any("re-extracting" in n for n in notes):
            fail(f"cache, {label}: rebuilt without saying so")
    # The exact path: `run --key` in a child, patched GGUF with its mtime restored.
    env = dict(os.environ, EDGEPACK_CACHE=str(work / "cli-cache"), PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "edgepack", "run", str(bundle), "--prompt", "hi", "--max-tokens", "2", "--key",
           str(keys[1])]
    for offset in (header.data_offset + 101, len(original) - 3):
        tried += 1
        shutil.rmtree(work / "cli-cache", ignore_errors=True)
        subprocess.run(cli, env=env, capture_output=True, timeout=180, check=False)
        cached = cached_folder(work / "cli-cache", bundle) / model.name
        flip_byte(cached, offset)
        second = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=180, check=False)
        if second.returncode != 0 or "re-extracting" not in second.stderr or cached.read_bytes() != original:
            fail(f"cache via `run --key`, byte {offset} patched, mtime restored: exit {second.returncode}, "
                 f"{'announced' if 're-extracting' in second.stderr else 'not announced'}, "
                 f"{'restored' if cached.read_bytes() == original else 'PATCHED FILE KEPT'}")
    details.append(f"cache tampering: {tried} variants ({len(variants)} in-process, 2 through `run --key`)")
    return tried, tried


def _signature_notice_cases(model: Path, keys: tuple[Path, Path], work: Path, fail: Callable[[str], None],
                            details: list[str]) -> tuple[int, int]:
    from edgepack.export.gate.gate import _materialize
    from edgepack.runtime.server.serve import ServeConfig, make_server
    from edgepack.runtime.session import open_model
    from tests.reliability.bundle_forge import forge_bundle

    signed = forge_bundle(work / "signed.edgepack", model, private_key=keys[0])
    plain = forge_bundle(work / "plain.edgepack", model)
    tried = 0
    for bundle, key, expect in ((signed, None, True), (signed, keys[1], False), (plain, None, False)):
        for entry in ("run/chat", "gate", "serve"):
            tried += 1
            notes: list[str] = []
            if entry == "run/chat":
                with open_model(bundle, key=key, warn=notes.append):
                    pass
            elif entry == "gate":
                with _materialize(bundle, key, warn=notes.append):
                    pass
            else:
                with make_server(bundle, ServeConfig(port=0, threads=1, public_key=key)) as server:
                    server.load(warn=notes.append)
            said = any("NOT checked" in n and "--key" in n for n in notes)
            if said != expect:
                fail(f"signature notice, {entry}, {bundle.name} {'with' if key else 'without'} key: "
                     f"{'missing' if expect else 'given wrongly'}")
    details.append(f"unchecked-signature notice: {tried} cases (3 entry points x signed/with key/unsigned)")
    return tried, tried // 3  # signed without a key is the fault; with a key and unsigned are controls


def bundle_trust_category(work: Path) -> dict[str, Any]:
    """Run every bundle-trust case under ``work``; the counts for the reliability report."""
    sys.path.insert(0, str(ROOT))
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from tests.reliability.bundle_forge import make_keys
    from tests.tiny import build_tiny_llama

    work = Path(work) / "bundle-trust"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    saved_cache = os.environ.get("EDGEPACK_CACHE")
    os.environ["EDGEPACK_CACHE"] = str(work / "cache")
    model = convert_hf_to_gguf(build_tiny_llama(work / "llama"), work / "tiny-F16.gguf", outtype="F16")
    keys = make_keys(work / "keys")
    failures: list[str] = []
    details: list[str] = []
    tried = faults = 0
    t0 = time.monotonic()
    try:
        for group in (_forged_manifest_cases, _child_rss_cases, _cache_cases, _signature_notice_cases):
            os.environ["EDGEPACK_CACHE"] = str(work / "cache")
            n, hostile = group(model, keys, work, failures.append, details)
            tried, faults = tried + n, faults + hostile
    finally:
        if saved_cache is None:
            os.environ.pop("EDGEPACK_CACHE", None)
        else:
            os.environ["EDGEPACK_CACHE"] = saved_cache
    details.append(f"{time.monotonic() - t0:.0f} s in all")
    return {"tried": tried, "faults": faults, "failures": len(failures), "failure_list": failures, "details": details}


if __name__ == "__main__":
    print(json.dumps(bundle_trust_category(Path(tempfile.mkdtemp())), indent=1))
