"""HF model dir → ONNX folder for onnxruntime, optionally with weight-only INT4/INT8 MatMuls.

``export_onnx(hf_dir, out_dir, quant)`` is the recipe:

1. check that optimum exports the architecture as a KV-cached decoder
   (:mod:`edgepack.export.onnx.arch`, before any weight is read); validate every
   weight (safetensors only, no NaN/Inf) — optimum would otherwise load whatever it finds;
2. export with optimum (task ``text-generation-with-past``: one ``model.onnx`` taking
   ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.<i>.key/value``
   of shape ``[batch, kv_heads, past_len, head_dim]``; returning ``logits`` and
   ``present.<i>.key/value``; the first step passes ``past_len = 0``);
3. measure the ONNX logits against PyTorch on a short prompt (recorded, and an error
   if the FP32 graph disagrees: that would be an exporter bug, not quantization noise);
4. for ``int4``/``int8``, rewrite every constant-weight MatMul to onnxruntime's
   ``MatMulNBits`` and the embedding to ``GatherBlockQuantized``
   (:mod:`edgepack.export.onnx.quantize`: round-to-nearest per block with integer zero
   points, ``accuracy_level`` 4, the tied output head / embedding table at 8 bits and
   stored once; all tunable with :class:`~edgepack.export.onnx.quantize.OnnxQuantOptions`);
5. write what other ONNX clients need (:mod:`edgepack.export.onnx.genai`): onnxruntime-genai's
   ``genai_config.json`` from the graph's names and shapes, and ``model_input_names`` in
   ``tokenizer_config.json`` so the tokenizer returns no ``token_type_ids`` (optimum's
   ``ORTModelForCausalLM.generate(**tokenizer(text))``);
6. build it all in ``<out>.tmp-<pid>.edgepack-tmp`` and rename with a ``.complete`` marker.

The folder also carries ``config.json``, ``generation_config.json`` and the tokenizer
files (with the chat template), so a runtime needs nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_dir, scratch
from edgepack.errors import InvalidModelFile, RuntimeFailure, UsageError
from edgepack.hashing import sha256_file
from edgepack.progress import ProgressFn, null_progress
from edgepack.export.gguf.convert import read_config
from edgepack.export.gguf.weights import SafetensorsCheckpoint
from edgepack.export.onnx.arch import check_onnx_architecture
from edgepack.export.onnx.genai import write_client_files
from edgepack.export.onnx.quantize import OnnxQuantOptions, quantize_onnx

# edgepack ONNX quant name → MatMulNBits bits; None: keep FP32
ONNX_QUANTS: dict[str, int | None] = {"fp32": None, "int8": 8, "int4": 4}
PARITY_PROMPT_IDS = 12  # tokens of the parity prompt fed to both PyTorch and onnxruntime
FP32_TOLERANCE = 1e-2   # max |logit diff| accepted between the FP32 graph and PyTorch


def validate_weights(hf_dir: Path) -> int:
    """Read every tensor once: refuses pickles, truncation and NaN/Inf. Returns the count."""
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        for name in ckpt.names():
            ckpt.get(name)
        return len(ckpt.names())


class OnnxCausalLM:
    """One onnxruntime session on an exported ``model.onnx``: prefill logits and a greedy
    KV-cache decode (the graph's ``present.*`` outputs fed back as ``past_key_values.*``)."""

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(model_path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.pasts = [n for n in self.inputs if n.startswith("past_key_values.")]
        unknown = set(self.inputs) - {"input_ids", "attention_mask", "position_ids", *self.pasts}
        if unknown:
            raise RuntimeFailure(f"unexpected ONNX inputs {sorted(unknown)} in {self.path}")
        self.fetch = ["logits", *("present." + n.removeprefix("past_key_values.") for n in self.pasts)]

    def _feeds(self, ids: list[int], done: int, past: dict[str, Any] | None) -> dict[str, Any]:
        import numpy as np

        n = len(ids)
        feeds: dict[str, Any] = {"input_ids": np.array([ids], dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, done + n), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(done, done + n, dtype=np.int64)[None, :]
        for name in self.pasts:
            if past is not None:
                feeds[name] = past[name]
            else:
                _, heads, _, head_dim = self.inputs[name].shape
                dtype = np.float16 if self.inputs[name].type == "tensor(float16)" else np.float32
                feeds[name] = np.zeros((1, int(heads), 0, int(head_dim)), dtype=dtype)
        return feeds

    def logits(self, ids: list[int]) -> Any:
        """Logits ``[len(ids), vocab]`` of one prefill step from an empty cache."""
        import numpy as np

        return self.session.run(["logits"], self._feeds(list(ids), 0, None))[0][0].astype(np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: frozenset[int]) -> tuple[list[int], bool]:
        """Argmax decoding with the KV cache: (new tokens without the stop token, stopped)."""
        import numpy as np

        ids, new, done, past = list(ids), [], 0, None
        step = ids
        for _ in range(max_new_tokens):
            out = self.session.run(self.fetch, self._feeds(step, done, past))
            done += len(step)
            past = dict(zip(self.pasts, out[1:]))
            token = int(np.argmax(out[0][0, -1]))
            if token in stop_ids:
                return new, True
            new.append(token)
            step = [token]
        return new, False


def onnx_logits(model_path: Path, ids: list[int]) -> Any:
    """Logits ``[len(ids), vocab]`` of one prefill step through onnxruntime (empty past)."""
    return OnnxCausalLM(model_path).logits(ids)


def _torch_logits(hf_dir: Path, ids: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _parity_ids(hf_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.encode("Pump P-101 discharge pressure is low; what should I check first?", add_special_tokens=False)
    return ids[:PARITY_PROMPT_IDS]


def _files(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        out.append({"path": f.relative_to(folder).as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return out


def export_onnx(hf_dir: Path, out_dir: Path, quant: str = "int4", progress: ProgressFn = null_progress,
                options: OnnxQuantOptions | None = None) -> dict[str, Any]:
    """Export ``hf_dir`` to the ONNX folder ``out_dir``; returns what was built and measured.
    ``options`` tune int4/int8 (block size, zero points, accuracy level, head bits)."""
    import numpy as np
    from optimum.exporters.onnx import main_export

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if quant not in ONNX_QUANTS:
        raise UsageError(f"unknown ONNX quantization {quant!r}", hint=f"choose from {', '.join(ONNX_QUANTS)}")
    options = options or OnnxQuantOptions()
    scheme = ONNX_QUANTS[quant]
    if scheme is not None:
        options.check(scheme)
    hf_config = read_config(hf_dir)
    check_onnx_architecture(hf_config)
    progress("onnx", 0, 4)
    validate_weights(hf_dir)
    ids = _parity_ids(hf_dir)
    ref = _torch_logits(hf_dir, ids)
    with atomic_dir(out_dir, replace=True) as tmp, scratch(out_dir.parent, f"{out_dir.name}-fp32") as raw:
        progress("onnx", 1, 4)
        main_export(str(hf_dir), output=str(raw), task="text-generation-with-past", device="cpu",
                    do_validation=False, local_files_only=True, trust_remote_code=False,
                    library_name="transformers")
        fp32 = Path(raw) / "model.onnx"
        if not fp32.is_file():
            raise RuntimeFailure(f"optimum wrote no model.onnx for {hf_dir.name}")
        fp32_logits = onnx_logits(fp32, ids)
        fp32_diff = float(np.abs(fp32_logits - ref).max())
        if fp32_diff > FP32_TOLERANCE:
            raise InvalidModelFile(f"the FP32 ONNX graph disagrees with PyTorch (max |logit diff| {fp32_diff:.3g})",
                                   hint="this is an exporter bug; export GGUF instead and report it")
        progress("onnx", 2, 4)
        ops: dict[str, Any] = {}
        for f in Path(raw).iterdir():
            if f.is_file() and (scheme is None or not f.name.startswith("model.onnx")):
                shutil.copy(f, tmp / f.name)
        if scheme is not None:
            ops = quantize_onnx(fp32, tmp / "model.onnx", scheme, options)
        clients = write_client_files(tmp, hf_config)
        progress("onnx", 3, 4)
        got = onnx_logits(tmp / "model.onnx", ids)
        parity = {
            "prompt_tokens": len(ids),
            "fp32_vs_torch_max_abs_diff": fp32_diff,
            "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
            "top1_agreement_vs_torch": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    progress("onnx", 4, 4)
    files = [f for f in _files(out_dir) if f["path"] != ".complete"]
    from edgepack.export.gate.gate import folder_digest  # the one definition the gate and pack check against

    digest = folder_digest((f["path"], f["sha256"]) for f in files)
    return {"path": out_dir, "bytes": sum(f["bytes"] for f in files), "sha256": digest,
            "files": files, "parity": parity, "ops": ops, "clients": clients,
            "block_size": options.block_size if scheme else None, "method": "rtn" if scheme else None}
