"""quantize_gguf through llama.cpp's own quantizer, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import InvalidModelFile, RuntimeFailure, UsageError
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.export.gguf.quantize import (QUANT_TYPES, load_imatrix, quant_report, quantize_gguf, supported_quants,
                                           tensor_types)
from tests.export.helpers import PROMPTS, hf_logits, llama_logits, no_leftovers

# hidden 64 / ff 128: rows divide 32 (Q8_0, Q4_0, Q4_1 apply as asked) but not 256, so
# llama.cpp stores K-quant and IQ4_XS matrices in a fallback type; quant_report says so.
BLOCK_32 = {"Q8_0", "Q4_0", "Q4_1"}


@pytest.fixture(scope="module")
def f16_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("q") / "tiny-F16.gguf", outtype="F16")


def test_all_registered_quants_are_supported_by_this_build() -> None:
    assert supported_quants() == list(QUANT_TYPES)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_every_quant_type_loads_in_llama_cpp(qtype: str, f16_gguf: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = quantize_gguf(f16_gguf, tmp_path / f"tiny-{qtype}.gguf", qtype, threads=1)
    assert out.stat().st_size < f16_gguf.stat().st_size
    report = quant_report(out, qtype)
    if qtype in BLOCK_32:
        assert report["fallback_tensors"] == 0
        assert report["tensor_types"].get(QUANT_TYPES[qtype][1], 0) >= 14
    else:
        assert report["fallback_tensors"] == report["weight_matrices"]
        assert QUANT_TYPES[qtype][1] not in report["tensor_types"]
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir).encode(PROMPTS[0])
    assert np.isfinite(llama_logits(out, ids)).all()
    assert no_leftovers(tmp_path) == []


def test_q8_0_agrees_with_transformers(f16_gguf: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = quantize_gguf(f16_gguf, tmp_path / "tiny-Q8_0.gguf", "Q8_0", threads=1)
    assert set(tensor_types(out).values()) == {"Q8_0", "F32"}
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    agree, total = 0, 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False)
        ref, got = hf_logits(tiny_llama_dir, ids), llama_logits(out, ids)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
        assert float(np.abs(ref - got).max()) < 0.25
    assert agree / total >= 0.9


def _write_imatrix(path: Path, f16_gguf: Path, scale: float) -> Path:
    """A GGUF imatrix (llama-imatrix's layout) with a steep per-column importance ramp."""
    import gguf

    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    for t in gguf.GGUFReader(f16_gguf).tensors:
        if len(t.shape) < 2:
            continue
        ncols = int(t.shape[0])
        w.add_tensor(f"{t.name}.in_sum2", (np.linspace(0.01, scale, ncols, dtype=np.float32) ** 4) * 10)
        w.add_tensor(f"{t.name}.counts", np.array([10.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_changes_the_quantization(f16_gguf: Path, tmp_path: Path) -> None:
    imatrix = _write_imatrix(tmp_path / "imatrix.gguf", f16_gguf, scale=10.0)
    plain = quantize_gguf(f16_gguf, tmp_path / "plain.gguf", "Q4_0", threads=1)
    weighted = quantize_gguf(f16_gguf, tmp_path / "weighted.gguf", "Q4_0", threads=1, imatrix=imatrix)
    assert plain.stat().st_size == weighted.stat().st_size
    assert plain.read_bytes() != weighted.read_bytes()


def test_malformed_imatrix_is_rejected(f16_gguf: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "imatrix.dat"
    bogus.write_bytes(b"\x01\x00\x00\x00legacy-imatrix")
    with pytest.raises(InvalidModelFile):
        quantize_gguf(f16_gguf, tmp_path / "out.gguf", "Q4_0", imatrix=bogus)
    with pytest.raises(InvalidModelFile, match="in_sum2"):
        quantize_gguf(f16_gguf, tmp_path / "out.gguf", "Q4_0", imatrix=f16_gguf)
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_imatrix_is_refused_before_its_data_is_read(tmp_path: Path) -> None:
    from edgepack.export.gguf.imatrix import ImatrixStats, is_imatrix_file, write_imatrix

    stats = ImatrixStats(chunks=1, tokens=4)
    stats.sum2["blk.0.ffn_down.weight"] = np.arange(1, 129, dtype=np.float64)
    stats.sum["blk.0.ffn_down.weight"] = np.zeros(128)
    stats.counts["blk.0.ffn_down.weight"] = 4
    path = write_imatrix(tmp_path / "imatrix.gguf", stats, datasets=["d"], chunk_size=8)
    np.testing.assert_allclose(load_imatrix(path)["blk.0.ffn_down.weight"], np.arange(1, 129) / 4, rtol=1e-6)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(InvalidModelFile, match="outside the file"):
        load_imatrix(path)
    assert not is_imatrix_file(path)


def test_quantized_tensor_is_not_read_as_numbers(f16_gguf: Path, tmp_path: Path) -> None:
    from edgepack.gguf_header import read_gguf, tensor_data

    out = quantize_gguf(f16_gguf, tmp_path / "q8.gguf", "Q8_0", threads=1)
    name = next(n for n, t in tensor_types(out).items() if t == "Q8_0")
    with pytest.raises(InvalidModelFile, match="Q8_0"):
        tensor_data(read_gguf(out), name)


def test_unknown_quant_is_a_usage_error(f16_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Q3_FOO") as err:
        quantize_gguf(f16_gguf, tmp_path / "out.gguf", "Q3_FOO")
    assert all(q in err.value.hint for q in QUANT_TYPES)


def test_llama_cpp_failure_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "not-a-model.gguf"
    src.write_bytes(b"definitely not gguf")
    with pytest.raises(RuntimeFailure, match="magic"):
        quantize_gguf(src, tmp_path / "out.gguf", "Q8_0", threads=1)
    assert not (tmp_path / "out.gguf").exists() and no_leftovers(tmp_path) == []
