"""A real Gemma 3 GGUF as the teacher of `distill data` (#19): the 270M base model from PyPI, which
has no chat template, given one with --chat-template (slow: dequantizes 270M parameters). A base
model never ends its turn; with a stop string (``--stop``) its answers end and are kept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgepack.constants import DATA_DIR, TEACHER_CACHE_DIR, TEACHER_DIR, TRAIN_FILE
from edgepack.distill.data import build_dataset, read_jsonl
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

    # With a stop string it emits, the stage keeps its answers. Greedy Gemma 3 270M base, under this
    # template, repeats the prompt or drifts into other languages (e.g. "Breaker CB-7 tripped twice
    # tonight. mendatang\nで購入した…") and starts a new line within a few dozen tokens; it neither
    # ends its turn (<end_of_turn>) nor writes a blank line ("\n\n") within 64 tokens, so "\n" is
    # the stop string it has. Its answers are then the first line of each of those: mostly the prompt
    # repeated, some with a stray token after it ("… tonight. mendatang"). The stage succeeds; the
    # data teaches little (a usable teacher is an instruction-tuned model).
    entries = [json.loads(p.read_text()) for p in (run / TEACHER_CACHE_DIR).glob("*.json")]
    full = {json.dumps(e["request"]["messages"]): e["generation"]["text"] for e in entries}
    stopped = tmp_path / "stopped"
    report = build_dataset(teacher=str(real_gemma3_gguf), data=data, run_dir=stopped, answer_format=anything,
                           chat_template=template, stop=("\n",))
    assert report["kept"] == report["train_prompts"] > 0 and report["drop_reasons"]["truncated"] == 0
    assert report["decoding"][0]["stop"] == ["\n"]
    rows = read_jsonl(stopped / DATA_DIR / TRAIN_FILE)
    for row in rows:  # each answer is the first line of the answer it gave without the stop string
        assert row["response"] == full[json.dumps(row["messages"])].split("\n")[0].strip()
    assert len(list((stopped / TEACHER_CACHE_DIR).glob("*.json"))) == len(PROMPTS)
