"""Stage 3 of edgepack: run deployed artifacts on the device.

``session.open_model`` loads a verified bundle or a bare model file (after the memory
preflight of ``memory.py``) behind one object; ``backends/`` maps a format name to the library
that runs it (llama.cpp, onnxruntime); ``chat/`` renders chat templates in a bounded sandbox
and tokenizes messages; ``bundle/`` reads, verifies and signs the ``.edgepack`` format;
``server/`` is the OpenAI-compatible HTTP server. Nothing here imports ``export`` or
``distill`` (tests/edgepack/test_layers.py).
"""
