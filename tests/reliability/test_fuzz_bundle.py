"""Fuzzing bundle reading (runtime/bundle/archive.py: manifest parsing, tar walking, extraction).

Inputs: a valid bundle whose manifest is rewritten (keys dropped, values of the wrong type,
huge numbers, deep nesting, raw bytes); bundles of generated tar members (every member type,
hostile names and link targets); and byte-level damage of a real bundle. Each must verify or
be refused with BundleError within 1 s and bounded memory. An accepted bundle must be exactly
the original members, and extracting it must write those files and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from edgepack.constants import MANIFEST_FILE
from edgepack.errors import BundleError
from edgepack.runtime.bundle.archive import BundleCheck, BundleFile, check_member_name, extract_bundle, inspect_bundle, write_bundle
from tests.reliability.conftest import FUZZ, bounded
from tests.reliability.test_fuzz_gguf import mutate, ops

pytestmark = pytest.mark.fuzz

MODEL = b"GGUF" + bytes(range(256)) * 4
FILES = {"model.gguf": MODEL, "README.md": b"# tiny\n", "tokenizer/tokenizer.json": b"{}"}
BASE_MANIFEST = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16",
                 "profile": {"name": "p"}, "entrypoint": "model.gguf", "gate_status": "PASS"}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                      st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


class Good(tuple):
    """(bundle bytes, manifest) of the valid bundle; a short repr keeps failure reports readable."""

    def __repr__(self) -> str:
        return "<valid bundle>"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    path = tmp_path_factory.mktemp("bundle") / "b.edgepack"
    check = write_bundle(path, BASE_MANIFEST, [BundleFile(k, v) for k, v in FILES.items()])
    return Good((path.read_bytes(), check.manifest))


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return info, data


def with_manifest(manifest_bytes: bytes) -> bytes:
    return tar_bytes([member(MANIFEST_FILE, manifest_bytes), *(member(k, v) for k, v in FILES.items())])


def check_accepted(check: BundleCheck, path: Path, tmp: Path) -> None:
    """An accepted bundle holds exactly the original files, and extracts to exactly them."""
    members = {k: v for k, v in check.members.items() if k != MANIFEST_FILE}
    assert members == {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in FILES.items()}
    for entry in check.manifest["files"]:
        assert check_member_name(entry["path"]) is None
    assert check.manifest["entrypoint"] in members
    dest = tmp / "out"
    before = sorted(p.name for p in tmp.iterdir())
    extract_bundle(path, dest)
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert written == sorted([*FILES, MANIFEST_FILE, ".complete"])
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in tmp.iterdir()) == sorted([*before, "out"])  # nothing beside the target


def verify(label: str, data: bytes, tmp: Path) -> Any:
    path = tmp / "b.edgepack"
    path.write_bytes(data)
    result = bounded(label, inspect_bundle, path, allowed=BundleError, size=len(data))
    if isinstance(result, BundleCheck):
        check_accepted(result, path, tmp)
    return result


manifest_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from([*BASE_MANIFEST, "files", "lineage"]), json_values),
    st.tuples(st.just("drop"), st.sampled_from([*BASE_MANIFEST, "files"]), st.none()),
    st.tuples(st.just("entry"), st.sampled_from(["path", "size", "sha256"]), json_values),
    st.tuples(st.just("entry-path"), st.sampled_from(["../x", "/abs", "a/../b", ".hidden", "a\\b", "C:x", "",
                                                      "model.gguf", "MODEL.GGUF", "x" * 300, "a//b", "manifest.json"]),
              st.none()),
    st.tuples(st.just("nest"), st.integers(1, 200_000), st.none()),
    st.tuples(st.just("bigint"), st.integers(4000, 20_000), st.none()),
)


def edit_manifest(manifest: dict[str, Any], edit: tuple[str, Any, Any]) -> bytes:
    m = copy.deepcopy(manifest)
    kind, key, value = edit
    if kind == "set":
        m[key] = value
    elif kind == "drop":
        m.pop(key, None)
    elif kind in ("entry", "entry-path"):
        files = m.get("files")
        if isinstance(files, list) and files and isinstance(files[0], dict):
            files[0].update({key: value} if kind == "entry" else {"path": key})
    elif kind == "nest":  # a value nested deeper than the JSON decoder's recursion limit
        return json.dumps(m)[:-1].encode() + b', "x": ' + b"[" * key + b"]" * key + b"}"
    elif kind == "bigint":  # past Python's 4300-digit int parsing limit (a ValueError, not JSONDecodeError)
        return json.dumps(m)[:-1].encode() + b', "x": ' + b"9" * key + b"}"
    return json.dumps(m).encode()


@FUZZ
@given(edits=st.lists(manifest_edits, min_size=1, max_size=3))
@example(edits=[("set", "entrypoint", [])])   # an unhashable entrypoint
@example(edits=[("nest", 100_000, None)])
@example(edits=[("bigint", 5000, None)])
def test_rewritten_manifest_is_refused_or_exact(edits: list[tuple[str, Any, Any]], good: tuple[bytes, dict[str, Any]],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    manifest = good[1]
    raw = json.dumps(manifest).encode()
    for edit in edits:
        raw = edit_manifest(json.loads(raw), edit) if edit[0] not in ("nest", "bigint") else \
            edit_manifest(manifest, edit)
        if edit[0] in ("nest", "bigint"):
            break
    verify("bundle manifest (rewritten)", with_manifest(raw), tmp_path_factory.mktemp("m"))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_manifest_of_arbitrary_bytes_is_refused(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = verify("bundle manifest (arbitrary bytes)", with_manifest(raw), tmp_path_factory.mktemp("a"))
    assert isinstance(result, BundleError)


member_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"S", b"V", b"Z"])
names = st.one_of(st.sampled_from([*FILES, "../evil", "/etc/passwd", "a/../../b", ".x", "model.gguf/", "Model.gguf",
                                   "a\\..\\b", "x" * 300]),
                  st.text(max_size=40).filter(lambda s: "\x00" not in s))


@FUZZ
@given(extra=st.lists(st.tuples(names, st.binary(max_size=64), member_kinds, names), min_size=1, max_size=4),
       position=st.integers(0, 4))
def test_generated_members_are_refused_or_exact(extra: list[tuple[str, bytes, bytes, str]], position: int,
                                                good: tuple[bytes, dict[str, Any]],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    members = [member(MANIFEST_FILE, json.dumps(good[1]).encode()), *(member(k, v) for k, v in FILES.items())]
    for name, data, kind, link in extra:
        members.insert(position % (len(members) + 1), member(name, data, kind, link))
    verify("bundle members (generated)", tar_bytes(members), tmp_path_factory.mktemp("t"))


@FUZZ
@given(mutations=st.lists(ops, min_size=1, max_size=3))
def test_damaged_bundle_is_refused_or_exact(mutations: list[tuple[str, int, object]], good: tuple[bytes, dict[str, Any]],
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    data = mutate(good[0], mutations)
    assume(data != good[0])
    verify("bundle bytes (damaged)", data, tmp_path_factory.mktemp("d"))
