"""The ``.edgepack`` bundle: an uncompressed tar of a model, its manifest and its papers.

Layout (every member a regular file, no folders, links or devices)::

    manifest.json          schema_version, model, format, quant, profile, entrypoint,
                           files [{path, size, sha256}], gate report, gate_status, lineage,
                           runtime requirements, chat_template, pack, task, task_scores
                           (keys: edgepack.constants.M_*)
    manifest.sig           optional Ed25519 signature over manifest.json (runtime/bundle/signing.py)
    <model file>           the entrypoint, e.g. student-Q4_K_M.gguf
    README.md, Modelfile, chat_template.jinja, tokenizer/...   (listed in ``files``)

Verification is all-or-nothing, like ``pip --require-hashes``: one streaming pass reads every
member header and byte, and the WHOLE bundle is rejected (the error names the member) if any
member is not a regular file, has an unsafe name (absolute, ``..``, hidden, odd characters,
a duplicate even by case), if the schema version is unknown, or if any file listed in the
manifest is missing, has another size or sha256, or any member is not listed (but
``manifest.sig``, which signs the manifest). Given a public key, the signature is checked
before the file hashes, and a bundle without one is refused. Python's own
tar filters are not relied on: on 3.11 the default is no filter, and ``filter='data'`` strips
an absolute path into the target instead of refusing it.

Every tar reader must see the same members. ``tarfile`` stops silently at a header it cannot
parse while GNU tar (the Ollama path: extract, ``ollama create``) skips it and reads on, so a
bundle is read only in the exact form :func:`write_bundle` produces, checked before ``tarfile``
parses anything (:func:`_layout`): ustar headers with a valid checksum, regular files or
pax headers of at most 64 KiB holding only ``path``/``size``, strictly octal numeric fields, no
link names or name prefixes; after the last member, the end-of-archive marker and nothing but
zero bytes to the end of the file (checked in the hashing pass, so a file changed between the
passes cannot slip through).

Extraction verifies first, then streams members into ``<dest>.tmp-<pid>`` (``O_EXCL`` +
``O_NOFOLLOW``, hashes re-checked while writing in case the file changed between the passes)
and renames it to ``dest`` only when complete; on any error the staging folder is removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from edgepack.atomic import atomic_dir, atomic_path
from edgepack.constants import (BUNDLE_SUFFIX, M_ENTRYPOINT, M_FILES, M_SCHEMA, MANIFEST_FILE, MANIFEST_SCHEMA_VERSION,
                                SIGNATURE_FILE)
from edgepack.errors import BundleError

if TYPE_CHECKING:
    from edgepack.runtime.bundle.signing import SignatureInfo

KNOWN_SCHEMA_VERSIONS = (MANIFEST_SCHEMA_VERSION,)
MAX_MEMBERS = 4096
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_NAME_CHARS = 255
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_CHUNK = 1 << 20
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK  # a tar ends with two zero blocks; without them it was cut short
MAX_PAX_BYTES = 64 * 1024      # a pax header of pack's holds one path; tarfile would read any size into memory
PAX_KEYS = ("path", "size")    # all tarfile's PAX_FORMAT writes for a long/non-ASCII name or a file >= 8 GiB
_USTAR_MAGIC = b"ustar\x0000"
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "device or FIFO", b"4": "device or FIFO",
               b"5": "directory entry", b"6": "device or FIFO", b"S": "sparse file", b"L": "GNU long name",
               b"K": "GNU long link", b"g": "global pax header"}
_NUMERIC_FIELDS = ((100, 8, "mode"), (108, 8, "uid"), (116, 8, "gid"), (124, 12, "size"), (136, 12, "mtime"))
RESERVED_NAMES = (MANIFEST_FILE, SIGNATURE_FILE)  # members a manifest may not list


@dataclass(frozen=True)
class BundleCheck:
    """The outcome of a successful verification pass."""

    manifest: dict[str, Any]
    sha256: str
    """sha256 of the whole bundle file (the cache key for its extraction)."""
    size: int
    members: dict[str, tuple[int, str]]
    """(size, sha256) of every member, manifest.json included."""
    signature: SignatureInfo | None = None
    """The manifest's signature (verified only when a key was given); None when unsigned."""


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte read through it (tar is read sequentially)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.count = 0
        self.nonzero_end = 0
        """Offset just past the last non-zero byte read so far."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        if n:
            chunk = memoryview(b)[:n]
            self.digest.update(chunk)
            stripped = len(bytes(chunk).rstrip(b"\0"))
            if stripped:
                self.nonzero_end = self.count + stripped
            self.count += n
        return n or 0


def check_member_name(name: str) -> str | None:
    """Why ``name`` is not a safe bundle path, or None when it is.

    Safe: relative, '/'-separated components of letters, digits, ``._-``, none empty, none
    starting with '.', at most 255 characters.
    """
    if not name or len(name) > MAX_NAME_CHARS:
        return "empty or over-long name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path escapes the bundle (..)"
    for part in parts:
        if not _SAFE_COMPONENT.fullmatch(part):
            return f"unsafe path component {part!r}"
    return None


def _member_problem(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"symbolic link (-> {m.linkname!r})"
    if m.islnk():
        return f"hard link (-> {m.linkname!r})"
    if m.isdev():
        return "device or FIFO"
    if m.isdir():
        return "directory entry (bundles hold files only)"
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse():
        return f"unsupported member type {m.type!r}"
    return check_member_name(m.name)


def _octal(field: bytes) -> int | None:
    """A numeric header field as tarfile writes it (octal digits, then NUL/space), else None."""
    m = re.fullmatch(rb"([0-7]+)[\0 ]*", field)
    return int(m.group(1), 8) if m else None


def _nul_padded(field: bytes) -> bool:
    return not field.partition(b"\0")[2].strip(b"\0")


def _header_problem(block: bytes) -> str | None:
    """Why a 512-byte header is not in the form :func:`write_bundle` writes, or None."""
    fields = {what: _octal(block[at:at + n]) for at, n, what in _NUMERIC_FIELDS}
    bad = [what for what, value in fields.items() if value is None]
    checksum = _octal(block[148:156])
    if checksum is None or checksum != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        return "bad header checksum"
    if bad:
        return f"non-numeric {', '.join(bad)} field"
    if block[257:265] != _USTAR_MAGIC:
        return "not a POSIX ustar header"
    if block[156:157] not in (b"0", b"x"):
        name = block[:100].partition(b"\0")[0].decode("utf-8", "replace").rstrip("/")
        kind = _TYPE_NAMES.get(block[156:157], f"member type {block[156:157]!r}")
        return f"member {name!r} is a {kind} (bundles hold regular files only)"
    if block[157:257].strip(b"\0") or block[345:].strip(b"\0"):
        return "link name or name prefix set"
    if not all(_nul_padded(block[a:b]) for a, b in ((0, 100), (265, 297), (297, 329))):
        return "name field not NUL-terminated"
    return None


def _pax_records(data: bytes) -> dict[str, str] | str:
    """The records of a pax header (``"<len> <key>=<value>\\n"``), or why they are refused."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        m = re.match(rb"([1-9][0-9]{0,5}) ", data[pos:pos + 8])
        length = int(m.group(1)) if m else 0
        record = data[pos:pos + length]
        if not m or length <= len(m.group(0)) or len(record) != length or not record.endswith(b"\n"):
            return "malformed pax record"
        key, sep, value = record[len(m.group(0)):-1].partition(b"=")
        name = key.decode("ascii", "replace")
        if not sep or name not in PAX_KEYS or name in records:
            return f"pax key {name[:40]!r} (bundles use only {', '.join(PAX_KEYS)}, once each)"
        try:
            records[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            return "pax value is not UTF-8"
        pos += length
    if "size" in records and not records["size"].isdigit():
        return "pax size is not a number"
    return records


def _layout(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, read header by header in pack's strict form.

    Runs before ``tarfile`` parses anything: a header any tar reader could read differently is
    refused here, and a pax header's size is bounded before its bytes are read. Stops at the
    first zero block; what follows it is checked in the hashing pass.
    """
    found: list[tuple[str, int, int]] = []
    pax: dict[str, str] | None = None
    pos = 0
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        while True:
            fh.seek(pos)
            block = fh.read(_BLOCK)
            if len(block) < _BLOCK:
                raise BundleError(f"{path.name}: ends inside the tar at byte {pos} with no end-of-archive marker; "
                                  "truncated?")
            if not block.strip(b"\0"):
                if pax is not None:
                    raise BundleError(f"{path.name}: a pax header at the end of the archive belongs to no member")
                return found
            where = f"{path.name}: header at byte {pos}"
            problem = _header_problem(block)
            if problem and pos == 0:
                raise BundleError(f"{path.name}: not an uncompressed tar bundle ({problem})")
            if problem:
                raise BundleError(f"{where}: {problem}; the whole bundle is refused",
                                  hint="bundles are written by `edgepack pack`; this file was altered")
            size = _octal(block[124:136]) or 0
            data_at = pos + _BLOCK
            pos = data_at + size + (-size % _BLOCK)
            if block[156:157] == b"x":
                if pax is not None or size > MAX_PAX_BYTES:
                    raise BundleError(f"{where}: pax header of {size} bytes or two in a row "
                                      f"(at most one of {MAX_PAX_BYTES} bytes per member); the whole bundle is refused")
                fh.seek(data_at)
                records = _pax_records(fh.read(size))
                if isinstance(records, str):
                    raise BundleError(f"{where}: {records}; the whole bundle is refused")
                pax = records
                continue
            name = (pax or {}).get("path") or block[:100].partition(b"\0")[0].decode("utf-8", "replace")
            if pax and "size" in pax:
                size = int(pax["size"])
                pos = data_at + size + (-size % _BLOCK)
            if data_at + size > file_size:
                raise BundleError(f"{path.name}: member {name!r} is truncated "
                                  f"({max(0, file_size - data_at)} of {size} bytes)")
            found.append((name, data_at, size))
            pax = None
            if len(found) > MAX_MEMBERS:
                raise BundleError(f"{path.name}: more than {MAX_MEMBERS} members")


def _iter_members(path: Path) -> Iterator[tuple[tarfile.TarInfo, Any, _HashingReader]]:
    """Stream (member, file object, bundle hasher) after checking each member's header.

    ``tarfile`` must find exactly the members :func:`_layout` found, at the same offsets, and
    after the last one only the end-of-archive marker and zero bytes may follow.
    """
    layout = _layout(path)
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        stream = io.BufferedReader(reader, buffer_size=_CHUNK)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.TarError as exc:
            raise BundleError(f"{path.name}: not an uncompressed tar bundle ({exc})") from exc
        seen: set[str] = set()
        folded: dict[str, str] = {}
        count = 0
        try:
            for member in tar:
                if count >= len(layout) or layout[count] != (member.name, member.offset_data, member.size):
                    raise BundleError(f"{path.name}: tar readers disagree about member {count + 1} "
                                      f"({member.name!r}); the whole bundle is refused")
                count += 1
                problem = _member_problem(member)
                if problem:
                    raise BundleError(f"{path.name}: member {member.name!r} rejected: {problem}; "
                                      "the whole bundle is refused")
                if member.name in seen or member.name.lower() in folded:
                    other = folded.get(member.name.lower(), member.name)
                    raise BundleError(f"{path.name}: duplicate member {member.name!r} (also {other!r}); "
                                      "the whole bundle is refused")
                seen.add(member.name)
                folded[member.name.lower()] = member.name
                yield member, tar.extractfile(member), reader
            while stream.read(_CHUNK):  # hash any bytes after the end-of-archive marker
                pass
        except tarfile.TarError as exc:
            raise BundleError(f"{path.name}: damaged tar after {count} member(s) ({exc}); truncated?") from exc
    if count != len(layout):
        raise BundleError(f"{path.name}: tar readers disagree: {len(layout)} members in the headers, "
                          f"{count} read; the whole bundle is refused")
    end = layout[-1][1] + layout[-1][2] + (-layout[-1][2] % _BLOCK) if layout else 0
    if reader.nonzero_end > end:
        raise BundleError(f"{path.name}: {reader.count - end} bytes after the last member are not all zero "
                          "(another tar reader would find more members there); the whole bundle is refused",
                          hint="bundles are written by `edgepack pack`; this file was altered")
    if reader.count % _BLOCK or reader.count - end < _END_OF_ARCHIVE:
        raise BundleError(f"{path.name}: does not end with the tar end-of-archive marker ({reader.count} bytes): "
                          "truncated?")


def _hash_stream(fh: Any, name: str, *, keep: bool, sink: Any = None) -> tuple[int, str, bytes | None]:
    digest = hashlib.sha256()
    size = 0
    kept = bytearray() if keep else None
    while chunk := _read(fh, name, size):
        digest.update(chunk)
        size += len(chunk)
        if kept is not None:
            if size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
            kept += chunk
        if sink is not None:
            sink(chunk)
    return size, digest.hexdigest(), bytes(kept) if kept is not None else None


def _read(fh: Any, name: str, done: int) -> bytes:
    try:
        return fh.read(_CHUNK)
    except tarfile.TarError as exc:
        raise BundleError(f"member {name!r} is truncated after {done} bytes ({exc})") from exc


def _parse_manifest(raw: bytes | None, bundle: str) -> dict[str, Any]:
    if raw is None:
        raise BundleError(f"{bundle}: no {MANIFEST_FILE} member")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also: nesting too deep, an int past 4300 digits
        raise BundleError(f"{bundle}: {MANIFEST_FILE} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{bundle}: {MANIFEST_FILE} is not a JSON object")
    version = manifest.get(M_SCHEMA)
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise BundleError(f"{bundle}: unknown manifest {M_SCHEMA} {version!r} "
                          f"(this edgepack reads {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))})",
                          hint="upgrade edgepack, or rebuild the bundle with this version")
    from edgepack.runtime.bundle.manifest import check_manifest

    check_manifest(manifest, bundle)  # every field's type and range, all problems at once
    files = manifest[M_FILES]
    names: set[str] = set()
    for entry in files:  # the schema has checked each entry's shape
        why = check_member_name(entry["path"])
        if why or entry["path"] in RESERVED_NAMES or entry["path"] in names:
            raise BundleError(f"{bundle}: manifest lists an invalid file {entry['path']!r}: "
                              f"{why or 'duplicate or reserved name'}")
        names.add(entry["path"])
    if manifest[M_ENTRYPOINT] not in names:
        raise BundleError(f"{bundle}: entrypoint {manifest[M_ENTRYPOINT]!r} is not among the manifest's files")
    return manifest


def _compare(manifest: dict[str, Any], actual: dict[str, tuple[int, str]], bundle: str) -> None:
    problems: list[str] = []
    listed = {e["path"]: e for e in manifest[M_FILES]}
    for name, entry in listed.items():
        if name not in actual:
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        size, sha = actual[name]
        if size != entry["size"]:
            problems.append(f"{name}: size {size} != manifest {entry['size']}")
        elif sha != entry["sha256"]:
            problems.append(f"{name}: sha256 {sha[:12]}… != manifest {entry['sha256'][:12]}…")
    for name in sorted(set(actual) - set(listed) - set(RESERVED_NAMES)):
        problems.append(f"{name}: present but not in the manifest")
    if problems:
        raise BundleError(f"{bundle}: verification failed: " + "; ".join(problems))


def inspect_bundle(path: Path, *, key: Path | Any | None = None) -> BundleCheck:
    """Verify ``path`` completely (see the module docstring) and return what was checked.

    ``key``: an Ed25519 public key (PEM path or loaded key); the bundle must then carry a
    signature by that key over its manifest.
    """
    path = Path(path)
    public_key = None
    if key is not None:
        from edgepack.runtime.bundle.signing import as_public_key

        public_key = as_public_key(key)  # a bad key file fails before the bundle is read
    if path.is_dir():
        inside = sorted(p.name for p in path.glob(f"*{BUNDLE_SUFFIX}"))
        raise BundleError(f"{path} is a directory; pass the .edgepack file",
                          hint=f"it holds {', '.join(inside)}" if inside else
                          "`edgepack pack` writes RUN/bundles/<name>.edgepack")
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file", hint="check the path")
    actual: dict[str, tuple[int, str]] = {}
    kept_raw: dict[str, bytes] = {}
    reader: _HashingReader | None = None
    for member, fh, reader in _iter_members(path):
        size, sha, kept = _hash_stream(fh, member.name, keep=member.name in RESERVED_NAMES)
        if size != member.size:
            raise BundleError(f"{path.name}: member {member.name!r} is truncated ({size} of {member.size} bytes)")
        actual[member.name] = (size, sha)
        if kept is not None:
            kept_raw[member.name] = kept
    manifest_raw = kept_raw.get(MANIFEST_FILE)
    manifest = _parse_manifest(manifest_raw, path.name)
    signature = None
    if public_key is not None or SIGNATURE_FILE in kept_raw:
        from edgepack.runtime.bundle.signing import check_signature

        assert manifest_raw is not None  # _parse_manifest refuses a bundle without one
        signature = check_signature(kept_raw.get(SIGNATURE_FILE), manifest_raw, public_key, path.name)
    _compare(manifest, actual, path.name)
    assert reader is not None  # a manifest was found, so at least one member was read
    return BundleCheck(manifest=manifest, sha256=reader.digest.hexdigest(), size=reader.count, members=actual,
                       signature=signature)


def verify_bundle(path: Path, *, key: Path | Any | None = None) -> dict[str, Any]:
    """Verify a bundle (and its signature with ``key``); return its manifest.
    BundleError (naming the member) otherwise."""
    return inspect_bundle(path, key=key).manifest


def extract_bundle(path: Path, dest: Path, *, key: Path | Any | None = None,
                   verified: BundleCheck | None = None) -> Path:
    """Verify (with ``key``: the signature too), then extract into ``dest`` (which must not
    exist) via a staging folder.

    ``verified``: the caller's own :func:`inspect_bundle` of ``path`` (with the same key), so
    the bundle is not read a third time; extraction still re-hashes every member against it
    and re-checks the tar's form, so a file changed since that check is refused.
    """
    path, dest = Path(path), Path(dest)
    check = verified if verified is not None else inspect_bundle(path, key=key)
    if dest.exists():
        raise BundleError(f"{dest} already exists; extract into a new folder", hint="remove it or pick another")
    written: set[str] = set()
    with atomic_dir(dest) as staging:
        root = staging.resolve()
        for member, fh, _ in _iter_members(path):
            target = root.joinpath(*member.name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            if root not in target.parent.resolve().parents and target.parent.resolve() != root:
                raise BundleError(f"{path.name}: member {member.name!r} would land outside the staging folder")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as out:
                size, sha, _ = _hash_stream(fh, member.name, keep=False, sink=out.write)
            if check.members.get(member.name) != (size, sha):
                raise BundleError(f"{path.name}: {member.name} changed while it was being extracted")
            written.add(member.name)
        if written != set(check.members):
            raise BundleError(f"{path.name}: the bundle changed while it was being extracted")
    return dest


@dataclass(frozen=True)
class BundleFile:
    """One file to put in a bundle: its path inside the bundle and its source."""

    path: str
    source: Path | bytes


def _source_stats(src: Path | bytes) -> tuple[int, str]:
    if isinstance(src, bytes):
        return len(src), hashlib.sha256(src).hexdigest()
    with open(src, "rb") as fh:
        size, sha, _ = _hash_stream(fh, str(src), keep=False)
    return size, sha


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same inputs give the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_bundle(out: Path, manifest: dict[str, Any], files: list[BundleFile], *,
                 signer: Callable[[bytes], bytes] | None = None, key: Any = None) -> BundleCheck:
    """Write ``manifest`` (its ``files`` list filled in here) and ``files`` as a bundle.

    ``signer`` turns the manifest's bytes into the ``manifest.sig`` member (see
    :func:`edgepack.runtime.bundle.signing.sign_manifest`); ``key``, the matching public key, makes
    the final check verify that signature too. The tar is built beside ``out``, verified by
    :func:`inspect_bundle` and only then renamed to ``out``; a crash or a failed check leaves
    no file under the final name.
    """
    names = [f.path for f in files]
    for f in files:
        why = check_member_name(f.path)
        if why or f.path in RESERVED_NAMES or names.count(f.path) > 1:
            raise BundleError(f"cannot pack {f.path!r}: {why or 'duplicate or reserved name'}")
    manifest = dict(manifest)
    manifest[M_FILES] = [{"path": f.path, "size": s, "sha256": h}
                         for f, (s, h) in ((f, _source_stats(f.source)) for f in files)]
    _parse_manifest(json.dumps(manifest, default=str).encode(), Path(out).name)  # the reader's rules first
    manifest_bytes = (json.dumps(manifest, indent=2, default=str) + "\n").encode("utf-8")
    signature = signer(manifest_bytes) if signer is not None else None
    with atomic_path(Path(out)) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(MANIFEST_FILE, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            if signature is not None:
                tar.addfile(_tarinfo(SIGNATURE_FILE, len(signature)), io.BytesIO(signature))
            for f, entry in zip(files, manifest[M_FILES]):
                if isinstance(f.source, bytes):
                    tar.addfile(_tarinfo(f.path, entry["size"]), io.BytesIO(f.source))
                else:
                    with open(f.source, "rb") as fh:
                        tar.addfile(_tarinfo(f.path, entry["size"]), fh)
        check = inspect_bundle(tmp, key=key)
    return check
