"""Which models the ONNX exporter takes: those optimum can export as a decoder with a KV cache.

The ONNX path has its own answer, not the GGUF registry's: optimum registers an ONNX
config per HF ``model_type`` (``gemma3_text``, ``phi3``, ``llama``, ...) and the exporter
needs task ``text-generation-with-past`` from it. :func:`check_onnx_architecture` asks
optimum's ``TasksManager`` before any weight is read and raises
:class:`~edgepack.errors.UnsupportedArchitecture` listing what optimum supports.
"""

from __future__ import annotations

from typing import Any

from edgepack.errors import InvalidModelFile, UnsupportedArchitecture

ONNX_TASK = "text-generation-with-past"


def onnx_model_types() -> list[str]:
    """HF ``model_type`` values optimum exports with :data:`ONNX_TASK`."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    supported = TasksManager._SUPPORTED_MODEL_TYPE  # optimum's registry: model_type → exporter → tasks
    return sorted(mt for mt, exporters in supported.items() if ONNX_TASK in exporters.get("onnx", {}))


def check_onnx_architecture(config: dict[str, Any]) -> str:
    """The config's ``model_type`` if optimum can export it as a KV-cached decoder."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InvalidModelFile("config.json has no model_type; not an HF transformers model")
    supported = onnx_model_types()
    if model_type not in supported:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} cannot be exported to ONNX as a text-generation model by optimum",
            hint=f"supported model types: {', '.join(supported)}")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = config.get("architectures") or []
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not archs or archs[0] != causal:
        # optimum also exports encoder-decoders and multimodal models; the ONNX runtime and
        # the gate drive a text-only decoder, transformers' causal-LM class for the model_type.
        raise UnsupportedArchitecture(
            f"architecture {archs[0] if archs else None!r} is not the causal LM of model_type {model_type!r}",
            hint=f"the ONNX exporter takes {causal or 'a text-only *ForCausalLM model'}")
    return model_type
