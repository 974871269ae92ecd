"""Width pruning of the MLPs: channel ranking, exact slicing, rebuild from the description, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgepack.constants import STUDENT_DIR, STUDENT_INFO
from edgepack.distill.student import count_params, prune_teacher
from edgepack.distill.train import TrainConfig, train_student
from edgepack.distill.width import channel_importance, channels_to_keep, prune_mlp
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run
from tests.distill.test_student import TEXTS


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_pruning_equals_zeroing_the_dropped_channels(tiny4_dir: Path) -> None:
    model, tok = _load(tiny4_dir)
    ids = torch.tensor([tok(TEXTS[0]).input_ids])
    n, blocks = model.config.intermediate_size, model.config.num_hidden_layers
    with torch.no_grad():
        every = prune_mlp(model, [list(range(n))] * blocks).eval()(ids).logits
    torch.testing.assert_close(every, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UsageError, match="equal-sized"):
        prune_mlp(model, [list(range(n)), list(range(n - 1)), list(range(n)), list(range(n))])
    # Drop a different channel in each block; the same as zeroing the down_proj columns they feed.
    dropped = [5, 0, 77, n - 1]
    keep = [[c for c in range(n) if c != d] for d in dropped]
    zeroed, _ = _load(tiny4_dir)
    with torch.no_grad():
        for layer, d in zip(zeroed.model.layers, dropped):
            layer.mlp.down_proj.weight[:, d] = 0.0
        torch.testing.assert_close(prune_mlp(model, keep).eval()(ids).logits, zeroed(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_importance_ranks_active_channels_and_rounds_to_blocks(tiny4_dir: Path) -> None:
    model, tok = _load(tiny4_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[:, 7] = 0.0  # channel 7 of block 2 moves nothing
    imp = channel_importance(model, tok, TEXTS)
    assert len(imp) == 4 and imp[2].shape == (model.config.intermediate_size,)
    assert float(imp[2][7]) == 0.0 and float(imp[2].max()) > 0
    keep = channels_to_keep(imp, 0.5)
    assert {len(k) for k in keep} == {64} and 7 not in keep[2]  # 128 channels → 64 (a multiple of 32)
    assert channels_to_keep(imp, 0.01)[0].__len__() == 32
    with pytest.raises(UsageError, match="--mlp-keep"):
        channels_to_keep(imp, 1.5)


def test_width_pruned_auto_student_trains_and_rebuilds(tmp_path: Path, tiny4_dir: Path) -> None:
    teacher, tok = _load(tiny4_dir)
    run = make_run(tmp_path / "run", tiny4_dir)
    report = train_student(run_dir=run, profile=load_profile("cpu-x86-2c"), steps=2, seed=0, mlp_keep=0.5,
                           config=TrainConfig(lr=1e-2, save_every=100))
    info = json.loads((run / STUDENT_DIR / STUDENT_INFO).read_text())
    assert info["mlp_channels"] == 64 and info["teacher_mlp_channels"] == 128
    assert report["identity"]["mlp_keep"] == 0.5
    trained = AutoModelForCausalLM.from_pretrained(run / STUDENT_DIR)
    assert trained.config.intermediate_size == 64 and count_params(trained) == info["params"]
    # The description rebuilds the undistilled student exactly (eval and LoRA resume rely on it).
    again, desc = prune_teacher(teacher, tok, keep=info["kept_layers"], kept_channels=info["kept_channels"])
    assert desc["params"] == info["params"] and desc["kept_channels"] == info["kept_channels"]
    with pytest.raises(UsageError, match="--mlp-keep width-prunes an `auto` student"):
        train_student(run_dir=make_run(tmp_path / "r2", tiny4_dir), profile=load_profile("cpu-x86-2c"),
                      student=str(tiny4_dir), steps=1, mlp_keep=0.5)
