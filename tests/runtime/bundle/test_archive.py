"""The .edgepack bundle: write, verify, extract; hostile and damaged tars are refused whole."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import MANIFEST_FILE, MANIFEST_SCHEMA_VERSION
from edgepack.errors import BundleError
from edgepack.runtime.bundle.archive import (BundleFile, check_member_name, extract_bundle, inspect_bundle,
                                     verify_bundle, write_bundle)
from tests.runtime.helpers import tar_member, write_tar

FILES = {"model.gguf": b"GGUF" + bytes(range(256)) * 40, "README.md": b"# hi\n", "tokenizer/tokenizer.json": b"{}"}


def base_manifest() -> dict[str, Any]:
    return {"schema_version": MANIFEST_SCHEMA_VERSION, "model": "m", "format": "gguf", "quant": "Q8_0",
            "profile": {"name": "p"}, "entrypoint": "model.gguf", "files": [], "gate_status": "PASS"}


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "m.edgepack", base_manifest(), [BundleFile(k, v) for k, v in FILES.items()])
    return tmp_path / "m.edgepack"


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_roundtrip(bundle: Path, tmp_path: Path) -> None:
    manifest = verify_bundle(bundle)
    assert [f["path"] for f in manifest["files"]] == list(FILES)
    with tarfile.open(bundle) as tar:
        assert tar.getnames()[0] == MANIFEST_FILE
        assert all(m.isreg() and m.uid == 0 and m.mtime == 0 for m in tar.getmembers())
    out = extract_bundle(bundle, tmp_path / "out")
    for name, data in FILES.items():
        assert (out / name).read_bytes() == data
    assert json.loads((out / MANIFEST_FILE).read_text())["model"] == "m"
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.part-*"))


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    a = write_bundle(tmp_path / "a.edgepack", base_manifest(), [BundleFile(k, v) for k, v in FILES.items()])
    b = write_bundle(tmp_path / "b.edgepack", base_manifest(), [BundleFile(k, v) for k, v in FILES.items()])
    assert a.sha256 == b.sha256 and a.size == (tmp_path / "a.edgepack").stat().st_size


def test_file_sources_are_streamed(tmp_path: Path) -> None:
    src = tmp_path / "big.gguf"
    src.write_bytes(os.urandom(3 << 20))
    m = base_manifest() | {"entrypoint": "big.gguf"}
    check = write_bundle(tmp_path / "b.edgepack", m, [BundleFile("big.gguf", src)])
    assert check.members["big.gguf"][0] == 3 << 20
    assert extract_bundle(tmp_path / "b.edgepack", tmp_path / "x").joinpath("big.gguf").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("name,ok", [("model.gguf", True), ("tokenizer/tokenizer.json", True), ("../x", False),
                                     ("/etc/passwd", False), ("a/../../b", False), (".hidden", False),
                                     ("a//b", False), ("a/./b", False), ("C:/x", False), ("a\\b", False),
                                     ("", False), ("x" * 300, False), ("sp ace", False)])
def test_member_names(name: str, ok: bool) -> None:
    assert (check_member_name(name) is None) == ok


def test_writer_refuses_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="escapes"):
        write_bundle(tmp_path / "x.edgepack", base_manifest(), [BundleFile("model.gguf", b"x"), BundleFile("../e", b"x")])
    assert not (tmp_path / "x.edgepack").exists()


# --- hostile tars -----------------------------------------------------------------------------
def hostile_members(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """Each entry: members to append after a valid manifest + model (the bundle is otherwise fine)."""
    return {
        "dotdot": [tar_member("../escaped.txt", b"evil")],
        "nested dotdot": [tar_member("tokenizer/../../escaped.txt", b"evil")],
        "absolute": [tar_member(str(outside / "escaped.txt"), b"evil")],
        "symlink": [tar_member("link", kind=tarfile.SYMTYPE, link=str(outside / "escaped.txt"))],
        "relative symlink": [tar_member("link", kind=tarfile.SYMTYPE, link="../../escaped.txt")],
        "hardlink": [tar_member("hard", kind=tarfile.LNKTYPE, link="model.gguf")],
        "char device": [tar_member("dev", kind=tarfile.CHRTYPE)],
        "block device": [tar_member("blk", kind=tarfile.BLKTYPE)],
        "fifo": [tar_member("fifo", kind=tarfile.FIFOTYPE)],
        "directory": [tar_member("tokenizer", kind=tarfile.DIRTYPE)],
        "duplicate": [tar_member("model.gguf", b"GGUF other")],
        "case duplicate": [tar_member("MODEL.gguf", b"GGUF other")],
        "hidden": [tar_member(".complete", b"ok")],
    }


def build_hostile(path: Path, extra: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    model = b"GGUF model bytes"
    manifest = base_manifest() | {"files": [{"path": "model.gguf", "size": len(model),
                                              "sha256": __import__("hashlib").sha256(model).hexdigest()}]}
    members = [tar_member(MANIFEST_FILE, json.dumps(manifest).encode()), tar_member("model.gguf", model), *extra]
    return write_tar(path, members)


@pytest.mark.parametrize("kind", list(hostile_members(Path("/x"))))
def test_hostile_bundles_are_rejected_whole(kind: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    extra = hostile_members(outside)[kind]
    bad = build_hostile(tmp_path / "bad.edgepack", extra)
    with tarfile.open(bad) as tar:  # the hostile member really is in the file as written
        assert extra[0][0].name in tar.getnames()
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match="whole bundle is refused") as err:
        verify_bundle(bad)
    assert repr(extra[0][0].name) in str(err.value)
    with pytest.raises(BundleError):
        extract_bundle(bad, tmp_path / "dest")
    assert snapshot(tmp_path) == before  # nothing written, staging removed
    assert not (tmp_path / "escaped.txt").exists() and not (outside / "escaped.txt").exists()


def test_tarfile_extractall_would_have_escaped(tmp_path: Path) -> None:
    """Why we do not trust tarfile: the same file escapes with plain extractall (3.11 default)."""
    bad = build_hostile(tmp_path / "bad.edgepack", [tar_member("../escaped.txt", b"evil")])
    (tmp_path / "plain").mkdir()
    with tarfile.open(bad) as tar:
        tar.extractall(tmp_path / "plain", filter="fully_trusted")
    assert (tmp_path / "escaped.txt").exists()


# --- integrity --------------------------------------------------------------------------------
def member_offset(bundle: Path, name: str) -> int:
    with tarfile.open(bundle) as tar:
        return tar.getmember(name).offset_data


def test_one_flipped_byte_names_the_file(bundle: Path) -> None:
    data = bytearray(bundle.read_bytes())
    data[member_offset(bundle, "model.gguf") + 100] ^= 0x01
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.gguf: sha256"):
        verify_bundle(bundle)


def test_flipped_byte_in_a_small_file_names_it(bundle: Path) -> None:
    data = bytearray(bundle.read_bytes())
    data[member_offset(bundle, "tokenizer/tokenizer.json")] ^= 0x20
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tokenizer/tokenizer\.json: sha256"):
        verify_bundle(bundle)


@pytest.mark.parametrize("cut", [1, 600, 5000])
def test_truncation_is_detected(bundle: Path, cut: int) -> None:
    data = bundle.read_bytes()
    bundle.write_bytes(data[: len(data) - cut] if cut < 2000 else data[:cut])
    with pytest.raises(BundleError):
        verify_bundle(bundle)


def test_truncated_member_names_it(bundle: Path) -> None:
    cut = member_offset(bundle, "model.gguf") + 1000
    bundle.write_bytes(bundle.read_bytes()[:cut])
    with pytest.raises(BundleError, match="member 'model.gguf' is truncated"):
        verify_bundle(bundle)


def _rewrite(bundle: Path, dst: Path, *, drop: str | None = None, add: tuple[str, bytes] | None = None,
             manifest_patch: dict[str, Any] | None = None) -> Path:
    members = []
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == drop:
                continue
            if m.name == MANIFEST_FILE and manifest_patch:
                data = json.dumps(json.loads(data) | manifest_patch).encode()
            members.append(tar_member(m.name, data))
    if add:
        members.append(tar_member(*add))
    return write_tar(dst, members)


def test_extra_file_is_named(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "x.edgepack", add=("payload.sh", b"rm -rf /"))
    with pytest.raises(BundleError, match="payload.sh: present but not in the manifest"):
        verify_bundle(bad)


def test_missing_file_is_named(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "x.edgepack", drop="README.md")
    with pytest.raises(BundleError, match="README.md: listed in the manifest but missing"):
        verify_bundle(bad)


def test_missing_manifest(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(_rewrite(bundle, tmp_path / "x.edgepack", drop=MANIFEST_FILE))


def test_unknown_schema_version(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="unknown manifest schema_version 99"):
        verify_bundle(_rewrite(bundle, tmp_path / "x.edgepack", manifest_patch={"schema_version": 99}))


def test_manifest_listing_an_unsafe_path(bundle: Path, tmp_path: Path) -> None:
    patch = {"files": [{"path": "../x", "size": 1, "sha256": "0" * 64}], "entrypoint": "../x"}
    with pytest.raises(BundleError, match="invalid file '../x'"):
        verify_bundle(_rewrite(bundle, tmp_path / "x.edgepack", manifest_patch=patch))


def test_compressed_or_non_tar_is_refused(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "z.edgepack").write_bytes(gzip.compress(bundle.read_bytes()))
    with pytest.raises(BundleError, match="not an uncompressed tar"):
        verify_bundle(tmp_path / "z.edgepack")
    (tmp_path / "n.edgepack").write_bytes(b"hello world" * 100)
    with pytest.raises(BundleError):
        verify_bundle(tmp_path / "n.edgepack")


def test_extract_refuses_an_existing_destination(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        extract_bundle(bundle, tmp_path / "dest")
    assert (tmp_path / "dest" / "keep.txt").read_text() == "mine"


def test_bundle_hash_covers_the_whole_file(bundle: Path) -> None:
    import hashlib

    assert inspect_bundle(bundle).sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()


def test_appended_bytes_are_refused(bundle: Path) -> None:
    with open(bundle, "ab") as fh:
        fh.write(b"#!/bin/sh\necho appended\n")
    with pytest.raises(BundleError, match="after the last member are not all zero"):
        verify_bundle(bundle)
