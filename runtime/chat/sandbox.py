"""The bounded Jinja sandbox that renders untrusted chat templates (issue #20, defect 3).

jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` keeps a template away from
Python internals but not from the machine: ``range(100000)`` loops nest, ``**``, ``*`` and
``~`` build numbers and strings of any size, filters such as ``center`` or ``indent`` allocate
whatever width they are asked for, macros recurse, and the compiler's constant folding
evaluates ``'a' * 10**9`` before anything renders. :class:`BoundedSandbox` closes each of those:

- **no constant folding** (``optimized=False``): every expression runs at render time, under the
  limits below, so compiling costs time linear in the template's size;
- **steps**: every loop iteration (each ``for`` iterable is wrapped in a counter by the code
  generator, recursive ``loop(...)`` calls too), call, filter and ``range`` item counts against
  :data:`MAX_STEPS` per render, and a render stops after :data:`RENDER_DEADLINE_S` seconds;
- **integers**: every arithmetic operator is intercepted; ``*`` and ``**`` are refused before
  they would produce more than :data:`MAX_INT_BITS` bits;
- **strings and lists**: ``+``, ``*``, ``~``, ``%``, ``str.format``, block captures
  (``{% set %}...{% endset %}``, macro bodies), string methods (``ljust``, ``replace``,
  ``join``...) and the growing filters (``center``, ``indent``, ``replace``, ``join``,
  ``format``, ``wordwrap``, ``batch``, ``slice``, ``tojson``, ``lipsum``) are checked *before*
  they allocate: nothing longer than :data:`MAX_STRING_CHARS`; and what every operation,
  slice, call and filter builds is charged (a list item as :data:`_ITEM_COST` characters)
  against :data:`MAX_CHAR_WORK` per render, which bounds the memory a render can hold;
- **output**: ``{{ value }}`` and ``~`` size a container's ``str()`` before building it;
- **recursion**: macro, ``caller()`` and recursive-loop calls nest at most :data:`MAX_CALL_DEPTH`.

A limit raises :class:`TemplateLimit` (a jinja2 ``SecurityError``), which
:func:`edgepack.runtime.chat.template.render_chat` turns into ``UnsafeModelError`` (exit 2).
The limits sit far above what real chat templates do: they render identically (tested against
a plain sandbox on real templates). Process-level limits (a CPU and memory cap on the first
check of each template) live in :mod:`edgepack.runtime.chat.check`.
"""

from __future__ import annotations

import functools
import json
import re
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import (do_center, do_indent, do_wordwrap, make_attrgetter, sync_do_join, sync_do_slice,
                            sync_do_sum)
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import EscapeFormatter, Markup

MAX_TEMPLATE_CHARS = 1 << 20       # the template source; real ones are a few KB, the largest ~40 KB
MAX_STRING_CHARS = 4_000_000       # any one string or list a template builds (= the rendered-prompt cap)
MAX_CHAR_WORK = 32_000_000         # characters built by string operations in one render
MAX_STEPS = 1_000_000              # loop iterations + calls + filter items + range items per render
MAX_INT_BITS = 4096                # ~1233 decimal digits
MAX_CALL_DEPTH = 64                # nested macro / caller / loop(...) calls
MAX_RANGE = 100_000                # jinja2's own sandbox limit for one range()
RENDER_DEADLINE_S = 10.0           # wall clock per render, a backstop behind the counts

LOOP_FILTER = "_edgepack_counted"  # the filter the code generator wraps every for-iterable in
# Filters that look at their input without walking it (no per-item charge).
_CONSTANT_COST_FILTERS = frozenset(["length", "count", "first", "last", "default", "d", "attr", "int", "float",
                                    "abs", "round", "safe", "e", "escape", "string", "items", "boolean"])


class TemplateLimit(SecurityError):
    """A chat template exceeded one of the sandbox's resource limits."""


class RenderBudget:
    """What one render may still spend; see the module docstring."""

    __slots__ = ("steps", "chars", "depth", "deadline")

    def __init__(self, seconds: float = RENDER_DEADLINE_S) -> None:
        self.steps = 0
        self.chars = 0
        self.depth = 0
        self.deadline = time.monotonic() + seconds

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateLimit(f"it takes more than {MAX_STEPS:,} loop iterations, calls and filter steps")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering it takes more than {RENDER_DEADLINE_S:g} s")

    def text(self, n: int) -> None:
        self.chars += n
        if self.chars > MAX_CHAR_WORK:
            raise TemplateLimit(f"it builds more than {MAX_CHAR_WORK:,} characters of text")


_BUDGET: ContextVar[RenderBudget | None] = ContextVar("edgepack_template_budget", default=None)


def _budget() -> RenderBudget:
    budget = _BUDGET.get()
    if budget is None:  # rendered outside bounded_render(): still bounded, per context
        budget = RenderBudget()
        _BUDGET.set(budget)
    return budget


@contextmanager
def bounded_render(seconds: float = RENDER_DEADLINE_S) -> Iterator[RenderBudget]:
    """A fresh budget for the renders inside the ``with`` block (this thread / context only)."""
    token = _BUDGET.set(RenderBudget(seconds))
    try:
        yield _BUDGET.get()  # type: ignore[misc]
    finally:
        _BUDGET.reset(token)


# --- sizes -------------------------------------------------------------------------------------

def text_size(value: Any, limit: int = MAX_STRING_CHARS) -> int:
    """About ``len(str(value))``, computed without building it; stops counting past ``limit``.

    Shared references count every time (``str([s] * 1000)`` repeats ``s`` 1000 times).
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v) + 3
        elif v is None or isinstance(v, bool):
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            total += 14
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += 64
    return total


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise TemplateLimit(what)


def _need_size(n: int, what: str) -> None:
    _need(n <= MAX_STRING_CHARS, f"{what} would be {n:,} characters or items (limit {MAX_STRING_CHARS:,})")


# A list slot costs a pointer and, often, a new small object (split(), map()): charged as this
# many characters, so lists and strings share one memory budget (~128 MB at MAX_CHAR_WORK).
_ITEM_COST = 16


def _charge_result(value: Any) -> Any:
    """Check and charge what an operation built: an oversized string/list or integer is refused."""
    if isinstance(value, (str, bytes)):
        _need_size(len(value), "a result")
        _budget().text(len(value))
    elif isinstance(value, (list, tuple)):
        _need_size(len(value), "a result")
        _budget().text(_ITEM_COST * len(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        _need(value.bit_length() <= MAX_INT_BITS, f"it builds an integer of {value.bit_length():,} bits "
                                                  f"(limit {MAX_INT_BITS:,})")
    return value


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- operators ---------------------------------------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")
_FORMAT_NUMBERS = re.compile(r"\d+")


def check_percent_format(fmt: str, args: Any) -> None:
    """Refuse ``fmt % args`` whose result would exceed the string limit (widths, precisions, values)."""
    values = args if isinstance(args, tuple) else (args,)
    ints = [abs(v) for v in values if _as_int(v) is not None]
    size = len(fmt) + text_size(args)
    for m in _PERCENT_SPEC.finditer(fmt):
        for part in (m.group(1), m.group(2)):
            if part == "*":
                size += max(ints, default=0)
            elif part:
                size += int(part) if len(part) < 12 else MAX_STRING_CHARS + 1
        size += 330  # the longest plain conversion: '%f' of 1.8e308
        _need_size(size, "a %-formatted string")
    _need_size(size, "a %-formatted string")


def check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse ``left op right`` before it computes an oversized integer, string or list."""
    li, ri = _as_int(left), _as_int(right)
    if op == "*":
        for seq, n in ((left, ri), (right, li)):
            if isinstance(seq, (str, bytes, list, tuple)) and n is not None:
                _need_size(len(seq) * n, "a repeated sequence")
        if li is not None and ri is not None:
            _need(li.bit_length() + ri.bit_length() <= MAX_INT_BITS + 1,
                  f"it multiplies integers into more than {MAX_INT_BITS:,} bits")
    elif op == "**":
        if li is not None and ri is not None and ri > 0 and abs(li) > 1:
            _need(ri * (abs(li).bit_length() - 1) <= MAX_INT_BITS,
                  f"it raises a {li.bit_length()}-bit integer to the power {ri:,} (limit {MAX_INT_BITS:,} bits)")
    elif op == "+":
        if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
            _need_size(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        check_percent_format(left, right)


# --- str / bytes / int methods that allocate what they are asked for ---------------------------

def _check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Pre-check a builtin method call; returns the (possibly materialized) arguments."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(obj, types.BuiltinMethodType) or owner is None:
        return args
    if isinstance(owner, (str, bytes)):
        n = len(owner)
        if name in ("center", "ljust", "rjust", "zfill"):
            width = _as_int(args[0] if args else kwargs.get("width"))
            _need_size(width or 0, f"str.{name}()")
        elif name == "expandtabs":
            tab = _as_int(args[0] if args else kwargs.get("tabsize", 8)) or 0
            _need_size(n + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tab, 0), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)) \
                and isinstance(args[1], type(owner)):
            old, new = args[0], args[1]
            hits = owner.count(old) if old else n + 1
            count = _as_int(args[2] if len(args) > 2 else kwargs.get("count", -1))
            if count is not None and count >= 0:
                hits = min(hits, count)
            _need_size(n + hits * max(len(new) - len(old), 0), "str.replace()")
        elif name == "join" and args:
            items = list(_counted(args[0], _budget()))
            _need_size(sum(len(i) if isinstance(i, (str, bytes)) else 0 for i in items)
                       + n * max(len(items) - 1, 0), "str.join()")
            return (items,) + args[1:]
        elif name == "translate" and args:
            table = args[0]
            _need(isinstance(table, dict), "str.translate() with a table that is not a dict")
            longest = max((len(v) for v in table.values() if isinstance(v, (str, bytes))), default=1)
            _need_size(n * max(longest, 1), "str.translate()")
    elif _as_int(owner) is not None and name == "to_bytes":
        _need_size(_as_int(args[0] if args else kwargs.get("length", 1)) or 0, "int.to_bytes()")
    return args


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox: each field's width and value are checked before formatting."""

    def __init__(self, env: Any, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._size = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        numbers = [int(d) if len(d) < 12 else MAX_STRING_CHARS + 1 for d in _FORMAT_NUMBERS.findall(format_spec)]
        self._size += text_size(value) + sum(numbers) + 330
        _need_size(self._size, "a str.format() result")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    """The same for ``Markup.format`` (``('{}'|safe).format(x)`` escapes ``x``, as in jinja2)."""


# --- iteration ---------------------------------------------------------------------------------

class _Counted:
    """An iterable that charges one step per item; keeps ``len()`` for ``loop.length``."""

    __slots__ = ("_src", "_it", "_budget")

    def __init__(self, src: Any, budget: RenderBudget) -> None:
        self._src, self._it, self._budget = src, iter(src), budget

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        self._budget.step()
        return next(self._it)

    def __len__(self) -> int:
        return len(self._src)  # TypeError for generators: LoopContext then counts by iterating


def _counted(src: Any, budget: RenderBudget | None = None) -> _Counted:
    return _Counted(src, budget or _budget())


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles every ``for`` iterable through :data:`LOOP_FILTER` and ``~`` through a checked join."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        # jinja2 compiles slices to a plain Python subscript, bypassing the sandbox: route them
        # through a checked copy (a loop of s[::-1] would otherwise build gigabytes uncharged).
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.bounded_slice(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if i else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# --- filters and globals -----------------------------------------------------------------------

def _center(value: Any, width: int = 80) -> str:
    _need_size(max(_as_int(width) or 0, 0), "center()")
    return do_center(value, width)


def _indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    unit = len(width) if isinstance(width, str) else max(_as_int(width) or 0, 0)
    _need_size(unit, "indent()")
    text = str(s)
    _need_size(len(text) + (text.count("\n") + 2) * unit, "indent()")
    return do_indent(s, width, first, blank)


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old, new = str(s), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if _as_int(count) is not None and count >= 0:  # type: ignore[operator]
        hits = min(hits, count)  # type: ignore[type-var]
    _need_size(len(text) + hits * max(len(new) - len(old), 0), "replace()")
    return text.replace(old, new, -1 if count is None else count)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> str:
    items = list(_counted(value))
    if attribute is not None:
        getter = make_attrgetter(eval_ctx.environment, attribute)
        items = [getter(item) for item in items]
    size = sum(text_size(item) for item in items) + len(str(d)) * max(len(items) - 1, 0)
    _need_size(size, "join()")
    return sync_do_join(eval_ctx, items, d)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    check_percent_format(str(value), kwargs or args)
    return str(value) % (kwargs or args)


@pass_environment
def _wordwrap(env: Any, s: Any, width: int = 79, break_long_words: bool = True, wrapstring: str | None = None,
              break_on_hyphens: bool = True) -> str:
    text = str(s)
    sep = len(env.newline_sequence if wrapstring is None else str(wrapstring))
    _need_size(len(text) + (len(text) + 1) * sep, "wordwrap()")
    return do_wordwrap(env, s, width, break_long_words, wrapstring, break_on_hyphens)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None:
        _need_size(_as_int(linecount) or 0, "batch() with fill_with")
    tmp: list[Any] = []
    for item in _counted(value):
        if len(tmp) == linecount:
            yield tmp
            tmp = []
        tmp.append(item)
    if tmp:
        if fill_with is not None and len(tmp) < linecount:
            tmp += [fill_with] * (linecount - len(tmp))
        yield tmp


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    _need(isinstance(slices, int) and 0 < slices <= MAX_RANGE, f"slice({slices!r}) (at most {MAX_RANGE:,} slices)")
    _budget().step(slices)
    return sync_do_slice(value, slices, fill_with)


@pass_environment
def _sum(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    # sum(start=[]) concatenates lists one by one: quadratic time for a linear-size result.
    _need(isinstance(start, (int, float)), "sum() with a non-numeric start (quadratic list building)")
    return sync_do_sum(env, _counted(iterable), attribute, start)


def _tojson(value: Any, indent: Any = None, separators: Any = None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates need the raw JSON
    # (transformers' and llama-cpp-python's tojson). Encoded piecewise so the size is checked
    # while it grows: an indent multiplies with nesting.
    encoder = json.JSONEncoder(indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    pieces, size = [], 0
    for piece in encoder.iterencode(value):
        size += len(piece)
        _need_size(size, "tojson()")
        pieces.append(piece)
    return "".join(pieces)


def _range(*args: Any) -> range:
    try:
        rng = range(*args)
        n = len(rng)
    except OverflowError:
        n = MAX_RANGE + 1
    _need(n <= MAX_RANGE, f"range() of more than {MAX_RANGE:,} items")
    _budget().step(n)
    return rng


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja's names
    _need(all(isinstance(v, int) and 0 <= v <= 1000 for v in (n, min, max)), "lipsum() arguments above 1000")
    return str(generate_lorem_ipsum(n, html, min, max))


def _metered(name: str, func: Any) -> Any:
    """Wrap a filter so each call costs a step, plus its input's size unless it is O(1)."""
    from jinja2.utils import _PassArg

    takes_first = _PassArg.from_obj(func) is not None
    per_item = name not in _CONSTANT_COST_FILTERS

    @functools.wraps(func)
    def metered(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        value = args[1 if takes_first else 0] if len(args) > takes_first else None
        if isinstance(value, str):
            if per_item:
                budget.text(len(value))
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            if per_item:
                budget.step(len(value))
            if name in _STRINGIFYING:
                _need_size(text_size(value), f"the text of {name}()'s input")
        return _charge_result(func(*args, **kwargs))

    return metered


# Filters that turn a container into its str(): the text is sized before it is built.
_STRINGIFYING = frozenset(["capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower",
                           "upper", "replace", "striptags", "title", "trim", "truncate", "urlencode", "urlize",
                           "wordcount", "wordwrap", "string", "pprint", "safe"])


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox with the resource limits of the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def __init__(self, **options: Any) -> None:
        super().__init__(optimized=False, finalize=self._finalize, **options)
        self.globals.update(range=_range, lipsum=_lipsum)
        self.filters.update(center=_center, indent=_indent, replace=_replace, join=_join, format=_format,
                            wordwrap=_wordwrap, batch=_batch, slice=_slice, sum=_sum, tojson=_tojson)
        self.filters = {name: _metered(name, f) for name, f in self.filters.items()}
        self.filters[LOOP_FILTER] = _counted

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # An unsafe attribute raises at once instead of becoming a silent empty Undefined, so a
        # probing template fails loudly.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget().step()
        check_binop(operator, left, right)
        return _charge_result(self.binop_table[operator](left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        budget = _budget()
        budget.step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop(...) iterates its argument
            args = (_counted(args[0], budget),) + args[1:]
        args = _check_method(__obj, args, kwargs)
        budget.depth += 1
        try:
            _need(budget.depth <= MAX_CALL_DEPTH, f"its calls nest deeper than {MAX_CALL_DEPTH} levels")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return _charge_result(result) if isinstance(result, (str, bytes, int, list, tuple)) else result

    def wrap_str_format(self, value: Any) -> Any:
        # jinja2 sandboxes str.format with its own formatter; this one also checks field widths.
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            formatter = _BoundedEscapeFormatter(self, escape=fmt.escape) if isinstance(fmt, Markup) \
                else _BoundedFormatter(self)
            return type(fmt)(formatter.vformat(fmt, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def bounded_slice(self, obj: Any, index: slice) -> Any:
        """``obj[a:b:c]``: the copy is charged like any other string or list built."""
        return _charge_result(obj[index])

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``: sized before the strings are built."""
        size = sum(len(p) if isinstance(p, str) else text_size(p) for p in parts)
        _need_size(size, "a ~ concatenation")
        _budget().text(size)
        return "".join([p if isinstance(p, str) else str(p) for p in parts])

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """Captured output (``{% set %}`` blocks, macro bodies, ``{% filter %}``), sized as it grows."""
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            _need_size(size, "a captured block")
            out.append(piece)
        _budget().text(size)
        return "".join(out)

    @staticmethod
    def _finalize(value: Any) -> Any:
        # Every {{ value }} becomes str(value): size containers before str() builds them.
        if not isinstance(value, str):
            _need_size(text_size(value), "the text of an output value")
        return value
