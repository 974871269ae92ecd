"""A tiny GGUF serializer for fuzzing: it writes exactly the bytes it is told to, lies included.

``build(spec)`` returns the file bytes and a map of field positions (counts, string lengths,
array lengths, tensor dims/types/offsets), so a test can overwrite one field with a hostile
value (2^63, past-the-end offsets...) while the rest of the file stays well formed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# ggml type id -> (block size, bytes per block), the types the fuzzer lays out tensors with
TENSOR_TYPES = {0: (1, 4), 1: (1, 2), 8: (32, 34)}  # F32, F16, Q8_0


@dataclass
class Field:
    name: str
    pos: int
    fmt: str  # struct format of the field ("<Q", "<I")


@dataclass
class Spec:
    kvs: list[tuple[str, int, Any]]  # (key, value type, value); arrays: value = (element type, list)
    tensors: list[tuple[str, tuple[int, ...], int]]  # (name, shape, ggml type)
    version: int = 3
    alignment: int = 32
    fields: list[Field] = field(default_factory=list)


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: Any, out: bytearray, fields: list[Field], where: str) -> None:
    if vtype == STRING:
        fields.append(Field(f"{where} length", len(out), "<Q"))
        out += _str(value)
    elif vtype == ARRAY:
        etype, items = value
        fields.append(Field(f"{where} element type", len(out), "<I"))
        out += struct.pack("<I", etype)
        fields.append(Field(f"{where} count", len(out), "<Q"))
        out += struct.pack("<Q", len(items))
        for i, item in enumerate(items):
            _value(etype, item, out, fields, f"{where}[{i}]")
    else:
        out += struct.pack(FIXED[vtype], value)


def nbytes(shape: tuple[int, ...], ttype: int) -> int:
    block, size = TENSOR_TYPES[ttype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def build(spec: Spec) -> tuple[bytes, list[Field]]:
    fields: list[Field] = []
    out = bytearray(b"GGUF")
    fields.append(Field("version", len(out), "<I"))
    out += struct.pack("<I", spec.version)
    fields.append(Field("n_tensors", len(out), "<Q"))
    out += struct.pack("<Q", len(spec.tensors))
    fields.append(Field("n_kv", len(out), "<Q"))
    out += struct.pack("<Q", len(spec.kvs))
    for key, vtype, value in spec.kvs:
        fields.append(Field(f"key {key!r} length", len(out), "<Q"))
        out += _str(key)
        fields.append(Field(f"type of {key!r}", len(out), "<I"))
        out += struct.pack("<I", vtype)
        _value(vtype, value, out, fields, f"value of {key!r}")
    offset = 0
    for name, shape, ttype in spec.tensors:
        fields.append(Field(f"tensor {name!r} name length", len(out), "<Q"))
        out += _str(name)
        fields.append(Field(f"tensor {name!r} n_dims", len(out), "<I"))
        out += struct.pack("<I", len(shape))
        for i, d in enumerate(shape):
            fields.append(Field(f"tensor {name!r} dim {i}", len(out), "<Q"))
            out += struct.pack("<Q", d)
        fields.append(Field(f"tensor {name!r} type", len(out), "<I"))
        out += struct.pack("<I", ttype)
        fields.append(Field(f"tensor {name!r} offset", len(out), "<Q"))
        out += struct.pack("<Q", offset)
        offset += -(-nbytes(shape, ttype) // spec.alignment) * spec.alignment
    out += bytes(-len(out) % spec.alignment)
    out += bytes(offset)
    return bytes(out), fields
