"""``gate --search``: gate a profile's allowed choices, best quality first, and pick one.

``search(profile=..., run_dir=RUN)`` reads the artifacts the export stage recorded in
``RUN/artifacts/export.json`` (or takes an explicit ``artifacts`` list), walks
``profile.choices`` in order (the profile lists them most preferred, i.e. best quality,
first), gates every choice that has an artifact, and returns:

- ``chosen``: the first choice whose gate verdict is PASS (None if none passed);
- ``rows``: one row per choice (size MB, TTFT p95, decode tok/s, peak RSS MB, ``score``: the
  task's primary metric on the holdout and its name in ``metric``, ``quality``: the relative
  quality, decode efficiency, verdict, the report it came from), choices without an artifact
  marked ``not exported``;
- ``pareto``: the choices no other measured choice beats on size, decode speed and quality
  (quality only when every measured choice has it; the axes used are in ``pareto_axes``).

Gate reports go to ``RUN/gate/<artifact>.json`` (with ``.md`` and ``.png`` beside them), as
``edgepack gate`` writes them; when that file already holds another profile's report, this
profile's goes to ``<artifact>.<profile>.json``. An existing report is reused only when it is
for this profile, was measured from an artifact with the same sha256 as the file now on disk,
was judged under the gate's current ``policy``, and measured quality if a holdout is given now;
otherwise the artifact is gated again.
With ``stop_at_first`` the walk stops at the first PASS (the rest are ``skipped``); by
default every choice is gated so the table is complete.

``quality`` says which gated choices answer the holdout (the costly part of a gate: every
labelled row is decoded through the artifact). ``"all"`` (default): every one.
``"until-pass"``: only where the answer can decide something. Until a choice passes, each
is first gated on latency and memory; only one that meets those budgets is gated again with
the holdout (a choice that misses one FAILs, or stays UNVERIFIED, whatever its quality).
After the first PASS the rest are gated on latency and memory only: their quality cannot
change which choice is chosen (the first PASS in preference order). Rows without quality
carry ``quality_measured: false`` and a reason saying why; the table stays complete on size,
speed and memory, and the Pareto front drops the quality axis, as it does for any missing
quality. This is what ``edgepack pipeline`` uses by default.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.constants import ARTIFACTS_DIR, DATA_DIR, EXPORT_REPORT, FAIL, GATE_DIR, HOLDOUT_FILE, PASS, UNVERIFIED
from edgepack.errors import RunDirError, UsageError
from edgepack.export.gate.gate import POLICY
from edgepack.locks import locked_stage
from edgepack.profiles import Profile
from edgepack.progress import ProgressFn, null_progress

MB = 2**20
NOT_EXPORTED = "not exported"
SKIPPED = "skipped"
QUALITY_ALL = "all"
QUALITY_UNTIL_PASS = "until-pass"
QUALITY_MODES = (QUALITY_ALL, QUALITY_UNTIL_PASS)
QUALITY_AFTER_PASS = "quality not measured: a choice earlier in the profile's order already passed (until-pass)"
QUALITY_AFTER_MISS = ("quality not measured: a latency or memory budget is missed, so the holdout cannot change "
                      "the verdict (until-pass)")


def _choice_key(fmt: str, quant: str | None) -> tuple[str, str]:
    """Profiles spell GGUF types upper case and ONNX ones lower case; compare case-blind."""
    return fmt.lower(), (quant or "").lower()


def _export_artifacts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / ARTIFACTS_DIR / EXPORT_REPORT
    if not path.is_file():
        raise RunDirError(f"{path} does not exist; nothing to search", hint="run `edgepack export` on this run first")
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("artifacts", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{path} is not a readable export report: {exc}") from exc
    out = []
    for e in entries:
        if not isinstance(e, dict) or not {"path", "format", "quant"} <= set(e):
            raise RunDirError(f"{path}: artifact entry {e!r} lacks path/format/quant")
        out.append({"path": run_dir / ARTIFACTS_DIR / str(e["path"]), "format": str(e["format"]),
                    "quant": str(e["quant"]), "recorded_sha256": e.get("sha256")})
    return out


def _describe(path: Path) -> dict[str, Any]:
    """Format and quantization of a bare artifact, read from the file itself (the format's ``file_quant``)."""
    from edgepack.formats import format_of

    path = Path(path)
    fmt = format_of(path)
    if not fmt.provides("file_quant"):
        raise UsageError(f"{path.name}: format {fmt.name!r} cannot be searched: it does not say how to read "
                         "an artifact's quantization",
                         hint="a format needs file_quant set to 'module:attribute' to be searched by path")
    quant = fmt.part("file_quant")(path)
    return {"path": path, "format": fmt.name, "quant": quant or "", "recorded_sha256": None}


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _reusable(gate_dir: Path, name: str, profile: Profile, sha: str,
              holdout: Path | None) -> tuple[dict[str, Any], Path] | None:
    """An existing report for this artifact file (same sha256), profile and quality setting."""
    if not gate_dir.is_dir():
        return None
    for path in sorted(gate_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: gate again and overwrite
        if not isinstance(report, dict) or report.get("artifact_name") != name or report.get("profile") != profile.name:
            continue
        if report.get("profile_sha256") != profile.content_hash():  # a same-name profile with other budgets
            continue
        if report.get("policy") != POLICY:  # judged by other rules (e.g. before a budget it could not verify
            continue                        # became UNVERIFIED): gate again
        if (report.get("model_sha256") or report.get("artifact_sha256")) != sha:
            continue
        quality = (report.get("measurements") or {}).get("quality")
        if holdout is not None and (not isinstance(quality, dict) or quality.get("holdout") != str(holdout)):
            continue
        return report, path
    return None


def _report_stem(gate_dir: Path, name: str, profile: Profile) -> str:
    """``<artifact>`` unless that report belongs to another profile, then ``<artifact>.<profile>``."""
    plain = gate_dir / f"{name}.json"
    if plain.is_file():
        try:
            if json.loads(plain.read_text(encoding="utf-8")).get("profile") != profile.name:
                return f"{name}.{profile.name}"
        except (OSError, ValueError, AttributeError):
            pass  # unreadable: it is replaced
    return name


def _row(choice: str, art: dict[str, Any] | None, report: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"choice": choice, "artifact": None, "path": None, "size_mb": None, "ttft_p95_ms": None,
                           "decode_tokens_per_s": None, "peak_rss_mb": None, "quality": None, "score": None,
                           "metric": None, "efficiency": None,
                           "verdict": None, "status": NOT_EXPORTED if art is None else SKIPPED, "reasons": [],
                           "report": None, "reused": False, "pareto": False, "quality_measured": False}
    if art is not None:
        row.update(artifact=art["path"].name, path=str(art["path"]), size_mb=_size_bytes(art["path"]) / MB)
    if report is None:
        return row
    checks = {c["name"]: c for c in report.get("checks", [])}
    eff = report.get("efficiency")
    quality = (report.get("measurements") or {}).get("quality")
    if isinstance(quality, dict) and not quality.get("error"):
        row.update(score=quality.get("primary", quality.get("accuracy")),
                   metric=quality.get("primary_metric", "accuracy"))
    row.update(status="gated", verdict=report["verdict"], reasons=list(report.get("reasons", [])),
               ttft_p95_ms=checks.get("ttft_p95_ms", {}).get("measured"),
               decode_tokens_per_s=checks.get("decode_tokens_per_s", {}).get("measured"),
               peak_rss_mb=checks.get("peak_memory_mb", {}).get("measured"),
               quality=checks.get("relative_quality", {}).get("measured"),
               efficiency=eff.get("efficiency") if isinstance(eff, dict) else None,
               # a quality budget the holdout could not verify is not met here either
               budgets_met_here=bool(checks) and all(c.get("ok") is not False for c in checks.values())
               and (report.get("measurements") or {}).get("ok", False)
               and not (isinstance(quality, dict) and any(c.get("ok") is None for c in checks.values())))
    return row


def _gate_once(path: Path, gate_dir: Path, sha: str, profile: Profile, holdout: Path | None, reuse: bool,
               progress: ProgressFn) -> tuple[dict[str, Any], Path, bool]:
    """(report, its path, reused?): an existing report for this file and holdout, else a fresh gate."""
    from edgepack.export.gate.gate import run_gate
    from edgepack.export.gate.report import write_gate_reports

    hit = _reusable(gate_dir, path.name, profile, sha, holdout) if reuse else None
    if hit is not None:
        if not hit[1].with_suffix(".md").is_file():  # e.g. written by the pipeline as JSON only
            write_gate_reports(hit[0], gate_dir, stem=hit[1].stem)
        return hit[0], hit[1], True
    report = run_gate(artifact=path, profile=profile, holdout=holdout, progress=progress)
    stem = _report_stem(gate_dir, path.name, profile)
    return report, write_gate_reports(report, gate_dir, stem=stem)["json"], False


def pareto_front(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Choices not dominated on (smaller size, faster decode, higher quality); and the axes used.

    Quality is the task's primary metric on the holdout (``score``; every row of a search answers
    the same holdout, so it ranks as the relative quality does, and needs no teacher). It is an
    axis only when every measured row has it: comparing a measured quality with a missing one
    would invent a number.
    """
    measured = [r for r in rows if r.get("size_mb") is not None and r.get("decode_tokens_per_s") is not None]
    use_quality = bool(measured) and all(r.get("score") is not None for r in measured)
    axes = ["size_mb (lower)", "decode_tokens_per_s (higher)"] + (["quality (higher)"] if use_quality else [])

    def vec(r: dict[str, Any]) -> tuple[float, ...]:  # all "higher is better"
        base = (-float(r["size_mb"]), float(r["decode_tokens_per_s"]))
        return base + ((float(r["score"]),) if use_quality else ())

    front = []
    for r in measured:
        v = vec(r)
        dominated = any(all(a >= b for a, b in zip(vec(o), v)) and vec(o) != v for o in measured if o is not r)
        if not dominated:
            front.append(r["choice"])
    return front, axes


def _by_choice(found: list[dict[str, Any]], profile: Profile,
               notes: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """The first artifact of each (format, quant); duplicates and artifacts no choice names are noted."""
    by_choice: dict[tuple[str, str], dict[str, Any]] = {}
    for art in found:
        key = _choice_key(art["format"], art["quant"])
        if key in by_choice:
            notes.append(f"{art['path'].name} is a second {art['format']}:{art['quant']} artifact; "
                         f"{by_choice[key]['path'].name} is the one searched")
            continue
        by_choice[key] = art
    wanted = {_choice_key(c.format, c.quant) for c in profile.choices}
    for key, art in by_choice.items():
        if key not in wanted:
            notes.append(f"{art['path'].name} ({art['format']}:{art['quant']}) is not a choice of {profile.name}")
    return by_choice


def _gate_choice(choice: str, art: dict[str, Any], *, gate_dir: Path, profile: Profile, holdout: Path | None,
                 quality: str, passed: bool, reuse: bool, progress: ProgressFn, notes: list[str]) -> dict[str, Any]:
    """Gate one choice's artifact (the holdout where ``quality`` says it can matter); its row."""
    from edgepack.export.gate.gate import NO_HOLDOUT_REASON, artifact_digest

    sha = artifact_digest(art["path"])
    if art["recorded_sha256"] and art["recorded_sha256"] != sha:
        notes.append(f"{art['path'].name} changed since export (sha256 differs from export.json); gated as it is now")

    def gate(answer: Path | None) -> tuple[dict[str, Any], Path, bool]:
        return _gate_once(art["path"], gate_dir, sha, profile, answer, reuse, progress)

    skipped = None
    if holdout is None or quality == QUALITY_ALL:
        report, report_path, reused = gate(holdout)
    elif passed:
        report, report_path, reused = gate(None)
        skipped = QUALITY_AFTER_PASS
    else:  # until-pass: latency and memory first; the holdout only where it can decide the verdict
        full = _reusable(gate_dir, art["path"].name, profile, sha, holdout) if reuse else None
        report, report_path, reused = (full[0], full[1], True) if full is not None else gate(None)
        if full is None and _row(choice, art, report).get("budgets_met_here"):
            report, report_path, reused = gate(holdout)
        elif full is None:
            skipped = QUALITY_AFTER_MISS
    row = _row(choice, art, report)
    row.update(report=str(report_path), reused=reused,
               quality_measured=isinstance((report.get("measurements") or {}).get("quality"), dict))
    if skipped and not row["quality_measured"]:
        # the search gave this gate no holdout on purpose: say why, not "no holdout given"
        row["reasons"] = [r for r in row["reasons"] if r != NO_HOLDOUT_REASON] + [skipped]
    return row


def _summary(profile: Profile, rows: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The verdict, the chosen row, the best row on this host and the Pareto front of ``rows``."""
    from edgepack.export.gate.gate import host_matches

    front, axes = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["choice"] in front
    chosen = next((r for r in rows if r["verdict"] == PASS), None)
    on_host = next((r for r in rows if r["verdict"] == UNVERIFIED and r.get("budgets_met_here")), None)
    verdict = PASS if chosen else (UNVERIFIED if any(r["verdict"] == UNVERIFIED for r in rows) else FAIL)
    if not any(r["status"] != NOT_EXPORTED for r in rows):
        notes.append(f"none of {profile.name}'s choices ({', '.join(map(str, profile.choices))}) has an artifact; "
                     "export one of them first")
    host_ok, host_reason = host_matches(profile)
    return {
        "profile": profile.name, "verdict": verdict, "chosen": chosen["choice"] if chosen else None,
        "chosen_artifact": chosen["path"] if chosen else None, "chosen_report": chosen["report"] if chosen else None,
        "best_on_this_host": on_host["choice"] if on_host and not chosen else None,
        "rows": rows, "pareto": front, "pareto_axes": axes, "host": {"ok": host_ok, "reason": host_reason},
    }


@locked_stage("gate", lambda kw: kw.get("run_dir"))  # held across every choice; run_gate's own take nests
def search(*, profile: Profile, run_dir: Path | None = None, artifacts: list[Path] | None = None,
           holdout: Path | None = None, progress: ProgressFn = null_progress, stop_at_first: bool = False,
           reuse: bool = True, quality: str = QUALITY_ALL) -> dict[str, Any]:
    """Gate ``profile``'s choices best-first and report the first that passes; see the module doc.

    ``run_dir``: artifacts from its export.json, reports to its ``gate/`` folder, holdout
    defaulting to its ``data/holdout.jsonl``. ``artifacts``: explicit files/folders instead
    (reports go to ``run_dir/gate`` if a run is given, else beside each artifact in ``gate/``).
    """
    if run_dir is None and not artifacts:
        raise UsageError("search needs a run directory or a list of artifacts")
    if quality not in QUALITY_MODES:
        raise UsageError(f"unknown search quality mode {quality!r}", hint=f"use one of: {', '.join(QUALITY_MODES)}")
    run_dir = Path(run_dir) if run_dir is not None else None
    found = [_describe(Path(a)) for a in artifacts] if artifacts else _export_artifacts(run_dir)  # type: ignore[arg-type]
    if holdout is None and run_dir is not None and (run_dir / DATA_DIR / HOLDOUT_FILE).is_file():
        holdout = run_dir / DATA_DIR / HOLDOUT_FILE
    notes: list[str] = []
    by_choice = _by_choice(found, profile, notes)
    rows: list[dict[str, Any]] = []
    passed = False
    total = len(profile.choices)
    for i, choice in enumerate(profile.choices):
        progress("search", i, total)
        art = by_choice.get(_choice_key(choice.format, choice.quant))
        if art is not None and not art["path"].exists():
            notes.append(f"{art['path'].name} is recorded in export.json but missing on disk")
        if art is None or not art["path"].exists() or (stop_at_first and passed):
            rows.append(_row(str(choice), art if art is not None and art["path"].exists() else None, None))
            continue
        gate_dir = (run_dir / GATE_DIR) if run_dir is not None else art["path"].parent / GATE_DIR
        rows.append(_gate_choice(str(choice), art, gate_dir=gate_dir, profile=profile, holdout=holdout,
                                 quality=quality, passed=passed, reuse=reuse, progress=progress, notes=notes))
        passed = passed or rows[-1]["verdict"] == PASS
    progress("search", total, total)
    summary = _summary(profile, rows, notes)
    return {
        **{k: summary[k] for k in ("profile", "verdict", "chosen", "chosen_artifact", "chosen_report",
                                   "best_on_this_host", "rows", "pareto", "pareto_axes")},
        "holdout": str(holdout) if holdout else None,
        "min_decode_tokens_per_s": profile.min_decode_tokens_per_s, "ttft_p95_ms": profile.ttft_p95_ms,
        "memory_budget_mb": profile.memory_budget_mb, "stop_at_first": stop_at_first, "search_quality": quality,
        "host": summary["host"], "notes": notes,
        "run_dir": str(run_dir) if run_dir else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
