"""One reader for a model folder's chat template, the one transformers' tokenizer picks, and one check.

The exporter and the teacher check used to read ``tokenizer_config.json`` first while
transformers (training, eval, ``distill data``) and the ONNX runtime read ``chat_template.jinja``
first: a folder with both was checked on one template and rendered with the other, so a ``**``
bomb in ``chat_template.jinja`` passed the teacher check and the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import InvalidModelFile, UnsafeModelError
from edgepack.runtime.chat.check import check_folder_template
from edgepack.runtime.chat.template import read_chat_template, render_chat
from tests.tiny import CHATML_TEMPLATE

BENIGN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
POWER_BOMB = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ (10 ** 1000) ** 1000 }}"
CHAT = [{"role": "user", "content": "Pump P-101 discharge pressure low."}]
BOMB_REASON = r"raises a 3322-bit integer to the power 1,000 \(limit 4,096 bits\)"


def _set_config_template(folder: Path, template: object) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    path.write_text(json.dumps(config), encoding="utf-8")


def _with_both(folder: Path, *, jinja: str, config: str) -> Path:
    (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    _set_config_template(folder, config)
    return folder


def test_reader_picks_what_transformers_picks(tiny_llama_copy: Path) -> None:
    from transformers import AutoTokenizer

    assert read_chat_template(tiny_llama_copy) == CHATML_TEMPLATE  # as saved by save_pretrained
    _with_both(tiny_llama_copy, jinja=BENIGN, config=CHATML_TEMPLATE)
    assert read_chat_template(tiny_llama_copy) == BENIGN == \
        AutoTokenizer.from_pretrained(tiny_llama_copy).get_chat_template()


def test_reader_named_templates_and_fallbacks(tmp_path: Path) -> None:
    assert read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": BENIGN}), encoding="utf-8")
    assert read_chat_template(tmp_path) == BENIGN
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": CHATML_TEMPLATE}]}))
    assert read_chat_template(tmp_path) == CHATML_TEMPLATE
    _set_config_template(tmp_path, {"default": BENIGN})
    with pytest.raises(InvalidModelFile, match="not text"):
        read_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InvalidModelFile, match="tokenizer_config.json"):
        read_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("")
    assert read_chat_template(tmp_path) is None  # an empty file is no template (transformers: falsy)


def test_oversized_template_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from edgepack.runtime.chat.sandbox import MAX_TEMPLATE_CHARS

    with open(tmp_path / "chat_template.jinja", "wb") as fh:
        fh.truncate(4 * MAX_TEMPLATE_CHARS + 1)  # sparse: costs no disk
    with pytest.raises(UnsafeModelError, match="bytes"):
        read_chat_template(tmp_path)


def test_power_bomb_refused_by_the_bounded_renderer() -> None:
    with pytest.raises(UnsafeModelError, match=BOMB_REASON):
        render_chat(POWER_BOMB, CHAT)


def test_former_second_reader_refuses_the_power_bomb(tiny_llama_copy: Path) -> None:
    """The teacher check and the exporter read tokenizer_config.json first: a bomb in
    chat_template.jinja (the template transformers renders) got past them. Now they read what
    transformers reads and refuse it as the bounded renderer does."""
    from edgepack.distill.teachers import check_hf_dir
    from edgepack.export.gguf.vocab import gguf_vocab_from_hf, read_chat_template as export_template

    _with_both(tiny_llama_copy, jinja=POWER_BOMB, config=CHATML_TEMPLATE)
    for check in (check_hf_dir, export_template, gguf_vocab_from_hf, check_folder_template):
        with pytest.raises(UnsafeModelError, match=BOMB_REASON):
            check(tiny_llama_copy)


def test_export_carries_the_template_training_renders(tiny_llama_copy: Path) -> None:
    from edgepack.export.gguf.vocab import gguf_vocab_from_hf

    _with_both(tiny_llama_copy, jinja=CHATML_TEMPLATE, config=BENIGN)
    assert gguf_vocab_from_hf(tiny_llama_copy).chat_template == CHATML_TEMPLATE
