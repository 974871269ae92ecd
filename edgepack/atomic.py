"""Atomic file and directory writes shared by every stage, and cleaning what a killed one left.

A file is written to ``<name>.part-<pid>.edgepack-tmp`` in the same folder, fsynced, then
renamed; a stage folder is built under ``<name>.tmp-<pid>.edgepack-tmp`` and renamed into place
with a ``.complete`` marker written last (a folder it replaces is first moved aside to
``<name>.old-<pid>.edgepack-tmp``). An interrupted stage therefore leaves nothing under a final
name, and :func:`is_complete` tells a finished folder from a half-written one.

:func:`clean_stale` removes only names of exactly that form (:func:`is_temp_name`): the
final name, ``.part-``/``.tmp-``/``.old-``, a pid, and the ``.edgepack-tmp`` marker. A user's
file that merely contains ``.old-`` (a profile named ``edge.old-1`` puts it in a bundle's name)
is never touched, nor is a temporary name whose pid is still running (another process is
writing it), and a folder moved aside by a swap that was cut short is put back instead of
removed when nothing took its place: it is a finished artifact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgepack.constants import COMPLETE_MARKER

TEMP_MARKER = ".edgepack-tmp"
TEMP_KINDS = ("part", "tmp", "old")  # a file being written, a folder being built, a folder swapped out
_TEMP_NAME = re.compile(r"(?P<final>.+)\.(?P<kind>part|tmp|old)-(?P<pid>[1-9][0-9]{0,9})" + re.escape(TEMP_MARKER))


def temp_name(final: Path, kind: str) -> Path:
    """This process's temporary name for ``final``: ``<final>.<kind>-<pid>.edgepack-tmp``."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temporary name kind {kind!r} is not one of {TEMP_KINDS}")
    final = Path(final)
    return final.with_name(f"{final.name}.{kind}-{os.getpid()}{TEMP_MARKER}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(final name, kind, pid) of a name :func:`temp_name` made; None for any other name."""
    m = _TEMP_NAME.fullmatch(name)
    return (m["final"], m["kind"], int(m["pid"])) if m else None


def is_temp_name(name: str) -> bool:
    """True for exactly the temporary names edgepack creates (see the module docstring)."""
    return parse_temp_name(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: possibly being written by another thread right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final, "part")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it to ``final`` and mark it complete.

    With ``replace`` an existing ``final`` is swapped out only after the new one is whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = temp_name(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was finished by :func:`atomic_dir` (its marker exists)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


@contextmanager
def scratch(parent: Path, name: str) -> Iterator[Path]:
    """A fresh scratch folder ``<parent>/<name>.tmp-<pid>.edgepack-tmp`` for the length of a
    ``with`` block, removed afterwards (after a kill, by :func:`clean_stale`)."""
    path = temp_name(Path(parent) / name, "tmp")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(parent: Path) -> list[Path]:
    """Remove what killed writers left in ``parent``: temporary names edgepack made under a pid
    that is no longer running. A swapped-out ``.old-`` folder whose final name is missing is
    renamed back, not removed. Returns the paths removed (or restored)."""
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        parsed = parse_temp_name(p.name)
        if parsed is None or _pid_alive(parsed[2]):
            continue
        final = parent / parsed[0]
        if parsed[1] == "old" and not final.exists() and not final.is_symlink():
            # Killed between the swap's two renames: this is the previous, finished folder.
            os.replace(p, final)
        else:
            _remove(p)
        removed.append(p)
    return removed
