"""Template bombs: hostile chat templates through every loader, each under a deadline and a memory cap.

Imported by run.py (category ``template-bombs``); also runnable on its own::

    .venv/bin/python bench/reliability/template_bombs.py [--quick]

Every bomb of :mod:`tests.reliability.template_bombs` (the named ones and
:func:`~tests.reliability.template_bombs.generated_bombs`: nested loops of several depths and
sizes, power towers, repeats, doubling ``~``/``+``/block captures, integer squaring, recursion
and fan-out, deep nesting, growing filters and string methods, constant folding in dead
branches) goes through:

- ``check``: :func:`edgepack.runtime.chat.check.check_chat_templates` in this process;
- ``run`` on a tiny GGUF carrying it as ``tokenizer.chat_template`` (every bomb) and as a
  named ``tokenizer.chat_template.tool_use`` variant (llama-cpp-python compiles those too);
- ``gate`` without ``--holdout`` (every bomb) and with it; ``serve``; ``export`` of an HF
  folder whose ``tokenizer_config.json`` carries it (GGUF and ONNX); ``pack`` of a gated run
  whose artifact was swapped for the bomb and its report re-forged to match.

A failure is a command still running at the deadline (60 s), a process tree above 1 GB of
resident memory, an exit code other than 2, or a refusal that does not name the chat template.
Templates that merely fail to render (OverflowError, ZeroDivisionError...) are not bombs: the
server starts for plain completions with them, and a named variant that fails to render is never
used, so ``serve`` and the variant case are not run on those.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOLDOUT = ROOT / "distill" / "demo" / "holdout.jsonl"
# The slower commands run on every bomb in the full count, on this many in --quick.
QUICK_SAMPLE = 12


class _Tally:
    def __init__(self) -> None:
        self.tried = 0
        self.failures: list[str] = []
        self.per_command: dict[str, dict[str, Any]] = {}

    def record(self, command: str, name: str, problem: str | None, seconds: float, rss_mb: float) -> None:
        self.tried += 1
        c = self.per_command.setdefault(command, {"tried": 0, "refused": 0, "max_s": 0.0, "max_rss_mb": 0.0})
        c["tried"] += 1
        c["refused"] += problem is None
        c["max_s"] = max(c["max_s"], seconds)
        c["max_rss_mb"] = max(c["max_rss_mb"], rss_mb)
        if problem is not None:
            self.failures.append(f"{command} {name}: {problem}")


def _cli(tally: _Tally, command: str, name: str, args: list[str]) -> None:
    from tests.reliability.template_bombs import run_bounded

    outcome = run_bounded(args)
    problem = outcome.problem()
    if problem is None and "template" not in outcome.stderr:
        problem = f"refused without naming the chat template: {outcome.stderr.strip()[-200:]}"
    tally.record(command, name, problem, outcome.seconds, outcome.peak_rss_mb)


def _check_in_process(tally: _Tally, name: str, template: str) -> None:
    from edgepack.errors import InvalidModelFile, UnsafeModelError
    from edgepack.runtime.chat.check import check_chat_templates

    t0 = time.monotonic()
    try:
        check_chat_templates({"tokenizer.chat_template": template}, render="tokenizer.chat_template",
                             compilers=("llama_cpp", "transformers"), strict=True, where=name)
        problem: str | None = "accepted"
    except (UnsafeModelError, InvalidModelFile):
        problem = None
    except Exception as exc:  # noqa: BLE001 - any other error is a finding
        problem = f"{type(exc).__name__}: {str(exc)[:160]}"
    tally.record("check", name, problem, time.monotonic() - t0, 0.0)


def _fixtures(work: Path) -> dict[str, Path]:
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from tests.runtime.helpers import make_run_dir, write_profile
    from tests.tiny import build_tiny_llama

    hf = build_tiny_llama(work / "tiny")
    gguf = convert_hf_to_gguf(hf, work / "tiny-F16.gguf", outtype="F16")
    profile = write_profile(work, "bombs", min_relative_quality=0.0)
    run = make_run_dir(work / "gated-run", hf, [profile], quants=("F16",))
    return {"hf": hf, "gguf": gguf, "profile": profile, "run": run}


def template_bombs_category(work: Path, quick: bool = False) -> dict[str, Any]:
    """Every bomb through every loader; see the module docstring for what counts as a failure."""
    sys.path.insert(0, str(ROOT))
    from tests.reliability.template_bombs import BOMBS, BROKEN, bomb_gguf, bomb_hf_dir, bomb_run_dir, generated_bombs

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fx = _fixtures(work)
    bombs = {**BOMBS, **generated_bombs()}
    names = sorted(bombs)
    sample = names if not quick else names[:: max(1, len(names) // QUICK_SAMPLE)]
    tally = _Tally()
    for name in names:
        _check_in_process(tally, name, bombs[name])
    for i, name in enumerate(names):
        case = work / f"case{i}"
        case.mkdir()
        path = bomb_gguf(fx["gguf"], case / "bomb.gguf", bombs[name])
        _cli(tally, "run", name, ["run", str(path), "--prompt", "Pump P-101 alarm", "--max-tokens", "2"])
        _cli(tally, "gate", name, ["gate", str(path), "--profile", str(fx["profile"]),
                                   "--report", str(case / "gate.json")])
        if name in sample:
            if name not in BROKEN:  # a merely broken variant nobody renders is no reason to refuse
                variant = bomb_gguf(fx["gguf"], case / "variant.gguf", bombs[name],
                                    key="tokenizer.chat_template.tool_use")
                _cli(tally, "run (named variant)", name, ["run", str(variant), "--prompt", "hi", "--max-tokens", "2"])
            _cli(tally, "gate --holdout", name, ["gate", str(path), "--profile", str(fx["profile"]),
                                                 "--holdout", str(HOLDOUT), "--report", str(case / "gate-h.json")])
            if name not in BROKEN:
                _cli(tally, "serve", name, ["serve", str(path), "--port", str(_free_port())])
            hf = bomb_hf_dir(fx["hf"], case / "hf", bombs[name])
            for fmt in ("gguf", "onnx"):
                _cli(tally, f"export --format {fmt}", name, ["export", str(hf), "--format", fmt, "--out",
                                                             str(case / f"out-{fmt}"), "--no-fidelity"])
            run = bomb_run_dir(fx["run"], case / "run", bombs[name])
            _cli(tally, "pack", name, ["pack", str(run), "--profile", str(fx["profile"])])
        shutil.rmtree(case, ignore_errors=True)
    details = [f"{cmd}: {c['refused']}/{c['tried']} refused (exit 2), slowest {c['max_s']:.1f} s"
               + (f", largest process tree {c['max_rss_mb']:.0f} MB" if c["max_rss_mb"] else " (in-process)")
               for cmd, c in tally.per_command.items()]
    details.append(f"{len(names)} templates ({len(BROKEN & set(names))} merely broken, the rest bombs); "
                   f"slower commands on {len(sample)}; deadline 60 s, memory cap 1 GB")
    return {"tried": tally.tried, "faults": tally.tried, "failures": len(tally.failures),
            "failure_list": tally.failures, "details": details, "seconds": round(time.monotonic() - t0, 1)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    print(json.dumps(template_bombs_category(Path(tempfile.mkdtemp()), quick="--quick" in sys.argv), indent=1))
