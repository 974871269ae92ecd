"""Model cards and the bundle's tokenizer/ folder, read by the ecosystem's own clients (#17).

A real run directory (tiny model, real export and gate, :func:`tests.runtime.helpers.make_run_dir`)
is packed by the real ``pack_run``; its README.md is read with ``huggingface_hub.ModelCard.load``
and its ``tokenizer/`` with ``transformers.AutoTokenizer``. ``ModelCard.validate`` posts the card
to the Hub (https://huggingface.co/api/validate-yaml), which tests never reach; the offline checks
are huggingface_hub's own: ``ModelCard`` parses the YAML, ``ModelCardData`` turns ``model-index``
back into ``EvalResult`` objects, and ``EvalResult`` checks its fields as it is built.
The student folder's card is checked after a real (two-step) ``distill train``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from edgepack.constants import M_CHAT_TEMPLATE, M_RUNTIME, M_TASK, M_TASK_SCORES
from edgepack.export.pack.pack import pack_run
from edgepack.model_card import LICENSE_UNKNOWN, CardLicense, card_license
from edgepack.profiles import Profile, load_profile
from edgepack.runtime.bundle.archive import extract_bundle, verify_bundle
from edgepack.task import task_from_json
from tests.runtime.helpers import make_run_dir, write_profile

MESSAGES = [{"role": "system", "content": "Triage the alarm."},
            {"role": "user", "content": "Pump P-101 discharge pressure low alarm."}]


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    return load_profile(str(write_profile(tmp_path_factory.mktemp("profiles"), "tiny-ok", min_relative_quality=0.0)))


@pytest.fixture(scope="module")
def built_run(tiny_llama_dir: Path, profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs") / "run", tiny_llama_dir, [Path(profile.source)])


@pytest.fixture()
def run(built_run: Path, tmp_path: Path) -> Path:
    """A private copy whose teacher/source.json is what `distill data` records for the builtin teacher
    (make_run_dir writes a shorter one)."""
    from edgepack.atomic import write_json
    from edgepack.distill.teachers import resolve_teacher

    run = Path(shutil.copytree(built_run, tmp_path / "run"))
    write_json(run / "teacher" / "source.json", resolve_teacher("builtin:smollm2-135m-instruct").describe())
    return run


def _pack(run: Path, profile: Profile, **kw: object) -> tuple[Path, dict]:
    bundle = Path(pack_run(run_dir=run, profile=profile, artifact=None, allow_unverified=False, **kw)["bundle"])
    out = run / "unpacked"
    extract_bundle(bundle, out)
    verify_bundle(bundle)
    return out, json.loads((out / "manifest.json").read_text())


def test_bundle_card_loads_with_the_teachers_license_and_the_gated_scores(run: Path, profile: Profile) -> None:
    out, manifest = _pack(run, profile)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"  # the teacher's, from teacher/source.json
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.language == ["en"]
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "gguf"
    assert {"edgepack", "distillation", "gguf", "Q8_0", "tiny-ok"} <= set(card.data.tags)
    scores = manifest[M_TASK_SCORES]
    assert scores is not None and scores["primary"] is not None
    results = card.data.eval_results
    assert results and card.data.model_name == manifest["model"]
    primary = results[0]
    assert primary.metric_type == scores["primary_metric"] and primary.metric_value == scores["primary"]
    assert primary.task_type == "text-generation" and primary.dataset_split == "holdout"
    task = task_from_json(manifest[M_TASK], "manifest")
    assert {r.metric_type: r.metric_value for r in results} == {m: scores["scores"][m] for m in task.answer.metrics}
    text = card.text
    for section in ("## Intended use", "## Task", "## How it was made", "## Limitations", "## Gate: PASS",
                    "## License"):
        assert section in text, section
    assert "No license was recorded" not in text and "`apache-2.0`, as recorded by the teacher's source" in text
    # What the card says round-trips through huggingface_hub's own YAML writer unchanged.
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()


def test_license_option_overrides_and_an_unknown_license_says_how_to_set_it(run: Path, profile: Profile) -> None:
    out, _ = _pack(run, profile, license="MIT")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.to_dict()["edgepack"]["license_source"] == "--license"
    source = run / "teacher" / "source.json"
    record = json.loads(source.read_text())
    source.write_text(json.dumps({k: v for k, v in record.items() if k != "license"}))
    shutil.rmtree(run / "unpacked")
    out, _ = _pack(run, profile)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == LICENSE_UNKNOWN and card.data.license_name == "unknown"
    assert "No license was recorded" not in card.text and "pass --license ID" in card.text


def test_pack_cli_license_option_reaches_the_card(run: Path, profile: Profile, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    packed = subprocess.run([sys.executable, "-m", "edgepack", "pack", str(run), "--profile", str(profile.source),
                             "--license", "mit", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert packed.returncode == 0, packed.stderr
    out = tmp_path / "x"
    extract_bundle(Path(json.loads(packed.stdout)["bundle"]), out)
    assert ModelCard.load(out / "README.md").data.license == "mit"


def test_bundle_tokenizer_folder_renders_the_gated_template(run: Path, profile: Profile) -> None:
    from transformers import AutoTokenizer

    from edgepack.runtime.chat.template import read_chat_template, render_chat

    out, manifest = _pack(run, profile)
    assert read_chat_template(out / "tokenizer") == manifest[M_CHAT_TEMPLATE]  # edgepack's reader: the gated text
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    hf = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    specials = manifest[M_RUNTIME]["special_tokens"]
    ours = render_chat(manifest[M_CHAT_TEMPLATE], MESSAGES, bos_token=specials["bos_token"],
                       eos_token=specials["eos_token"], add_generation_prompt=True)
    assert hf == ours and hf.endswith("<|im_start|>assistant\n") and "Triage the alarm." in hf
    assert "README.md" in {p.name for p in out.iterdir()}


def test_card_license_precedence() -> None:
    assert card_license(" Apache-2.0 ", [("a", "mit")]).id == "apache-2.0"
    assert card_license(None, [("a", None), ("b", "MIT")]) == card_license("", [("b", "mit")]) == CardLicense("mit", "b")
    unknown = card_license(None, [("a", None), ("b", "")])
    assert unknown.id == LICENSE_UNKNOWN and not unknown.known


def test_teacher_license_is_recorded_from_each_kind_of_source(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import gguf

    from edgepack.distill.teachers import resolve_teacher

    builtin = resolve_teacher("builtin:smollm2-135m-instruct")
    assert builtin.license == "apache-2.0" and builtin.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert builtin.language == ("en",)
    path = tmp_path / "licensed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_license("MIT")
    writer.add_languages(["en", "de"])
    writer.add_chat_template("{{ messages[0]['content'] }}")  # a teacher without one is refused up front
    writer.add_tensor("x", np.zeros((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = resolve_teacher(str(path))
    assert from_gguf.license == "mit" and from_gguf.language == ("en", "de")
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "hf"))
    assert resolve_teacher(str(folder)).license is None  # no card: nothing recorded, nothing guessed
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\nlanguage: fr\n---\n# a teacher\n")
    from_hf = resolve_teacher(str(folder))
    assert from_hf.license == "cc-by-4.0" and from_hf.language == ("fr",) and from_hf.describe()["license"] == "cc-by-4.0"


def test_distill_train_writes_a_student_card(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edgepack.distill.train import TrainConfig, train_student
    from tests.distill.conftest import make_run

    teacher = Path(shutil.copytree(tiny_llama_dir, tmp_path / "teacher-src"))
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the teacher\n")
    run = make_run(tmp_path / "run", teacher)
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), student=str(tiny_llama_dir), steps=2,
                           config=TrainConfig(lr=1e-3, save_every=10, alpha=0.0))
    card = ModelCard.load(run / "student" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == "teacher-src"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert "distillation" in card.data.tags and not card.data.eval_results  # not gated yet
    assert f"{report['steps']} steps" in card.text and "## Intended use" in card.text and "Not gated yet" in card.text
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["license"] == {"id": "apache-2.0", "source": "the teacher's source (`teacher/source.json`)"}


def test_a_json_tasks_card_names_its_exact_and_free_text_fields_and_their_scores() -> None:
    from edgepack.answers import JsonAnswer
    from edgepack.model_card import task_section
    from edgepack.task import Task

    schema = {"type": "object", "properties": {"fault": {"enum": ["leak"]},
                                               "action": {"type": "string", "x-edgepack-score": "chrf"}}}
    task = Task(answer=JsonAnswer(schema=schema, fields=("fault",), text_fields=("action",)))
    scores = {"rows": 4, "answered": 4, "scores": {"field_f1": 0.5, "field_exact": {"fault": 0.5},
                                                   "field_chrf": {"action": 0.375}}}
    text = "\n".join(task_section(task, "RUN/task.json", scores))
    assert "exact match are `fault`; free-text fields scored by chrF against the reference: `action`" in text
    assert "| fault exact | 0.5" in text and "| action chrF | 0.375" in text
