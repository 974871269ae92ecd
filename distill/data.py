"""`edgepack distill data`: prompts in, filtered teacher answers out (``RUN/data``).

Input is a JSONL file, one object per line, with either ``"prompt": str`` or
``"messages": [{"role", "content"}, ...]`` (ending with a user turn), and optionally
``"id"``, ``"label"`` and ``"reference"`` (a seed answer). Bad rows are reported with their
line numbers and skipped (``strict`` turns the first one into a DataError); the report's
``warnings`` count them and name the first lines. Instead of a file, ``builtin:NAME`` runs a
domain shipped with edgepack (distill/shipped.py ``SHIPPED_DOMAINS``, keyed by the exact name):
``demo``, the default (``distill/demo``: plant alarm triage, six labels), and ``workorders``
(``distill/domains/workorders``: maintenance work orders → a JSON object). Each has a fixed train
and holdout file, the teacher's worked examples, its system prompt and its answer kind.
Spellings of one label (case, width, look-alike letters; see filters.py) are one label: rows
are stored with it, and the report's ``label_spellings`` and ``warnings`` say which spellings
were merged.

:func:`build_dataset` validates everything before writing anything, materializes the
teacher (``RUN/teacher``), asks it one greedy answer per prompt, drops bad answers with a
counted reason (data_answers.py, filters.py) and writes ``RUN/data`` atomically. A complete
``RUN/data`` is not regenerated, and every teacher answer is kept in ``RUN/cache/teacher`` as it
arrives (answer_cache.py), so a run killed during generation resumes where it stopped.

*Teacher context.* The demo's teacher is a 135M model that does not follow the answer format
from instructions alone; with a few worked examples in its prompt it does. Those
demonstrations (a shipped domain's ``shots.jsonl``) are given to the teacher only: stored rows
hold the student's prompt (system + user), and ``data/teacher_context.json`` records the extra
turns so that training computes teacher logits under the same context (context distillation).

*The task.* :func:`build_dataset` also writes ``RUN/task.json`` (edgepack/task.py): the answer
kind (``labels`` when the rows carry labels, ``text`` when they do not, a shipped domain's own,
or the user's ``--format-regex`` / ``--format-schema``), the label set, the system prompt (a
shipped domain's, or ``--system-prompt FILE``, given to every row without a system turn of its
own), the teacher's demonstrations, the decoding and the primary metric that eval and the gate
score with. Its hash is part of data/'s identity.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import atomic_dir, is_complete, write_json
from edgepack.constants import (DATA_DIR, DATA_REPORT, HOLDOUT_FILE, TEACHER_CACHE_DIR, TEACHER_CONTEXT,
                                TEACHER_CORRECTED_DIR, TEACHER_DIR, TRAIN_FILE)
from edgepack.distill.correct import CorrectionConfig, device_identity
from edgepack.distill.endpoint import is_invalid_answer
from edgepack.hashing import sha256_file
from edgepack.errors import DataError, RunDirError, UsageError
from edgepack.labels import fold_label, unify_labels
from edgepack.locks import locked_stage
from edgepack.progress import ProgressFn, null_progress
# The demo's files (distill/shipped.py) and task constants (edgepack/task.py DEMO_TASK) are
# re-exported: bench scripts and tests import them from here.
from edgepack.distill.shipped import DEMO_HOLDOUT, DEMO_SEED, DEMO_SHOTS, SHIPPED_DOMAINS, shipped_domain  # noqa: F401
from edgepack.task import DEMO_LABELS, DEMO_SYSTEM_PROMPT, TASK_FILE, build_task, save_task  # noqa: F401

if TYPE_CHECKING:
    from edgepack.answers import JsonAnswer, RegexAnswer
    from edgepack.distill.data_answers import TeacherAnswers
    from edgepack.distill.device import Device
    from edgepack.distill.endpoint import EndpointConfig
    from edgepack.distill.generate import DecodeParams
    from edgepack.distill.teachers import TeacherSource
    from edgepack.task import Task

HOLDOUT_FRACTION = 0.2
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRow:
    """One validated input row."""

    id: str
    messages: list[dict[str, str]]
    label: str | None = None
    reference: str | None = None
    line: int = 0

    def record(self, response: str | None) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages, "response": response, "label": self.label,
                "reference": self.reference}


@dataclass
class PromptSet:
    """The rows of one prompts file and the rows that were skipped (with line numbers)."""

    path: Path
    rows: list[PromptRow]
    bad: list[dict[str, Any]] = field(default_factory=list)


def _row_problem(obj: Any) -> str | None:
    """Why a parsed JSON value is not a valid prompt row, or None."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800") parses but is not text
        return "contains a lone UTF-16 surrogate escape; not valid Unicode text"
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return "needs exactly one of `prompt` (string) or `messages` (list)"
    if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"].strip()):
        return "`prompt` must be a non-empty string"
    if has_messages:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "`messages` must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be {{role: system|user|assistant, content: string}}"
        if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
            return "the last message must be a non-empty user turn"
    for key in ("id", "label", "reference"):
        if obj.get(key) is not None and (not isinstance(obj[key], str) or not obj[key].strip()):
            return f"`{key}` must be a non-empty string or null"
    return None


def load_prompts(path: Path, *, strict: bool = False, system: str | None = None) -> PromptSet:
    """Read and validate a prompts JSONL file.

    ``system`` is prepended as a system turn to rows that have none (the demo's preamble).
    Raises DataError for a missing file, an empty result, or (``strict``) the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    rows: list[PromptRow] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            problem = None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text, problem = "", "not valid UTF-8"
            if not problem and not text.strip():
                continue
            obj: Any = None
            if not problem:
                try:
                    obj = json.loads(text)
                except (ValueError, RecursionError) as exc:
                    # JSONDecodeError, an integer of more than 4300 digits, or nesting too deep
                    problem = f"not valid JSON ({getattr(exc, 'msg', None) or str(exc)[:80]})"
            problem = problem or _row_problem(obj)
            if problem is None:
                row = _to_row(obj, path, lineno, system)
                key = json.dumps(row.messages, sort_keys=True)
                problem = "duplicate prompt" if key in seen else None
                seen.add(key)
            if problem is not None:
                if strict:
                    raise DataError(f"{path}:{lineno}: {problem}",
                                    hint="fix the row, or drop --strict to skip bad rows (they are counted)")
                bad.append({"line": lineno, "reason": problem})
                continue
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no usable prompts ({len(bad)} bad rows)"
                        + (f"; first: line {bad[0]['line']}: {bad[0]['reason']}" if bad else ""))
    return PromptSet(path=path, rows=rows, bad=bad)


def _to_row(obj: dict[str, Any], path: Path, lineno: int, system: str | None) -> PromptRow:
    if "prompt" in obj:
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return PromptRow(id=obj.get("id") or f"{path.stem}-{lineno}", messages=messages, label=obj.get("label"),
                     reference=obj.get("reference"), line=lineno)


def split_rows(rows: list[PromptRow], seed: int,
               fraction: float = HOLDOUT_FRACTION) -> tuple[list[PromptRow], list[PromptRow]]:
    """Deterministic train/holdout split: a seeded shuffle, the first ``fraction`` held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_hold = int(len(rows) * fraction)
    hold = set(order[:n_hold])
    return [r for i, r in enumerate(rows) if i not in hold], [r for i, r in enumerate(rows) if i in hold]


def with_teacher_context(messages: list[dict[str, str]], context: list[dict[str, str]]) -> list[dict[str, str]]:
    """Insert the teacher-only turns after the leading system turn(s)."""
    n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return messages[:n_sys] + context + messages[n_sys:]


def load_shots(path: Path) -> list[dict[str, str]]:
    """A shipped domain's worked examples (``shots.jsonl``) as alternating user/assistant turns."""
    turns: list[dict[str, str]] = []
    for row in load_prompts(path, strict=True).rows:
        turns += [{"role": "user", "content": row.messages[-1]["content"]},
                  {"role": "assistant", "content": row.reference or ""}]
    return turns


def load_demo_shots() -> list[dict[str, str]]:
    """The demo's worked examples as alternating user/assistant turns."""
    return load_shots(DEMO_SHOTS)


@dataclass
class _Inputs:
    source: str
    train: list[PromptRow]
    holdout: list[PromptRow]
    bad: list[dict[str, Any]]
    labels: frozenset[str] | None
    context: list[dict[str, str]]
    files: dict[str, str]
    label_spellings: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per label, the other spellings of it found in the rows (and their row counts)."""
    system_prompt: str | None = None
    """The system turn given to rows without one (the user's, else a shipped domain's)."""
    answer: JsonAnswer | None = None
    """A shipped domain's answer kind (None: the rows' labels, or free text)."""


def _load_inputs(data: Path | str | None, *, strict: bool, seed: int, limit: int | None,
                 holdout: Path | None = None, system: str | None = None) -> _Inputs:
    """The rows (``system`` prepended to rows without a system turn; a shipped domain's by
    default for that domain), split, labels unified, plus the teacher context and input hashes."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    domain = shipped_domain(data)
    if holdout is not None and domain is not None:
        raise UsageError(f"--holdout replaces the split of your --data file; {domain.spec} has its own holdout",
                         hint="pass --data FILE too, or drop --holdout")
    if domain is not None:
        system = system or domain.system()
        train = load_prompts(domain.seed, strict=True, system=system)
        hold = load_prompts(domain.holdout, strict=True, system=system)
        inputs = _Inputs(domain.spec, train.rows, hold.rows, [], frozenset(domain.labels) if domain.labels else None,
                         load_shots(domain.shots), domain.files(), system_prompt=system, answer=domain.answer())
    else:
        prompts = load_prompts(data, strict=strict, system=system)
        files = {Path(data).name: sha256_file(Path(data))}
        if holdout is None:  # a deterministic split of the data file
            tr, ho = split_rows(prompts.rows, seed)
            bad = prompts.bad
        else:  # the user's own holdout: every data row trains
            if not Path(holdout).is_file():
                raise DataError(f"holdout file not found: {holdout}", hint="pass --holdout FILE.jsonl, or drop it")
            held = load_prompts(holdout, strict=strict, system=system)
            tr, ho = prompts.rows, held.rows
            bad = prompts.bad + [{**b, "file": str(holdout)} for b in held.bad]
            files[f"holdout:{Path(holdout).name}"] = sha256_file(Path(holdout))
        canonical, spellings = unify_labels(r.label for r in [*tr, *ho] if r.label is not None)
        tr, ho = ([replace(r, label=canonical[r.label]) if r.label is not None else r for r in rs] for rs in (tr, ho))
        labels = frozenset(canonical.values()) or None
        inputs = _Inputs(str(data), tr, ho, bad, labels, [], files, spellings, system_prompt=system)
    if limit is not None:
        inputs.train = inputs.train[:limit]
    return inputs


def check_inputs(data: Path | str | None, *, holdout: Path | None = None, strict: bool = False,
                 limit: int | None = None) -> None:
    """Read and check the prompts (a file, or ``builtin:NAME``) and the holdout as
    :func:`build_dataset` will, writing nothing: the DataError or UsageError it would raise."""
    _load_inputs(data, strict=strict, seed=0, limit=limit, holdout=holdout)


@dataclass
class _Plan:
    """What :func:`build_dataset` settles before it touches the run folder."""

    source: TeacherSource
    remote: bool
    """An endpoint teacher (``openai:URL#MODEL``): no weights, answers over HTTP."""
    inputs: _Inputs
    sample_params: list[DecodeParams]
    """Sample 0: the greedy answer; samples 1..: drawn at the sample temperature, seeds ``seed + j``."""
    correction: CorrectionConfig | None
    task: Task
    identity: dict[str, Any]
    """data/'s identity: a complete data/ is reused only when it was built with the same one."""
    correction_device: Device | None = None
    """Where teacher correction trains (None: no correction)."""


@dataclass(frozen=True)
class _AnsweringTeacher:
    """The teacher that answers the prompts: the resolved one, or the corrected one."""

    source: TeacherSource
    folder: Path
    """Its folder: RUN/teacher, RUN/teacher-corrected, or an endpoint's answer cache."""
    context: list[dict[str, str]]
    """The teacher-only turns before each prompt (none for a corrected teacher)."""
    corrected: dict[str, Any] | None
    """correct.py's report of the correction (None: not corrected)."""


@locked_stage("distill data", lambda kw: kw["run_dir"])
def build_dataset(*, teacher: str, data: Path | str | None, run_dir: Path, limit: int | None = None,
                  strict: bool = False, seed: int = 0, progress: ProgressFn = null_progress,
                  allow_pickle: bool = False, trust_remote_code: bool = False,
                  correct: bool = False, correction: CorrectionConfig | None = None,
                  samples: int = 1, sample_temperature: float = 0.8,
                  endpoint: EndpointConfig | None = None, answer_format: RegexAnswer | JsonAnswer | None = None,
                  holdout: Path | None = None, system_prompt: str | None = None, device: str | None = None,
                  precision: str = "auto", profile_device: str | None = None,
                  chat_template: Path | None = None, stop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Generate, filter and store teacher data for distillation; return data/report.json.

    ``data`` is a prompts JSONL or ``builtin:NAME`` (a shipped domain; None: the demo).
    Nothing is written when the teacher spec or the prompts are bad. A complete data/ folder
    from the same teacher and inputs is returned as is (``"skipped": true``).
    ``allow_pickle`` / ``trust_remote_code`` opt in to loading an HF teacher folder that
    needs them (refused by default). ``correct`` first adapts the teacher to the training
    rows' references (see correct.py); the corrected teacher then answers the student's
    prompts without demonstrations, and training and eval use it (``teacher_dir`` in the report).
    The correction trains where ``device``/``precision`` say (device.py ``resolve_device``; None:
    ``profile_device``, which the pipeline passes from its profile's ``[training] device``; without a
    profile the CPU, and ``auto`` the first accelerator found);
    an absent device is refused before anything is loaded. Without ``correct`` they are unused.
    ``samples`` answers are asked per training prompt: the greedy one, then samples drawn at
    ``sample_temperature``; answers that repeat a kept one for the same prompt are dropped as
    ``duplicate`` (see data_answers.py). The report's ``contamination`` compares the holdout
    with the training prompts and the kept answers (see contamination.py).
    An endpoint teacher (``openai:URL#MODEL``, called as ``endpoint`` says) has no weights to
    materialize, and the report's ``distillation`` says whether its answers came with logprobs
    (see endpoint.py). Every teacher's answers are cached under ``RUN/cache/teacher`` as they
    arrive, so a rerun after a crash resumes (``teacher_cache`` counts hits and misses).
    ``answer_format`` (edgepack/task.py ``answer_from_options``) replaces the data's own format
    check (the demo's, a shipped domain's schema); it is part of data/'s identity and reported
    as ``format_check``. ``system_prompt`` (``--system-prompt``) is the system turn of every row
    without one (a shipped domain's by default).
    The task (answer kind, labels, system prompt, decoding, primary metric) goes to
    ``RUN/task.json``; its hash is part of data/'s identity. ``chat_template`` (a Jinja file) is
    the teacher's chat template when it has none (a base model) or replaces its own
    (teachers.py); its hash is part of data/'s identity. ``stop`` (``--stop``, at most 4, none
    empty: refused before the teacher is read) ends each answer before the first stop string the
    teacher writes (generate.py); it is part of the decoding, so of data/'s identity and the
    answer cache's keys.
    """
    from edgepack.distill.data_answers import answer_prompts

    plan = _plan(teacher=teacher, data=data, limit=limit, strict=strict, seed=seed, allow_pickle=allow_pickle,
                 trust_remote_code=trust_remote_code, correct=correct, correction=correction, samples=samples,
                 sample_temperature=sample_temperature, answer_format=answer_format, holdout=holdout,
                 system_prompt=system_prompt, device=device, precision=precision, profile_device=profile_device,
                 chat_template=chat_template, stop=tuple(stop))
    run_dir = Path(run_dir)
    out = run_dir / DATA_DIR
    reused = _complete_report(out, run_dir, plan, system_prompt)
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    answering = _answering_teacher(plan, run_dir, seed, progress)
    # Endpoint teachers keep their answers in the folder they are given (``answering.folder``
    # is RUN/cache/teacher); local ones get the same cache through ``cache_dir``.
    options = {"endpoint": endpoint} if plan.remote else {"cache_dir": run_dir / TEACHER_CACHE_DIR}
    answers = answer_prompts(answering.source, answering.folder, options, plan.sample_params,
                             train=plan.inputs.train, holdout=plan.inputs.holdout, context=answering.context,
                             labels=plan.inputs.labels, task=plan.task, progress=progress)
    report = _report(plan, answering, answers, seconds=time.perf_counter() - t0)
    _write_data(out, answers, answering.context, report)
    save_task(plan.task, run_dir / TASK_FILE)
    return report


def _plan(*, teacher: str, data: Path | str | None, limit: int | None, strict: bool, seed: int,
          allow_pickle: bool, trust_remote_code: bool, correct: bool, correction: CorrectionConfig | None,
          samples: int, sample_temperature: float, answer_format: RegexAnswer | JsonAnswer | None,
          holdout: Path | None, system_prompt: str | None, device: str | None = None, precision: str = "auto",
          profile_device: str | None = None, chat_template: Path | None = None,
          stop: tuple[str, ...] = ()) -> _Plan:
    """Resolve the teacher and the inputs, check the options, and derive the task and data/'s
    identity (:func:`build_dataset`'s arguments); raises before anything is written."""
    from edgepack.distill.generate import DecodeParams
    from edgepack.stop import check_stop
    from edgepack.distill.teachers import resolve_teacher

    check_stop(stop)  # before the teacher is resolved (a GGUF's header is read there)

    source = resolve_teacher(teacher, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             chat_template=chat_template)
    remote = source.kind == "openai"  # an endpoint: no weights, answers over HTTP
    if remote and correct:
        raise UsageError("--correct-teacher needs the teacher's weights; an endpoint teacher has none",
                         hint="pass a local HF folder, a .gguf or builtin:NAME to correct it")
    correction_device = None
    if correct:
        from edgepack.distill.device import resolve_device

        correction_device = resolve_device(device, profile_device, precision)
    inputs = _load_inputs(data, strict=strict, seed=seed, limit=limit, holdout=holdout, system=system_prompt)
    if samples < 1 or sample_temperature <= 0:
        raise UsageError(f"--samples must be at least 1 and the sample temperature above 0 "
                         f"(got {samples}, {sample_temperature})")
    params = DecodeParams(seed=seed, stop=stop)
    sample_params = [params] + [DecodeParams(temperature=sample_temperature, seed=seed + j, stop=stop)
                                for j in range(1, samples)]
    correction = (correction or CorrectionConfig()) if correct else None
    identity = {"teacher_sha256": source.sha256, "inputs": inputs.files, "seed": seed, "limit": limit,
                "decoding": [p.describe() for p in sample_params], "correction": correction.describe() if correction else None}
    if source.chat_template is not None:  # absent without --chat-template, as before the option
        identity["teacher_chat_template"] = source.describe()["chat_template_sha256"]
    if (where := device_identity(correction_device)) is not None:  # absent for the CPU in fp32 (the default)
        identity["correction_device"] = where
    answer_format = answer_format or inputs.answer  # the user's format, else a shipped domain's
    if answer_format is not None:  # absent for the demo format, so data/ built before the option stays valid
        identity["format_check"] = answer_format.format_check()
    # The corrected teacher answers without demonstrations (see _answering_teacher), so its task has none.
    task = build_task(answer=answer_format, labels=inputs.labels, system_prompt=inputs.system_prompt,
                      demonstrations=[] if correction else inputs.context)
    identity["task"] = task.sha256()
    return _Plan(source, remote, inputs, sample_params, correction, task, identity, correction_device)


def _complete_report(out: Path, run_dir: Path, plan: _Plan, system_prompt: str | None) -> dict[str, Any] | None:
    """The report of a complete data/ built with ``plan``'s identity (``"skipped": true``), or
    None when there is no data/ yet; a data/ from other inputs, or an incomplete one, is refused."""
    if is_complete(out):
        report = json.loads((out / DATA_REPORT).read_text())
        if not _same_identity(report.get("identity"), plan.identity, system_prompt):
            raise RunDirError(f"{out} was built from another teacher or other inputs",
                              hint="use a new run folder, or the same --teacher/--data/--seed/--limit")
        if not (run_dir / TASK_FILE).is_file():  # a run built before the task contract, or a crash before it
            save_task(plan.task, run_dir / TASK_FILE)
        return {**report, "skipped": True}
    if out.exists():
        raise RunDirError(f"{out} exists but is not complete", hint="delete it and rerun")
    return None


def _answering_teacher(plan: _Plan, run_dir: Path, seed: int, progress: ProgressFn) -> _AnsweringTeacher:
    """Materialize the teacher (``RUN/teacher``; an endpoint has nothing to materialize) and,
    when ``plan`` asks for it, correct it (``RUN/teacher-corrected``, see correct.py)."""
    from edgepack.distill.correct import correct_teacher, load_corrected_source
    from edgepack.distill.teachers import materialize_teacher

    teacher_dir = (run_dir / TEACHER_CACHE_DIR if plan.remote
                   else materialize_teacher(plan.source, run_dir / TEACHER_DIR, progress))
    if plan.correction is None:
        return _AnsweringTeacher(plan.source, teacher_dir, plan.inputs.context, None)
    corrected = correct_teacher(teacher_dir=teacher_dir, before=plan.source, train=plan.inputs.train,
                                holdout=plan.inputs.holdout, out_dir=run_dir / TEACHER_CORRECTED_DIR, seed=seed,
                                config=plan.correction, task=plan.task, device=plan.correction_device,
                                progress=progress)
    folder = run_dir / TEACHER_CORRECTED_DIR
    # The corrected teacher answers the student's prompt as it is, without demonstrations.
    return _AnsweringTeacher(load_corrected_source(folder), folder, [], corrected)


_CORRECTION_KEYS = ("rows_used", "steps", "first_loss", "final_loss", "train_s", "device", "precision",
                    "metric", "score_before", "score_after", "holdout_scored")  # correct.py's report, in data's


def _report(plan: _Plan, answering: _AnsweringTeacher, answers: TeacherAnswers, *, seconds: float) -> dict[str, Any]:
    """data/report.json: the identity, the teacher and task, what was asked, kept and dropped
    (and why), the teacher's holdout accuracy, contamination, timing and warnings."""
    from edgepack.distill.contamination import contamination_report
    from edgepack.distill.generate import distillation_mode

    inputs, task, corrected = plan.inputs, plan.task, answering.corrected
    contamination = contamination_report(answers.hold_rows, [r.record(None) for r in inputs.train],
                                         answers.train_rows)
    return {
        "identity": plan.identity,
        "teacher": answering.source.describe(),
        "teacher_dir": None if plan.remote else answering.folder.name,
        # Answers refused as invalid are not training data, so they do not decide the mode.
        **distillation_mode([a for a in answers.answers if not is_invalid_answer(a)], answers.endpoints),
        "teacher_correction": None if corrected is None else {k: corrected.get(k) for k in _CORRECTION_KEYS},
        "data": inputs.source,
        "labels": sorted(inputs.labels) if inputs.labels else None,
        "label_spellings": inputs.label_spellings,
        "decoding": [p.describe() for p in plan.sample_params],
        "samples_per_prompt": len(plan.sample_params),
        # None: a free-form (text) task without a user format gets no format check.
        "format_check": task.answer.format_check(),
        "task": {"file": TASK_FILE, **task.describe()},
        "teacher_cache": answers.cache,
        "teacher_context_turns": len(answering.context),
        "input_rows": len(inputs.train) + len(inputs.holdout) + len(inputs.bad),
        "bad_rows": len(inputs.bad),
        "bad_row_details": inputs.bad[:100],
        "train_prompts": len(inputs.train),
        "kept": len(answers.train_rows),
        "dropped": sum(answers.dropped.values()),
        "drop_reasons": answers.dropped,
        "holdout_prompts": len(answers.hold_rows),
        "teacher_holdout_accuracy": round(answers.correct / answers.labelled, 4) if answers.labelled else None,
        "teacher_holdout_labelled": answers.labelled,
        "contamination": contamination,
        "generated_tokens": answers.tokens,
        "seconds": round(seconds, 2),
        "generated_tokens_per_s": round(answers.tokens / seconds, 1) if seconds > 0 else None,
        "warnings": _warnings(inputs.label_spellings, answers.invalid, len(answers.answers), inputs.bad),
    }


def _write_data(out: Path, answers: TeacherAnswers, context: list[dict[str, str]], report: dict[str, Any]) -> None:
    """Write RUN/data atomically (atomic.py: complete only once every file is in): the kept
    training rows, the holdout rows, the teacher-only context and the report."""
    with atomic_dir(out) as tmp:
        _write_jsonl(tmp / TRAIN_FILE, answers.train_rows)
        _write_jsonl(tmp / HOLDOUT_FILE, answers.hold_rows)
        write_json(tmp / TEACHER_CONTEXT, {"messages": context,
                                           "note": "teacher-only turns inserted after the system turn"})
        write_json(tmp / DATA_REPORT, report)


def _same_identity(recorded: Any, identity: dict[str, Any], system_prompt: str | None) -> bool:
    """Whether a complete data/ was built from these inputs. One built before the task contract
    has no ``task`` in its identity; its task follows from the same inputs unless a
    ``--system-prompt`` (which did not exist then) is given now."""
    if recorded == identity:
        return True
    legacy = {k: v for k, v in identity.items() if k != "task"}
    return isinstance(recorded, dict) and "task" not in recorded and system_prompt is None and recorded == legacy


SHOWN_BAD_LINES = 5  # line numbers named in the warning; every one is in the report's bad_row_details


def _warnings(spellings: dict[str, dict[str, int]], invalid: list[str], answers: int,
              bad: list[dict[str, Any]]) -> list[str]:
    """One line per thing the user should know about the data that is not an error."""
    lines = []
    if bad:
        shown = ", ".join(f"{Path(b['file']).name}:{b['line']}" if b.get("file") else str(b["line"])
                          for b in bad[:SHOWN_BAD_LINES])
        more = f" and {len(bad) - SHOWN_BAD_LINES} more" if len(bad) > SHOWN_BAD_LINES else ""
        lines.append(f"{len(bad)} bad data line{'s' if len(bad) > 1 else ''} skipped (line{'s' if len(bad) > 1 else ''} "
                     f"{shown}{more}; first: {bad[0]['reason']}); each is in data/report.json bad_row_details, "
                     "and --strict stops at the first instead")
    for label, others in spellings.items():
        shown = ", ".join(f"{ascii(s)} ({n} rows{', look-alike letters' if _looks_alike(s, label) else ''})"
                          for s, n in others.items())
        lines.append(f"label {label!r}: {len(others)} other spelling{'s' if len(others) > 1 else ''} "
                     f"merged into it: {shown}")
    if invalid:
        lines.append(f"{len(invalid)} of {answers} teacher answers were invalid and their rows refused "
                     f"(invalid_answer); first: {invalid[0]}")
    return lines


def _looks_alike(spelling: str, label: str) -> bool:
    """Merged only because letters of another script read as Latin ones (not by case or width)."""
    return fold_label(spelling) != label


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            # allow_nan=False: NaN/Infinity are not JSON, and nothing upstream may let them through.
            fh.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")


def teacher_dir_of(run_dir: Path) -> Path:
    """The teacher folder the run's data came from (and training and eval use): ``RUN/teacher``,
    or ``RUN/teacher-corrected`` after teacher correction, as data/report.json records it."""
    report_path = Path(run_dir) / DATA_DIR / DATA_REPORT
    name = json.loads(report_path.read_text()).get("teacher_dir", TEACHER_DIR) if report_path.is_file() else TEACHER_DIR
    if name is None:
        # An endpoint teacher (openai:URL#MODEL): no weights for online KD or teacher-forced
        # eval; training on its answers (response-only or top-k logprobs) is not built yet.
        raise UsageError(f"{report_path.parent} came from an endpoint teacher, which has no local weights",
                         hint="run `edgepack distill data` with a local teacher (HF folder, .gguf or builtin:NAME)")
    if name not in (TEACHER_DIR, TEACHER_CORRECTED_DIR):
        raise RunDirError(f"{report_path}: unexpected teacher_dir {name!r}")
    return Path(run_dir) / name


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file this stage wrote (train.jsonl / holdout.jsonl)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
