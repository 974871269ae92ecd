"""Atomic writes: nothing under a final name until the write is whole."""

from __future__ import annotations

from pathlib import Path

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


def test_clean_stale(tmp_path: Path) -> None:
    (tmp_path / "model.gguf.part-123").write_bytes(b"x")
    (tmp_path / "student.tmp-9").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    removed = clean_stale(tmp_path)
    assert len(removed) == 2 and [p.name for p in tmp_path.iterdir()] == ["keep.json"]
