"""A bounded reader of ``model.onnx``: graph facts and external-data containment, no weights.

onnx's own loader parses the whole protobuf (weights included) into memory, and onnxruntime
resolves external-data paths itself; neither is what the runtime wants before it trusts a
folder. :func:`scan_onnx` walks the protobuf wire format through an mmap with every length
checked against the bytes left (a truncated or hostile file raises
:class:`~edgepack.errors.InvalidModelFile`); weight bytes are skipped, never copied or touched,
so the check adds nothing to the measured process's peak RSS.

:func:`check_external_data` refuses external-data ``location`` values that are absolute,
contain ``..``, or resolve (through a symlink) outside the model folder — the path traversals
of CVE-2022-25882 / CVE-2024-27318 — before onnxruntime opens any file. The same scan gives
the quantization (``MatMulNBits`` ``bits``), the KV-cache shape and the bytes a decode step
reads (:func:`onnx_traffic`, for the gate's decode efficiency), like
:mod:`edgepack.gguf_header` does for GGUF.

Field numbers are those of ``onnx/onnx.proto`` (ModelProto.graph = 7, GraphProto.node = 1,
initializer = 5, input = 11, TensorProto.external_data = 13, data_location = 14, ...).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgepack.errors import InvalidModelFile, UnsafeModelError

MODEL_FILE = "model.onnx"
MAX_GRAPH_DEPTH = 32  # If/Loop subgraphs nest; a hostile file must not exhaust the stack

# TensorProto.DataType -> element size in bytes (4-bit types pack two per byte).
ONNX_ITEMSIZE: dict[int, float] = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
    17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5,
}
ONNX_FLOAT16 = 10


@dataclass
class OnnxTensor:
    """An initializer: name, shape, element type, size in bytes and external location."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    nbytes: int
    location: str | None = None  # external-data file, relative to the model folder


@dataclass
class OnnxGraphInfo:
    """What :func:`scan_onnx` found: initializers, nodes, graph inputs, external locations."""

    path: Path
    initializers: list[OnnxTensor] = field(default_factory=list)
    nodes: list[tuple[str, list[str], dict[str, int]]] = field(default_factory=list)
    """(op_type, inputs, integer attributes) of every node, subgraphs included."""
    inputs: dict[str, tuple[int, tuple[int | str, ...]]] = field(default_factory=dict)
    """Main-graph input name -> (element type, dims; a str for a symbolic dim)."""
    external_locations: list[str] = field(default_factory=list)

    @property
    def quant(self) -> str:
        """The scheme a profile names: ``int4``/``int8`` from the narrowest MatMulNBits ``bits``,
        else the float width. Like llama.cpp's Q4_K_M, an int4 export keeps a few tensors at 8
        bits (the head, ``down_proj``, ``v_proj``) and is still ``int4``; :attr:`quant_detail`
        lists every width present."""
        bits = self._matmul_bits()
        if bits:
            return f"int{bits[0]}"
        return "fp16" if any(t.data_type == ONNX_FLOAT16 for t in self.initializers) else "fp32"

    @property
    def quant_detail(self) -> str:
        """Every MatMulNBits width present, e.g. ``int4+int8`` (else the same as :attr:`quant`)."""
        bits = self._matmul_bits()
        return "+".join(f"int{b}" for b in bits) if bits else self.quant

    def _matmul_bits(self) -> list[int]:
        return sorted({a.get("bits", 4) for op, _, a in self.nodes if op == "MatMulNBits"})

    def past_inputs(self) -> dict[str, tuple[int, tuple[int | str, ...]]]:
        return {k: v for k, v in self.inputs.items() if k.startswith("past_key_values.")}


class _Wire:
    """Protobuf wire-format cursor over ``buf[start:end]``; every length is bounds-checked."""

    def __init__(self, buf: Any, start: int, end: int, path: Path) -> None:
        self.buf, self.pos, self.end, self.path = buf, start, end, path

    def fail(self, what: str) -> InvalidModelFile:
        return InvalidModelFile(f"{self.path.name}: not a valid ONNX model ({what} at byte {self.pos})")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise self.fail("truncated or overlong varint")
            b = self.buf[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def fields(self) -> Iterator[tuple[int, int, Any]]:
        """(field number, wire type, value): varint int, or (start, end) for length-delimited."""
        while self.pos < self.end:
            key = self.varint()
            num, wt = key >> 3, key & 7
            if wt == 0:
                yield num, wt, self.varint()
            elif wt == 1 or wt == 5:
                size = 8 if wt == 1 else 4
                if self.pos + size > self.end:
                    raise self.fail("truncated fixed-width field")
                self.pos += size
                yield num, wt, None
            elif wt == 2:
                n = self.varint()
                if n > self.end - self.pos:
                    raise self.fail(f"field {num} claims {n} bytes, {self.end - self.pos} left")
                start = self.pos
                self.pos += n
                yield num, wt, (start, start + n)
            else:
                raise self.fail(f"unsupported wire type {wt}")

    def sub(self, span: tuple[int, int]) -> _Wire:
        return _Wire(self.buf, span[0], span[1], self.path)

    def text(self, span: tuple[int, int]) -> str:
        return bytes(self.buf[span[0]:span[1]]).decode("utf-8", errors="replace")

    def packed_varints(self, span: tuple[int, int]) -> list[int]:
        w = self.sub(span)
        out = []
        while w.pos < w.end:
            out.append(w.varint())
        return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _tensor(w: _Wire) -> tuple[OnnxTensor, bool]:
    """(tensor, is_external) from a TensorProto."""
    dims: list[int] = []
    name, dtype, raw_len, location, ext_len, external = "", 0, None, None, None, False
    for num, wt, v in w.fields():
        if num == 1:
            dims += [_signed(x) for x in (w.packed_varints(v) if wt == 2 else [v])]
        elif num == 2 and wt == 0:
            dtype = v
        elif num == 8 and wt == 2:
            name = w.text(v)
        elif num == 9 and wt == 2:
            raw_len = v[1] - v[0]
        elif num == 14 and wt == 0:
            external = v == 1
        elif num == 13 and wt == 2:
            key = value = ""
            for n2, _, v2 in w.sub(v).fields():
                if n2 == 1:
                    key = w.text(v2)
                elif n2 == 2:
                    value = w.text(v2)
            if key == "location":
                location = value
            elif key == "length" and value.isdigit():
                ext_len = int(value)
    count = math.prod(d for d in dims if d > 0) if dims else 1
    nbytes = raw_len if raw_len is not None else math.ceil(count * ONNX_ITEMSIZE.get(dtype, 0))
    if external:
        if location is None:
            raise w.fail(f"external tensor {name!r} has no location")
        nbytes = ext_len if ext_len is not None else nbytes  # no length: the tensor's own size
    return OnnxTensor(name, tuple(dims), dtype, nbytes, location if external else None), external


def _value_info(w: _Wire) -> tuple[str, int, tuple[int | str, ...]]:
    name, elem, dims = "", 0, []
    for num, wt, v in w.fields():
        if num == 1 and wt == 2:
            name = w.text(v)
        elif num == 2 and wt == 2:
            for n2, _, v2 in w.sub(v).fields():  # TypeProto.tensor_type
                if n2 != 1 or v2 is None or isinstance(v2, int):
                    continue
                for n3, wt3, v3 in w.sub(v2).fields():
                    if n3 == 1 and wt3 == 0:
                        elem = v3
                    elif n3 == 2 and wt3 == 2:
                        for n4, _, v4 in w.sub(v3).fields():  # TensorShapeProto.dim
                            if n4 != 1 or isinstance(v4, int) or v4 is None:
                                continue
                            dim: int | str = "?"
                            for n5, wt5, v5 in w.sub(v4).fields():
                                dim = _signed(v5) if n5 == 1 and wt5 == 0 else (w.text(v5) if n5 == 2 else dim)
                            dims.append(dim)
    return name, elem, tuple(dims)


def _graph(w: _Wire, info: OnnxGraphInfo, depth: int, main: bool) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise w.fail(f"subgraphs nested deeper than {MAX_GRAPH_DEPTH}")
    for num, wt, v in w.fields():
        if wt != 2:
            continue
        if num == 1:
            _node(w.sub(v), info, depth)
        elif num == 5:
            tensor, external = _tensor(w.sub(v))
            info.initializers.append(tensor)
            if external:
                info.external_locations.append(tensor.location or "")
        elif num == 15:  # SparseTensorProto: values (1) and indices (2) are tensors
            for n2, wt2, v2 in w.sub(v).fields():
                if n2 in (1, 2) and wt2 == 2:
                    tensor, external = _tensor(w.sub(v2))
                    info.initializers.append(tensor)
                    if external:
                        info.external_locations.append(tensor.location or "")
        elif num == 11 and main:
            name, elem, dims = _value_info(w.sub(v))
            info.inputs[name] = (elem, dims)


def _node(w: _Wire, info: OnnxGraphInfo, depth: int) -> None:
    op, inputs, ints = "", [], {}
    for num, wt, v in w.fields():
        if num == 1 and wt == 2:
            inputs.append(w.text(v))
        elif num == 4 and wt == 2:
            op = w.text(v)
        elif num == 5 and wt == 2:
            _attribute(w.sub(v), info, depth, ints)
    info.nodes.append((op, inputs, ints))


def _attribute(w: _Wire, info: OnnxGraphInfo, depth: int, ints: dict[str, int]) -> None:
    name, value = "", None
    for num, wt, v in w.fields():
        if num == 1 and wt == 2:
            name = w.text(v)
        elif num == 3 and wt == 0:
            value = _signed(v)
        elif num in (5, 10) and wt == 2:  # t, tensors: constants may live in external data too
            tensor, external = _tensor(w.sub(v))
            if external:
                info.external_locations.append(tensor.location or "")
        elif num in (6, 11) and wt == 2:  # g, graphs
            _graph(w.sub(v), info, depth + 1, main=False)
        elif num in (22, 23) and wt == 2:  # sparse_tensor(s)
            for n2, wt2, v2 in w.sub(v).fields():
                if n2 in (1, 2) and wt2 == 2:
                    tensor, external = _tensor(w.sub(v2))
                    if external:
                        info.external_locations.append(tensor.location or "")
    if value is not None and name:
        ints[name] = value


def scan_onnx(model_path: Path) -> OnnxGraphInfo:
    """Walk ``model.onnx``'s graph, functions and training graphs without loading weights."""
    model_path = Path(model_path)
    info = OnnxGraphInfo(path=model_path)
    size = model_path.stat().st_size
    if size == 0:
        raise InvalidModelFile(f"{model_path.name} is empty")
    with open(model_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        w = _Wire(memoryview(mm), 0, size, model_path)
        try:
            saw_graph = False
            for num, wt, v in w.fields():
                if num == 7 and wt == 2:  # ModelProto.graph
                    _graph(w.sub(v), info, 0, main=True)
                    saw_graph = True
                elif num == 20 and wt == 2:  # training_info: initialization (1), algorithm (3)
                    for n2, wt2, v2 in w.sub(v).fields():
                        if n2 in (1, 3) and wt2 == 2:
                            _graph(w.sub(v2), info, 1, main=False)
                elif num == 25 and wt == 2:  # functions: their nodes (7)
                    for n2, wt2, v2 in w.sub(v).fields():
                        if n2 == 7 and wt2 == 2:
                            _node(w.sub(v2), info, 1)
        finally:
            w.buf.release()
    if not saw_graph:
        raise InvalidModelFile(f"{model_path.name}: not an ONNX model (no graph)")
    return info


# --- external data containment ------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def check_external_data(info: OnnxGraphInfo) -> list[Path]:
    """Refuse external-data locations that leave the model folder; returns the files used.

    Absolute paths (POSIX or Windows), any ``..`` component, and paths that resolve outside
    the folder (a symlink anywhere on the way) raise :class:`UnsafeModelError`; a missing
    or non-regular file raises :class:`InvalidModelFile`.
    """
    folder = info.path.parent
    hint = "a model's external data must be plain files inside its own folder; re-export the model"
    if not _inside(info.path, folder) or info.path.is_symlink():
        raise UnsafeModelError(f"{info.path} is a symlink; refusing to load it", hint=hint)
    files: dict[str, Path] = {}
    for loc in info.external_locations:
        if loc in files:
            continue
        shown = ascii(loc)
        if not loc or "\x00" in loc:
            raise UnsafeModelError(f"{info.path.name}: external data location {shown} is empty or has a NUL", hint=hint)
        posix, windows = PurePosixPath(loc.replace("\\", "/")), PureWindowsPath(loc)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
            raise UnsafeModelError(f"{info.path.name}: external data location {shown} is an absolute path",
                                   hint=hint)
        if ".." in posix.parts:
            raise UnsafeModelError(f"{info.path.name}: external data location {shown} contains '..'", hint=hint)
        target = folder / posix
        if not _inside(target, folder):
            raise UnsafeModelError(f"{info.path.name}: external data location {shown} resolves outside "
                                   f"{folder} (through a symlink)", hint=hint)
        if not target.is_file():
            raise InvalidModelFile(f"{info.path.name}: external data file {shown} is missing or not a file")
        files[loc] = target
    return list(files.values())


def model_file(path: Path) -> Path:
    """``model.onnx`` of an ONNX folder (or the file itself)."""
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise InvalidModelFile(f"{path}: no {MODEL_FILE} in the folder")
    return model


def inspect_onnx(path: Path) -> OnnxGraphInfo:
    """Scan and containment-check an ONNX folder (or its ``model.onnx``)."""
    info = scan_onnx(model_file(path))
    check_external_data(info)
    return info


def onnx_traffic(path: Path) -> dict[str, Any]:
    """Bytes read per decoded token: weights (+ one row of each lookup table) and KV per position.

    An initializer read only as the table of a ``Gather`` (the input embedding, rotary
    caches) costs one row per token, not the whole table; everything else is read in full.
    """
    info = inspect_onnx(path)
    consumers: dict[str, list[tuple[str, int]]] = {}
    for op, inputs, _ in info.nodes:
        for i, name in enumerate(inputs):
            consumers.setdefault(name, []).append((op, i))
    weights = 0
    lookups = []
    for t in info.initializers:
        uses = consumers.get(t.name, [])
        if uses and all(op == "Gather" and i == 0 for op, i in uses) and t.dims and t.dims[0] > 0:
            weights += t.nbytes // t.dims[0]
            lookups.append(t.name)
        else:
            weights += t.nbytes
    kv = 0
    for _, (elem, dims) in info.past_inputs().items():
        per_pos = math.prod(d for i, d in enumerate(dims) if i not in (0, 2) and isinstance(d, int))
        kv += int(per_pos * ONNX_ITEMSIZE.get(elem, 4))
    return {"weight_bytes_per_token": weights, "kv_bytes_per_position": kv,
            "weight_bytes_total": sum(t.nbytes for t in info.initializers),
            "basis": f"initializer bytes; {len(lookups)} lookup table(s) counted as one row "
                     f"({', '.join(lookups[:3])}); KV from the past_key_values input shapes"}


CONFIG_MAX_BYTES = 4 * 2**20  # an exporter's config.json is a few KB; a larger one is not read


def _positive(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _config_widths(folder: Path) -> tuple[int, int]:
    """(hidden_size, vocab_size) from the folder's ``config.json``; zeros when absent or unreadable."""
    import json

    path = folder / "config.json"
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            return 0, 0
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return _positive(cfg.get("hidden_size")), _positive(cfg.get("vocab_size"))
    except (OSError, ValueError, AttributeError):
        return 0, 0


def estimate_onnx_memory(path: Path, n_ctx: int) -> dict[str, Any]:
    """The onnx format's ``artifact_memory`` part: :func:`edgepack.memory.onnx_memory` of the
    folder's initializer bytes, the KV bytes per position its ``past_key_values`` inputs declare,
    and the widths its ``config.json`` gives (the one estimator and allowance; an estimate).

    The scan also refuses external data outside the folder (:func:`inspect_onnx`).
    """
    from edgepack.memory import onnx_memory

    traffic = onnx_traffic(path)
    hidden, vocab = _config_widths(model_file(path).parent)
    return onnx_memory(weights_bytes=traffic["weight_bytes_total"], n_ctx=n_ctx,
                       kv_bytes_per_position=traffic["kv_bytes_per_position"], hidden=hidden, vocab=vocab).as_dict()
