"""The deployment gate: measure an artifact in its real runtime and judge it against a profile.

Three parts, so the judgement can be tested without a model:

- :func:`host_matches` — can this machine stand in for the profile's device?
- :func:`decide` — a PURE function from measurements + profile to verdict, checks, reasons.
- :func:`run_gate` — verify (bundles), measure in a fresh process, run the holdout, decide.

Verdict rules (also in the report's ``policy``):

- PASS: this host matches the profile and every measured budget is met.
- FAIL: this host matches and a budget is missed (each miss named with its margin), or the
  artifact could not be measured at all (load failure, crash, OOM kill, timeout) on any host.
- UNVERIFIED: the host does not match the profile (other arch, too few cores, no NVIDIA GPU
  for ``cuda``, not Apple Silicon for ``metal``), or the GPU could not be used/measured (the
  numbers are reported but marked ``from_target: false``), or a quality budget could not be
  verified on the holdout (below); UNVERIFIED is never PASS.
- Decode efficiency (``efficiency``: decode tok/s × bytes read per token ÷ this machine's
  measured memory bandwidth, :mod:`edgepack.export.gate.bandwidth`) and the run-to-run spread
  (``spread``: stdev, min/max, coefficient of variation) are reported, never judged.
- Quality is measured only with a holdout. Without one the quality checks are ``ok: null``, a
  reason says "quality not measured", and the verdict covers latency and memory only. With one
  the artifact answers it as the bundle will (the task's system prompt and decoding; a json task
  under its schema where the runtime can constrain it) and each quality budget the profile sets
  is judged on the task's primary metric: ``relative_quality`` (``min_relative_quality``: the
  metric ÷ the teacher's on its recorded responses) and ``score`` (``min_score``: an absolute
  floor on the metric). A budget whose number cannot be computed (no teacher responses for the
  relative one, a metric that is None, zero scorable rows) makes the verdict UNVERIFIED with the
  reason, never PASS; a missed one is a FAIL.
  The holdout is answered in a fresh child process under a timeout scaled to the rows
  (:mod:`edgepack.export.gate.quality_child`); a crash, OOM kill or timeout there is a FAIL
  ("the holdout could not be answered: ..."), never a hang.
- Before anything is measured, the artifact's chat templates are checked and rendered
  (the format's ``check_templates``, :mod:`edgepack.runtime.chat.check`), with or without a
  holdout: a template bomb or a template that cannot render a plain chat is refused (exit 2),
  never given a verdict.
- Agreement with the teacher (the artifact names the label the teacher's recorded response
  names) and the KL divergence against the unquantized reference (``--reference``, or
  ``RUN/student`` found beside ``RUN/artifacts/``) are reported, never judged: profiles carry
  no budget for them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.constants import (ARTIFACTS_DIR, BUNDLE_SUFFIX, FAIL, M_ENTRYPOINT, M_FORMAT, M_QUANT, PASS,
                                SIGNATURE_FILE, STUDENT_DIR, UNVERIFIED)
from edgepack.errors import ArtifactPathError, InvalidModelFile, ModelSourceError, UsageError
from edgepack.formats import Format, get_format
from edgepack.hashing import sha256_file
from edgepack.locks import locked_stage
from edgepack.profiles import Profile
from edgepack.provenance import machine_info
from edgepack.progress import ProgressFn, null_progress

# platform.machine() spellings -> one canonical name.
ARCH_ALIASES: dict[str, str] = {
    "x86_64": "x86_64", "amd64": "x86_64", "AMD64": "x86_64", "x64": "x86_64",
    "aarch64": "arm64", "arm64": "arm64", "ARM64": "arm64",
}

POLICY = ("PASS needs a matching host and every measured budget met; a host mismatch gives "
          "UNVERIFIED (numbers not from the target); a missed budget or a failed measurement gives "
          "FAIL; quality without a holdout is 'not measured' and does not block PASS; with a holdout, "
          "a quality budget that cannot be computed (no teacher responses for a relative budget, no "
          "scorable rows) gives UNVERIFIED.")

NO_HOLDOUT_REASON = "quality not measured (no holdout given); the verdict covers latency and memory only"


def canonical_arch(name: str) -> str:
    """``amd64`` → ``x86_64``, ``aarch64`` → ``arm64``; unknown names unchanged."""
    return ARCH_ALIASES.get(name, ARCH_ALIASES.get(name.lower(), name.lower()))


def _nvidia_gpus() -> tuple[list[str], str]:
    """Names of NVIDIA GPUs via NVML (pynvml) or ``nvidia-smi -L``; never imports torch."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                         for i in range(pynvml.nvmlDeviceGetCount())]
            finally:
                pynvml.nvmlShutdown()
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names], "NVML"
        except Exception as exc:  # NVML present but no driver/GPU
            return [], f"NVML: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}"
    gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return gpus, "nvidia-smi" if gpus else f"nvidia-smi listed no GPU (exit {out.returncode})"


def host_matches(profile: Profile) -> tuple[bool, str]:
    """Whether this machine can stand in for ``profile``'s device, and why (not)."""
    problems: list[str] = []
    here, want = canonical_arch(platform.machine()), canonical_arch(profile.arch)
    if here != want:
        problems.append(f"arch {platform.machine()} != profile arch {profile.arch}")
    cpus = os.cpu_count() or 1
    if cpus < profile.threads:
        problems.append(f"{cpus} CPUs < profile threads {profile.threads}")
    detail = f"{platform.system()} {platform.machine()}, {cpus} CPUs"
    if profile.device == "cuda":
        gpus, how = _nvidia_gpus()
        if gpus:
            detail += f", {gpus[0]}"
        else:
            problems.append(f"no NVIDIA GPU ({how})")
    elif profile.device == "metal":
        if platform.system() != "Darwin" or here != "arm64":
            problems.append(f"metal needs macOS on Apple Silicon, this is {platform.system()} {platform.machine()}")
    if problems:
        return False, "; ".join(problems)
    return True, f"host matches {profile.name} ({detail})"


def _check(name: str, measured: float | None, budget: float, ok: bool | None, unit: str,
           from_target: bool) -> dict[str, Any]:
    return {"name": name, "measured": None if measured is None else round(measured, 3),
            "budget": budget, "ok": ok, "unit": unit, "from_target": from_target}


def _miss(name: str, measured: float, budget: float, unit: str, higher_is_better: bool) -> str:
    gap = budget - measured if higher_is_better else measured - budget
    side = "<" if higher_is_better else ">"
    pct = 100.0 * gap / budget if budget else float("inf")
    return f"{name}: {measured:.1f} {unit} {side} budget {budget:g} {unit} (misses by {gap:.1f} {unit}, {pct:.0f}%)"


def _quality_budgets(profile: Profile, quality: dict[str, Any] | None) -> list[tuple[str, float, str]]:
    """(check name, budget, unit) of each quality budget the profile sets: the relative one, then
    the floor on the task's primary metric (its unit is the metric's name)."""
    metric = quality.get("primary_metric", "accuracy") if isinstance(quality, dict) else "primary metric"
    budgets = [("relative_quality", profile.min_relative_quality, "x teacher"), ("score", profile.min_score, metric)]
    return [(name, budget, unit) for name, budget, unit in budgets if budget is not None]


def _quality_value(quality: dict[str, Any], name: str) -> float | None:
    """The measured number a quality budget is judged on; None when it could not be computed
    (no teacher score for a ratio, a metric that is None, zero scorable rows)."""
    if (quality.get("scores") or {}).get("scored_rows") == 0:
        return None
    if name == "relative_quality":
        return quality.get("relative")
    return quality["primary"] if "primary" in quality else quality.get("accuracy")  # reports before the task contract


def _judge_quality(quality: dict[str, Any] | None, profile: Profile,
                   target: bool) -> tuple[list[dict[str, Any]], list[str], list[str], list[str]]:
    """(a check per quality budget, misses, unverified budgets, other reasons).

    No holdout: quality is not measured and blocks nothing. With one, a budget whose number cannot
    be computed is *unverified* (the verdict becomes UNVERIFIED, never PASS), with the reason.
    """
    budgets = _quality_budgets(profile, quality)
    if quality is None:
        return ([_check(name, None, budget, None, unit, target) for name, budget, unit in budgets], [], [],
                [NO_HOLDOUT_REASON])
    if quality.get("error"):
        first = budgets[0][0] if budgets else "quality"
        return ([_check(name, None, budget, False, unit, target) for name, budget, unit in budgets],
                [f"{first}: the holdout could not be answered: {quality['error']}"], [], [])
    checks, misses, unverified = [], [], []
    for name, budget, unit in budgets:
        value = _quality_value(quality, name)
        ok = None if value is None else value >= budget
        checks.append(_check(name, value, budget, ok, unit, target))
        if value is None:
            why = ((quality.get("unmeasured") or {}).get(name) or "; ".join(quality.get("notes") or [])
                   or "it could not be computed from the holdout")
            unverified.append(f"{name} budget {budget:g} not verified: {why}")
        elif not ok:
            misses.append(_quality_miss(quality, name, value, budget, unit))
    reasons = [] if budgets else ["quality reported, not judged: the profile sets no quality budget"]
    return checks, misses, unverified, reasons


def _quality_miss(quality: dict[str, Any], name: str, value: float, budget: float, unit: str) -> str:
    if name == "relative_quality":
        from edgepack.export.gate.quality import primary_vs_teacher

        return f"relative_quality: {value:.3f} < budget {budget:g} ({primary_vs_teacher(quality)})"
    return f"score: {unit} {value:.3f} < floor {budget:g}"


def decide(measurements: dict[str, Any], profile: Profile, host_ok: bool,
           host_reason: str) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Judge ``measurements`` against ``profile``'s budgets. Pure: no I/O, no clock.

    ``measurements`` is :func:`edgepack.export.gate.measure.measure_artifact`'s result, optionally
    with ``"quality"`` from :func:`edgepack.export.gate.quality.evaluate_holdout`. Returns
    ``(verdict, checks, reasons)``; see the module docstring for the rules.
    """
    reasons: list[str] = []
    m = measurements
    if not host_ok:
        reasons.append(f"host does not match profile {profile.name}: {host_reason}; "
                       "the numbers below were measured on this host, not on the target device")
    if profile.device != "cpu" and m.get("ok") and not m.get("gpu_offload"):
        host_ok = False
        reasons.append(f"profile device is {profile.device} but the model ran without GPU offload "
                       "(CPU-only runtime build or no GPU); numbers are CPU numbers")
    target = host_ok

    if not m.get("ok"):
        checks = [_check("ttft_p95_ms", None, profile.ttft_p95_ms, None, "ms", target),
                  _check("decode_tokens_per_s", None, profile.min_decode_tokens_per_s, None, "tok/s", target),
                  _check("peak_memory_mb", m.get("peak_rss_mb"), profile.memory_budget_mb, None, "MB", target),
                  *[_check(name, None, budget, None, unit, target)
                    for name, budget, unit in _quality_budgets(profile, m.get("quality"))]]
        reasons.append(f"measurement failed: {m.get('error', 'unknown error')}")
        return FAIL, checks, reasons

    ttft = float(m["ttft_ms"]["p95"])
    decode = float(m["decode_tokens_per_s"]["p50"])
    memory = float(m["peak_rss_mb"]) + float(m.get("vram_mb") or 0.0)
    checks = [
        _check("ttft_p95_ms", ttft, profile.ttft_p95_ms, ttft <= profile.ttft_p95_ms, "ms", target),
        _check("decode_tokens_per_s", decode, profile.min_decode_tokens_per_s,
               decode >= profile.min_decode_tokens_per_s, "tok/s", target),
        _check("peak_memory_mb", memory, profile.memory_budget_mb, memory <= profile.memory_budget_mb, "MB", target),
    ]
    misses = []
    if ttft > profile.ttft_p95_ms:
        misses.append(_miss("ttft_p95_ms", ttft, profile.ttft_p95_ms, "ms", higher_is_better=False))
    if decode < profile.min_decode_tokens_per_s:
        misses.append(_miss("decode_tokens_per_s", decode, profile.min_decode_tokens_per_s, "tok/s",
                            higher_is_better=True))
    if memory > profile.memory_budget_mb:
        misses.append(_miss("peak_memory_mb", memory, profile.memory_budget_mb, "MB", higher_is_better=False))

    quality = m.get("quality")
    quality_checks, quality_misses, unverified, notes = _judge_quality(quality, profile, target)
    checks += quality_checks
    misses += quality_misses
    reasons += unverified + notes

    kld = quality.get("kld_vs_reference") if isinstance(quality, dict) else None
    if isinstance(kld, dict) and kld.get("error"):
        reasons.append(f"KLD vs reference {kld.get('reference')} not measured (reported only, not a budget): "
                       f"{kld['error']}")

    if profile.device == "cuda" and m.get("vram_mb") is None:
        host_ok = False
        reasons.append("GPU memory (VRAM) was not measured; peak_memory_mb is host RSS only")

    if not target or not host_ok:
        reasons += [f"(on this host, not the target) {miss}" for miss in misses]
        return UNVERIFIED, checks, reasons
    if misses:
        return FAIL, checks, misses + reasons
    return (UNVERIFIED if unverified else PASS), checks, reasons


def artifact_digest(path: Path) -> str:
    """sha256 of a model file; for a folder (ONNX), the digest export.json records for it:
    sha256 over ``"<relative path>\t<file sha256>\n"`` of every file but ``.complete``, sorted."""
    from edgepack.constants import COMPLETE_MARKER

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return folder_digest((f.relative_to(path).as_posix(), sha256_file(f)) for f in path.rglob("*")
                         if f.is_file() and f.relative_to(path).as_posix() != COMPLETE_MARKER)


def folder_digest(files: Iterable[tuple[str, str]]) -> str:
    """The folder digest of :func:`artifact_digest` from (relative path, sha256) pairs, e.g. a
    bundle manifest's entries for the folder (``pack`` checks the packed copy with it)."""
    lines = "".join(f"{rel}\t{sha}\n" for rel, sha in sorted(files, key=lambda f: PurePosixPath(f[0])))
    return hashlib.sha256(lines.encode()).hexdigest()


def measurement_spread(m: dict[str, Any]) -> dict[str, Any]:
    """Run-to-run spread of TTFT and decode speed: stdev, min/max and stdev/mean in percent."""
    out: dict[str, Any] = {}
    for key in ("ttft_ms", "decode_tokens_per_s", "inter_token_ms"):
        series = m.get(key)
        if not isinstance(series, dict) or "stdev" not in series:
            continue
        mean = float(series.get("mean") or 0.0)
        out[key] = {"n": series.get("n"), "mean": mean, "stdev": series["stdev"], "min": series["min"],
                    "max": series["max"], "cv_percent": 100.0 * series["stdev"] / mean if mean else None,
                    "range_percent": 100.0 * (series["max"] - series["min"]) / mean if mean else None}
    return out


@contextmanager
def _materialize(artifact: Path, key: Path | None = None, warn: Callable[[str], None] | None = None,
                 ) -> Iterator[tuple[Path, str, str | None, dict[str, Any] | None]]:
    """(model path, format, quant, manifest) of a bare artifact or a verified, extracted bundle
    (with ``key``, a public key the bundle's signature must verify against; without one, a
    signed bundle is announced through ``warn``: its signature was not checked)."""
    from edgepack.formats import format_of
    from edgepack.runtime.bundle.archive import extract_bundle

    if artifact.suffix == BUNDLE_SUFFIX:
        with tempfile.TemporaryDirectory(prefix="edgepack-gate-") as tmp:
            dest = extract_bundle(artifact, Path(tmp) / "bundle", key=key)
            if key is None and warn is not None and (dest / SIGNATURE_FILE).is_file():
                from edgepack.runtime.session import unchecked_signature_note
                from edgepack.runtime.bundle.signing import parse_signature

                signer = parse_signature((dest / SIGNATURE_FILE).read_bytes(), artifact.name).get("key_id")
                warn(unchecked_signature_note(artifact.name, signer))
            manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
            yield dest / manifest[M_ENTRYPOINT], manifest[M_FORMAT], manifest[M_QUANT], manifest
        return
    if key is not None:
        raise UsageError(f"--key verifies a bundle's signature, and {artifact} is not a {BUNDLE_SUFFIX} bundle",
                         hint="pack it with `edgepack pack --sign KEY`, or drop --key")
    fmt = format_of(artifact)
    yield artifact, fmt.name, _file_quant(fmt, artifact), None


def _file_quant(fmt: Format, artifact: Path) -> str | None:
    """What the artifact records as its quantization (the format's ``file_quant``), not what it is
    called. An unreadable one is measured and FAILs where the format says its loader reports it
    (``gate_measures_unreadable``), and is refused here, before any process loads it, otherwise."""
    if not fmt.provides("file_quant"):
        return None
    try:
        return fmt.part("file_quant")(artifact)
    except InvalidModelFile:
        if fmt.gate_measures_unreadable:
            return None  # the measurement child reports the same error; the verdict is FAIL
        raise


def _check_templates(model_path: Path, fmt: Format) -> str | None:
    """The format's chat-template check (strict); a note when the format has none."""
    if not fmt.provides("check_templates"):
        return f"chat templates not checked: format {fmt.name!r} provides no check_templates"
    fmt.part("check_templates")(model_path, strict=True)
    return None


def resolve_reference(reference: Path) -> Path:
    """The HF dir of an explicit ``--reference``: an HF model dir, or a run dir's ``student/``."""
    ref = Path(reference)
    for candidate in (ref, ref / STUDENT_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelSourceError(f"reference {ref} is neither an HF model dir (config.json) nor a run dir with "
                           f"{STUDENT_DIR}/config.json",
                           hint="pass the unquantized student the artifact was exported from, e.g. RUN/student")


def auto_reference(artifact: Path) -> Path | None:
    """``RUN/student`` for an artifact under ``RUN/artifacts/`` whose run has ``student/config.json``.

    Bundles get none: a bundle travels without its run, and a folder that happens to lie
    beside it is not known to be what it was exported from.
    """
    artifact = Path(artifact)
    if artifact.suffix == BUNDLE_SUFFIX:
        return None
    for parent in artifact.resolve().parents:
        if parent.name == ARTIFACTS_DIR:
            student = parent.parent / STUDENT_DIR
            return student if (student / "config.json").is_file() else None
    return None


def artifact_run_dir(artifact: Path) -> Path | None:
    """The run an artifact belongs to (``RUN`` for ``RUN/artifacts/<name>``), else None."""
    path = Path(os.path.abspath(artifact))
    return path.parent.parent if path.parent.name == ARTIFACTS_DIR else None


# One gate at a time per run: two measuring at once on the same cores distort each other's numbers.
@locked_stage("gate", lambda kw: artifact_run_dir(kw["artifact"]))
def run_gate(*, artifact: Path, profile: Profile, holdout: Path | None,
             progress: ProgressFn = null_progress, efficiency: bool = True,
             key: Path | None = None, reference: Path | None = None,
             quality_timeout_s: float | None = None, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``artifact`` (a model file, ONNX folder or .edgepack bundle) against ``profile``.

    A bundle is verified before anything is loaded (with ``key``, its ed25519 signature too;
    without one, a signed bundle is announced through ``warn``: its signature was not checked).
    Latency and memory are measured in a fresh child process (:mod:`edgepack.export.gate.measure`);
    with ``holdout`` the artifact answers it in another child
    (:mod:`edgepack.export.gate.quality_child`) as the bundle will (the task's system prompt and
    decoding): the task's scores, relative quality, agreement with the teacher. With a holdout and ``reference`` (an unquantized HF dir; by default
    ``RUN/student`` when the artifact lies under ``RUN/artifacts/``, see
    :func:`auto_reference`) a third child measures the KL divergence of the artifact's logits
    from the reference's. ``quality_timeout_s`` overrides each holdout child's wall-clock
    limit (default: scaled to the rows, see
    :func:`~edgepack.export.gate.quality_child.answer_timeout_s`). With ``efficiency`` the decode
    efficiency against this machine's (cached) memory bandwidth is added. Returns the report
    dict (see the module docstring); :func:`edgepack.export.gate.report.write_gate_reports` writes
    it with its markdown and latency plot.
    """
    from edgepack.export.gate.measure import DEFAULT_DECODE_TOKENS, measure_artifact

    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactPathError(f"artifact not found: {artifact}")
    from edgepack.export.gate.quality import find_task, load_holdout

    task, task_source = find_task(artifact, holdout) if holdout is not None else (None, None)
    rows = load_holdout(holdout, task) if holdout is not None else None  # bad data fails before measuring
    if reference is not None:
        if holdout is None:
            raise UsageError("--reference needs --holdout: the KL divergence is measured on the holdout rows",
                             hint="add --holdout RUN/data/holdout.jsonl, or drop --reference")
        reference, reference_source = resolve_reference(reference), "given"
    else:
        reference, reference_source = auto_reference(artifact), "auto"
    started = datetime.now(timezone.utc)
    progress("gate: verify", 0, 1)
    with _materialize(artifact, key, warn) as (model_path, fmt, quant, manifest):
        # Rendered here whether or not there is a holdout: a template that hangs or explodes
        # must not get a verdict (the measurement itself never renders it).
        unchecked = _check_templates(model_path, get_format(fmt))
        progress("gate: verify", 1, 1)
        host_ok, host_reason = host_matches(profile)
        # Other processes on the same cores distort latency (llama.cpp threads spin-wait on
        # each other); the load average lets a reader judge the numbers.
        load_average = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        threads = max(1, min(profile.threads, os.cpu_count() or 1))
        gpu_layers = -1 if profile.device in ("cuda", "metal") else 0
        decode_tokens = min(DEFAULT_DECODE_TOKENS, profile.context_length - profile.prompt_tokens)
        model_sha = artifact_digest(model_path)  # what is about to be measured
        progress("gate: measure", 0, 1)
        measurements = measure_artifact(model_path, fmt=fmt, threads=threads, n_ctx=profile.context_length,
                                        prompt_tokens=profile.prompt_tokens, decode_tokens=decode_tokens,
                                        gpu_layers=gpu_layers)
        progress("gate: measure", 1, 1)
        if rows is not None and measurements.get("ok"):
            measurements["quality"] = _holdout_quality(model_path, fmt, rows, threads, profile.context_length,
                                                       gpu_layers, reference, reference_source,
                                                       quality_timeout_s, progress, task)
            measurements["quality"].update(holdout=str(holdout), task_source=task_source)
        decode_efficiency = _efficiency(model_path, fmt, measurements, progress) if efficiency else None
    verdict, checks, reasons = decide(measurements, profile, host_ok, host_reason)
    reasons += [unchecked] if unchecked else []
    artifact_sha = model_sha if artifact == model_path else (sha256_file(artifact) if artifact.is_file() else None)
    return {
        "verdict": verdict, "artifact": str(artifact.resolve()), "artifact_name": artifact.name,
        "artifact_sha256": artifact_sha, "model_sha256": model_sha,
        "bundle_manifest_model": manifest.get("model") if manifest else None,
        "profile": profile.name, "profile_sha256": profile.content_hash(),  # pack binds the report to both hashes
        "format": fmt, "quant": quant, "checks": checks, "reasons": reasons,
        "measurements": measurements, "spread": measurement_spread(measurements),
        "efficiency": decode_efficiency,
        "reference": None if reference is None else {"path": str(reference), "source": reference_source},
        "host": {"ok": host_ok, "reason": host_reason, "threads_used": threads,
                 "load_average_at_start": load_average},
        "machine": machine_info(), "policy": POLICY, "created": started.isoformat(timespec="seconds"),
    }


def _efficiency(model_path: Path, fmt: str, measurements: dict[str, Any],
                progress: ProgressFn) -> dict[str, Any] | None:
    """Decode efficiency vs this machine's peak (all-core) bandwidth; None when nothing was measured."""
    if not measurements.get("ok"):
        return None
    from edgepack.export.gate.bandwidth import artifact_efficiency, machine_bandwidth

    try:
        bandwidth = machine_bandwidth(progress=progress)
        return artifact_efficiency(model_path, fmt, measurements, bandwidth)
    except (OSError, MemoryError, ValueError) as exc:  # reported in the report, not raised: it is not a budget
        return {"efficiency": None, "error": f"{type(exc).__name__}: {exc}"}


def _holdout_quality(model_path: Path, fmt: str, rows: list[dict[str, Any]], threads: int, n_ctx: int,
                     gpu_layers: int, reference: Path | None, reference_source: str, timeout_s: float | None,
                     progress: ProgressFn, task: Any = None) -> dict[str, Any]:
    """The holdout answered by the artifact in a child process under ``task``, then (with a
    reference) the KLD child; a failed answer pass leaves the KLD unmeasured and says so."""
    from edgepack.export.gate.quality_child import answer_holdout, holdout_kld

    progress("gate: holdout", 0, 1)
    quality = answer_holdout(model_path, fmt=fmt, rows=rows, threads=threads, n_ctx=n_ctx,
                             gpu_layers=gpu_layers, timeout_s=timeout_s, task=task)
    progress("gate: holdout", 1, 1)
    if reference is None:
        return quality
    if quality.get("error"):
        kld: dict[str, Any] = {"reference": str(reference), "skipped": "the holdout could not be answered"}
    elif missing := [p for p in ("torch", "transformers") if importlib.util.find_spec(p) is None]:
        # The lean runtime install (dist/runtime) has no torch: say so as the gate's reason, never skip silently.
        kld = {"reference": str(reference), "error": f"{' and '.join(missing)} not installed (the lean runtime "
               "install): the KLD child runs the unquantized student in transformers; gate with the full install"}
    else:
        progress("gate: KLD vs reference", 0, 1)
        kld = holdout_kld(reference, model_path, rows=rows, threads=threads, timeout_s=timeout_s)
        progress("gate: KLD vs reference", 1, 1)
    quality["kld_vs_reference"] = {**kld, "source": reference_source,
                                   "note": "reported, not a budget: profiles carry no KLD budget"}
    return quality
