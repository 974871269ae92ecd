"""Chat templates of HF tokenizers render in edgepack's bounded sandbox, with transformers' text.

``distill data`` (HF teachers), training rows, eval and export fidelity used to render through
transformers' ``apply_chat_template``, whose sandbox has no bounds: a template that loops only
on some messages hung those stages at run time although the one-off template check passed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edgepack.errors import UnsafeModelError
from edgepack.runtime.chat.template import render_hf_chat

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Pump P-101 bearing noise."}],
    [{"role": "system", "content": "Answer with a category."}, {"role": "user", "content": "Boiler too hot"},
     {"role": "assistant", "content": "Category: thermal"}, {"role": "user", "content": "And now?"}],
    [{"role": "user", "content": "  spaces\n and <|im_start|> text  "}],
]
GENERATION_TAG = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                  "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                  "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DATA_BOMB = ("{% for m in messages %}{% if m['content'] == 'boom' %}{% for i in range(100000) %}"
             "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m['content'] }}{% endfor %}")


@pytest.fixture()
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_the_text_is_transformers_own(tokenizer: Any, chat: int, generation_prompt: bool) -> None:
    ours = render_hf_chat(tokenizer, CHATS[chat], add_generation_prompt=generation_prompt)
    assert ours == tokenizer.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=generation_prompt)


def test_a_generation_tag_renders_its_body(tokenizer: Any) -> None:
    tokenizer.chat_template = GENERATION_TAG
    for chat in CHATS:
        assert render_hf_chat(tokenizer, chat) == tokenizer.apply_chat_template(chat, tokenize=False,
                                                                                add_generation_prompt=True)


def test_a_bomb_that_only_some_messages_trigger_is_bounded(tokenizer: Any) -> None:
    tokenizer.chat_template = DATA_BOMB
    assert render_hf_chat(tokenizer, [{"role": "user", "content": "ping"}]) == "ping"
    t0 = time.monotonic()
    with pytest.raises(UnsafeModelError, match="limits"):
        render_hf_chat(tokenizer, [{"role": "user", "content": "boom"}])
    assert time.monotonic() - t0 < 30  # transformers' own render loops 10^10 times


@pytest.mark.slow
def test_the_embedded_teachers_text_is_transformers_own(builtin_teacher_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf

    hf_tokenizer_from_gguf(builtin_teacher_gguf, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for chat in CHATS:
        for generation_prompt in (True, False):
            assert render_hf_chat(tok, chat, add_generation_prompt=generation_prompt) == \
                tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
