"""What other ONNX clients need beside ``model.onnx``: onnxruntime-genai's ``genai_config.json``
and a tokenizer_config that returns only what the graph takes.

``write_client_files(folder, hf_config)`` is called by the exporter on the finished folder:

* ``genai_config.json``, for the model types in :data:`GENAI_MODEL_TYPES` (onnxruntime-genai's model description, schema in its
  ``docs/genai/reference/config.md``): the decoder's input/output names and the past/present
  name templates (``past_key_values.%d.key``) are read from the graph itself, the shapes
  (layers, kv heads, head size) from the graph and checked against ``config.json``, so a
  graph and a config that disagree fail here rather than in a client. ``eos_token_id`` is the
  set edgepack's ONNX backend stops on
  (:func:`edgepack.runtime.backends.onnxrt.stop_token_ids`), so both stop on the same token.
  ``search`` is greedy with ``past_present_share_buffer: false``: optimum's graph concatenates
  past and new keys (a plain ``Concat``), it cannot write into a preallocated buffer the way
  onnxruntime-genai's own GroupQueryAttention graphs do;
* ``tokenizer_config.json`` gets ``model_input_names``: the tokenizer outputs the graph takes
  (``input_ids``, ``attention_mask``). ``PreTrainedTokenizerFast`` otherwise returns
  ``token_type_ids`` too, which ``generate(**tokenizer(text))`` in optimum refuses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, UnsupportedArchitecture

GENAI_CONFIG = "genai_config.json"

# HF ``model_type`` (what the ONNX exporter keys on, :mod:`edgepack.export.onnx.arch`) ->
# onnxruntime-genai ``model.type`` (one of its decoder-only types; with the names given in the
# config it runs optimum's graph as is). Only rows a test decodes end to end
# (tests/export/test_onnx_ecosystem.py); another exportable type gets no genai_config.json, and
# the export report says so.
GENAI_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",              # Llama 1-3, SmolLM / SmolLM2
    "mistral": "mistral",          # Mistral 7B
    "qwen2": "qwen2",              # Qwen2 / Qwen2.5
    "qwen3": "qwen3",              # Qwen3 dense
    "gemma3_text": "gemma3_text",  # Gemma 3 text-only (Gemma3ForCausalLM)
    "phi3": "phi3",                # Phi-3 / Phi-3.5 / Phi-4-mini
}

# What a HF tokenizer can return, in its usual order; the graph's inputs pick the subset.
TOKENIZER_OUTPUTS = ("input_ids", "token_type_ids", "attention_mask")
_LAYER = re.compile(r"\d+")


def _graph_io(model: Path) -> tuple[dict[str, list[Any]], list[str]]:
    """Input name -> shape (ints or symbolic names) and the output names, without weights."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return inputs, [o.name for o in graph.output]


def _kv_templates(names: list[str], what: str) -> tuple[str, str, int]:
    """(key template, value template, layers) of the cache names, e.g. ``past_key_values.%d.key``."""
    groups: dict[str, set[int]] = {}
    for name in names:
        found = _LAYER.search(name)
        if found:
            groups.setdefault(name[:found.start()] + "%d" + name[found.end():], set()).add(int(found.group()))
    keys = [t for t in groups if t.endswith("key")]
    values = [t for t in groups if t.endswith("value")]
    if len(keys) != 1 or len(values) != 1 or len(groups) != 2 or groups[keys[0]] != groups[values[0]]:
        raise InvalidModelFile(f"cannot read the KV-cache {what} names from the graph: {sorted(names)}",
                               hint="export with edgepack export --format onnx (optimum text-generation-with-past)")
    layers = groups[keys[0]]
    if layers != set(range(len(layers))):
        raise InvalidModelFile(f"KV-cache {what} layers are not 0..{len(layers) - 1}: {sorted(layers)}")
    return keys[0], values[0], len(layers)


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def genai_config(folder: Path, hf_config: dict[str, Any],
                 graph_io: tuple[dict[str, list[Any]], list[str]] | None = None) -> dict[str, Any]:
    """onnxruntime-genai's config for the exported ``folder`` (``model.onnx`` + tokenizer files);
    ``graph_io``: the graph's inputs and outputs if already read (:func:`_graph_io`)."""
    from edgepack.runtime.backends.onnxrt import stop_token_ids

    model_type = hf_config.get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        raise UnsupportedArchitecture(f"no onnxruntime-genai model type for model_type {model_type!r}",
                                      hint=f"supported: {', '.join(sorted(GENAI_MODEL_TYPES))}")
    inputs, outputs = graph_io or _graph_io(folder / "model.onnx")
    plain = {"input_ids", "attention_mask", "position_ids"}
    past_k, past_v, layers = _kv_templates([n for n in inputs if n not in plain], "input")
    present_k, present_v, _ = _kv_templates([n for n in outputs if n != "logits"], "output")
    shape = inputs[past_k % 0]  # [batch, kv_heads, past_len, head_dim]
    n_head = int(hf_config["num_attention_heads"])
    expect = {"num_hidden_layers": layers, "num_key_value_heads": shape[1],
              "head_dim": shape[3]}
    have = {"num_hidden_layers": hf_config.get("num_hidden_layers"),
            "num_key_value_heads": hf_config.get("num_key_value_heads") or n_head,
            "head_dim": hf_config.get("head_dim") or int(hf_config["hidden_size"]) // n_head}
    wrong = [f"{k}: graph {expect[k]}, config.json {have[k]}" for k in expect if expect[k] != have[k]]
    wrong += [f"no {name} {kind} in the graph" for name, kind, names in
              (("input_ids", "input", inputs), ("logits", "output", outputs)) if name not in names]
    if wrong:
        raise InvalidModelFile("the ONNX graph does not match config.json: " + "; ".join(wrong))
    generation = _read(folder / "generation_config.json")
    eos = sorted(stop_token_ids(folder))
    pad = _ids(generation.get("pad_token_id", hf_config.get("pad_token_id"))) or eos[:1]
    context = int(hf_config.get("max_position_embeddings") or 2048)
    names_in = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    decoder = {
        "filename": "model.onnx", "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": shape[3], "hidden_size": int(hf_config["hidden_size"]), "num_attention_heads": n_head,
        "num_hidden_layers": layers, "num_key_value_heads": shape[1],
        "inputs": {**names_in, "past_key_names": past_k, "past_value_names": past_v},
        "outputs": {"logits": "logits", "present_key_names": present_k, "present_value_names": present_v},
    }
    model = {"type": GENAI_MODEL_TYPES[model_type], "context_length": context, "vocab_size": int(hf_config["vocab_size"]),
             "bos_token_id": (_ids(hf_config.get("bos_token_id")) or [-1])[0], "eos_token_id": eos,
             "pad_token_id": pad[0] if pad else -1, "decoder": decoder}
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
              "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0, "length_penalty": 1.0, "early_stopping": True,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path.name} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def write_client_files(folder: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """Set ``model_input_names`` in ``tokenizer_config.json`` and write ``genai_config.json``
    (for a model type in :data:`GENAI_MODEL_TYPES`); returns what was done (export report)."""
    graph_io = _graph_io(folder / "model.onnx")
    inputs = graph_io[0]
    genai: dict[str, Any] = {"genai_config": None, "genai_model_type": None,
                             "genai_note": f"no genai_config.json: model_type {hf_config.get('model_type')!r} is not "
                                           f"one onnxruntime-genai is tested with here"}
    if hf_config.get("model_type") in GENAI_MODEL_TYPES:
        config = genai_config(folder, hf_config, graph_io)
        (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        genai = {"genai_config": GENAI_CONFIG, "genai_model_type": config["model"]["type"]}
    names = [n for n in TOKENIZER_OUTPUTS if n in inputs]
    tok_path = folder / "tokenizer_config.json"
    tok_config = _read(tok_path)
    tok_config["model_input_names"] = names
    tok_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**genai, "tokenizer_model_input_names": names}
