"""Open a model for chatting: a verified bundle or a bare model file, behind one object.

``with open_model(path) as session: session.stream_chat(messages, max_tokens, temperature)``

For a ``.edgepack`` bundle: verify every byte (one streaming pass that also yields the
bundle's sha256), check memory up front (the manifest's model size + KV estimate against what
this process can get; refusal names both numbers), extract once into a cache folder keyed by
that sha256 (``$EDGEPACK_CACHE/bundles/<sha>/``, default ``~/.cache/edgepack``), then load the
entrypoint through the backend registry with the manifest's context length and threads.
A bare ``.gguf`` is header-checked, preflighted and loaded directly; a bare ONNX folder is
scanned (external data must stay inside it), preflighted and loaded the same way.

A cached extraction is reused when its completion marker exists and every file still has the
size and modification time recorded at extraction; otherwise it is rebuilt from the
(verified) bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgepack.atomic import is_complete, write_json
from edgepack.constants import (BUNDLE_SUFFIX, M_ENTRYPOINT, M_FILES, M_FORMAT, M_MODEL, M_RUNTIME)
from edgepack.errors import ModelSourceError
from edgepack.runtime.backends.base import Backend

DEFAULT_BARE_CTX = 2048
CACHE_STAMP = ".edgepack-extracted.json"


def cache_root() -> Path:
    """``$EDGEPACK_CACHE`` or ``~/.cache/edgepack``."""
    env = os.environ.get("EDGEPACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgepack"


class ModelSession:
    """A loaded model plus where it came from; chat through :meth:`stream_chat`."""

    def __init__(self, backend: Backend, *, source: Path, manifest: dict[str, Any] | None,
                 memory_estimate: dict[str, Any] | None) -> None:
        self.backend = backend
        self.source = source
        self.manifest = manifest
        self.memory_estimate = memory_estimate

    @property
    def name(self) -> str:
        return str(self.manifest[M_MODEL]) if self.manifest else self.source.stem

    def stream_chat(self, messages: Sequence[dict[str, Any]], max_tokens: int = 256,
                    temperature: float = 0.0, seed: int | None = None) -> Iterator[str]:
        """Answer the chat's last message, streaming text pieces (greedy at temperature 0)."""
        return self.backend.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def complete(self, messages: Sequence[dict[str, Any]], max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> str:
        """The whole answer as one string."""
        return "".join(self.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed))


def _cache_is_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    stamp = folder / CACHE_STAMP
    if not is_complete(folder) or not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        for entry in manifest[M_FILES]:
            st = (folder / entry["path"]).stat()
            if [st.st_size, st.st_mtime_ns] != recorded.get(entry["path"]) or st.st_size != entry["size"]:
                return False
    except (OSError, ValueError, TypeError):
        return False
    return True


def _extract_cached(bundle: Path, sha256: str, manifest: dict[str, Any], key: Any = None) -> Path:
    from edgepack.errors import BundleError
    from edgepack.runtime.bundle import extract_bundle

    folder = cache_root() / "bundles" / sha256
    if _cache_is_intact(folder, manifest):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    try:
        extract_bundle(bundle, folder, key=key)
    except (BundleError, FileExistsError):
        # Another process may have finished the same extraction first.
        if not _cache_is_intact(folder, manifest) and not is_complete(folder):
            raise
    stamp = {e["path"]: [(folder / e["path"]).stat().st_size, (folder / e["path"]).stat().st_mtime_ns]
             for e in manifest[M_FILES]}
    write_json(folder / CACHE_STAMP, stamp)
    return folder


def _bundle_estimate(manifest: dict[str, Any]) -> dict[str, Any]:
    runtime = manifest.get(M_RUNTIME) or {}
    memory = runtime.get("memory_estimate")
    if isinstance(memory, dict) and isinstance(memory.get("total_bytes"), int):
        return memory
    model_bytes = next(e["size"] for e in manifest[M_FILES] if e["path"] == manifest[M_ENTRYPOINT])
    from edgepack.runtime.memory import RUNTIME_ALLOWANCE_BYTES

    return {"total_bytes": model_bytes + RUNTIME_ALLOWANCE_BYTES,
            "basis": "model file size + runtime allowance (the manifest has no KV estimate)"}


def _onnx_train_ctx(folder: Path) -> int | None:
    """``max_position_embeddings`` from an ONNX folder's config.json, if it says."""
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@contextmanager
def open_model(path: Path, *, threads: int | None = None, n_ctx: int | None = None,
               key: Path | None = None) -> Iterator[ModelSession]:
    """Verify (bundles), preflight memory, load; yield a :class:`ModelSession`; always close.

    ``key``: an Ed25519 public key (PEM); the bundle must be signed by it (bundles only).
    """
    from edgepack.runtime.backends.base import default_threads, format_of, get_backend
    from edgepack.runtime.memory import available_memory_bytes, preflight

    path = Path(path)
    if not path.exists():
        raise ModelSourceError(f"model not found: {path}")
    manifest: dict[str, Any] | None = None
    if key is not None and path.suffix != BUNDLE_SUFFIX:
        from edgepack.errors import UsageError

        raise UsageError(f"{path.name} is not a bundle; only .edgepack bundles carry a signature to check",
                         hint="drop --key, or pack the model with `edgepack pack --sign KEY`")
    if path.suffix == BUNDLE_SUFFIX:
        from edgepack.runtime.bundle import inspect_bundle
        from edgepack.runtime.signing import as_public_key

        public_key = as_public_key(key) if key is not None else None
        check = inspect_bundle(path, key=public_key)
        manifest = check.manifest
        runtime = manifest.get(M_RUNTIME) or {}
        estimate = _bundle_estimate(manifest)
        available, source = available_memory_bytes()
        preflight(int(estimate["total_bytes"]), available, what=f"bundle {path.name}", source=source,
                  basis=str(estimate.get("basis", "")))
        folder = _extract_cached(path, check.sha256, manifest, public_key)
        model_path, fmt = folder / manifest[M_ENTRYPOINT], manifest[M_FORMAT]
        ctx = n_ctx or int(runtime.get("context_length") or DEFAULT_BARE_CTX)
        want_threads = threads or int(runtime.get("threads") or default_threads())
    else:
        fmt = format_of(path)
        model_path = path
        ctx = n_ctx or DEFAULT_BARE_CTX
        estimate = None
        if fmt == "gguf":
            from edgepack.runtime.gguf_header import read_gguf
            from edgepack.runtime.memory import estimate_gguf_memory

            header = read_gguf(path)
            train_ctx = header.arch_value("context_length")
            if n_ctx is None and isinstance(train_ctx, int) and 0 < train_ctx < ctx:
                ctx = train_ctx
            estimate = estimate_gguf_memory(header, ctx)
            available, source = available_memory_bytes()
            preflight(estimate["total_bytes"], available, what=path.name, source=source, basis=estimate["basis"])
        elif fmt == "onnx":
            from edgepack.runtime.onnx_graph import estimate_onnx_memory, model_file

            train_ctx = _onnx_train_ctx(model_file(path).parent)
            if n_ctx is None and train_ctx is not None and 0 < train_ctx < ctx:
                ctx = train_ctx
            estimate = estimate_onnx_memory(path, ctx)  # also refuses external data outside the folder
            available, source = available_memory_bytes()
            preflight(estimate["total_bytes"], available, what=path.name, source=source, basis=estimate["basis"])
        want_threads = threads or default_threads()
    threads_used = max(1, min(want_threads, default_threads()))
    # Offload every layer when the bundle targets a GPU; a CPU-only build ignores the request.
    device = (manifest.get(M_RUNTIME) or {}).get("device") if manifest else None
    gpu_layers = -1 if device in ("cuda", "metal") else 0
    backend = get_backend(fmt).load(model_path, threads=threads_used, n_ctx=ctx, gpu_layers=gpu_layers)
    try:
        yield ModelSession(backend, source=path, manifest=manifest, memory_estimate=estimate)
    finally:
        backend.close()
