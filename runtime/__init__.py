"""edgepack.runtime: run, measure, gate and package-verify deployed artifacts.

``session.open_model`` loads a bundle or a model file for chatting; ``gate.run_gate`` measures
an artifact against a profile; ``bundle`` reads and writes the ``.edgepack`` format;
``backends`` maps a format name (``gguf``) to the library that runs it.
"""
