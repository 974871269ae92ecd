"""Depth pruning: block ranking, weight copying and sizing for a profile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgepack.distill.student import (choose_num_layers, count_params, derive_student, estimate_deploy_mb,
                                      layer_importance, select_layers)
from edgepack.errors import BudgetError, UsageError
from edgepack.profiles import load_profile

TEXTS = ["<|im_start|>user\nPump P-101 discharge pressure low<|im_end|>\n<|im_start|>assistant\n"
         "Category: mechanical\nAction: Inspect the pump.<|im_end|>\n",
         "Flow transmitter FT-204 reading drifts by 3.5% against the reference meter."]


def _ids(tok_dir: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return torch.tensor([tok(TEXTS[1]).input_ids])


def test_keeping_all_layers_reproduces_the_teacher(tiny4_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir, dtype=torch.float32).eval()
    student, desc = derive_student(tiny4_dir, keep=[0, 1, 2, 3])
    ids = _ids(tiny4_dir)
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, teacher(ids).logits)
    assert desc["params"] == desc["teacher_params"] == count_params(teacher)


def test_pruned_student_keeps_shapes_and_copies_weights(tiny4_dir: Path, tmp_path: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir, dtype=torch.float32)
    student, desc = derive_student(tiny4_dir, calibration=TEXTS, num_layers=2, out_dir=tmp_path / "s")
    assert desc["kept_layers"] == [0, 3]  # first and last always kept
    assert student.config.num_hidden_layers == 2
    assert len(desc["importance"]) == 4 and all(x >= 0 for x in desc["importance"])
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for name, value in s_sd.items():
        src = name.replace("layers.1.", "layers.3.")
        assert value.shape == t_sd[src].shape
        assert torch.equal(value, t_sd[src]), name
    # Tied embeddings stay tied, and the saved folder loads back to the same outputs.
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = _ids(tiny4_dir)
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, student.eval()(ids).logits)


def test_three_of_four_keeps_the_most_important_middle_block(tiny4_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    imp = layer_importance(teacher, tok, TEXTS)
    _, desc = derive_student(tiny4_dir, calibration=TEXTS, num_layers=3)
    middle = 1 if imp[1] >= imp[2] else 2
    assert desc["kept_layers"] == [0, middle, 3]
    assert desc["importance"] == [round(x, 6) for x in imp]


def test_two_to_one_layer_on_the_fixture(tiny_llama_dir: Path) -> None:
    student, desc = derive_student(tiny_llama_dir, calibration=TEXTS, num_layers=1)
    assert student.config.num_hidden_layers == 1 and len(desc["kept_layers"]) == 1
    assert desc["params"] < desc["teacher_params"]


def test_select_layers() -> None:
    assert select_layers([0.5, 0.1, 0.3, 0.2, 0.4], 3) == [0, 2, 4]
    assert select_layers([0.5, 0.1, 0.3, 0.2, 0.4], 4) == [0, 2, 3, 4]
    assert select_layers([0.1, 0.9, 0.3], 1) == [1]
    with pytest.raises(UsageError):
        select_layers([0.1, 0.2], 3)


def test_importance_ignores_padding(tiny4_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    alone = layer_importance(teacher, tok, [TEXTS[1]])
    # The same text padded next to a longer one (right padding) gives the same scores.
    padded = layer_importance(teacher, tok, [TEXTS[1], TEXTS[1] + " and again" * 5])
    longer = layer_importance(teacher, tok, [TEXTS[1] + " and again" * 5])
    n1, n2 = len(tok(TEXTS[1]).input_ids), len(tok(TEXTS[1] + " and again" * 5).input_ids)
    for a, p, lo in zip(alone, padded, longer):
        assert p == pytest.approx((a * n1 + lo * n2) / (n1 + n2), rel=1e-4)


def test_sizing_for_profiles(tiny4_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny4_dir)
    prof = load_profile("cpu-x86-2c")
    sizing = choose_num_layers(teacher, prof)
    assert sizing["num_layers"] == 2  # 3 blocks would be > 60% of the parameters
    assert sizing["params_estimate"] <= 0.6 * count_params(teacher)
    # A memory budget below the runtime baseline leaves no student.
    with pytest.raises(BudgetError):
        choose_num_layers(teacher, replace(prof, memory_budget_mb=1))


def test_two_layer_teacher_cannot_be_pruned_to_60_percent(tiny_llama_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(BudgetError, match="60%"):
        choose_num_layers(teacher, load_profile("cpu-x86-2c"))


def test_deploy_estimate_uses_first_choice_and_context(tiny4_dir: Path) -> None:
    from edgepack.memory import predict_memory
    from edgepack.profiles.fit import shape_from_config

    cfg = AutoModelForCausalLM.from_pretrained(tiny4_dir).config
    prof = load_profile("cpu-x86-2c")  # gguf:Q8_0 first, context 2048
    base = estimate_deploy_mb(1_000_000, 2, cfg, prof)
    q4 = estimate_deploy_mb(1_000_000, 2, cfg, replace(prof, choices=prof.choices[3:]))  # gguf:Q4_K_M
    shape = shape_from_config({**cfg.to_dict(), "num_hidden_layers": 2}, params=1_000_000)
    expected = [predict_memory("gguf", shape, q, 2048).total_bytes / 2**20 for q in ("Q8_0", "Q4_K_M")]
    assert [base, q4] == pytest.approx(expected) and q4 < base
    assert estimate_deploy_mb(1_000_000, 2, cfg, replace(prof, context_length=4096)) > base
    assert estimate_deploy_mb(1_000_000, 4, cfg, prof) > base  # more blocks, more KV cache
