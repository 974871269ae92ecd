"""``edgepack gate --on ssh://…`` against a real OpenSSH server on loopback (issue #21).

The test starts Debian's ``/usr/sbin/sshd`` on a free 127.0.0.1 port with its own host key,
a client key made here and a known_hosts of its own; "the device" is the lean runtime venv of
tests/runtime/test_lean_install.py (no torch), whose ``bin/edgepack`` is the remote command.
The sftp subsystem is a wrapper that, while a flag file exists, cuts the
upload off after 40 kB: a connection dropped mid-copy.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from edgepack.hashing import sha256_file
from tests.runtime.helpers import make_run_dir, write_profile
from tests.runtime.test_lean_install import lean_bin  # noqa: F401  (the device's venv, a fixture)

SSHD = Path("/usr/sbin/sshd")
pytestmark = pytest.mark.slow  # the lean venv fixture reinstalls this tree's wheel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running sshd on loopback; yields its port, the ``--ssh-option`` args and its folder."""
    if not SSHD.is_file():
        pytest.fail(f"{SSHD} is missing: these tests start their own OpenSSH server; install it with "
                    "`apt-get install openssh-server` (`make test` does when apt-get is there)")
    if not Path("/run/sshd").is_dir():  # Debian's sshd insists on its privilege separation folder
        try:
            Path("/run/sshd").mkdir(mode=0o755)
        except OSError as exc:
            pytest.fail(f"sshd needs /run/sshd and it cannot be made here ({exc}); `sudo mkdir -m 755 /run/sshd`")
    folder = tmp_path_factory.mktemp("sshd")
    host, client = _keygen(folder / "host_key"), _keygen(folder / "client_key")
    _keygen(folder / "stranger_key")
    (folder / "authorized_keys").write_text(Path(f"{client}.pub").read_text())
    sftp = folder / "sftp-wrapper"
    # dd, not head -c: head reads whole blocks before writing, and the upload stalls instead of breaking.
    sftp.write_text(f"#!/bin/sh\nif [ -f {folder}/cut ]; then dd bs=1 count=40000 status=none | "
                    "/usr/lib/openssh/sftp-server; else exec /usr/lib/openssh/sftp-server; fi\n")
    sftp.chmod(0o755)
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {folder}/sshd.pid\n"
                      f"AuthorizedKeysFile {folder}/authorized_keys\nUsePAM no\nStrictModes no\n"
                      f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp {sftp}\n")
    known = folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(Path(f'{host}.pub').read_text().split()[:2])}\n")
    log = (folder / "sshd.log").open("w")
    server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while "Server listening" not in (folder / "sshd.log").read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
        time.sleep(0.1)
    options = [f"UserKnownHostsFile={known}", f"IdentityFile={client}", "IdentitiesOnly=yes"]
    try:
        yield {"port": port, "folder": folder, "options": options, "user": getpass.getuser()}
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real run with a Q8_0 artifact, its local gate reports removed; a profile for this host."""
    folder = tmp_path_factory.mktemp("remote")
    profile = write_profile(folder, "device-ok", min_relative_quality=0.0, arch=platform.machine())
    run_dir = make_run_dir(folder / "run", tiny_llama_dir, [profile])
    for report in (run_dir / "gate").iterdir():
        report.unlink()
    artifact = next((run_dir / "artifacts").glob("*.gguf"))
    return {"run": run_dir, "artifact": artifact, "profile": profile, "folder": folder}


def _gate(sshd: dict[str, Any], lean_bin: Path, artifact: Path, profile: Path, *extra: str,  # noqa: F811
          port: int | None = None, command: str | None = None, options: list[str] | None = None,
          remote_dir: str | None = None) -> subprocess.CompletedProcess[str]:
    url = f"ssh://{sshd['user']}@127.0.0.1:{port or sshd['port']}"
    args = [sys.executable, "-m", "edgepack", "gate", str(artifact), "--profile", str(profile), "--on", url,
            "--remote-command", command or str(lean_bin / "edgepack"),
            "--remote-dir", remote_dir or str(sshd["folder"] / "device-cache"), *extra]
    for option in sshd["options"] if options is None else options:
        args += ["--ssh-option", option]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def _gate_dir_names(run: dict[str, Any]) -> list[str]:
    return sorted(p.name for p in (run["run"] / "gate").iterdir())


def test_gate_on_the_device_then_pack_its_report(sshd: dict[str, Any], lean_bin: Path,  # noqa: F811
                                                 run: dict[str, Any]) -> None:
    first = _gate(sshd, lean_bin, run["artifact"], run["profile"], "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    [row] = json.loads(first.stdout)
    assert row["verdict"] == "PASS" and row["copied"] is True
    report_path = Path(row["report"])
    assert report_path.parent == run["run"] / "gate"
    report = json.loads(report_path.read_text())
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}"
    assert report["on"] == url and report["remote"]["copied"] is True
    assert report["artifact_sha256"] == sha256_file(run["artifact"]) == report["model_sha256"]
    assert report["artifact_name"] == run["artifact"].name
    assert report["remote"]["artifact"].startswith(str(sshd["folder"] / "device-cache"))
    assert report["machine"]["machine"] == platform.machine() and report["host"]["ok"] is True
    # The device ran the lean install: its report names no torch.
    assert "torch" not in (report["machine"] or {}) or report["machine"]["torch"] in (None, "")
    assert not [n for n in os.listdir(sshd["folder"] / "device-cache") if ".partial-" in n]

    second = _gate(sshd, lean_bin, run["artifact"], run["profile"], "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)[0]["copied"] is False

    from edgepack.export.pack.pack import pack_run
    from edgepack.profiles import load_profile
    from edgepack.runtime.bundle.archive import verify_bundle

    packed = pack_run(run_dir=run["run"], profile=load_profile(str(run["profile"])), artifact=None,
                      allow_unverified=False)
    assert packed["verdict"] == "PASS"
    manifest = verify_bundle(Path(packed["bundle"]))
    assert manifest["gate"]["on"] == url and manifest["gate"]["machine"] == report["machine"]


def test_two_targets_gate_in_parallel_into_one_table(sshd: dict[str, Any], lean_bin: Path,  # noqa: F811
                                                     run: dict[str, Any], tmp_path: Path) -> None:
    """Two URLs for the one sshd (by name and by address): two reports, one table. The remote
    command is named from the device user's home (``~/``, expanded there)."""
    bundle = shutil.copy(run["artifact"], tmp_path / "loose.gguf")  # outside a run: reports beside it
    command = f"~/{(lean_bin / 'edgepack').relative_to(Path.home())}"  # the cached venv lives under ~/.cache
    args = [sys.executable, "-m", "edgepack", "gate", str(bundle), "--profile", str(run["profile"]),
            "--remote-command", command, "--remote-dir", str(sshd["folder"] / "device-cache")]
    for host in ("127.0.0.1", "localhost"):
        args += ["--on", f"ssh://{sshd['user']}@{host}:{sshd['port']}"]
    known = Path(sshd["options"][0].split("=", 1)[1])
    known.write_text(known.read_text() + known.read_text().replace("[127.0.0.1]", "[localhost]"))
    for option in sshd["options"]:
        args += ["--ssh-option", option]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS") >= 2 and "127.0.0.1" in done.stdout and "localhost" in done.stdout
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"loose.gguf@127.0.0.1-{sshd['port']}.json",
                                                               f"loose.gguf@localhost-{sshd['port']}.json"]


def test_a_gate_that_fails_on_the_device_exits_1(sshd: dict[str, Any], lean_bin: Path,  # noqa: F811
                                                 run: dict[str, Any], tmp_path: Path) -> None:
    strict = write_profile(tmp_path, "device-strict", arch=platform.machine(), min_relative_quality=0.0,
                           ttft_p95_ms=0.001)
    report = tmp_path / "strict.json"
    done = _gate(sshd, lean_bin, run["artifact"], strict, "--report", str(report))
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(report.read_text())["verdict"] == "FAIL"


@pytest.mark.parametrize("case, expected", [
    ("wrong port", "cannot connect"),
    ("stranger key", "refused the key"),
    ("unknown host key", "host key is unknown"),
    ("no edgepack", "is not installed there"),
    ("remote crash", "the remote gate crashed (exit 3): boom: the device fell over"),
    ("copy cut off", "was cut off"),
])
def test_failures_are_one_line_and_write_nothing(sshd: dict[str, Any], lean_bin: Path,  # noqa: F811
                                                 run: dict[str, Any], tmp_path: Path, case: str,
                                                 expected: str) -> None:
    before = _gate_dir_names(run)
    remote_dir = str(tmp_path / "fresh-cache")  # nothing cached: every case that gets that far copies
    kwargs: dict[str, Any] = {"remote_dir": remote_dir}
    folder = sshd["folder"]
    if case == "wrong port":
        kwargs["port"] = _free_port()
    elif case == "stranger key":
        kwargs["options"] = [sshd["options"][0], f"IdentityFile={folder / 'stranger_key'}", "IdentitiesOnly=yes"]
    elif case == "unknown host key":
        (tmp_path / "empty_known_hosts").write_text("")
        kwargs["options"] = [f"UserKnownHostsFile={tmp_path / 'empty_known_hosts'}", *sshd["options"][1:]]
    elif case == "no edgepack":
        kwargs["command"] = str(tmp_path / "nowhere" / "edgepack")
    elif case == "remote crash":
        crash = tmp_path / "crash.sh"
        crash.write_text("#!/bin/sh\necho 'boom: the device fell over' >&2\nexit 3\n")
        crash.chmod(0o755)
        kwargs["command"] = str(crash)
    else:
        (folder / "cut").write_text("")
    try:
        done = _gate(sshd, lean_bin, run["artifact"], run["profile"], **kwargs)
    finally:
        (folder / "cut").unlink(missing_ok=True)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    if case == "no edgepack":
        assert "edgepack-runtime" in done.stderr
    assert _gate_dir_names(run) == before
    if Path(remote_dir).is_dir():  # nothing under a final name, no partial left behind
        assert os.listdir(remote_dir) == [] or case == "remote crash"
