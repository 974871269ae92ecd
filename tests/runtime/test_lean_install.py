"""The lean runtime install (issue #21): ``edgepack-runtime`` in a venv without torch runs the
device commands — verify, run, chat, gate, serve — on a real tiny bundle built in the full venv.

The venv is made once by dist/runtime/build.py's ``lean_venv`` (dependencies from the index,
llama-cpp-python from ``make setup``'s wheel folder) and cached under ~/.cache/edgepack keyed by
the pins; each session reinstalls this tree's edgepack wheel into it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.helpers import HOLDOUT_ROWS, task_bundle, tiny_task, write_profile
from tests.runtime.llama_server import LoopbackServer

ROOT = Path(__file__).resolve().parents[2]
# What the workstation needs and the device must do without.
ABSENT = ("torch", "transformers", "peft", "optimum", "onnx", "matplotlib", "accelerate")

pytestmark = pytest.mark.slow  # the first run builds the venv (about a minute with a warm pip cache)


def _build_module() -> Any:
    spec = importlib.util.spec_from_file_location("edgepack_runtime_build", ROOT / "dist" / "runtime" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lean_bin() -> Path:
    build = _build_module()
    wheelhouses = build.default_wheelhouses()
    if not wheelhouses:
        pytest.skip("no llama-cpp-python wheel in ~/.cache/edgepack/wheels (run `make setup` first): the lean "
                    "venv would compile llama.cpp from source")
    return build.lean_venv(Path.home() / ".cache" / "edgepack", wheelhouses)


@pytest.fixture(scope="module")
def device(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle with the demo task, a profile for this host and the tiny holdout."""
    folder = tmp_path_factory.mktemp("device")
    holdout = folder / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT_ROWS))
    return {"bundle": task_bundle(tiny_gguf, folder / "tiny.edgepack", tiny_task(), n_ctx=512),
            "profile": write_profile(folder, "lean", choices='["gguf:F16"]', context_length=512,
                                      arch=platform.machine()),
            "holdout": holdout, "cache": folder / "cache"}


def _edgepack(lean_bin: Path, device: dict[str, Path], *args: str, stdin: str | None = None,
              expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EDGEPACK_CACHE=str(device["cache"]))
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(lean_bin / "edgepack"), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=600, cwd=device["cache"].parent)  # not the repo: no source on sys.path
    assert done.returncode == expect, f"edgepack {args[0]} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_lean_venv_has_no_workstation_packages(lean_bin: Path) -> None:
    probe = "import importlib.util as u, json; print(json.dumps({n: u.find_spec(n) is not None for n in %r}))"
    done = subprocess.run([str(lean_bin / "python"), "-c", probe % (ABSENT + ("edgepack", "llama_cpp"),)],
                          capture_output=True, text=True, check=True, cwd="/")
    found = json.loads(done.stdout)
    assert found.pop("edgepack") and found.pop("llama_cpp")
    assert not any(found.values()), f"the lean install holds {[n for n, v in found.items() if v]}"


def test_verify_run_chat(lean_bin: Path, device: dict[str, Path]) -> None:
    assert "1 files verified" in _edgepack(lean_bin, device, "verify", str(device["bundle"])).stdout
    ran = _edgepack(lean_bin, device, "run", str(device["bundle"]), "--prompt", "Pump noise", "--max-tokens", "4",
                    "--json")
    assert json.loads(ran.stdout)["completion"]
    chat = _edgepack(lean_bin, device, "chat", str(device["bundle"]), "--max-tokens", "4", stdin="Motor hot\n\n")
    assert chat.stdout.strip()


def test_gate_measures_and_announces_the_missing_kld(lean_bin: Path, device: dict[str, Path],
                                                     tiny_llama_dir: Path) -> None:
    """Latency, memory and holdout quality are measured; the KLD child needs transformers and says so."""
    report = device["cache"].parent / "gate" / "tiny.json"
    gate = _edgepack(lean_bin, device, "gate", str(device["bundle"]), "-p", str(device["profile"]),
                     "--holdout", str(device["holdout"]), "--reference", str(tiny_llama_dir),
                     "--report", str(report), "--json", expect=1)  # random weights miss the quality budget
    result = json.loads(gate.stdout)
    m = result["measurements"]
    assert m["ok"] and m["ttft_ms"]["p95"] > 0 and m["peak_rss_mb"] > m["rss_before_load_mb"] > 0
    assert m["quality"]["answered"] == len(HOLDOUT_ROWS) and m["quality"]["accuracy"] is not None
    assert "torch and transformers not installed" in m["quality"]["kld_vs_reference"]["error"]
    assert any("KLD vs reference" in r and "lean runtime install" in r for r in result["reasons"])
    assert not report.with_suffix(".png").exists()
    assert "matplotlib is not installed" in report.with_suffix(".md").read_text()


def test_serve_answers_one_request(lean_bin: Path, device: dict[str, Path]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = dict(os.environ, EDGEPACK_CACHE=str(device["cache"]))
    command = [str(lean_bin / "edgepack"), "serve", str(device["bundle"]), "--port", str(port), "--threads", "1"]
    with LoopbackServer(command, port, device["cache"].parent / "serve.log", env=env) as server:
        assert server.chat({"model": "tiny", "messages": [{"role": "user", "content": "Pump noise"}],
                            "max_tokens": 4})


def test_onnx_folder_runs_and_gates(lean_bin: Path, device: dict[str, Path], tiny_onnx: dict[str, Any]) -> None:
    """The ONNX backend needs onnxruntime and tokenizers only (no onnx, no optimum)."""
    folder = tiny_onnx["path"]
    ran = _edgepack(lean_bin, device, "run", str(folder), "--prompt", "Pump noise", "--max-tokens", "4", "--json")
    assert json.loads(ran.stdout)["completion"]
    profile = write_profile(device["cache"].parent, "lean-onnx", choices='["onnx:int4"]', context_length=512,
                            arch=platform.machine())
    gate = _edgepack(lean_bin, device, "gate", str(folder), "-p", str(profile), "--json")  # generous budgets: PASS
    assert json.loads(gate.stdout)["measurements"]["ok"]


def test_runtime_pyproject_takes_the_pins_from_pyproject() -> None:
    """The lean distribution's pins are the full one's (selected, never written twice)."""
    build = _build_module()
    root = (ROOT / "pyproject.toml").read_text()
    generated = build.runtime_pyproject(root)
    assert 'name = "edgepack-runtime"' in generated and "torch" not in build.runtime_pins()
    assert all(f'"{pin}",' in root for pin in build.runtime_pins())
    assert len(build.runtime_pins()) == len(build.RUNTIME)
    assert generated.split("[tool.setuptools]")[1] == root.split("[tool.setuptools]")[1]  # same package layout


# Runs the CLI in the full venv, then names every workstation package the command imported.
_IMPORTS_PROBE = """
import atexit, json, sys
watched = set(sys.argv.pop(1).split(","))
atexit.register(lambda: sys.stderr.write("IMPORTED " + json.dumps(sorted(
    {m.split(".")[0] for m in sys.modules} & watched)) + "\\n"))
from edgepack.cli import main
sys.argv[0] = "edgepack"
main()
"""


@pytest.mark.parametrize("command", [["verify"], ["run", "--prompt", "hi", "--max-tokens", "1"],
                                     ["chat", "--max-tokens", "1"], ["gate", "-p", "{profile}"]])
def test_device_commands_import_no_workstation_package_in_the_full_install(
        device: dict[str, Path], command: list[str]) -> None:
    """In the full install too: the device commands never pay for torch's import (``gate`` did, to
    reroute transformers' logging)."""
    import sys

    args = [command[0], str(device["bundle"]), *(a.format(profile=device["profile"]) for a in command[1:])]
    env = dict(os.environ, EDGEPACK_CACHE=str(device["cache"]))
    done = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, ",".join(ABSENT + ("sklearn", "scipy")), *args],
                          input="hi\n\n", capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr, done.stderr[-2000:]
