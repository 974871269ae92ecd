"""One process per stage per run directory: an exclusive ``fcntl.flock`` on a lock file.

Every stage that writes into a run directory (distill data, distill train, export, gate, pack)
holds ``RUN/.edgepack-<stage>.lock`` while it runs::

    with stage_lock(run_dir, "export"):
        ...

    @locked_stage("distill data", lambda kw: kw["run_dir"])
    def build_dataset(*, run_dir: Path, ...) -> ...: ...

A second process that starts the same stage on the same run gets :class:`RunDirLocked`
(exit 2): one line naming the stage, the run directory and the pid written in the lock file by
the holder. Without the lock two exports on one run raced each other's temporary files and
one died with "internal error: FileNotFoundError" or a misleading quantizer error.

Why flock: the kernel drops the lock when its holder exits, SIGKILL included, so a lock file
left by a dead process never blocks the next run (it is simply taken over). The holder removes
the file when it is done (and the run folder, if taking the lock created it and nothing else
was written), so a finished stage leaves nothing behind. Removing a flock'ed file is safe
because a taker checks, after locking, that the path still names the inode it locked, and
retries otherwise. Nested use in one thread (the pipeline's gate stage calling the gate on
each artifact) is a no-op; other threads and processes are excluded. Different stages do not
exclude each other: each writes its own folders, atomically (:mod:`edgepack.atomic`), and
``pack`` re-checks every hash it relies on. A run folder this process may not write to is not
locked (a stage can write nothing there; the gate only reads artifacts). flock is advisory and
local: processes on other machines sharing the folder over NFS are not excluded.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from edgepack.errors import RunDirError, RunDirLocked

F = TypeVar("F", bound=Callable[..., Any])
LOCK_PREFIX = ".edgepack-"
LOCK_SUFFIX = ".lock"
# How long a loser waits for the holder to write its pid (it writes right after locking).
_HOLDER_WAIT_S = 1.0
_held: dict[tuple[str, str, int], int] = {}  # (run realpath, stage, thread) -> nesting depth
_held_guard = threading.Lock()


def lock_path(run_dir: Path, stage: str) -> Path:
    """``RUN/.edgepack-<stage>.lock`` (``distill data`` -> ``.edgepack-distill-data.lock``)."""
    return Path(run_dir) / f"{LOCK_PREFIX}{re.sub(r'[^a-z0-9]+', '-', stage.lower()).strip('-')}{LOCK_SUFFIX}"


def read_holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into a lock file (pid, stage, started); {} when empty or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; returns the folders created, deepest last."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    created = []
    for parent in reversed(missing):
        try:
            parent.mkdir()
            created.append(parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {folder}: {exc.strerror or exc}",
                              hint="choose a folder you can write to") from exc
    return created


def _locked(run_dir: Path, stage: str, path: Path) -> RunDirLocked:
    deadline = time.monotonic() + _HOLDER_WAIT_S
    holder: dict[str, Any] = {}
    while time.monotonic() < deadline:
        holder = read_holder(path)
        if holder.get("pid"):
            break
        time.sleep(0.02)
    pid = holder.get("pid")
    since = f", started {holder['started']}" if holder.get("started") else ""
    who = f"pid {pid}" if pid else "a process whose pid is not yet written"
    return RunDirLocked(f"{stage} is already running on {run_dir} ({who}{since}; lock file {path.name}); "
                        f"two {stage} processes on one run would overwrite each other's files",
                        hint=f"wait for {'pid ' + str(pid) if pid else 'it'} to finish, or stop it; the lock is "
                             "released when that process exits")


def _acquire(run_dir: Path, stage: str) -> tuple[int | None, Path, list[Path]]:
    """(fd holding the lock, lock path, folders created for it); fd None: the folder is read-only."""
    path = lock_path(run_dir, stage)
    created = _make_dirs(Path(run_dir))
    for _ in range(1000):  # each retry means another process removed the file or folder just now
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder was removed by a holder that had created it: again
            created += _make_dirs(Path(run_dir))
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunDirError(f"{path} is a symbolic link; a lock file must be a regular file in the run",
                                  hint=f"remove {path}") from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None, path, created  # nothing can be written here, by us or by a second us
            if exc.errno == errno.ENOTDIR:
                raise RunDirError(f"{run_dir} is not a folder", hint="pass the run directory") from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _locked(run_dir, stage, path)
            os.close(fd)
            raise error from None
        try:
            same = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            same = None
        mine = os.fstat(fd)
        if same is not None and (same.st_dev, same.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # we locked a file the previous holder had just removed: take the current one
    else:
        raise RunDirError(f"could not take the {stage} lock on {run_dir}: its lock file keeps disappearing")
    info = {"pid": os.getpid(), "stage": stage, "run_dir": str(run_dir),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return fd, path, created


def _release(fd: int | None, path: Path, created: list[Path]) -> None:
    if fd is not None:
        try:
            path.unlink()  # while still locked: a taker that opened the old inode sees it gone and retries
        except OSError:
            pass
        os.close(fd)
    for folder in reversed(created):  # the stage wrote nothing: leave no empty run folder behind
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[None]:
    """Hold ``stage``'s exclusive lock on ``run_dir`` (created if missing); RunDirLocked if another
    process (or thread) holds it. Re-entrant within one thread."""
    run_dir = Path(run_dir)
    key = (os.path.realpath(run_dir), stage, threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd, path, created = _acquire(run_dir, stage)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        _release(fd, path, created)


def locked_stage(stage: str, run_dir_of: Callable[[dict[str, Any]], Path | None], *,
                 rank_zero_only: bool = False) -> Callable[[F], F]:
    """Decorate a stage's keyword-only library entry so it runs under :func:`stage_lock`.

    ``run_dir_of`` picks the run folder from the call's keyword arguments (None: not a run,
    no lock). ``rank_zero_only``: under ``torchrun`` every rank runs the stage on the same
    run and rank 0 alone writes (distill/parallel.py), so only rank 0 takes the lock.
    """
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            run_dir = run_dir_of(kwargs)
            if run_dir is None or (rank_zero_only and os.environ.get("RANK", "0") not in ("", "0")):
                return fn(*args, **kwargs)
            with stage_lock(Path(run_dir), stage):
                return fn(*args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
