"""What ``pack`` accepts from a run directory, which anyone with write access may have changed.

A bundle carries the run's files to a device and its manifest vouches for them, so pack reads
the run as untrusted input (issue #20 defect 7):

- Files are read with :func:`read_run_file`: one path component at a time below the run folder,
  never following a symbolic link (``O_NOFOLLOW`` on every component, so a link swapped in
  after a check is refused too), never leaving the run (no ``..``, no absolute path). The run
  folder itself may be a link: the user named it.
- An artifact is ``RUN/artifacts/<name>`` and nothing else (:func:`artifact_path`); a gate
  report's ``artifact`` path is never followed, and one that names a file outside a run's
  ``artifacts/`` folder is refused.
- A gate report counts for a profile only when it carries that profile's content hash
  (:meth:`~edgepack.profiles.Profile.content_hash`, ``profile_sha256``): a same-name profile
  with other budgets is another profile. Its verdict must follow from its own measurements
  under this profile (:func:`~edgepack.export.gate.gate.decide` is pure, so pack judges again),
  and the artifact's sha256 must equal the report's, before packing and again in the written
  bundle (:func:`check_bundle_binding`).

- The task (``RUN/task.json``) is read the same way and checked by the task contract's own
  reader (:func:`read_run_task`); a run without one gets the demo contract, and pack says so.

What this cannot catch: a report forged consistently (made-up measurements that meet the
budgets, with the right hashes) by someone who can write the run folder. Hashes bind a report
to an artifact and a profile; only a signature could bind it to the machine that measured it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.constants import ARTIFACTS_DIR, FAIL, M_FILES, PASS, UNVERIFIED
from edgepack.errors import RunDirError
from edgepack.profiles import Profile
from edgepack.task import DEMO_TASK, TASK_FILE, Task, task_from_json

MAX_RUN_FILE_BYTES = 256 << 20  # a tokenizer.json is tens of MB at most; reports and lineage far less
# A verdict may be no better than the one its measurements give again (PASS > UNVERIFIED > FAIL).
_RANK = {FAIL: 0, UNVERIFIED: 1, PASS: 2}
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")
RUN_TASK_SOURCE = f"the run's {TASK_FILE}"
_LINK_HINT = "replace the link with the file itself (pack reads only regular files inside the run)"


def _parts(rel: str) -> tuple[str, ...]:
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        raise RunDirError(f"{rel!r} is not a path inside the run", hint="pack reads files inside the run only")
    return path.parts


def _step(dir_fd: int, part: str, shown: str, *, folder: bool) -> int | None:
    """Open one component below ``dir_fd`` without following a link; None if it does not exist."""
    try:
        st = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{shown} is a symbolic link", hint=_LINK_HINT)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0)
    try:
        return os.open(part, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # swapped for a link since the stat
            raise RunDirError(f"{shown} is a symbolic link", hint=_LINK_HINT) from exc
        if exc.errno == errno.ENOTDIR:
            raise RunDirError(f"{shown} is not a folder") from exc
        raise RunDirError(f"cannot read {shown}: {exc.strerror or exc}") from exc


def _walk(run_dir: Path, rel: str, *, folder_last: bool) -> int | None:
    """An fd for ``RUN/<rel>`` reached through no link, or None when it does not exist."""
    parts = _parts(rel)
    try:
        fd: int | None = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RunDirError(f"{run_dir} is not a readable folder ({exc.strerror or exc})") from exc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        assert fd is not None
        try:
            nxt = _step(fd, part, "/".join(parts[:i + 1]), folder=folder_last or not last)
        finally:
            os.close(fd)
        if nxt is None:
            return None
        fd = nxt
    return fd


def read_run_file(run_dir: Path, rel: str, *, limit: int = MAX_RUN_FILE_BYTES) -> bytes | None:
    """The bytes of the regular file ``RUN/<rel>`` (None if absent), read as the module docstring says."""
    fd = _walk(Path(run_dir), rel, folder_last=False)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunDirError(f"{rel} in {run_dir} is not a regular file")
        if st.st_size > limit:
            raise RunDirError(f"{rel} in {run_dir} is {st.st_size} bytes, more than the {limit} pack reads")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise RunDirError(f"{rel} in {run_dir} grew past {limit} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_run_json(run_dir: Path, rel: str) -> Any:
    """``RUN/<rel>`` parsed as JSON (None if absent); a file that is not JSON is a RunDirError."""
    raw = read_run_file(run_dir, rel)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RunDirError(f"cannot read {Path(run_dir) / rel}: {exc}") from exc


def read_run_task(run_dir: Path) -> tuple[Task, str]:
    """The run's task and where it came from: ``RUN/task.json`` read through no link and checked
    (RunDirError naming the file and every problem), else the demo contract."""
    obj = read_run_json(run_dir, TASK_FILE)
    if obj is None:
        return DEMO_TASK, "the demo contract: the run has no task.json"
    return task_from_json(obj, str(Path(run_dir) / TASK_FILE), RunDirError), RUN_TASK_SOURCE


def list_run_folder(run_dir: Path, rel: str) -> list[str] | None:
    """Names in the folder ``RUN/<rel>`` (None if absent), which must not be reached through a link."""
    fd = _walk(Path(run_dir), rel, folder_last=True)
    if fd is None:
        return None
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def artifact_path(run_dir: Path, report: dict[str, Any], report_path: str) -> Path:
    """``RUN/artifacts/<artifact_name>`` for a gate report, reached through no link; RunDirError
    when the name is a path, the report's ``artifact`` lies outside a run's ``artifacts/``, or
    the artifact is missing."""
    name = report.get("artifact_name")
    recorded = report.get("artifact")
    if not isinstance(name, str) or not _ARTIFACT_NAME.fullmatch(name) or name in (".", ".."):
        raise RunDirError(f"{report_path}: the gated artifact {name!r} is not a file name inside "
                          f"{ARTIFACTS_DIR}/", hint="re-run the gate on an artifact of this run")
    if recorded is not None:
        where = PurePosixPath(str(recorded))
        if where.name != name or where.parent.name != ARTIFACTS_DIR:
            raise RunDirError(f"{report_path}: the gated artifact {recorded} is outside the run's {ARTIFACTS_DIR}/ "
                              "folder; pack takes artifacts inside the run only",
                              hint=f"export into {Path(run_dir) / ARTIFACTS_DIR} and gate that file")
    fd = _walk(Path(run_dir), f"{ARTIFACTS_DIR}/{name}", folder_last=False)
    if fd is None:
        raise RunDirError(f"the gated artifact {name} is missing from {Path(run_dir) / ARTIFACTS_DIR}",
                          hint="re-export it, or gate the artifacts the run has")
    os.close(fd)
    return Path(run_dir) / ARTIFACTS_DIR / name


def profile_problem(report: dict[str, Any], profile: Profile) -> str | None:
    """Why ``report`` (whose ``profile`` is this profile's name) does not count for ``profile``."""
    recorded = report.get("profile_sha256")
    if not isinstance(recorded, str):
        return (f"{report.get('_report_path')} records no profile hash (written by hand or by an older edgepack), "
                f"so it cannot be told from a report for another profile named {profile.name}")
    if recorded != profile.content_hash():
        return (f"{report.get('_report_path')} was gated against another profile named {profile.name} "
                f"(profile sha256 {recorded[:12]}…, this one's {profile.content_hash()[:12]}…: other budgets "
                "or choices)")
    return None


def check_verdict(report: dict[str, Any], profile: Profile) -> None:
    """The report's verdict and checks must follow from its own measurements under ``profile``.

    The verdict may be worse than the one judged again (a later gate step may only lower it),
    never better; every check the judgement gives must be in the report as it gives it.
    """
    from edgepack.export.gate.gate import decide

    where = report.get("_report_path")
    host = report.get("host")
    try:
        verdict, checks, reasons = decide(report["measurements"], profile, bool(host["ok"]), str(host["reason"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunDirError(f"{where} is not a gate report edgepack wrote: its measurements cannot be judged "
                          f"({type(exc).__name__}: {exc})", hint="re-run the gate") from exc
    claimed = report.get("verdict")
    if _RANK.get(verdict, 0) < _RANK.get(claimed, 0):
        raise RunDirError(f"{where}: verdict {claimed} does not follow from its own measurements under profile "
                          f"{profile.name} (judged again: {verdict}: {'; '.join(reasons[:2])}); the report was "
                          "edited or forged", hint="re-run the gate")
    shown = report.get("checks")
    reasons_ok = isinstance(report.get("reasons"), list) and all(isinstance(r, str) for r in report["reasons"])
    if not isinstance(shown, list) or any(c not in shown for c in checks) or not reasons_ok:
        raise RunDirError(f"{where}: its checks or reasons are not the ones its measurements give under profile "
                          f"{profile.name}; the report was edited or forged", hint="re-run the gate")


def check_bundle_binding(manifest: dict[str, Any], model: Path, gated_sha: str) -> None:
    """The model bytes inside the written bundle are the gated ones (file or ONNX folder digest)."""
    from edgepack.export.gate.gate import folder_digest

    files = {f["path"]: f["sha256"] for f in manifest[M_FILES]}
    if model.name in files:
        packed = files[model.name]
    else:
        prefix = f"{model.name}/"
        packed = folder_digest((p[len(prefix):], s) for p, s in files.items() if p.startswith(prefix))
    if packed != gated_sha:
        raise RunDirError(f"{model} changed while it was packed: the bundle's copy has sha256 {packed[:12]}…, "
                          f"the gated file {gated_sha[:12]}…; nothing was written",
                          hint="let the stage that is rewriting it finish, then gate and pack again")
