"""The embedded SmolLM2-135M-Instruct teacher: materialize it and answer through llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.atomic import is_complete
from edgepack.distill.teachers import SOURCE_FILE, materialize_teacher, resolve_teacher

pytestmark = pytest.mark.slow

SPEC = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_teacher(resolve_teacher(SPEC), tmp_path_factory.mktemp("builtin") / "teacher")


def test_materialized_teacher_is_a_complete_hf_folder(teacher_dir: Path, builtin_teacher_gguf: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert is_complete(teacher_dir)
    src = json.loads((teacher_dir / SOURCE_FILE).read_text())
    assert src["kind"] == "gguf" and src["path"] == str(builtin_teacher_gguf) and len(src["sha256"]) == 64
    cfg = AutoConfig.from_pretrained(teacher_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.chat_template
    gen = json.loads((teacher_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_hf_template_tokens_match_llama_cpp(teacher_dir: Path, builtin_teacher_gguf: Path) -> None:
    """Prompts are rendered with the HF template and tokenized by llama.cpp with special=True."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgepack.distill.data import DEMO_SYSTEM_PROMPT

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    msgs = [{"role": "system", "content": DEMO_SYSTEM_PROMPT},
            {"role": "user", "content": "Pump P-101 bearing at 9.8 mm/s; Über-Temperatur 85 °C at 14:32."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    llm = Llama(model_path=str(builtin_teacher_gguf), n_ctx=512, n_threads=2, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    finally:
        llm.close()


def test_two_demo_answers_through_llama_cpp(teacher_dir: Path) -> None:
    from edgepack.distill.data import (DEMO_HOLDOUT, DEMO_SYSTEM_PROMPT, load_demo_shots, load_prompts,
                                       with_teacher_context)
    from edgepack.labels import extract_label
    from edgepack.distill.generate import DecodeParams, open_generator

    rows = load_prompts(DEMO_HOLDOUT, system=DEMO_SYSTEM_PROMPT).rows[:2]
    shots = load_demo_shots()
    with open_generator(resolve_teacher(SPEC), teacher_dir, DecodeParams()) as generate:
        answers = [generate(with_teacher_context(r.messages, shots)) for r in rows]
        again = generate(with_teacher_context(rows[0].messages, shots))
    for a in answers:
        assert a.finished and 0 < a.tokens < 64 and a.text.strip()
        assert extract_label(a.text) is not None  # the demonstrations teach the format
    assert again == answers[0]  # greedy and deterministic, also with the prefix cache reused


def test_auto_student_size_for_the_demo_profile(teacher_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from edgepack.distill.student import choose_num_layers
    from edgepack.profiles import load_profile

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    sizing = choose_num_layers(teacher, load_profile("cpu-x86-2c"))
    # 28.3M embedding + 3.54M per block: 14 blocks is the largest count at <= 60% of 134.5M.
    assert sizing["num_layers"] == 14 and sizing["teacher_params"] == 134_515_008
    assert sizing["params_estimate"] <= 0.6 * sizing["teacher_params"] < sizing["params_estimate"] + 3_540_000
    assert sizing["deploy_mb_estimate"] < 1024
