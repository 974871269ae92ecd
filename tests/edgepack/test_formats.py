"""The format registry: one :class:`~edgepack.formats.Format` per artifact format, asked by every stage.

The registry's own rules are tested on the built-ins; then a toy third-party format
(tests/edgepack/toy_format.py, a byte-level bigram model in a ``.toy`` file) is installed the way
a plugin package is, through a real ``edgepack.formats`` entry point in a dist-info folder on
``sys.path`` and ``PYTHONPATH``, and goes through export, the runtime preflight, the gate (which
measures in a child process that finds the plugin on its own), ``gate --search`` and pack.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import edgepack.formats as formats
import edgepack.runtime.backends.base as base
from edgepack.constants import COMPLETE_MARKER, M_ENTRYPOINT, M_FORMAT, M_QUANT, M_RUNTIME, PASS
from edgepack.errors import BudgetError, ModelSourceError, ProfileError, UnsafeModelError, UsageError
from edgepack.formats import BUILTIN_FORMATS, PARTS, Format, format_of, get_format, register_format
from edgepack.profiles import load_profile
from tests.runtime.helpers import write_profile

TOY_SOURCE = Path(__file__).with_name("toy_format.py")
USER = [{"role": "user", "content": "hello"}]


# --- the registry -------------------------------------------------------------------------------
def test_builtin_formats_are_found_by_exact_name_only() -> None:
    assert get_format("gguf").quants[:3] == ("F32", "F16", "BF16")
    assert get_format("onnx").default_quant == "int4"
    with pytest.raises(UsageError, match="'GGUF'; registered: gguf, onnx"):
        get_format("GGUF")


@pytest.mark.parametrize(("fmt", "part"), [(f.name, p) for f in BUILTIN_FORMATS for p in PARTS if f.provides(p)])
def test_every_builtin_part_resolves(fmt: str, part: str) -> None:
    """A typo in a ``module:attr`` string fails here, not when a user first reaches that stage."""
    resolved = get_format(fmt).part(part)
    assert resolved is not None and (callable(resolved) or part == "backend")


def test_format_of_recognises_suffixes_and_marker_files(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").mkdir()
    (tmp_path / "m.onnx" / "model.onnx").write_bytes(b"")
    assert format_of(tmp_path / "a" / "student-Q4_K_M.GGUF").name == "gguf"
    assert format_of(tmp_path / "m.onnx").name == "onnx"
    assert format_of(tmp_path / "m.onnx" / "model.onnx").name == "onnx"
    with pytest.raises(ModelSourceError, match=r"expected \.gguf, \.onnx, a folder with model\.onnx"):
        format_of(tmp_path / "model.bin")


def test_registration_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "_REGISTRY", dict(formats._REGISTRY))
    assert register_format(get_format("gguf")) is get_format("gguf")  # the same object again is fine
    with pytest.raises(ValueError, match="'gguf' is already registered"):
        register_format(Format(name="gguf", quants=("Q8_0",)))
    with pytest.raises(TypeError):
        register_format({"name": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_quant"):
        Format(name="x", quants=("a",), default_quant="b")
    with pytest.raises(ValueError, match="export_options"):
        Format(name="x", quants=("a",), export_options=("calibrate",))
    bare = register_format(Format(name="bare", quants=("q",), suffixes=(".bare",), payload="edgepack.formats:nothing"))
    assert not bare.provides("backend") and bare.provides("payload")
    with pytest.raises(UsageError, match="'bare' does not provide 'exporter'"):
        bare.part("exporter")
    with pytest.raises(UsageError, match="edgepack.formats has no nothing"):
        bare.part("payload")
    with pytest.raises(UsageError, match="not a format part"):
        bare.part("weights")


def test_profile_choices_come_from_the_registry(tmp_path: Path) -> None:
    assert [str(c) for c in load_profile(str(write_profile(tmp_path, "a", choices='["onnx:int4"]'))).choices] \
        == ["onnx:int4"]
    with pytest.raises(ProfileError, match=r"'gguf:q8_0' is not one of gguf:F32, .*onnx:int4"):
        load_profile(str(write_profile(tmp_path, "b", choices='["gguf:q8_0"]')))  # exact spelling
    with pytest.raises(ProfileError, match="'toy:bigram' is not one of"):
        load_profile(str(write_profile(tmp_path, "c", choices='["toy:bigram"]')))  # no such plugin here


def test_stages_ask_the_registry_not_the_format_name() -> None:
    """No module outside edgepack/formats.py dispatches on a built-in format's name."""
    root = Path(__file__).resolve().parents[2]
    patterns = ("fmt ==", '== "gguf"', '== "onnx"', '!= "gguf"', '!= "onnx"', "format == ")
    found = [f"{path.relative_to(root)}: {p}" for folder in ("runtime", "export", "distill", "profiles", "edgepack")
             for path in sorted((root / folder).rglob("*.py")) if path != root / "edgepack" / "formats.py"
             for p in patterns if p in path.read_text(encoding="utf-8")]
    assert found == []


# --- a broken plugin --------------------------------------------------------------------------------
def _dist_info(folder: Path, entry: str) -> None:
    dist = folder / "edgepack_toy-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edgepack-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{formats.ENTRY_POINT_GROUP}]\ntoy = {entry}\n")


@contextmanager
def _plugin_path(folder: Path) -> Iterator[pytest.MonkeyPatch]:
    """``folder`` on sys.path and PYTHONPATH, with the registries restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(formats, "_REGISTRY", dict(formats._REGISTRY))
        mp.setattr(formats, "_scanned_path", formats._scanned_path)
        mp.setattr(base, "_REGISTRY", dict(base._REGISTRY))
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        try:
            yield mp
        finally:
            sys.modules.pop("edgepack_toy", None)


def test_a_broken_plugin_is_named_not_skipped(tmp_path: Path) -> None:
    _dist_info(tmp_path, "edgepack_missing_module:FORMAT")
    with _plugin_path(tmp_path), pytest.raises(UsageError, match="entry point toy = edgepack_missing_module"):
        get_format("gguf")


# --- a toy third-party format, end to end -------------------------------------------------------------
def _toy_run(run: Path) -> Path:
    """A run whose student is a folder with a corpus: all the toy exporter reads."""
    from edgepack.runconfig import write_run_config

    student = run / "student"
    student.mkdir(parents=True)
    write_run_config(run, {"profile": "toy-cpu", "teacher": "builtin:smollm2-135m-instruct", "seed": 0})
    (student / "config.json").write_text(json.dumps({"architectures": ["ToyBigram"]}))
    (student / "corpus.txt").write_text("assistant: ok.\n")
    (student / COMPLETE_MARKER).write_text("ok\n")
    return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The plugin installed, a run exported to ``.toy`` and searched for a toy-only profile."""
    from edgepack.export.api import export_model
    from edgepack.export.gate.bandwidth import machine_bandwidth
    from edgepack.export.gate.search import search

    root = tmp_path_factory.mktemp("toy")
    plugin = root / "plugin"
    _dist_info(plugin, "edgepack_toy:FORMAT")
    shutil.copyfile(TOY_SOURCE, plugin / "edgepack_toy.py")
    with _plugin_path(plugin) as mp:
        mp.setenv("EDGEPACK_CACHE", str(root / "cache"))
        machine_bandwidth(array_mb=64, repeats=1)  # cached: the gate does not measure 256 MB
        run = _toy_run(root / "run")
        export = export_model(source=run, fmt="toy", quants=[], out_dir=None, fidelity=False)
        profile = load_profile(str(write_profile(root, "toy-cpu", arch=platform.machine(), choices='["toy:bigram"]',
                                                 context_length=256, prompt_tokens=16, min_relative_quality=0.0)))
        found = search(profile=profile, run_dir=run)
        yield SimpleNamespace(root=root, run=run, export=export, profile=profile, search=found,
                              module=sys.modules["edgepack_toy"], mp=mp)


def test_the_entry_point_registers_format_and_backend(toy: Any) -> None:
    fmt = get_format("toy")
    assert fmt is toy.module.FORMAT and "toy" in formats.format_names()
    assert format_of(toy.run / "artifacts" / "student-bigram.toy") is fmt
    assert base.get_backend("toy") is toy.module.ToyBackend and "toy" in base.available_formats()


def test_export_runs_the_formats_exporter(toy: Any) -> None:
    from edgepack.export.api import export_model

    (entry,) = toy.export["artifacts"]
    assert (entry["format"], entry["quant"], entry["path"]) == ("toy", "bigram", "student-bigram.toy")
    assert json.loads((toy.run / "artifacts" / "export.json").read_text())["format"] == "toy"
    with pytest.raises(UsageError, match="'q4' is not a TOY quantization"):
        export_model(source=toy.run, fmt="toy", quants=["q4"], out_dir=None, fidelity=False)
    with pytest.raises(UsageError, match="importance matrix applies to GGUF quantization only") as err:
        export_model(source=toy.run, fmt="toy", quants=[], out_dir=None, fidelity=False, imatrix=True)
    assert err.value.hint == "drop --imatrix for TOY"


def test_search_gates_the_toy_in_a_child_process(toy: Any) -> None:
    result = toy.search
    assert (result["verdict"], result["chosen"]) == (PASS, "toy:bigram")
    (row,) = result["rows"]
    report = json.loads(Path(row["report"]).read_text())
    assert (report["format"], report["quant"], report["verdict"]) == ("toy", "bigram", PASS)
    m = report["measurements"]
    # The measuring child found the plugin through its own entry-point scan and loaded its backend.
    assert m["ok"] and m["backend"] == {"format": "toy", "library": "edgepack_toy"} and m["runs"] >= 5
    assert m["decode_tokens_per_s"]["p50"] > 0
    assert report["efficiency"]["basis"] == "toy: one table entry per token"  # the format's traffic part
    assert not any("not checked" in r for r in report["reasons"])


def test_the_gate_runs_the_formats_template_check(toy: Any, tmp_path: Path) -> None:
    from edgepack.export.gate.gate import run_gate

    marker = tmp_path / "MARKER"
    evil = toy.module.write_toy(tmp_path / "evil.toy", b"abc", context_length=64, chat_template=(
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"))
    with pytest.raises(UnsafeModelError):
        run_gate(artifact=evil, profile=toy.profile, holdout=None)
    assert not marker.exists()


def test_pack_bundles_the_toy_and_the_bundle_opens(toy: Any) -> None:
    from edgepack.export.pack.pack import pack_run
    from edgepack.runtime.bundle.archive import extract_bundle, verify_bundle
    from edgepack.runtime.session import open_model

    result = pack_run(run_dir=toy.run, profile=toy.profile, artifact=None, allow_unverified=False)
    bundle = Path(result["bundle"])
    assert bundle.name == "student-toy-cpu-toy-bigram.edgepack" and result["verdict"] == PASS
    manifest = verify_bundle(bundle)
    assert (manifest[M_FORMAT], manifest[M_QUANT], manifest[M_ENTRYPOINT]) == ("toy", "bigram", "student-bigram.toy")
    assert manifest[M_RUNTIME]["memory_estimate"]["basis"].startswith("toy table")
    extract_bundle(bundle, toy.root / "x")
    assert "Ollama" not in (toy.root / "x" / "README.md").read_text()  # the GGUF format's card_usage only
    with open_model(bundle) as session:
        expected = toy.module.artifact_memory(toy.root / "x" / "student-bigram.toy", 256)
        assert session.memory_estimate == expected
        assert session.backend.n_ctx == 256
        # The prompt ends "assistant:"; the table walks ':' ' ' 'o' 'k' '.' '\n' and stops at EOS.
        assert session.complete(USER, max_tokens=12) == " ok.\n"


def test_the_preflight_uses_the_formats_memory_estimate(toy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.runtime import memory
    from edgepack.runtime.session import open_model

    model = toy.run / "artifacts" / "student-bigram.toy"
    need = toy.module.artifact_memory(model, 512)["total_bytes"]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (need - 1, "MemAvailable"))
    with pytest.raises(BudgetError, match="estimate: toy table"):
        with open_model(model):
            pass
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (need, "MemAvailable"))
    with open_model(model) as session:  # no n_ctx: capped at the context the file says (512)
        assert session.backend.n_ctx == 512 and session.memory_estimate["total_bytes"] == need
