"""Open a model for chatting: a verified bundle or a bare model file, behind one object.

``with open_model(path) as session: session.stream_chat(messages, max_tokens, temperature)``

For a ``.edgepack`` bundle: verify every byte (one streaming pass that also yields the
bundle's sha256), check up front that the model's own bytes fit in memory, extract once into a
cache folder keyed by that sha256 (``$EDGEPACK_CACHE/bundles/<sha>/``, default
``~/.cache/edgepack``), then plan the load from the extracted model file and load the
entrypoint through the backend registry. A bare artifact (a ``.gguf`` file, an ONNX folder) is
recognised by :func:`edgepack.formats.format_of`, planned and loaded directly. What is read from
the model file comes from its :class:`~edgepack.formats.Format`: ``trained_context`` and
``artifact_memory`` (a GGUF's header; an ONNX folder's scan, which also refuses external data
that leaves the folder), so a third-party format gets the same preflight as the built-ins.

Numbers inside a bundle are never trusted for a safety decision (issue #20, defect 6): a
signature only says who packed it, not that the packer was careful or honest. The context
length is the CLI's ``n_ctx``, else the manifest's ``runtime.context_length`` *capped* at the
context the model file itself was trained for (the format's ``trained_context``: GGUF
``<arch>.context_length``, ONNX ``config.json``; :data:`DEFAULT_BARE_CTX` when the file does not
say); the memory preflight recomputes weights + KV + allowance from the model file at that
context (the format's ``artifact_memory``; ``runtime.memory_estimate`` is ignored); threads are
capped at this machine's CPUs.
The only manifest runtime value still used as given is ``device`` (``cuda``/``metal`` asks
for GPU offload, which a CPU-only build ignores).

The extraction cache (defect 8) is re-checked on every use against the member hashes of the
bundle that was just verified (signature included, with a key): every file's sha256, opened
without following links, no symlinked folders, no file the bundle does not hold. Hashing costs
about what the bundle's own verification pass costs (a 100 MB GGUF: ~0.1-0.3 s); size and mtime
are not evidence, since an attacker who can write the file can restore both. A cache that
differs is announced and rebuilt from the verified bundle, never loaded. What this cannot
stop: a writer who swaps a file between the check and llama.cpp's open (the cache belongs to
the user; anyone who can write it can also edit the installed edgepack).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.constants import BUNDLE_SUFFIX, COMPLETE_MARKER, M_ENTRYPOINT, M_FORMAT, M_MODEL, M_RUNTIME
from edgepack.errors import ModelSourceError, UsageError
from edgepack.runtime.backends.base import Backend

if TYPE_CHECKING:
    from edgepack.formats import Format
    from edgepack.runtime.bundle.archive import BundleCheck

DEFAULT_BARE_CTX = 2048
Warn = Callable[[str], None]


def cache_root() -> Path:
    """``$EDGEPACK_CACHE`` or ``~/.cache/edgepack``."""
    env = os.environ.get("EDGEPACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgepack"


def unchecked_signature_note(bundle_name: str, key_id: str | None) -> str:
    """The notice for a signed bundle opened without ``--key`` (run, chat, serve, gate)."""
    who = f" (key {key_id[:16]}…)" if key_id else ""
    return (f"{bundle_name} is signed{who} but its signature was NOT checked: pass --key PUBLIC_KEY.pem to "
            f"require it, or check it with `edgepack verify {bundle_name} --key PUBLIC_KEY.pem`")


class ModelSession:
    """A loaded model plus where it came from; chat through :meth:`stream_chat`."""

    def __init__(self, backend: Backend, *, source: Path, manifest: dict[str, Any] | None,
                 memory_estimate: dict[str, Any] | None, notes: list[str] | None = None) -> None:
        self.backend = backend
        self.source = source
        self.manifest = manifest
        self.memory_estimate = memory_estimate
        """What the preflight compared, recomputed from the model file (never the manifest's)."""
        self.notes = list(notes or [])
        """Warnings raised while opening (signature not checked, context capped, cache rebuilt)."""

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


# --- the extraction cache -------------------------------------------------------------------------

def _file_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256) of a regular file, refusing a symlink in the last component."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        digest = hashlib.file_digest(fh, "sha256")
        return fh.tell(), digest.hexdigest()


def cache_problem(folder: Path, members: Mapping[str, tuple[int, str]]) -> str | None:
    """Why the extraction in ``folder`` is not exactly ``members`` ((size, sha256) by path,
    from a verification pass), or None when every byte matches."""
    if folder.is_symlink() or not folder.is_dir():
        return "the cache folder is not a plain folder"
    if not (folder / COMPLETE_MARKER).is_file():
        return "the extraction was not finished"
    expected = set(members) | {COMPLETE_MARKER}
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows links
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                return f"{(here / name).relative_to(folder).as_posix()} is a symbolic link"
        found.update((here / name).relative_to(folder).as_posix() for name in filenames)
    if found - expected:
        return f"{sorted(found - expected)[0]} is not in the bundle"
    if expected - found:
        return f"{sorted(expected - found)[0]} is missing"
    for name, (size, sha) in sorted(members.items()):
        try:
            actual = _file_sha256(folder / name)
        except OSError as exc:
            return f"{name} cannot be read as a plain file ({exc.strerror or exc})"
        if actual[0] != size:
            return f"{name} has {actual[0]} bytes, the bundle {size}"
        if actual[1] != sha:
            return f"{name}: sha256 differs from the bundle's"
    return None


def _remove(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def _extract_cached(bundle: Path, check: BundleCheck, key: Any, note: Warn) -> Path:
    """The verified extraction of ``bundle`` in the cache: reused only when every byte matches."""
    from edgepack.errors import BundleError
    from edgepack.runtime.bundle.archive import extract_bundle

    folder = cache_root() / "bundles" / check.sha256
    if folder.exists() or folder.is_symlink():
        problem = cache_problem(folder, check.members)
        if problem is None:
            return folder
        note(f"the cached extraction of {bundle.name} ({folder}) does not match the verified bundle "
             f"({problem}); re-extracting it from the bundle")
        _remove(folder)
    try:
        extract_bundle(bundle, folder, key=key, verified=check)  # hashes re-checked while writing
    except (BundleError, FileExistsError):
        # Another process may have finished the same extraction first; use it only if it matches.
        if cache_problem(folder, check.members) is not None:
            raise
    return folder


# --- the load plan: context, memory, threads ------------------------------------------------------

def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _model_facts(model_path: Path, fmt: Format,
                 note: Warn) -> tuple[int | None, Callable[[int], dict[str, Any]] | None]:
    """(trained context, estimate(ctx)) read from the model file itself by the format's parts.

    A format without ``artifact_memory`` loads without a memory preflight, and the session
    says so; one without ``trained_context`` is capped at :data:`DEFAULT_BARE_CTX`.
    """
    trained = _positive_int(fmt.part("trained_context")(model_path)) if fmt.provides("trained_context") else None
    if not fmt.provides("artifact_memory"):
        note(f"format {fmt.name!r} gives no memory estimate (no artifact_memory part): "
             f"{model_path.name} is loaded without a memory preflight")
        return trained, None
    estimate = fmt.part("artifact_memory")
    return trained, lambda ctx: estimate(model_path, ctx)


def choose_context(n_ctx: int | None, requested: Any, trained: int | None, note: Warn,
                   *, source: str = "the bundle") -> int:
    """The context to load with: the caller's ``n_ctx`` as given (the preflight checks it), else
    ``requested`` (a bundle's ``runtime.context_length``, untrusted) capped at the model file's
    ``trained`` context, else :data:`DEFAULT_BARE_CTX` capped the same way."""
    if n_ctx is not None:
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise UsageError(f"the context length must be a positive integer, got {n_ctx!r}")
        return n_ctx
    ceiling = trained or DEFAULT_BARE_CTX
    if requested is None:
        return min(DEFAULT_BARE_CTX, ceiling)
    asked = _positive_int(requested)
    if asked is None:
        note(f"{source} asks for context length {requested!r}, which is not a positive integer; "
             f"using {min(DEFAULT_BARE_CTX, ceiling)}")
        return min(DEFAULT_BARE_CTX, ceiling)
    if asked > ceiling:
        why = f"the model was trained for {trained}" if trained else \
            f"the model file does not say its trained context, so at most {DEFAULT_BARE_CTX}"
        note(f"{source} asks for context length {asked}; {why}; using {ceiling}")
        return ceiling
    return asked


def _artifact_bytes(check: BundleCheck) -> int:
    """Verified bytes of the model itself: the entrypoint, or its folder's files (ONNX)."""
    entry = check.manifest[M_ENTRYPOINT]
    folder = entry.rpartition("/")[0]
    if not folder:
        return check.members[entry][0]
    return sum(size for name, (size, _) in check.members.items() if name.startswith(folder + "/"))


def _preflight(estimate: dict[str, Any], what: str) -> None:
    from edgepack.runtime import memory

    available, source = memory.available_memory_bytes()
    memory.preflight(int(estimate["total_bytes"]), available, what=what, source=source,
                     basis=str(estimate.get("basis", "")))


@contextmanager
def open_model(path: Path, *, threads: int | None = None, n_ctx: int | None = None,
               key: Path | None = None, warn: Warn | None = None) -> Iterator[ModelSession]:
    """Verify (bundles), preflight memory, load; yield a :class:`ModelSession`; always close.

    ``key``: an Ed25519 public key (PEM); the bundle must be signed by it (bundles only).
    ``warn`` receives each warning as it happens (the CLI prints it); the session's ``notes``
    keep them too.
    """
    from edgepack.formats import format_of, get_format
    from edgepack.runtime.backends.base import default_threads, get_backend
    from edgepack.runtime.memory import RUNTIME_ALLOWANCE_BYTES

    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        if warn is not None:
            warn(message)

    path = Path(path)
    if not path.exists():
        raise ModelSourceError(f"model not found: {path}")
    manifest: dict[str, Any] | None = None
    runtime: dict[str, Any] = {}
    if key is not None and path.suffix != BUNDLE_SUFFIX:
        raise UsageError(f"{path.name} is not a bundle; only .edgepack bundles carry a signature to check",
                         hint="drop --key, or pack the model with `edgepack pack --sign KEY`")
    if path.suffix == BUNDLE_SUFFIX:
        from edgepack.runtime.bundle.archive import inspect_bundle
        from edgepack.runtime.bundle.signing import as_public_key

        public_key = as_public_key(key) if key is not None else None
        check = inspect_bundle(path, key=public_key)
        manifest = check.manifest
        if check.signature is not None and not check.signature.verified:
            note(unchecked_signature_note(path.name, check.signature.key_id))
        runtime = manifest.get(M_RUNTIME) if isinstance(manifest.get(M_RUNTIME), dict) else {}
        # Before extracting: the model's verified byte count alone must fit (KV comes below).
        model_bytes = _artifact_bytes(check)
        _preflight({"total_bytes": model_bytes + RUNTIME_ALLOWANCE_BYTES,
                    "basis": f"model files {model_bytes} B + runtime allowance (before the KV cache)"},
                   f"bundle {path.name}")
        folder = _extract_cached(path, check, public_key, note)
        model_path, fmt = folder / manifest[M_ENTRYPOINT], get_format(str(manifest[M_FORMAT]))
    else:
        fmt = format_of(path)
        model_path = path
    trained, estimator = _model_facts(model_path, fmt, note)
    ctx = choose_context(n_ctx, runtime.get("context_length"), trained, note)
    estimate = estimator(ctx) if estimator is not None else None
    if estimate is not None:
        _preflight(estimate, f"bundle {path.name}" if manifest is not None else path.name)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    want_threads = threads or _positive_int(runtime.get("threads")) or default_threads()
    threads_used = max(1, min(want_threads, default_threads()))
    # Offload every layer when the bundle targets a GPU; a CPU-only build ignores the request.
    gpu_layers = -1 if runtime.get("device") in ("cuda", "metal") else 0
    backend = get_backend(fmt.name).load(model_path, threads=threads_used, n_ctx=ctx, gpu_layers=gpu_layers)
    try:
        yield ModelSession(backend, source=path, manifest=manifest, memory_estimate=estimate, notes=notes)
    finally:
        backend.close()
