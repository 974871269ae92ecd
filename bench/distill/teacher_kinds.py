"""On-policy distillation from each teacher kind on a shipped domain's run (issue #19).

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill/teacher_kinds.py --run runs/demo --steps 20 \\
        --out bench/distill/results-teacher-kinds-demo.json

One student start — the run's own pruned student (the teacher's kept blocks, rebuilt once as an
HF folder) — the same seed and steps, and λ 1 after a half-way off-policy warm-up, trained with
the student's samples scored by each teacher kind:

* ``hf``: the run's teacher in torch (dense logits; the warm-up is dense KD);
* ``gguf``: the run's teacher GGUF through llama.cpp (top-k + tail; the warm-up reads cached
  top-k soft labels, so the teacher never enters torch memory);
* ``endpoint``: ``edgepack serve`` on that same GGUF, an OpenAI-compatible server on loopback.
  ``distill data`` first builds an endpoint run of the same prompts through it (chat completions
  with top logprobs: the warm-up trains on those), then the on-policy steps score the student's
  tokens with ``/v1/completions`` echo + logprobs.

``edgepack eval`` then scores every student with the task's metric on the holdout (both runs split
the same prompts with the same seed). The endpoint run's data differs from the local run's: to the
same GGUF, ``distill data`` sends a teacher it did not correct itself the domain's demonstrations
(few-shot turns), while the run's corrected teacher answered without them — so each run's teacher
score is reported beside its students.
Finished students and the endpoint run's data are reused on a rerun. Writes JSON and markdown (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from run import method_config

from edgepack.export.gate.gate import machine_info

KINDS = {  # teacher kind → (bench/distill/run.py method, student variant name)
    "hf": ("warmup100", "kinds-hf"),
    "gguf": ("warmup100gguf", "kinds-gguf"),
    "endpoint": ("warmup100", None),  # the endpoint run's own student
}


def pruned_student(run: Path, folder: Path) -> Path:
    """The run's ``auto`` student before training: its kept blocks of the teacher, as an HF folder."""
    from transformers import AutoTokenizer

    from edgepack.atomic import atomic_dir, is_complete
    from edgepack.constants import STUDENT_DIR, STUDENT_INFO
    from edgepack.distill.data import teacher_dir_of
    from edgepack.distill.student import derive_student

    if not is_complete(folder):
        info = json.loads((run / STUDENT_DIR / STUDENT_INFO).read_text())
        if info.get("source") != "auto" or info.get("kept_channels"):
            raise SystemExit(f"{run}'s student is not a depth-pruned `auto` student; this bench rebuilds only those")
        teacher = teacher_dir_of(run)
        with atomic_dir(folder) as tmp:
            derive_student(teacher, keep=info["kept_layers"], out_dir=tmp)
            AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    return folder


def train(run: Path, kind: str, student: Path, ident: dict[str, Any], profile: Any, steps: int,
          seed: int) -> dict[str, Any]:
    from edgepack.atomic import is_complete
    from edgepack.constants import TRAIN_REPORT
    from edgepack.distill.train import TrainConfig, student_dir_name, train_student

    method, variant = KINDS[kind]
    final = run / student_dir_name(variant)
    if is_complete(final):
        return json.loads((final / TRAIN_REPORT).read_text()) | {"reused": True}
    config = TrainConfig(**{**ident["config"], **method_config(method, steps), "on_policy_teacher": kind})
    print(f"[{time.strftime('%H:%M:%S')}] training {kind} in {run}", file=sys.stderr)
    return train_student(run_dir=run, profile=profile, student=str(student), steps=steps, seed=seed,
                         config=config, variant=variant)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(gguf: Path, log: Path, threads: int) -> Iterator[str]:
    """``edgepack serve`` on ``gguf`` (loopback); yields the base URL once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "edgepack", "serve", str(gguf), "--port", str(port), "--threads", str(threads)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"edgepack serve did not start:\n{log.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a server that ignores SIGTERM must not outlive the bench
            proc.kill()
            proc.wait()


def endpoint_run(run: Path, folder: Path, url: str, gguf: Path, seed: int) -> Path:
    """``distill data`` of the run's prompts with ``edgepack serve`` as the teacher (reused when complete)."""
    from edgepack.atomic import is_complete
    from edgepack.constants import DATA_DIR
    from edgepack.distill.data import build_dataset
    from edgepack.runconfig import read_run_config

    if not is_complete(folder / DATA_DIR):
        data = read_run_config(run).get("data")
        print(f"[{time.strftime('%H:%M:%S')}] distill data {data} through {url}", file=sys.stderr)
        build_dataset(teacher=f"openai:{url}/v1#{gguf.stem}", data=data, run_dir=folder, seed=seed)
    return folder


def row(kind: str, ev: dict[str, Any], name: str, report: dict[str, Any]) -> dict[str, Any]:
    entry = ev["variants"][name] if name in ev.get("variants", {}) else ev["distilled"]
    op = report.get("on_policy") or {}
    return {"kind": kind, "primary": entry.get("primary"), "teacher_primary": ev["teacher"].get("primary"),
            "undistilled_primary": ev["undistilled"].get("primary"), "kl": entry.get("kl"), "ce": entry.get("ce"),
            "scorer": op.get("scorer"), "steps_on_policy": op.get("steps_on_policy"),
            "completions": op.get("completions"), "completions_capped": op.get("completions_capped"),
            "mode": report.get("mode"), **{k: report.get(k) for k in ("steps", "wall_s", "cpu_s", "peak_rss_mb")}}


def main() -> None:
    from edgepack.constants import STUDENT_DIR, TRAIN_REPORT
    from edgepack.distill.evaluate import evaluate_run
    from edgepack.distill.score_gguf import run_teacher_gguf
    from edgepack.profiles import load_profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run with a GGUF teacher (make demo's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="edgepack serve's llama.cpp threads")
    parser.add_argument("--out", type=Path, default=Path("bench/distill/results-teacher-kinds.json"))
    args = parser.parse_args()
    command = ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)
    run = args.run
    ident = json.loads((run / STUDENT_DIR / TRAIN_REPORT).read_text())["identity"]
    profile = load_profile(ident["profile"])
    gguf = run_teacher_gguf(run)
    if gguf is None:
        raise SystemExit(f"{run} has no GGUF teacher to score with llama.cpp or to serve")
    work = run.with_name(run.name + "-teacher-kinds")
    work.mkdir(exist_ok=True)
    student = pruned_student(run, work / "pruned")
    t0, load = time.perf_counter(), {"start": os.getloadavg()[0]}
    reports = {kind: train(run, kind, student, ident, profile, args.steps, args.seed) for kind in ("hf", "gguf")}
    with served(gguf, work / "serve.log", args.threads) as url:
        erun = endpoint_run(run, work / "endpoint-run", url, gguf, ident["seed"])
        reports["endpoint"] = train(erun, "endpoint", student, ident, profile, args.steps, args.seed)
    print(f"[{time.strftime('%H:%M:%S')}] eval", file=sys.stderr)
    local = evaluate_run(run_dir=run, variants=tuple(KINDS[k][1] for k in ("hf", "gguf")))
    remote = evaluate_run(run_dir=erun)
    rows = [row(k, local, KINDS[k][1], reports[k]) for k in ("hf", "gguf")]
    rows.append(row("endpoint", remote, "", reports["endpoint"]))
    load["end"] = os.getloadavg()[0]
    results = {"command": command, "machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "load_average": load, "seconds": round(time.perf_counter() - t0, 1), "run": str(run),
               "teacher_gguf": gguf.name, "steps": args.steps, "seed": args.seed, "holdout_rows": local["holdout_rows"],
               "task": local.get("task"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    primary = (results.get("task") or {}).get("primary_metric", "primary")
    load = results["load_average"]
    md = [f"# On-policy distillation from each teacher kind on {results['run']}", "",
          f"Command: `{results['command']}`  ",
          f"Machine: {results['machine']['cpu']} ({results['machine']['cpu_count']} CPUs); load average "
          f"{load['start']:.2f} → {load['end']:.2f}; {results['seconds']} s in all. One student start (the run's "
          f"pruned student), seed {results['seed']}, {results['steps']} steps: λ 1 after a half-way off-policy "
          f"warm-up. Task score: `{primary}` on the holdout ({results['holdout_rows']} rows). The endpoint is "
          f"`edgepack serve` on the run's teacher GGUF ({results['teacher_gguf']}); its run's data was generated "
          "through it by `distill data`, which gives a teacher it did not correct itself the domain's "
          "demonstrations (a corrected teacher answers without them), so the endpoint run has its own data and "
          "teacher score. CPU s are the trainer process's: the endpoint's scoring runs in the server's process "
          "(in wall s, not in CPU s).", "",
          f"| teacher kind | warm-up mode | scorer | on-policy steps | completions (capped) | {primary} | teacher "
          f"{primary} | undistilled {primary} | KL | CE | wall s | CPU s | peak RSS MB |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        scorer = (r.get("scorer") or {}).get("kind")
        md.append(f"| {r['kind']} | {r.get('mode')} | {scorer} | {fmt(r.get('steps_on_policy'))} | "
                  f"{fmt(r.get('completions'))} ({fmt(r.get('completions_capped'))}) | {fmt(r['primary'])} | "
                  f"{fmt(r['teacher_primary'])} | {fmt(r['undistilled_primary'])} | {fmt(r.get('kl'))} | "
                  f"{fmt(r.get('ce'))} | {fmt(r.get('wall_s'))} | {fmt(r.get('cpu_s'))} | {fmt(r.get('peak_rss_mb'))} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
