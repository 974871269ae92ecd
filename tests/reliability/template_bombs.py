"""Chat-template bombs and the harness that runs edgepack's commands on them (issue #20, defect 3).

Shared by ``tests/reliability/test_template_bombs.py`` (the fast cases) and
``bench/reliability/template_bombs.py`` (the full count). A bomb is a chat template that costs
time or memory out of proportion to its size: nested loops, huge powers and repeats, doubling
concatenations, runaway recursion, filters asked for a billion characters, and expressions that
Jinja's compile-time constant folding evaluates (inside llama-cpp-python's ``Llama()`` and
transformers' ``apply_chat_template``) before any render. :func:`run_bounded` runs one command
under a deadline while sampling the resident memory of its whole process tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEADLINE_S = float(os.environ.get("EDGEPACK_BOMB_DEADLINE_S", "60"))
RSS_LIMIT_MB = 1024.0

# name -> template. Every one must be refused (exit 2) before it costs a hang or a gigabyte.
BOMBS: dict[str, str] = {
    "nested_range": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "triple_range": ("{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}"
                     "{{ '' }}{% endfor %}{% endfor %}{% endfor %}"),
    "power_tower": "{{ ((10**999)**999)**999 }}",
    "repeat_pow": "{{ 'a' * 10**9 }}",
    "repeat_literal": "{{ 'a' * 1000000000 }}",
    "concat_doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}"),
    "plus_doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}{{ ns.s|length }}"),
    "block_set_doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set t %}{{ ns.s }}"
                           "{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s|length }}"),
    "int_squaring": ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                     "{% endfor %}{{ ns.x > 0 }}"),
    "macro_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro_fanout": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                     "{{ f(64) }}"),
    "recursive_loop": "{% for x in [1] recursive %}{{ loop([1, 1]) }}{% endfor %}",
    "center": "{{ 'a'|center(1000000000) }}",
    "ljust": "{{ 'a'.ljust(1000000000) }}",
    "percent_width": "{{ '%01000000000d' % 1 }}",
    "format_width": "{{ '{:>1000000000}'.format(1) }}",
    "indent": "{{ ('a\\n' * 1000)|indent(1000000) }}",
    "replace": "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "join": "{{ ('x' * 1000000)|list|join('y' * 1000) }}",
    "tojson_indent": "{{ range(100000)|list|tojson(indent=100000) }}",
    "lipsum": "{{ lipsum(n=100000000) }}",
    "to_bytes": "{{ (1).to_bytes(1000000000, 'big')|length }}",
    "batch_fill": "{{ [1]|batch(1000000000, 0)|list|length }}",
    "list_str": "{% set l = ['x' * 1000000] * 1000 %}{{ l }}",
    "sum_lists": "{% set l = [[0] * 1000] * 5000 %}{{ l|sum(start=[])|length }}",
    "overflow_error": "{{ (10 ** 400) / 3 }}",
    "recursion_error": "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
    "folded_dead_branch": "{% if false %}{{ 'a' * 10**9 }}{% endif %}{{ messages[0]['content'] }}",
}
# Templates that merely fail to render (not bombs): refused with exit 2 wherever a chat is rendered
# or judged, but ``serve`` starts on them for plain completions.
BROKEN = frozenset(["overflow_error", "float_overflow", "zero_division", "divisible_zero", "recursion_caller"])
# A representative few for the slower commands (export, pack, gate, serve).
CORE = ["nested_range", "power_tower", "repeat_pow", "concat_doubling", "macro_recursion", "overflow_error",
        "folded_dead_branch"]


def generated_bombs(seed: int = 0) -> dict[str, str]:
    """Many more bombs of varied size and nesting, for the bench (deterministic for ``seed``)."""
    import random

    rng = random.Random(seed)
    out: dict[str, str] = {}
    for depth in (2, 3, 4):
        n = rng.choice([300, 1000, 5000, 100000]) if depth > 2 else 100000
        body = "{{ '' }}"
        for i in range(depth):
            body = f"{{% for v{i} in range({n}) %}}{body}{{% endfor %}}"
        out[f"loops{depth}x{n}"] = body
    for base, exp in ((10, 999), (7, 5000), (2, 10**7), (99, 10**5)):
        out[f"pow{base}^{exp}"] = f"{{{{ ({base}**{exp})**{exp} }}}}"
        out[f"pow_folded{base}^{exp}"] = f"{{% if false %}}{{{{ ({base}**{exp})**{exp} }}}}{{% endif %}}x"
    for n in (10**8, 10**9, 3 * 10**9):
        out[f"repeat{n}"] = f"{{{{ 'ab' * {n} }}}}"
        out[f"repeat_list{n}"] = f"{{{{ ([0] * {n})|length }}}}"
        out[f"center{n}"] = f"{{{{ 'x'|center({n}) }}}}"
        out[f"zfill{n}"] = f"{{{{ '1'.zfill({n}) }}}}"
        out[f"format{n}"] = f"{{{{ '{{:^{n}}}'.format('x') }}}}"
        out[f"percent{n}"] = f"{{{{ '%{n}s' % 'x' }}}}"
        out[f"folded_repeat{n}"] = f"{{% if false %}}{{{{ 'ab' * {n} }}}}{{% endif %}}x"
    for op in ("~", "+"):
        for rounds in (30, 40, 64):
            out[f"double{op}{rounds}"] = (f"{{% set ns = namespace(s='abc') %}}{{% for i in range({rounds}) %}}"
                                          f"{{% set ns.s = ns.s {op} ns.s %}}{{% endfor %}}{{{{ ns.s|length }}}}")
    for rounds in (30, 64):
        out[f"square{rounds}"] = (f"{{% set ns = namespace(x=7) %}}{{% for i in range({rounds}) %}}"
                                  f"{{% set ns.x = ns.x * ns.x %}}{{% endfor %}}{{{{ ns.x > 1 }}}}")
    for fan in (2, 3):
        out[f"fanout{fan}"] = ("{% macro f(n) %}{% if n > 0 %}" + "{{ f(n - 1) }}" * fan
                               + "{% endif %}{% endmacro %}{{ f(80) }}")
    out["recursion_plain"] = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"
    out["recursion_caller"] = "{% macro f() %}{% call f() %}x{% endcall %}{% endmacro %}{{ f() }}"
    for depth in (2000, 10000, 50000):
        out[f"nest_parens{depth}"] = "{{ " + "(" * depth + "1" + ")" * depth + " }}"
        out[f"nest_lists{depth}"] = "{{ " + "[" * depth + "]" * depth + " }}"
    out["indent_str"] = "{{ ('a\\n' * 100000)|indent('x' * 100000) }}"
    out["expandtabs"] = "{{ ('\\t' * 100000).expandtabs(100000) }}"
    out["replace_empty"] = "{{ ('a' * 100000).replace('', 'b' * 10000) }}"
    out["join_method"] = "{{ ('y' * 10000).join(['x' * 10000] * 10000) }}"
    out["wordwrap"] = "{{ ('a ' * 100000)|wordwrap(1, wrapstring='z' * 100000) }}"
    out["tojson_nested"] = "{{ ([[range(1000)|list] * 1000] * 10)|tojson(indent=1000) }}"
    out["slice_many"] = "{{ [1]|slice(100000000)|list|length }}"
    out["lipsum_max"] = "{{ lipsum(n=1000, min=1000000, max=10000000) }}"
    out["format_nested_width"] = "{{ '{:{w}}'.format('x', w=1000000000) }}"
    out["format_map"] = "{{ ('{0:>100000}' * 100000).format('x') }}"
    out["percent_star"] = "{{ '%*d' % (1000000000, 1) }}"
    # No size limit applies, but folding it costs seconds of CPU: the check's CPU limit stops it.
    out["folded_wordwrap"] = "{% if false %}{{ ('x' * 3000000)|wordwrap(1) }}{% endif %}x"
    out["float_overflow"] = "{{ 10.0 ** 400 }}"
    out["zero_division"] = "{{ 1 // 0 }}"
    out["divisible_zero"] = "{{ 4 is divisibleby 0 }}"
    out["str_of_nested"] = "{% set a = ['x' * 100000] * 1000 %}{% set b = [a] * 1000 %}{{ b|string|length }}"
    out["concat_list"] = "{% set a = ['x' * 100000] * 1000 %}{{ ('' ~ a)|length }}"
    out["filter_in_loop"] = ("{% set big = range(100000)|list %}{% for i in range(100000) %}"
                             "{{ big|sort|first }}{% endfor %}")
    out["unicode_upper_loop"] = ("{% set ns = namespace(s='\u00df') %}{% for i in range(40) %}"
                                 "{% set ns.s = ns.s|upper ~ ns.s|upper %}{% endfor %}")
    return out


@dataclass
class Outcome:
    """How one command ended: exit code (None: killed at the deadline), time, peak tree RSS, output."""

    rc: int | None
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def problem(self, deadline_s: float = DEADLINE_S, rss_limit_mb: float = RSS_LIMIT_MB,
                expect: int = 2) -> str | None:
        """Why this outcome is a failure, or None: a hang, a memory blow-up, another exit code."""
        if self.rc is None:
            return f"still running after {deadline_s:.0f} s (killed)"
        if self.peak_rss_mb > rss_limit_mb:
            return f"peak RSS {self.peak_rss_mb:.0f} MB > {rss_limit_mb:.0f} MB"
        if self.rc != expect:
            tail = (self.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
            return f"exit {self.rc}, expected {expect}: {tail}"
        return None


def _tree_rss(proc: Any) -> float:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_bounded(args: list[str], *, deadline_s: float = DEADLINE_S, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> Outcome:
    """Run ``python -m edgepack *args``; kill its process group at the deadline; sample tree RSS."""
    import psutil

    start = time.monotonic()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("EDGEPACK_TEMPLATES_CHECKED", None)  # a command must check for itself
    with subprocess.Popen([sys.executable, "-m", "edgepack", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd, env=full_env,
                          start_new_session=True) as popen:
        ps = psutil.Process(popen.pid)
        peak = 0.0
        rc: int | None = None
        while True:
            peak = max(peak, _tree_rss(ps))
            rc = popen.poll()
            if rc is not None:
                break
            if time.monotonic() - start > deadline_s:
                _kill_tree(popen)
                rc = None
                break
            time.sleep(0.02)
        out, err = popen.communicate()
    return Outcome(rc, time.monotonic() - start, peak, out.decode("utf-8", "replace"),
                   err.decode("utf-8", "replace"))


def _kill_tree(popen: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        popen.kill()
    popen.wait()


# --- carriers: a GGUF, an HF folder, a run directory with a forged gate report ------------------

def bomb_gguf(src: Path, dst: Path, template: str, *, key: str = "tokenizer.chat_template") -> Path:
    """A copy of the GGUF ``src`` whose ``key`` (the default template or a named variant) is ``template``."""
    from tests.runtime.helpers import rewrite_gguf

    return rewrite_gguf(src, dst, {key: template})


def bomb_hf_dir(src: Path, dst: Path, template: str) -> Path:
    """A copy of the HF folder ``src`` with ``template`` as tokenizer_config.json's chat_template."""
    import json

    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config), encoding="utf-8")
    for extra in ("chat_template.jinja", "chat_template.json"):
        (dst / extra).unlink(missing_ok=True)
    return dst


def bomb_run_dir(src_run: Path, dst_run: Path, template: str) -> Path:
    """A copy of a gated run directory whose gated GGUF now carries ``template``, its gate report
    rewritten to the new file's sha256 (a forged PASS: what ``pack`` must not trust blindly)."""
    import json

    from edgepack.constants import ARTIFACTS_DIR, GATE_DIR
    from edgepack.export.gate.gate import artifact_digest

    shutil.copytree(src_run, dst_run, symlinks=True)
    for report_path in sorted((dst_run / GATE_DIR).glob("*.json")):
        report = json.loads(report_path.read_text(encoding="utf-8"))
        name = report.get("artifact_name") or Path(str(report.get("artifact", ""))).name
        artifact = dst_run / ARTIFACTS_DIR / name
        if not artifact.is_file() or artifact.suffix != ".gguf":
            continue
        tmp = artifact.with_name(artifact.name + ".bomb")
        bomb_gguf(artifact, tmp, template)
        tmp.replace(artifact)
        digest = artifact_digest(artifact)
        old = {report.get("model_sha256"), report.get("artifact_sha256")} - {None}
        text = report_path.read_text(encoding="utf-8")
        for sha in old:
            text = text.replace(sha, digest)
        text = text.replace(str(src_run.resolve()), str(dst_run.resolve()))
        report_path.write_text(text, encoding="utf-8")
    return dst_run
