"""CLI command groups: each a thin typer wrapper around a typed library function."""
