"""The ``onnx`` backend: an exported ONNX folder run by onnxruntime, with a KV cache.

The folder is what :mod:`edgepack.export.onnx.convert` writes: ``model.onnx`` (optimum's
``text-generation-with-past`` graph: ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.<i>.key/value`` ``[batch, kv_heads, past_len, head_dim]`` in; ``logits`` and
``present.<i>.key/value`` out), ``config.json``, ``generation_config.json`` and the tokenizer
files. Nothing from transformers is needed: the tokenizer is ``tokenizers.Tokenizer`` on
``tokenizer.json``, the chat template (``chat_template.jinja`` or ``tokenizer_config.json``)
renders in edgepack's sandbox (:mod:`edgepack.runtime.chat.template`).

Before onnxruntime sees a file, :func:`~edgepack.runtime.onnx_graph.inspect_onnx` scans
``model.onnx`` without loading weights and refuses external data that leaves the folder
(absolute, ``..``, symlinks out); see :mod:`edgepack.runtime.onnx_graph`.

Generation keeps the ``present`` outputs as ``OrtValue`` s and feeds them back as the next
``past`` inputs (no numpy round trip). The repeat penalty is llama.cpp's, applied to the
logits here (:func:`repeat_penalized`, over the same window of prompt and answer tokens), so
both backends pick the same tokens. Sampling at temperature > 0 mirrors the llama.cpp
backend's chain: top-k 40, top-p 0.95, min-p 0.05 on the untempered distribution, then
temperature.

Structured output: onnxruntime has no grammar-constrained decoding, so ``json_schema`` is
ignored (``constrains_json = False``) and callers say the answer is unconstrained; the schema
is still checked (:meth:`~edgepack.runtime.backends.base.Backend.check_json_schema`) so a bad
one is refused on every backend alike. CPU runs on ``CPUExecutionProvider`` with ``intra_op_num_threads = threads``;
``gpu_layers != 0`` adds ``CUDAExecutionProvider`` when onnxruntime reports it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, RuntimeFailure, UnsupportedArchitecture
from edgepack.runtime.backends.base import PENALTY_LAST_N, Backend, register_backend
from edgepack.runtime.chat.template import read_chat_template
from edgepack.runtime.onnx_graph import MODEL_FILE, OnnxGraphInfo, inspect_onnx, model_file

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# Token texts that end generation, as llama.cpp's llama-vocab.cpp marks them end-of-generation
# when they are special tokens, so both backends stop on the same tokens.
END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>",
})


# --- tokenizer bytes -------------------------------------------------------------------------
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted (the ByteLevel decoder's table)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_bytes(piece: str, table: dict[str, int]) -> bytes:
    return bytes(table[ch] for ch in piece) if all(ch in table for ch in piece) else piece.encode("utf-8")


def _byte_fallback_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _decoder_kinds(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {d.get("type", "") for d in decoder.get("decoders", [])}
    return {decoder.get("type", "")}


def token_bytes_table(tokenizer_json: dict[str, Any], vocab: dict[int, str],
                      special: set[int]) -> list[bytes]:
    """Raw bytes of every token id, by the tokenizer's decoder (ByteLevel or SentencePiece-style)."""
    kinds = _decoder_kinds(tokenizer_json.get("decoder"))
    added = {int(t["id"]): t["content"] for t in tokenizer_json.get("added_tokens", [])}
    if "ByteLevel" in kinds:
        table = _byte_level_table()
        convert = lambda piece: _byte_level_bytes(piece, table)  # noqa: E731
    elif "ByteFallback" in kinds or "Replace" in kinds:
        convert = _byte_fallback_bytes
    else:
        raise UnsupportedArchitecture(
            f"tokenizer decoder {sorted(kinds) or 'none'} is not supported by the onnx backend",
            hint="supported tokenizer decoders: ByteLevel (GPT-2 style), ByteFallback/Replace (SentencePiece style)")
    size = max(vocab) + 1 if vocab else 0
    out = [b""] * size
    for tid, piece in vocab.items():
        if tid in special:
            continue  # control tokens render as nothing, as llama.cpp's token_to_piece(special=False)
        out[tid] = added[tid].encode("utf-8") if tid in added else convert(piece)
    return out


def repeat_penalized(logits: Any, window: Sequence[int], penalty: float) -> Any:
    """``logits`` after llama.cpp's repeat penalty for the tokens in ``window``.

    llama.cpp (``llama_sampler_penalties_apply``): each token id present in the window, however
    often, has a positive logit divided by ``penalty`` and a negative (or zero) one multiplied
    by it, in float32. Dividing alone, as the CTRL paper states it, would make a negative logit
    *more* likely; the multiply is llama.cpp's fix. ``penalty`` 1.0 returns ``logits`` as given.
    """
    import numpy as np

    if penalty == 1.0 or not window:
        return logits
    out = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay as computed
    ids = np.fromiter({t for t in window if 0 <= t < out.size}, dtype=np.int64)
    seen = out[ids]
    out[ids] = np.where(seen <= 0, seen * np.float32(penalty), seen / np.float32(penalty))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path.name} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def stop_token_ids(folder: Path, tokenizer: Any | None = None) -> frozenset[int]:
    """Token ids that end generation in the ONNX folder ``folder``: ``eos_token_id`` of
    generation_config.json and config.json, the tokenizer's eos token, and every special token
    llama.cpp treats as end-of-generation (:data:`END_OF_GENERATION_TEXTS`). The export writes
    the same set into ``genai_config.json`` so onnxruntime-genai stops where this backend does.
    ``tokenizer``: the folder's ``tokenizers.Tokenizer`` if already loaded."""
    if tokenizer is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    eos_text = _token_text(_read_json(folder / "tokenizer_config.json").get("eos_token"))
    stop: set[int] = set()
    for cfg in (_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")):
        eos = cfg.get("eos_token_id")
        stop |= {int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)}
    for text in [eos_text, *END_OF_GENERATION_TEXTS]:
        tid = tokenizer.token_to_id(text) if text else None
        if tid is not None and (tid in special or text == eos_text):
            stop.add(tid)
    return frozenset(stop)


# --- what the format registry (edgepack.formats, ``onnx``) reads from an ONNX folder ------------
def trained_context(path: Path) -> int | None:
    """``max_position_embeddings`` from the folder's config.json, if it says."""
    config = model_file(Path(path)).parent / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def file_quant(path: Path) -> str | None:
    """What the graph holds (the narrowest MatMulNBits width, else ``fp32``), not what the folder
    is called; the scan refuses external data that leaves the folder."""
    return inspect_onnx(Path(path)).quant


def check_templates(path: Path, *, strict: bool = True) -> None:
    """Check the chat template of the folder (given as the folder or its ``model.onnx``)."""
    from edgepack.runtime.chat.check import check_folder_template

    path = Path(path)
    check_folder_template(path.parent if path.is_file() else path, strict=strict, where=path.name)


@register_backend("onnx")
class OnnxRuntimeBackend(Backend):
    """An exported ONNX folder in onnxruntime."""

    constrains_json = False  # onnxruntime offers no constrained decoding: see the module docstring

    def __init__(self, session: Any, folder: Path, graph: OnnxGraphInfo, n_ctx: int, threads: int) -> None:
        import numpy as np
        from tokenizers import Tokenizer

        self._np = np
        self._session = session
        self._folder = folder
        self._graph = graph
        self._n_ctx = n_ctx
        self._threads = threads
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise InvalidModelFile(f"{folder}: no tokenizer.json beside {MODEL_FILE}")
        self._tok = Tokenizer.from_file(str(tok_path))
        self._tok_plain = Tokenizer.from_file(str(tok_path))
        self._tok_plain.encode_special_tokens = True  # special-token text stays text
        tok_config = _read_json(folder / "tokenizer_config.json")
        vocab = {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}
        added = self._tok.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        # What encode_special_tokens (the plain tokenizer above) leaves as text.
        self._control = {t.content: int(i) for i, t in added.items() if t.special and t.content}
        self._bytes = token_bytes_table(json.loads(tok_path.read_text(encoding="utf-8")), vocab, special)
        self._special = {"bos_token": _token_text(tok_config.get("bos_token")),
                         "eos_token": _token_text(tok_config.get("eos_token"))}
        self._stop = stop_token_ids(folder, self._tok)
        self._template = read_chat_template(folder)
        self._inputs = {i.name: i for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]
        if "logits" not in self._outputs or "input_ids" not in self._inputs:
            raise InvalidModelFile(f"{folder.name}/{MODEL_FILE} is not a causal-LM graph (needs input_ids -> logits)")
        self._pasts = [n for n in self._inputs if n.startswith("past_key_values.")]
        self._presents = ["present." + n.removeprefix("past_key_values.") for n in self._pasts]
        missing = [p for p in self._presents if p not in self._outputs]
        unknown = set(self._inputs) - {"input_ids", "attention_mask", "position_ids", *self._pasts}
        if missing or unknown:
            raise InvalidModelFile(f"{folder.name}/{MODEL_FILE}: unexpected graph signature "
                                   f"(missing outputs {missing}, unknown inputs {sorted(unknown)})",
                                   hint="export with edgepack export --format onnx (optimum text-generation-with-past)")
        self._fetch = ["logits", *self._presents]

    @classmethod
    def prepare(cls) -> None:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401

    @classmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> OnnxRuntimeBackend:
        """Containment-check the folder, then open an onnxruntime session on ``model.onnx``."""
        path = Path(path)
        model = model_file(path)
        folder = model.parent
        graph = inspect_onnx(model)  # before onnxruntime reads a byte
        template = read_chat_template(folder)
        if template:
            from edgepack.runtime.chat.check import check_chat_templates

            check_chat_templates({"chat_template": template}, render="chat_template", where=folder.name)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        providers = [CPU_PROVIDER]
        if gpu_layers != 0 and CUDA_PROVIDER in ort.get_available_providers():
            providers = [CUDA_PROVIDER, CPU_PROVIDER]
        try:
            session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RuntimeFailure(f"onnxruntime could not load {folder.name}/{MODEL_FILE}: {exc}",
                                 hint=f"check the folder was exported for onnxruntime {ort.__version__}") from exc
        return cls(session, folder, graph, n_ctx, threads)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def stop_tokens(self) -> frozenset[int]:
        return self._stop

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    @property
    def control_tokens(self) -> dict[str, int]:
        return dict(self._control)

    @property
    def graph(self) -> OnnxGraphInfo:
        return self._graph

    @property
    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        providers = list(self._session.get_providers())
        return {"format": self.format, "backend": "onnxruntime", "onnxruntime": ort.__version__,
                "providers": providers, "gpu_offload_supported": CUDA_PROVIDER in providers,
                "intra_op_threads": self._threads, "n_ctx": self._n_ctx,
                "n_vocab": len(self._bytes), "quant": self._graph.quant, "quant_detail": self._graph.quant_detail}

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        tok = self._tok if parse_special else self._tok_plain
        return list(tok.encode(text, add_special_tokens=add_special).ids)

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True, repeat_penalty: float = 1.0,
                 json_schema: dict[str, Any] | None = None) -> Iterator[int]:
        """See :meth:`Backend.generate`; ``json_schema`` is checked, then ignored (unconstrained)."""
        tokens = [int(t) for t in tokens]
        budget = self.room_for(tokens, max_tokens=max_tokens, temperature=temperature, repeat_penalty=repeat_penalty)
        if json_schema is not None:
            self.check_json_schema(json_schema)
        return self._generate(tokens, budget, temperature, seed, stop_at_eos, repeat_penalty)

    def _empty_past(self) -> dict[str, Any]:
        np = self._np
        out = {}
        for name in self._pasts:
            meta = self._inputs[name]
            heads, head_dim = meta.shape[1], meta.shape[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise InvalidModelFile(f"{name} has a symbolic head shape {meta.shape}; cannot build an empty cache")
            dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
            out[name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)
        return out

    def _pick(self, logits: Any, temperature: float, rng: Any) -> int:
        np = self._np
        if temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64)
        top = np.argpartition(-logits, min(40, logits.size) - 1)[:40]
        top = top[np.argsort(-logits[top])]
        p = np.exp(logits[top] - logits[top[0]])
        p /= p.sum()
        keep = int(np.searchsorted(np.cumsum(p), 0.95) + 1)  # top-p: smallest prefix reaching 0.95
        keep = max(1, min(keep, int((p >= 0.05 * p[0]).sum())))  # min-p relative to the best
        scaled = logits[top[:keep]] / temperature
        q = np.exp(scaled - scaled.max())
        return int(top[rng.choice(keep, p=q / q.sum())])

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float,
                  seed: int | None, stop_at_eos: bool, repeat_penalty: float) -> Iterator[int]:
        np = self._np
        from onnxruntime import OrtValue

        if max_tokens <= 0:
            return
        rng = np.random.default_rng(seed)
        window = deque(tokens[-PENALTY_LAST_N:], maxlen=PENALTY_LAST_N)  # as llama-server fills it
        feeds: dict[str, Any] = {k: OrtValue.ortvalue_from_numpy(v) for k, v in self._empty_past().items()}
        step = np.array([tokens], dtype=np.int64)
        done = 0  # positions already in the cache
        for produced in range(max_tokens):
            n = step.shape[1]
            feeds["input_ids"] = OrtValue.ortvalue_from_numpy(step)
            if "attention_mask" in self._inputs:
                feeds["attention_mask"] = OrtValue.ortvalue_from_numpy(np.ones((1, done + n), dtype=np.int64))
            if "position_ids" in self._inputs:
                feeds["position_ids"] = OrtValue.ortvalue_from_numpy(np.arange(done, done + n, dtype=np.int64)[None, :])
            try:
                out = self._session.run_with_ort_values(self._fetch, feeds)
            except Exception as exc:  # onnxruntime's pybind errors (out of memory, bad shapes)
                raise RuntimeFailure(f"onnxruntime failed while generating: {exc}") from exc
            logits = out[0].numpy()[0, -1]
            for past, present in zip(self._pasts, out[1:]):
                feeds[past] = present
            done += n
            tok = self._pick(repeat_penalized(logits, window, repeat_penalty), temperature, rng)
            window.append(tok)
            if stop_at_eos and tok in self._stop:
                return
            yield tok
            if produced + 1 >= max_tokens:
                return
            step = np.array([[tok]], dtype=np.int64)

    def close(self) -> None:
        self._session = None

