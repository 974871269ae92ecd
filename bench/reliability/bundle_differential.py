"""Bundle differential: mutated signed bundles read by edgepack, Python's tarfile and GNU tar.

Imported by run.py (category ``bundle-differential``); also runnable on its own::

    .venv/bin/python bench/reliability/bundle_differential.py [--cases 600]

Each case mutates a real signed bundle (flipped header bytes with and without a fixed
checksum, members appended after garbage headers, zero blocks or junk, injected pax records,
padding changes). A failure is a bundle that ``inspect_bundle(key=...)`` accepts while GNU tar
lists other members, exits non-zero, or extracts bytes that differ from the manifest's hashes,
or any error from edgepack other than a clean BundleError.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 512


def _header(name: str, size: int, typeflag: bytes = b"0") -> bytearray:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, 0o644, typeflag
    return bytearray(info.tobuf(tarfile.USTAR_FORMAT))


def _fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _member(name: str, data: bytes, typeflag: bytes = b"0") -> bytes:
    block = _header(name, len(data), typeflag)
    _fix_checksum(block)
    return bytes(block) + data + bytes(-len(data) % BLOCK)


def _layout(raw: bytes) -> tuple[list[int], int]:
    """Header offsets and the end of the last member of a well-formed tar."""
    import io

    offsets, end = [], 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        for m in tar:
            offsets.append(m.offset)
            end = m.offset_data + m.size + (-m.size % BLOCK)
    return offsets, end


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    offsets, end = _layout(raw)
    kind = rng.choice(["header-byte", "header-byte-fixed", "append-after-garbage", "append-after-zero",
                       "pax-inject", "padding", "insert-member"])
    evil = _member("Modelfile", b"SYSTEM attacker\n") + _member("payload.gguf", rng.randbytes(rng.randint(1, 900)))
    if kind in ("header-byte", "header-byte-fixed"):
        at = rng.choice(offsets)
        block = bytearray(raw[at:at + BLOCK])
        block[rng.randrange(BLOCK)] = rng.randrange(256)
        if kind == "header-byte-fixed":
            _fix_checksum(block)
        return kind, raw[:at] + bytes(block) + raw[at + BLOCK:]
    if kind == "append-after-garbage":
        block = _header("junk", 0)
        field = rng.choice([(100, 8), (108, 8), (124, 12), (136, 12), (257, 8), (156, 1)])
        block[field[0]:field[0] + field[1]] = rng.randbytes(field[1])
        if rng.random() < 0.7:
            _fix_checksum(block)
        body = bytes(block) + evil
    elif kind == "append-after-zero":
        body = bytes(BLOCK * rng.randint(1, 3)) + evil
    elif kind == "pax-inject":
        key = rng.choice(["GNU.sparse.map", "GNU.sparse.size", "linkpath", "path", "size", "comment", "uid",
                          "SCHILY.xattr.user.x", "hdrcharset"])
        value = rng.choice(["0,1,100,200", "../../etc/x", "9999999999", "Modelfile", "x" * rng.randint(1, 200)])
        record = f"{key}={value}\n"
        n = len(record) + 3
        n += len(str(n)) - 2
        body = _member("././@PaxHeader", f"{n} {record}".encode(), b"x") + _member("Modelfile", b"SYSTEM attacker\n")
    elif kind == "padding":
        tail = len(raw) - end
        keep = rng.choice([0, BLOCK, 2 * BLOCK, tail + BLOCK * rng.randint(1, 30), tail])
        return kind, raw[:end] + bytes(keep)
    else:  # insert-member: a new member between two real ones
        at = rng.choice(offsets[1:] or offsets)
        return kind, raw[:at] + _member("extra.bin", rng.randbytes(10)) + raw[at:]
    return kind, raw[:end] + body + bytes(20 * BLOCK)


def gnu_view(path: Path, work: Path) -> tuple[int, list[str], dict[str, str]]:
    """GNU tar's exit code, member list and sha256 of what it extracts."""
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, timeout=60)
    dest = work / "gnu-x"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(dest), "--no-same-owner"], capture_output=True, timeout=60)
    hashes = {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in dest.rglob("*") if p.is_file()}
    return listed.returncode, listed.stdout.split(), hashes


def bundle_differential_category(work: Path, cases: int = 600, seed: int = 0) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from edgepack.constants import MANIFEST_FILE, SIGNATURE_FILE
    from edgepack.errors import BundleError
    from edgepack.runtime.bundle.archive import BundleFile, inspect_bundle, write_bundle
    from edgepack.runtime.bundle.signing import generate_keypair, load_private_key, sign_manifest

    work.mkdir(parents=True, exist_ok=True)
    keys = generate_keypair(work / "keys" / "owner")
    key = load_private_key(Path(keys["private_key"]))
    pub = Path(keys["public_key"])
    files = {"model.gguf": b"GGUF" + bytes(range(256)) * 40, "Modelfile": b"FROM ./model.gguf\nSYSTEM good\n",
             "tokenizer/tokenizer.json": b"{}"}
    manifest = {"schema_version": 1, "model": "m", "format": "gguf", "quant": "Q8_0", "profile": {"name": "p"},
                "entrypoint": "model.gguf", "files": [], "gate_status": "PASS"}
    good = work / "good.edgepack"
    write_bundle(good, manifest, [BundleFile(k, v) for k, v in files.items()],
                 signer=lambda m: sign_manifest(m, key), key=key.public_key())
    raw = good.read_bytes()
    rng = random.Random(seed)
    t0 = time.monotonic()
    kinds: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    gnu_saw_more = 0
    # the unmutated bundle: all three readers agree
    rc, names, _ = gnu_view(good, work)
    expected = sorted([MANIFEST_FILE, SIGNATURE_FILE, *files])
    if rc != 0 or sorted(names) != expected or sorted(inspect_bundle(good, key=pub).members) != expected:
        failures.append(f"the unmutated bundle: GNU tar rc {rc}, members {names}")
    for i in range(cases):
        kind, data = mutate(raw, rng)
        c = kinds.setdefault(kind, {"tried": 0, "refused": 0, "accepted": 0})
        c["tried"] += 1
        path = work / "case.edgepack"
        path.write_bytes(data)
        try:
            check = inspect_bundle(path, key=pub)
        except BundleError:
            c["refused"] += 1
            rc, names, _ = gnu_view(path, work)
            gnu_saw_more += bool(set(names) - set(expected))
            continue
        except Exception as exc:  # noqa: BLE001 - any other error is a finding
            failures.append(f"case {i} ({kind}): {type(exc).__name__}: {str(exc)[:160]}")
            continue
        c["accepted"] += 1
        rc, names, hashes = gnu_view(path, work)
        want = {name: sha for name, (_, sha) in check.members.items()}
        if rc != 0 or sorted(names) != sorted(check.members) or hashes != want:
            failures.append(f"case {i} ({kind}): accepted, but GNU tar rc {rc} lists {names}")
    details = [f"{k}: {v['tried']} tried, {v['refused']} refused, {v['accepted']} accepted (and read identically by GNU tar)"
               for k, v in sorted(kinds.items())]
    details.append(f"refused bundles in which GNU tar found members the manifest does not list: {gnu_saw_more}")
    return {"tried": cases + 1, "faults": cases, "failures": len(failures), "failure_list": failures,
            "details": details, "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=600)
    args = ap.parse_args()
    print(json.dumps(bundle_differential_category(Path(tempfile.mkdtemp()), args.cases), indent=1))
