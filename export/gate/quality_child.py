"""The gate's holdout pass, run in a fresh child process under a timeout.

The gate never loads the artifact in its own process for quality either: a llama.cpp crash
would take edgepack down with it and a hang would hang the gate. Two kinds of work, each a
child of its own (``python -m edgepack.export.gate.quality_child answer|kld ...``):

- ``answer``: load the artifact with its runtime backend and answer the holdout
  (:func:`edgepack.export.gate.quality.evaluate_holdout`) under the task (written beside the
  rows; its system prompt and decoding, a json task under its schema where the backend can
  constrain it): its scores, relative quality, agreement with the teacher's recorded responses.
- ``kld``: :func:`edgepack.export.fidelity.report.fidelity_report` of the artifact against an
  unquantized reference (an HF dir, e.g. ``RUN/student``) over the holdout rows' prompt +
  teacher-response tokens: mean KL divergence (reference ‖ artifact) and top-1 agreement.

The rows travel in a temporary JSON file, not on argv (a holdout can be megabytes, and argv
is visible to every user of the machine). The child verifies nothing: the parent has
verified the bundle and passes the extracted model path. It prints one JSON line on its real
stdout; :func:`edgepack.export.gate.measure.run_child` turns a crash, an OOM kill or a timeout
into ``{"ok": False, "error": ...}``, which the gate reports as a FAIL, never a hang.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import UnsafeModelError

if TYPE_CHECKING:
    from edgepack.task import Task

ANSWER_BASE_S = 300.0        # interpreter, runtime library and model load ...
LOAD_S_PER_GB = 60.0         # ... plus a minute per GB of model on disk
ANSWER_S_PER_ROW = 30.0      # 48 greedy tokens at >= 1.6 tok/s, plus the prompt
KLD_S_PER_ROW = 20.0         # one float32 transformers forward + one llama.cpp prefill of <= 256 tokens
DEFAULT_KLD_ROWS = 64        # holdout rows whose logits are compared (the first ones)


def _gigabytes(path: Path) -> float:
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 1e9


def answer_timeout_s(model_path: Path, n_rows: int) -> float:
    """Wall-clock limit of the answer child: 300 s + 60 s per GB of model + 30 s per answer
    (``n_rows``: answered rows × passes, see :func:`~edgepack.export.gate.quality.answer_passes`).

    Generous on purpose: only a hang or a pathological slowdown should reach it.
    """
    return ANSWER_BASE_S + LOAD_S_PER_GB * _gigabytes(model_path) + ANSWER_S_PER_ROW * n_rows


def kld_timeout_s(reference: Path, model_path: Path, n_rows: int) -> float:
    """Wall-clock limit of the KLD child: 300 s + 60 s per GB of reference and model + 20 s per row."""
    return (ANSWER_BASE_S + LOAD_S_PER_GB * (_gigabytes(reference) + _gigabytes(model_path))
            + KLD_S_PER_ROW * n_rows)


def _run(args: list[str], rows: list[dict[str, Any]], *, timeout_s: float, what: str,
         task: Task | None = None) -> dict[str, Any]:
    """Write ``rows`` (and ``task``) to temp JSON files, run the child on them, return its result
    (or failure)."""
    from edgepack.export.gate.measure import run_child
    from edgepack.task import save_task

    with tempfile.TemporaryDirectory(prefix="edgepack-holdout-") as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        if task is not None:
            save_task(task, Path(tmp) / "task.json")
            args = [*args, "--task", str(Path(tmp) / "task.json")]
        cmd = [sys.executable, "-m", "edgepack.export.gate.quality_child", *args, "--rows", str(rows_file)]
        result = run_child(cmd, timeout_s=timeout_s, what=what)
    if result.get("error_type") == UnsafeModelError.__name__:
        # A hostile model is an error for the user, not a verdict (as when it ran in-process).
        raise UnsafeModelError(result.get("message") or result["error"], hint=result.get("hint"))
    return result


def answer_holdout(model_path: Path, *, fmt: str, rows: list[dict[str, Any]], threads: int, n_ctx: int,
                   gpu_layers: int = 0, timeout_s: float | None = None, task: Task | None = None) -> dict[str, Any]:
    """:func:`~edgepack.export.gate.quality.evaluate_holdout` of ``model_path`` in a child process,
    scored under ``task`` (default: the demo's contract).

    Returns its dict (plus ``wall_s`` and ``timeout_s``), or ``{"error": ..., "relative": None}``
    when the child failed, crashed, was killed or timed out (``timeout_s``; default
    :func:`answer_timeout_s`). Raises :class:`UnsafeModelError` for a hostile model.
    """
    from edgepack.export.gate.quality import answer_passes, to_answer
    from edgepack.task import DEMO_TASK

    task = task or DEMO_TASK
    # a json task may be answered twice (under its schema, then without): the limit covers both
    answers = answer_passes(task) * len(to_answer(rows, task))
    limit = timeout_s if timeout_s is not None else answer_timeout_s(model_path, answers)
    args = ["answer", str(Path(model_path).resolve()), "--format", fmt, "--threads", str(threads),
            "--n-ctx", str(n_ctx), "--gpu-layers", str(gpu_layers)]
    result = _run(args, rows, timeout_s=limit, what="holdout pass", task=task)
    if not result.pop("ok", False):
        return {"error": result.get("error", "unknown error"), "relative": None, "notes": [],
                "stderr_tail": result.get("stderr_tail", []), "wall_s": result.get("wall_s"), "timeout_s": limit}
    return {**result, "timeout_s": limit}


def holdout_kld(reference: Path, model_path: Path, *, rows: list[dict[str, Any]], threads: int,
                max_rows: int = DEFAULT_KLD_ROWS, timeout_s: float | None = None) -> dict[str, Any]:
    """Mean KLD (reference ‖ artifact) and top-1 agreement over the first ``max_rows`` holdout
    rows, measured by :func:`~edgepack.export.fidelity.report.fidelity_report` in a child process.

    Returns ``{"kld_mean", "kld_p99", "top1_agreement", "positions", ...}``, or
    ``{"error": ...}`` when the child failed, crashed, was killed or timed out (``timeout_s``;
    default :func:`kld_timeout_s`).
    """
    rows = rows[:max_rows]
    limit = timeout_s if timeout_s is not None else kld_timeout_s(reference, model_path, len(rows))
    args = ["kld", str(Path(model_path).resolve()), "--reference", str(Path(reference).resolve()),
            "--threads", str(threads)]
    result = _run(args, rows, timeout_s=limit, what="KLD pass")
    ok = result.pop("ok", False)
    base = {"reference": str(reference), "timeout_s": limit, "wall_s": result.get("wall_s")}
    if not ok:
        return {**base, "error": result.get("error", "unknown error"), "stderr_tail": result.get("stderr_tail", [])}
    return {**base, **result}


# --- the child ---------------------------------------------------------------------------------
def _answer(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from edgepack.runtime.backends.base import get_backend
    from edgepack.export.gate.quality import evaluate_holdout
    from edgepack.task import DEMO_TASK, load_task

    task = load_task(args.task) if args.task is not None else DEMO_TASK
    with get_backend(args.format).load(args.model, threads=args.threads, n_ctx=args.n_ctx,
                                       gpu_layers=args.gpu_layers) as backend:
        return {"ok": True, **evaluate_holdout(backend, rows, task)}


def _kld(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from edgepack.export.fidelity.report import fidelity_report

    report = fidelity_report(args.reference, [args.model], rows, max_prompts=len(rows), greedy_prompts=0,
                             threads=args.threads, command="edgepack gate (KLD vs reference)")
    entry = report["artifacts"][0]
    vs = entry["vs_transformers"]
    return {"ok": True, "kld_mean": entry["kld"], "kld_p99": vs.get("kld_p99"), "kld_max": vs.get("kld_max"),
            "top1_agreement": entry["top1"], "positions": vs.get("tokens"), "rows": report["prompts"]["rows"],
            "max_tokens_per_row": report["prompts"]["max_tokens"], "compared_with": entry["kld_reference"],
            "tokenizer_ok": entry["tokenizer"]["ok"], "notes": report["notes"]}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: one JSON line on the real stdout, exit 0 (done) or 1 (an error, as data)."""
    parser = argparse.ArgumentParser(prog="python -m edgepack.export.gate.quality_child")
    parser.add_argument("work", choices=("answer", "kld"))
    parser.add_argument("model", type=Path)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--format", default="gguf")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=0)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--task", type=Path)
    args = parser.parse_args(argv)
    from edgepack.export.gate.measure import child_json_main

    def work() -> dict[str, Any]:
        rows = json.loads(args.rows.read_text(encoding="utf-8"))
        return _answer(args, rows) if args.work == "answer" else _kld(args, rows)

    return child_json_main(work, lambda exc: {"message": str(exc), "hint": getattr(exc, "hint", None)})


if __name__ == "__main__":
    sys.exit(main())
