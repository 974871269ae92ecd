"""`pack` reads a run directory someone else may have written: it must not trust it.

Issue #20 defect 7: symlinks under the run were followed (an outside file packed, and the
bundle verified), a gate report could name an artifact outside the run, reports were matched
to a profile by name only, and a hand-edited PASS was packed. Defect 9: names that merely
contain ``.old-`` / ``.part-`` / ``.tmp-`` (a profile named ``edge.old-1``) were deleted as
debris. The full hostile corpus is ``bench/reliability/run_dir_trust.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import M_FILES, PASS
from edgepack.errors import EdgepackError, GateFailed, RunDirError
from edgepack.export.pack.pack import pack_run
from edgepack.profiles import Profile, load_profile
from edgepack.runtime.bundle.archive import verify_bundle
from tests.runtime.helpers import make_run_dir, write_profile

Q8 = "student-Q8_0.gguf"


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("profiles")
    return {"ok": write_profile(folder, "tiny-ok", min_relative_quality=0.0),
            "old": write_profile(folder, "edge.old-1", min_relative_quality=0.0),
            # a user's own profile that reuses a shipped name, with budgets anything meets
            "shipped-name": write_profile(folder, "cpu-x86-2c", min_relative_quality=0.0)}


@pytest.fixture(scope="module")
def built_run(tiny_llama_dir: Path, profiles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run gated for tiny-ok (both artifacts, with the holdout); Q8_0 also gated, without
    a holdout, for ``edge.old-1`` and for the custom ``cpu-x86-2c``."""
    from edgepack.atomic import write_json
    from edgepack.export.gate.gate import run_gate

    run = make_run_dir(tmp_path_factory.mktemp("runs") / "run", tiny_llama_dir, [profiles["ok"]])
    for key in ("old", "shipped-name"):
        profile = load_profile(str(profiles[key]))
        report = run_gate(artifact=run / "artifacts" / Q8, profile=profile, holdout=None)
        assert report["verdict"] == PASS, report["reasons"]
        write_json(run / "gate" / f"{Q8}.{profile.name}.json", report)
    return run


@pytest.fixture()
def run(built_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built_run, tmp_path / "run", symlinks=True))


@pytest.fixture()
def ok(profiles: dict[str, Path]) -> Profile:
    return load_profile(str(profiles["ok"]))


def _report(run: Path, name: str = f"{Q8}.json") -> tuple[Path, dict[str, Any]]:
    path = run / "gate" / name
    return path, json.loads(path.read_text())


def _pack(run: Path, profile: Profile, **kw: Any) -> dict[str, Any]:
    return pack_run(run_dir=run, profile=profile, artifact=kw.pop("artifact", None),
                    allow_unverified=kw.pop("allow_unverified", False), **kw)


def _no_bundle(run: Path) -> bool:
    return not (run / "bundles").exists() or not [p for p in (run / "bundles").iterdir() if p.suffix == ".edgepack"]


# --- symlinks -------------------------------------------------------------------------------

LINKED = ["student/tokenizer_config.json", "student", "artifacts/student-Q8_0.gguf", "artifacts",
          "gate/student-Q8_0.gguf.json", "gate", "run.toml", "data/report.json", "teacher/source.json",
          "student/train_report.json", "artifacts/export.json", "bundles"]


@pytest.mark.parametrize("rel", LINKED)
def test_a_symlink_anywhere_pack_reads_is_refused(run: Path, ok: Profile, tmp_path: Path, rel: str) -> None:
    """The target keeps the original bytes (so every hash still matches): the link alone is refused."""
    outside = tmp_path / "outside" / rel.replace("/", "_")
    outside.parent.mkdir()
    (run / "bundles").mkdir(exist_ok=True)  # where pack writes: a link there would put the bundle outside
    shutil.move(run / rel, outside)
    (run / rel).symlink_to(outside, target_is_directory=outside.is_dir())
    with pytest.raises(RunDirError, match="symbolic link"):
        _pack(run, ok)
    assert _no_bundle(run) and not list(outside.parent.rglob("*.edgepack"))


def test_a_symlinked_student_file_does_not_smuggle_an_outside_file(run: Path, ok: Profile, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"api_key": "sk-not-for-the-bundle"}))
    (run / "student" / "tokenizer_config.json").unlink()
    (run / "student" / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(RunDirError, match="tokenizer_config.json is a symbolic link"):
        _pack(run, ok)
    assert _no_bundle(run)


def test_the_run_folder_itself_may_be_a_link(run: Path, ok: Profile, tmp_path: Path) -> None:
    link = tmp_path / "run-link"
    link.symlink_to(run, target_is_directory=True)
    assert verify_bundle(Path(_pack(link, ok)["bundle"]))


# --- reports that point elsewhere or were not written by the gate --------------------------------

def test_report_artifact_outside_the_run_is_refused(run: Path, ok: Profile, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "evil.gguf"
    outside.parent.mkdir()
    shutil.copy(run / "artifacts" / "student-F16.gguf", outside)
    path, report = _report(run)
    sha = hashlib.sha256(outside.read_bytes()).hexdigest()
    path.write_text(json.dumps(report | {"artifact": str(outside), "artifact_name": "evil.gguf",
                                         "model_sha256": sha, "artifact_sha256": sha}))
    (run / "gate" / "student-F16.gguf.json").unlink()
    with pytest.raises(RunDirError, match="outside the run|not in"):
        _pack(run, ok)
    assert _no_bundle(run)


@pytest.mark.parametrize("name", ["../../elsewhere/evil.gguf", "/tmp/evil.gguf", "..", ".complete"])
def test_report_artifact_name_that_is_a_path_is_refused(run: Path, ok: Profile, tmp_path: Path, name: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(run / "artifacts" / "student-F16.gguf", tmp_path / "elsewhere" / "evil.gguf")
    path, report = _report(run)
    sha = hashlib.sha256((run / "artifacts" / "student-F16.gguf").read_bytes()).hexdigest()
    path.write_text(json.dumps(report | {"artifact_name": name, "artifact": str(run / "artifacts" / name),
                                         "model_sha256": sha, "artifact_sha256": sha}))
    (run / "gate" / "student-F16.gguf.json").unlink()
    with pytest.raises(RunDirError):
        _pack(run, ok)
    assert _no_bundle(run)


def test_report_sha_that_does_not_match_the_artifact_is_refused(run: Path, ok: Profile) -> None:
    path, report = _report(run)
    path.write_text(json.dumps(report | {"model_sha256": "0" * 64, "artifact_sha256": "0" * 64}))
    with pytest.raises(RunDirError, match="not the file that was gated"):
        _pack(run, ok, artifact=run / "artifacts" / Q8)


def test_hand_edited_pass_is_refused(run: Path, ok: Profile) -> None:
    """The measurements say the budget was missed; only the verdict was changed to PASS."""
    path, report = _report(run)
    report["measurements"]["ttft_ms"]["p95"] = 10 * ok.ttft_p95_ms
    path.write_text(json.dumps(report | {"verdict": PASS}))
    with pytest.raises(RunDirError, match="does not follow from its own measurements"):
        _pack(run, ok, artifact=run / "artifacts" / Q8)
    assert _no_bundle(run)


def test_a_report_pack_did_not_get_from_the_gate_is_refused(run: Path, ok: Profile) -> None:
    """A minimal forged PASS: the right name, the right sha256, nothing measured."""
    path, report = _report(run)
    forged = {k: report[k] for k in ("verdict", "artifact", "artifact_name", "model_sha256", "artifact_sha256",
                                     "profile", "format", "quant")}
    path.write_text(json.dumps(forged))
    (run / "gate" / "student-F16.gguf.json").unlink()
    with pytest.raises(RunDirError, match="profile hash|re-run the gate"):
        _pack(run, ok)
    assert _no_bundle(run)


def test_a_custom_profile_with_a_shipped_name_does_not_stand_in_for_it(run: Path) -> None:
    """Gated PASS with the user's lax `cpu-x86-2c`; packing for the shipped one is refused."""
    shipped = load_profile("cpu-x86-2c")
    _, report = _report(run, f"{Q8}.cpu-x86-2c.json")
    assert report["verdict"] == PASS and report["profile"] == shipped.name
    with pytest.raises(EdgepackError, match="another profile named cpu-x86-2c"):
        _pack(run, shipped)
    with pytest.raises(RunDirError, match="another profile named cpu-x86-2c"):
        _pack(run, shipped, artifact=run / "artifacts" / Q8)
    assert _no_bundle(run)


def test_a_same_name_profile_with_impossible_budgets_is_not_packed(run: Path, tmp_path: Path) -> None:
    strict = load_profile(str(write_profile(tmp_path, "tiny-ok", ttft_p95_ms=0.001, min_relative_quality=0.0)))
    with pytest.raises((RunDirError, GateFailed), match="another profile named tiny-ok"):
        _pack(run, strict)
    assert _no_bundle(run)


def test_artifact_changed_while_packing_is_refused(run: Path, ok: Profile, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file matches the gate when pack looks, and is swapped before its bytes are bundled."""
    import edgepack.export.pack.pack as pack

    original = pack.gguf_payload  # the gguf format's payload part, looked up when pack runs

    def swap_then_build(model: Path, *args: Any) -> Any:
        with open(model, "r+b") as fh:
            fh.seek(-1, 2)
            last = fh.read(1)
            fh.seek(-1, 2)
            fh.write(bytes([last[0] ^ 1]))
        return original(model, *args)

    monkeypatch.setattr(pack, "gguf_payload", swap_then_build)
    with pytest.raises(RunDirError, match="changed while it was packed|not the file that was gated"):
        _pack(run, ok)
    assert _no_bundle(run)


def test_a_proper_run_still_packs_and_binds_the_hashes(run: Path, ok: Profile) -> None:
    result = _pack(run, ok)
    m = verify_bundle(Path(result["bundle"]))
    gate = m["gate"]
    model = next(f for f in m[M_FILES] if f["path"] == Q8)
    assert gate["model_sha256"] == model["sha256"] and gate["profile_sha256"] == ok.content_hash()


# --- debris-looking names are not debris ----------------------------------------------------------

def test_a_profile_named_like_debris_keeps_its_bundle(run: Path, ok: Profile, profiles: dict[str, Path]) -> None:
    first = Path(_pack(run, load_profile(str(profiles["old"])))["bundle"])
    assert first.name == "student-edge.old-1-gguf-Q8_0.edgepack"
    _pack(run, ok)  # the next pack used to delete every name containing ".old-"
    assert first.is_file() and verify_bundle(first)


def test_export_keeps_user_files_that_look_like_debris(run: Path, tmp_path: Path) -> None:
    from edgepack.export.api import export_model

    keep = {"notes.part-1.txt": b"mine", "edge.old-1.gguf": b"also mine", "draft.tmp-2": b"mine too"}
    for name, data in keep.items():
        (run / "artifacts" / name).write_bytes(data)
    (run / "artifacts" / "edge.old-1").mkdir()
    (run / "artifacts" / "edge.old-1" / "weights.bin").write_bytes(b"a finished folder")
    export_model(source=run, fmt="gguf", quants=["Q8_0"], out_dir=None, fidelity=False)
    for name, data in keep.items():
        assert (run / "artifacts" / name).read_bytes() == data
    assert (run / "artifacts" / "edge.old-1" / "weights.bin").is_file()
