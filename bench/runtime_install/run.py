"""Installed size and start time of the full install (.venv) and the lean runtime install.

    .venv/bin/python bench/runtime_install/run.py      # -> bench/runtime_install/results.{json,md}

Size: ``du -sk`` of each venv's site-packages. Start time: wall time of ``edgepack --help``
(imports the CLI and every command module, no backend), best and median of 7 runs after one
warm-up; and of ``edgepack gate`` (no holdout) on the tests' tiny random-init GGUF bundle, best of
3 after one warm-up: imports, bundle verification, a llama.cpp load and the short timed runs. The
load average is beside them (the machine is shared). The lean venv is dist/runtime/build.py's
cached one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = 7


def _lean_bin() -> Path:
    spec = importlib.util.spec_from_file_location("edgepack_runtime_build", ROOT / "dist" / "runtime" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.lean_venv(Path.home() / ".cache" / "edgepack", build.default_wheelhouses())


def _site_packages(bin_dir: Path) -> Path:
    out = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def _size_mb(folder: Path) -> float:
    kb = subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0]
    return round(int(kb) / 1024, 1)


def _largest(folder: Path, n: int = 8) -> dict[str, float]:
    sizes = {p.name: _size_mb(p) for p in folder.iterdir() if p.is_dir()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:n])


def _help_seconds(bin_dir: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    times = []
    for i in range(RUNS + 1):
        start = time.perf_counter()
        subprocess.run([str(bin_dir / "edgepack"), "--help"], capture_output=True, check=True, env=env, cwd="/")
        if i:  # the first run warms the page cache
            times.append(time.perf_counter() - start)
    return times


def _tiny_bundle(folder: Path) -> tuple[Path, Path]:
    """The tests' tiny Llama as a GGUF bundle, and a profile for this host (built in this venv)."""
    import platform as plat

    sys.path.insert(0, str(ROOT))
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from tests.runtime.helpers import task_bundle, tiny_task, write_profile
    from tests.tiny import build_tiny_llama

    gguf = convert_hf_to_gguf(build_tiny_llama(folder / "llama"), folder / "tiny-F16.gguf", outtype="F16")
    return (task_bundle(gguf, folder / "tiny.edgepack", tiny_task(), n_ctx=512),
            write_profile(folder, "bench", choices='["gguf:F16"]', context_length=512, arch=plat.machine()))


def _gate_seconds(bin_dir: Path, bundle: Path, profile: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["EDGEPACK_CACHE"] = str(bundle.parent / "cache")
    times = []
    for i in range(4):
        start = time.perf_counter()
        subprocess.run([str(bin_dir / "edgepack"), "gate", str(bundle), "-p", str(profile), "--json"],
                       capture_output=True, check=True, env=env, cwd="/")
        if i:  # the first run also measures and caches the memory bandwidth
            times.append(time.perf_counter() - start)
    return times


def measure(name: str, bin_dir: Path, bundle: Path, profile: Path) -> dict[str, object]:
    site = _site_packages(bin_dir)
    help_s = _help_seconds(bin_dir)
    gate_s = _gate_seconds(bin_dir, bundle, profile)
    probe = ("import importlib.util as u, json; print(json.dumps({n: u.find_spec(n) is not None for n in "
             "('torch', 'transformers', 'optimum', 'onnx', 'matplotlib', 'sklearn', 'onnxruntime', 'llama_cpp')}))")
    has = json.loads(subprocess.run([str(bin_dir / "python"), "-c", probe], capture_output=True, text=True,
                                    check=True, cwd="/").stdout)
    return {"install": name, "venv": str(bin_dir.parent), "site_packages_mb": _size_mb(site),
            "help_s_best": round(min(help_s), 3), "help_s_median": round(statistics.median(help_s), 3),
            "help_runs": RUNS, "gate_s_best": round(min(gate_s), 2), "packages": has, "largest_mb": _largest(site),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _yes(flag: object) -> str:
    return "yes" if flag else "no"


def markdown(result: dict[str, object]) -> str:
    rows = result["installs"]
    lines = ["# Lean runtime install vs full install", "",
             f"Command: `{result['command']}` — {result['machine']}, {result['date']}.", "",
             "| install | site-packages (MB) | `edgepack --help` best (s) | median (s) | `edgepack gate` best (s) "
             "| load avg | torch | sklearn |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        p = r["packages"]
        lines.append(f"| {r['install']} | {r['site_packages_mb']:,} | {r['help_s_best']} | {r['help_s_median']} | "
                     f"{r['gate_s_best']} | {r['load_avg_1m']} | {_yes(p['torch'])} | {_yes(p['sklearn'])} |")
    for r in rows:
        largest = ", ".join(f"{k} {v:g}" for k, v in r["largest_mb"].items())
        lines += ["", f"Largest in {r['install']}: {largest} MB."]
    lines += ["", "Size: `du -sk` of the venv's site-packages (pip itself included in both). Start: wall time of "
              f"`edgepack --help`, {RUNS} runs after one warm-up; `edgepack gate` (no holdout) on the tests' tiny "
              "GGUF bundle, best of 3 after one warm-up. A shared 2-core machine: compare within one run.", ""]
    return "\n".join(lines)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="runtime-install-bench-"))
    bundle, profile = _tiny_bundle(folder)
    result = {"command": "python bench/runtime_install/run.py",
              "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "installs": [measure("full (edgepack)", ROOT / ".venv" / "bin", bundle, profile),
                           measure("lean (edgepack-runtime)", _lean_bin(), bundle, profile)]}
    shutil.rmtree(folder, ignore_errors=True)
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
