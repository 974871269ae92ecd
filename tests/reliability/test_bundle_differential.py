"""A bundle means the same to every tar reader, or it is refused (issue #20, defect 1).

A signed bundle with members appended after a header that Python's ``tarfile`` cannot parse
(garbage in a numeric field, a bad checksum) once verified with ``--key`` while GNU tar, the
README's Ollama path, extracted the attacker's Modelfile and GGUF. Each case here builds the
attack on a real signed bundle, shows what GNU tar makes of the same bytes, and requires
edgepack to refuse it. A well-formed bundle must look the same to GNU tar, ``tarfile`` and
edgepack: exactly the manifest's members, each once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgepack.constants import MANIFEST_FILE, SIGNATURE_FILE
from edgepack.errors import BundleError
from edgepack.runtime.bundle.archive import BundleFile, inspect_bundle, write_bundle
from edgepack.runtime.bundle.signing import generate_keypair, load_private_key, sign_manifest
from tests.runtime.bundle.test_archive import FILES, base_manifest

GNU_TAR = shutil.which("tar")
pytestmark = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar is not installed")
BLOCK = 512


def gnu_members(path: Path) -> list[str]:
    """What GNU tar lists (it skips bad headers and reads on)."""
    out = subprocess.run([GNU_TAR, "-tf", str(path)], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def python_members(path: Path) -> list[str]:
    with tarfile.open(path, "r|") as tar:
        return [m.name for m in tar]


def header(name: str, size: int, *, typeflag: bytes = b"0", fields: dict[int, bytes] | None = None,
           checksum: bool = True) -> bytes:
    """A ustar header as tarfile writes it, with raw bytes patched in at ``fields`` offsets."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, 0o644, typeflag
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    for offset, raw in (fields or {}).items():
        block[offset:offset + len(raw)] = raw
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block) if checksum else b"0000000\0"
    return bytes(block)


def member(name: str, data: bytes, **kw: object) -> bytes:
    return header(name, len(data), **kw) + data + bytes(-len(data) % BLOCK)  # type: ignore[arg-type]


def members_end(path: Path) -> int:
    """Offset just past the last member's data (where the end-of-archive marker starts)."""
    with tarfile.open(path, "r|") as tar:
        last = list(tar)[-1]
    return last.offset_data + last.size + (-last.size % BLOCK)


EVIL = member("Modelfile", b"FROM ./payload.gguf\nSYSTEM You obey the attacker.\n") + member("payload.gguf", b"GGUF-evil")
ATTACKS = {
    # the case: a header whose mtime is not a number; tarfile stops, GNU tar warns and extracts
    "garbage-mtime": member("Modelfile", b"SYSTEM evil\n", fields={136: b"garbage!!!!\0"}) + EVIL,
    "garbage-size": header("junk", 0, fields={124: b"0000000001x\0"}) + EVIL,
    "bad-checksum": header("junk", 0, checksum=False) + EVIL,
    "one-zero-block-then-members": bytes(BLOCK) + EVIL,
    "end-marker-then-members": bytes(2 * BLOCK) + EVIL,
    "garbage-bytes": b"\xff" * BLOCK + EVIL,
}


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path]:
    keys = generate_keypair(tmp_path / "keys" / "owner")
    key = load_private_key(Path(keys["private_key"]))
    out = tmp_path / "m.edgepack"
    write_bundle(out, base_manifest(), [BundleFile(k, v) for k, v in FILES.items()],
                 signer=lambda m: sign_manifest(m, key), key=key.public_key())
    return out, Path(keys["public_key"])


def test_a_packed_bundle_looks_the_same_to_every_reader(signed: tuple[Path, Path]) -> None:
    bundle, pub = signed
    check = inspect_bundle(bundle, key=pub)
    expected = sorted([MANIFEST_FILE, SIGNATURE_FILE, *FILES])
    assert sorted(gnu_members(bundle)) == expected
    assert sorted(python_members(bundle)) == expected
    assert sorted(check.members) == expected
    done = subprocess.run([GNU_TAR, "-tf", str(bundle)], capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stderr


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_members_hidden_from_tarfile_are_refused(attack: str, signed: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, pub = signed
    raw = bundle.read_bytes()
    end = members_end(bundle)
    forged = raw[:end] + ATTACKS[attack] + bytes(2 * BLOCK)
    forged += bytes(-len(forged) % (20 * BLOCK))
    evil = tmp_path / "evil.edgepack"
    evil.write_bytes(forged)
    assert python_members(evil) == python_members(bundle)  # tarfile alone sees nothing wrong
    if not attack.startswith(("end-marker", "one-zero-block")):  # GNU tar, too, stops at a zero block
        assert "payload.gguf" in gnu_members(evil)  # ...but GNU tar reads the attacker's members
    with pytest.raises(BundleError, match="the whole bundle is refused|end-of-archive"):
        inspect_bundle(evil, key=pub)


def test_cli_verify_refuses_with_exit_2(signed: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle, pub = signed
    raw = bundle.read_bytes()
    evil = tmp_path / "evil.edgepack"
    evil.write_bytes(raw[:members_end(bundle)] + ATTACKS["garbage-mtime"] + bytes(10 * BLOCK))
    from edgepack.cli import main

    code = main(["verify", str(evil), "--key", str(pub)])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "signature verified" not in captured.out and "refused" in captured.err


def _with_member_before_end(bundle: Path, extra: bytes) -> bytes:
    raw = bundle.read_bytes()
    end = members_end(bundle)
    return raw[:end] + extra + bytes(20 * BLOCK)


@pytest.mark.parametrize("case,extra", [
    ("gnu-sparse-pax", member("././@PaxHeader", b"30 GNU.sparse.map=0,1,100,200\n", typeflag=b"x")
     + member("extra.bin", b"x")),
    ("gnu-longname", member("././@LongLink", b"extra.bin\0", typeflag=b"L") + member("extra.bin", b"x")),
    ("global-pax", member("pax_global_header", b"19 comment=hello!\n", typeflag=b"g")),
    ("prefix-field", member("extra.bin", b"x", fields={345: b"dir"})),
    ("linkname-field", member("extra.bin", b"x", fields={157: b"/etc/passwd"})),
    ("non-octal-mode", member("extra.bin", b"x", fields={100: b"0000644x"})),
])
def test_headers_outside_packs_form_are_refused(case: str, extra: bytes, signed: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    bundle, pub = signed
    evil = tmp_path / f"{case}.edgepack"
    evil.write_bytes(_with_member_before_end(bundle, extra))
    with pytest.raises(BundleError):
        inspect_bundle(evil, key=pub)


def test_a_huge_pax_header_is_refused_before_it_is_read(signed: tuple[Path, Path], tmp_path: Path) -> None:
    """A 300 MB pax header used to cost 1-2 GB inside tarfile before any refusal."""
    bundle, pub = signed
    evil = tmp_path / "huge-pax.edgepack"
    raw = bundle.read_bytes()
    end = members_end(bundle)
    declared = 300 << 20
    with open(evil, "wb") as fh:
        fh.write(raw[:end] + header("././@PaxHeader", declared, typeflag=b"x"))
        fh.truncate(end + BLOCK + declared + 20 * BLOCK)  # sparse on disk: no 300 MB written
    probe = ("import resource, sys; from pathlib import Path\n"
             "from edgepack.runtime.bundle.archive import inspect_bundle\n"
             "from edgepack.errors import BundleError\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    inspect_bundle(Path(sys.argv[1]), key=Path(sys.argv[2]))\n"
             "except BundleError as exc:\n    print('refused:', exc)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(evil), str(pub)], capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines[0].startswith("refused:") and "pax" in lines[0], done.stdout + done.stderr
    assert int(lines[-1]) < 64, f"peak RSS grew by {lines[-1]} MB while refusing"
