"""Run-directory trust and concurrency: forged run layouts for ``pack``, stages racing on one run.

Imported by run.py (categories ``run-dir-trust`` and ``concurrency``); also runnable alone::

    .venv/bin/python bench/reliability/run_dir_trust.py [trust|concurrency]

``run_dir_trust_category`` (issue #20 defects 7 and 9) packs copies of a real, gated tiny run
after one hostile change each:

- **links**: every file and folder pack reads, replaced by a symbolic link (absolute or
  relative, to the same bytes moved outside, to another file, to ``/etc/hostname``, dangling);
  ``bundles/`` itself a link. Pass: a typed refusal, no bundle, nothing outside changed.
- **paths**: gate reports whose ``artifact_name`` / ``artifact`` use ``..``, absolute paths,
  folders or odd types; ``export.json`` entries that leave the run. Pass: a typed refusal and
  no bundle (or, for export.json, a bundle of the run's own artifact only).
- **forged reports**: flipped verdicts over failing measurements, edited checks, wrong or
  missing hashes, wrong format or quant, reports that are not objects or not JSON. Pass: a
  typed refusal, no bundle.
- **profile collisions**: a profile with the gated one's name and one value changed (and a
  custom ``cpu-x86-2c`` gated, then packed with the shipped one). Pass: refused. Control: the
  same profile from another file is accepted.
- **debris-looking names**: user files named ``*.old-*``, ``*.part-*``, ``*.tmp-*`` (and a
  profile named ``edge.old-1``) survive pack and export; true temporary names of dead pids are
  removed; a swapped-out folder whose final name is missing is put back.

``concurrency_category`` (defect 11) starts N processes of one stage (distill data, distill
train, export, gate, pack, and a mixed round) on one run at the same instant (each waits at a
barrier after its imports). Pass: every process exits 0 or 2 with the one-line lock error
naming the stage, the run and a pid; at least one succeeds; afterwards the run verifies
(artifacts parse and match export.json, bundles verify, reports parse, no debris or lock file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEAD = 999_999_999  # above pid_max
ART = "student-F16.gguf"  # F16 only: the tiny fixture needs no quantized kernels
PASS = "PASS"
REPORT = f"{ART}.json"


def _result(tried: int, faults: int, failures: list[str], details: list[str]) -> dict[str, Any]:
    return {"tried": tried, "faults": faults, "failures": len(failures), "failure_list": failures, "details": details}


def _build(work: Path) -> tuple[Path, dict[str, Path]]:
    """A real run (tiny student, F16 export, gated for tiny-ok and a custom cpu-x86-2c)."""
    sys.path.insert(0, str(ROOT))
    from edgepack.atomic import write_json
    from edgepack.profiles import load_profile
    from edgepack.export.gate.gate import run_gate
    from tests.runtime.helpers import make_run_dir, write_profile
    from tests.tiny import build_tiny_llama

    (work / "profiles").mkdir(parents=True)
    (work / "mine").mkdir()
    profiles = {"ok": write_profile(work / "profiles", "tiny-ok", min_relative_quality=0.0),
                "old": write_profile(work / "profiles", "edge.old-1", min_relative_quality=0.0)}
    profiles["shipped-name"] = write_profile(work / "mine", "cpu-x86-2c", choices='["gguf:F16"]',
                                             min_relative_quality=0.0)
    run = make_run_dir(work / "gated", build_tiny_llama(work / "llama"), [profiles["ok"]], quants=("F16",))
    for key in ("old", "shipped-name"):
        profile = load_profile(str(profiles[key]))
        write_json(run / "gate" / f"{ART}.{profile.name}.json", run_gate(artifact=run / "artifacts" / ART,
                                                                         profile=profile, holdout=None))
    return run, profiles


class _Trial:
    """One hostile copy of the run: ``change`` it, pack, judge the outcome."""

    def __init__(self, base: Path, work: Path, profile: Any, failures: list[str]) -> None:
        self.base, self.work, self.profile, self.failures = base, work, profile, failures
        self.tried = 0

    def copy(self) -> tuple[Path, Path]:
        self.tried += 1
        case = self.work / f"case-{self.tried}"
        shutil.rmtree(case, ignore_errors=True)
        run = Path(shutil.copytree(self.base, case / "run", symlinks=True))
        (case / "outside").mkdir()
        return run, case / "outside"

    def refused(self, label: str, change: Callable[[Path, Path], None], profile: Any = None,
                artifact: str | None = None) -> None:
        from edgepack.errors import EdgepackError
        from edgepack.export.pack.pack import pack_run

        run, outside = self.copy()
        change(run, outside)
        before = _snapshot(outside)
        try:
            result = pack_run(run_dir=run, profile=profile or self.profile, allow_unverified=False,
                              artifact=run / "artifacts" / artifact if artifact else None)
            self.failures.append(f"{label}: packed {Path(result['bundle']).name}")
        except EdgepackError as exc:
            if exc.exit_code not in (1, 2) or "\n" in str(exc):
                self.failures.append(f"{label}: refused with exit {exc.exit_code} / a multi-line message")
        except Exception as exc:  # noqa: BLE001 - any untyped error is the finding
            self.failures.append(f"{label}: untyped {type(exc).__name__}: {exc}")
        if (run / "bundles").is_dir() and any(p.suffix == ".edgepack" for p in (run / "bundles").iterdir()):
            self.failures.append(f"{label}: a bundle was left under a final name")
        if _snapshot(outside) != before:
            self.failures.append(f"{label}: a file outside the run changed")


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# --- links -----------------------------------------------------------------------------------

LINK_FILES = ["run.toml", "teacher/source.json", "student/student.json", "student/train_report.json",
              "student/tokenizer.json", "student/tokenizer_config.json", "student/special_tokens_map.json",
              "student/generation_config.json", "data/report.json", "artifacts/export.json", f"artifacts/{ART}",
              f"gate/{REPORT}"]
LINK_DIRS = ["student", "teacher", "data", "artifacts", "gate"]


def _link_cases(trial: _Trial) -> int:
    n = 0
    for rel in LINK_FILES + LINK_DIRS:
        for how in ("moved-abs", "moved-rel", "other-file", "etc-hostname", "dangling"):
            if rel in LINK_DIRS and how == "etc-hostname":
                continue

            def change(run: Path, outside: Path, rel: str = rel, how: str = how) -> None:
                path = run / rel
                target = outside / rel.replace("/", "_")
                if how.startswith("moved"):
                    shutil.move(path, target)
                elif how == "other-file":
                    _remove(path)
                    target.write_text(json.dumps({"secret": "not for a bundle"}))
                elif how == "dangling":
                    _remove(path)
                    target = outside / "missing"
                else:
                    _remove(path)
                    target = Path("/etc/hostname")
                if how == "moved-rel":
                    target = Path(os.path.relpath(target, path.parent))
                path.symlink_to(target)

            trial.refused(f"link {rel} ({how})", change)
            n += 1

    def bundles_link(run: Path, outside: Path) -> None:
        (run / "bundles").symlink_to(outside)

    trial.refused("link bundles/ -> outside", bundles_link)
    return n + 1


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# --- paths and forged reports ---------------------------------------------------------------------

def _edit_report(**fields: Any) -> Callable[[Path, Path], None]:
    def change(run: Path, outside: Path) -> None:
        path = run / "gate" / REPORT
        report = json.loads(path.read_text())
        for key, value in fields.items():
            if value is ...:
                report.pop(key, None)
            elif callable(value):
                value(report, run, outside)
            else:
                report[key] = value
        path.write_text(json.dumps(report))
    return change


def _outside_artifact(name: str, artifact: Callable[[Path, Path], str] | None = None) -> Callable[..., None]:
    def edit(report: dict[str, Any], run: Path, outside: Path) -> None:
        shutil.copy(run / "artifacts" / ART, outside / "evil.gguf")
        (run / "artifacts" / ART).unlink()  # so only the outside copy could be found
        report["artifact_name"] = name
        report["artifact"] = artifact(run, outside) if artifact else str(outside / "evil.gguf")
    return edit


def _path_cases(trial: _Trial) -> int:
    names = ["../evil.gguf", "../../outside/evil.gguf", "/tmp/evil.gguf", "artifacts/../../outside/evil.gguf",
             "..", ".", "", ".complete", "sub/evil.gguf", "evil.gguf\x00", 123, None, ["evil.gguf"], "evil.gguf"]
    n = 0
    for name in names:
        trial.refused(f"artifact_name {name!r}", _edit_report(artifact_name=_outside_artifact(name)))
        n += 1
    recorded: list[Callable[[Path, Path], str]] = [
        lambda run, out: str(out / "evil.gguf"), lambda run, out: os.path.relpath(out / "evil.gguf"),
        lambda run, out: str(out / ART), lambda run, out: f"{run}/artifacts/../../outside/{ART}",
        lambda run, out: "/etc/hostname"]
    for i, where in enumerate(recorded):
        trial.refused(f"artifact field outside the run #{i}", _edit_report(artifact_name=_outside_artifact(ART, where)))
        n += 1

    def export_escape(run: Path, outside: Path) -> None:
        path = run / "artifacts" / "export.json"
        report = json.loads(path.read_text())
        report["artifacts"] = [{**a, "path": f"../../outside/{a['path']}"} for a in report["artifacts"]]
        path.write_text(json.dumps(report))
        (run / "artifacts" / ART).unlink()
        shutil.copy(trial.base / "artifacts" / ART, outside / ART)

    trial.refused("export.json paths leaving the run", export_escape)
    return n + 1


def _forged_cases(trial: _Trial) -> int:
    def measured(key: str, value: Any) -> Callable[..., None]:
        def edit(report: dict[str, Any], run: Path, outside: Path) -> None:
            report["measurements"][key] = value
        return edit

    def check(name: str, measured_value: float) -> Callable[..., None]:
        def edit(report: dict[str, Any], run: Path, outside: Path) -> None:
            for c in report["checks"]:
                if c["name"] == name:
                    c["measured"] = measured_value
            report["measurements"]["ttft_ms"]["p95"] = 10**7  # the real numbers miss the budget
        return edit

    def failing(report: dict[str, Any], run: Path, outside: Path) -> None:
        report["measurements"]["ok"] = False
        report["measurements"]["error"] = "the model could not be loaded"

    forged: dict[str, dict[str, Any]] = {
        "verdict PASS over a missed TTFT": {"measurements": measured("ttft_ms", {"p95": 10**7, "p50": 1})},
        "verdict PASS over a missed decode speed": {"measurements": measured("decode_tokens_per_s", {"p50": 0.01})},
        "verdict PASS over a missed memory budget": {"measurements": measured("peak_rss_mb", 10**7)},
        "verdict PASS over a failed measurement": {"measurements": failing},
        "verdict PASS over a failed holdout": {"measurements": measured("quality", {"error": "crashed"})},
        "verdict PASS over low quality": {"measurements": measured("quality", {"relative": -0.5, "accuracy": 0.0,
                                                                                "teacher_accuracy": 1.0})},
        "checks edited to hide a miss": {"checks": check("ttft_p95_ms", 1.0)},
        "measurements removed": {"measurements": ...}, "measurements null": {"measurements": None},
        "measurements a string": {"measurements": "fast"}, "host removed": {"host": ...},
        "host a list": {"host": [True]}, "checks removed": {"checks": ...}, "checks a dict": {"checks": {}},
        "reasons a string": {"reasons": "fine"}, "model_sha256 wrong": {"model_sha256": "0" * 64},
        "model_sha256 removed": {"model_sha256": ..., "artifact_sha256": ...},
        "model_sha256 a number": {"model_sha256": 7, "artifact_sha256": 7},
        "profile_sha256 removed": {"profile_sha256": ...}, "profile_sha256 wrong": {"profile_sha256": "f" * 64},
        "profile_sha256 a list": {"profile_sha256": []}, "format onnx": {"format": "onnx"},
        "format exe": {"format": "exe"}, "quant Q4_K_M": {"quant": "Q4_K_M"}, "quant null": {"quant": None},
        "verdict lower case": {"verdict": "pass"}, "verdict missing": {"verdict": ...},
    }
    n = 0
    for label, fields in forged.items():
        trial.refused(f"forged report: {label}", _edit_report(**{"verdict": PASS, **fields}), artifact=ART)
        n += 1
    for label, text in {"not JSON": "{PASS", "a list": "[1]", "a string": '"PASS"', "empty": "",
                        "deeply nested": "[" * 100000 + "]" * 100000, "not UTF-8": "\udcff"}.items():
        def write(run: Path, outside: Path, text: str = text) -> None:
            (run / "gate" / REPORT).write_bytes(text.encode("utf-8", "surrogateescape"))
        trial.refused(f"report file {label}", write)
        n += 1
    return n


def _collision_cases(trial: _Trial, work: Path, profiles: dict[str, Path]) -> tuple[int, int]:
    from edgepack.export.pack.pack import pack_run
    from edgepack.profiles import load_profile
    from tests.runtime.helpers import write_profile

    changed = {"ttft_p95_ms": 0.001, "min_decode_tokens_per_s": 10**6, "memory_budget_mb": 1, "threads": 2,
               "min_relative_quality": 1.0, "context_length": 128, "prompt_tokens": 16, "arch": "aarch64",
               "choices": '["gguf:F16", "gguf:Q8_0"]', "device": "cuda"}
    n = 0
    for key, value in changed.items():
        folder = work / "collide" / key
        folder.mkdir(parents=True)
        profile = load_profile(str(write_profile(folder, "tiny-ok", **{"min_relative_quality": 0.0, key: value})))
        trial.refused(f"same-name profile, {key}={value}", lambda run, outside: None, profile=profile)
        n += 1
    trial.refused("custom cpu-x86-2c gated, shipped cpu-x86-2c packed", lambda run, outside: None,
                  profile=load_profile("cpu-x86-2c"))
    # control: the very profile, loaded from another file, is the same profile
    twin = work / "collide" / "twin.toml"
    twin.write_bytes(profiles["ok"].read_bytes().replace(b'description = "test profile"',
                                                         b'# a comment\ndescription = "test profile"'))
    run, _ = trial.copy()
    try:
        pack_run(run_dir=run, profile=load_profile(str(twin)), artifact=None, allow_unverified=False)
    except Exception as exc:  # noqa: BLE001
        trial.failures.append(f"control: the same profile from another file was refused: {exc}")
    return n + 2, n + 1


def _debris_cases(trial: _Trial, profiles: dict[str, Path]) -> tuple[int, int]:
    from edgepack.export.api import export_model
    from edgepack.export.pack.pack import pack_run
    from edgepack.profiles import load_profile

    run, _ = trial.copy()
    user = ["edge.old-1", "x.part-1", "y.tmp-2", f"z.part-{DEAD}", f"w.part-{DEAD}.edgepack-tmp.bak",
            f"v.old-{DEAD}.edgepack-tmpx", "u.tmp-", ".part-3", f"t.tmp-{DEAD}-x.edgepack-tmp",
            f"live.part-{os.getpid()}.edgepack-tmp", "init.tmp-1.edgepack-tmp"]
    stale = [f"gone.part-{DEAD}.edgepack-tmp", f"gone-dir.tmp-{DEAD}.edgepack-tmp"]
    for folder in (run / "artifacts", run / "bundles"):
        folder.mkdir(exist_ok=True)
        for name in user + stale:
            (folder / name).write_bytes(b"user data" if name in user else b"half")
        old = folder / f"restored.old-{DEAD}.edgepack-tmp"
        old.mkdir()
        (old / "weights.bin").write_bytes(b"finished")
    first = Path(pack_run(run_dir=run, profile=load_profile(str(profiles["old"])), artifact=None,
                          allow_unverified=False)["bundle"])
    try:
        pack_run(run_dir=run, profile=load_profile(str(profiles["ok"])), artifact=None, allow_unverified=False)
        export_model(source=run, fmt="gguf", quants=["F16"], out_dir=None, fidelity=False)
    except Exception as exc:  # noqa: BLE001 - e.g. a deleted user file under a name a later step reads
        trial.failures.append(f"pack/export with debris-looking names failed: {type(exc).__name__}: {exc}")
    for folder in (run / "artifacts", run / "bundles"):
        for name in user:
            if not (folder / name).is_file() or (folder / name).read_bytes() != b"user data":
                trial.failures.append(f"debris-looking user file {folder.name}/{name} was changed or removed")
        for name in stale:
            if (folder / name).exists():
                trial.failures.append(f"stale temporary {folder.name}/{name} was not removed")
        if not (folder / "restored" / "weights.bin").is_file():
            trial.failures.append(f"{folder.name}: a swapped-out finished folder was not put back")
    if not first.is_file():
        trial.failures.append(f"the bundle of profile edge.old-1 ({first.name}) was deleted by the next pack")
    return 2 * (len(user) + len(stale) + 1) + 1, 2 * len(stale)


def run_dir_trust_category(work: Path) -> dict[str, Any]:
    """Every hostile run layout of the module docstring; the counts for the reliability report."""
    sys.path.insert(0, str(ROOT))
    from edgepack.profiles import load_profile

    work = Path(work) / "run-dir-trust"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    base, profiles = _build(work)
    failures: list[str] = []
    details: list[str] = []
    trial = _Trial(base, work / "cases", load_profile(str(profiles["ok"])), failures)
    (work / "cases").mkdir()
    faults = 0
    for name, group in (("links", _link_cases), ("paths", _path_cases), ("forged reports", _forged_cases)):
        before, count = len(failures), group(trial)
        faults += count
        details.append(f"{name}: {count} hostile layouts, {len(failures) - before} packed or mishandled")
    before = len(failures)
    _, hostile = _collision_cases(trial, work, profiles)
    faults += hostile
    details.append(f"profile collisions: {hostile} same-name profiles, {len(failures) - before} packed; "
                   "1 twin profile (same values, another file) must pack")
    before = len(failures)
    names, hostile = _debris_cases(trial, profiles)
    faults += hostile
    details.append(f"debris-looking names: {names} names and folders checked after two packs and an export, "
                   f"{len(failures) - before} mishandled")
    details.append(f"{time.monotonic() - t0:.0f} s in all")
    # tried: every hostile copy packed, the twin control, and each name of the debris run
    return _result(trial.tried - 1 + names, faults, failures, details)


# --- concurrency ------------------------------------------------------------------------------

def _child(ready: str, go: str, args: list[str]) -> None:
    """One CLI process: heavy imports first, then wait at the barrier, then run ``edgepack args``."""
    import torch  # noqa: F401 - imported before the barrier so every child starts its stage at once
    import transformers  # noqa: F401

    from edgepack.cli import main

    Path(ready).write_text(str(os.getpid()))
    while not Path(go).exists():
        time.sleep(0.002)
    sys.exit(main(args))


def _race(label: str, commands: list[tuple[str, list[str]]], run: Path, work: Path,
          failures: list[str], allowed: Callable[[str, str], bool] | None = None) -> dict[str, int]:
    """Start every (stage, argv) at the same instant; classify each ending."""
    folder = work / label.replace(" ", "-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    go = folder / "go"
    procs = []
    env = {**os.environ, "COLUMNS": "400"}
    for i, (stage, args) in enumerate(commands):
        err = open(folder / f"{i}.err", "w")
        procs.append((stage, subprocess.Popen([sys.executable, __file__, "--child", str(folder / f"{i}.ready"),
                                               str(go), *args], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                              env=env), err))
    deadline = time.monotonic() + 600
    while not all((folder / f"{i}.ready").exists() or p.poll() is not None for i, (_, p, _) in enumerate(procs)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    go.write_text("go")
    counts = {"ok": 0, "locked": 0, "other": 0}
    for i, (stage, proc, err) in enumerate(procs):
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        err.close()
        text = " ".join((folder / f"{i}.err").read_text(errors="replace").split())
        if code == 0:
            counts["ok"] += 1
        elif code == 2 and f"error: {stage} is already running on {run} (pid " in text and text.count("error:") == 1:
            counts["locked"] += 1
        elif allowed is not None and allowed(stage, text):
            counts["other"] += 1
        else:
            failures.append(f"{label}: {stage} #{i} exit {code}: {text[-300:]}")
    if not counts["ok"]:
        failures.append(f"{label}: no process succeeded ({counts})")
    return counts


def _verify_run(run: Path, label: str, failures: list[str]) -> None:
    """After a round: artifacts match export.json and parse, bundles verify, reports parse, nothing left over."""
    from edgepack.atomic import is_temp_name
    from edgepack.runtime.bundle.archive import verify_bundle
    from edgepack.gguf_header import read_gguf

    problems = []
    export = run / "artifacts" / "export.json"
    if export.is_file():
        for a in json.loads(export.read_text())["artifacts"]:
            path = run / "artifacts" / a["path"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != a["sha256"]:
                problems.append(f"{a['path']} does not match export.json")
            elif path.suffix == ".gguf":
                read_gguf(path)
    for bundle in (run / "bundles").glob("*.edgepack") if (run / "bundles").is_dir() else []:
        try:
            verify_bundle(bundle)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{bundle.name}: {exc}")
    for report in (run / "gate").glob("*.json") if (run / "gate").is_dir() else []:
        try:
            json.loads(report.read_text())
        except ValueError as exc:
            problems.append(f"{report.name}: {exc}")
    problems += [f"left over: {p.relative_to(run)}" for p in run.rglob("*")
                 if is_temp_name(p.name) or (p.name.startswith(".edgepack-") and p.name.endswith(".lock"))]
    failures += [f"{label}: {p}" for p in problems]


def concurrency_category(work: Path, n: int = 3) -> dict[str, Any]:
    """``n`` processes per stage on one run at once, then a mixed round; see the module docstring."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny import build_tiny_llama

    work = Path(work) / "concurrency"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    base, profiles = _build(work / "fixture")
    ok = str(profiles["ok"])
    failures: list[str] = []
    details: list[str] = []
    tried = 0

    def fresh(name: str) -> Path:
        return Path(shutil.copytree(base, work / name / "run"))

    rounds: list[tuple[str, Path, list[tuple[str, list[str]]], Callable[[str, str], bool] | None]] = []
    run = fresh("export")
    rounds.append(("export", run, [("export", ["export", str(run), "--quant", "F16", "--no-fidelity"])] * n, None))
    run = fresh("gate")
    report = run / "gate" / REPORT
    rounds.append(("gate", run, [("gate", ["gate", str(run / "artifacts" / ART), "--profile", ok,
                                           "--report", str(report)])] * n, None))
    run = fresh("pack")
    rounds.append(("pack", run, [("pack", ["pack", str(run), "--profile", ok])] * n, None))
    run = fresh("mixed")
    mixed = [("export", ["export", str(run), "--quant", "F16", "--no-fidelity"]),
             ("pack", ["pack", str(run), "--profile", ok]),
             ("gate", ["gate", str(run / "artifacts" / ART), "--profile", ok, "--report", str(run / "gate" / REPORT)])]
    # A pack that races a re-export of its artifact may refuse it as changed: the designed outcome.
    rounds.append(("mixed", run, mixed * n,
                   lambda stage, text: stage == "pack" and ("changed while it was packed" in text
                                                            or "not the file that was gated" in text)))
    # distill data: the built-in teacher on 8 prompts (a random tiny teacher never finishes an answer)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Pump P-10{i} vibration alarm {i}. Category?"}) + "\n"
                               for i in range(8)))
    data_run = work / "distill-data" / "run"
    rounds.append(("distill data", data_run, [("distill data", [
        "distill", "data", "--out", str(data_run), "--data", str(prompts), "--format-regex", "(?s).*"])] * n, None))
    # distill train: a tiny 4-layer teacher's run, two steps
    from tests.distill.conftest import make_run

    train_run = make_run(work / "distill-train" / "run", build_tiny_llama(work / "teacher", layers=4))
    rounds.append(("distill train", train_run, [("distill train", [
        "distill", "train", str(train_run), "--profile", "cpu-x86-2c", "--steps", "2"])] * n, None))
    for label, run, commands, allowed in rounds:
        counts = _race(label, commands, run, work / "logs", failures, allowed)
        tried += len(commands)
        _verify_run(run, label, failures)
        details.append(f"{label}: {len(commands)} processes at once: {counts['ok']} ran, {counts['locked']} "
                       f"refused with the lock line" + (f", {counts['other']} refused a changed artifact"
                                                       if counts["other"] else ""))
    details.append(f"{time.monotonic() - t0:.0f} s in all")
    return _result(tried, tried, failures, details)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3], sys.argv[4:])
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    out: dict[str, Any] = {}
    if which in ("trust", "both"):
        out["run-dir-trust"] = run_dir_trust_category(Path(tempfile.mkdtemp()))
    if which in ("concurrency", "both"):
        out["concurrency"] = concurrency_category(Path(tempfile.mkdtemp()))
    print(json.dumps(out, indent=1))
