"""`pack_run` on a real run directory: exported tiny GGUFs and an ONNX folder, gated by the
real gate; signed bundles with real Ed25519 keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import (FAIL, M_CHAT_TEMPLATE, M_ENTRYPOINT, M_FILES, M_FORMAT, M_GATE, M_GATE_STATUS,
                                M_LINEAGE, M_MODEL, M_PACK, M_PROFILE, M_QUANT, M_RUNTIME, M_SCHEMA, M_TASK,
                                M_TASK_SCORES, PASS, UNVERIFIED)
from edgepack.errors import GateFailed, RunDirError, UsageError
from edgepack.export.pack.pack import pack_run
from edgepack.profiles import Profile, load_profile
from edgepack.runtime.bundle.archive import verify_bundle
from tests.runtime.helpers import make_run_dir, write_profile


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Profile]:
    folder = tmp_path_factory.mktemp("profiles")
    # Random-init weights score 0 on the holdout, so the quality floor is 0 here.
    ok = write_profile(folder, "tiny-ok", min_relative_quality=0.0)
    arm = write_profile(folder, "tiny-arm", arch="aarch64", min_relative_quality=0.0)
    return {"ok": load_profile(str(ok)), "arm": load_profile(str(arm))}


@pytest.fixture(scope="module")
def built_run(tiny_llama_dir: Path, profiles: dict[str, Profile], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs") / "run", tiny_llama_dir,
                        [Path(profiles["ok"].source), Path(profiles["arm"].source)])


@pytest.fixture()
def run(built_run: Path, tmp_path: Path) -> Path:
    """A private copy, so tests may change reports and artifacts."""
    return Path(shutil.copytree(built_run, tmp_path / "run"))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gate_report(run: Path, name: str) -> tuple[Path, dict[str, Any]]:
    path = run / "gate" / name
    return path, json.loads(path.read_text())


def test_the_run_was_really_gated(built_run: Path) -> None:
    names = sorted(p.name for p in (built_run / "gate").glob("*.json"))
    assert names == ["student-F16.gguf.json", "student-F16.gguf.tiny-arm.json",
                     "student-Q8_0.gguf.json", "student-Q8_0.gguf.tiny-arm.json"]
    assert gate_report(built_run, "student-Q8_0.gguf.json")[1]["verdict"] == PASS
    assert gate_report(built_run, "student-Q8_0.gguf.tiny-arm.json")[1]["verdict"] == UNVERIFIED


def test_pack_builds_a_verifiable_bundle(run: Path, profiles: dict[str, Profile]) -> None:
    import llama_cpp
    import yaml

    result = pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)
    bundle = Path(result["bundle"])
    # the first PASS in the profile's preference order (Q8_0 before F16)
    assert bundle == run / "bundles" / "student-tiny-ok-gguf-Q8_0.edgepack"
    assert (result["verdict"], result["quant"], result["bytes"]) == (PASS, "Q8_0", bundle.stat().st_size)
    assert not [p for p in (run / "bundles").iterdir() if p != bundle]  # no .part leftovers

    m = verify_bundle(bundle)
    assert (m[M_SCHEMA], m[M_MODEL], m[M_FORMAT], m[M_QUANT], m[M_GATE_STATUS]) == (1, "student", "gguf", "Q8_0", PASS)
    assert m[M_PROFILE]["name"] == "tiny-ok" and m[M_ENTRYPOINT] == "student-Q8_0.gguf"
    assert {f["path"] for f in m[M_FILES]} == {"student-Q8_0.gguf", "Modelfile", "chat_template.jinja", "README.md",
                                                "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                                "tokenizer/special_tokens_map.json", "tokenizer/generation_config.json",
                                                "tokenizer/chat_template.jinja"}
    model_entry = next(f for f in m[M_FILES] if f["path"] == "student-Q8_0.gguf")
    assert model_entry["sha256"] == m[M_GATE]["model_sha256"]  # the gated bytes are the packed bytes
    assert m[M_GATE]["verdict"] == PASS and "_report_path" not in m[M_GATE]

    lineage = m[M_LINEAGE]
    assert lineage["run"]["teacher"] == "builtin:smollm2-135m-instruct"
    assert lineage["teacher"]["sha256"] == "ab" * 32 and lineage["student"]["layers"] == 2
    assert lineage["data"] == {"kept": 2, "dropped": 0} and "train" in lineage and lineage["missing"] == []
    assert lineage["export"]["entry"]["sha256"] == model_entry["sha256"]
    assert lineage["tools"]["llama-cpp-python"] == llama_cpp.__version__
    assert lineage["tools"]["transformers"] and lineage["tools"]["torch"]

    runtime = m[M_RUNTIME]
    assert runtime["context_length"] == 256 and runtime["stop_tokens"] == [{"id": 2, "text": "<|im_end|>"}]
    assert runtime["memory_estimate"]["kv_cache_bytes"] == 2 * 256 * 2 * (16 + 16) * 2
    assert "<|im_start|>" in m[M_CHAT_TEMPLATE]
    assert m[M_PACK]["allow_unverified"] is False and m[M_PACK]["packed_unverified"] is False

    out = run / "x"
    from edgepack.runtime.bundle.archive import extract_bundle

    extract_bundle(bundle, out)
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./student-Q8_0.gguf\n" in modelfile
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 256" in modelfile
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-generation"
    assert {"edgepack", "gguf", "Q8_0", "tiny-ok"} <= set(front["tags"])
    assert front["edgepack"]["gate_status"] == PASS
    assert "| ttft_p95_ms |" in readme
    assert (out / "chat_template.jinja").read_text() == m[M_CHAT_TEMPLATE]


def test_bundle_runs_like_the_bare_artifact(run: Path, profiles: dict[str, Profile], cache: Path) -> None:
    from edgepack.runtime.session import open_model

    bundle = Path(pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)["bundle"])
    messages = [{"role": "user", "content": "Pump P-101 discharge pressure low alarm."}]
    with open_model(bundle) as session:
        assert session.manifest is not None and session.backend.n_ctx == 256
        from_bundle = list(session.backend.generate(session.backend.chat_tokens(messages), max_tokens=16,
                                                    stop_at_eos=False))
        text = session.complete(messages, max_tokens=16)
    with open_model(run / "artifacts" / "student-Q8_0.gguf", n_ctx=256) as bare:
        from_file = list(bare.backend.generate(bare.backend.chat_tokens(messages), max_tokens=16, stop_at_eos=False))
        assert bare.complete(messages, max_tokens=16) == text
    assert len(from_bundle) == 16 and from_bundle == from_file
    assert list((cache / "bundles").iterdir())  # extracted into the cache, keyed by sha256


def test_cli_signs_verifies_and_runs_the_bundle(run: Path, profiles: dict[str, Profile], cache: Path,
                                                tmp_path: Path) -> None:
    env = {**os.environ, "EDGEPACK_CACHE": str(cache)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    keys = json.loads(cli("keygen", str(tmp_path / "keys" / "release"), "--json").stdout)
    packed = cli("pack", str(run), "--profile", str(profiles["ok"].source), "--sign", keys["private_key"], "--json")
    assert packed.returncode == 0, packed.stderr
    bundle = json.loads(packed.stdout)["bundle"]
    verify = cli("verify", bundle, "--key", keys["public_key"], "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True and json.loads(verify.stdout)["signature"]["verified"] is True
    out = cli("run", bundle, "--key", keys["public_key"], "--prompt", "Pump alarm", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout)["completion"], str)


def test_signed_pack(run: Path, profiles: dict[str, Profile], tmp_path: Path) -> None:
    from edgepack.runtime.bundle.signing import generate_keypair

    keys = generate_keypair(tmp_path / "k")
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(UsageError, match="not a PEM private key"):  # a public key is not a signing key
        pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False,
                 sign_key=Path(keys["public_key"]))
    assert not (run / "bundles").exists()  # refused before anything was written
    result = pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False,
                      sign_key=Path(keys["private_key"]))
    assert result["signature"] == {"algorithm": "ed25519", "key_id": keys["key_id"], "verified": True}
    bundle = Path(result["bundle"])
    m = verify_bundle(bundle, key=Path(keys["public_key"]))
    assert m[M_PACK]["signed_by"] == {"algorithm": "ed25519", "key_id": keys["key_id"]}
    from edgepack.errors import BundleError
    from edgepack.runtime.bundle.archive import extract_bundle

    with pytest.raises(BundleError, match="not by the given key"):
        verify_bundle(bundle, key=Path(other["public_key"]))
    out = extract_bundle(bundle, tmp_path / "x", key=Path(keys["public_key"]))
    assert keys["key_id"] in (out / "README.md").read_text()


def test_explicit_artifact(run: Path, profiles: dict[str, Profile]) -> None:
    result = pack_run(run_dir=run, profile=profiles["ok"], artifact=run / "artifacts" / "student-F16.gguf",
                      allow_unverified=False)
    assert result["quant"] == "F16" and result["bundle"].endswith("student-tiny-ok-gguf-F16.edgepack")


def test_falls_back_to_the_next_passing_choice(run: Path, profiles: dict[str, Profile]) -> None:
    path, report = gate_report(run, "student-Q8_0.gguf.json")
    path.write_text(json.dumps(report | {"verdict": FAIL}))
    assert pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)["quant"] == "F16"


def test_fail_is_never_packed(run: Path, profiles: dict[str, Profile]) -> None:
    for name in ("student-Q8_0.gguf.json", "student-F16.gguf.json"):
        path, report = gate_report(run, name)
        path.write_text(json.dumps(report | {"verdict": FAIL, "reasons": ["ttft_p95_ms: 9 ms > budget 1 ms"]}))
    with pytest.raises(GateFailed, match="student-Q8_0.gguf: FAIL; student-F16.gguf: FAIL"):
        pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=True)
    with pytest.raises(GateFailed, match="verdict FAIL"):
        pack_run(run_dir=run, profile=profiles["ok"], artifact=run / "artifacts" / "student-F16.gguf",
                 allow_unverified=True)
    assert not (run / "bundles").exists() or not list((run / "bundles").iterdir())


def test_unverified_needs_the_flag_and_is_recorded(run: Path, profiles: dict[str, Profile]) -> None:
    with pytest.raises(GateFailed, match="UNVERIFIED"):
        pack_run(run_dir=run, profile=profiles["arm"], artifact=None, allow_unverified=False)
    result = pack_run(run_dir=run, profile=profiles["arm"], artifact=None, allow_unverified=True)
    m = verify_bundle(Path(result["bundle"]))
    assert result["verdict"] == UNVERIFIED and m[M_GATE_STATUS] == UNVERIFIED
    assert m[M_PACK]["packed_unverified"] is True
    assert "allow-unverified" in m[M_PACK]["notes"][0] and "host does not match" in m[M_PACK]["notes"][0]


def test_artifact_changed_after_gating_is_refused(run: Path, profiles: dict[str, Profile]) -> None:
    with open(run / "artifacts" / "student-Q8_0.gguf", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(RunDirError, match="not the file that was gated"):
        pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)


def test_reports_for_another_profile_do_not_count(run: Path, tmp_path: Path) -> None:
    other = load_profile(str(write_profile(tmp_path, "never-gated", min_relative_quality=0.0)))
    with pytest.raises(GateFailed, match="no report for this profile"):
        pack_run(run_dir=run, profile=other, artifact=None, allow_unverified=True)
    with pytest.raises(RunDirError, match="gated only for tiny-arm, tiny-ok"):
        pack_run(run_dir=run, profile=other, artifact=run / "artifacts" / "student-Q8_0.gguf", allow_unverified=True)


def test_quant_outside_the_profile_is_refused(run: Path, tmp_path: Path) -> None:
    q8_only = load_profile(str(write_profile(tmp_path, "tiny-ok", choices='["gguf:Q8_0"]', min_relative_quality=0.0)))
    with pytest.raises(RunDirError, match="another profile named tiny-ok"):  # gated with the other tiny-ok
        pack_run(run_dir=run, profile=q8_only, artifact=run / "artifacts" / "student-F16.gguf", allow_unverified=False)
    path, report = gate_report(run, "student-F16.gguf.json")  # as if F16 had been gated with q8_only
    path.write_text(json.dumps(report | {"profile_sha256": q8_only.content_hash()}))
    with pytest.raises(UsageError, match="does not allow"):
        pack_run(run_dir=run, profile=q8_only, artifact=run / "artifacts" / "student-F16.gguf", allow_unverified=False)


def test_no_gate_reports(tmp_path: Path, profiles: dict[str, Profile]) -> None:
    with pytest.raises(RunDirError, match="nothing has been gated"):
        pack_run(run_dir=tmp_path, profile=profiles["ok"], artifact=None, allow_unverified=False)
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "x.json").write_text("{not json")
    with pytest.raises(RunDirError, match="cannot read"):
        pack_run(run_dir=tmp_path, profile=profiles["ok"], artifact=None, allow_unverified=False)


# --- an ONNX folder -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_run(built_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Profile]:
    """The run with an int4 ONNX folder exported by edgepack, its weights moved to an external
    data file (as exports over 2 GB are written), gated for an ONNX-only profile."""
    import onnx

    from edgepack.atomic import write_json
    from edgepack.export.api import export_model
    from edgepack.export.gate.gate import run_gate

    root = tmp_path_factory.mktemp("onnx-run")
    run = Path(shutil.copytree(built_run, root / "run"))
    profile = load_profile(str(write_profile(root, "tiny-onnx", choices='["onnx:int4"]', min_relative_quality=0.0)))
    export_model(source=run, fmt="onnx", quants=["int4"], out_dir=None)
    folder = run / "artifacts" / "student-onnx-int4"
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)  # onnx's default: small shape tensors stay inline
    report = run_gate(artifact=folder, profile=profile, holdout=run / "data" / "holdout.jsonl")
    write_json(run / "gate" / "student-onnx-int4.json", report)
    return run, profile


def test_pack_an_onnx_folder(onnx_run: tuple[Path, Profile], cache: Path, tmp_path: Path) -> None:
    import hashlib

    from edgepack.runtime.session import open_model

    run, profile = onnx_run
    gate = json.loads((run / "gate" / "student-onnx-int4.json").read_text())
    assert gate["verdict"] in (PASS, UNVERIFIED), gate["reasons"]
    result = pack_run(run_dir=run, profile=profile, artifact=None, allow_unverified=gate["verdict"] == UNVERIFIED)
    bundle = Path(result["bundle"])
    assert bundle.name == "student-tiny-onnx-onnx-int4.edgepack" and result["format"] == "onnx"
    m = verify_bundle(bundle)
    assert m[M_ENTRYPOINT] == "student-onnx-int4/model.onnx" and m[M_GATE_STATUS] == gate["verdict"]
    # The profile's choice names the export quant; the gate's is what the graph holds (may be a mix).
    assert m[M_QUANT] == "int4" and m[M_RUNTIME]["onnx_quant"] == gate["quant"]
    paths = {f["path"] for f in m[M_FILES]}
    assert {"student-onnx-int4/model.onnx", "student-onnx-int4/model.onnx_data",
            "student-onnx-int4/tokenizer.json", "student-onnx-int4/tokenizer_config.json",
            "student-onnx-int4/config.json", "chat_template.jinja", "README.md"} <= paths
    assert not any(p.startswith("tokenizer/") or p.endswith(".complete") for p in paths)
    assert "Modelfile" not in paths and m[M_RUNTIME]["backend"] == "onnxruntime"
    # The manifest's file list reproduces the digest the gate recorded for the folder.
    prefix = "student-onnx-int4/"
    lines = "".join(f"{f['path'][len(prefix):]}\t{f['sha256']}\n"
                    for f in sorted(m[M_FILES], key=lambda f: f["path"]) if f["path"].startswith(prefix))
    assert hashlib.sha256(lines.encode()).hexdigest() == m[M_RUNTIME]["artifact_sha256"] == gate["model_sha256"]

    messages = [{"role": "user", "content": "Pump P-101 discharge pressure low alarm."}]
    with open_model(bundle) as session:
        assert session.backend.format == "onnx" and session.backend.n_ctx == 256
        from_bundle = session.complete(messages, max_tokens=12)
    with open_model(run / "artifacts" / "student-onnx-int4", n_ctx=256) as bare:
        assert bare.complete(messages, max_tokens=12) == from_bundle


def test_onnx_folder_with_a_symlink_is_refused(onnx_run: tuple[Path, Profile], tmp_path: Path) -> None:
    """A link whose target has the same bytes keeps the gate's digest, but is still refused."""
    run = Path(shutil.copytree(onnx_run[0], tmp_path / "run", symlinks=True))
    folder = run / "artifacts" / "student-onnx-int4"
    outside = tmp_path / "outside-tokenizer.json"
    shutil.move(folder / "tokenizer.json", outside)
    (folder / "tokenizer.json").symlink_to(outside)
    gate = json.loads((run / "gate" / "student-onnx-int4.json").read_text())
    with pytest.raises(RunDirError, match="tokenizer.json is a symbolic link"):
        pack_run(run_dir=run, profile=onnx_run[1], artifact=None, allow_unverified=True)
    assert gate["model_sha256"]  # the digest alone would not have caught it


# --- the task (issue #15) -------------------------------------------------------------------------

def _extracted(bundle: Path, out: Path) -> Path:
    from edgepack.runtime.bundle.archive import extract_bundle

    extract_bundle(bundle, out)
    return out


def test_the_bundle_carries_the_task_and_its_gated_scores(run: Path, profiles: dict[str, Profile], cache: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.runtime.session import open_model
    from tests.export.pack.ollama_modelfile import parse_modelfile
    from tests.runtime.helpers import tiny_task

    task = tiny_task()
    result = pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)
    m = verify_bundle(Path(result["bundle"]))
    quality = gate_report(run, "student-Q8_0.gguf.json")[1]["measurements"]["quality"]
    assert m[M_TASK] == task.to_json() and quality["task"]["sha256"] == task.sha256()
    scores = m[M_TASK_SCORES]
    assert (scores["primary_metric"], scores["primary"], scores["rows"]) == ("accuracy", quality["primary"], 2)
    assert scores["scores"] == quality["scores"] and scores["decoding"] == task.decoding.to_json()
    assert result["task"] == {"kind": "labels", "source": "the run's task.json", "primary_metric": "accuracy",
                              "primary": quality["primary"]}
    assert not any(n.startswith(("task:", "no task scores")) for n in m[M_PACK]["notes"])

    out = _extracted(Path(result["bundle"]), run / "x")
    commands = parse_modelfile((out / "Modelfile").read_text())
    assert [v for c, v in commands if c == "system"] == ["Name the alarm's category."]
    params = {c: v for c, v in commands if c in ("temperature", "repeat_penalty", "num_predict")}
    assert params == {"temperature": "0.0", "repeat_penalty": "1.0", "num_predict": "48"}
    readme = (out / "README.md").read_text()
    assert "## Task" in readme and "A `labels` task (the run's task.json); primary metric **accuracy**" in readme
    assert "`electrical`" in readme and "Name the alarm's category." in readme
    assert f"| accuracy (primary) | {quality['primary']:.3f} |" in readme
    with open_model(Path(result["bundle"])) as session:
        assert session.task == task
    from edgepack.cli import main

    assert main(["verify", result["bundle"]]) == 0
    assert f"task labels, accuracy {quality['primary']:.3f} gated" in " ".join(capsys.readouterr().out.split())


def test_a_run_without_task_json_packs_the_demo_contract_and_says_so(run: Path,
                                                                     profiles: dict[str, Profile]) -> None:
    from edgepack.task import DEMO_TASK

    (run / "task.json").unlink()  # the reports were gated under the run's (tiny) task, not the demo's
    result = pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)
    m = verify_bundle(Path(result["bundle"]))
    assert m[M_TASK] == DEMO_TASK.to_json() and m[M_TASK_SCORES] is None
    notes = m[M_PACK]["notes"]
    assert notes[0] == "task: the demo contract: the run has no task.json"
    assert "gate scored the holdout under another task" in notes[1]
    readme = (_extracted(Path(result["bundle"]), run / "x") / "README.md").read_text()
    assert "No gated scores" in readme


@pytest.mark.parametrize("content,problem", [
    ("{", "not valid JSON|cannot read"),
    (json.dumps({"schema_version": 1, "answer": {"kind": "labels", "labels": ["a", "A"]},
                 "decoding": {"max_tokens": 8, "temperature": 0, "repeat_penalty": 1, "stop": []},
                 "primary_metric": "accuracy"}), "duplicates"),
])
def test_a_broken_task_json_stops_pack(run: Path, profiles: dict[str, Profile], content: str, problem: str) -> None:
    (run / "task.json").write_text(content)
    with pytest.raises(RunDirError, match=problem) as info:
        pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)
    assert "task.json" in str(info.value)
    assert not (run / "bundles").exists() or not list((run / "bundles").iterdir())


def test_a_linked_task_json_is_refused(run: Path, profiles: dict[str, Profile], tmp_path: Path) -> None:
    elsewhere = tmp_path / "task.json"
    elsewhere.write_bytes((run / "task.json").read_bytes())
    (run / "task.json").unlink()
    (run / "task.json").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="task.json is a symbolic link"):
        pack_run(run_dir=run, profile=profiles["ok"], artifact=None, allow_unverified=False)


def _report(quality: Any) -> dict[str, Any]:
    return {"_report_path": "RUN/gate/x.json", "measurements": {"ok": True, "quality": quality}}


def test_gated_task_scores_only_for_the_task_that_was_gated() -> None:
    from edgepack.export.pack.pack import gated_task_scores
    from edgepack.task import DEMO_TASK

    quality = {"task": {"sha256": DEMO_TASK.sha256()}, "primary": 0.5, "teacher_primary": 1.0, "relative": 0.5,
               "scores": {"accuracy": 0.5, "scored_rows": 2}, "rows": 2, "answered": 2, "decoding": "greedy"}
    scores, note = gated_task_scores(_report(quality), DEMO_TASK)
    assert note is None and scores is not None
    assert (scores["primary"], scores["relative"], scores["decoding"]) == (0.5, 0.5, DEMO_TASK.decoding.to_json())
    for bad, why in [(None, "without a holdout"), ({"error": "timeout"}, "could not answer"),
                     ({k: v for k, v in quality.items() if k != "task"}, "predates the task contract"),
                     ({**quality, "task": {"sha256": "0" * 64}}, "another task")]:
        scores, note = gated_task_scores(_report(bad), DEMO_TASK)
        assert scores is None and note is not None and why in note


def test_a_forged_quality_block_is_refused_naming_the_report() -> None:
    from edgepack.export.pack.pack import gated_task_scores
    from edgepack.task import DEMO_TASK

    forged = {"task": {"sha256": DEMO_TASK.sha256()}, "primary": "0.9", "scores": {}, "rows": -1}
    with pytest.raises(RunDirError, match=r"RUN/gate/x.json: .*task_scores|RUN/gate/x.json: .*primary"):
        gated_task_scores(_report(forged), DEMO_TASK)
