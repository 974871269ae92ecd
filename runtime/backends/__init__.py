"""Runtime backends, one per artifact format, registered by exact format name (see base.py)."""
