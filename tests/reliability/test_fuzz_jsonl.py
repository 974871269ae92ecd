"""Fuzzing the prompts/holdout JSONL readers (distill/data.py load_prompts, export/gate/quality.py
load_holdout).

Lines are valid rows with fields replaced by values of any JSON type, arbitrary JSON values,
raw bytes (invalid UTF-8 included), and hostile texts: nesting deeper than the JSON decoder's
recursion limit, integers past Python's 4300-digit parsing limit, lone surrogate escapes.
Each file must load or be refused with DataError within 1 s and bounded memory; rows that are
loaded must be well-formed chat messages of valid Unicode text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgepack.distill.data import PromptSet, load_prompts
from edgepack.errors import DataError
from edgepack.export.gate.quality import load_holdout
from tests.reliability.conftest import FUZZ, bounded

pytestmark = pytest.mark.fuzz

ROLES = ("system", "user", "assistant")
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                      st.sampled_from(["user", "system", "assistant", "", " "]))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["role", "content", "prompt", "x"]) | st.text(max_size=5),
                                                 inner, max_size=3)), max_leaves=8)
VALID = [{"prompt": "Pump P-1 alarm", "label": "mechanical", "response": "Category: mechanical"},
         {"id": "r2", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
HOSTILE = [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "id": ' + b"9" * 5000 + b"}",
           b'{"prompt": "a\\ud800"}', b'{"prompt": "\xff\xfe"}', b'{"messages": [1, 2]}',
           b'{"messages": [{"role": "user", "content": 5}]}', b"\x00" * 64, b'{"prompt": NaN}']


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "edited", "json", "bytes", "hostile"]))
    if kind == "valid":
        return json.dumps(draw(st.sampled_from(VALID))).encode()
    if kind == "edited":
        row = dict(draw(st.sampled_from(VALID)))
        row[draw(st.sampled_from(["prompt", "messages", "id", "label", "response", "reference"]))] = draw(json_values)
        return json.dumps(row).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    return draw(st.sampled_from(HOSTILE))


def write(tmp: Path, rows: list[bytes]) -> tuple[Path, int]:
    path = tmp / "rows.jsonl"
    data = b"\n".join(rows) + b"\n"
    path.write_bytes(data)
    return path, len(data)


def well_formed(messages: Any) -> None:
    assert isinstance(messages, list) and messages
    for m in messages:
        assert isinstance(m, dict) and m["role"] in ROLES and isinstance(m["content"], str)
        m["content"].encode("utf-8")  # valid Unicode: no lone surrogates


@FUZZ
@given(rows=st.lists(lines(), min_size=1, max_size=6), strict=st.booleans())
@example(rows=[HOSTILE[0]], strict=False)
@example(rows=[HOSTILE[1]], strict=True)
@example(rows=[HOSTILE[2]], strict=False)
def test_prompts_load_or_are_refused(rows: list[bytes], strict: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    path, size = write(tmp_path_factory.mktemp("p"), rows)
    result = bounded("prompts JSONL (load_prompts)", load_prompts, path, allowed=DataError, size=size, strict=strict)
    if isinstance(result, PromptSet):
        assert result.rows
        for row in result.rows:
            well_formed(row.messages)
            assert row.messages[-1]["role"] == "user" and isinstance(row.id, str)


@FUZZ
@given(rows=st.lists(lines(), min_size=1, max_size=6))
@example(rows=[HOSTILE[0]])
@example(rows=[HOSTILE[1]])
@example(rows=[HOSTILE[3]])
@example(rows=[HOSTILE[4]])
def test_holdout_loads_or_is_refused(rows: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> None:
    path, size = write(tmp_path_factory.mktemp("h"), rows)
    result = bounded("holdout JSONL (load_holdout)", load_holdout, path, allowed=DataError, size=size)
    if isinstance(result, list):
        for row in result:
            well_formed(row["messages"])
            assert isinstance(row["id"], str)
            assert row["label"] is None or isinstance(row["label"], str)
            assert row["response"] is None or isinstance(row["response"], str)
