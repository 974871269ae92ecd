"""The Ollama ``Modelfile`` a GGUF bundle carries: the model, its chat template, and the task.

``SYSTEM`` is the task's system prompt (what the gate measured with), not the chat template's
default; the ``PARAMETER`` lines reproduce the gate's decoding: ``temperature``,
``repeat_penalty`` (written even at 1.0: Ollama defaults to 1.1, as llama-server's /completion docs do),
``repeat_last_n`` (llama.cpp's window, as the backends count it), ``num_predict`` (the task's max
tokens) and a ``stop`` per stop token of the model and per stop string of the task.

Values are quoted so that Ollama's parser (ollama/ollama ``parser/parser.go``: no escapes; a
value ends at the first whitespace after which it reads as ``"..."`` or ``\"\"\"...\"\"\"``) reads
them back exactly: ``"text"``, or ``\"\"\"text\"\"\"`` when the text holds a double quote. A value
that cannot be written so (it holds ``\"\"\"`` or a character the parser drops) is left out,
with a comment in the file and a note in the bundle, never written wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepack import __version__
from edgepack.runtime.backends.base import PENALTY_LAST_N
from edgepack.task import Task


def modelfile_quote(text: str) -> str | None:
    """``text`` as an Ollama Modelfile value that parses back to exactly ``text``, or None."""
    # Ollama keeps printable runes (Go's strconv.IsPrint) and, inside a quoted value, tabs and
    # newlines; anything else is dropped silently, so such a value cannot be written.
    if any(not (c.isprintable() or c in "\t\n") for c in text) or '"""' in text:
        return None
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def _number(value: float) -> str:
    return repr(float(value))  # 1.0, 0.0, 1.15: Go's ParseFloat reads them all


@dataclass
class Modelfile:
    """The lines of a Modelfile being written, and what could not be written (notes)."""

    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def value(self, keyword: str, text: str, what: str) -> None:
        """``KEYWORD "text"``, or a comment and a note when ``text`` cannot be quoted exactly."""
        quoted = modelfile_quote(text)
        if quoted is None:
            self.lines.append(f"# {keyword} omitted: {what} cannot be written so that Ollama reads it back exactly")
            self.notes.append(f"Modelfile: {what} {text[:40]!r} cannot be quoted exactly; omitted")
        else:
            self.lines.append(f"{keyword} {quoted}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def write_modelfile(*, model_file: str, model_name: str, template: tuple[str, str | None] | None,
                    template_missing: str | None, stop_tokens: dict[int, str], task: Task,
                    task_source: str, num_ctx: int) -> tuple[str, list[str]]:
    """(the Modelfile's text, notes on what it could not carry).

    ``template``: the Ollama TEMPLATE and the template's default system prompt
    (:func:`~edgepack.runtime.chat.template.to_ollama_template`), or None with ``template_missing``
    saying why. The system prompt is the task's; only a task without one keeps the template's.
    """
    out = Modelfile([f"# Ollama Modelfile written by edgepack {__version__}.",
                     f"# Build: ollama create {model_name} -f Modelfile", f"FROM ./{model_file}"])
    if template is not None:
        out.lines.append(f'TEMPLATE """{template[0]}"""')
    else:
        out.lines.append(f"# TEMPLATE omitted: {template_missing}; Ollama will use its default.")
        out.notes.append(f"Modelfile: TEMPLATE omitted ({template_missing})")
    if task.system_prompt is not None:
        out.lines.append(f"# The task's system prompt ({task_source}): the one the gate measured with.")
        out.value("SYSTEM", task.system_prompt, "the task's system prompt")
    elif template is not None and template[1]:
        out.lines.append("# The task has no system prompt: the chat template's default.")
        out.value("SYSTEM", template[1], "the chat template's default system prompt")
    for tid, text in stop_tokens.items():
        out.value("PARAMETER stop", text, f"stop token {tid}")
    for text in task.decoding.stop:
        out.value("PARAMETER stop", text, "the task's stop string")
    decoding = task.decoding
    out.lines += [f"PARAMETER num_ctx {num_ctx}",
                  "# The gate's decoding (the task's); Ollama's default repeat_penalty is 1.1.",
                  f"PARAMETER temperature {_number(decoding.temperature)}",
                  f"PARAMETER repeat_penalty {_number(decoding.repeat_penalty)}",
                  f"PARAMETER repeat_last_n {PENALTY_LAST_N}",
                  f"PARAMETER num_predict {decoding.max_tokens}"]
    return out.text(), out.notes
