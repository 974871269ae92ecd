"""Build ``edgepack-runtime``: the lean distribution for the device (issue #21).

    python dist/runtime/build.py [--out DIR]      # -> DIR/edgepack_runtime-<version>-py3-none-any.whl
    python dist/runtime/build.py --venv           # also a venv with only it, cached (tests, bench)

It installs the same ``edgepack`` package as the full distribution (same modules, same
``edgepack`` command) but depends only on what ``verify``, ``run``, ``chat``, ``serve`` and
``gate`` load: no torch, transformers, peft, optimum, onnx or matplotlib. pip extras can only
add to the default install, and the full install must stay the default, so the lean install is
a second distribution from the same tree. It is made from the repository's own pyproject.toml:
the same version, package layout and pins (a runtime dependency is *selected* from the full
list, never pinned twice), with another name and the shorter dependency list. setuptools will
not package folders above a pyproject (sdists cannot use ``package-dir = ../..``), so the
sources are copied into a staging folder next to the generated pyproject and built there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "edgepack-runtime"
# What the device commands import, as distribution names of pyproject.toml's dependencies.
# scikit-learn, sacrebleu and rouge-score: the gate scores the holdout with the same code as the
# workstation (edgepack/scoring.py), so a device's quality numbers equal the workstation's.
RUNTIME = ("llama-cpp-python", "onnxruntime", "numpy", "tokenizers", "gguf", "jinja2", "rich", "typer",
           "psutil", "cryptography", "jsonschema", "scikit-learn", "sacrebleu", "rouge-score")
SOURCES = ("edgepack", "distill", "export", "runtime", "profiles", "README.md")


class BuildError(RuntimeError):
    """The runtime distribution or its venv could not be made (the message says which step)."""


_DEPS = re.compile(r"^dependencies = \[\n(.*?)^\]\n", re.M | re.S)


def runtime_pyproject(text: str) -> str:
    """The repository's pyproject.toml renamed to ``edgepack-runtime`` with only the RUNTIME pins."""
    block = _DEPS.search(text)
    if block is None:
        raise BuildError("pyproject.toml: no `dependencies = [` block")
    pins = {re.split(r"[=<>!~\[ ]", line.strip().strip('",'))[0].lower(): line
            for line in block.group(1).splitlines() if line.strip().startswith('"')}
    missing = [n for n in RUNTIME if n not in pins]
    if missing:
        raise BuildError(f"pyproject.toml pins none of {missing}: update RUNTIME in {__file__}")
    deps = "".join(pins[n] + "\n" for n in RUNTIME)
    out = text[:block.start()] + f"dependencies = [\n{deps}]\n" + text[block.end():]
    out, n = re.subn(r'^name = "edgepack"$', f'name = "{NAME}"', out, count=1, flags=re.M)
    if n != 1:
        raise BuildError('pyproject.toml: no `name = "edgepack"` line')
    return out


def build(out_dir: Path) -> Path:
    """Stage the sources with the runtime pyproject and build the wheel into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-runtime-") as tmp:
        stage = Path(tmp)
        for name in SOURCES:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, stage / name)
        (stage / "pyproject.toml").write_text(runtime_pyproject((ROOT / "pyproject.toml").read_text()))
        before = set(out_dir.glob("edgepack_runtime-*.whl"))
        # pip's output is setuptools' warnings about the root pyproject's own layout: shown on failure only.
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "-w", str(out_dir), str(stage)], capture_output=True, text=True)
        if done.returncode:
            raise BuildError(f"pip wheel failed:\n{done.stdout}{done.stderr}")
    made = set(out_dir.glob("edgepack_runtime-*.whl"))
    return sorted(made - before or made)[-1]  # an unchanged rebuild overwrites the same file


def runtime_pins() -> list[str]:
    """The runtime's dependency pins, as the generated pyproject lists them."""
    text = runtime_pyproject((ROOT / "pyproject.toml").read_text())
    return [line.strip().strip('",') for line in _DEPS.search(text).group(1).splitlines()]


def lean_venv(cache: Path, wheelhouses: list[Path]) -> Path:
    """A venv holding only ``edgepack-runtime`` and its dependencies; returns its ``bin/``.

    The venv (its dependencies installed once from the index, llama-cpp-python from the local
    ``wheelhouses``, as ``make setup`` built it) is cached under ``cache`` keyed by the pins and the
    Python version; the edgepack wheel itself is rebuilt and reinstalled on every call, so the
    venv always runs this tree's code.
    """
    key = hashlib.sha256("\n".join([sys.version, *runtime_pins()]).encode()).hexdigest()[:12]
    venv = cache / f"runtime-venv-{key}"
    links = [arg for w in wheelhouses for arg in ("--find-links", str(w))]
    wheel = build(cache / "runtime-wheel")
    if not (venv / ".complete").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "pip"), "install", "--quiet", *links, str(wheel)])
        (venv / ".complete").write_text(wheel.name + "\n")
    _run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)])
    return venv / "bin"


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode:
        raise BuildError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def default_wheelhouses() -> list[Path]:
    """``make setup``'s llama-cpp-python wheel folders (~/.cache/edgepack/wheels/<key>/)."""
    return sorted(p.parent for p in (Path.home() / ".cache" / "edgepack" / "wheels").glob("*/llama_cpp_python-*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "runtime", help="wheel folder")
    parser.add_argument("--venv", action="store_true", help="also make the cached lean venv (~/.cache/edgepack)")
    args = parser.parse_args()
    try:
        print(build(args.out))
        if args.venv:
            print(lean_venv(Path.home() / ".cache" / "edgepack", default_wheelhouses()))
    except BuildError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
