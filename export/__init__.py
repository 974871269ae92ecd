"""Stage 2 of edgepack: turn a trained student into gated, packed artifacts.

``api.py`` is ``edgepack export``: merge a LoRA adapter (``merge.py``), convert and quantize to
GGUF (``gguf/``) or ONNX (``onnx/``) and measure how faithful each artifact is (``fidelity/``);
``gate/`` measures an artifact in its real runtime and judges it against a profile
(``edgepack gate``, ``--search``); ``pack/`` turns a gated artifact into a signed ``.edgepack``
bundle. Imports ``runtime`` (to run what it measures), never ``distill``.
"""
