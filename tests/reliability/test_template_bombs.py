"""Chat-template bombs are refused with exit 2, fast and small (issue #20, defect 3 and part of 12).

A chat template is untrusted input that runs when a model loads: nested ``range(100000)`` loops,
``((10**999)**999)**999``, ``'a' * 10**9`` or doubling ``~`` concatenations once hung ``run``,
``pack``, ``export``, ``gate`` and ``serve`` or took gigabytes, partly inside llama-cpp-python's
own Jinja compile when ``Llama()`` opened the GGUF (constant folding), before edgepack's sandbox
rendered anything. Templates raising OverflowError or RecursionError escaped as exit 3.

Every command here runs through the real CLI in a child process, under a generous deadline,
with the peak resident memory of the whole process tree sampled (see
:mod:`tests.reliability.template_bombs`). Real templates must render exactly as before.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from edgepack.errors import EdgepackError, InvalidModelFile, UnsafeModelError
from tests.reliability.template_bombs import BOMBS, CORE, DEADLINE_S, bomb_gguf, bomb_hf_dir, bomb_run_dir, run_bounded
from tests.runtime.helpers import make_run_dir, write_profile
from tests.tiny import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[2]
HOLDOUT = REPO / "distill" / "demo" / "holdout.jsonl"
USER = [{"role": "user", "content": "Pump P-101 alarm"}]


def _refused(outcome, what: str) -> None:  # type: ignore[no-untyped-def]
    problem = outcome.problem()
    assert problem is None, f"{what}: {problem}\n{outcome.stderr[-2000:]}"
    assert "template" in outcome.stderr, f"{what}: the refusal does not name the chat template: {outcome.stderr}"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgepack.export.gguf.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-F16.gguf", outtype="F16")


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Random-init weights score 0 on the holdout, so the quality floor is 0 (the gate can PASS).
    return write_profile(tmp_path_factory.mktemp("profiles"), "bombs", min_relative_quality=0.0)


@pytest.fixture(scope="module")
def bomb_ggufs(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bomb-ggufs")
    return {name: bomb_gguf(tiny_gguf, folder / f"{name}.gguf", template) for name, template in BOMBS.items()}


# --- the sandbox alone, in this process: every bomb ends in an edgepack error, quickly ------------

@pytest.mark.parametrize("name", sorted(BOMBS))
def test_sandbox_render_is_bounded(name: str) -> None:
    from edgepack.runtime.chat.template import render_chat

    start = time.monotonic()
    try:
        render_chat(BOMBS[name], USER)
        rendered = True
    except EdgepackError as exc:
        assert exc.exit_code == 2 and str(exc).strip()
        rendered = False
    assert time.monotonic() - start < 20, f"{name} took {time.monotonic() - start:.1f} s"
    # Only the folding bomb renders (its bomb sits in a branch that never runs); llama.cpp's and
    # transformers' compile would still evaluate it, which the pre-load check refuses.
    assert rendered == (name == "folded_dead_branch")


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_template_check_refuses_every_bomb(name: str) -> None:
    from edgepack.runtime.chat.check import check_chat_templates

    start = time.monotonic()
    with pytest.raises((UnsafeModelError, InvalidModelFile)) as info:
        check_chat_templates({"tokenizer.chat_template": BOMBS[name]}, render="tokenizer.chat_template",
                             compilers=("llama_cpp", "transformers"), strict=True, where=f"bomb {name}")
    assert time.monotonic() - start < DEADLINE_S
    assert "template" in str(info.value) and info.value.hint


def test_a_compile_too_slow_for_any_size_limit_is_stopped_by_the_cpu_limit() -> None:
    """No size limit catches this fold (3 MB, then textwrap), but it costs seconds of CPU in
    llama-cpp-python's compile: the check's child is killed by RLIMIT_CPU and the template refused."""
    from edgepack.runtime.chat.check import check_chat_templates

    template = "{% if false %}{{ ('y' * 3000000)|wordwrap(1) }}{% endif %}" + str(time.time())
    with pytest.raises(UnsafeModelError, match="template bomb.*(killed|still running)"):
        check_chat_templates({"tokenizer.chat_template": template}, compilers=("llama_cpp",), where="slow")


def test_the_check_is_paid_once_per_template_and_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepack.runtime.chat.check import CHECKED_ENV, check_chat_templates, template_digest

    monkeypatch.setenv(CHECKED_ENV, "")
    template = CHATML_TEMPLATE + f"{{# {time.time()} #}}"  # not checked yet in this process
    check_chat_templates({"t": template}, render="t", compilers=("llama_cpp",))
    start = time.monotonic()
    check_chat_templates({"t": template}, render="t", compilers=("llama_cpp",))
    assert time.monotonic() - start < 0.1  # no second child process
    import os

    assert f"compile:llama_cpp:{template_digest(template)}" in os.environ[CHECKED_ENV]


# --- run: every bomb, embedded in a GGUF ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BOMBS))
def test_run_refuses_bomb_gguf(name: str, bomb_ggufs: dict[str, Path]) -> None:
    outcome = run_bounded(["run", str(bomb_ggufs[name]), "--prompt", "Pump P-101 alarm", "--max-tokens", "2"])
    _refused(outcome, f"run {name}")


def test_run_refuses_a_bomb_in_a_named_template_variant(tiny_gguf: Path, tmp_path: Path) -> None:
    """llama-cpp-python compiles every ``tokenizer.chat_template.*`` key in ``Llama()``, not only the default."""
    path = bomb_gguf(tiny_gguf, tmp_path / "variant.gguf", BOMBS["repeat_pow"], key="tokenizer.chat_template.tool_use")
    outcome = run_bounded(["run", str(path), "--prompt", "Pump P-101 alarm", "--max-tokens", "2"])
    _refused(outcome, "run (bomb in tokenizer.chat_template.tool_use)")


# --- gate, with and without a holdout --------------------------------------------------------------

@pytest.mark.parametrize("holdout", [False, True], ids=["no-holdout", "holdout"])
@pytest.mark.parametrize("name", CORE)
def test_gate_refuses_bomb_gguf(name: str, holdout: bool, bomb_ggufs: dict[str, Path], profile: Path,
                                tmp_path: Path) -> None:
    args = ["gate", str(bomb_ggufs[name]), "--profile", str(profile), "--report", str(tmp_path / "gate.json")]
    outcome = run_bounded(args + (["--holdout", str(HOLDOUT)] if holdout else []))
    _refused(outcome, f"gate {name} (holdout={holdout})")
    assert not (tmp_path / "gate.json").exists(), "a refused artifact must not get a gate report"


# --- serve: the server refuses to start -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# overflow_error too: a template that exists but cannot render a plain chat is refused at start-up
# (a model with no template at all still serves completions).
@pytest.mark.parametrize("name", CORE)
def test_serve_refuses_to_start_on_bomb_gguf(name: str, bomb_ggufs: dict[str, Path]) -> None:
    outcome = run_bounded(["serve", str(bomb_ggufs[name]), "--port", str(_free_port())])
    _refused(outcome, f"serve {name}")


# --- export: the bomb in an HF folder's tokenizer_config.json --------------------------------------

@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("name", CORE)
def test_export_refuses_bomb_hf_dir(name: str, fmt: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = bomb_hf_dir(tiny_llama_dir, tmp_path / "model", BOMBS[name])
    outcome = run_bounded(["export", str(src), "--format", fmt, "--out", str(tmp_path / "out"), "--no-fidelity"])
    _refused(outcome, f"export --format {fmt} {name}")
    assert not list((tmp_path / "out").glob("*.gguf")), "nothing is exported from a refused folder"


# --- pack: a gated run whose artifact was swapped for a bomb (report re-forged to match) ---------

@pytest.fixture(scope="module")
def gated_run(tiny_llama_dir: Path, profile: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # F16 only: the template is what is under test, not the quantizer.
    return make_run_dir(tmp_path_factory.mktemp("runs") / "run", tiny_llama_dir, [profile], quants=("F16",))


@pytest.mark.parametrize("name", CORE)
def test_pack_refuses_bomb_artifact(name: str, gated_run: Path, profile: Path, tmp_path: Path) -> None:
    run = bomb_run_dir(gated_run, tmp_path / "run", BOMBS[name])
    outcome = run_bounded(["pack", str(run), "--profile", str(profile)])
    _refused(outcome, f"pack {name}")
    assert not list(run.rglob("*.edgepack")), "no bundle is written for a bomb"


def test_pack_still_packs_the_real_template(gated_run: Path, profile: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gated_run, run)
    outcome = run_bounded(["pack", str(run), "--profile", str(profile), "--json"])
    assert outcome.rc == 0, outcome.stderr[-2000:]


# --- defect 12: OverflowError / RecursionError are clean refusals, never exit 3 -------------------

@pytest.mark.parametrize("template", [
    "{{ (10 ** 400) / 3 }}",                                           # OverflowError: int too large for float
    "{{ 10.0 ** 400 }}",                                               # OverflowError: float pow
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",                 # RecursionError without a depth limit
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",                     # RecursionError in the parser
    "{{ 1 // 0 }}",                                                    # ZeroDivisionError
])
def test_arithmetic_and_recursion_errors_are_clean(template: str) -> None:
    from edgepack.runtime.chat.template import render_chat

    with pytest.raises((UnsafeModelError, InvalidModelFile)):
        render_chat(template, USER)


# --- real templates render exactly as a plain sandbox renders them --------------------------------

COMPLEX_TEMPLATE = """\
{%- macro render(m, depth=0) -%}
{{ '<|im_start|>' + m['role'] + '\\n' }}{{ m['content'] | trim }}{{ '<|im_end|>\\n' }}
{%- endmacro -%}
{%- set ns = namespace(system=none, count=0, text='') -%}
{%- for message in messages[::-1] %}{% set index = (messages|length - 1) - loop.index0 %}
{%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% endif %}
{%- set ns.count = ns.count + 1 %}{% set ns.text = ns.text ~ message['role'][0] %}
{%- endfor %}
{%- if ns.system is not none %}{{ '# ' ~ ns.system|upper|center(40) ~ '\\n' }}{% endif -%}
{{ '%d turns, %s' % (ns.count, ns.text) }} {{ '{0:>6}|{1:<4}|'.format(ns.count, 'x') }}
{{ (messages|map(attribute='role')|list)|tojson(indent=2) }}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(' / ') }}
{{ range(5)|list|batch(2)|list }} {{ range(7)|slice(3)|list }} {{ [1, 2, 3]|sum }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }}
{{ 'a,b,c'.split(',')|reverse|join('-') }} {{ 'hello world'|title|replace('World', 'There') }}
{{ 'x\\ny'|indent(2, first=true) }} {{ '  pad  '.strip().ljust(6, '.') }} {{ 'abc'.replace('b', 'BB') }}
{%- set c = cycler('odd', 'even') %}{% for i in range(3) %} {{ c.next() }}{{ loop.cycle('<', '>') }}{% endfor %}
{%- set j = joiner(', ') %}{% for k, v in {'b': 2, 'a': 1}|dictsort %}{{ j() }}{{ k }}={{ v }}{% endfor %}
{% filter upper %}filtered {{ messages|length }}{% endfilter %} {% set block %}[{{ ns.count * 3 }}]{% endset %}{{ block ~ block }}
{% for m in messages %}{% if loop.first %}first{% elif loop.last %}last{% else %}mid{% endif %} {% endfor %}
{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}{% endfor %}
{%- for message in messages %}{{ render(message) }}{% endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Pump P-101 alarm "},
                {"role": "assistant", "content": "mechanical"}, {"role": "user", "content": "Über-Temperatur 日本語"}]


def _plain_sandbox_render(template: str, messages: list[dict[str, str]], **kw: object) -> str:
    """What transformers' apply_chat_template renders: jinja2's immutable sandbox, no limits."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: \
        json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    return env.from_string(template).render(messages=messages, raise_exception=raise_exception, **kw)


def _real_template(which: str, teacher_gguf: Path) -> str:
    from llama_cpp import llama_chat_format as formats

    from edgepack.gguf_header import read_gguf

    return {"chatml": CHATML_TEMPLATE, "complex": COMPLEX_TEMPLATE,
            "smollm2": read_gguf(teacher_gguf).chat_template or "",
            # The templates llama-cpp-python ships for these families (from their tokenizer configs).
            "llama3": formats.LLAMA3_INSTRUCT_CHAT_TEMPLATE, "mistral": formats.MISTRAL_INSTRUCT_CHAT_TEMPLATE,
            "mixtral": formats.MIXTRAL_INSTRUCT_CHAT_TEMPLATE}[which]


@pytest.mark.parametrize("which", ["chatml", "complex", "smollm2", "llama3", "mistral", "mixtral"])
def test_real_templates_render_identically(which: str, builtin_teacher_gguf: Path) -> None:
    from edgepack.errors import UsageError
    from edgepack.runtime.chat.template import render_chat
    from edgepack.runtime.chat.check import check_chat_templates

    template = _real_template(which, builtin_teacher_gguf)
    assert template
    check_chat_templates({"tokenizer.chat_template": template}, render="tokenizer.chat_template",
                         compilers=("llama_cpp", "transformers"), strict=True, where=which)
    rendered = 0
    for messages in (USER, CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:4]):
        for gen in (True, False):
            kw = dict(add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
            try:
                plain = _plain_sandbox_render(template, messages, **kw)  # type: ignore[arg-type]
            except ValueError:  # the template's raise_exception (roles must alternate...)
                with pytest.raises(UsageError):
                    render_chat(template, messages, **kw)  # type: ignore[arg-type]
                continue
            assert render_chat(template, messages, **kw) == plain  # type: ignore[arg-type]
            rendered += 1
    assert rendered >= 2


@pytest.mark.parametrize("which", ["chatml", "smollm2"])
def test_the_limits_leave_room_for_long_real_chats(which: str, builtin_teacher_gguf: Path) -> None:
    """3001 turns, or one 3-million-character message: far past any context, still rendered."""
    from edgepack.runtime.chat.template import render_chat

    template = _real_template(which, builtin_teacher_gguf)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 300} for i in range(3001)]
    assert len(render_chat(template, turns)) > 3001 * 300
    assert len(render_chat(template, [{"role": "user", "content": "Über " * 600_000}])) > 3_000_000


def test_the_real_model_still_runs(tiny_gguf: Path) -> None:
    outcome = run_bounded(["run", str(tiny_gguf), "--prompt", "Pump P-101 alarm", "--max-tokens", "2", "--json"])
    assert outcome.rc == 0, outcome.stderr[-2000:]


def test_a_template_failing_on_one_request_is_a_400_and_the_server_carries_on(tiny_gguf: Path,
                                                                              tmp_path: Path) -> None:
    """Defect 12: a template error on particular messages was an HTTP 500; it is the request's 400."""
    from tests.runtime.server.helpers import chat, launch

    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = bomb_gguf(tiny_gguf, tmp_path / "picky.gguf", template)
    server = launch(model, tmp_path, n_ctx=256, threads=1)
    try:
        bad = chat(server.port, messages=[{"role": "user", "content": "boom"}], max_tokens=2)
        assert bad.status == 400, bad.body
        assert "chat template" in bad.json()["error"]["message"]
        assert chat(server.port, max_tokens=2).status == 200
    finally:
        assert server.stop() == 0, server.log.read_text(errors="replace")
