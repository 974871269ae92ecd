"""The folders are the pipeline: imports run distill → export → runtime → (profiles, core), never back.

Every module's imports are read with :mod:`ast` (function-level imports included, since heavy
libraries and stage code are imported lazily), so a backward arrow fails here before a reader
trips over it. The CLI (``edgepack/cli.py``, ``edgepack/commands/``), ``edgepack/pipeline.py`` and
``edgepack/__main__.py`` sit on top and may import every stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> the installed package name
PACKAGES = {"distill": "edgepack.distill", "export": "edgepack.export", "runtime": "edgepack.runtime",
            "profiles": "edgepack.profiles", "edgepack": "edgepack"}
TOP = ("edgepack.cli", "edgepack.commands", "edgepack.pipeline", "edgepack.__main__")
# layer -> the stage packages its modules must not import
FORBIDDEN = {
    "edgepack.runtime": ("edgepack.export", "edgepack.distill"),
    "edgepack.export": ("edgepack.distill",),
    "edgepack.profiles": ("edgepack.runtime", "edgepack.export", "edgepack.distill"),
    "core": ("edgepack.runtime", "edgepack.export", "edgepack.distill", "edgepack.profiles"),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([package, *parts]), path))
    return out


def _layer(module: str) -> str | None:
    if module.startswith(TOP):
        return None
    for layer in ("edgepack.runtime", "edgepack.export", "edgepack.profiles", "edgepack.distill"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "core"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in _modules():
        layer = _layer(module)
        if layer is None or layer == "edgepack.distill":
            continue
        for lineno, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)}:{lineno} ({layer}) imports {name}")
    return sorted(set(bad))


def test_no_backward_imports() -> None:
    assert _violations() == []


def test_walker_sees_function_level_imports(tmp_path: Path) -> None:
    """The walker must see an import inside a function; a planted one is reported."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from edgepack.export.api import export_model\n")
    assert (2, "edgepack.export.api") in _imports(planted)
