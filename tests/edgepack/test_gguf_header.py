"""The bounded GGUF header reader: valid files read, crafted or truncated ones refused fast."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from edgepack.errors import InvalidModelFile, RuntimeFailure
from edgepack.gguf_header import read_gguf, stop_token_ids, token_texts
from tests.runtime.helpers import gguf_offsets, patch, rewrite_gguf


def test_reads_tiny_gguf(tiny_gguf: Path) -> None:
    info = read_gguf(tiny_gguf, keep_arrays=("tokenizer.ggml.tokens",))
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.quant == "F16"
    assert info.arch_value("block_count") == 2
    assert "<|im_start|>" in (info.chat_template or "")
    assert token_texts(info, stop_token_ids(info)) == {2: "<|im_end|>"}
    assert info.data_offset % info.alignment == 0
    assert 0 < info.tensor_bytes <= info.file_size - info.data_offset
    assert {t.name for t in info.tensors} >= {"token_embd.weight", "blk.0.attn_q.weight"}


@pytest.mark.slow
def test_reads_embedded_teacher(builtin_teacher_gguf: Path) -> None:
    info = read_gguf(builtin_teacher_gguf)
    assert info.quant == "Q4_1"
    assert len(info.tensors) == 272
    assert info.tensor_bytes == info.file_size - info.data_offset  # every data byte accounted for
    assert info.metadata["tokenizer.ggml.eos_token_id"] == 2


# (name, where, struct format, value, expected message fragment)
MUTATIONS = [
    ("magic", None, None, None, "magic"),
    ("version 1", "version", "<I", 1, "version 1"),
    ("version big-endian", "version", "<I", 3 << 24, "big-endian"),
    ("n_tensors 2^63", "n_tensors", "<Q", 1 << 63, "tensor count"),
    ("n_kv 2^63", "n_kv", "<Q", 1 << 63, "metadata count"),
    ("n_kv + 1", "n_kv", "<Q", 28, "not a valid GGUF"),
    ("string length > file", "template_len", "<Q", 1 << 40, "remain"),
    ("array length 2^62", "tokens_count", "<Q", 1 << 62, "cannot hold"),
    ("nested array", "tokens_elem_type", "<I", 9, "element type"),
    ("unknown element type", "tokens_elem_type", "<I", 77, "element type"),
    ("n_dims 9", "tensor0_n_dims", "<I", 9, "dimensions"),
    ("n_dims 0", "tensor0_n_dims", "<I", 0, "dimensions"),
    ("unknown tensor type", "tensor0_type", "<I", 1000, "unknown ggml type"),
    ("tensor offset past end", "tensor0_offset", "<Q", 1 << 40, "outside the file"),
    ("misaligned offset", "tensor0_offset", "<Q", 3, "aligned"),
]


def _mutate(src: Path, dst: Path, where: str | None, fmt: str | None, value: int | None) -> Path:
    if where is None:
        data = bytearray(src.read_bytes())
        data[:4] = b"GGML"
        dst.write_bytes(bytes(data))
        return dst
    offsets = {"version": 4, **gguf_offsets(src)}
    return patch(src, dst, offsets[where], fmt or "<I", value or 0)


@pytest.mark.parametrize("name,where,fmt,value,fragment", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_crafted_headers_are_refused_quickly(tiny_gguf: Path, tmp_path: Path, name: str, where: str | None,
                                              fmt: str | None, value: int | None, fragment: str) -> None:
    bad = _mutate(tiny_gguf, tmp_path / "bad.gguf", where, fmt, value)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(InvalidModelFile, match=fragment):
        read_gguf(bad)
    assert time.perf_counter() - t0 < 1.0
    # No allocation proportional to a claimed count (ru_maxrss is in KB on Linux).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024


@pytest.mark.parametrize("keep", [10, 24, 100, 1000, 9000, 10100])
def test_truncated_files_are_refused(tiny_gguf: Path, tmp_path: Path, keep: int) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:keep])
    with pytest.raises(InvalidModelFile):
        read_gguf(bad)


def test_bad_alignment_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    import gguf

    # general.alignment = 2^31 (THREATS #1); written as a proper UINT32 key.
    src = gguf.GGUFReader(tiny_gguf, "r")
    writer = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    writer.add_key_value("general.alignment", 1 << 31, gguf.GGUFValueType.UINT32)
    for t in src.tensors[:1]:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(InvalidModelFile, match="alignment"):
        read_gguf(tmp_path / "a.gguf")


def test_llamacpp_backend_checks_the_header_before_native_code(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.runtime.backends.base import get_backend

    bad = _mutate(tiny_gguf, tmp_path / "bad.gguf", "n_tensors", "<Q", 1 << 63)
    with pytest.raises(InvalidModelFile, match="tensor count"):
        get_backend("gguf").load(bad, threads=1, n_ctx=64)


def test_llamacpp_refusal_keeps_its_reason(tiny_gguf: Path, tmp_path: Path) -> None:
    """A header that is well-formed but names an architecture llama.cpp lacks: the message
    must carry llama.cpp's own reason even though it loads with verbose=False."""
    from edgepack.runtime.backends.base import get_backend

    odd = rewrite_gguf(tiny_gguf, tmp_path / "odd.gguf", {"general.architecture": "notamodel"})
    with pytest.raises(RuntimeFailure, match="unknown model architecture: .notamodel.") as err:
        get_backend("gguf").load(odd, threads=1, n_ctx=64)
    assert len(str(err.value)) < 600  # the reason, not llama.cpp's whole metadata dump


def test_tensor_data_matches_gguf_py(tiny_gguf: Path) -> None:
    import gguf
    import numpy as np

    from edgepack.gguf_header import tensor_data

    info = read_gguf(tiny_gguf)
    plain = [t for t in gguf.GGUFReader(tiny_gguf).tensors if t.tensor_type.name in ("F32", "F16")]
    assert {t.tensor_type.name for t in plain} == {"F32", "F16"}
    for t in plain:
        np.testing.assert_array_equal(tensor_data(info, t.name), np.asarray(t.data).reshape(-1))
    with pytest.raises(InvalidModelFile, match="no tensor"):
        tensor_data(info, "blk.9.attn_q.weight")


def test_tensor_data_refuses_a_file_that_shrank(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.gguf_header import tensor_data

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    info = read_gguf(copy)
    last = max(info.tensors, key=lambda t: t.offset)
    with open(copy, "r+b") as fh:
        fh.truncate(info.data_offset + last.offset + 1)
    with pytest.raises(InvalidModelFile, match="truncated"):
        tensor_data(info, last.name)


def test_array_elements(tiny_gguf: Path) -> None:
    info = read_gguf(tiny_gguf)
    with pytest.raises(ValueError, match="keep_arrays"):  # long and not asked for: a caller's mistake
        info.array("tokenizer.ggml.tokens")
    with pytest.raises(InvalidModelFile, match="not an array"):
        info.array("general.architecture")
    assert info.array("tokenizer.ggml.no_such_key") is None
    kept = read_gguf(tiny_gguf, keep_arrays=("tokenizer.ggml.tokens",))
    tokens = kept.array("tokenizer.ggml.tokens")
    assert tokens is not None and tokens[2] == "<|im_end|>" and len(tokens) > 64
