"""Task fidelity of a bundle through `edgepack serve`: bare user messages vs the gated score.

    .venv/bin/python bench/serve/task_fidelity.py RUN/bundles/X.edgepack \\
        --holdout RUN/data/holdout.jsonl --out bench/serve/task_fidelity.json

A deployer sends users' messages as they come, with no system turn and no decoding settings.
This starts a real ``python -m edgepack serve BUNDLE --port 0`` subprocess on loopback, sends
each holdout row the gate answers (:func:`~edgepack.export.gate.quality.to_answer`) as its
conversation without any system message, through the ``openai`` SDK with nothing but ``model``
and ``messages`` (the server applies the bundle's task: its system prompt and decoding), scores
the answers with :func:`edgepack.scoring.score_answers` under the bundle's task, and compares
the primary metric with the gated one in the manifest (``task_scores.primary``). Target: within
``--tolerance`` (0.03). Writes JSON and markdown (the command, machine, load, every row).
Exit 0 on target, 1 off target or not comparable, 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.atomic import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess  # noqa: E402

TOLERANCE = 0.03


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def Server(bundle: Path, log_path: Path, *, threads: int | None, timeout_s: float) -> ServeProcess:
    """``edgepack serve BUNDLE`` on loopback with the bundle's own task applied."""
    return ServeProcess(bundle, log_path, ["--timeout", str(timeout_s), *(["--threads", str(threads)] if threads else [])])


def bare(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as a user sends it: every turn but the system ones."""
    return [m for m in messages if m["role"] != "system"]


def compare(served: float | None, gated: float | None, tolerance: float) -> dict[str, Any]:
    """The verdict of the comparison: ``ok`` when both are measured and differ by at most ``tolerance``."""
    if served is None or gated is None:
        missing = "the served answers give no score" if served is None else "the bundle carries no gated score"
        return {"ok": False, "delta": None, "why": f"not comparable: {missing}"}
    delta = served - gated
    ok = abs(delta) <= tolerance + 1e-12
    return {"ok": ok, "delta": delta, "why": f"|{served:.4f} - {gated:.4f}| = {abs(delta):.4f} "
                                              f"{'<=' if ok else '>'} {tolerance:g}"}


def ask_all(url: str, rows: list[dict[str, Any]], timeout_s: float) -> tuple[list[str], str, list[float]]:
    """(answers, the served model id, seconds per request): one bare request per row, in order."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=timeout_s)
    model = client.models.list().data[0].id
    answers, seconds = [], []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=bare(row["messages"]))  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - t0)
        answers.append(reply.choices[0].message.content or "")
        if (i + 1) % 10 == 0 or i + 1 == len(rows):
            log(f"{i + 1}/{len(rows)} answered")
    return answers, model, seconds


def measure(bundle: Path, holdout: Path, *, threads: int | None, tolerance: float, limit: int | None,
            timeout_s: float, work: Path) -> dict[str, Any]:
    """Serve ``bundle``, ask it the holdout bare, score under its task, compare with the gated score."""
    from edgepack.errors import UsageError
    from edgepack.export.gate.quality import load_holdout, to_answer
    from edgepack.runtime.bundle.archive import verify_bundle
    from edgepack.runtime.bundle.manifest import manifest_task
    from edgepack.scoring import score_answers

    manifest = verify_bundle(bundle)
    task = manifest_task(manifest, bundle.name)
    if task is None:
        raise UsageError(f"{bundle.name} carries no task; nothing to be faithful to", hint="repack it with this edgepack")
    gated = manifest.get("task_scores") or {}
    rows = to_answer(load_holdout(holdout, task), task)[:limit]
    with_system = sum(any(m["role"] == "system" for m in r["messages"]) for r in rows)
    server = Server(bundle, work / "serve.log", threads=threads, timeout_s=timeout_s)
    try:
        answers, model_id, seconds = ask_all(server.url, rows, timeout_s)
    finally:
        exit_code = server.stop()
    scores = score_answers(task, answers, rows)
    return {
        "bundle": {"name": bundle.name, "sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                   "model_id": model_id, "gate_status": manifest.get("gate_status")},
        "task": task.describe() | {"system_prompt_chars": len(task.system_prompt or "")},
        "holdout": {"path": str(holdout), "sha256": hashlib.sha256(holdout.read_bytes()).hexdigest(),
                    "rows_sent": len(rows), "rows_with_a_system_turn_dropped": with_system,
                    "gated_rows": gated.get("answered", gated.get("rows")), "gated_holdout": gated.get("holdout")},
        "served": {"primary": scores["primary"], "scores": scores},
        "gated": {"primary": gated.get("primary"), "decoding": gated.get("decoding_line"),
                  "scores": gated.get("scores")},
        "comparison": compare(scores["primary"], gated.get("primary"), tolerance) | {"tolerance": tolerance},
        "server": {"command": shlex.join(server.cmd), "start_s": round(server.start_s, 2), "exit_code": exit_code,
                   "request_s_median": sorted(seconds)[len(seconds) // 2] if seconds else None},
        "rows": [{"id": r["id"], "label": r.get("label"), "answered_label": task.answer.label(a), "answer": a[:300]}
                 for r, a in zip(rows, answers)],
    }


def markdown(res: dict[str, Any]) -> str:
    """The report as markdown."""
    c, m, t, h = res["comparison"], res["machine"], res["task"], res["holdout"]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# Task fidelity through `edgepack serve`: {res['bundle']['name']}", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {m.get('memory_mb')} MB, {m.get('system')} "
        f"{m.get('release')}; load average start {res['load_average_start']}, end {res['load_average_end']}. "
        f"Started {res['started']}, took {res['elapsed_s']:.0f} s.", "",
        f"Bundle sha256 `{res['bundle']['sha256']}`, gate {res['bundle']['gate_status']}; task `{t['kind']}`, primary "
        f"metric `{t['primary_metric']}`, decoding {t['decoding']}.", "",
        f"Holdout `{h['path']}`: {h['rows_sent']} rows sent as bare user messages through the openai SDK (no system "
        f"turn, no decoding fields; {h['rows_with_a_system_turn_dropped']} rows had a system turn, dropped); the "
        f"gate answered {h['gated_rows']} rows of `{h['gated_holdout']}`.", "",
        "| | primary | rows |", "|---|---:|---:|",
        f"| gated (manifest `task_scores`) | {fmt(res['gated']['primary'])} | {h['gated_rows']} |",
        f"| served, bare user messages | {fmt(res['served']['primary'])} | {h['rows_sent']} |", "",
        f"**{'PASS' if c['ok'] else 'MISS'}**: {c['why']} (target: within {c['tolerance']:g}).", "",
        f"Server: `{res['server']['command']}`, ready in {res['server']['start_s']} s, median request "
        f"{fmt(res['server']['request_s_median'])} s, exit code {res['server']['exit_code']} on SIGTERM.", "",
        "| row | label | answered | answer |", "|---|---|---|---|",
        *[f"| {r['id']} | {r['label'] or ''} | {r['answered_label'] or ''} | "
          f"{r['answer'][:80].replace('|', '/').replace(chr(10), ' / ')} |" for r in res["rows"]], "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--holdout", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/serve/task_fidelity.json"))
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: the bundle's)")
    parser.add_argument("--limit", type=int, default=None, help="send only the first N rows")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    args = parser.parse_args(argv)

    from edgepack.errors import EdgepackError
    from edgepack.provenance import load_average, machine_info

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    command = shlex.join([".venv/bin/python", "bench/serve/task_fidelity.py",
                          *(argv if argv is not None else sys.argv[1:])])
    res: dict[str, Any] = {"command": command, "started": started.isoformat(timespec="seconds"),
                           "machine": machine_info(), "load_average_start": load_average()}
    work = Path(tempfile.mkdtemp(prefix="edgepack-task-fidelity-"))  # the server log, named in errors
    try:
        res |= measure(args.bundle, args.holdout, threads=args.threads, tolerance=args.tolerance, limit=args.limit,
                       timeout_s=args.timeout, work=work)
    except EdgepackError as exc:
        log(f"error: {exc}")
        return 2
    res["load_average_end"] = load_average()
    res["elapsed_s"] = time.monotonic() - t0
    write_json(args.out, res)
    write_text(args.out.with_suffix(".md"), markdown(res))
    log(f"{'PASS' if res['comparison']['ok'] else 'MISS'}: {res['comparison']['why']}; wrote {args.out} and "
        f"{args.out.with_suffix('.md')} (server log in {work})")
    return 0 if res["comparison"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
