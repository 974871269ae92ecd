"""The artifact formats edgepack exports, runs, gates and packs: one object per format.

A :class:`Format` owns everything format-specific. Its declarative facts (file suffixes,
marker files, the quantizations a profile may allow, the runtime's base memory) are plain
data; its behaviour (the runtime backend, the exporter, the fidelity loader, the memory and
traffic readers, the bundle payload) is named by ``"module:attribute"`` strings that are
imported only when a stage asks for them, so ``edgepack --help`` imports no runtime library
and this core module imports no stage.

Every stage asks :func:`get_format` (or :func:`format_of` for a bare path); no stage keeps its
own table keyed by format name. A third-party format registers the same way the built-ins
do, either in code::

    from edgepack.formats import Format, register_format

    register_format(Format(name="mlc", quants=("q4f16",), suffixes=(".mlc",), backend="my_pkg.backend",
                           exporter="my_pkg.export:export", ...))

or, so that child processes (the gate measures in one) see it too, through the
``edgepack.formats`` entry-point group whose entry points name a :class:`Format` object.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepack.errors import ModelSourceError, UsageError

MIB = 1024 * 1024
ENTRY_POINT_GROUP = "edgepack.formats"
PARTS = ("backend", "exporter", "fidelity_model", "artifact_memory", "predict_memory", "traffic", "payload")


@dataclass(frozen=True)
class Format:
    """One artifact format; behaviour parts are ``"module:attribute"`` strings, resolved lazily."""

    name: str
    """Exact format name, as profiles, manifests and ``--format`` spell it (``gguf``)."""
    quants: tuple[str, ...]
    """Quantization names a profile's ``[deploy] allowed`` may pair with this format."""
    suffixes: tuple[str, ...] = ()
    """A bare file whose suffix is one of these (lower case, with the dot) is this format."""
    marker_files: tuple[str, ...] = ()
    """A folder that holds one of these files is this format."""
    runtime_base_bytes: int = 0
    """Memory the runtime library takes before any weights (code, allocator, scratch)."""
    backend: str = ""
    """Module whose import registers the runtime :class:`~edgepack.runtime.backends.base.Backend`."""
    exporter: str = ""
    """``(source_hf_dir, out_dir, quants, ...) -> list of artifact reports`` (export stage)."""
    fidelity_model: str = ""
    """Class that loads an artifact for the fidelity report (greedy text + logits)."""
    artifact_memory: str = ""
    """``(artifact_path, n_ctx) -> dict``: the memory estimate of an artifact file (runtime preflight, manifest)."""
    predict_memory: str = ""
    """``(model_shape, quant, n_ctx) -> estimate``: the memory of an artifact not yet exported (``profiles fit``)."""
    traffic: str = ""
    """``(artifact_path) -> dict``: bytes read from memory per decoded token (the gate's bandwidth check)."""
    payload: str = ""
    """``(artifact_path, name, profile) -> Payload``: the files a bundle carries for this artifact."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further named parts a third-party format needs (same ``module:attribute`` form)."""

    def part(self, name: str) -> Any:
        """Import and return one behaviour part (``backend`` returns the imported module)."""
        spec = getattr(self, name, None) if name in PARTS else self.extra.get(name)
        if not spec:
            raise UsageError(f"format {self.name!r} does not provide {name!r}",
                             hint=f"a format needs {name} set to 'module:attribute' to be used for this")
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module

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
        runtime_base_bytes=40 * MIB,
        backend="edgepack.runtime.backends.llamacpp",
        exporter="edgepack.export.api:_export_gguf",
        fidelity_model="edgepack.export.fidelity.models:GGUFArtifact",
        artifact_memory="edgepack.runtime.memory:gguf_artifact_memory",
        predict_memory="edgepack.memory:predict_gguf",
        traffic="edgepack.export.gate.bandwidth:gguf_traffic",
        payload="edgepack.export.pack.pack:_gguf_payload",
    ),
    Format(
        name="onnx",
        quants=("fp32", "int8", "int4"),
        suffixes=(".onnx",),
        marker_files=("model.onnx",),
        runtime_base_bytes=90 * MIB,
        backend="edgepack.runtime.backends.onnxrt",
        exporter="edgepack.export.api:_export_onnx",
        fidelity_model="edgepack.export.fidelity.models:OnnxArtifact",
        artifact_memory="edgepack.runtime.onnx_graph:estimate_onnx_memory",
        predict_memory="edgepack.memory:predict_onnx",
        traffic="edgepack.export.gate.bandwidth:_onnx_traffic",
        payload="edgepack.export.pack.pack:_onnx_payload",
    ),
)

_REGISTRY: dict[str, Format] = {f.name: f for f in BUILTIN_FORMATS}
_entry_points_loaded = False


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
    """Register the formats third-party packages declare in the ``edgepack.formats`` group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        fmt = entry.load()
        register_format(fmt)


def all_formats() -> list[Format]:
    """Every registered format (built-ins and entry points), by name."""
    _load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def format_names() -> list[str]:
    """The names of :func:`all_formats`."""
    return [f.name for f in all_formats()]


def get_format(name: str) -> Format:
    """The format registered as exactly ``name``; the error lists every registered name."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown artifact format {name!r}; registered: {', '.join(format_names())}",
                         hint="install or import the package that registers that format") from None


def format_of(path: Path) -> Format:
    """The format of a bare artifact path (a ``.gguf`` file, an ONNX folder, ...)."""
    path = Path(path)
    for fmt in all_formats():
        if fmt.matches(path):
            return fmt
    known = [s for f in all_formats() for s in f.suffixes] + \
            [f"a folder with {m}" for f in all_formats() for m in f.marker_files]
    raise ModelSourceError(f"{path}: not a model artifact edgepack can run (expected {', '.join(known)})")
