"""RELIABILITY.md's list of runs (bench/reliability/run.py): after ``--merge`` runs it names
each run whose categories are still reported, and drops a run whose categories were all replaced.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

RUN_PY = Path(__file__).resolve().parents[2] / "bench" / "reliability" / "run.py"


def load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliability_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(command: str, **extra: object) -> dict[str, object]:
    return {"command": command, "loadavg_start": [1.0], "loadavg_end": [1.0], "seconds": 1.0, **extra}


def test_live_runs_keeps_the_latest_run_of_each_category(tmp_path: Path) -> None:
    run = load_run()
    runs = [record(".venv/bin/python bench/reliability/run.py"),  # every category
            record("run.py --only kill-train,kill-pack,gguf-native --trials 24 --merge"),
            record("run.py --only gguf-native,disk-full,fuzz --merge"),
            record("run.py --merge", produced=["kill-train", "kill-export", "kill-pack", "disk-full"])]
    live = run.live_runs(runs)
    assert [r["categories"] for r in live] == [["server"], ["gguf-native", "fuzz"],
                                               ["kill-train", "kill-export", "kill-pack", "disk-full"]]
    assert live[0]["command"] == runs[0]["command"]
    assert run.live_runs(live) == live  # idempotent: --markdown-only may apply it again

    results = {"runs": live, "machine": "test machine", "categories": [], "explanations": {}}
    out = tmp_path / "RELIABILITY.md"
    run.write_markdown(results, out)
    text = out.read_text()
    assert "--trials 24" not in text  # the dropped run is not listed
    assert "in this report: gguf-native, fuzz" in text
