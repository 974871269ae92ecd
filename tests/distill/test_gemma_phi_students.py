"""Gemma 3 (text) and Phi-3 as teachers and students: depth and width pruning, LoRA targets,
`distill train` (full and LoRA) on a tiny teacher whose student converts to GGUF and ONNX and
matches transformers on llama.cpp and onnxruntime, and a Gemma 3 GGUF as the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgepack.constants import STUDENT_DIR, STUDENT_INFO
from edgepack.distill.student import build_student
from edgepack.distill.train import TrainConfig, train_student
from edgepack.distill.width import prune_mlp
from edgepack.export.gguf.convert import convert_hf_to_gguf
from edgepack.profiles import load_profile
from tests.distill.conftest import make_run
from tests.export.helpers import PROMPTS, _common, _save_model, encode, hf_logits, llama_logits

PROFILE = load_profile("cpu-x86-2c")
FAST = TrainConfig(lr=1e-2, save_every=2, warmup_fraction=0.2, alpha=0.0)


def _gemma3(tok_dir: Path, out: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # 12 layers: two of llama.cpp's six-layer patterns (layers 5 and 11 global).
    cfg = Gemma3TextConfig(**{**_common(tok_dir), "num_hidden_layers": 12}, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, architectures=["Gemma3ForCausalLM"])
    return _save_model(Gemma3ForCausalLM, cfg, tok_dir, out, seed=11)


def _phi3(tok_dir: Path, out: Path) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(**{**_common(tok_dir), "num_hidden_layers": 6}, original_max_position_embeddings=512,
                     tie_word_embeddings=False, architectures=["Phi3ForCausalLM"])
    return _save_model(Phi3ForCausalLM, cfg, tok_dir, out, seed=12)


BUILDERS = {"Gemma3ForCausalLM": _gemma3, "Phi3ForCausalLM": _phi3}


@pytest.fixture(scope="module")
def teachers(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma_phi")
    return {name: build(tiny_llama_dir, root / name) for name, build in BUILDERS.items()}


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_width_pruning_equals_zeroing_the_dropped_channels(name: str, teachers: dict[str, Path]) -> None:
    """Phi-3's fused gate_up_proj loses gate row c and up row c + intermediate together."""
    model = _load(teachers[name])
    n, blocks = model.config.intermediate_size, model.config.num_hidden_layers
    dropped = [(7 * b + 3) % n for b in range(blocks)]
    pruned = prune_mlp(model, [[c for c in range(n) if c != d] for d in dropped]).eval()
    assert pruned.config.intermediate_size == n - 1
    zeroed = _load(teachers[name])
    with torch.no_grad():
        for layer, d in zip(zeroed.model.layers, dropped):
            layer.mlp.down_proj.weight[:, d] = 0.0
    ids = torch.tensor([encode(teachers[name], PROMPTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, zeroed(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-3)


def test_depth_pruned_gemma3_keeps_llama_cpp_layer_pattern(teachers: dict[str, Path], tmp_path: Path) -> None:
    teacher = _load(teachers["Gemma3ForCausalLM"])
    # Kept blocks 0, 4, 5, 6, 10, 11 hold types S S F S S F sliced; llama.cpp's graph for a
    # 6-layer gemma3 is S S S S S F, which the student's config must then say.
    student = build_student(teacher, [0, 4, 5, 6, 10, 11])
    assert student.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    out = tmp_path / "student"
    student.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / f).write_bytes((teachers["Gemma3ForCausalLM"] / f).read_bytes())
    path = convert_hf_to_gguf(out, tmp_path / "s.gguf", outtype="F32")
    ids = encode(out, PROMPTS[2])
    assert np.array_equal(llama_logits(path, ids).argmax(-1), hf_logits(out, ids).argmax(-1))


def test_correction_lora_targets_reach_phi3_fused_projections(teachers: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    from edgepack.distill.correct import LORA_TARGETS

    for name, wanted in [("Phi3ForCausalLM", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
                         ("Gemma3ForCausalLM", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"})]:
        peft_model = get_peft_model(_load(teachers[name]), LoraConfig(r=2, target_modules=list(LORA_TARGETS)))
        adapted = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
        assert adapted == wanted, name


@pytest.mark.parametrize("name,method,mlp_keep", [("Gemma3ForCausalLM", "full", 1.0), ("Phi3ForCausalLM", "full", 0.5),
                                                  ("Phi3ForCausalLM", "lora", 1.0)])
def test_distill_train_then_gguf_and_onnx_match_transformers(name: str, method: str, mlp_keep: float,
                                                             teachers: dict[str, Path], tmp_path: Path) -> None:
    from edgepack.export.onnx.convert import export_onnx

    run = make_run(tmp_path / "run", teachers[name])
    report = train_student(run_dir=run, profile=PROFILE, student="auto", steps=4, seed=0, resume=False,
                           config=FAST, method=method, mlp_keep=mlp_keep)
    assert len(report["loss_curve"]) == 4 and all(np.isfinite(h["loss"]) for h in report["loss_curve"])
    assert report["plan"]["method"] == method  # lora: all-linear adapters on Phi-3's fused projections, merged
    student = run / STUDENT_DIR
    info = (student / STUDENT_INFO).read_text()
    assert '"kept_layers"' in info
    config = _load(student).config
    assert config.architectures == [name]
    assert config.num_hidden_layers < 12 if name.startswith("Gemma") else config.num_hidden_layers < 6
    if mlp_keep < 1.0:
        assert config.intermediate_size == 64
    path = convert_hf_to_gguf(student, tmp_path / "student-F32.gguf", outtype="F32")
    worst = 0.0
    for prompt in PROMPTS:
        ids = encode(student, prompt)
        ref, got = hf_logits(student, ids), llama_logits(path, ids)
        worst = max(worst, float(np.abs(ref - got).max()))
        assert np.array_equal(ref.argmax(-1), got.argmax(-1)), prompt
    assert worst < 1e-2
    onnx = export_onnx(student, tmp_path / "onnx", quant="fp32")
    assert onnx["parity"]["top1_agreement_vs_torch"] == 1.0 and onnx["parity"]["fp32_vs_torch_max_abs_diff"] < 1e-3


def test_a_gemma3_gguf_teacher_materializes_for_distill_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A Gemma 3 GGUF (SentencePiece vocab) as the teacher: its rebuilt tokenizer and dequantized
    model agree with llama.cpp on the GGUF. head_dim 256 as in Gemma 3 270M/1B: a GGUF does not
    store query_pre_attn_scalar, and transformers' default (256) is right only there."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from edgepack.distill.teachers import materialize_teacher, resolve_teacher
    from tests.export.helpers import build_spm_tokenizer

    tok_dir = build_spm_tokenizer(tmp_path / "tok", space_prefix=False)
    cfg = Gemma3TextConfig(**{**_common(tok_dir), "num_hidden_layers": 6}, head_dim=256, sliding_window=8,
                           architectures=["Gemma3ForCausalLM"])
    hf_dir = _save_model(Gemma3ForCausalLM, cfg, tok_dir, tmp_path / "gemma", seed=13)
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / "gemma-F16.gguf", outtype="F16")
    teacher = materialize_teacher(resolve_teacher(str(gguf_path)), tmp_path / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        for prompt in PROMPTS[::2]:
            assert tok.encode(prompt, add_special_tokens=False) == \
                llm.tokenize(prompt.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    ref, got = hf_logits(teacher, ids), llama_logits(gguf_path, ids)
    assert np.array_equal(ref.argmax(-1), got.argmax(-1)) and float(np.abs(ref - got).max()) < 0.05


@pytest.mark.slow  # about 2 minutes per family on 2 cores: the whole pipeline, three artifacts gated
@pytest.mark.parametrize("name", list(BUILDERS))
def test_pipeline_gates_a_gemma3_or_phi3_student(name: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """distill data → train → eval → export (GGUF and ONNX) → gate → pack → run, for each family."""
    from edgepack.pipeline import PipelineConfig, run_pipeline
    from tests.edgepack.test_pipeline import _lenient_profile, _prompts, _rows
    from tests.tiny import teach_tiny

    teacher = teach_tiny(BUILDERS[name](tiny_llama_dir, tmp_path / "teacher"),
                         [(r["prompt"], r["reference"]) for r in _rows(12)])
    cfg = PipelineConfig(profile=load_profile(_lenient_profile(tmp_path)), teacher=str(teacher),
                         data=_prompts(tmp_path / "p.jsonl", 12), run_dir=tmp_path / "run", steps=2, limit=None, seed=0)
    result = run_pipeline(cfg)
    assert [s["stage"] for s in result["stages"]] == ["distill data", "distill train", "eval", "export", "gate",
                                                      "pack", "run"]
    assert result["verdict"] == "PASS", result["gates"]
    # Every choice (GGUF Q8_0 and Q4_0, ONNX int4) was exported, measured and is a row of the gate table.
    assert [r["format"] for r in result["summary"]] == ["gguf", "gguf", "onnx"]
    assert all(r["decode_tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["summary"])
    assert _load(tmp_path / "run" / STUDENT_DIR).config.architectures == [name]
