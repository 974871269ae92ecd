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
