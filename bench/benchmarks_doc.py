"""Building blocks of BENCHMARKS.md (bench/benchmarks.py): reading results files, naming their
machine and command, markdown tables, PNG plots, and showing a layout the generator does not
know as recorded (never guessed into a chart)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOT_RUN = "not yet run"


# --- reading -----------------------------------------------------------------------------

def load(bench: Path, name: str, file: str = "results.json") -> dict[str, Any] | None:
    path = bench / name / file
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def machine(results: dict[str, Any]) -> str:
    """One line naming the machine, from either layout the bench scripts write."""
    m = results.get("machine_info") if isinstance(results.get("machine_info"), dict) else results.get("machine")
    if isinstance(m, str):
        return m
    if not isinstance(m, dict):
        return "machine not recorded"
    cpus = m.get("cpu_count") or m.get("logical_cpus")
    memory = f"{m['memory_mb']} MB" if m.get("memory_mb") else (f"{m['memory_gb']} GB" if m.get("memory_gb") else None)
    system = " ".join(str(m[k]) for k in ("system", "release") if m.get(k)) or m.get("platform")
    parts = [m.get("cpu"), f"{cpus} CPUs" if cpus else None, memory, system,
             f"Python {m['python']}" if m.get("python") else None]
    return ", ".join(str(p) for p in parts if p)


def provenance(results: dict[str, Any]) -> str:
    """The line above every table: machine, command, date, load."""
    when = results.get("created") or results.get("started") or "date not recorded"
    load = _load_text(results)
    return (f"Machine: {machine(results)}. Command: `{results.get('command', 'not recorded')}` ({when}"
            + (f"; load average {load}" if load else "") + ").")


def _load_text(results: dict[str, Any]) -> str | None:
    for key in ("load_average", "loadavg_start", "load_average_start"):
        value = results.get(key)
        if isinstance(value, dict) and value.get("start"):
            return f"{value['start']} at start"
        if isinstance(value, list):
            return f"{value} at start"
    m = results.get("machine")
    if isinstance(m, dict) and m.get("load_average_start"):
        return f"{m['load_average_start']} at start"
    return None


# --- writing -----------------------------------------------------------------------------

def table(header: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    right = right if right is not None else {i for i in range(len(header)) if i > 0}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _plot(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 4.0)) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


class Doc:
    """BENCHMARKS.md being written, and the PNGs it links."""

    def __init__(self, md_path: Path, plots: Path) -> None:
        self.parts: list[str] = []
        self.md_path = md_path
        self.plots = plots
        self.written: list[Path] = []

    def add(self, *blocks: str) -> None:
        self.parts.extend(b for b in blocks if b)

    def section(self, title: str, results: dict[str, Any] | None, missing: str = "") -> bool:
        """Open a section: its heading, and when ``results`` is None the not-run line (``missing``
        says what is absent) — then False, and the caller writes nothing more."""
        self.add(f"## {title}")
        if results is None:
            self.add(f"*{NOT_RUN}*" + (f": {missing}" if missing else "."))
        return results is not None

    def image(self, name: str, alt: str, draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 4.0)) -> None:
        path = _plot(self.plots / name, draw, size)
        self.written.append(path)
        self.add(f"![{alt}]({Path(os.path.relpath(path, self.md_path.parent)).as_posix()})")

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


# --- generic rendering of a layout this script does not know -------------------------------

def _flat_table(rows: list[dict[str, Any]], names: list[str] | None = None) -> str | None:
    """A table of ``rows``' scalar fields (nested values left out); None when none has one."""
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if all(not isinstance(r.get(c), (dict, list))
                                                                           for r in rows)]
    if not cols:
        return None
    body = [([names[i]] if names else []) + [r.get(c) for c in cols] for i, r in enumerate(rows)]
    return table((["name"] if names else []) + cols, body)


def as_recorded(results: dict[str, Any]) -> list[str]:
    """A layout this script does not know, shown as recorded: the scalar fields; the flat dicts,
    grouped by their keys (e.g. spreads of several measurements); each list or dict of flat dicts."""
    blocks = []
    scalars = [[k, v] for k, v in results.items() if not isinstance(v, (dict, list)) and k != "command"]
    if scalars:
        blocks.append(table(["field", "value"], scalars, right={1}))
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, value in results.items():
        if isinstance(value, dict) and value and not any(isinstance(v, (dict, list)) for v in value.values()):
            groups.setdefault(tuple(value), []).append(key)
    for keys in groups.values():
        blocks.append(_flat_table([results[k] for k in keys], keys) or "")
    for key, value in results.items():
        rows = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else []
        if rows and all(isinstance(r, dict) for r in rows):
            flat = _flat_table(rows, list(value) if isinstance(value, dict) else None)
            if flat:
                blocks.append(f"`{key}`:\n\n{flat}")
    return [b for b in blocks if b]


# --- sections ----------------------------------------------------------------------------------

def _rows_with(tree: Any, key: str) -> list[dict[str, Any]]:
    """Every dict anywhere in ``tree`` that has ``key``."""
    found = []
    if isinstance(tree, dict):
        if key in tree:
            found.append(tree)
        for v in tree.values():
            found += _rows_with(v, key)
    elif isinstance(tree, list):
        for v in tree:
            found += _rows_with(v, key)
    return found


def _name(row: dict[str, Any]) -> str:
    return str(next((row[k] for k in ("method", "recipe", "name", "label", "student", "run") if k in row), "?"))
