"""Packing: a gated artifact of a run (trust.py checks what the run dir says) → a signed ``.edgepack``
bundle with its manifest, Modelfile and model card (pack.py)."""
