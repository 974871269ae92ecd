"""run.toml: written once, read back, a conflicting rerun refused, and validated for --config."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.errors import RunDirError, UsageError
from edgepack.runconfig import (SEARCH_QUALITY_MODES, load_pipeline_config, pipeline_defaults, pipeline_problems,
                                read_run_config, write_run_config)


def test_roundtrip_and_resume(tmp_path: Path) -> None:
    settings = {"profile": "cpu-x86-2c", "teacher": 'a "quoted" path', "seed": 3, "limit": None,
                "allow_unverified": False}
    written = write_run_config(tmp_path, settings)
    back = read_run_config(tmp_path)
    assert back["teacher"] == 'a "quoted" path' and back["seed"] == 3 and "limit" not in back
    assert back["created"] == written["created"]
    assert write_run_config(tmp_path, settings)["created"] == written["created"]  # resume


def test_conflicting_settings_refused(tmp_path: Path) -> None:
    write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 0})
    with pytest.raises(RunDirError, match="seed"):
        write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 1})


def test_a_key_added_later_resumes_at_its_default(tmp_path: Path) -> None:
    """A run.toml written before a setting existed resumes when the setting is at its default."""
    write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 0})
    defaults = {"search_quality": "until-pass"}
    write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 0, "search_quality": "until-pass"}, defaults)
    with pytest.raises(RunDirError, match="search_quality"):
        write_run_config(tmp_path, {"profile": "cpu-x86-2c", "seed": 0, "search_quality": "all"}, defaults)


def test_pipeline_config_roundtrip(tmp_path: Path) -> None:
    from edgepack.pipeline import PipelineConfig, config_from_settings
    from edgepack.profiles import load_profile

    cfg = PipelineConfig(profile=load_profile("cpu-x86-2c"), teacher="builtin:smollm2-135m-instruct", data=None,
                         run_dir=tmp_path, steps=7, limit=20, seed=3, correct_teacher=True, search_quality="all",
                         device="cpu")
    write_run_config(tmp_path, cfg.settings())
    back = config_from_settings(load_pipeline_config(tmp_path / "run.toml"), tmp_path)
    assert back == cfg
    assert load_pipeline_config(tmp_path) == load_pipeline_config(tmp_path / "run.toml")  # a run folder works too


def test_every_pipeline_key_has_a_valid_default() -> None:
    from edgepack.export.gate.search import QUALITY_MODES

    assert SEARCH_QUALITY_MODES == QUALITY_MODES
    assert pipeline_problems({k: v for k, v in pipeline_defaults().items() if k != "profile"}) == []


@pytest.mark.parametrize("settings,needle", [
    ({"seed": True}, "seed = True: must be an integer"),
    ({"steps": 0}, "steps = 0: must be at least 1"),
    ({"limit": 2.5}, "limit = 2.5: must be an integer"),
    ({"teacher": ""}, "teacher = '': must not be empty"),
    ({"allow_unverified": 1}, "allow_unverified = 1: must be true or false"),
    ({"search_quality": "best"}, "must be one of all, until-pass"),
    ({"device": "tpu"}, "device = 'tpu': must be one of auto, cpu, cuda, mps"),
    ({"schema": 2}, "schema = 2"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_bad_values_name_their_key(settings: dict[str, object], needle: str) -> None:
    problems = pipeline_problems({"profile": "cpu-x86-2c", **settings})
    assert len(problems) == 1 and needle in problems[0], problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('profile = "cpu-x86-2c"\nsteps = -1\nseeds = 3\n')
    with pytest.raises(UsageError) as info:
        load_pipeline_config(path)
    assert "steps = -1" in str(info.value) and "unknown key 'seeds'" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="config file not found"):
        load_pipeline_config(tmp_path / "nope.toml")


def test_the_pipeline_trains_where_device_says(tmp_path: Path) -> None:
    """pipeline's device setting reaches distill train: on this CPU-only machine device = "cuda"
    is refused before any training work (a UsageError: one line, exit 2), not replaced silently."""
    import torch

    from edgepack.errors import UsageError
    from edgepack.pipeline import PipelineConfig, distill_train
    from edgepack.profiles import load_profile

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be observed here")
    cfg = PipelineConfig(profile=load_profile("gpu-8gb"), teacher="builtin:smollm2-135m-instruct", data=None,
                         run_dir=tmp_path, device="cuda")
    with pytest.raises(UsageError, match="--device cuda is not available"):
        distill_train(cfg)
    assert not (tmp_path / "student").exists()
