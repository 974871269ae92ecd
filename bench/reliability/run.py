"""Reliability trials: SIGKILL during training, export and pack; server abuse; long fuzzing.

    nice -n 10 .venv/bin/python bench/reliability/run.py            # everything, ~20 min on 2 cores
    nice -n 10 .venv/bin/python bench/reliability/run.py --only kill-train --trials 5
    nice -n 10 .venv/bin/python bench/reliability/run.py --only server --merge  # re-run one, keep the rest

Categories (each writes counts into ``bench/reliability/results.json`` and ``RELIABILITY.md``):

* ``kill-train`` / ``kill-export`` / ``kill-pack``: a child process runs the real library call
  (``train_student`` with a checkpoint every step, ``export_model`` to GGUF, ``pack_run``) on a
  tiny model and is sent SIGKILL at a uniformly random time inside the call's measured
  duration. Then: every file under its final name must be complete and verify (checkpoints
  have ``.complete`` and load; GGUFs parse with gguf-py and edgepack's reader and equal the
  uninterrupted output byte for byte; bundles pass ``verify_bundle``); the same call run again
  (``--resume`` for training) must finish with the uninterrupted result; and no temporary
  ``<final>.part|tmp|old-<pid>.edgepack-tmp`` debris may remain after that next run.
* ``server``: the real server in a subprocess on the tiny GGUF: 32 concurrent streams, 100
  sequential requests, oversize bodies, prompts beyond the context, bad parameters, clients
  that disconnect mid-stream; checks status codes, hangs, and the server's RSS after the load.
* ``fuzz``: ``pytest -m fuzz tests/reliability`` with ``EDGEPACK_FUZZ_EXAMPLES`` raised.
* the attack families of issue #20, one module each beside this file (see ``FAMILIES`` in reliability_report.py):
  ``bundle-differential`` (mutated signed bundles vs GNU tar), ``template-bombs``,
  ``token-injection``, ``slowloris``, ``endpoint-drip``, ``bundle-trust`` (forged manifests,
  a tampered extraction cache), ``run-dir-trust`` (what pack follows and believes) and
  ``concurrency`` (stages racing on one run dir). Each module's docstring says what it counts.

A failure is any check that does not hold; each is listed with what was seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from abuse import native_category, native_loader, server_category  # noqa: E402 - after the path set-up
# live_runs and write_markdown are also read through this module by tests/reliability/test_report.py
from reliability_report import ALL_CATEGORIES, FAMILIES, RUN_KEYS, live_runs, write_markdown  # noqa: E402
STEPS = 6


# ----------------------------------------------------------------------------- child side

def child(kind: str, run: str, marker: str) -> None:
    """Run one library call; touch ``marker`` just before it starts (imports done)."""
    if kind == "gguf-load":
        return native_loader(Path(run), Path(marker))
    import torch  # noqa: F401 - imported before the marker so the kill window is the call itself
    import transformers  # noqa: F401

    from edgepack.profiles import load_profile

    run_dir = Path(run)
    ready = Path(marker)
    if kind == "train":
        from edgepack.distill.train import train_student

        def progress(task: str, done: int, total: int | None = None) -> None:
            if task == "train" and not ready.exists():
                ready.write_text(str(time.time()))

        train_student(run_dir=run_dir, profile=load_profile("cpu-x86-2c"), steps=STEPS, seed=0, resume=True,
                      config=train_config(), progress=progress)
    elif kind == "export":
        import edgepack.export.gguf.convert  # noqa: F401
        import edgepack.export.gguf.quantize  # noqa: F401
        from edgepack.export.api import export_model

        ready.write_text(str(time.time()))
        export_model(source=run_dir, fmt="gguf", quants=["Q8_0"], out_dir=None, fidelity=False)
    elif kind == "pack":
        from edgepack.export.pack.pack import pack_run

        profile = load_profile(str(run_dir.parent / "profiles" / "tiny-ok.toml"))
        ready.write_text(str(time.time()))
        pack_run(run_dir=run_dir, profile=profile, artifact=None, allow_unverified=False)


def train_config() -> Any:
    from edgepack.distill.train import TrainConfig

    return TrainConfig(lr=1e-2, save_every=1, warmup_fraction=0.2, alpha=0.0)


# ----------------------------------------------------------------------------- helpers

def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def debris(folder: Path) -> list[str]:
    from edgepack.atomic import is_temp_name  # the exact names edgepack's atomic writes use

    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if is_temp_name(p.name))


def spawn(kind: str, run: Path, log: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = run.parent / f"{run.name}.ready"
    marker.unlink(missing_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(run), str(marker)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, marker


def wait_marker(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 180) -> float | None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    return time.monotonic()


def calibrate(kind: str, run: Path, log: Path) -> float:
    """Seconds from the marker to the end of an uninterrupted child call."""
    proc, marker = spawn(kind, run, log)
    start = wait_marker(proc, marker)
    code = proc.wait()
    if start is None or code != 0:
        raise SystemExit(f"calibration of {kind} failed (exit {code}); see {log}")
    return time.monotonic() - start


def _writing(folders: list[Path]) -> bool:
    from edgepack.atomic import is_temp_name

    for folder in folders:
        try:
            if any(is_temp_name(e.name) and ".old-" not in e.name for e in os.scandir(folder)):
                return True
        except OSError:
            pass
    return False


def kill_at_random(kind: str, run: Path, log: Path, window: float, rng: random.Random, *,
                   mode: str, watch: list[Path]) -> dict[str, Any]:
    """SIGKILL the child during its call, unless it finishes first.

    ``uniform``: ``uniform(0, window)`` seconds after the call starts. ``write`` (and ``final``,
    which watches only the run folder, where training's final ``student.tmp-*`` save appears):
    as soon as a temporary file or folder appears in one of ``watch`` (an atomic write has
    begun), after a further ``uniform(0, 20 ms)``, so the kill lands inside the write.
    """
    proc, marker = spawn(kind, run, log)
    start = wait_marker(proc, marker)
    if start is None:
        proc.kill()
        proc.wait()
        return {"killed": False, "mode": mode, "error": f"child exited {proc.returncode} before its call started"}
    delay = rng.uniform(0, window) if mode == "uniform" else rng.uniform(0, 0.02)
    finished = None
    fire = start + delay if mode == "uniform" else None
    while fire is None or time.monotonic() < fire:
        if proc.poll() is not None:
            finished = time.monotonic() - start
            break
        if fire is None and _writing(watch):
            fire = time.monotonic() + delay
        time.sleep(0.002 if mode == "uniform" else 0.0005)
    killed = finished is None and proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait()
    return {"killed": killed, "mode": mode, "delay_s": round(delay, 4), "exit": code,
            "at_s": round(time.monotonic() - start, 3),
            "call_s": round(finished, 3) if finished is not None else None}


# ----------------------------------------------------------------------------- fixtures

def build_fixtures(work: Path) -> dict[str, Any]:
    """Tiny teacher run (for training), a gated run (for export and pack), reference outputs."""
    from edgepack.constants import STUDENT_DIR
    from edgepack.distill.train import train_student
    from edgepack.profiles import load_profile
    from tests.distill.conftest import make_run
    from tests.runtime.helpers import make_run_dir, write_profile
    from tests.tiny import build_tiny_llama

    cache = work / "fixtures.json"
    if cache.is_file():  # built by an earlier run with the same --work
        fx = json.loads(cache.read_text())
        return {**fx, **{k: Path(fx[k]) for k in ("train_template", "gated", "profile")}}
    fx: dict[str, Any] = {}
    teacher = build_tiny_llama(work / "tiny4", layers=4)
    fx["train_template"] = make_run(work / "train-template", teacher)
    ref = Path(shutil.copytree(fx["train_template"], work / "train-reference"))
    train_student(run_dir=ref, profile=load_profile("cpu-x86-2c"), steps=STEPS, seed=0, resume=False,
                  config=train_config())
    fx["train_weights"] = sha(ref / STUDENT_DIR / "model.safetensors")

    # Larger than the unit tests' tiny model (~22M parameters, a 44 MB F16 GGUF) so that writing
    # artifacts and bundles takes long enough for kills to land inside the writes.
    student = build_tiny_llama(work / "student", layers=4, hidden=768)
    (work / "profiles").mkdir(exist_ok=True)
    profile = write_profile(work / "profiles", "tiny-ok", min_relative_quality=0.0)
    gated = make_run_dir(work / "gated" / "run", student, [profile])
    fx["gated"], fx["profile"] = gated, profile
    fx["artifact_sha"] = {p.name: sha(p) for p in (gated / "artifacts").glob("*.gguf")}
    cache.write_text(json.dumps(fx, default=str))
    return fx


# ----------------------------------------------------------------------------- kill categories

def check_train(run: Path, fx: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    from safetensors.torch import load_file

    from edgepack.atomic import is_complete
    from edgepack.constants import CHECKPOINT_DIR, STUDENT_DIR
    from edgepack.distill.checkpoint import OPTIMIZER_TENSORS, RNG_FILE, read_state
    from edgepack.distill.train import train_student
    from edgepack.profiles import load_profile

    problems: list[str] = []
    seen: dict[str, Any] = {"debris_after_kill": debris(run)}
    ckpts = run / CHECKPOINT_DIR
    finals = [p for p in ckpts.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()] if ckpts.is_dir() else []
    seen["checkpoints"] = sorted(p.name for p in finals)
    for p in finals:
        try:
            assert is_complete(p), "no .complete marker"
            assert read_state(p)["step"] == int(p.name[5:]), "state.json step differs from the folder name"
            for name in ("model.safetensors", OPTIMIZER_TENSORS, RNG_FILE):
                load_file(str(p / name))
        except Exception as exc:  # noqa: BLE001 - every problem is a finding
            problems.append(f"{p.name} under its final name is not complete: {exc!r}")
    if (run / STUDENT_DIR).exists() and not is_complete(run / STUDENT_DIR):
        problems.append("student/ exists without .complete")
    try:
        report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=STEPS, seed=0, resume=True,
                               config=train_config())
        seen["resumed_from_step"] = report.get("resumed_from_step")
        if sha(run / STUDENT_DIR / "model.safetensors") != fx["train_weights"]:
            problems.append("resumed student differs from the uninterrupted run")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"--resume failed: {exc!r}")
    left = debris(run)
    if left:
        problems.append(f"debris after the next run: {left}")
    return problems, seen


def check_export(run: Path, fx: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    import gguf

    from edgepack.export.api import export_model
    from edgepack.gguf_header import read_gguf

    problems: list[str] = []
    art = run / "artifacts"
    seen: dict[str, Any] = {"debris_after_kill": debris(run)}
    for p in sorted(art.glob("*.gguf")):
        try:
            gguf.GGUFReader(p, "r")
            read_gguf(p)
            if sha(p) != fx["artifact_sha"].get(p.name):
                problems.append(f"{p.name} under its final name differs from the uninterrupted export")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{p.name} under its final name does not parse: {exc!r}")
    report_path = art / "export.json"
    if report_path.exists():
        try:
            for a in json.loads(report_path.read_text())["artifacts"]:
                if (art / a["path"]).exists() and sha(art / a["path"]) != a["sha256"]:
                    problems.append(f"export.json lists a sha256 for {a['path']} that the file does not have")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"export.json is not complete: {exc!r}")
    try:
        export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None, fidelity=False)
        for name, digest in fx["artifact_sha"].items():
            if sha(art / name) != digest:
                problems.append(f"re-export of {name} differs from the uninterrupted export")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the next export failed: {exc!r}")
    left = debris(run)
    if left:
        problems.append(f"debris after the next run: {left}")
    return problems, seen


def check_pack(run: Path, fx: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    from edgepack.export.pack.pack import pack_run
    from edgepack.profiles import load_profile
    from edgepack.runtime.bundle.archive import verify_bundle

    problems: list[str] = []
    seen: dict[str, Any] = {"debris_after_kill": debris(run)}
    bundles = run / "bundles"
    for p in sorted(bundles.glob("*.edgepack")) if bundles.is_dir() else []:
        try:
            verify_bundle(p)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{p.name} under its final name does not verify: {exc}")
    try:
        result = pack_run(run_dir=run, profile=load_profile(str(fx["profile"])),
                          artifact=None, allow_unverified=False)
        verify_bundle(Path(result["bundle"]))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the next pack failed: {exc!r}")
    left = debris(run)
    if left:
        problems.append(f"debris after the next run: {left}")
    return problems, seen


def kill_category(kind: str, fx: dict[str, Any], work: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    template = {"train": fx["train_template"], "export": fx["gated"], "pack": fx["gated"]}[kind]
    check = {"train": check_train, "export": check_export, "pack": check_pack}[kind]
    base = work / f"kill-{kind}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    if kind == "pack":  # pack_run finds the profile beside the run, as in the fixture
        shutil.copytree(fx["profile"].parent, base / "profiles")
    log = base / "children.log"

    def fresh(i: int) -> Path:
        run = base / f"t{i:03d}"
        shutil.copytree(template, run)
        if kind == "export" and i % 2 == 0:
            shutil.rmtree(run / "artifacts")  # half the trials export into an empty folder
        if kind == "pack":
            shutil.rmtree(run / "bundles", ignore_errors=True)
        return run

    window = calibrate(kind, fresh(999), log)
    shutil.rmtree(base / "t999", ignore_errors=True)
    calibrated = window
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    i = 0
    sub = {"train": ["checkpoints", "."], "export": ["artifacts"], "pack": ["bundles"]}[kind]
    # Half the kills at a uniformly random time in the call, the rest inside a write; for training,
    # half of those inside the final save of student/ (a checkpoint write comes first and would
    # otherwise always take the targeted kill).
    quota = {"uniform": trials // 2}
    if kind == "train":
        quota.update(write=(trials - trials // 2) // 2, final=trials - trials // 2 - (trials - trials // 2) // 2)
    else:
        quota["write"] = trials - trials // 2
    while sum(r["killed"] for r in rows) < trials and i < trials * 3:
        run = fresh(i)
        mode = next((m for m, n in quota.items() if sum(r["killed"] and r["mode"] == m for r in rows) < n), "write")
        watch = [run] if mode == "final" else [run / d for d in sub if mode == "write" or d != "."]
        trial = kill_at_random(kind, run, log, window, rng, mode=mode, watch=watch)
        if trial.get("call_s") and mode == "uniform":  # finished first: the machine is faster than at calibration
            window = 0.9 * trial["call_s"]
        if trial.get("error"):
            trial["problems"] = [trial["error"]]
        else:
            trial["problems"], trial["seen"] = check(run, fx)
        trial["trial"] = i
        rows.append(trial)
        shutil.rmtree(run, ignore_errors=True)
        i += 1
    killed = [r for r in rows if r["killed"]]
    mid_write = [r for r in killed if r.get("seen", {}).get("debris_after_kill")]
    failures = [{"trial": r["trial"], "delay_s": r.get("delay_s"), "problems": r["problems"]} for r in rows if r["problems"]]
    return {"category": f"kill-{kind}", "inputs_tried": len(rows), "faults_injected": len(killed),
            "kills_that_left_a_partial_write": len(mid_write), "call_duration_s": round(calibrated, 2),
            "final_kill_window_s": round(window, 2),
            "kills_uniform": sum(r["killed"] and r["mode"] == "uniform" for r in rows),
            "kills_inside_a_write": sum(r["killed"] and r["mode"] in ("write", "final") for r in rows),
            "kills_inside_the_final_save": sum(r["killed"] and r["mode"] == "final" for r in rows),
            "completed_before_the_kill": len(rows) - len(killed), "failures": len(failures),
            "failure_details": failures[:20], "seconds": round(time.monotonic() - t0, 1),
            "trials": [{k: v for k, v in r.items() if k != "problems"} for r in rows]}


# ----------------------------------------------------------------------------- fuzz

def fuzz_category(examples: int, work: Path) -> dict[str, Any]:
    report = work / "fuzz-outcomes.json"
    report.unlink(missing_ok=True)
    env = {**os.environ, "EDGEPACK_FUZZ_EXAMPLES": str(examples), "EDGEPACK_FUZZ_REPORT": str(report)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/reliability", "-m", "fuzz", "-q", "-p",
                           "no:cacheprovider", "-rf", "--tb=line"], cwd=ROOT, env=env, capture_output=True, text=True)
    outcomes = json.loads(report.read_text()) if report.exists() else {}
    tail = proc.stdout.strip().splitlines()
    failed = [line for line in tail if line.startswith("FAILED")]
    untyped = {reader: {k: v for k, v in c.items() if k.startswith("UNTYPED")} for reader, c in outcomes.items()}
    tried = sum(sum(c.values()) for c in outcomes.values())
    refused = sum(v for c in outcomes.values() for k, v in c.items() if k not in ("accepted",) and not k.startswith("UNTYPED"))
    return {"category": "fuzz", "examples_per_property": examples, "inputs_tried": tried,
            "faults_injected": refused + sum(sum(u.values()) for u in untyped.values()),
            "failures": len(failed), "failure_details": [*failed, *[f"{r}: {u}" for r, u in untyped.items() if u]],
            "per_reader": outcomes, "pytest_summary": tail[-1] if tail else proc.stderr[-500:],
            "seconds": round(time.monotonic() - t0, 1)}


def disk_full_category() -> dict[str, Any]:
    """The tmpfs tests (tests/reliability/test_disk_full.py), run and counted."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/reliability/test_disk_full.py", "-q", "-p",
                           "no:cacheprovider", "-rsxXf", "--tb=line"], cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    flagged = [line for line in lines if line.startswith(("FAILED", "SKIPPED", "XFAIL", "XPASS", "ERROR"))]
    return {"category": "disk-full", "inputs_tried": 4, "faults_injected": 5,  # 3 disks filled, 2 damaged files
            # an XFAIL here is a known failure of the "clear error" requirement: it counts
            "failures": sum(line.startswith(("FAILED", "ERROR", "XPASS", "XFAIL")) for line in flagged),
            "failure_details": flagged, "pytest_summary": lines[-1] if lines else proc.stderr[-300:],
            "seconds": round(time.monotonic() - t0, 1)}


# ----------------------------------------------------------------------------- report

def family_category(name: str, work: Path) -> dict[str, Any]:
    """Run one attack family's module and shape its counts like the other categories."""
    import importlib

    module, function = FAMILIES[name]
    t0 = time.monotonic()
    out = getattr(importlib.import_module(module), function)(work / name)
    return {"category": name, "inputs_tried": out["tried"], "faults_injected": out["faults"],
            "failures": out["failures"], "seconds": round(time.monotonic() - t0, 1),
            "details": out.get("details", []), "failure_details": out.get("failure_list", [])}
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=20, help="SIGKILLs per kill category (at least 20 for the report)")
    parser.add_argument("--fuzz-examples", type=int, default=2000)
    parser.add_argument("--only", default=ALL_CATEGORIES)
    parser.add_argument("--native-files", type=int, default=600, help="mutated GGUFs for the gguf-native category")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other categories of an existing results.json (re-run only --only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepack-reliability"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explanations", type=Path, default=HERE / "explanations.json",
                        help="JSON {category: text} explaining failures found (a human writes it after reading them)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite RELIABILITY.md from results.json (e.g. after adding explanations)")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.markdown_only:
        results = json.loads((HERE / "results.json").read_text())
        results["explanations"] = json.loads(args.explanations.read_text()) if args.explanations.is_file() else {}
        results["runs"] = live_runs(results.get("runs") or [{k: results[k] for k in RUN_KEYS}])
        (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_markdown(results, ROOT / "RELIABILITY.md")
        return
    from edgepack.export.gate.gate import machine_info

    t0 = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    only = args.only.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    fx = build_fixtures(args.work / "fixtures") if any(c not in ("fuzz", "disk-full", *FAMILIES) for c in only) else {}
    categories = []
    for kind in ("train", "export", "pack"):
        if f"kill-{kind}" in only:
            categories.append(kill_category(kind, fx, args.work, args.trials, rng))
            print(json.dumps({k: v for k, v in categories[-1].items() if k != "trials"}), flush=True)
    if "server" in only:
        categories.append(server_category(fx, args.work))
        print(json.dumps(categories[-1]), flush=True)
    if "gguf-native" in only:
        categories.append(native_category(fx, args.work, args.native_files, rng))
        print(json.dumps(categories[-1]), flush=True)
    if "disk-full" in only:
        categories.append(disk_full_category())
        print(json.dumps(categories[-1]), flush=True)
    if "fuzz" in only:
        categories.append(fuzz_category(args.fuzz_examples, args.work))
        print(json.dumps({k: v for k, v in categories[-1].items() if k != "per_reader"}), flush=True)
    for name in FAMILIES:
        if name in only:
            categories.append(family_category(name, args.work))
            print(json.dumps({k: v for k, v in categories[-1].items() if k != "details"}), flush=True)
    if args.merge and (HERE / "results.json").is_file():
        old = json.loads((HERE / "results.json").read_text())
        fresh = {c["category"] for c in categories}
        categories = [c for c in old["categories"] if c["category"] not in fresh] + categories
        runs = old.get("runs") or [{"command": old["command"], "loadavg_start": old["loadavg_start"],
                                    "loadavg_end": old["loadavg_end"], "seconds": old["seconds"]}]
    else:
        runs = []
    info = machine_info()
    results = {"command": " ".join([os.path.relpath(sys.executable, ROOT), "bench/reliability/run.py", *sys.argv[1:]]),
               "machine": f"{info.get('cpu')}, {info.get('cpu_count')} CPUs, {info.get('memory_mb')} MB memory, "
                          f"{info.get('system')} {info.get('machine')}, Python {info.get('python')}",
               "machine_info": info, "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "seconds": round(time.monotonic() - t0, 1), "categories": categories,
               "explanations": json.loads(args.explanations.read_text()) if args.explanations.is_file() else {}}
    this_run = {k: results[k] for k in RUN_KEYS}
    results["runs"] = live_runs(runs + [dict(this_run, produced=[c["category"] for c in categories
                                                                 if c["category"] in only])])
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, ROOT / "RELIABILITY.md")


if __name__ == "__main__":
    main()
