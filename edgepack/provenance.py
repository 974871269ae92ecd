"""Where and with what a result was produced: the machine and the tool versions.

Every report that states a measurement records its provenance, and they all gather it here:
the gate report and the pipeline report (``machine_info``, ``load_average``), the bandwidth cache
(``machine_key``), the fidelity report (``host_info``, ``package_versions``) and the bundle's
lineage (``tool_versions``). A teacher's license and languages, as its GGUF header or HF model
card states them, are read here too (``gguf_model_facts``, ``hf_folder_facts``) and recorded in
its ``source.json`` for the model cards (:mod:`edgepack.model_card`). Versions come from package
metadata, so nothing heavy is imported; a package that is not installed is recorded as ``None``, never guessed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# What made a bundle: recorded in its lineage (``lineage.json``'s ``tools``).
BUNDLE_TOOLS = ("llama-cpp-python", "gguf", "transformers", "torch", "tokenizers", "peft", "onnxruntime")
# The inference runtimes a gate measurement depends on.
RUNTIME_TOOLS = ("llama-cpp-python", "onnxruntime")


def package_versions(dists: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when it is not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_mb() -> int:
    """Physical memory in MiB."""
    import psutil

    return psutil.virtual_memory().total // (1024 * 1024)


def machine_info() -> dict[str, Any]:
    """Where a measurement ran: OS, CPU, core count, memory, Python and runtime versions."""
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "memory_mb": memory_mb(),
            "python": platform.python_version(), **package_versions(RUNTIME_TOOLS)}


def machine_key() -> str:
    """What identifies 'this machine' for a per-machine cache: host, CPU model, CPU count, memory."""
    return f"{platform.node()}|{cpu_model()}|{os.cpu_count()}|{memory_mb()}MB"


def host_info() -> dict[str, Any]:
    """The host as a report header gives it: platform, machine, Python, CPU count, load average."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_average_1_5_15": list(load) if load else None}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded to 2 places (None where the OS keeps none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def tool_versions(dists: Iterable[str] = BUNDLE_TOOLS) -> dict[str, str | None]:
    """edgepack's and Python's versions, then each of ``dists``' (nothing imported)."""
    from edgepack import __version__

    return {"edgepack": __version__, "python": platform.python_version(), **package_versions(dists)}


# --- what a teacher says about itself: its license and languages ------------------------------
def _license_id(value: Any) -> str | None:
    """A license as the Hub spells its ids (lowercase, e.g. ``apache-2.0``), or None."""
    return (value.strip().lower() or None) if isinstance(value, str) else None


def _languages(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(x for x in items if isinstance(x, str) and x)


def gguf_model_facts(path: Path) -> dict[str, Any]:
    """``license`` (``general.license``) and ``language`` (``general.languages``) from a GGUF
    header checked by :func:`~edgepack.gguf_header.read_gguf` (None / () when absent)."""
    from edgepack.gguf_header import read_gguf

    meta = read_gguf(path).metadata
    return {"license": _license_id(meta.get("general.license")), "language": _languages(meta.get("general.languages"))}


def hf_folder_facts(folder: Path) -> dict[str, Any]:
    """``license`` and ``language`` from an HF folder's model card front matter (``README.md``;
    None / () when the folder has no card, its YAML does not parse, or it does not say)."""
    import yaml
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {"license": None, "language": ()}
    try:
        data = ModelCard.load(readme).data
    except (ValueError, UnicodeDecodeError, OSError, yaml.YAMLError):  # a README without readable YAML records nothing
        return {"license": None, "language": ()}
    return {"license": _license_id(data.license), "language": _languages(data.language)}
