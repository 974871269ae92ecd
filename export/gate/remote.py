"""Gate a device from the workstation: ``edgepack gate BUNDLE --profile P --on ssh://user@host[:port]``.

For each target, with OpenSSH's own ``ssh`` and ``scp`` (no protocol of ours, no Python ssh
library; the user's ssh config, agent and known_hosts apply, host keys are checked as that
config says):

1. one ``ssh`` call checks that the device has the remote command (default ``edgepack``, the
   lean ``edgepack-runtime`` install is enough) and which of the bundle and the profile file it
   already holds under the remote cache folder, by sha256 (``<sha256><suffix>``);
2. ``scp`` copies what is missing to a temporary name, and ``mv`` renames it, so a dropped
   connection leaves nothing under the final name;
3. ``ssh`` runs the device's own ``edgepack gate <bundle> --profile <profile> --json``;
4. the JSON report comes back, must name the bundle's sha256, is marked with the target
   (``on``, ``remote``; ``machine`` is already the device's own) and is written atomically as
   ``<artifact>@<host>-<port>.json`` into ``RUN/gate/`` (the artifact lies in a run), else next
   to the artifact or ``--report``. ``pack`` reads it like any gate report: its verdict is judged
   again from its measurements and its host match, which the device made itself.

Several targets run in parallel threads (:func:`gate_remote`). What the report proves: the
device measured this very file under this very profile. What it does not: the device is not
authenticated beyond ssh, and the report is not signed by it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgepack.constants import GATE_DIR
from edgepack.errors import EdgepackError, RemoteError, UsageError
from edgepack.hashing import sha256_file

DEFAULT_REMOTE_DIR = ".cache/edgepack/bundles"  # relative paths are relative to the remote home
DEFAULT_COMMAND = "edgepack"
_MISSING = "edgepack-remote: command missing"  # the marker the probe prints before exit 127
_INSTALL_HINT = ("install the lean runtime on the device (`pip install edgepack-runtime`, built by "
                 "dist/runtime/build.py), or name its path with --remote-command")
_STDERR_TAIL = 600


@dataclass(frozen=True)
class Target:
    """One ``ssh://[user@]host[:port]`` device."""

    url: str
    host: str
    port: int
    user: str | None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class SshSettings:
    """How to reach every target: extra ``-o KEY=VALUE`` options, the connect timeout, the remote
    command and cache folder, the remote gate's time limit."""

    options: tuple[str, ...] = ()
    connect_timeout_s: int = 15
    command: str = DEFAULT_COMMAND
    remote_dir: str = DEFAULT_REMOTE_DIR
    gate_timeout_s: float = 3600.0


@dataclass
class RemoteOutcome:
    """A target's result: the marked report and the files written, or the error that stopped it."""

    target: Target
    report: dict[str, Any] | None = None
    error: EdgepackError | None = None
    copied: bool = False
    written: dict[str, Path] = field(default_factory=dict)


def parse_target(url: str) -> Target:
    """``ssh://[user@]host[:port]`` → :class:`Target`; UsageError for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError as exc:
        raise UsageError(f"--on {url}: bad port ({exc})", hint="write ssh://user@host:2222") from exc
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--on {url} is not ssh://[user@]host[:port]", hint="e.g. --on ssh://pi@192.168.1.20")
    return Target(url=url, host=parts.hostname, port=port, user=parts.username)


def parse_options(pairs: list[str]) -> tuple[str, ...]:
    """``KEY=VALUE`` pairs for ``ssh -o`` / ``scp -o``; UsageError naming the bad one."""
    bad = [p for p in pairs if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*=.+", p)]
    if bad:
        raise UsageError(f"--ssh-option {bad[0]!r} is not KEY=VALUE", hint="e.g. --ssh-option IdentityFile=~/.ssh/pi")
    return tuple(pairs)


def remote_word(word: str) -> str:
    """``word`` quoted for the remote shell, except a leading ``~/``, which the remote shell expands
    (so ``--remote-command '~/venv/bin/edgepack'`` names the device user's home)."""
    if word.startswith("~/"):
        return "~/" + shlex.quote(word[2:])
    return shlex.quote(word)


def _common(settings: SshSettings) -> list[str]:
    # BatchMode: never prompt (a password prompt would hang a thread); host keys as the user's config says.
    opts = ["BatchMode=yes", f"ConnectTimeout={settings.connect_timeout_s}", *settings.options]
    return [a for o in opts for a in ("-o", o)]


def _ssh(target: Target, settings: SshSettings, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", *_common(settings), "-p", str(target.port), target.destination, script]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RemoteError(f"{target.url}: no answer within {timeout:.0f} s") from exc


def _tail(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-_STDERR_TAIL:] or "(no message)"


def connection_error(target: Target, stderr: str, doing: str) -> RemoteError:
    """ssh's exit 255 explained in one line: unreachable, refused key, unknown host key, dropped."""
    text = stderr or ""
    if "Permission denied" in text:
        return RemoteError(f"{target.url}: the device refused the key while {doing} ({_tail(text)})",
                           hint="add your public key to the device's ~/.ssh/authorized_keys, or pass "
                                "--ssh-option IdentityFile=PATH")
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return RemoteError(f"{target.url}: the device's host key is unknown or changed while {doing}",
                           hint="connect once with `ssh` to check and accept its key (edgepack never skips the check)")
    if re.search(r"Connection refused|Could not resolve|timed out|No route to host|Network is unreachable", text):
        return RemoteError(f"{target.url}: cannot connect while {doing} ({_tail(text)})",
                           hint="check the host name, the port and that sshd runs on the device")
    return RemoteError(f"{target.url}: the connection failed while {doing} ({_tail(text)})")


def _probe(target: Target, settings: SshSettings, wanted: list[tuple[str, str]]) -> set[str]:
    """Which remote paths of ``wanted`` ((path, sha256)) are missing; RemoteError when the device
    cannot be reached or has no remote command."""
    q = remote_word
    script = [f"command -v {q(settings.command)} >/dev/null 2>&1 || {{ echo {q(_MISSING)} >&2; exit 127; }}",
              f"mkdir -p {q(settings.remote_dir)} || exit 3"]
    for i, (path, sha) in enumerate(wanted):
        script.append(f"if [ -f {q(path)} ] && [ \"$(sha256sum < {q(path)} | cut -c1-64)\" = {sha} ]; "
                      f"then echo have {i}; else echo need {i}; fi")
    done = _ssh(target, settings, "; ".join(script), settings.connect_timeout_s * 4 + 120)
    if done.returncode == 255:
        raise connection_error(target, done.stderr, "checking the device")
    if done.returncode == 127 and _MISSING in done.stderr:
        raise RemoteError(f"{target.url}: {settings.command!r} is not installed there (not on the remote PATH)",
                          hint=_INSTALL_HINT)
    if done.returncode != 0:
        raise RemoteError(f"{target.url}: could not prepare {settings.remote_dir} (exit {done.returncode}: "
                          f"{_tail(done.stderr)})")
    return {wanted[int(ln.split(" ", 1)[1])][0] for ln in done.stdout.splitlines() if ln.startswith("need ")}


def _copy(target: Target, settings: SshSettings, local: Path, remote: str) -> None:
    """``scp`` to a temporary name beside ``remote``, then ``mv`` onto it."""
    partial = f"{remote}.partial-{uuid.uuid4().hex[:12]}"
    argv = ["scp", "-q", *_common(settings), "-P", str(target.port), str(local), f"{target.destination}:{partial}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=settings.gate_timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RemoteError(f"{target.url}: copying {local.name} took longer than "
                          f"{settings.gate_timeout_s:.0f} s") from exc
    if done.returncode != 0:
        # Best effort: the partial name is never read, and a next copy picks a fresh one.
        _ssh(target, settings, f"rm -f {remote_word(partial)}", settings.connect_timeout_s * 2 + 30)
        error = connection_error(target, done.stderr, f"copying {local.name}")
        raise RemoteError(f"{target.url}: copying {local.name} was cut off; nothing was left under its final name "
                          f"({_tail(done.stderr)})", hint=error.hint)
    moved = _ssh(target, settings, f"mv -f {remote_word(partial)} {remote_word(remote)}",
                 settings.connect_timeout_s * 2 + 30)
    if moved.returncode != 0:
        raise connection_error(target, moved.stderr, f"renaming the copy of {local.name}")


def _run_remote_gate(target: Target, settings: SshSettings, bundle: str, profile: str) -> dict[str, Any]:
    argv = [settings.command, "gate", bundle, "--profile", profile, "--json"]
    done = _ssh(target, settings, " ".join(remote_word(a) for a in argv), settings.gate_timeout_s)
    if done.returncode == 255:
        raise connection_error(target, done.stderr, "gating")
    try:
        report = json.loads(done.stdout) if done.returncode in (0, 1) else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or "verdict" not in report:
        raise RemoteError(f"{target.url}: the remote gate crashed (exit {done.returncode}): {_tail(done.stderr)}",
                          hint="run the same command on the device to see it whole: " + " ".join(argv))
    return report


def report_stem(artifact: Path, target: Target) -> str:
    """``<artifact>@<host>-<port>``: one report per device, so several targets never collide."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", f"{artifact.name}@{target.host}-{target.port}")


def default_out_dir(artifact: Path) -> Path:
    """``RUN/gate/`` for an artifact inside a run, else the artifact's folder."""
    from edgepack.export.gate.gate import artifact_run_dir

    run = artifact_run_dir(artifact)
    return run / GATE_DIR if run is not None else artifact.resolve().parent


def gate_one(artifact: Path, profile: str, target: Target, settings: SshSettings, sha: str,
             out_dir: Path, stem: str | None = None) -> RemoteOutcome:
    """Copy (if needed), gate on the device, check, mark and write one target's report."""
    from edgepack.export.gate.report import write_gate_reports

    outcome = RemoteOutcome(target)
    remote_bundle = f"{settings.remote_dir.rstrip('/')}/{sha}{''.join(artifact.suffixes[-1:])}"
    wanted = [(remote_bundle, sha, artifact)]
    remote_profile = profile
    if Path(profile).is_file():  # a profile file goes along; a name is the device's shipped profile
        psha = sha256_file(Path(profile))
        remote_profile = f"{settings.remote_dir.rstrip('/')}/profile-{psha}.toml"
        wanted.append((remote_profile, psha, Path(profile)))
    try:
        missing = _probe(target, settings, [(p, s) for p, s, _ in wanted])
        for remote, _, local in wanted:
            if remote in missing:
                _copy(target, settings, local, remote)
                outcome.copied = outcome.copied or local == artifact
        report = _run_remote_gate(target, settings, remote_bundle, remote_profile)
        if report.get("artifact_sha256") != sha:
            got = str(report.get("artifact_sha256"))[:12]
            raise RemoteError(f"{target.url}: the device's report is for sha256 {got}…, "
                              f"not {artifact.name} ({sha[:12]}…); nothing was written",
                              hint="gate again; if it repeats, the device's cache folder is being changed")
    except EdgepackError as exc:
        outcome.error = exc
        return outcome
    report.update({"on": target.url, "artifact": str(artifact.resolve()), "artifact_name": artifact.name,
                   "remote": {"on": target.url, "artifact": report.get("artifact"), "command": settings.command,
                              "profile": remote_profile, "copied": outcome.copied,
                              "note": "measured by the device itself; the report is not signed by it"}})
    outcome.report = report
    outcome.written = write_gate_reports(report, out_dir, stem=stem or report_stem(artifact, target))
    return outcome


def gate_remote(artifact: Path, profile: str, targets: list[Target], settings: SshSettings,
                out_dir: Path | None = None, report: Path | None = None) -> list[RemoteOutcome]:
    """Gate ``artifact`` (a file: a .gguf or a .edgepack bundle) on every target in parallel;
    one :class:`RemoteOutcome` per target, in the order given. ``report`` (one target only)
    names the JSON report; otherwise reports go to ``out_dir`` or :func:`default_out_dir`."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise UsageError(f"--on copies one file, and {artifact} is not one",
                         hint="pack an ONNX folder into a .edgepack bundle first (`edgepack pack`)")
    if report is not None and len(targets) > 1:
        raise UsageError("--report names one report; with several --on targets, reports are named "
                         "<artifact>@<host>-<port>.json", hint="drop --report, or gate one target")
    sha = sha256_file(artifact)
    where = report.parent if report is not None else (out_dir or default_out_dir(artifact))
    stem = report.stem if report is not None else None
    with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        futures = [pool.submit(gate_one, artifact, profile, t, settings, sha, where, stem) for t in targets]
        return [f.result() for f in futures]
