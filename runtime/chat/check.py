"""The one check every loader runs on a model's chat templates, before anything compiles them.

A chat template is untrusted input, and it runs earlier than edgepack's renderer: llama-cpp-python
compiles every ``tokenizer.chat_template`` and ``tokenizer.chat_template.<name>`` key of a GGUF
inside ``Llama()`` (0.3.x builds a ``Jinja2ChatFormatter`` per key unconditionally; no
``chat_format`` or ``chat_handler`` argument stops it), and transformers compiles in
``apply_chat_template``. Both use jinja2's constant folding, so ``{% if false %}{{ 'a' * 10**9 }}
{% endif %}`` allocates a gigabyte at *compile* time and ``((10**999)**999)**999`` spins for
hours inside a single C call that no Python-level limit interrupts.

So :func:`check_chat_templates` rehearses those compiles, and renders the template edgepack uses
in its bounded sandbox (:mod:`edgepack.runtime.chat.sandbox`) on sample chats, in a child
process under ``RLIMIT_CPU`` (:data:`CHECK_CPU_S`), ``RLIMIT_AS`` (:data:`CHECK_MEMORY_MB` above
the interpreter) and a wall-clock timeout. A compile that finishes there finishes in-process in
the same bounded time and memory; one that does not is refused with
:class:`~edgepack.errors.UnsafeModelError` (exit 2) before llama.cpp, transformers or the
exporter sees the file. Why both layers: the sandbox bounds every later render (each server
request) cheaply and deterministically; the child is the hard guarantee for code edgepack does
not control (the libraries' compiles) and a backstop for anything the sandbox misses.

The check is paid once per template per process tree: results are cached by the template's
sha256, and passed checks are listed in ``$EDGEPACK_TEMPLATES_CHECKED`` so child processes
(the gate's measurement children) inherit them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, UnsafeModelError

CHECK_CPU_S = 5          # CPU seconds to compile and render every template once (real ones: ~0.05 s)
CHECK_MEMORY_MB = 256    # address space the check may add to the interpreter (real ones: a few MB)
CHECK_WALL_S = 60.0      # backstop on a loaded machine; the CPU limit is what stops a bomb
CHECKED_ENV = "EDGEPACK_TEMPLATES_CHECKED"
COMPILERS = ("llama_cpp", "transformers")
_LIBRARIES = {"llama_cpp": "llama-cpp-python's Llama()", "transformers": "transformers' apply_chat_template"}
GGUF_DEFAULT_KEY = "tokenizer.chat_template"
_PROGRESS = "edgepack-template-check:"
_HINT = ("this model carries a hostile or broken chat template; do not use it, or replace "
         "tokenizer.chat_template (chat_template.jinja or tokenizer_config.json's chat_template) "
         "with a known-good one")

_PASSED: set[str] = set()                          # "<task>:<sha256>"
_FAILED: dict[str, tuple[str, str]] = {}           # key -> (error class name, message)
_RENDER_PROBLEMS: dict[str, str] = {}              # sha256 -> why the sample render failed


def template_digest(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()


def gguf_templates(header: Any) -> dict[str, str]:
    """Every template key llama-cpp-python compiles in ``Llama()``: the default and each named one."""
    found: dict[str, str] = {}
    for key, value in header.metadata.items():
        if key == GGUF_DEFAULT_KEY or key.startswith(GGUF_DEFAULT_KEY + "."):
            if not isinstance(value, str):
                # llama.cpp turns any value into text (arrays with their contents) and
                # llama-cpp-python compiles that text as a template.
                raise InvalidModelFile(f"{header.path.name}: {key} holds a {type(value).__name__}, not a template string",
                                       hint=_HINT)
            found[key] = value
    return found


def check_gguf_templates(header: Any, *, strict: bool = False) -> None:
    """:func:`check_chat_templates` for a GGUF read by :func:`~edgepack.gguf_header.read_gguf`."""
    templates = gguf_templates(header)
    if templates:
        check_chat_templates(templates, render=GGUF_DEFAULT_KEY, compilers=("llama_cpp",), strict=strict,
                             where=header.path.name)


def check_folder_template(folder: Path, *, compilers: Collection[str] = (), strict: bool = False,
                          where: str | None = None) -> str | None:
    """A model folder's chat template (:func:`~edgepack.runtime.chat.template.read_chat_template`),
    refused by :func:`check_chat_templates` if hostile; None when the folder has none.

    Every reader of a folder's template goes through here: the exporter and the teacher check
    (``compilers`` both libraries, ``strict``), the ONNX loader, the gate and pack."""
    from edgepack.runtime.chat.template import read_chat_template

    template = read_chat_template(folder)
    if template is not None:
        check_chat_templates({"chat_template": template}, render="chat_template", compilers=compilers,
                             strict=strict, where=where or Path(folder).name)
    return template


def check_chat_templates(templates: Mapping[str, str], *, render: str | None = None,
                         compilers: Collection[str] = (), strict: bool = False, where: str = "the model") -> None:
    """Refuse a hostile chat template before it is compiled or rendered anywhere.

    ``templates`` maps a name to each template source some library will compile (for a GGUF:
    :func:`gguf_templates`); each is compiled in the bounded sandbox and rendered on sample
    chats there, so a bomb in any of them refuses the model. ``compilers`` lists the
    third-party compiles to rehearse: ``"llama_cpp"`` (``Llama()``), ``"transformers"``
    (``apply_chat_template``). ``render`` names the template edgepack renders for chats; with
    ``strict``, its failing on the sample chats (InvalidModelFile: an OverflowError, a
    TypeError...) is refused too. Loaders that can still serve plain completions leave
    ``strict`` off, and such a failure surfaces on the first chat instead.

    Raises UnsafeModelError (limits, sandbox violations, a compile that blows up) or
    InvalidModelFile (a template that does not parse), both exit 2; each names the template,
    the problem and the fix.
    """
    from edgepack.runtime.chat.sandbox import MAX_TEMPLATE_CHARS

    unknown = set(compilers) - set(COMPILERS)
    if unknown:
        raise ValueError(f"unknown template compilers {sorted(unknown)}; known: {', '.join(COMPILERS)}")
    passed = _passed()
    todo: list[dict[str, str]] = []
    for name, template in templates.items():
        if not isinstance(template, str):
            raise InvalidModelFile(f"{where}, {name}: the chat template is a {type(template).__name__}, not text",
                                   hint=_HINT)
        if len(template) > MAX_TEMPLATE_CHARS:
            raise UnsafeModelError(f"{where}, {name}: the chat template is {len(template):,} characters long (limit "
                                   f"{MAX_TEMPLATE_CHARS:,}; real ones are a few thousand)", hint=_HINT)
        digest = template_digest(template)
        # Every template is rendered in the sandbox (a bomb anywhere in the file refuses it), the
        # render first: it is cheap and names the problem precisely.
        tasks = ["render"] + [f"compile:{c}" for c in compilers]
        for task in tasks:
            key = f"{task}:{digest}"
            if key in _FAILED:
                _raise(*_FAILED[key], name=name, where=where)
            if key not in passed and not (task == "render" and digest in _RENDER_PROBLEMS):
                todo.append({"name": name, "task": task, "key": key, "template": template})
    if todo:
        _run_check(todo, where)
    if strict and render is not None and render in templates:
        problem = _RENDER_PROBLEMS.get(template_digest(templates[render]))
        if problem is not None:
            raise InvalidModelFile(f"{where}, {render}: the chat template cannot render a plain chat: "
                                   f"{_strip_subject(problem)}",
                                   hint="fix the chat template in the model, or re-export it")


def _passed() -> set[str]:
    inherited = os.environ.get(CHECKED_ENV, "")
    return _PASSED | set(inherited.split(",")) if inherited else _PASSED


def _remember(keys: list[str]) -> None:
    _PASSED.update(keys)
    entries = [e for e in os.environ.get(CHECKED_ENV, "").split(",") if e] + keys
    # Inherited by child processes (the gate's measurement children) so they skip the check;
    # bounded so the environment stays small.
    os.environ[CHECKED_ENV] = ",".join(list(dict.fromkeys(entries))[-200:])


def _strip_subject(message: str) -> str:
    # The renderer's messages start "the model's chat template ..."; ours name the template.
    return message.removeprefix("the model's chat template ")


def _raise(kind: str, message: str, *, name: str, where: str) -> None:
    cls = InvalidModelFile if kind == "InvalidModelFile" else UnsafeModelError
    text = f"{where}, {name}: the chat template {_strip_subject(message)}"
    raise cls(text, hint=_HINT if cls is UnsafeModelError else "fix the chat template in the model, or re-export it")


def _run_check(todo: list[dict[str, str]], where: str) -> None:
    """Run ``todo`` in the limited child; record what passed, raise for what did not."""
    with tempfile.TemporaryDirectory(prefix="edgepack-template-check-") as tmp:
        request = Path(tmp) / "templates.json"
        request.write_text(json.dumps({"tasks": todo}), encoding="utf-8")
        cmd = [sys.executable, "-m", "edgepack.runtime.chat.check", str(request)]
        try:
            proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=CHECK_WALL_S)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
            rc, out, err = None, exc.stdout or b"", exc.stderr or b""
    stderr = err.decode("utf-8", "replace")
    try:
        result = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = None
    if isinstance(result, dict) and isinstance(result.get("results"), list):
        for item, outcome in zip(todo, result["results"]):
            status = outcome.get("status")
            if status == "ok":
                _remember([item["key"]])
            elif status == "render_problem":
                _RENDER_PROBLEMS[item["key"].split(":", 1)[1]] = str(outcome.get("message"))
            else:
                _FAILED[item["key"]] = (str(outcome.get("error_type")), str(outcome.get("message")))
                _raise(*_FAILED[item["key"]], name=item["name"], where=where)
        if len(result["results"]) == len(todo):
            return
    # The child died or was killed: blame the task it had started last.
    started = [int(line.split(":", 1)[1]) for line in stderr.splitlines()
               if line.startswith(_PROGRESS) and line.split(":", 1)[1].strip().isdigit()]
    if not started:
        tail = " | ".join(stderr.strip().splitlines()[-3:]) or f"exit code {rc}"
        raise UnsafeModelError(f"{where}: the chat-template check could not run ({tail})",
                               hint="the check runs `python -m edgepack.runtime.chat.check` in a child "
                                    "process; if that cannot start on this machine, report it")
    item = todo[started[-1]]
    if rc is None:
        why = f"was still running after {CHECK_WALL_S:g} s"
    elif rc < 0:
        why = f"was killed by signal {-rc} (over {CHECK_CPU_S} s of CPU or {CHECK_MEMORY_MB} MB)"
    else:
        why = f"ended with exit code {rc} ({' | '.join(stderr.strip().splitlines()[-2:])})"
    what = "rendering in edgepack's sandbox" if item["task"] == "render" else \
        f"compiling as {_LIBRARIES[item['task'].split(':', 1)[1]]} does"
    message = f"is a template bomb: {what} {why}"
    _FAILED[item["key"]] = ("UnsafeModelError", message)
    _raise("UnsafeModelError", message, name=item["name"], where=where)


# --- the child ---------------------------------------------------------------------------------

SAMPLE_CHATS: list[tuple[list[dict[str, str]], bool]] = [
    ([{"role": "user", "content": "Pump P-101 discharge pressure low."}], True),
    ([{"role": "system", "content": "Answer with one word."},
      {"role": "user", "content": "Pump P-101 discharge pressure low."}], True),
    ([{"role": "user", "content": "Pump P-101?"}, {"role": "assistant", "content": "mechanical"},
      {"role": "user", "content": "And FT-204?"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}], False),
]


def _transformers_compile(template: str) -> Any:
    """The environment transformers 4.57's ``_compile_jinja_template`` builds (importing
    transformers itself costs seconds and hundreds of MB): the same constant folding."""
    import json as _json

    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template)


def _llama_cpp_compile(template: str) -> Any:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>", stop_token_ids=[0])


def _render(template: str) -> dict[str, Any]:
    from edgepack.errors import EdgepackError, UsageError
    from edgepack.runtime.chat.template import compile_template, render_chat

    try:
        compile_template(template)
    except EdgepackError as exc:
        return {"status": "refused", "error_type": type(exc).__name__, "message": str(exc)}
    problem = None
    for messages, gen in SAMPLE_CHATS:
        try:
            render_chat(template, messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=gen)
        except UsageError:
            continue  # the template's own raise_exception: it refuses that chat, which is its right
        except InvalidModelFile as exc:
            problem = problem or str(exc)
        except UnsafeModelError as exc:
            return {"status": "refused", "error_type": "UnsafeModelError", "message": str(exc)}
    return {"status": "render_problem", "message": problem} if problem else {"status": "ok"}


class _FoldBomb(BaseException):
    """A constant fold over the limits; a BaseException so jinja2's ``except Exception`` passes it on."""


def _guard_constant_folding() -> None:
    """Make jinja2's constant folding, in this child only, refuse what it would quietly skip.

    jinja2 swallows *any* exception from a fold, MemoryError included: under RLIMIT_AS a
    gigabyte fold fails here and the compile "passes", while in-process, without the limit, it
    would succeed a gigabyte later. So a fold that fails for lack of memory or stack, whose
    operands are over the sandbox's limits, or whose value is, is refused here instead.
    """
    from jinja2 import nodes, optimizer

    from edgepack.runtime.chat.sandbox import MAX_STRING_CHARS, TemplateLimit, check_binop, text_size

    for op, func in list(nodes._binop_to_func.items()):  # what BinExpr.as_const applies
        def bounded(left: Any, right: Any, _op: str = op, _func: Any = func) -> Any:
            try:
                check_binop(_op, left, right)
            except TemplateLimit as exc:
                raise _FoldBomb(f"its constant folding: {exc}") from None
            return _func(left, right)

        nodes._binop_to_func[op] = bounded

    def generic_visit(self: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
        # jinja2 3.1's Optimizer.generic_visit, with the failure cause and the value checked.
        node = optimizer.NodeTransformer.generic_visit(self, node, *args, **kwargs)
        if not isinstance(node, nodes.Expr):
            return node
        try:
            value = node.as_const(args[0] if args else None)
        except nodes.Impossible as exc:
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, (MemoryError, RecursionError)):
                    raise _FoldBomb(f"its constant folding fails with {type(cause).__name__}") from None
                cause = cause.__cause__ or cause.__context__
            return node
        if text_size(value) > MAX_STRING_CHARS:
            raise _FoldBomb(f"its constant folding builds a value of over {MAX_STRING_CHARS:,} characters")
        try:
            return nodes.Const.from_untrusted(value, lineno=node.lineno, environment=self.environment)
        except nodes.Impossible:
            return node

    optimizer.Optimizer.generic_visit = generic_visit  # type: ignore[method-assign]


def _compile(task: str, template: str) -> dict[str, Any]:
    from jinja2.exceptions import TemplateSyntaxError

    library = task.split(":", 1)[1]
    try:
        (_llama_cpp_compile if library == "llama_cpp" else _transformers_compile)(template)
    except _FoldBomb as exc:
        return {"status": "refused", "error_type": "UnsafeModelError",
                "message": f"is a template bomb: compiling as {_LIBRARIES[library]} does, {exc}"}
    except TemplateSyntaxError as exc:
        return {"status": "refused", "error_type": "InvalidModelFile",
                "message": f"does not parse in {_LIBRARIES[library]}: {exc} (line {exc.lineno})"}
    except Exception as exc:  # noqa: BLE001 - whatever the library's compile raises is the finding
        return {"status": "refused", "error_type": "UnsafeModelError",
                "message": f"is a template bomb: compiling as {_LIBRARIES[library]} does fails with "
                           f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"status": "ok"}


def _limit_self() -> None:
    """Cap this process: CPU seconds from now, address space above what is mapped now."""
    try:
        import resource
    except ImportError:  # not POSIX: the wall-clock timeout and the sandbox's counts still hold
        return

    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = math.ceil(used.ru_utime + used.ru_stime) + CHECK_CPU_S
    _set_limit(resource.RLIMIT_CPU, cpu, cpu + 2)
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # no /proc (macOS): the CPU limit and the sandbox's counts still hold
    cap = mapped + CHECK_MEMORY_MB * 2**20
    _set_limit(resource.RLIMIT_AS, cap, cap)


def _set_limit(which: int, soft: int, hard: int) -> None:
    import resource

    _, old_hard = resource.getrlimit(which)
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Child entry point: check the tasks in the JSON file ``argv[0]``; one JSON line on stdout."""
    args = sys.argv[1:] if argv is None else argv
    tasks = json.loads(Path(args[0]).read_text(encoding="utf-8"))["tasks"]
    # Import and warm up everything first: the limits are for the templates, not the imports.
    from edgepack.runtime.chat.template import render_chat

    render_chat("{{ messages[0]['content'] }}", [{"role": "user", "content": "x"}])
    _transformers_compile("{{ 1 }}")
    if any(t["task"] == "compile:llama_cpp" for t in tasks):
        _llama_cpp_compile("{{ 1 }}")
    _guard_constant_folding()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a library that prints must not corrupt the JSON line
    _limit_self()
    results = []
    for i, task in enumerate(tasks):
        sys.stderr.write(f"{_PROGRESS}{i}\n")
        sys.stderr.flush()
        try:
            outcome = _render(task["template"]) if task["task"] == "render" else \
                _compile(task["task"], task["template"])
        except (MemoryError, RecursionError) as exc:
            outcome = {"status": "refused", "error_type": "UnsafeModelError",
                       "message": f"is a template bomb: checking it fails with {type(exc).__name__}"}
        results.append(outcome)
        if outcome["status"] == "refused":
            break
    real_stdout.write(json.dumps({"results": results}) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
