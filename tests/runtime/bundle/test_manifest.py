"""manifest.json is typed by one JSON Schema; a field of the wrong type is a clean refusal.

Issue #20 defect 12: manifest fields of the wrong type used to escape as exit 3 or a
MemoryError while loading. Each case rewrites a real bundle's manifest and expects a
BundleError (exit 2 at the CLI) naming the key.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edgepack.constants import MANIFEST_FILE
from edgepack.errors import BundleError
from edgepack.runtime.bundle.archive import verify_bundle
from edgepack.runtime.bundle.manifest import manifest_problems
from tests.runtime.helpers import tar_member, write_tar
from tests.runtime.bundle.test_archive import bundle, base_manifest  # noqa: F401 - the fixture

CASES: list[tuple[str, Any, str]] = [
    ("runtime", {"context_length": 1e6}, "runtime.context_length"),
    ("runtime", {"context_length": "4096"}, "runtime.context_length"),
    ("runtime", {"context_length": 10 ** 12}, "runtime.context_length"),
    ("runtime", {"threads": -1}, "runtime.threads"),
    ("runtime", {"threads": True}, "runtime.threads"),
    ("runtime", {"memory_estimate": {"total_bytes": "1"}}, "runtime.memory_estimate.total_bytes"),
    ("runtime", {"stop_tokens": [{"id": "2"}]}, "runtime.stop_tokens.0.id"),
    ("runtime", "fast", "runtime"),
    ("profile", "cpu", "profile"),
    ("profile", {"name": 3}, "profile.name"),
    ("model", 7, "model"),
    ("gate_status", ["PASS"], "gate_status"),
    ("chat_template", 1, "chat_template"),
    ("gate", [], "gate"),
]


def rewritten(src: Path, dst: Path, key: str, value: Any) -> Path:
    with tarfile.open(src) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    manifest = json.loads(contents[MANIFEST_FILE])
    manifest[key] = value
    contents[MANIFEST_FILE] = json.dumps(manifest).encode()
    return write_tar(dst, [tar_member(name, data) for name, data in contents.items()])


@pytest.mark.parametrize("key,value,where", CASES)
def test_wrong_types_are_refused_naming_the_key(key: str, value: Any, where: str, bundle: Path,  # noqa: F811
                                                tmp_path: Path) -> None:
    forged = rewritten(bundle, tmp_path / "forged.edgepack", key, value)
    with pytest.raises(BundleError, match="manifest.json is malformed") as info:
        verify_bundle(forged)
    assert where in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    manifest = base_manifest() | {"model": 1, "runtime": {"threads": 0, "context_length": "x"}}
    problems = manifest_problems(manifest)
    assert {p.split(":")[0] for p in problems} >= {"model", "runtime.threads", "runtime.context_length"}


def test_a_packed_manifest_is_valid(bundle: Path) -> None:  # noqa: F811
    assert manifest_problems(verify_bundle(bundle)) == []


def test_cli_verify_exits_2(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from edgepack.cli import main

    forged = rewritten(bundle, tmp_path / "forged.edgepack", "runtime", {"context_length": 1e6})
    code = main(["verify", str(forged)])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "runtime.context_length" in captured.err
