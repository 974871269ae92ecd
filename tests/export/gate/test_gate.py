"""The gate: host matching, the pure verdict function, and real gate runs on a tiny GGUF."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import FAIL, PASS, UNVERIFIED
from edgepack.profiles import PROFILE_DIR, load_profile
from edgepack.export.gate.gate import canonical_arch, decide, host_matches, run_gate
from tests.runtime.helpers import write_profile

X86 = load_profile("cpu-x86-2c")  # ttft 1500 ms, 20 tok/s, 1024 MB, quality 0.8


def meas(ttft: float = 400.0, decode: float = 50.0, rss: float = 300.0, quality: dict[str, Any] | None = None,
         **extra: Any) -> dict[str, Any]:
    return {"ok": True, "ttft_ms": {"p50": ttft * 0.9, "p95": ttft}, "decode_tokens_per_s": {"p50": decode},
            "peak_rss_mb": rss, "gpu_offload": False, **({"quality": quality} if quality else {}), **extra}


def by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in checks}


def test_arch_aliases() -> None:
    assert canonical_arch("amd64") == canonical_arch("x86_64") == "x86_64"
    assert canonical_arch("aarch64") == canonical_arch("arm64") == "arm64"


def test_pass_when_every_budget_is_met() -> None:
    verdict, checks, reasons = decide(meas(), X86, True, "ok")
    assert verdict == PASS
    c = by_name(checks)
    assert c["ttft_p95_ms"]["ok"] and c["decode_tokens_per_s"]["ok"] and c["peak_memory_mb"]["ok"]
    assert c["relative_quality"]["ok"] is None
    assert any("quality not measured" in r for r in reasons)  # explicit, but not blocking
    assert all(ch["from_target"] for ch in checks)


def test_fail_names_each_missed_budget_and_its_margin() -> None:
    verdict, checks, reasons = decide(meas(ttft=2000.0, decode=12.0, rss=1500.0), X86, True, "ok")
    assert verdict == FAIL
    text = " | ".join(reasons)
    assert "ttft_p95_ms: 2000.0 ms > budget 1500 ms (misses by 500.0 ms, 33%)" in text
    assert "decode_tokens_per_s: 12.0 tok/s < budget 20 tok/s (misses by 8.0 tok/s, 40%)" in text
    assert "peak_memory_mb: 1500.0 MB > budget 1024 MB (misses by 476.0 MB, 46%)" in text
    assert [c["ok"] for c in checks[:3]] == [False, False, False]


def test_one_miss_fails_only_that_check() -> None:
    verdict, checks, reasons = decide(meas(rss=1100.0), X86, True, "ok")
    assert verdict == FAIL
    assert [c["name"] for c in checks if c["ok"] is False] == ["peak_memory_mb"]
    assert reasons[0].startswith("peak_memory_mb")


def test_budget_edges_are_inclusive() -> None:
    verdict, _, _ = decide(meas(ttft=1500.0, decode=20.0, rss=1024.0), X86, True, "ok")
    assert verdict == PASS


def test_failed_measurement_is_fail_with_the_reason() -> None:
    verdict, checks, reasons = decide({"ok": False, "error": "measurement timed out after 300 s"}, X86, True, "ok")
    assert verdict == FAIL
    assert "measurement failed: measurement timed out after 300 s" in reasons
    assert all(c["ok"] is None for c in checks)


@pytest.mark.parametrize("profile_name", ["gpu-8gb", "gpu-4gb", "cpu-arm-rpi5", "mac-m1-8gb"])
def test_other_devices_are_unverified_on_this_x86_cpu_box(profile_name: str) -> None:
    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        pytest.skip("written for the x86-64 Linux CI box")
    profile = load_profile(profile_name)
    ok, why = host_matches(profile)
    assert ok is False and why
    # Even numbers that would pass every budget never make a PASS off-target.
    verdict, checks, reasons = decide(meas(ttft=1.0, decode=1000.0, rss=10.0), profile, ok, why)
    assert verdict == UNVERIFIED
    assert "not on the target device" in reasons[0]
    assert all(c["from_target"] is False for c in checks)


def test_host_mismatch_reasons() -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 box")
    assert "arch" in host_matches(load_profile("cpu-arm-rpi5"))[1]
    assert "NVIDIA" in host_matches(load_profile("gpu-8gb"))[1]
    assert "metal" in host_matches(load_profile("mac-m1-8gb"))[1]


def test_unverified_still_lists_what_would_miss() -> None:
    verdict, _, reasons = decide(meas(decode=5.0), load_profile("cpu-arm-rpi5"), False, "arch x86_64 != aarch64")
    assert verdict == UNVERIFIED
    assert any(r.startswith("(on this host, not the target) decode_tokens_per_s") for r in reasons)


def test_cuda_host_without_gpu_offload_is_unverified() -> None:
    verdict, _, reasons = decide(meas(ttft=10.0, decode=500.0), load_profile("gpu-8gb"), True, "GPU present")
    assert verdict == UNVERIFIED
    assert any("without GPU offload" in r for r in reasons)


def test_cuda_pass_needs_vram_measured() -> None:
    gpu = load_profile("gpu-8gb")
    assert decide(meas(ttft=10.0, decode=500.0, gpu_offload=True), gpu, True, "ok")[0] == UNVERIFIED
    assert decide(meas(ttft=10.0, decode=500.0, gpu_offload=True, vram_mb=900.0), gpu, True, "ok")[0] == PASS
    # VRAM counts against the memory budget
    v, _, reasons = decide(meas(ttft=10.0, decode=500.0, gpu_offload=True, vram_mb=6000.0), gpu, True, "ok")
    assert v == FAIL and reasons[0].startswith("peak_memory_mb")


def test_quality_checks() -> None:
    good = {"accuracy": 0.72, "teacher_accuracy": 0.8, "relative": 0.9, "notes": []}
    bad = {"accuracy": 0.4, "teacher_accuracy": 0.8, "relative": 0.5, "notes": []}
    none = {"accuracy": 0.6, "teacher_accuracy": None, "relative": None,
            "notes": ["holdout rows carry no teacher responses; relative quality not computed"]}
    assert decide(meas(quality=good), X86, True, "ok")[0] == PASS
    verdict, checks, reasons = decide(meas(quality=bad), X86, True, "ok")
    assert verdict == FAIL and by_name(checks)["relative_quality"]["ok"] is False
    assert "relative_quality: 0.500 < budget 0.8 (accuracy 0.400 vs teacher 0.800)" in reasons
    verdict, checks, reasons = decide(meas(quality=none), X86, True, "ok")
    # a holdout was given, yet the relative budget cannot be computed: never PASS
    assert verdict == UNVERIFIED and by_name(checks)["relative_quality"]["ok"] is None
    assert reasons == ["relative_quality budget 0.8 not verified: holdout rows carry no teacher responses; "
                       "relative quality not computed"]


def quality(primary: float | None = 0.72, teacher: float | None = 0.8, scored: int = 40, metric: str = "accuracy",
            **extra: Any) -> dict[str, Any]:
    """A quality block as the holdout pass writes it (the task's primary metric, the teacher's)."""
    relative = primary / teacher if primary is not None and teacher else None
    return {"primary_metric": metric, "primary": primary, "teacher_primary": teacher, "relative": relative,
            "accuracy": primary if metric == "accuracy" else None, "scores": {"scored_rows": scored},
            "unmeasured": {"score": None if primary is not None else f"{metric} not measured: no row",
                           "relative_quality": None if relative is not None else (
                               f"{metric} not measured: no row" if primary is None
                               else "no teacher responses" if teacher is None else "the teacher scores 0")},
            "notes": [], **extra}


def profile_with(tmp_path: Path, quality_toml: str) -> Any:
    text = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
    start = text.index("[quality]")
    path = tmp_path / "q.toml"
    path.write_text(text[:start] + "[quality]\n" + quality_toml + "\n" + text[text.index("[training]"):])
    return load_profile(str(path))


@pytest.mark.parametrize(("q", "why"), [
    (quality(teacher=None), "relative_quality budget 0.8 not verified: no teacher responses"),
    (quality(primary=None), "relative_quality budget 0.8 not verified: accuracy not measured: no row"),
    # zero scorable rows, whatever number sits beside them
    (quality(scored=0), "relative_quality budget 0.8 not verified: it could not be computed from the holdout"),
    (quality(teacher=0.0), "relative_quality budget 0.8 not verified: the teacher scores 0"),
])
def test_a_quality_budget_that_cannot_be_computed_is_unverified_never_pass(q: dict[str, Any], why: str) -> None:
    verdict, checks, reasons = decide(meas(quality=q), X86, True, "ok")
    assert verdict == UNVERIFIED and reasons[0] == why
    assert by_name(checks)["relative_quality"]["ok"] is None and by_name(checks)["relative_quality"]["measured"] is None


def test_the_floor_on_the_primary_metric(tmp_path: Path) -> None:
    floor = profile_with(tmp_path, "min_score = 0.7")
    verdict, checks, reasons = decide(meas(quality=quality(primary=0.72, teacher=None)), floor, True, "ok")
    assert verdict == PASS and "relative_quality" not in by_name(checks)  # no teacher needed for a floor
    score = by_name(checks)["score"]
    assert (score["measured"], score["budget"], score["ok"], score["unit"]) == (0.72, 0.7, True, "accuracy")
    verdict, checks, reasons = decide(meas(quality=quality(primary=0.55, metric="field_f1")), floor, True, "ok")
    assert verdict == FAIL and reasons == ["score: field_f1 0.550 < floor 0.7"]
    assert by_name(checks)["score"]["unit"] == "field_f1"
    verdict, _, reasons = decide(meas(quality=quality(primary=None, metric="chrf")), floor, True, "ok")
    assert verdict == UNVERIFIED and reasons == ["score budget 0.7 not verified: chrf not measured: no row"]


def test_both_budgets_are_judged_and_a_real_miss_beats_an_unverified_one(tmp_path: Path) -> None:
    both = profile_with(tmp_path, "min_relative_quality = 0.8\nmin_score = 0.7")
    verdict, checks, _ = decide(meas(quality=quality(primary=0.72, teacher=0.8)), both, True, "ok")
    assert verdict == PASS and [c["name"] for c in checks[3:]] == ["relative_quality", "score"]
    verdict, _, reasons = decide(meas(quality=quality(primary=0.6, teacher=None)), both, True, "ok")
    assert verdict == FAIL and reasons == ["score: accuracy 0.600 < floor 0.7",
                                           "relative_quality budget 0.8 not verified: no teacher responses"]
    verdict, _, reasons = decide(meas(ttft=5000.0, quality=quality(teacher=None)), both, True, "ok")
    assert verdict == FAIL and reasons[0].startswith("ttft_p95_ms")
    # on another host it stays UNVERIFIED, the unverifiable budget named beside the host
    verdict, _, reasons = decide(meas(quality=quality(teacher=None)), both, False, "arch aarch64 != x86_64")
    assert verdict == UNVERIFIED and any("not verified: no teacher responses" in r for r in reasons)


def test_no_holdout_leaves_every_quality_budget_unmeasured_and_passes(tmp_path: Path) -> None:
    both = profile_with(tmp_path, "min_relative_quality = 0.8\nmin_score = 0.7")
    verdict, checks, reasons = decide(meas(), both, True, "ok")
    assert verdict == PASS and [(c["name"], c["ok"], c["unit"]) for c in checks[3:]] == [
        ("relative_quality", None, "x teacher"), ("score", None, "primary metric")]
    assert reasons == ["quality not measured (no holdout given); the verdict covers latency and memory only"]
    verdict, checks, reasons = decide({"ok": False, "error": "crashed"}, both, True, "ok")
    assert verdict == FAIL and [c["name"] for c in checks] == ["ttft_p95_ms", "decode_tokens_per_s",
                                                               "peak_memory_mb", "relative_quality", "score"]


def test_an_unanswered_holdout_fails_every_quality_budget(tmp_path: Path) -> None:
    floor = profile_with(tmp_path, "min_score = 0.7")
    verdict, checks, reasons = decide(meas(quality={"error": "holdout pass timed out"}), floor, True, "ok")
    assert verdict == FAIL and by_name(checks)["score"]["ok"] is False
    assert reasons == ["score: the holdout could not be answered: holdout pass timed out"]


def test_decide_is_pure() -> None:
    m = meas(ttft=2000.0)
    snapshot = json.dumps(m, sort_keys=True)
    first = decide(m, X86, True, "ok")
    assert decide(m, X86, True, "ok") == first
    assert json.dumps(m, sort_keys=True) == snapshot


# --- real gate runs -----------------------------------------------------------------------------
def holdout(path: Path) -> Path:
    # Each row carries its own short system turn, as the demo's holdout carries the demo prompt
    # (the gate would prepend the demo's ~450-token prompt, more than the tiny profiles' context).
    system = {"role": "system", "content": "Name the alarm's category."}
    rows = [
        {"id": "a", "messages": [system, {"role": "user", "content": "Pump P-101 bearing noise."}],
         "label": "mechanical", "response": "Category: mechanical\nAction: Inspect the bearings."},
        {"id": "b", "messages": [system, {"role": "user", "content": "Motor starter contacts burnt."}],
         "label": "electrical", "response": "Category: electrical\nAction: Replace the contacts."},
        {"id": "c", "messages": [system, {"role": "user", "content": "Unlabelled row."}], "label": None,
         "response": "Not sure."},  # names no label
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gated(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gate")
    # A random-init model scores 0 on the holdout; a 0 quality floor lets latency/memory decide.
    profile = load_profile(str(write_profile(folder, "tiny-ok", min_relative_quality=0.0)))
    return run_gate(artifact=tiny_gguf, profile=profile, holdout=holdout(folder / "holdout.jsonl"),
                    progress=lambda *a: None)


def test_real_gate_report_has_the_contract_keys(gated: dict[str, Any], tiny_gguf: Path) -> None:
    for key in ("verdict", "artifact", "profile", "format", "quant", "checks", "reasons", "measurements",
                "host", "machine"):
        assert key in gated
    assert (gated["format"], gated["quant"], gated["profile"]) == ("gguf", "F16", "tiny-ok")
    assert gated["verdict"] == PASS, gated["reasons"]
    assert gated["host"]["ok"] is True
    assert {c["name"] for c in gated["checks"]} == {"ttft_p95_ms", "decode_tokens_per_s", "peak_memory_mb",
                                                      "relative_quality"}
    assert gated["measurements"]["ttft_ms"]["n"] >= 5
    assert gated["model_sha256"] == gated["artifact_sha256"] and len(gated["model_sha256"]) == 64
    assert gated["machine"]["cpu_count"] and "node" not in gated["machine"]
    json.dumps(gated)  # the report is plain JSON


def test_real_gate_quality(gated: dict[str, Any]) -> None:
    q = gated["measurements"]["quality"]
    assert (q["rows"], q["labelled"], q["teacher_rows"], q["teacher_accuracy"]) == (3, 2, 2, 1.0)
    # a random-init model does not answer "Category: ...": accuracy 0, honestly reported
    assert q["accuracy"] == 0.0 and q["relative"] == 0.0 and q["unparsed"] == 2


def test_the_same_numbers_fail_a_tight_profile(gated: dict[str, Any], tmp_path: Path) -> None:
    tight = load_profile(str(write_profile(tmp_path, "tiny-tight", ttft_p95_ms=0.001, min_decode_tokens_per_s=1e9)))
    verdict, _, reasons = decide(gated["measurements"], tight, True, "ok")
    assert verdict == FAIL
    assert reasons[0].startswith("ttft_p95_ms") and reasons[1].startswith("decode_tokens_per_s")


def test_real_gate_on_an_arm_profile_is_unverified(tiny_gguf: Path, tmp_path: Path) -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 box")
    arm = load_profile(str(write_profile(tmp_path, "tiny-arm", arch="aarch64")))
    report = run_gate(artifact=tiny_gguf, profile=arm, holdout=None)
    assert report["verdict"] == UNVERIFIED
    assert report["measurements"]["ok"] is True  # measured here, but not the target
    assert any("quality not measured" in r for r in report["reasons"])


def test_gate_of_a_corrupt_file_fails_without_raising(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    report = run_gate(artifact=bad, profile=load_profile(str(write_profile(tmp_path, "p"))), holdout=None)
    assert report["verdict"] == FAIL
    assert any("measurement failed" in r and "not a valid GGUF" in r for r in report["reasons"])


def test_bad_holdout_fails_before_measuring(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.errors import DataError

    (tmp_path / "h.jsonl").write_text('{"label": "x"}\n')
    with pytest.raises(DataError, match="h.jsonl:1"):
        run_gate(artifact=tiny_gguf, profile=load_profile(str(write_profile(tmp_path, "p"))),
                 holdout=tmp_path / "h.jsonl")


def _bundle(tiny_gguf: Path, path: Path) -> Path:
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle

    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16", "profile": {"name": "t"},
                "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS"}
    write_bundle(path, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    return path


def test_gate_of_a_bundle_verifies_then_measures_its_entrypoint(tiny_gguf: Path, tmp_path: Path) -> None:
    bundle = _bundle(tiny_gguf, tmp_path / "tiny.edgepack")
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    report = run_gate(artifact=bundle, profile=profile, holdout=None)
    assert (report["verdict"], report["format"], report["quant"]) == (PASS, "gguf", "F16")
    assert report["measurements"]["ok"] and report["bundle_manifest_model"] == "tiny"
    import hashlib

    assert report["model_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_gate_refuses_a_tampered_bundle_before_measuring(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.errors import BundleError

    bundle = _bundle(tiny_gguf, tmp_path / "tiny.edgepack")
    data = bytearray(bundle.read_bytes())
    data[-30000] ^= 1
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tiny-F16.gguf: sha256"):
        run_gate(artifact=bundle, profile=load_profile(str(write_profile(tmp_path, "p"))), holdout=None)


def test_a_model_that_cannot_chat_fails_quality(tiny_gguf: Path, tmp_path: Path) -> None:
    from tests.runtime.helpers import rewrite_gguf

    mute = rewrite_gguf(tiny_gguf, tmp_path / "mute.gguf",
                        {"tokenizer.chat_template": "{{ raise_exception('no chats here') }}"})
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    report = run_gate(artifact=mute, profile=profile, holdout=holdout(tmp_path / "h.jsonl"))
    assert report["verdict"] == FAIL
    assert "relative_quality: the holdout could not be answered: UsageError" in report["reasons"][0]
    assert "no chats here" in report["reasons"][0]


def test_a_hostile_template_stops_the_gate(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.errors import UnsafeModelError
    from tests.runtime.helpers import rewrite_gguf

    marker = tmp_path / "MARKER"
    evil = rewrite_gguf(tiny_gguf, tmp_path / "evil.gguf", {
        "tokenizer.chat_template": "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"})
    profile = load_profile(str(write_profile(tmp_path, "p", min_relative_quality=0.0)))
    with pytest.raises(UnsafeModelError):
        run_gate(artifact=evil, profile=profile, holdout=holdout(tmp_path / "h.jsonl"))
    assert not marker.exists()
