"""`edgepack gate` and `gate --search` through the real CLI on a tiny GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgepack.profiles import PROFILE_DIR


def _profile(tmp_path: Path) -> Path:
    text = (PROFILE_DIR / "cpu-x86-2c.toml").read_text().replace('name = "cpu-x86-2c"', 'name = "tiny-1t"')
    text = text.replace("threads = 2", "threads = 1")
    path = tmp_path / "tiny-1t.toml"
    path.write_text(text)
    return path


def test_gate_and_search_cli(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    gguf = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "tiny-F16.gguf", outtype="F16")
    profile = _profile(tmp_path)
    report = tmp_path / "reports" / "tiny.json"
    out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(gguf), "--profile", str(profile),
                          "--report", str(report), "--json"], capture_output=True, text=True, timeout=600)
    data = json.loads(out.stdout)
    assert data["verdict"] in ("PASS", "FAIL") and out.returncode == (0 if data["verdict"] == "PASS" else 1)
    assert report.is_file() and report.with_suffix(".md").is_file()
    out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(gguf), "--profile", str(profile),
                          "--search", "--json"], capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout)
    assert {"rows", "chosen", "pareto"} <= set(result)
    assert out.returncode == (0 if result["chosen"] else 1)
