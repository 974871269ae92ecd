"""Ed25519 signatures over a bundle's manifest: sign at pack time, check at verify and load time.

The manifest lists every file of the bundle with its size and sha256, so one signature over
the manifest's exact bytes covers every file: a swapped or added file fails the hash check
(which names it), and a manifest edited to match fails the signature. This is the shape of
OpenSSF model signing (a signed list of (path, digest) pairs), with a plain key pair instead
of Sigstore.

The signature is the bundle member ``manifest.sig`` (never listed in the manifest, which it
signs), a small JSON document::

    {"format": "edgepack-signature", "version": 1, "algorithm": "ed25519",
     "key_id": "<sha256 of the raw 32-byte public key>",
     "manifest_sha256": "<sha256 of manifest.json>", "signature": "<base64, 64 bytes>"}

The signed message is :data:`DOMAIN` followed by the manifest bytes, so a signature made for
anything else with the same key never verifies here. ``manifest_sha256`` only makes the
error precise ("manifest.json changed after signing" vs "signature does not verify").

Keys are PEM files: a PKCS#8 private key and a SubjectPublicKeyInfo public key, as written
by :func:`generate_keypair` (``edgepack keygen``) or by
``openssl genpkey -algorithm ed25519 -out k.pem && openssl pkey -in k.pem -pubout -out k.pub``.
``cryptography`` is imported only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.constants import MANIFEST_FILE, SIGNATURE_FILE
from edgepack.errors import BundleError, UsageError

DOMAIN = b"edgepack-bundle-manifest-v1\n"
SIGNATURE_FORMAT = "edgepack-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_FILE_BYTES = 16 * 1024


@dataclass(frozen=True)
class SignatureInfo:
    """What a bundle's ``manifest.sig`` says, and whether it was checked against a key."""

    key_id: str
    verified: bool
    """True only when a public key was given and the signature verified with it."""

    def describe(self) -> dict[str, Any]:
        return {"algorithm": ALGORITHM, "key_id": self.key_id, "verified": self.verified}


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise UsageError(f"{path}: too large for a {what} key file")
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} key file not found: {path}",
                         hint="create a key pair with `edgepack keygen NAME`") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} key {path}: {exc.strerror or exc}") from exc


def load_private_key(path: Path) -> Any:
    """The Ed25519 private key in PEM file ``path`` (unencrypted PKCS#8); UsageError otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, "private")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"{path}: the private key is encrypted; edgepack needs an unencrypted PEM key",
                         hint="decrypt it: openssl pkey -in KEY -out plain.pem") from None
    except (ValueError, UnicodeError) as exc:
        raise UsageError(f"{path}: not a PEM private key ({exc})",
                         hint="create one: `edgepack keygen NAME`, or `openssl genpkey -algorithm ed25519`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: a {type(key).__name__.removeprefix('_')} key, not Ed25519",
                         hint="bundles are signed with Ed25519: `openssl genpkey -algorithm ed25519`")
    return key


def load_public_key(path: Path) -> Any:
    """The Ed25519 public key in PEM file ``path``; UsageError otherwise (a private key is refused)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_key_file(path, "public")
    if b"PRIVATE KEY" in data:
        raise UsageError(f"{path} holds a private key; verify with the public key",
                         hint="derive it: openssl pkey -in KEY -pubout -out KEY.pub")
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnicodeError) as exc:
        raise UsageError(f"{path}: not a PEM public key ({exc})",
                         hint="pass the .pub file written by `edgepack keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path}: a {type(key).__name__.removeprefix('_')} key, not Ed25519")
    return key


def as_public_key(key: Path | str | Any) -> Any:
    """A loaded Ed25519 public key: read from a PEM path, or a key object passed through."""
    return load_public_key(Path(key)) if isinstance(key, (str, os.PathLike)) else key


def key_id(public_key: Any) -> str:
    """sha256 (hex) of the raw 32-byte Ed25519 public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def generate_keypair(out: Path) -> dict[str, str]:
    """Write ``OUT.key`` (private, mode 0600) and ``OUT.pub``; refuse to overwrite either."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                              PublicFormat)

    out = Path(out)
    private_path, public_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise UsageError(f"{p} already exists; not overwriting a key", hint="pick another name")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return {"private_key": str(private_path), "public_key": str(public_path), "key_id": key_id(key.public_key())}


def sign_manifest(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The ``manifest.sig`` member for ``manifest_bytes``."""
    doc = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "algorithm": ALGORITHM,
           "key_id": key_id(private_key.public_key()),
           "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
           "signature": base64.b64encode(private_key.sign(DOMAIN + manifest_bytes)).decode("ascii")}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def parse_signature(raw: bytes, bundle: str) -> dict[str, Any]:
    """The fields of a ``manifest.sig`` member; BundleError naming what is malformed."""
    where = f"{bundle}: {SIGNATURE_FILE}"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also: nesting too deep, an int past 4300 digits
        raise BundleError(f"{where} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise BundleError(f"{where} is not an edgepack signature")
    if doc.get("version") != SIGNATURE_VERSION or doc.get("algorithm") != ALGORITHM:
        raise BundleError(f"{where}: unsupported signature version {doc.get('version')!r} / algorithm "
                          f"{doc.get('algorithm')!r} (this edgepack reads version {SIGNATURE_VERSION}, {ALGORITHM})",
                          hint="upgrade edgepack")
    for field in ("key_id", "manifest_sha256", "signature"):
        if not isinstance(doc.get(field), str):
            raise BundleError(f"{where}: '{field}' is missing or not a string")
    try:
        doc["signature_bytes"] = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise BundleError(f"{where}: the signature is not valid base64") from None
    if len(doc["signature_bytes"]) != 64:
        raise BundleError(f"{where}: an Ed25519 signature is 64 bytes, not {len(doc['signature_bytes'])}")
    return doc


def check_signature(raw_signature: bytes | None, manifest_bytes: bytes, public_key: Any | None,
                    bundle: str) -> SignatureInfo | None:
    """Check ``manifest.sig`` against the manifest (and ``public_key`` when given).

    No signature and no key: None. No signature but a key: BundleError (unsigned when a
    signature is required). A signature without a key is parsed and reported unverified.
    """
    if raw_signature is None:
        if public_key is not None:
            raise BundleError(f"{bundle}: unsigned bundle, but a public key was given: a signature is required "
                              f"(no {SIGNATURE_FILE} member)",
                              hint="ask for a bundle packed with `edgepack pack --sign KEY`, or drop --key")
        return None
    doc = parse_signature(raw_signature, bundle)
    if public_key is None:
        return SignatureInfo(key_id=doc["key_id"], verified=False)
    from cryptography.exceptions import InvalidSignature

    expected = key_id(public_key)
    if doc["key_id"] != expected:
        raise BundleError(f"{bundle}: signed by key {doc['key_id'][:16]}…, not by the given key {expected[:16]}…",
                          hint="verify with the public key of whoever packed the bundle")
    actual_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if actual_sha != doc["manifest_sha256"]:
        raise BundleError(f"{bundle}: {MANIFEST_FILE} changed after signing (sha256 {actual_sha[:12]}… != "
                          f"signed {doc['manifest_sha256'][:12]}…); the whole bundle is refused")
    try:
        public_key.verify(doc["signature_bytes"], DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{bundle}: invalid signature: {SIGNATURE_FILE} does not verify over {MANIFEST_FILE} "
                          "with the given key; the whole bundle is refused") from None
    return SignatureInfo(key_id=expected, verified=True)
