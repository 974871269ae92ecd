"""Fixtures for the distill tests: a 4-layer tiny teacher and tiny run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.atomic import atomic_dir
from edgepack.constants import DATA_DIR, HOLDOUT_FILE, TEACHER_CONTEXT, TEACHER_DIR, TRAIN_FILE
from tests.tiny import build_tiny_llama

LABELS = ("mechanical", "electrical", "thermal", "network")


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny Llama (so depth pruning has a real choice to make)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny4") / "llama", layers=4)


def train_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        rows.append({
            "id": f"r{i}",
            "messages": [{"role": "system", "content": "Triage the alarm. Answer with a category and an action."},
                         {"role": "user", "content": f"Pump P-{100 + i} alarm {i}: check it"}],
            "response": f"Category: {label}\nAction: Inspect pump P-{100 + i}.",
            "label": label, "reference": None,
        })
    return rows


def make_run(run: Path, teacher_dir: Path, rows: list[dict] | None = None,
             context: list[dict] | None = None) -> Path:
    """A run dir with teacher/ (materialized from ``teacher_dir``) and a small data/."""
    from edgepack.distill.teachers import materialize_teacher, resolve_teacher

    materialize_teacher(resolve_teacher(str(teacher_dir)), run / TEACHER_DIR)
    rows = train_rows() if rows is None else rows
    with atomic_dir(run / DATA_DIR) as tmp:
        (tmp / TRAIN_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / HOLDOUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
        if context is not None:
            (tmp / TEACHER_CONTEXT).write_text(json.dumps({"messages": context}))
    return run


def student_with_another_tokenizer(student_dir: Path, out: Path) -> Path:
    """A copy of ``student_dir`` whose tokenizer has one added token (so it differs from the teacher's)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(student_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(out)
    return out
