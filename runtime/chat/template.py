"""Render a model's chat template without letting the template run code.

A chat template comes from the model file (GGUF ``tokenizer.chat_template``, or in a model
folder what :func:`read_chat_template` finds, the one reader every stage uses), so it is
untrusted input: llama-cpp-python once rendered it with a
plain Jinja2 environment and a crafted GGUF got remote code execution (CVE-2024-34359).
edgepack renders every template here, in :class:`~edgepack.runtime.chat.sandbox.BoundedSandbox`
(jinja2's ``ImmutableSandboxedEnvironment`` plus limits on loop iterations, integer sizes, string
growth and recursion, and no compile-time constant folding; see that module), where an unsafe
attribute (``__globals__``, ``__class__``...) raises at once instead of becoming a silent empty
Undefined, so a probing template fails loudly. Before a model's template is first used, the
loaders run :func:`edgepack.runtime.chat.check.check_chat_templates`, which also bounds the
check itself by CPU time and memory in a child process.

The environment matches what HF transformers gives templates (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a non-escaping
``tojson``), so templates written for transformers render identically.

Errors: :class:`~edgepack.errors.UnsafeModelError` for a sandbox violation or a resource limit
(a template bomb, runaway recursion), :class:`~edgepack.errors.InvalidModelFile` for a template
that does not parse or breaks (OverflowError, ZeroDivisionError and the like included),
:class:`~edgepack.errors.UsageError` when the template itself rejects the messages
(``raise_exception('roles must alternate')``) or the messages are malformed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, UnsafeModelError, UsageError

MAX_RENDERED_CHARS = 4_000_000   # far above any real prompt; stops a runaway loop's output
_HOSTILE_HINT = ("this model file carries a hostile or broken chat template; do not use it, or replace "
                 "tokenizer.chat_template (chat_template.jinja or tokenizer_config.json's chat_template) "
                 "with a known-good one")
_BROKEN_HINT = "fix tokenizer.chat_template in the model, or re-export it"


class TemplateRejected(Exception):
    """Raised by ``raise_exception(...)`` inside a template: the messages were refused."""


# A model folder's template files, in the order transformers' tokenizer loading prefers them.
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # processors' file; read last, as the exporter always has


def read_chat_template(folder: Path) -> str | None:
    """The default chat template of a model folder (HF, merged student, exported ONNX), or None.

    The one reader, choosing as transformers 4.57's ``from_pretrained`` does, so the exporter,
    the teacher check and the runtime see the template training rendered with:
    ``chat_template.jinja`` first, else ``tokenizer_config.json``'s ``chat_template`` (a string, or
    named templates ``[{"name": "default", "template": ...}]``), else ``chat_template.json``.
    Reading never compiles: callers refuse a hostile template with
    :func:`edgepack.runtime.chat.check.check_folder_template` before anything compiles it.
    Raises InvalidModelFile for unreadable JSON or a template that is not text, UnsafeModelError
    for a template file far over :data:`~edgepack.runtime.chat.sandbox.MAX_TEMPLATE_CHARS`.
    """
    from edgepack.runtime.chat.sandbox import MAX_TEMPLATE_CHARS

    folder = Path(folder)
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        if jinja.stat().st_size > 4 * MAX_TEMPLATE_CHARS:  # 4 bytes per character at most in UTF-8
            raise UnsafeModelError(f"{jinja} is {jinja.stat().st_size:,} bytes; a chat template is a few KB",
                                   hint=_HOSTILE_HINT)
        try:
            return jinja.read_text(encoding="utf-8") or None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidModelFile(f"cannot read {jinja}: {exc}", hint=_BROKEN_HINT) from exc
    template = _json_key(folder / TOKENIZER_CONFIG, "chat_template")
    if template is None:
        template = _json_key(folder / PROCESSOR_TEMPLATE_FILE, "chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise InvalidModelFile(f"the chat_template in {folder} is a {type(template).__name__}, not text",
                               hint=_BROKEN_HINT)
    return template or None  # "" is no template, as transformers treats it


def _json_key(path: Path, key: str) -> Any:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc}", hint=_BROKEN_HINT) from exc
    return data.get(key) if isinstance(data, dict) else None


def _raise_exception(message: str) -> None:
    raise TemplateRejected(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_block() -> type:
    """transformers' ``{% generation %}…{% endgeneration %}`` tag, which marks assistant text for
    its assistant-token masks; edgepack asks for no mask, so the body renders unchanged (as it
    does in transformers when no mask is asked for)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    return GenerationBlock


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols

    from edgepack.runtime.chat.sandbox import BoundedSandbox

    # trim_blocks, lstrip_blocks, loopcontrols, {% generation %}, raise_exception, strftime_now and
    # a non-escaping tojson: what transformers gives templates, so they render identically.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_block()])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """Parse ``source`` once (cached); InvalidModelFile if it is not valid Jinja."""
    from jinja2.exceptions import TemplateSyntaxError

    from edgepack.runtime.chat.sandbox import MAX_TEMPLATE_CHARS

    if not isinstance(source, str) or not source.strip():
        raise InvalidModelFile("the model's chat template is empty")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise UnsafeModelError(f"the model's chat template is {len(source):,} characters long "
                               f"(limit {MAX_TEMPLATE_CHARS:,}; real ones are a few thousand)", hint=_HOSTILE_HINT)
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as exc:
        raise InvalidModelFile(f"the model's chat template does not parse: {exc} (line {exc.lineno})",
                               hint=_BROKEN_HINT) from exc
    except (RecursionError, MemoryError, SyntaxError) as exc:  # nesting deeper than the parser handles
        raise UnsafeModelError(f"the model's chat template cannot be compiled: {type(exc).__name__} "
                               "(nested too deeply)", hint=_HOSTILE_HINT) from exc


def check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts with string ``role`` and ``content``; UsageError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UsageError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"message {i} must be an object with string 'role' and 'content'")
        out.append(dict(m))
    return out


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render ``messages`` through ``template`` in the sandbox; see the module docstring."""
    from jinja2.exceptions import SecurityError, TemplateError

    from edgepack.runtime.chat.sandbox import TemplateLimit, bounded_render

    compiled = compile_template(template)
    context = dict(extra, messages=check_messages(messages), bos_token=bos_token,
                   eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    pieces: list[str] = []
    size = 0
    try:
        with bounded_render():
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise TemplateLimit(f"its output exceeds {MAX_RENDERED_CHARS:,} characters")
                pieces.append(piece)
    except TemplateLimit as exc:
        raise UnsafeModelError(f"the model's chat template exceeds the sandbox's limits: {exc}",
                               hint=_HOSTILE_HINT) from exc
    except SecurityError as exc:
        raise UnsafeModelError(f"the model's chat template tried something the sandbox forbids: {exc}",
                               hint=_HOSTILE_HINT) from exc
    except (RecursionError, MemoryError) as exc:
        raise UnsafeModelError(f"the model's chat template exceeds the sandbox's limits: {type(exc).__name__} "
                               "(runaway recursion or allocation)", hint=_HOSTILE_HINT) from exc
    except TemplateRejected as exc:
        raise UsageError(f"the model's chat template rejected the messages: {exc}") from exc
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
        raise InvalidModelFile(f"the model's chat template failed to render: {type(exc).__name__}: {exc}",
                               hint=_BROKEN_HINT) from exc
    return "".join(pieces)


def render_hf_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False)``'s text, rendered here instead.

    transformers renders in an unbounded sandbox, so a template that loops or allocates only on
    some messages would hang ``distill data``, training, eval or export there; here it meets the
    same limits as every other render. The context is transformers' own: the template it
    would choose and its special tokens by name (``bos_token``, ``eos_token``, ...).
    """
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:
        raise InvalidModelFile(f"the tokenizer has no chat template ({exc})",
                               hint="add chat_template to tokenizer_config.json") from None
    specials = dict(tokenizer.special_tokens_map)
    return render_chat(template, messages, add_generation_prompt=add_generation_prompt, **specials)


def to_ollama_template(template: str, *, bos_token: str = "", eos_token: str = "") -> tuple[str, str | None] | None:
    """Translate a chat template into an Ollama Modelfile ``TEMPLATE`` where that is exact.

    Renders the template with sentinel messages and reads off the literal text around them,
    then checks the Go template reproduces the single-turn renderings. Returns
    ``(go_template, default_system)`` (the system prompt the template inserts when none is
    given, for Ollama's ``SYSTEM``), or None when the template's shape cannot be expressed
    that way (the caller says so instead of emitting a wrong template).
    """
    S, U, R = "\x00SYS\x00", "\x00USER\x00", "\x00RESP\x00"

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return render_chat(template, msgs, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=gen)

    try:
        with_sys = render([{"role": "system", "content": S}, {"role": "user", "content": U}], True)
        full = render([{"role": "system", "content": S}, {"role": "user", "content": U},
                       {"role": "assistant", "content": R}], False)
        user_only = render([{"role": "user", "content": U}], True)
    except (UsageError, InvalidModelFile):
        return None
    if any(with_sys.count(s) != 1 for s in (S, U)) or with_sys.index(S) > with_sys.index(U):
        return None
    p0, rest = with_sys.split(S)
    p1, p2 = rest.split(U)
    head = p0 + S + p1 + U
    if not full.startswith(head + p2) or full.count(R) != 1:
        return None
    between, p3 = full[len(head):].split(R)
    if between != p2:
        return None
    parts = [p0, p1, p2, p3]
    if any("{{" in p or "}}" in p or '"""' in p for p in parts):
        return None
    # Case 1: no system message unless given, so the system block is optional in Go too:
    # split p0 S p1 into (system block, user prefix) using the user-only rendering.
    if user_only.endswith(U + p2):
        user_prefix = user_only[: len(user_only) - len(U + p2)]
        system_part = p0 + S + p1
        if system_part.endswith(user_prefix) and S in system_part[: len(system_part) - len(user_prefix)]:
            sys_pre, sys_post = system_part[: len(system_part) - len(user_prefix)].split(S)
            go = (f"{{{{ if .System }}}}{sys_pre}{{{{ .System }}}}{sys_post}{{{{ end }}}}"
                  f"{user_prefix}{{{{ .Prompt }}}}{p2}{{{{ .Response }}}}{p3}")
            return go, None
    # Case 2: the template inserts a default system prompt D when none is given:
    # user_only == p0 D p1 U p2; Ollama's SYSTEM carries D.
    if user_only.startswith(p0) and user_only.endswith(p1 + U + p2) \
            and len(user_only) >= len(p0 + p1 + U + p2):
        default_system = user_only[len(p0): len(user_only) - len(p1 + U + p2)]
        if "{{" in default_system or '"""' in default_system:
            return None
        return f"{p0}{{{{ .System }}}}{p1}{{{{ .Prompt }}}}{p2}{{{{ .Response }}}}{p3}", default_system
    return None
