"""Fuzzing the GGUF header reader (edgepack/gguf_header.py) with hypothesis.

Three sources of input: well-formed headers generated from a spec (they must be read back
exactly, and agree with gguf-py's reader); the same headers with one field overwritten by a
hostile value (huge counts and lengths, offsets past the end, wrong types, n_dims outside
1..4); and byte-level damage (flips, truncation, insertion, deletion) of a file written by
gguf-py's own GGUFWriter. Every input must be read or refused with InvalidModelFile within
1 s and bounded memory; an accepted file must satisfy the reader's contract (every tensor's
data inside the file, aligned, 1..4 dims), since the runtime hands accepted files to llama.cpp.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from edgepack.errors import InvalidModelFile
from edgepack.gguf_header import GGML_MAX_DIMS, GGUFInfo, read_gguf
from tests.reliability.conftest import FUZZ, bounded
from tests.reliability.gguf_bytes import ARRAY, FIXED, STRING, TENSOR_TYPES, Spec, build

pytestmark = pytest.mark.fuzz

HOSTILE_U64 = [0, 1, 2, 3, 7, 31, 32, 33, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
               1 << 40, 1 << 62, (1 << 62) + 1, 1 << 63, (1 << 64) - 1]
HOSTILE_U32 = [0, 1, 2, 4, 5, 7, 8, 9, 12, 13, 40, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]

keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def fixed_value(vtype: int) -> st.SearchStrategy:
    fmt = FIXED[vtype]
    if fmt == "<?":
        return st.booleans()
    if fmt in ("<f", "<d"):
        return st.floats(width=32 if fmt == "<f" else 64, allow_nan=False)
    bits = struct.calcsize(fmt) * 8
    signed = fmt[1].islower()
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else st.integers(0, (1 << bits) - 1)


@st.composite
def kv(draw: st.DrawFn) -> tuple[int, object]:
    vtype = draw(st.sampled_from([*FIXED, STRING, ARRAY]))
    if vtype == STRING:
        return vtype, draw(texts)
    if vtype == ARRAY:
        etype = draw(st.sampled_from([*FIXED, STRING]))
        items = draw(st.lists(texts if etype == STRING else fixed_value(etype), max_size=80))
        return vtype, (etype, items)
    return vtype, draw(fixed_value(vtype))


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    pairs = draw(st.dictionaries(keys.filter(lambda k: k != "general.alignment"), kv(), max_size=8))
    kvs = [("general.architecture", STRING, draw(st.sampled_from(["llama", "qwen2", "x"])))]
    kvs += [(k, t, v) for k, (t, v) in pairs.items() if k != "general.architecture"]
    alignment = draw(st.sampled_from([32, 32, 64, 1, 256]))
    if alignment != 32 or draw(st.booleans()):
        kvs.append(("general.alignment", 4, alignment))
    names = draw(st.lists(st.text("abcdefgh.", min_size=1, max_size=12), max_size=4, unique=True))
    tensors = []
    for name in names:
        ttype = draw(st.sampled_from(sorted(TENSOR_TYPES)))
        block = TENSOR_TYPES[ttype][0]
        dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=GGML_MAX_DIMS))
        tensors.append((name, (dims[0] * block, *dims[1:]), ttype))
    return Spec(kvs=kvs, tensors=tensors, version=draw(st.sampled_from([2, 3])), alignment=alignment)


def check_contract(info: GGUFInfo) -> None:
    """What an accepted file promises the runtime before llama.cpp reads it."""
    assert info.data_offset % info.alignment == 0 and info.data_offset <= info.file_size
    for t in info.tensors:
        assert 1 <= len(t.shape) <= GGML_MAX_DIMS and all(d > 0 for d in t.shape)
        assert t.offset % info.alignment == 0
        assert info.data_offset + t.offset + t.nbytes <= info.file_size, t


def write(tmp: Path, data: bytes) -> Path:
    path = tmp / "f.gguf"
    path.write_bytes(data)
    return path


def _equal(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@FUZZ
@given(spec=specs())
def test_generated_headers_read_back_exactly(spec: Spec, tmp_path_factory: pytest.TempPathFactory) -> None:
    import gguf

    data, _ = build(spec)
    path = write(tmp_path_factory.mktemp("g"), data)
    info = bounded("gguf_header (well-formed)", read_gguf, path, allowed=InvalidModelFile, size=len(data),
                   keep_arrays=tuple(k for k, t, _ in spec.kvs if t == ARRAY))
    assert isinstance(info, GGUFInfo), info
    check_contract(info)
    for key, vtype, value in spec.kvs:
        got = info.arrays[key] if vtype == ARRAY else info.metadata[key]
        want = value[1] if vtype == ARRAY else value
        if vtype == 6 or (vtype == ARRAY and value[0] == 6):  # FLOAT32 is stored rounded
            want = list(np.array(want, dtype=np.float32).tolist()) if vtype == ARRAY else float(np.float32(want))
        assert _equal(got, want), key
    assert [(t.name, t.shape) for t in info.tensors] == [(n, s) for n, s, _ in spec.tensors]
    # gguf-py, the reference reader, agrees on the layout.
    ref = gguf.GGUFReader(path, "r")
    assert ref.data_offset == info.data_offset
    assert [t.name for t in ref.tensors] == [t.name for t in info.tensors]


@FUZZ
@given(spec=specs(), data=st.data())
def test_one_hostile_field_is_refused_or_harmless(spec: Spec, data: st.DataObject,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    raw, fields = build(spec)
    target = data.draw(st.sampled_from(fields), label="field")
    pool = HOSTILE_U64 if target.fmt == "<Q" else HOSTILE_U32
    value = data.draw(st.one_of(st.sampled_from(pool), st.integers(0, (1 << (8 * struct.calcsize(target.fmt))) - 1)),
                      label="value")
    buf = bytearray(raw)
    struct.pack_into(target.fmt, buf, target.pos, value)
    path = write(tmp_path_factory.mktemp("h"), bytes(buf))
    result = bounded("gguf_header (hostile field)", read_gguf, path, allowed=InvalidModelFile, size=len(buf))
    if isinstance(result, GGUFInfo):
        check_contract(result)


def gguf_py_file(path: Path) -> bytes:
    """A small real-looking GGUF written by gguf-py: tokens array, chat template, three tensors."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "ab", "<|im_end|>"])
    w.add_token_types([3, 3, 1, 1, 1, 3])
    w.add_eos_token_id(5)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.arange(6 * 32, dtype=np.float32).reshape(6, 32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def reference_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = gguf_py_file(tmp_path_factory.mktemp("ref") / "ref.gguf")
    return data


ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 20), st.sampled_from(HOSTILE_U64)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20), st.sampled_from(HOSTILE_U32)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in mutations:
        if not buf:
            break
        pos %= len(buf)
        if op == "flip":
            buf[pos] ^= int(arg)  # type: ignore[call-overload]
        elif op in ("u64", "u32"):
            fmt = "<Q" if op == "u64" else "<I"
            pos = min(pos, len(buf) - struct.calcsize(fmt))
            if pos >= 0:
                struct.pack_into(fmt, buf, pos, int(arg))  # type: ignore[call-overload]
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = arg  # type: ignore[assignment]
        else:
            del buf[pos:pos + int(arg)]  # type: ignore[call-overload]
    return bytes(buf)


@FUZZ
@given(mutations=st.lists(ops, min_size=1, max_size=4))
@example(mutations=[("u64", 8, 1 << 63)])          # n_tensors
@example(mutations=[("u64", 16, (1 << 64) - 1)])   # n_kv
@example(mutations=[("truncate", 23, 0)])
def test_damaged_gguf_py_file_is_refused_or_harmless(mutations: list[tuple[str, int, object]],
                                                     reference_gguf: bytes,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    data = mutate(reference_gguf, mutations)
    assume(data != reference_gguf)
    path = write(tmp_path_factory.mktemp("d"), data)
    result = bounded("gguf_header (byte damage)", read_gguf, path, allowed=InvalidModelFile, size=len(data),
                     keep_arrays=("tokenizer.ggml.tokens",))
    if isinstance(result, GGUFInfo):
        check_contract(result)


def test_reference_file_is_accepted(reference_gguf: bytes, tmp_path: Path) -> None:
    """The fuzzers' starting point is itself valid (else every mutation would be 'refused')."""
    info = read_gguf(write(tmp_path, reference_gguf))
    assert len(info.tensors) == 3 and info.chat_template
    check_contract(info)


def _tokens_file(path: Path, tokens: list[str]) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list(tokens)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_duplicate_token_text_is_refused(tmp_path: Path) -> None:
    """Found by the gguf-native trials: one flipped byte made two token texts equal, and
    llama.cpp's vocabulary loader aborted the process (SIGABRT) on a file the header check
    had accepted. The header check now refuses it."""
    tokens = [f"t{i}" for i in range(100)]
    tokens[70] = "t7"
    with pytest.raises(InvalidModelFile, match=r"token 't7' twice \(ids 7 and 70\)"):
        read_gguf(_tokens_file(tmp_path / "dup.gguf", tokens))


def test_non_utf8_string_in_a_large_array_is_refused(tmp_path: Path) -> None:
    """Strings of large arrays are skipped rather than kept; they must still be checked, or the
    same file is refused only when a caller asks for the array."""
    path = _tokens_file(tmp_path / "t.gguf", [f"t{i:03d}" for i in range(100)])
    data = bytearray(path.read_bytes())
    data[data.index(b"t050")] = 0xFF
    path.write_bytes(bytes(data))
    for keep in ((), ("tokenizer.ggml.tokens",)):
        with pytest.raises(InvalidModelFile, match="not UTF-8"):
            read_gguf(path, keep_arrays=keep)
