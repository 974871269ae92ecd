"""The artifact formats edgepack exports, runs, gates and packs: one object per format.

A :class:`Format` owns everything format-specific. Its declarative facts (file suffixes,
marker files, the quantizations a profile may allow, the export default, what pack and the
gate may assume about the file) are plain data; its behaviour (the runtime backend, the
exporter, the fidelity loader, the memory, context, quantization and traffic readers, the
template check, the bundle payload) is named by ``"module:attribute"`` strings that are
imported only when a stage asks for them, so ``edgepack --help`` imports no runtime library
and this core module imports no stage.

Every stage asks :func:`get_format` (or :func:`format_of` for a bare path); no stage keeps its
own table keyed by format name, and no stage compares a format's name with ``"gguf"``.
A third-party format registers the same way the built-ins do, either in code::

    from edgepack.formats import Format, register_format

    register_format(Format(name="mlc", quants=("q4f16",), suffixes=(".mlc",), backend="my_pkg.backend",
                           artifact_memory="my_pkg.memory:estimate", ...))

or, so that child processes (the gate measures in one) see it too, through the
``edgepack.formats`` entry-point group, whose entry points name a :class:`Format` object::

    [project.entry-points."edgepack.formats"]
    mlc = "my_pkg.edgepack_format:FORMAT"

What each stage needs (a part left empty makes that stage refuse the format, or, where the
stage can go on without it, say so in its output):

============  ==============================================================================
stage         parts
============  ==============================================================================
export        ``exporter`` (``check_quants`` optional: else names in ``quants``, case-blind)
fidelity      ``fidelity_model``
run, chat     ``backend``; ``artifact_memory`` (the memory preflight), ``trained_context``
gate          ``backend``, ``file_quant``, ``check_templates``; ``traffic`` (decode efficiency)
gate --search ``file_quant`` (for artifacts given by path)
pack          ``payload``
profiles fit  ``predict_memory``; ``artifact_memory`` (for an artifact given as it is)
distill train ``predict_memory`` (sizing an ``auto`` student for the profile's first choice)
============  ==============================================================================
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepack.errors import ArtifactPathError, ModelSourceError, UsageError

MIB = 1024 * 1024
ENTRY_POINT_GROUP = "edgepack.formats"
PARTS = ("backend", "exporter", "check_quants", "fidelity_model", "artifact_memory", "trained_context",
         "file_quant", "check_templates", "predict_memory", "traffic", "payload")
EXPORT_OPTIONS = ("imatrix", "options")


@dataclass(frozen=True)
class Format:
    """One artifact format; behaviour parts are ``"module:attribute"`` strings, resolved lazily."""

    name: str
    """Exact format name, as profiles, manifests and ``--format`` spell it (``gguf``)."""
    quants: tuple[str, ...]
    """Quantization names a profile's ``[deploy] choices`` may pair with this format, exactly spelled."""
    suffixes: tuple[str, ...] = ()
    """A bare file whose suffix is one of these (lower case, with the dot) is this format."""
    marker_files: tuple[str, ...] = ()
    """A folder that holds one of these files is this format."""
    runtime_base_bytes: int = 0
    """Memory the runtime library takes before any weights (code, allocator, scratch)."""
    default_quant: str = ""
    """What ``export`` makes when no quantization is asked for (empty: the first of :attr:`quants`)."""
    export_options: tuple[str, ...] = ()
    """Keyword options the exporter takes besides the common ones: ``imatrix`` (an importance
    matrix file to weight quantization), ``options`` (the format's own quantization options)."""
    exact_file_quant: bool = False
    """The quantization the file records is the export's name for it (GGUF file types), so pack
    refuses a file that holds another; False where the file holds a finer mix than the name
    (ONNX ``int4`` keeps an int8 head)."""
    gate_measures_unreadable: bool = False
    """The gate measures an artifact whose quantization cannot be read (``file_quant`` raises
    InvalidModelFile) and FAILs it with the loader's own reason (GGUF: llama.cpp's refusal is the
    report); False refuses it before any process loads it (ONNX: the scan is the containment check)."""
    card_usage: str = ""
    """A paragraph the bundle's README adds under "Use" (GGUF: how to build it in Ollama)."""
    backend: str = ""
    """Module whose import registers the runtime :class:`~edgepack.runtime.backends.base.Backend`."""
    exporter: str = ""
    """``(hf_dir, model, out_dir, quants, progress, **export_options) -> (artifacts, notes)``."""
    check_quants: str = ""
    """``(quants) -> quants``: the requested names checked and spelled canonically, the default when empty."""
    fidelity_model: str = ""
    """Class that loads an artifact for the fidelity report (``describe``, logits, tokenize, greedy)."""
    artifact_memory: str = ""
    """``(artifact_path, n_ctx) -> dict``: weights_bytes, kv_cache_bytes, runtime_allowance_bytes,
    total_bytes, n_ctx, basis (the runtime preflight; ``profiles fit`` on an artifact)."""
    trained_context: str = ""
    """``(artifact_path) -> int | None``: the context the model file says it was trained for."""
    file_quant: str = ""
    """``(artifact_path) -> str | None``: the quantization the artifact itself records (gate, search)."""
    check_templates: str = ""
    """``(artifact_path, *, strict) -> None``: refuse a hostile or unusable chat template before loading."""
    predict_memory: str = ""
    """``(model_shape, quant, n_ctx) -> estimate``: the memory of an artifact not yet exported
    (``profiles fit``, the student sizer)."""
    traffic: str = ""
    """``(artifact_path) -> dict``: bytes read from memory per decoded token (the gate's bandwidth check)."""
    payload: str = ""
    """``(artifact_path, name, profile) -> Payload``: the files a bundle carries for this artifact."""
    extra: dict[str, str] = field(default_factory=dict, hash=False)
    """Further named parts a third-party format needs (same ``module:attribute`` form); not hashed,
    so a Format stays usable as a dict key."""

    def __post_init__(self) -> None:
        unknown = [o for o in self.export_options if o not in EXPORT_OPTIONS]
        if not self.name or unknown or self.default_quant and self.default_quant not in self.quants:
            raise ValueError(f"format {self.name!r}: needs a name, export_options from {EXPORT_OPTIONS} "
                             f"(got {unknown}) and a default_quant among its quants")

    @property
    def label(self) -> str:
        """The name as prose writes it (``GGUF``)."""
        return self.name.upper()

    def provides(self, name: str) -> bool:
        """Whether the part ``name`` is set."""
        return bool(getattr(self, name, "") if name in PARTS else self.extra.get(name))

    def part(self, name: str) -> Any:
        """Import and return one behaviour part (a spec without ``:attr`` returns the module)."""
        if name not in PARTS and name not in self.extra:
            raise UsageError(f"{name!r} is not a format part; parts: {', '.join(PARTS)}")
        spec = getattr(self, name) if name in PARTS else self.extra[name]
        if not spec:
            raise UsageError(f"format {self.name!r} does not provide {name!r}",
                             hint=f"a format needs {name} set to 'module:attribute' to be used for this")
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        if not attr:
            return module
        try:
            return getattr(module, attr)
        except AttributeError:
            raise UsageError(f"format {self.name!r}: {name} names {spec}, and {module_name} has no {attr}",
                             hint="fix the format's registration") from None

    def matches(self, path: Path) -> bool:
        """Whether a bare path (file or folder) is an artifact of this format."""
        if path.is_dir():
            return any((path / marker).is_file() for marker in self.marker_files)
        return path.suffix.lower() in self.suffixes


BUILTIN_FORMATS: tuple[Format, ...] = (
    Format(
        name="gguf",
        quants=("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_XS"),
        suffixes=(".gguf",),
        runtime_base_bytes=58 * MIB,
        default_quant="Q4_K_M",
        export_options=("imatrix",),
        exact_file_quant=True,
        gate_measures_unreadable=True,
        card_usage="For Ollama, extract the bundle and run `ollama create <name> -f Modelfile` in that folder.",
        backend="edgepack.runtime.backends.llamacpp",
        exporter="edgepack.export.api:export_gguf_artifacts",
        check_quants="edgepack.export.api:check_gguf_quants",
        fidelity_model="edgepack.export.fidelity.models:GGUFArtifact",
        artifact_memory="edgepack.runtime.memory:gguf_artifact_memory",
        trained_context="edgepack.runtime.backends.llamacpp:trained_context",
        file_quant="edgepack.runtime.backends.llamacpp:file_quant",
        check_templates="edgepack.runtime.backends.llamacpp:check_templates",
        predict_memory="edgepack.memory:predict_gguf",
        traffic="edgepack.export.gate.bandwidth:gguf_traffic",
        payload="edgepack.export.pack.pack:gguf_payload",
    ),
    Format(
        name="onnx",
        quants=("fp32", "int8", "int4"),
        suffixes=(".onnx",),
        marker_files=("model.onnx",),
        runtime_base_bytes=76 * MIB,
        default_quant="int4",
        export_options=("options",),
        backend="edgepack.runtime.backends.onnxrt",
        exporter="edgepack.export.api:export_onnx_artifacts",
        check_quants="edgepack.export.api:check_onnx_quants",
        fidelity_model="edgepack.export.fidelity.models:OnnxArtifact",
        artifact_memory="edgepack.runtime.onnx_graph:estimate_onnx_memory",
        trained_context="edgepack.runtime.backends.onnxrt:trained_context",
        file_quant="edgepack.runtime.backends.onnxrt:file_quant",
        check_templates="edgepack.runtime.backends.onnxrt:check_templates",
        predict_memory="edgepack.memory:predict_onnx",
        traffic="edgepack.runtime.onnx_graph:onnx_traffic",
        payload="edgepack.export.pack.pack:onnx_payload",
    ),
)

_REGISTRY: dict[str, Format] = {f.name: f for f in BUILTIN_FORMATS}
_scanned_path: tuple[str, ...] | None = None  # sys.path when the entry points were last read
_scanning = False


def register_format(fmt: Format) -> Format:
    """Register ``fmt`` under its exact name; a different object under a taken name is an error."""
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format needs a Format, got {fmt!r}")
    existing = _REGISTRY.get(fmt.name)
    if existing is not None and existing != fmt:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def _load_entry_points() -> None:
    """Register the formats installed packages declare in the ``edgepack.formats`` group.

    Read again whenever ``sys.path`` has changed since the last read (a plugin folder added at
    run time), else once per process.
    """
    global _scanned_path, _scanning
    if _scanning or _scanned_path == tuple(sys.path):
        return
    _scanning = True  # an entry point's module may itself ask the registry while it loads
    try:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                fmt = entry.load()
            except Exception as exc:  # a broken plugin is named, not skipped
                raise UsageError(f"the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value} "
                                 f"failed to load: {type(exc).__name__}: {exc}",
                                 hint="fix or uninstall the package that declares it") from exc
            register_format(fmt)
        _scanned_path = tuple(sys.path)
    finally:
        _scanning = False


def all_formats() -> list[Format]:
    """Every registered format (built-ins and entry points), by name."""
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def format_names() -> list[str]:
    """The names of :func:`all_formats`."""
    return [f.name for f in all_formats()]


def find_format(name: str) -> Format | None:
    """The format registered as exactly ``name``, or None."""
    _load_entry_points()
    return _REGISTRY.get(name)


def get_format(name: str) -> Format:
    """The format registered as exactly ``name``; the error lists every registered name."""
    fmt = find_format(name)
    if fmt is None:
        raise UsageError(f"unknown artifact format {name!r}; registered: {', '.join(format_names())}",
                         hint="install or import the package that registers that format")
    return fmt


def format_of(path: Path) -> Format:
    """The format of a bare artifact path (a ``.gguf`` file, an ONNX folder, ...)."""
    path = Path(path)
    found = [fmt for fmt in all_formats() if fmt.matches(path)]
    if len(found) > 1:
        raise ModelSourceError(f"{path}: matches several artifact formats ({', '.join(f.name for f in found)})",
                               hint="two installed formats claim the same suffix or marker file")
    if found:
        return found[0]
    known = [s for f in all_formats() for s in f.suffixes] + \
            [f"a folder with {m}" for f in all_formats() for m in f.marker_files]
    raise ArtifactPathError(f"{path}: not a model artifact edgepack can run (expected {', '.join(known)})")
