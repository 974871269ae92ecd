"""Atomic writes: nothing under a final name until the write is whole."""

from __future__ import annotations

from pathlib import Path

import os

import pytest

from edgepack.atomic import atomic_dir, atomic_path, clean_stale, is_complete, write_json


def test_failed_file_write_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_failed_dir_leaves_nothing_and_success_is_marked(tmp_path: Path) -> None:
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        write_json(tmp / "r.json", {"ok": 1})
    assert is_complete(final) and (final / "r.json").is_file()
    with pytest.raises(FileExistsError):
        with atomic_dir(final):
            pass
    assert is_complete(final)


DEAD = 999_999_999  # above pid_max: no live process


def test_clean_stale(tmp_path: Path) -> None:
    (tmp_path / f"model.gguf.part-{DEAD}.edgepack-tmp").write_bytes(b"x")
    (tmp_path / f"student.tmp-{DEAD}.edgepack-tmp").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    removed = clean_stale(tmp_path)
    assert len(removed) == 2 and [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_clean_stale_removes_only_names_edgepack_made_under_a_dead_pid(tmp_path: Path) -> None:
    """Issue #20 defect 9: a profile named ``edge.old-1`` lost its finished bundle."""
    kept = ["student-edge.old-1-gguf-Q8_0.edgepack", "edge.old-1", "notes.part-5", f"x.tmp-{DEAD}",
            f"b.old-{DEAD}", f"c.part-{DEAD}.edgepack-tmp.bak", f"d.part-{DEAD}edgepack-tmp",
            f"live.part-{os.getpid()}.edgepack-tmp",  # this process may be writing it
            "init.part-1.edgepack-tmp"]                # pid 1 is alive
    for name in kept:
        (tmp_path / name).write_bytes(b"finished")
    (tmp_path / f"gone.part-{DEAD}.edgepack-tmp").write_bytes(b"half")
    assert [p.name for p in clean_stale(tmp_path)] == [f"gone.part-{DEAD}.edgepack-tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_swap_cut_between_its_renames_puts_the_finished_folder_back(tmp_path: Path) -> None:
    old = tmp_path / f"stage.old-{DEAD}.edgepack-tmp"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"previous, finished")
    (old / ".complete").write_text("ok\n")
    half = tmp_path / f"stage.tmp-{DEAD}.edgepack-tmp"
    half.mkdir()
    clean_stale(tmp_path)
    assert is_complete(tmp_path / "stage") and (tmp_path / "stage" / "weights.bin").read_bytes() == b"previous, finished"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_temporary_names_are_recognised(tmp_path: Path) -> None:
    from edgepack.atomic import is_temp_name

    seen: list[str] = []
    with atomic_path(tmp_path / "edge.old-1.gguf") as tmp:
        tmp.write_bytes(b"x")
        seen.append(tmp.name)
    with atomic_dir(tmp_path / "edge.old-1") as tmp:
        seen.append(tmp.name)
    assert all(is_temp_name(n) for n in seen) and not is_temp_name("edge.old-1.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.old-1", "edge.old-1.gguf"]
