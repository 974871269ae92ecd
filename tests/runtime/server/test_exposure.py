"""Exposure defaults: loopback bind, API key, no CORS, Host check, /health before the model
has loaded, a hostile chat template, and serving verified (and signed) bundles.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import UnsafeModelError, UsageError
from edgepack.runtime.server.serve import ServeConfig, make_server, read_api_key, serve, start_server
from tests.runtime.server.helpers import (  # noqa: F401 - fixtures are requested by name
    call, chat, local, metrics, port, proc_server)


def test_api_key_is_required_when_set(local: Any) -> None:
    server = local(api_key="s3cret-key")
    assert call(server.port, "GET", "/health").status == 200  # probes need no key
    assert chat(server.port, max_tokens=2).status == 401
    wrong = chat(server.port, max_tokens=2, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert call(server.port, "GET", "/metrics").status == 401
    assert call(server.port, "GET", "/v1/models").status == 401
    good = {"Authorization": "Bearer s3cret-key"}
    assert chat(server.port, max_tokens=2, headers=good).status == 200
    assert metrics(server.port, good)['edgepack_rejections_total{reason="unauthorized"}'] == 4


def test_non_loopback_bind_needs_a_key(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(UsageError, match="without an API key"):
            make_server(tiny_gguf, ServeConfig(host=host, port=0))
    with pytest.raises(UsageError, match="without an API key"):
        serve(tiny_gguf, host="0.0.0.0", port=0)
    monkeypatch.delenv("EDGEPACK_TEST_KEY", raising=False)
    with pytest.raises(UsageError, match="EDGEPACK_TEST_KEY is not set"):
        serve(tiny_gguf, host="0.0.0.0", port=0, api_key_env="EDGEPACK_TEST_KEY")
    monkeypatch.setenv("EDGEPACK_TEST_KEY", "k" * 32)
    with make_server(tiny_gguf, ServeConfig(host="0.0.0.0", port=0,
                                            api_key=read_api_key("EDGEPACK_TEST_KEY"))) as server:
        assert server.port > 0 and not server.host_check
    with make_server(tiny_gguf, ServeConfig(port=0)) as server:  # the default is loopback
        assert server.url.startswith("http://127.0.0.1:") and server.host_check


def test_health_is_503_until_the_model_has_loaded(tiny_gguf: Path) -> None:
    with make_server(tiny_gguf, ServeConfig(port=0, threads=1)) as server:
        server.start()
        loading = call(server.port, "GET", "/health")
        assert loading.status == 503 and loading.json() == {"status": "loading"}
        assert chat(server.port, max_tokens=2).json()["error"]["code"] == "not_ready"
        server.load()
        assert call(server.port, "GET", "/health").status == 200
        assert chat(server.port, max_tokens=2).status == 200


def test_hostile_chat_template_refuses_to_serve(tiny_gguf: Path, tmp_path: Path) -> None:
    from tests.runtime.helpers import rewrite_gguf

    marker = tmp_path / "pwned"
    payload = ("{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
               "{% for m in messages %}{{ m.content }}{% endfor %}")
    evil = rewrite_gguf(tiny_gguf, tmp_path / "evil.gguf", {"tokenizer.chat_template": payload})
    with pytest.raises(UnsafeModelError):
        start_server(evil, ServeConfig(port=0, threads=1))
    assert not marker.exists()


def test_serves_a_verified_bundle(tiny_gguf: Path, tmp_path: Path, cache_dir: Path, local: Any) -> None:
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.memory import estimate_gguf_memory

    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16",
                "profile": {"name": "tiny-ok"}, "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": 256, "threads": 1,
                            "memory_estimate": estimate_gguf_memory(read_gguf(tiny_gguf), 256)}}
    bundle = tmp_path / "tiny-tiny-ok-gguf-F16.edgepack"
    write_bundle(bundle, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    server = local(bundle)
    card = call(server.port, "GET", "/v1/models").json()["data"][0]
    assert card["id"] == "tiny-tiny-ok-gguf-F16" and card["edgepack"]["n_ctx"] == 256
    meta = chat(server.port, max_tokens=3).json()["edgepack"]
    assert meta["bundle"] == bundle.name and meta["gate_status"] == "PASS" and meta["profile"] == "tiny-ok"
    assert meta["model_sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()


def test_serve_with_a_key_requires_a_signature_by_it(tiny_gguf: Path, tmp_path: Path, cache_dir: Path,
                                                     local: Any) -> None:
    from edgepack.errors import BundleError
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle
    from edgepack.runtime.bundle.signing import generate_keypair, load_private_key, sign_manifest

    owner, other = generate_keypair(tmp_path / "owner"), generate_keypair(tmp_path / "other")
    key = load_private_key(Path(owner["private_key"]))
    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16", "profile": {"name": "p"},
                "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": 256, "threads": 1}}
    signed, unsigned = tmp_path / "signed.edgepack", tmp_path / "unsigned.edgepack"
    write_bundle(signed, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)], signer=lambda m: sign_manifest(m, key))
    write_bundle(unsigned, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    server = local(signed, public_key=Path(owner["public_key"]))
    assert chat(server.port, max_tokens=2).status == 200
    with pytest.raises(BundleError, match="not by the given key"):
        start_server(signed, ServeConfig(port=0, threads=1, public_key=Path(other["public_key"])))
    with pytest.raises(BundleError, match="unsigned bundle"):
        start_server(unsigned, ServeConfig(port=0, threads=1, public_key=Path(owner["public_key"])))


def test_no_cors_and_loopback_host_check(port: int) -> None:
    pre = call(port, "OPTIONS", "/v1/chat/completions",
               headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status == 405 and not any(k.startswith("access-control-") for k in pre.headers)
    ok = chat(port, max_tokens=2, headers={"Origin": "http://evil.example"})
    assert ok.status == 200 and not any(k.startswith("access-control-") for k in ok.headers)
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host header.
    rebound = chat(port, max_tokens=2, headers={"Host": "evil.example:8000"})
    assert rebound.status == 403
    assert chat(port, max_tokens=2, headers={"Host": f"localhost:{port}"}).status == 200
