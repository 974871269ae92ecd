"""Open a model for chatting: a verified bundle or a bare model file, behind one object.

``with open_model(path) as session:``
``    messages, decoding, schema = session.apply_task([{"role": "user", "content": text}])``
``    for piece in session.answer(messages, decoding, schema): ...``

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

The task (issue #15): a bundle's manifest carries the task it was gated under
(:func:`~edgepack.runtime.bundle.manifest.manifest_task`); a bare model file has none unless the
caller gives one. ``run``, ``chat`` and ``serve`` ask :meth:`ModelSession.apply_task` for the
messages, decoding and JSON schema of each request: the task's system prompt unless the
request has its own system turn (or the caller passes ``system``), the task's decoding unless
an explicit value overrides it, and for a ``json`` task the schema to constrain decoding with
where the backend can (``Backend.constrains_json``; elsewhere the session says once that the
answers are unconstrained). ``no_task=True`` gives the raw model. :meth:`ModelSession.answer`
decodes with all of it and ends the text before the first stop string, as the gate does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.constants import BUNDLE_SUFFIX, COMPLETE_MARKER, M_ENTRYPOINT, M_FORMAT, M_MODEL, M_RUNTIME
from edgepack.errors import ArtifactPathError, ModelSourceError, UsageError
from edgepack.runtime.backends.base import Backend
from edgepack.task import Decoding, Task

if TYPE_CHECKING:
    from edgepack.formats import Format
    from edgepack.runtime.bundle.archive import BundleCheck

DEFAULT_BARE_CTX = 2048
Warn = Callable[[str], None]
Messages = list[dict[str, Any]]


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
    """A loaded model plus where it came from and the task it answers; see the module docstring."""

    def __init__(self, backend: Backend, *, source: Path, manifest: dict[str, Any] | None,
                 memory_estimate: dict[str, Any] | None, notes: list[str] | None = None,
                 task: Task | None = None) -> None:
        self.backend = backend
        self.source = source
        self.manifest = manifest
        self.memory_estimate = memory_estimate
        """What the preflight compared, recomputed from the model file (never the manifest's)."""
        self.notes = list(notes or [])
        """Warnings raised while opening (signature not checked, context capped, cache rebuilt)."""
        self._task = task

    @property
    def name(self) -> str:
        return str(self.manifest[M_MODEL]) if self.manifest else self.source.stem

    @property
    def task(self) -> Task | None:
        """The task applied by default (the bundle's, or the one given); None: the raw model."""
        return self._task

    def apply_task(self, messages: Sequence[dict[str, Any]], *, system: str | None = None,
                   max_tokens: int | None = None, temperature: float | None = None,
                   repeat_penalty: float | None = None,
                   default_max_tokens: int | None = None) -> tuple[Messages, Decoding, dict[str, Any] | None]:
        """(messages, decoding, JSON schema) for one request under this session's task.

        See :func:`apply_task`; the schema is given only where the backend constrains JSON.
        """
        return apply_task(self._task, messages, system=system, max_tokens=max_tokens, temperature=temperature,
                          repeat_penalty=repeat_penalty, default_max_tokens=default_max_tokens,
                          constrains_json=self.backend.constrains_json)

    def answer(self, messages: Sequence[dict[str, Any]], decoding: Decoding,
               json_schema: dict[str, Any] | None = None, seed: int | None = None) -> Iterator[str]:
        """Stream the answer to ``messages`` decoded with ``decoding`` (and under ``json_schema``),
        ending before the first of its stop strings."""
        pieces = self.backend.stream_chat(messages, max_tokens=decoding.max_tokens,
                                          temperature=decoding.temperature, seed=seed,
                                          repeat_penalty=decoding.repeat_penalty, json_schema=json_schema)
        return cut_at_stop(pieces, decoding.stop)

    def stream_chat(self, messages: Sequence[dict[str, Any]], max_tokens: int = 256,
                    temperature: float = 0.0, seed: int | None = None) -> Iterator[str]:
        """Answer the chat's last message as given, streaming text pieces (greedy at temperature 0):
        the raw model, no task applied."""
        return self.backend.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def complete(self, messages: Sequence[dict[str, Any]], max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None) -> str:
        """The whole raw answer as one string (:meth:`stream_chat`)."""
        return "".join(self.stream_chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed))


# --- the task, per request --------------------------------------------------------------------

def apply_task(task: Task | None, messages: Sequence[dict[str, Any]], *, system: str | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               repeat_penalty: float | None = None, default_max_tokens: int | None = None,
               constrains_json: bool = False) -> tuple[Messages, Decoding, dict[str, Any] | None]:
    """The messages, decoding and JSON schema of one request. Pure.

    System turn: the request's own wins, then ``system``, then the task's prompt. Decoding: the
    task's, each explicit argument overriding its field; without a task, :class:`Decoding`'s
    defaults with ``max_tokens`` or ``default_max_tokens``. Schema: a ``json`` task's, when the
    backend ``constrains_json``; else None.
    """
    out = [dict(m) for m in messages]
    if not (out and out[0].get("role") == "system"):
        prompt = system if system is not None else (task.system_prompt if task is not None else None)
        if prompt is not None:
            out.insert(0, {"role": "system", "content": prompt})
    base = task.decoding if task is not None else Decoding()
    if task is None and default_max_tokens is not None:
        base = replace(base, max_tokens=default_max_tokens)
    given = {"max_tokens": max_tokens, "temperature": temperature, "repeat_penalty": repeat_penalty}
    decoding = replace(base, **{k: v for k, v in given.items() if v is not None})
    _check_decoding(decoding)
    schema = getattr(task.answer, "schema", None) if task is not None and task.kind == "json" else None
    return out, decoding, (schema if constrains_json else None)


def _check_decoding(decoding: Decoding) -> None:
    problems = []
    if isinstance(decoding.max_tokens, bool) or not isinstance(decoding.max_tokens, int) or decoding.max_tokens < 1:
        problems.append(f"max tokens must be a positive integer, got {decoding.max_tokens!r}")
    if not decoding.temperature >= 0:
        problems.append(f"temperature must be >= 0, got {decoding.temperature!r}")
    if not decoding.repeat_penalty > 0:
        problems.append(f"repeat penalty must be > 0, got {decoding.repeat_penalty!r}")
    if problems:
        raise UsageError("; ".join(problems))


def cut_at_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[str]:
    """Stream ``pieces`` up to the first stop string (excluded), then close the source.

    Text that could be the start of a stop string is held back until it is known not to be,
    so nothing after the cut is ever sent; the result equals :meth:`Decoding.cut` on the whole.
    """
    if not stop:
        yield from pieces
        return
    held = ""
    try:
        for piece in pieces:
            held += piece
            ends = [i for i in (held.find(s) for s in stop) if i >= 0]
            if ends:
                if held[:min(ends)]:
                    yield held[:min(ends)]
                return
            keep = _stop_prefix(held, stop)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
        if held:
            yield held
    finally:
        getattr(pieces, "close", lambda: None)()  # stops the backend's generation now


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    longest = min(len(text), max(len(s) for s in stop) - 1)
    for k in range(longest, 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0


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
               key: Path | None = None, warn: Warn | None = None, task: Task | None = None,
               no_task: bool = False) -> Iterator[ModelSession]:
    """Verify (bundles), preflight memory, load; yield a :class:`ModelSession`; always close.

    ``key``: an Ed25519 public key (PEM); the bundle must be signed by it (bundles only).
    ``warn`` receives each warning as it happens (the CLI prints it); the session's ``notes``
    keep them too. The session's task is ``task`` when given, else the bundle's (a bare model
    file has none); ``no_task`` gives the raw model.
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
        raise ArtifactPathError(f"model not found: {path}")
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
    chosen = None if no_task else _session_task(path, manifest, task, note)
    backend = get_backend(fmt.name).load(model_path, threads=threads_used, n_ctx=ctx, gpu_layers=gpu_layers)
    try:
        if chosen is not None and chosen.kind == "json" and not backend.constrains_json:
            note(f"the {backend.format} backend cannot constrain decoding to the task's JSON schema: "
                 "answers are unconstrained (the gate judged them the same way)")
        yield ModelSession(backend, source=path, manifest=manifest, memory_estimate=estimate, notes=notes,
                           task=chosen)
    finally:
        backend.close()


def _session_task(path: Path, manifest: dict[str, Any] | None, given: Task | None, note: Warn) -> Task | None:
    """``given``, else the bundle's task; a bundle packed without one is announced."""
    if given is not None or manifest is None:
        return given
    from edgepack.runtime.bundle.manifest import manifest_task

    task = manifest_task(manifest, path.name)
    if task is None:
        note(f"{path.name} carries no task (packed before bundles recorded one): answers get no task "
             "system prompt and default decoding; pass --system to give one")
    return task
