"""Profiles: every shipped file loads; bad files report every problem at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgepack.errors import ProfileError
from edgepack.profiles import PROFILE_DIR, Profile, load_profile, shipped_profiles

REQUIRED = {"cpu-x86-2c", "cpu-arm-rpi5", "gpu-4gb", "gpu-8gb", "mac-m1-8gb", "mac-m2-16gb"}


def test_required_profiles_are_shipped() -> None:
    assert REQUIRED <= set(shipped_profiles())


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, Profile) and p.name == name
    assert p.choices and p.threads > 0 and p.memory_budget_mb > 0
    assert p.prompt_tokens < p.context_length
    if p.device in ("cuda", "metal"):
        assert p.gpu_memory_mb > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threads = 99  # type: ignore[misc]


def test_profile_by_path_equals_by_name(tmp_path: Path) -> None:
    src = (PROFILE_DIR / "cpu-x86-2c.toml").read_text()
    mine = tmp_path / "mine.toml"
    mine.write_text(src.replace('name = "cpu-x86-2c"', 'name = "mine"'))
    p = load_profile(str(mine))
    assert p.name == "mine"
    assert p.choices == load_profile("cpu-x86-2c").choices


def test_unknown_name_lists_shipped() -> None:
    with pytest.raises(ProfileError, match="cpu-x86-2c"):
        load_profile("no-such-device")


def test_malformed_profile_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "bad"\ndescription = "x"\n'
        '[device]\nkind = "tpu"\narch = "x86_64"\nthreads = "two"\nmemory_budget_mb = -5\ncolour = 1\n'
        '[deploy]\nchoices = ["gguf:Q3_XX"]\ncontext_length = 2048\n'
        '[latency]\nprompt_tokens = 128\nttft_p95_ms = 100\n'
        '[quality]\nmin_relative_quality = 0.8\n'
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(bad))
    msg = str(info.value)
    for expected in ("device.kind", "device.threads", "device.memory_budget_mb", "device.colour",
                     "deploy.choices", "latency.min_decode_tokens_per_s", "[training] table missing"):
        assert expected in msg, expected


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(str(bad))


def test_missing_profile_file() -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile("/nonexistent/x.toml")


QUALITY_TOML = """\
name = "q"
description = "x"
[device]
kind = "cpu"
arch = "x86_64"
threads = 1
memory_budget_mb = 512
[deploy]
choices = ["gguf:Q8_0"]
context_length = 256
[latency]
prompt_tokens = 16
ttft_p95_ms = 100
min_decode_tokens_per_s = 1
[quality]
{quality}
[training]
device = "cpu"
memory_mb = 1024
"""


def _quality_profile(tmp_path: Path, quality: str) -> Profile:
    path = tmp_path / "q.toml"
    path.write_text(QUALITY_TOML.format(quality=quality))
    return load_profile(str(path))


def test_quality_budgets_relative_floor_or_both(tmp_path: Path) -> None:
    floor = _quality_profile(tmp_path, "min_score = 0.7")
    assert (floor.min_score, floor.min_relative_quality) == (0.7, None)
    both = _quality_profile(tmp_path, "min_score = 1\nmin_relative_quality = 0.8")
    assert (both.min_score, both.min_relative_quality) == (1.0, 0.8)
    relative = _quality_profile(tmp_path, "min_relative_quality = 0.8")
    assert (relative.min_score, relative.min_relative_quality) == (None, 0.8)


def test_a_profile_must_judge_quality_somehow(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"\[quality\]: set min_relative_quality or min_score \(or both\)"):
        _quality_profile(tmp_path, "")


def test_bad_quality_budgets_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        _quality_profile(tmp_path, "min_score = 1.2\nmin_relative_quality = -0.1")
    msg = str(info.value)
    assert "2 problem(s)" in msg
    assert "quality.min_score: must be between 0 and 1 (the task's primary metric), got 1.2" in msg
    assert "quality.min_relative_quality: must be between 0 and 1.5" in msg
    with pytest.raises(ProfileError, match="quality.min_score: expected float, got str"):
        _quality_profile(tmp_path, 'min_score = "high"')
    with pytest.raises(ProfileError, match="quality.min_score: must be a finite number"):
        _quality_profile(tmp_path, "min_score = nan")


def test_an_unset_floor_leaves_the_hash_as_before_and_a_set_one_changes_it(tmp_path: Path) -> None:
    import hashlib
    import json

    relative = _quality_profile(tmp_path, "min_relative_quality = 0.8")
    # the hash as computed before min_score existed: every field but source
    before = {k: v for k, v in relative.describe().items() if k not in ("source", "min_score")}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert relative.content_hash() == expected
    assert _quality_profile(tmp_path, "min_relative_quality = 0.8\nmin_score = 0.7").content_hash() != expected


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_set_no_floor_and_say_why(name: str) -> None:
    """A floor on the primary metric belongs to the task, not the device (see the TOML comment)."""
    p = load_profile(name)
    assert p.min_score is None and p.min_relative_quality is not None
    assert "No min_score" in (PROFILE_DIR / f"{name}.toml").read_text()
