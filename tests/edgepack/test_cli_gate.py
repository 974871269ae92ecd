"""`edgepack gate` and `gate --search` through the real CLI on a tiny GGUF."""

from __future__ import annotations

import json
import os
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
    # the human table (the reports just written are reused): the quality columns are the task's
    # primary metric ("score" when no holdout measured one) and the relative quality
    out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(gguf), "--profile", str(profile),
                          "--search"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COLUMNS": "300"})
    header = next(line for line in out.stdout.splitlines() if "choice" in line)
    assert "score" in header and "× teacher" in header and "accuracy" not in header, out.stdout


ALARMS = [("Breaker CB-{i} tripped on overcurrent at the motor control centre.", "electrical"),
          ("Gearbox GB-{i} vibration above the alarm limit on the drive end.", "mechanical"),
          ("Hydraulic unit HPU-{i} oil pressure dropped below 80 bar.", "hydraulic_pneumatic"),
          ("Chiller CH-{i} supply water temperature rising past setpoint.", "thermal"),
          ("Pressure transmitter PT-{i} reads a frozen value; signal error.", "instrumentation"),
          ("PLC rack {i} lost Profinet communication with the SCADA server.", "network")]


def test_a_holdout_of_fresh_rows_without_teacher_answers_is_never_pass(tiny_gguf: Path, tmp_path: Path) -> None:
    """40 new alarm rows with gold labels and no recorded teacher responses, as a new user brings
    them: the relative budget cannot be computed, so the verdict is UNVERIFIED (exit 1) with the
    reason, where it used to be PASS with the budget unmeasured. A floor on the primary metric
    needs no teacher: the same rows verify it."""
    rows = [{"prompt": text.format(i=i), "label": label} for i in range(40 // len(ALARMS) + 1)
            for text, label in ALARMS][:40]
    holdout = tmp_path / "fresh.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    relative = _profile(tmp_path).read_text().replace("min_relative_quality = 0.8", "min_relative_quality = 0.0")
    (tmp_path / "relative.toml").write_text(relative.replace('name = "tiny-1t"', 'name = "relative"'))
    report = tmp_path / "out" / "gate.json"
    out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(tiny_gguf), "--profile",
                          str(tmp_path / "relative.toml"), "--holdout", str(holdout), "--report", str(report)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "300"})
    assert out.returncode == 1, out.stdout + out.stderr
    data = json.loads(report.read_text())
    assert data["verdict"] == "UNVERIFIED" and data["host"]["ok"] is True
    q = data["measurements"]["quality"]
    assert (q["rows"], q["answered"], q["teacher_rows"], q["relative"]) == (40, 40, 0, None)
    assert q["primary_metric"] == "accuracy" and q["primary"] is not None  # measured, just not comparable
    assert data["reasons"][0].startswith("relative_quality budget 0 not verified: the holdout rows carry no "
                                         "teacher responses")
    assert "verdict: UNVERIFIED" in out.stdout and "holdout: accuracy" in out.stdout and "(40 scored rows)" in out.stdout
    assert "relative_quality budget 0 not verified" in report.with_suffix(".md").read_text()

    floor = relative.replace("min_relative_quality = 0.0", "min_score = 0.0").replace('name = "tiny-1t"',
                                                                                     'name = "floor"')
    (tmp_path / "floor.toml").write_text(floor)
    out = subprocess.run([sys.executable, "-m", "edgepack", "gate", str(tiny_gguf), "--profile",
                          str(tmp_path / "floor.toml"), "--holdout", str(holdout), "--json"],
                         capture_output=True, text=True, timeout=600)
    data = json.loads(out.stdout)
    assert data["verdict"] == "PASS" and out.returncode == 0, data["reasons"]
    score = next(c for c in data["checks"] if c["name"] == "score")
    assert (score["budget"], score["unit"], score["ok"]) == (0.0, "accuracy", True)
