"""A bounded reader for GGUF headers: checks a file before llama.cpp ever sees it.

llama.cpp's own parser has a history of integer overflows on crafted headers (CVE-2024-21802,
CVE-2024-23605), and gguf-py's ``GGUFReader`` allocates whatever an array length claims. This
reader walks the header with every count and length checked against the bytes that are
actually left in the file, so a hostile or truncated file costs at most one pass over its
header and raises :class:`~edgepack.errors.InvalidModelFile` naming what is wrong.

``read_gguf(path)`` returns a :class:`GGUFInfo` with the scalar/string metadata, a summary of
every array (its element type and length, with the elements kept only for keys asked for)
and the tensor table; :func:`tensor_data` reads one unquantized tensor's elements from the
span the table was checked to hold. It is the one GGUF reader of library code: the runtime
uses it for the chat template, the stop tokens and the memory estimate; ``edgepack pack`` for
the manifest; the exporter for the vocabulary (``tokenizer.ggml.*``), the importance matrix
and what each tensor was quantized to; the gate for the bytes read per token.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, ModelSourceError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is no longer read by llama.cpp
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
MAX_KEY_BYTES = 1 << 16  # keys are dotted identifiers; 64 KiB is generous

# GGUF value type id -> (name, struct format or None for variable-size types).
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY = 8, 9
# Smallest possible encodings, used to reject counts the rest of the file cannot hold.
_MIN_KV_BYTES = 8 + 1 + 4 + 1          # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, 1 dim, type, offset
# Arrays with at most this many elements are kept whole in ``metadata`` (e.g. languages).
SMALL_ARRAY = 64
TOKENS_KEY = "tokenizer.ggml.tokens"  # always read whole: its texts must be unique


@dataclass(frozen=True)
class ArrayInfo:
    """Summary of a metadata array: element type name and length (elements not kept)."""

    element_type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, with its byte span inside the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int


@dataclass
class GGUFInfo:
    """What a checked GGUF header says: metadata, tensors and where the data starts."""

    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    arrays: dict[str, list[Any]] = field(default_factory=dict)
    """Elements of the array keys that were asked for in ``read_gguf(keep_arrays=...)``."""

    def array(self, key: str) -> list[Any] | None:
        """The elements of array ``key`` (None when the key is absent).

        Arrays of up to :data:`SMALL_ARRAY` elements are always at hand; a longer one must have
        been named in ``read_gguf(keep_arrays=...)`` (ValueError otherwise, a caller's mistake).
        A key that holds a scalar raises InvalidModelFile.
        """
        if key in self.arrays:
            return self.arrays[key]
        value = self.metadata.get(key)
        if value is None or isinstance(value, list):
            return value
        if isinstance(value, ArrayInfo):
            raise ValueError(f"read_gguf(..., keep_arrays=({key!r},)) is needed to read {key}")
        raise InvalidModelFile(f"{self.path.name}: {key} holds a {type(value).__name__}, not an array")

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def arch_value(self, suffix: str) -> Any:
        """``<architecture>.<suffix>`` from the metadata, or None."""
        return self.metadata.get(f"{self.architecture}.{suffix}") if self.architecture else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def quant(self) -> str | None:
        """The file type name llama.cpp's quantizer records (``Q4_K_M``, ``F16``...)."""
        from gguf.constants import LlamaFileType

        ft = self.metadata.get("general.file_type")
        if not isinstance(ft, int):
            return None
        try:
            name = LlamaFileType(ft).name
        except ValueError:
            return None
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")


class _Cursor:
    """Reads little-endian values from a buffer, never past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str) -> InvalidModelFile:
        return InvalidModelFile(f"{self.path.name}: not a valid GGUF file: {what} (at byte {self.pos})")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise self.fail(f"{what} needs {n} bytes but only {self.left} remain (truncated?)")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes, more than the {limit} allowed")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8") from exc

    def skip_string(self, what: str) -> None:
        """Step over a string, still checking it is UTF-8 (as reading it would)."""
        n = self.unpack("<Q", f"{what} length")
        self.need(n, what)
        try:
            bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8") from exc
        self.pos += n


def read_gguf(path: Path, *, keep_arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Check ``path``'s GGUF header and tensor table against the file size; return them.

    Raises InvalidModelFile for a wrong magic, an unsupported version, counts or lengths the
    file cannot hold, unknown value or tensor types, more than 4 dimensions, a bad alignment,
    a tensor whose data lies outside the file, a string that is not UTF-8, or a token text
    listed twice in ``tokenizer.ggml.tokens`` (llama.cpp aborts the process on that).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModelFile(f"{path}: not a file")
    size = path.stat().st_size
    if size < 24:
        raise InvalidModelFile(f"{path.name}: not a valid GGUF file: only {size} bytes")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ModelSourceError(f"{path}: cannot be read ({exc.strerror or exc})", hint="check the path and its "
                               "permissions") from exc
    with fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: emptied since the size check
            raise InvalidModelFile(f"{path.name}: cannot be mapped ({exc}); was it truncated while being read?") \
                from exc
        with buf:
            return _parse(_Cursor(buf, path), keep_arrays)


def _parse(cur: _Cursor, keep_arrays: tuple[str, ...]) -> GGUFInfo:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"magic is {magic!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        detail = " (a big-endian file?)" if swapped in SUPPORTED_VERSIONS else ""
        raise cur.fail(f"version {version} is not one of {SUPPORTED_VERSIONS}{detail}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_kv * _MIN_KV_BYTES > cur.left:
        raise cur.fail(f"metadata count {n_kv} cannot fit in a {cur.size}-byte file")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.fail(f"tensor count {n_tensors} cannot fit in a {cur.size}-byte file")

    metadata: dict[str, Any] = {}
    arrays: dict[str, list[Any]] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", limit=MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.unpack("<I", f"type of {key!r}")
        if vtype == _ARRAY:
            metadata[key], kept = _read_array(cur, key, keep=key in keep_arrays)
            if kept is not None:
                arrays[key] = kept
        else:
            metadata[key] = _read_value(cur, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two up to 65536")

    tensors_raw = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > cur.size:
        raise cur.fail("file ends before the tensor data section")
    tensors = _check_tensors(cur, tensors_raw, alignment, data_offset)
    return GGUFInfo(path=cur.path, version=version, file_size=cur.size, metadata=metadata,
                    tensors=tensors, alignment=alignment, data_offset=data_offset, arrays=arrays)


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype not in VALUE_TYPES or vtype == _ARRAY:
        raise cur.fail(f"unknown value type {vtype} for {key!r}")
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    return cur.unpack(VALUE_TYPES[vtype][1] or "", f"value of {key!r}")


def _read_array(cur: _Cursor, key: str, *, keep: bool) -> tuple[Any, list[Any] | None]:
    etype = cur.unpack("<I", f"element type of {key!r}")
    if etype not in VALUE_TYPES or etype == _ARRAY:
        # llama.cpp itself rejects nested arrays; refusing them keeps the walk linear.
        raise cur.fail(f"array {key!r} has unsupported element type {etype}")
    count = cur.unpack("<Q", f"length of {key!r}")
    name, fmt = VALUE_TYPES[etype]
    min_size = 8 if etype == _STRING else struct.calcsize(fmt or "")
    if count * min_size > cur.left:
        raise cur.fail(f"array {key!r} claims {count} elements; the file cannot hold them")
    small = count <= SMALL_ARRAY
    if etype != _STRING:
        n = count * min_size
        values = list(struct.unpack_from(f"<{count}{(fmt or '')[1:]}", cur.buf, cur.pos)) if (keep or small) else None
        cur.pos += n
    elif keep or small or key == TOKENS_KEY:
        values = [cur.string(f"element of {key!r}") for _ in range(count)]
        if key == TOKENS_KEY and len(set(values)) != len(values):
            # llama.cpp maps token text -> id and aborts the whole process (SIGABRT) when two
            # ids share a text; found by bench/reliability's gguf-native trials.
            seen: dict[str, int] = {}
            for i, text in enumerate(values):
                if text in seen:
                    raise cur.fail(f"{key} has token {text!r} twice (ids {seen[text]} and {i})")
                seen[text] = i
        values = values if (keep or small) else None
    else:
        for _ in range(count):
            cur.skip_string(f"element of {key!r}")
        values = None
    summary: Any = values if small else ArrayInfo(name, count)
    return summary, (values if keep else None)


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name", limit=MAX_KEY_BYTES)
    n_dims = cur.unpack("<I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{GGML_MAX_DIMS})")
    shape = tuple(cur.unpack("<Q", f"dimension of {name!r}") for _ in range(n_dims))
    ttype = cur.unpack("<I", f"type of {name!r}")
    offset = cur.unpack("<Q", f"offset of {name!r}")
    return name, shape, ttype, offset


def _check_tensors(cur: _Cursor, raw: list[tuple[str, tuple[int, ...], int, int]],
                   alignment: int, data_offset: int) -> list[TensorInfo]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    data_size = cur.size - data_offset
    seen: set[str] = set()
    out: list[TensorInfo] = []
    for name, shape, ttype, offset in raw:
        if name in seen:
            raise cur.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as exc:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ttype}") from exc
        n_elements = 1
        for d in shape:
            if d == 0 or d >= 1 << 62:
                raise cur.fail(f"tensor {name!r} has dimension {d}")
            n_elements *= d
        if n_elements >= 1 << 62:
            raise cur.fail(f"tensor {name!r} has {n_elements} elements (overflow)")
        if shape[0] % block:
            raise cur.fail(f"tensor {name!r} row length {shape[0]} is not a multiple of {block} ({qtype.name})")
        nbytes = n_elements // block * type_size
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if offset + nbytes > data_size:
            raise cur.fail(f"tensor {name!r} data ({offset}+{nbytes} bytes) lies outside the file "
                           f"({data_size} data bytes; truncated?)")
        out.append(TensorInfo(name, shape, qtype.name, offset, nbytes))
    return out


# ggml types whose data is a plain little-endian array, and the numpy dtype that reads it.
PLAIN_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2",
                                "I32": "<i4", "I64": "<i8"}


def tensor_data(info: GGUFInfo, name: str) -> Any:
    """The elements of unquantized tensor ``name`` as a flat numpy array (``F32``, ``F16``...).

    Reads exactly the span :func:`read_gguf` checked against the file size; a quantized tensor
    (whose blocks need dequantizing) or a file that shrank since it was read raise
    InvalidModelFile.
    """
    import numpy as np

    tensor = next((t for t in info.tensors if t.name == name), None)
    if tensor is None:
        raise InvalidModelFile(f"{info.path.name} has no tensor {name!r}")
    dtype = PLAIN_DTYPES.get(tensor.ggml_type)
    if dtype is None:
        raise InvalidModelFile(f"{info.path.name}: tensor {name!r} is {tensor.ggml_type}; only "
                               f"{', '.join(PLAIN_DTYPES)} tensors are read as numbers")
    with open(info.path, "rb") as fh:
        fh.seek(info.data_offset + tensor.offset)
        raw = fh.read(tensor.nbytes)
    if len(raw) != tensor.nbytes:
        raise InvalidModelFile(f"{info.path.name}: tensor {name!r} ends past the end of the file "
                               "(was it truncated while being read?)")
    return np.frombuffer(raw, dtype=dtype)


def token_texts(info: GGUFInfo, ids: list[int]) -> dict[int, str]:
    """Texts of the given token ids, from ``tokenizer.ggml.tokens`` (read with keep_arrays)."""
    tokens = info.arrays.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("read_gguf(..., keep_arrays=('tokenizer.ggml.tokens',)) is needed")
    return {i: tokens[i] for i in ids if 0 <= i < len(tokens)}


def stop_token_ids(info: GGUFInfo) -> list[int]:
    """End-of-generation token ids the metadata names (EOS, EOT, EOM), in that order."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = info.metadata.get(key)
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)
    return ids
