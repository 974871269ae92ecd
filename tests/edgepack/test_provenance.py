"""One provenance: the gate, bandwidth cache, fidelity report and bundle lineage all record it from here."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

from edgepack import __version__
from edgepack.provenance import (BUNDLE_TOOLS, cpu_model, host_info, machine_info, machine_key, package_versions,
                                 tool_versions)


def test_machine_info_keys_and_values() -> None:
    info = machine_info()
    # The gate report's and the pipeline report's "machine" object: these keys, in this order.
    assert list(info) == ["system", "release", "machine", "cpu", "cpu_count", "memory_mb", "python",
                          "llama-cpp-python", "onnxruntime"]
    assert info["machine"] == platform.machine() and info["cpu_count"] == os.cpu_count()
    assert info["cpu"] == cpu_model() and info["cpu"]
    assert info["llama-cpp-python"] == md.version("llama-cpp-python")
    assert isinstance(info["memory_mb"], int) and info["memory_mb"] > 0


def test_machine_key_names_host_cpu_count_and_memory() -> None:
    node, cpu, count, mem = machine_key().split("|")
    assert (node, cpu, count) == (platform.node(), cpu_model(), str(os.cpu_count()))
    assert mem == f"{machine_info()['memory_mb']}MB"


def test_versions_record_missing_packages_as_none() -> None:
    got = package_versions(["numpy", "edgepack-no-such-distribution"])
    assert got == {"numpy": md.version("numpy"), "edgepack-no-such-distribution": None}
    tools = tool_versions()
    assert list(tools) == ["edgepack", "python", *BUNDLE_TOOLS]
    assert tools["edgepack"] == __version__ and tools["python"] == platform.python_version()


def test_host_info_keys() -> None:
    host = host_info()
    assert list(host) == ["platform", "machine", "python", "cpu_count", "load_average_1_5_15"]
    assert host["load_average_1_5_15"] is None or len(host["load_average_1_5_15"]) == 3
