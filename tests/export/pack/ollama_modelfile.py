"""Ollama's Modelfile parser, ported for tests: what ``ollama create`` would read from our Modelfile.

A line-for-line port of the state machine in ollama/ollama ``parser/parser.go`` (``ParseFile``,
``parseRuneForState``, ``unquote``): no escapes; a value ends at whitespace once it reads as a
bare word, ``"..."`` or ``\"\"\"...\"\"\"``; only printable runes (and, inside a quoted value,
spaces, tabs and newlines) are kept. Returns ``(command, argument)`` pairs, ``PARAMETER x v`` as
``("x", "v")`` and ``FROM`` as ``("model", ...)``.
"""

from __future__ import annotations

_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _step(r: str, state: str) -> tuple[str, str | None]:
    """(next state, the rune to keep or None): parseRuneForState."""
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", None) if r == "#" else ("nil", None) if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        if space:
            return "value", None
        raise ValueError("invalid command")
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state in ("parameter", "message"):
        if r.isascii() and (r.isalnum() or (r == "_" and state == "parameter")):
            return state, r
        if space:
            return "value", None
        raise ValueError("unexpected EOF")
    return ("nil", None) if newline else ("comment", None)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """The commands Ollama reads from ``text``; ValueError where it would refuse the file."""
    commands: list[tuple[str, str]] = []
    state, buf, name, role = "nil", "", "", ""
    for r in text:
        nxt, keep = _step(r, state)
        if nxt != state:
            if state == "name":
                if buf.lower() not in _COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                lower = buf.lower()
                name = "model" if lower == "from" else lower
                nxt = {"parameter": "parameter", "message": "message"}.get(lower, nxt)
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                value, ok = _unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected EOF")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected EOF")
    if not any(c == "model" for c, _ in commands):
        raise ValueError("no FROM line")
    return commands
