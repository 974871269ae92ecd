"""Where and with what a result was produced: the machine and the tool versions.

Every report that states a measurement records its provenance, and they all gather it here:
the gate report and the pipeline report (``machine_info``, ``load_average``), the bandwidth cache
(``machine_key``), the fidelity report (``host_info``, ``package_versions``) and the bundle's
lineage (``tool_versions``). Versions come from package metadata, so nothing heavy is
imported; a package that is not installed is recorded as ``None``, never guessed.
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
