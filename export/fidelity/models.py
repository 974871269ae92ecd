"""The models a fidelity report compares: the transformers reference and each artifact.

Every artifact kind is named by its format's ``fidelity_model`` part (:mod:`edgepack.formats`)
and offers the same small surface: ``describe(path)`` (what the report needs before opening it:
:class:`ArtifactFacts`), ``logits(ids)`` for one prefill, ``tokenize(text, add_special)`` with its
own tokenizer, ``greedy(ids, max_new_tokens)`` (or ``None`` when the kind cannot decode here) and
``close()``.

* ``gguf``: llama.cpp through llama-cpp-python, ``logits_all=True``; greedy decoding is a
  plain argmax loop over llama.cpp's logits that stops at any end-of-generation token of
  the GGUF's vocab (``llama_vocab_is_eog``), as a deployed runtime does. The file type comes
  from the bounded header reader (:func:`edgepack.gguf_header.read_gguf`); an unquantized GGUF
  (F16 preferred, :data:`REFERENCE_GGUF_ORDER`) is the KLD base of the quantized ones.
* ``onnx``: one onnxruntime session (:class:`edgepack.export.onnx.convert.OnnxCausalLM`),
  with the HF tokenizer files carried in the folder; greedy decoding is an argmax loop with
  the graph's KV cache that stops at the folder's ``generation_config.json`` /
  ``config.json`` EOS ids, as the onnx runtime backend does.

The reference (:class:`TorchReference`) is the HF model in float32 with transformers;
greedy output comes from ``generate(do_sample=False)`` stopping at the generation config's
EOS ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import RuntimeFailure
from edgepack.export.fidelity.metrics import top2_margin
from edgepack.export.fidelity.prompts import load_tokenizer

# GGUF general.file_type values that hold unquantized weights (gguf.LlamaFileType names).
UNQUANTIZED_FILE_TYPES = ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16")
# Which unquantized GGUF is the KLD base, most preferred first (llama-perplexity's convention).
REFERENCE_GGUF_ORDER = ("MOSTLY_F16", "ALL_F32", "MOSTLY_BF16")


@dataclass(frozen=True)
class ArtifactFacts:
    """What the fidelity report knows about an artifact before opening it."""

    quant: str
    """The quantization as the report names it (``Q4_K_M``, ``int4+int8``)."""
    files: tuple[Path, ...]
    """The files holding the model (its size and sha256s)."""
    base_rank: int | None = None
    """Rank as the KLD base of its format (0 = preferred); None: never a base."""
    quantized: bool = False
    """Compared with the KLD base of its format too, when the report has one."""


@dataclass
class Greedy:
    """One greedy continuation: new tokens (end-of-generation token excluded)."""

    tokens: list[int]
    finished: bool
    """True when it stopped at an end-of-generation token, False at ``max_new_tokens``."""
    margins: list[float] = field(default_factory=list)
    """Top-1 minus top-2 logit at each step (reference only; small = near tie)."""


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op torch threads (unchanged when None), then restore.

    On an oversubscribed CPU a second thread can cost 10x (measured here: a 200-token
    forward of a 135M model took 0.9 s on 1 thread and 13.6 s on 2 with the load at 6 on
    2 cores), so callers that know the machine is shared pass 1.
    """
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchReference:
    """The HF model (float32, transformers) that every artifact is compared against."""

    def __init__(self, hf_dir: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.threads = threads
        self.hf_dir = Path(hf_dir)
        self.tokenizer = load_tokenizer(self.hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=torch.float32,
                                                          use_safetensors=True, trust_remote_code=False)
        self.model.eval()
        try:
            gen = GenerationConfig.from_pretrained(self.hf_dir)
            eos = gen.eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def logits(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad(), torch_threads(self.threads):
            return self.model(torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0].float().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int) -> Greedy:
        import torch
        from transformers import GenerationConfig

        # bos given explicitly: otherwise transformers logs that it filled it in from the model.
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id,
                                  bos_token_id=self.model.config.bos_token_id)
        with torch.no_grad(), torch_threads(self.threads):
            out = self.model.generate(torch.tensor([ids], dtype=torch.long),
                                      attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                      generation_config=config, output_logits=True, return_dict_in_generate=True)
        new = [int(t) for t in out.sequences[0][len(ids):]]
        margins = [top2_margin(step[0].float().numpy()) for step in out.logits]
        finished = bool(new) and new[-1] in self.eos_ids
        return Greedy(new[:-1] if finished else new, finished, margins)

    def close(self) -> None:
        self.model = None


class GGUFArtifact:
    """A GGUF file opened in llama.cpp."""

    format = "gguf"

    @classmethod
    def describe(cls, path: Path) -> ArtifactFacts:
        """Its file type (``Q4_K_M``), and whether it is a KLD base or compared with one."""
        file_type = gguf_file_type(path)
        return ArtifactFacts(quant=file_type.removeprefix("MOSTLY_").removeprefix("ALL_"), files=(Path(path),),
                             base_rank=REFERENCE_GGUF_ORDER.index(file_type) if file_type in REFERENCE_GGUF_ORDER
                             else None, quantized=file_type not in UNQUANTIZED_FILE_TYPES)

    def __init__(self, path: Path, *, n_ctx: int, threads: int | None = None) -> None:
        import llama_cpp
        from jinja2 import TemplateError

        from edgepack.gguf_header import read_gguf
        from edgepack.runtime.chat.check import check_gguf_templates

        self.path = Path(path)
        threads = int(threads or os.cpu_count() or 1)
        check_gguf_templates(read_gguf(self.path))  # before Llama() compiles them, unbounded
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, logits_all=True, verbose=False)
        except (ValueError, RuntimeError, OSError, TemplateError) as exc:
            raise RuntimeFailure(f"llama.cpp could not load {self.path.name}: {exc}",
                                 hint="the file is corrupt or was not written by edgepack's exporter") from exc
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.eog = frozenset(t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def greedy(self, ids: list[int], max_new_tokens: int) -> Greedy:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in self.eog:
                return Greedy(new, True)
            new.append(token)
            self.llm.eval([token])
        return Greedy(new, False)

    def close(self) -> None:
        self.llm.close()


class OnnxArtifact:
    """An ONNX folder (model.onnx + tokenizer files) run by onnxruntime."""

    format = "onnx"

    @classmethod
    def describe(cls, path: Path) -> ArtifactFacts:
        """Its weight scheme (``int4+int8``) and model files; an ONNX folder is never a KLD base."""
        scheme, files = onnx_model_info(_onnx_folder(path))
        return ArtifactFacts(quant=scheme, files=tuple(files))

    def __init__(self, path: Path, *, n_ctx: int, threads: int | None = None) -> None:
        import json

        from edgepack.export.onnx.convert import OnnxCausalLM

        self.path = _onnx_folder(path)
        self.tokenizer = load_tokenizer(self.path)
        self.model = OnnxCausalLM(self.path / "model.onnx", threads=threads)
        stop: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            f = self.path / name
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id") if f.is_file() else None
            stop |= {int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)}
        if not stop and self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        self.stop = frozenset(stop)

    def logits(self, ids: list[int]) -> Any:
        return self.model.logits(ids)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def greedy(self, ids: list[int], max_new_tokens: int) -> Greedy | None:
        tokens, finished = self.model.greedy(ids, max_new_tokens, self.stop)
        return Greedy(tokens, finished)

    def close(self) -> None:
        self.model = None


def _onnx_folder(path: Path) -> Path:
    """The folder of an ONNX artifact given as the folder or as its ``model.onnx`` (a bundle's entrypoint)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def gguf_file_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` as a gguf.LlamaFileType name (e.g. ``MOSTLY_Q4_K_M``),
    read by the bounded header reader (InvalidModelFile for a bad header)."""
    from gguf.constants import LlamaFileType

    from edgepack.gguf_header import read_gguf

    value = read_gguf(Path(path)).metadata.get("general.file_type")
    if not isinstance(value, int) or isinstance(value, bool):
        return "UNKNOWN"
    try:
        return LlamaFileType(value).name
    except ValueError:
        return f"FILE_TYPE_{value}"


def onnx_model_info(folder: Path) -> tuple[str, list[Path]]:
    """(weight scheme, model files) of an ONNX folder: ``int4``/``int8`` from the ``bits`` of
    its MatMulNBits nodes, else ``fp32``; ``model.onnx`` plus its external-data files."""
    import onnx

    folder = Path(folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    scheme = "+".join(f"int{b}" for b in sorted(bits)) if bits else "fp32"
    external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    files = [folder / "model.onnx"] + [folder / name for name in sorted(external) if (folder / name).is_file()]
    return scheme, files
