"""Fuzzing profile TOML reading (profiles/__init__.py: load_profile).

Inputs: the shipped cpu-x86-2c profile with keys dropped, added or given values of another
type (strings, huge and negative integers, nan/inf, booleans, arrays, tables, dates), and
raw text damage (truncation, inserted bytes, deep nesting). Each must load or be refused with
ProfileError within 1 s and bounded memory; a loaded profile must be usable: finite positive
budgets, a name that is safe in file names, known choices.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgepack.errors import ProfileError
from edgepack.formats import get_format
from edgepack.profiles import DEVICE_KINDS, PROFILE_DIR, Profile, load_profile
from tests.reliability.conftest import FUZZ, bounded
from tests.reliability.test_fuzz_gguf import mutate, ops

pytestmark = pytest.mark.fuzz

BASE_TEXT = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
BASE = tomllib.loads(BASE_TEXT)
SLOTS = [("", k) for k in BASE if not isinstance(BASE[k], dict)] + \
        [(t, k) for t, v in BASE.items() if isinstance(v, dict) for k in v] + [("device", "gpu_memory_mb")]

toml_leaf = st.one_of(
    st.text(max_size=20), st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from([0, -1, 1 << 31, 10 ** 30]),
    st.floats(), st.booleans(), st.dates(), st.datetimes(), st.times(),
    st.sampled_from(["cpu", "cuda", "metal", "gguf:Q8_0", "onnx:int4", "../x", "a/b", "x" * 100]))
toml_values = st.recursive(toml_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text("abc_", min_size=1, max_size=5), inner, max_size=3)),
    max_leaves=6)


def _str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def to_toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v).replace("inf", "inf").lower() if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(to_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_str(k)} = {to_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    lines = [f"{_str(k)} = {to_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{_str(table)}]")
            lines += [f"{_str(k)} = {to_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def check_usable(p: Profile) -> None:
    assert p.name and "/" not in p.name and ".." not in p.name
    assert p.device in DEVICE_KINDS and p.choices
    for c in p.choices:
        assert c.quant in get_format(c.format).quants
    for value in (p.threads, p.memory_budget_mb, p.context_length, p.prompt_tokens, p.ttft_p95_ms,
                  p.min_decode_tokens_per_s, p.train_memory_mb):
        assert math.isfinite(value) and value > 0
    assert p.prompt_tokens < p.context_length and 0 <= p.min_relative_quality <= 1.5
    assert p.gpu_memory_mb >= 0


def load(tmp: Path, text: bytes, label: str) -> Any:
    path = tmp / "p.toml"
    path.write_bytes(text)
    result = bounded(label, load_profile, str(path), allowed=ProfileError, size=len(text))
    if isinstance(result, Profile):
        check_usable(result)
    return result


edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SLOTS), toml_values),
    st.tuples(st.just("drop"), st.sampled_from(SLOTS), st.none()),
    st.tuples(st.just("add"), st.tuples(st.sampled_from(["", "device", "deploy", "extra"]), st.text(min_size=1, max_size=8)),
              toml_values),
)


@FUZZ
@given(changes=st.lists(edits, min_size=1, max_size=4))
@example(changes=[("set", ("latency", "ttft_p95_ms"), float("nan"))])
@example(changes=[("set", ("device", "threads"), 10 ** 30)])
@example(changes=[("set", ("", "name"), "../../etc/x")])
@example(changes=[("set", ("device", "gpu_memory_mb"), -5)])
def test_edited_profile_loads_usable_or_is_refused(changes: list[tuple[str, tuple[str, str], Any]],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    doc = copy.deepcopy(BASE)
    for kind, (table, key), value in changes:
        section = doc if table == "" else doc.setdefault(table, {})
        if not isinstance(section, dict):
            continue
        if kind == "drop":
            section.pop(key, None)
        else:
            section[key] = value
    load(tmp_path_factory.mktemp("p"), to_toml(doc).encode("utf-8"), "profile TOML (edited values)")


@FUZZ
@given(mutations=st.lists(ops, min_size=1, max_size=3))
@example(mutations=[("insert", 0, b"x = " + b"[" * 16)])
def test_damaged_profile_text_is_refused_or_usable(mutations: list[tuple[str, int, object]],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    load(tmp_path_factory.mktemp("d"), mutate(BASE_TEXT.encode(), mutations), "profile TOML (damaged text)")


@pytest.mark.parametrize("text", [b"a = " + b"[" * 5000 + b"]" * 5000, b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000,
                                  b"\xff\xfe", b"name = \"x\"\n" * 200_000])
def test_pathological_profile_files(text: bytes, tmp_path: Path) -> None:
    assert isinstance(load(tmp_path, text, "profile TOML (pathological)"), ProfileError)
