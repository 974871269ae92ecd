"""edgepack: distill a teacher LLM into a small, verified bundle for a named edge device.

Stages live in their own packages: ``edgepack.distill`` → ``edgepack.export`` →
``edgepack.runtime``, with ``edgepack.profiles`` as data. This package holds the CLI and
what every stage shares: errors, constants, run config, atomic files and stage locks, the
format registry (formats.py), the one memory estimator (memory.py), the bounded GGUF header
reader (gguf_header.py), hashing and provenance, and the task contract with its scorer
(task.py, scoring.py).
"""

from __future__ import annotations

__version__ = "0.1.0"
