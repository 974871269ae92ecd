"""bench/serve/task_fidelity.py on a tiny packed bundle: the real gate, pack, `edgepack serve` and
the openai SDK. Bare user messages through the server must give the gate's answers and score."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from edgepack.export.pack.pack import pack_run
from edgepack.profiles import load_profile
from tests.runtime.helpers import make_run_dir, tiny_task, write_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fidelity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("task_fidelity", ROOT / "bench" / "serve" / "task_fidelity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a run gated with its holdout under the tiny task, its bundle)."""
    root = tmp_path_factory.mktemp("fidelity")
    profile = write_profile(root, "tiny-ok", min_relative_quality=0.0)
    run = make_run_dir(root / "run", tiny_llama_dir, [profile])
    bundle = pack_run(run_dir=run, profile=load_profile(str(profile)), artifact=None, allow_unverified=False)["bundle"]
    return run, Path(bundle)


def _gate_examples(run: Path) -> list[dict[str, str]]:
    return json.loads((run / "gate" / "student-Q8_0.gguf.json").read_text())["measurements"]["quality"]["examples"]


def test_bare_messages_through_serve_give_the_gated_answers(fidelity: ModuleType, packed: tuple[Path, Path],
                                                             tmp_path: Path, cache_dir: Path) -> None:
    run, bundle = packed
    out = tmp_path / "fidelity.json"
    code = fidelity.main([str(bundle), "--holdout", str(run / "data" / "holdout.jsonl"), "--out", str(out),
                          "--threads", "1"])
    res = json.loads(out.read_text())
    assert code == 0, res["comparison"]
    assert res["served"]["primary"] == res["gated"]["primary"] is not None and res["comparison"]["delta"] == 0
    assert res["holdout"]["rows_sent"] == 2 and res["holdout"]["rows_with_a_system_turn_dropped"] == 0
    assert [r["answer"][:200] for r in res["rows"]] == [e["answer"] for e in _gate_examples(run)]
    assert all(r["answer"] for r in res["rows"])  # real text, not two empty answers that agree
    assert res["server"]["exit_code"] == 0 and res["task"]["kind"] == "labels"
    text = out.with_suffix(".md").read_text()
    assert "**PASS**" in text and "bench/serve/task_fidelity.py" in text and res["bundle"]["name"] in text


def test_a_holdout_whose_rows_carry_the_prompt_is_sent_bare(fidelity: ModuleType, packed: tuple[Path, Path],
                                                           tmp_path: Path, cache_dir: Path) -> None:
    """The demo's holdout rows carry the system prompt; the bench drops it and the server adds it back."""
    run, bundle = packed
    rows = [json.loads(line) for line in (run / "data" / "holdout.jsonl").read_text().splitlines()]
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(dict(r, messages=[{"role": "system", "content": tiny_task().system_prompt},
                                                            *r["messages"]])) + "\n" for r in rows))
    out = tmp_path / "fidelity.json"
    assert fidelity.main([str(bundle), "--holdout", str(holdout), "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["holdout"]["rows_with_a_system_turn_dropped"] == 2
    assert [r["answer"][:200] for r in res["rows"]] == [e["answer"] for e in _gate_examples(run)]


@pytest.mark.parametrize("served,gated,ok", [(0.80, 0.80, True), (0.78, 0.80, True), (0.83, 0.80, True),
                                             (0.76, 0.80, False), (0.84, 0.80, False), (None, 0.8, False),
                                             (0.8, None, False)])
def test_the_comparison(fidelity: ModuleType, served: float | None, gated: float | None, ok: bool) -> None:
    verdict = fidelity.compare(served, gated, 0.03)
    assert verdict["ok"] is ok
    assert ("not comparable" in verdict["why"]) is (served is None or gated is None)


def test_a_bundle_without_a_task_exits_2(fidelity: ModuleType, packed: tuple[Path, Path], tmp_path: Path) -> None:
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle

    run, _ = packed
    bare = tmp_path / "old.edgepack"
    write_bundle(bare, {"schema_version": 1, "model": "m", "format": "gguf", "quant": "Q8_0", "profile": {"name": "p"},
                        "entrypoint": "m.gguf", "files": [], "gate_status": "PASS"},
                 [BundleFile("m.gguf", shutil.copy(run / "artifacts" / "student-Q8_0.gguf", tmp_path / "m.gguf"))])
    assert fidelity.main([str(bare), "--holdout", str(run / "data" / "holdout.jsonl"),
                          "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
