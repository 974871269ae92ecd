"""Forged bundles and tampered caches for the bundle-trust family (tests and bench).

A forged bundle is a real, loadable tiny-GGUF bundle whose ``manifest.json`` says whatever the
caller wants (a 10^6-token context, a 1-byte memory estimate, 4096 threads, ...) and is then
signed with a test key, so verification, signature included, passes: the attack is a bundle
whose packer (or whoever holds the key) lies, not one that fails its hashes. The tar is
written here directly, not through ``write_bundle``, so values the manifest schema refuses can
be tried against the reader too.

Cache tampering edits the extraction cache of a bundle in place (bytes flipped, truncated,
replaced by a symlink, extra files), optionally restoring the modification time, the way an
attacker with write access to ``~/.cache/edgepack`` would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.constants import MANIFEST_FILE, MANIFEST_SCHEMA_VERSION, SIGNATURE_FILE

HONEST_CTX = 256


def make_keys(folder: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair under ``folder``: (private PEM, public PEM)."""
    from edgepack.runtime.bundle.signing import generate_keypair

    made = generate_keypair(Path(folder) / "trust-test")
    return Path(made["private_key"]), Path(made["public_key"])


def honest_runtime(model: Path, ctx: int = HONEST_CTX) -> dict[str, Any]:
    """The ``runtime`` section ``pack`` would write for ``model`` at context ``ctx``."""
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.memory import estimate_gguf_memory

    return {"backend": "llama.cpp", "context_length": ctx, "threads": 1, "device": "cpu",
            "memory_estimate": estimate_gguf_memory(read_gguf(model), ctx)}


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = len(data), 0o644, 0, tarfile.REGTYPE
    return info, data


def forge_bundle(out: Path, model: Path, *, runtime: dict[str, Any] | None = None, private_key: Path | None = None,
                 **top: Any) -> Path:
    """A bundle of GGUF ``model`` whose manifest carries ``runtime`` (merged over the honest
    one; a value of ``...`` deletes the key) and any top-level overrides, signed with
    ``private_key`` when given."""
    data = Path(model).read_bytes()
    rt = honest_runtime(model)
    for key, value in (runtime or {}).items():
        if value is ...:
            rt.pop(key, None)
        else:
            rt[key] = value
    manifest: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA_VERSION, "model": "forged", "format": "gguf", "quant": "F16",
        "profile": {"name": "forged"}, "entrypoint": model.name, "gate_status": "PASS",
        "files": [{"path": model.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
        "runtime": rt,
    }
    manifest.update(top)
    raw = (json.dumps(manifest, indent=2) + "\n").encode()
    members = [_member(MANIFEST_FILE, raw)]
    if private_key is not None:
        from edgepack.runtime.bundle.signing import load_private_key, sign_manifest

        members.append(_member(SIGNATURE_FILE, sign_manifest(raw, load_private_key(private_key))))
    members.append(_member(model.name, data))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload))
    return Path(out)


# --- cache tampering ------------------------------------------------------------------------

def cached_folder(cache: Path, bundle: Path) -> Path:
    """Where ``open_model`` extracts ``bundle`` under cache root ``cache``."""
    return Path(cache) / "bundles" / hashlib.sha256(Path(bundle).read_bytes()).hexdigest()


def _keep_mtime(path: Path, edit: Callable[[], None]) -> None:
    st = os.lstat(path)
    edit()
    if path.exists() and not path.is_symlink():
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_byte(path: Path, offset: int, *, restore_mtime: bool = True) -> None:
    """XOR one byte at ``offset`` (negative: from the end), size unchanged."""
    def edit() -> None:
        with open(path, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(offset % size)
            byte = fh.read(1)
            fh.seek(offset % size)
            fh.write(bytes([byte[0] ^ 0x5A]))

    _keep_mtime(path, edit) if restore_mtime else edit()


def truncate(path: Path, keep: int, *, restore_mtime: bool = True) -> None:
    """Cut ``path`` to ``keep`` bytes."""
    def edit() -> None:
        os.truncate(path, keep)

    _keep_mtime(path, edit) if restore_mtime else edit()


def replace_with_symlink(path: Path, target: Path) -> None:
    """Swap ``path`` for a symbolic link to ``target`` (same name, other bytes behind it)."""
    path.unlink()
    os.symlink(target, path)


def tamper_variants(gguf_size: int, data_offset: int) -> list[tuple[str, dict[str, Any]]]:
    """Named tampering recipes for the cached GGUF: flips at several offsets, truncations."""
    offsets = sorted({0, 4, 8, 64, data_offset - 1, data_offset, data_offset + 1,
                      (data_offset + gguf_size) // 2, gguf_size - 1})
    out: list[tuple[str, dict[str, Any]]] = []
    for off in offsets:
        if 0 <= off < gguf_size:
            out.append((f"flip byte {off}, mtime restored", {"op": "flip", "offset": off, "restore": True}))
    out.append((f"flip byte {data_offset + 7}, mtime changed", {"op": "flip", "offset": data_offset + 7,
                                                                "restore": False}))
    for keep in (0, 16, data_offset, gguf_size - 1):
        out.append((f"truncate to {keep} bytes, mtime restored", {"op": "truncate", "keep": keep, "restore": True}))
    out.append(("file replaced by a symlink to a patched copy", {"op": "symlink"}))
    out.append(("file replaced by a symlink to an identical copy", {"op": "symlink-same"}))
    out.append(("extra file added beside the model", {"op": "extra"}))
    out.append(("model file deleted", {"op": "delete"}))
    out.append(("completion marker removed", {"op": "unmark"}))
    out.append(("cache folder replaced by a symlink to a patched copy", {"op": "folder-symlink"}))
    return out


def apply_tamper(folder: Path, model_name: str, recipe: dict[str, Any], scratch: Path) -> None:
    """Apply one :func:`tamper_variants` recipe to the cache folder ``folder``."""
    import shutil

    model = folder / model_name
    op = recipe["op"]
    if op == "flip":
        flip_byte(model, recipe["offset"], restore_mtime=recipe["restore"])
    elif op == "truncate":
        truncate(model, recipe["keep"], restore_mtime=recipe["restore"])
    elif op in ("symlink", "symlink-same"):
        scratch.mkdir(parents=True, exist_ok=True)
        copy = scratch / f"outside-{model_name}"
        shutil.copyfile(model, copy)
        if op == "symlink":
            flip_byte(copy, -1)
        replace_with_symlink(model, copy)
    elif op == "extra":
        (folder / "chat_template.jinja").write_text("{{ 'injected' }}")
    elif op == "delete":
        model.unlink()
    elif op == "unmark":
        (folder / ".complete").unlink()
    elif op == "folder-symlink":
        scratch.mkdir(parents=True, exist_ok=True)
        copy = scratch / "outside-folder"
        shutil.copytree(folder, copy, symlinks=True)
        flip_byte(copy / model_name, -1)
        shutil.rmtree(folder)
        os.symlink(copy, folder)
    else:
        raise ValueError(f"unknown tamper op {op!r}")
