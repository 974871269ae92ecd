"""The task a session applies (issue #15): system prompt, decoding, schema, stop strings.

The pure parts (:func:`apply_task`, :func:`cut_at_stop`) are checked on tables; the session on a
real tiny GGUF in a real bundle whose manifest carries a task.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edgepack.answers import JsonAnswer
from edgepack.errors import BundleError, UsageError
from edgepack.runtime.bundle.archive import BundleFile, write_bundle
from edgepack.runtime.bundle.manifest import manifest_problems
from tests.runtime.helpers import task_bundle
from edgepack.runtime.session import apply_task, cut_at_stop, open_model
from edgepack.task import DEMO_SYSTEM_PROMPT, DEMO_TASK, Decoding, Task

USER = [{"role": "user", "content": "Compressor C-12 tripped on high vibration."}]
OWN_SYSTEM = [{"role": "system", "content": "Answer in French."}, *USER]
SCHEMA = {"type": "object", "properties": {"asset": {"type": "string"}}, "required": ["asset"]}
JSON_TASK = Task(answer=JsonAnswer(schema=SCHEMA, fields=("asset",)), system_prompt="Extract the asset.")


# --- apply_task: pure -------------------------------------------------------------------------

@pytest.mark.parametrize("task,messages,system,first", [
    (DEMO_TASK, USER, None, DEMO_SYSTEM_PROMPT),          # the task's prompt for a bare user message
    (DEMO_TASK, USER, "Be brief.", "Be brief."),          # --system replaces it
    (DEMO_TASK, OWN_SYSTEM, "Be brief.", "Answer in French."),  # the request's own system turn wins
    (None, USER, None, None),                             # the raw model: nothing added
    (None, USER, "Be brief.", "Be brief."),               # --no-task --system
    (replace(DEMO_TASK, system_prompt=None), USER, None, None),  # a task without a prompt adds none
])
def test_system_turn_precedence(task: Task | None, messages: list[dict[str, str]], system: str | None,
                                first: str | None) -> None:
    out, _, _ = apply_task(task, messages, system=system)
    if first is None:
        assert out == messages
    else:
        assert out[0] == {"role": "system", "content": first}
        assert [m for m in out if m["role"] != "system"] == USER
        assert sum(m["role"] == "system" for m in out) == 1
    assert messages[0]["role"] in ("user", "system") and len(messages) in (1, 2)  # the input is not changed


def test_decoding_is_the_tasks_and_explicit_values_override() -> None:
    task = replace(DEMO_TASK, decoding=Decoding(max_tokens=40, temperature=0.0, repeat_penalty=1.15, stop=("\n\n",)))
    _, decoding, _ = apply_task(task, USER)
    assert decoding == task.decoding
    _, decoding, _ = apply_task(task, USER, max_tokens=7, temperature=0.5, repeat_penalty=1.0,
                                default_max_tokens=999)
    assert decoding == Decoding(max_tokens=7, temperature=0.5, repeat_penalty=1.0, stop=("\n\n",))


def test_without_a_task_the_callers_default_max_tokens_applies() -> None:
    assert apply_task(None, USER, default_max_tokens=128)[1] == Decoding(max_tokens=128)
    assert apply_task(None, USER, default_max_tokens=128, max_tokens=9)[1].max_tokens == 9
    assert apply_task(DEMO_TASK, USER, default_max_tokens=128)[1].max_tokens == DEMO_TASK.decoding.max_tokens


def test_a_json_tasks_schema_only_where_the_backend_constrains() -> None:
    assert apply_task(JSON_TASK, USER, constrains_json=True)[2] == SCHEMA
    assert apply_task(JSON_TASK, USER, constrains_json=False)[2] is None
    assert apply_task(DEMO_TASK, USER, constrains_json=True)[2] is None


@pytest.mark.parametrize("override", [{"max_tokens": 0}, {"temperature": -0.1}, {"repeat_penalty": 0.0},
                                      {"temperature": float("nan")}])
def test_bad_decoding_values_are_refused(override: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        apply_task(DEMO_TASK, USER, **override)  # type: ignore[arg-type]


# --- cut_at_stop: streaming equals cutting the whole ---------------------------------------------

@pytest.mark.parametrize("text,stop", [
    ("Category: mechanical\nAction: Inspect.\n\nCategory: x", ("\n\n",)),
    ("abcabcabd", ("abd",)),
    ("no stop here", ("###", "END")),
    ("END at once", ("END",)),
    ("a<|x|>b<|y|>", ("<|y|>", "<|x|>")),
    ("ends with a partial <|", ("<|x|>",)),
    ("", ("x",)),
    ("anything", ()),
])
def test_cut_at_stop_matches_cutting_the_whole_text(text: str, stop: tuple[str, ...]) -> None:
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if b > a]
        streamed = list(cut_at_stop(iter(pieces), stop))
        assert "".join(streamed) == Decoding(stop=stop).cut(text)
        assert all(streamed)  # no empty pieces


def test_cut_at_stop_closes_the_source_at_the_stop() -> None:
    pulled: list[str] = []
    closed: list[bool] = []

    def source() -> Iterator[str]:
        try:
            for piece in ["Category: a", "\n", "\n", "more", "and more"]:
                pulled.append(piece)
                yield piece
        finally:
            closed.append(True)

    assert "".join(cut_at_stop(source(), ("\n\n",))) == "Category: a"
    assert pulled == ["Category: a", "\n", "\n"] and closed == [True]


# --- the session ----------------------------------------------------------------------------------

def _bundle(tiny_gguf: Path, path: Path, task: Task | None) -> Path:
    return task_bundle(tiny_gguf, path, task, n_ctx=256)


def test_a_bundle_applies_its_task_and_no_task_gives_the_raw_model(tiny_gguf: Path, tmp_path: Path,
                                                                   cache_dir: Path) -> None:
    task = replace(DEMO_TASK, system_prompt="Classify the alarm.", decoding=Decoding(max_tokens=12, stop=(" ",)))
    bundle = _bundle(tiny_gguf, tmp_path / "tiny.edgepack", task)
    with open_model(bundle) as session:
        assert session.task == task and session.notes == []
        messages, decoding, schema = session.apply_task(USER)
        assert messages[0] == {"role": "system", "content": "Classify the alarm."}
        assert (decoding, schema) == (task.decoding, None)
        answered = "".join(session.answer(messages, decoding))
        raw = session.complete(messages, max_tokens=12)  # the same model, asked the same way, uncut
        assert answered == decoding.cut(raw)
    with open_model(bundle, no_task=True) as raw_session:
        assert raw_session.task is None
        messages, decoding, _ = raw_session.apply_task(USER, default_max_tokens=12)
        assert messages == USER and decoding == Decoding(max_tokens=12)


def test_a_bundle_without_a_task_is_announced(tiny_gguf: Path, tmp_path: Path, cache_dir: Path) -> None:
    bundle = _bundle(tiny_gguf, tmp_path / "old.edgepack", None)
    seen: list[str] = []
    with open_model(bundle, warn=seen.append) as session:
        assert session.task is None
    assert any("carries no task" in n for n in seen)


def test_a_bare_model_has_no_task_unless_given(tiny_gguf: Path) -> None:
    with open_model(tiny_gguf, threads=1) as session:
        assert session.task is None and session.notes == []
    with open_model(tiny_gguf, threads=1, task=DEMO_TASK) as session:
        assert session.task is DEMO_TASK
        assert session.apply_task(USER)[0][0]["content"] == DEMO_SYSTEM_PROMPT


def test_a_json_task_says_whether_it_is_constrained(tiny_gguf: Path) -> None:
    seen: list[str] = []
    with open_model(tiny_gguf, threads=1, task=JSON_TASK, warn=seen.append) as session:
        constrains = session.backend.constrains_json
        assert (session.apply_task(USER)[2] == SCHEMA) is constrains
    assert any("unconstrained" in n for n in seen) is (not constrains)


# --- the manifest ---------------------------------------------------------------------------------

def test_a_manifest_task_is_checked_like_task_json(tiny_gguf: Path, tmp_path: Path) -> None:
    from edgepack.runtime.bundle.archive import verify_bundle

    bad = DEMO_TASK.to_json()
    bad["answer"]["labels"] = ["pump", "Pump"]
    manifest = {"schema_version": 1, "model": "m", "format": "gguf", "quant": "F16", "profile": {"name": "p"},
                "entrypoint": "m.gguf", "files": [], "gate_status": "PASS", "task": bad,
                "task_scores": {"primary_metric": "accuracy", "primary": 1.5, "scores": {}, "rows": 2,
                                "decoding": DEMO_TASK.decoding.to_json()}}
    problems = manifest_problems(manifest)
    assert any(p.startswith("task: ") and "duplicates" in p for p in problems)
    assert any(p.startswith("task_scores.primary") for p in problems)
    assert any("'task' is a dependency of 'task_scores'" in p
               for p in manifest_problems({k: v for k, v in manifest.items() if k != "task"}))
    with pytest.raises(BundleError, match="task"):
        write_bundle(tmp_path / "bad.edgepack", manifest, [BundleFile("m.gguf", b"x")])
        verify_bundle(tmp_path / "bad.edgepack")
