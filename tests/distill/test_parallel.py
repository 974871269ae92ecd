"""Data parallel training: 2 CPU processes under torchrun (gloo) match 1 process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from edgepack.constants import CHECKPOINT_DIR, STUDENT_DIR, TRAIN_REPORT
from tests.distill.conftest import make_run

ARGS = ["distill", "train", "--profile", "cpu-x86-2c", "--steps", "12", "--seed", "3", "--json"]


def _train(run: Path, launcher: list[str], extra: list[str] = ()) -> dict:
    env = {**os.environ, "EDGEPACK_DEBUG": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "edgepack", *ARGS, *extra, str(run)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / STUDENT_DIR / TRAIN_REPORT).read_text())


def test_two_gloo_processes_match_one(tmp_path: Path, tiny4_dir: Path) -> None:
    one = _train(make_run(tmp_path / "one", tiny4_dir), [sys.executable])
    two = _train(make_run(tmp_path / "two", tiny4_dir),
                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert one["data_parallel_processes"] == 1 and two["data_parallel_processes"] == 2
    # The same global batch (4 rows, 2 micro-batches of 2): one micro-batch per rank, gradients summed.
    assert one["tokens"] == two["tokens"]
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
    w1 = load_file(str(tmp_path / "one" / STUDENT_DIR / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / STUDENT_DIR / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4)
    # Rank 0 alone wrote the step-10 checkpoint; no rank left a half-written one beside it.
    names = sorted(p.name for p in (tmp_path / "two" / CHECKPOINT_DIR).iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "one" / CHECKPOINT_DIR).iterdir())


def test_on_policy_steps_sample_the_same_completions_on_two_processes(tmp_path: Path, tiny4_dir: Path) -> None:
    """Each micro-batch samples from its own stream (seed, step, first row): which rank runs it does not matter."""
    extra = ["--on-policy", "0.5", "--steps", "4"]
    one = _train(make_run(tmp_path / "one", tiny4_dir), [sys.executable], extra)
    two = _train(make_run(tmp_path / "two", tiny4_dir),
                 [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], extra)
    assert one["on_policy"]["steps_on_policy"] == two["on_policy"]["steps_on_policy"] >= 1
    assert one["tokens"] == two["tokens"]  # the same sampled completions, summed over both ranks
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert a.get("on_policy") == b.get("on_policy")
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
