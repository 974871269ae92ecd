"""Fidelity: how faithfully each exported artifact reproduces its source model — the models compared
(models.py), the prompts (prompts.py), the metrics (metrics.py), the report and its markdown."""
