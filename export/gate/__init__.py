"""The deployment gate: measure an artifact in a child process (measure.py, quality_child.py),
judge it against a profile (gate.py), search the allowed choices (search.py), report (report.py)."""
