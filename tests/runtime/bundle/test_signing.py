"""Signed bundles: Ed25519 over the manifest; every tamper is refused and named.

Keys are real Ed25519 keys made per test (``edgepack keygen``'s function, and openssl where
it is installed); tampered bundles are rebuilt member by member with tarfile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import MANIFEST_FILE, MANIFEST_SCHEMA_VERSION, SIGNATURE_FILE
from edgepack.errors import BundleError, UsageError
from edgepack.runtime.bundle.archive import BundleFile, extract_bundle, inspect_bundle, verify_bundle, write_bundle
from edgepack.runtime.bundle.signing import (DOMAIN, generate_keypair, key_id, load_private_key, load_public_key,
                                      sign_manifest)
from tests.runtime.helpers import tar_member, write_tar

FILES = {"model.gguf": b"GGUF" + bytes(range(256)) * 40, "README.md": b"# hi\n", "tokenizer/tokenizer.json": b"{}"}


def base_manifest() -> dict[str, Any]:
    return {"schema_version": MANIFEST_SCHEMA_VERSION, "model": "m", "format": "gguf", "quant": "Q8_0",
            "profile": {"name": "p"}, "entrypoint": "model.gguf", "files": [], "gate_status": "PASS"}


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two real key pairs: ``owner`` signs, ``other`` is someone else."""
    owner = generate_keypair(tmp_path / "keys" / "owner")
    other = generate_keypair(tmp_path / "keys" / "other")
    return {"priv": Path(owner["private_key"]), "pub": Path(owner["public_key"]),
            "other_priv": Path(other["private_key"]), "other_pub": Path(other["public_key"])}


def signed_bundle(path: Path, private: Path, files: dict[str, bytes] = FILES) -> Path:
    key = load_private_key(private)
    write_bundle(path, base_manifest(), [BundleFile(k, v) for k, v in files.items()],
                 signer=lambda m: sign_manifest(m, key), key=key.public_key())
    return path


@pytest.fixture()
def bundle(tmp_path: Path, keys: dict[str, Path]) -> Path:
    return signed_bundle(tmp_path / "m.edgepack", keys["priv"])


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def rebuild(dst: Path, contents: dict[str, bytes]) -> Path:
    return write_tar(dst, [tar_member(name, data) for name, data in contents.items()])


def edited_manifest(contents: dict[str, bytes], **changes: Any) -> bytes:
    manifest = json.loads(contents[MANIFEST_FILE])
    manifest.update(changes)
    return (json.dumps(manifest, indent=2) + "\n").encode()


# --- the good path ----------------------------------------------------------------------------

def test_signed_bundle_verifies_with_its_key(bundle: Path, keys: dict[str, Path]) -> None:
    contents = members(bundle)
    assert list(contents)[:2] == [MANIFEST_FILE, SIGNATURE_FILE]
    sig = json.loads(contents[SIGNATURE_FILE])
    public = load_public_key(keys["pub"])
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == key_id(public)
    assert sig["manifest_sha256"] == hashlib.sha256(contents[MANIFEST_FILE]).hexdigest()
    public.verify(base64.b64decode(sig["signature"]), DOMAIN + contents[MANIFEST_FILE])  # raises if not
    assert SIGNATURE_FILE not in {f["path"] for f in json.loads(contents[MANIFEST_FILE])["files"]}

    check = inspect_bundle(bundle, key=keys["pub"])
    assert check.signature is not None and check.signature.verified and check.signature.key_id == sig["key_id"]
    unchecked = inspect_bundle(bundle)  # no key: the signature is reported, not trusted
    assert unchecked.signature is not None and not unchecked.signature.verified


def test_key_id_is_the_sha256_of_the_raw_public_key(keys: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = load_public_key(keys["pub"])
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert len(raw) == 32 and key_id(public) == hashlib.sha256(raw).hexdigest()
    assert oct(keys["priv"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UsageError, match="already exists"):
        generate_keypair(keys["priv"].with_suffix(""))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_keys_made_by_openssl_work(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(priv)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)], check=True)
    bundle = signed_bundle(tmp_path / "o.edgepack", priv)
    assert inspect_bundle(bundle, key=pub).signature.verified  # type: ignore[union-attr]


def test_signed_bundle_extracts(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    out = extract_bundle(bundle, tmp_path / "out", key=keys["pub"])
    assert (out / "model.gguf").read_bytes() == FILES["model.gguf"] and (out / SIGNATURE_FILE).is_file()


# --- tampering --------------------------------------------------------------------------------

def test_unsigned_bundle_is_refused_when_a_key_is_given(tmp_path: Path, keys: dict[str, Path]) -> None:
    plain = tmp_path / "plain.edgepack"
    write_bundle(plain, base_manifest(), [BundleFile(k, v) for k, v in FILES.items()])
    assert verify_bundle(plain)["model"] == "m"  # fine without --key
    with pytest.raises(BundleError, match="unsigned bundle, but a public key was given"):
        verify_bundle(plain, key=keys["pub"])
    with pytest.raises(BundleError, match="unsigned"):
        extract_bundle(plain, tmp_path / "out", key=keys["pub"])
    assert not (tmp_path / "out").exists()


def test_stripped_signature_is_unsigned(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle)
    del contents[SIGNATURE_FILE]
    with pytest.raises(BundleError, match="unsigned bundle"):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents), key=keys["pub"])


def test_wrong_key(bundle: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="signed by key .*, not by the given key"):
        verify_bundle(bundle, key=keys["other_pub"])


def test_manifest_changed_after_signing(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle)
    contents[MANIFEST_FILE] = edited_manifest(contents, gate_status="PASS", quant="F16")
    bad = rebuild(tmp_path / "x.edgepack", contents)
    verify_bundle(bad)  # hashes alone still agree: only the signature catches this
    with pytest.raises(BundleError, match="manifest.json changed after signing"):
        verify_bundle(bad, key=keys["pub"])


def test_forged_signature_document(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    """The attacker edits the manifest and updates the digest in manifest.sig to match."""
    contents = members(bundle)
    contents[MANIFEST_FILE] = edited_manifest(contents, gate_status="PASS", model="evil")
    sig = json.loads(contents[SIGNATURE_FILE])
    sig["manifest_sha256"] = hashlib.sha256(contents[MANIFEST_FILE]).hexdigest()
    contents[SIGNATURE_FILE] = json.dumps(sig).encode()
    with pytest.raises(BundleError, match="invalid signature"):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents), key=keys["pub"])


def test_corrupted_signature_bytes(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle)
    sig = json.loads(contents[SIGNATURE_FILE])
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 1
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    contents[SIGNATURE_FILE] = json.dumps(sig).encode()
    with pytest.raises(BundleError, match="invalid signature"):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents), key=keys["pub"])


@pytest.mark.parametrize("doc, message", [
    (b"not json", "not valid JSON"),
    (b'{"format": "other"}', "not an edgepack signature"),
    (b'{"format": "edgepack-signature", "version": 9, "algorithm": "ed25519"}', "unsupported signature version"),
    (b'{"format": "edgepack-signature", "version": 1, "algorithm": "ed25519", "key_id": "x", '
     b'"manifest_sha256": "y", "signature": "!!"}', "not valid base64"),
    (b'{"format": "edgepack-signature", "version": 1, "algorithm": "ed25519", "key_id": "x", '
     b'"manifest_sha256": "y", "signature": "AAAA"}', "64 bytes"),
])
def test_malformed_signature_member(bundle: Path, tmp_path: Path, doc: bytes, message: str) -> None:
    contents = members(bundle)
    contents[SIGNATURE_FILE] = doc
    with pytest.raises(BundleError, match=message):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents))  # refused even without a key


def test_resigned_by_an_attacker(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle)
    contents[MANIFEST_FILE] = edited_manifest(contents, model="evil")
    contents[SIGNATURE_FILE] = sign_manifest(contents[MANIFEST_FILE], load_private_key(keys["other_priv"]))
    bad = rebuild(tmp_path / "x.edgepack", contents)
    assert inspect_bundle(bad, key=keys["other_pub"]).signature.verified  # type: ignore[union-attr]
    with pytest.raises(BundleError, match="not by the given key"):
        verify_bundle(bad, key=keys["pub"])


def test_swapped_file_is_named(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle)
    contents["model.gguf"] = b"GGUF" + os.urandom(len(FILES["model.gguf"]) - 4)
    with pytest.raises(BundleError, match=r"model\.gguf: sha256"):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents), key=keys["pub"])


def test_swapped_file_with_a_matching_manifest(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    """Swap the weights and fix their hash in the manifest: the signature no longer holds."""
    contents = members(bundle)
    evil = b"GGUF" + os.urandom(100)
    contents["model.gguf"] = evil
    manifest = json.loads(contents[MANIFEST_FILE])
    for entry in manifest["files"]:
        if entry["path"] == "model.gguf":
            entry.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    contents[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
    bad = rebuild(tmp_path / "x.edgepack", contents)
    verify_bundle(bad)  # self-consistent without a key
    with pytest.raises(BundleError, match="changed after signing"):
        verify_bundle(bad, key=keys["pub"])


def test_added_file_is_named(bundle: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    contents = members(bundle) | {"payload.sh": b"rm -rf /"}
    with pytest.raises(BundleError, match="payload.sh: present but not in the manifest"):
        verify_bundle(rebuild(tmp_path / "x.edgepack", contents), key=keys["pub"])


def test_manifest_may_not_list_the_signature(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="reserved"):
        write_bundle(tmp_path / "x.edgepack", base_manifest(), [BundleFile("model.gguf", b"x"),
                                                                  BundleFile(SIGNATURE_FILE, b"{}")])


# --- key files ----------------------------------------------------------------------------------

def test_bad_key_files(keys: dict[str, Path], tmp_path: Path, bundle: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    with pytest.raises(UsageError, match="holds a private key"):
        verify_bundle(bundle, key=keys["priv"])
    with pytest.raises(UsageError, match="not found"):
        verify_bundle(bundle, key=tmp_path / "nope.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(UsageError, match="not a PEM public key"):
        verify_bundle(bundle, key=tmp_path / "junk.pub")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(UsageError, match="not Ed25519"):
        load_private_key(tmp_path / "ec.pem")


def test_open_model_checks_the_signature(tmp_path: Path, keys: dict[str, Path], tiny_gguf: Path,
                                         cache_dir: Path) -> None:
    from edgepack.runtime.session import open_model

    manifest = base_manifest() | {"entrypoint": "tiny-F16.gguf", "runtime": {"context_length": 128, "threads": 1}}
    key = load_private_key(keys["priv"])
    signed = tmp_path / "s.edgepack"
    write_bundle(signed, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)], signer=lambda m: sign_manifest(m, key))
    with open_model(signed, key=keys["pub"]) as session:
        assert session.complete([{"role": "user", "content": "hi"}], max_tokens=2) is not None
    with pytest.raises(BundleError, match="not by the given key"):
        with open_model(signed, key=keys["other_pub"]):
            pass
    with pytest.raises(UsageError, match="not a bundle"):
        with open_model(tiny_gguf, key=keys["pub"]):
            pass


def test_cli_keygen_sign_verify(tmp_path: Path) -> None:
    env = dict(os.environ)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    made = cli("keygen", str(tmp_path / "k"), "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    bundle = signed_bundle(tmp_path / "m.edgepack", Path(info["private_key"]))
    ok = cli("verify", str(bundle), "--key", info["public_key"], "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["signature"] == {"algorithm": "ed25519", "key_id": info["key_id"], "verified": True}

    contents = members(bundle)
    contents[MANIFEST_FILE] = edited_manifest(contents, model="evil")
    bad = rebuild(tmp_path / "bad.edgepack", contents)
    refused = cli("verify", str(bad), "--key", info["public_key"])
    assert refused.returncode == 2 and "changed after signing" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) <= 2  # error + hint


def test_gate_checks_the_signature_before_measuring(tmp_path: Path, keys: dict[str, Path], bundle: Path) -> None:
    from edgepack.profiles import load_profile
    from edgepack.export.gate.gate import run_gate

    profile = load_profile("cpu-x86-2c")
    plain = tmp_path / "plain.edgepack"
    write_bundle(plain, base_manifest(), [BundleFile(k, v) for k, v in FILES.items()])
    with pytest.raises(BundleError, match="unsigned bundle"):
        run_gate(artifact=plain, profile=profile, holdout=None, key=keys["pub"])
    with pytest.raises(BundleError, match="not by the given key"):
        run_gate(artifact=bundle, profile=profile, holdout=None, key=keys["other_pub"])
    with pytest.raises(UsageError, match="not a .edgepack bundle"):
        run_gate(artifact=tmp_path, profile=profile, holdout=None, key=keys["pub"])
