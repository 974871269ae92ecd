"""Chat prompts from untrusted templates: the bounded Jinja sandbox (sandbox.py), the pre-compile
check every loader runs (check.py), rendering (template.py) and message tokenization (tokens.py)."""
