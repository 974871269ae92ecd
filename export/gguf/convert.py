"""HF model dir → GGUF file (F32 / F16 / BF16), with gguf-py's GGUFWriter.

``convert_hf_to_gguf(hf_dir, out_path, outtype)`` is the whole recipe, top to bottom:

1. read ``config.json`` and resolve the architecture (unknown → error before any weight);
2. read the tokenizer into llama.cpp's vocab form (:mod:`edgepack.export.gguf.vocab`);
3. index the safetensors headers and map every tensor name (:mod:`.tensors`);
4. write header, metadata and tensor infos, then stream tensors one at a time
   (checked for NaN/Inf, Q/K-permuted for Llama, cast) into ``<out>.part-<pid>.edgepack-tmp``,
   renamed to ``out_path`` only when complete.

1-D tensors (norms, biases) stay F32 whatever ``outtype`` is, as in llama.cpp's converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_path
from edgepack.errors import InvalidModelFile, ModelSourceError, UsageError
from edgepack.progress import ProgressFn, null_progress
from edgepack.export.gguf.vocab import gguf_vocab_from_hf, write_gguf_vocab
from edgepack.export.gguf.arch import arch_for_config
from edgepack.export.gguf.tensors import gguf_tensor_name
from edgepack.export.gguf.weights import SafetensorsCheckpoint

# outtype → (gguf.LlamaFileType member name, gguf.GGMLQuantizationType member name)
OUTTYPES: dict[str, tuple[str, str]] = {
    "F32": ("ALL_F32", "F32"),
    "F16": ("MOSTLY_F16", "F16"),
    "BF16": ("MOSTLY_BF16", "BF16"),
}


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{hf_dir} has no config.json; not an HF model dir")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidModelFile(f"{path} is not a JSON object")
    return config


# llama.cpp (llama_vocab::impl::load) gives these tokens Phi-3 attributes with
# token_to_id.at() whenever general.name contains "phi3"/"phi-3", so loading fails on a
# vocabulary without them (a Phi-4-mini tokenizer, a test tokenizer).
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def model_name(hf_dir: Path, tokens: list[str]) -> str:
    """``general.name``: the dir's name, unless llama.cpp's Phi-3 name hook would then fail."""
    name = Path(hf_dir).name
    if any(k in name.lower() for k in ("phi3", "phi-3")) and not set(_PHI3_NAME_TOKENS) <= set(tokens):
        name = name.lower().replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


def _to_numpy(tensor: Any, qtype: str) -> Any:
    import numpy as np
    import torch

    if qtype == "F32":
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == "F16":
        return tensor.to(torch.float16).contiguous().numpy()
    # numpy has no bfloat16: hand the writer the raw 16-bit pattern (round-to-nearest-even).
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def convert_hf_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "F16",
                       progress: ProgressFn = null_progress) -> Path:
    """Convert an HF causal-LM dir (safetensors) to one GGUF file; returns ``out_path``."""
    import gguf
    import numpy as np

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise UsageError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}",
                         hint="quantized types are made from the F16 file with quantize_gguf")
    arch = arch_for_config(read_config(hf_dir))
    vocab = gguf_vocab_from_hf(hf_dir, vocab_size=arch.n_vocab)
    ftype_name, qtype = OUTTYPES[outtype]

    with SafetensorsCheckpoint(hf_dir) as ckpt:
        plan: list[tuple[str, str | None]] = []  # (gguf name, hf name or None for extra tensors)
        for hf_name in ckpt.names():
            name = gguf_tensor_name(hf_name, arch.gguf_arch)
            if name is None or (name == "output.weight" and arch.tied):
                continue  # a tied head reuses token_embd in llama.cpp
            plan.append((name, hf_name))
        extras = arch.extra_tensors()
        plan += [(name, None) for name in extras]
        missing = arch.required_tensors() - {name for name, _ in plan}
        if missing:
            raise InvalidModelFile(f"checkpoint lacks tensors llama.cpp needs: {', '.join(sorted(missing)[:8])}")
        embd = ckpt.shapes[next(h for n, h in plan if n == "token_embd.weight")]
        if embd != (arch.n_vocab, arch.n_embd):
            raise InvalidModelFile(f"embed_tokens has shape {embd}, config says ({arch.n_vocab}, {arch.n_embd})")

        with atomic_path(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
            try:
                writer.add_name(model_name(hf_dir, vocab.tokens))
                writer.add_type("model")
                arch.write_hparams(writer)
                writer.add_file_type(int(gguf.LlamaFileType[ftype_name]))
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                write_gguf_vocab(writer, vocab)
                dtypes: dict[str, str] = {}
                for name, hf_name in plan:
                    shape = ckpt.shapes[hf_name] if hf_name else tuple(extras[name].shape)
                    dtypes[name] = qtype if len(shape) > 1 else "F32"
                    n = int(np.prod(shape)) if shape else 1
                    nbytes = n * (4 if dtypes[name] == "F32" else 2)
                    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtypes[name]]
                    raw = gguf.GGMLQuantizationType.BF16 if dtypes[name] == "BF16" else None
                    writer.add_tensor_info(name, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for i, (name, hf_name) in enumerate(plan):
                    progress("convert", i, len(plan))
                    tensor = arch.transform(hf_name, ckpt.get(hf_name)) if hf_name else extras[name]
                    writer.write_tensor_data(_to_numpy(tensor, dtypes[name]))
                progress("convert", len(plan), len(plan))
            finally:
                writer.close()
    return out_path
