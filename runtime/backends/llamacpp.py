"""The ``gguf`` backend: llama.cpp through llama-cpp-python.

Loading goes in two steps. First edgepack's own bounded header reader
(:mod:`edgepack.gguf_header`) checks the file, so a truncated or hostile GGUF is
refused with :class:`~edgepack.errors.InvalidModelFile` before native code parses it. Then
llama.cpp loads it quietly (``verbose=False``) while a log hook keeps llama.cpp's warnings
and errors, so a refusal still says why (llama-cpp-python #2187: with verbose off the
reason is otherwise lost).

Chat prompts are rendered from the GGUF's ``tokenizer.chat_template`` by edgepack's sandboxed
renderer, never by llama-cpp-python's chat handlers; the GGUF's templates are checked
(:mod:`edgepack.runtime.chat.check`) before ``Llama()`` compiles them. Generation stops
before any end-of-generation token llama.cpp knows for the vocabulary (EOS, EOT, ...).

Generation builds llama.cpp's sampler chain itself rather than calling ``Llama.generate``, for
one reason: llama-server puts the prompt's tokens in the repeat-penalty window before the first
answer token (``init_sampler`` accepts them), while ``Llama.generate`` counts only the tokens it
generated; with a penalty the two pick different tokens, and the bundle's Modelfile is run by
llama-server and Ollama. The chain is llama-cpp-python's own (penalties, then greedy, or top-k
40 / typical 1 / top-p 0.95 / min-p 0.05 / temperature / seeded dist), so at penalty 1.0 the
tokens are the ones ``Llama.generate`` picks. A ``json_schema`` becomes a grammar
(llama-cpp-python's JSON-schema converter, the Python twin of llama.cpp's) placed after the
penalties, so greedy decoding picks the best token the schema allows; tokens that would make the
answer's bytes invalid UTF-8 are banned first (:mod:`edgepack.runtime.backends.utf8`: llama.cpp's
grammar reads bytes leniently and would let them through). That converter drops some
keywords (:data:`UNENFORCED_KEYWORDS`, integer ``minimum``/``maximum`` among them) and writes other
whitespace rules than llama-server's C++ converter, so a constrained answer can differ from
llama-server's for the same schema.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from collections import deque
from functools import lru_cache
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgepack.errors import InvalidModelFile, RuntimeFailure, UsageError
from edgepack.runtime.backends.base import PENALTY_LAST_N, Backend, Sampling, TokenLogprob, register_backend
from edgepack.runtime.backends.utf8 import Utf8Guard
from edgepack.gguf_header import GGUFInfo, read_gguf

# llama.cpp log lines kept from the last load (WARN, ERROR and their continuations). The
# numbering is current ggml's (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); the comment
# in llama-cpp-python's _logger.py still shows an older order.
_LOG_LINES: deque[str] = deque(maxlen=40)
_LOG_STATE: dict[str, Any] = {"callback": None, "last_level": 0}
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5


def _install_log_hook() -> None:
    """Route llama.cpp's log into :data:`_LOG_LINES` instead of stderr.

    The callback is process-global in llama.cpp and other code (the exporter) swaps its own in
    and back, so it is set again before every load. ``EDGEPACK_DEBUG=1`` echoes everything.
    """
    import llama_cpp

    if _LOG_STATE["callback"] is None:
        debug = os.environ.get("EDGEPACK_DEBUG") == "1"

        @llama_cpp.llama_log_callback
        def hook(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _GGML_CONT:
                level = _LOG_STATE["last_level"]
            _LOG_STATE["last_level"] = level
            if level in (_GGML_WARN, _GGML_ERROR):
                _LOG_LINES.append(text.decode("utf-8", errors="replace").rstrip())
            if debug:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _LOG_STATE["callback"] = hook  # a ctypes callback must outlive every call into C
    llama_cpp.llama_log_set(_LOG_STATE["callback"], ctypes.c_void_p(0))


def _log_detail(fallback: str) -> str:
    return "; ".join(line for line in _LOG_LINES if line) or fallback


# --- JSON Schema -> llama.cpp grammar ------------------------------------------------------------
# llama-cpp-python's converter spells a bound such as maxItems or a regex {m,n} out in full (n
# nested copies), so a schema asking for 10**9 items would take gigabytes before llama.cpp's own
# parser (which refuses more than 2000 repetitions) ever sees it. Bounds are checked first.
MAX_SCHEMA_REPEAT = 1000
MAX_PATTERN_REPEAT = 10_000  # product of a pattern's counted repetitions (nesting multiplies them)
_BOUND_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                         "minContains", "maxContains"})
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# llama-cpp-python 0.3.36's converter lets a JSON string hold raw control characters, which JSON
# forbids (json.loads refuses the answer); llama.cpp's own converter (common/json-schema-to-grammar.cpp)
# excludes U+0000-U+001F and DEL. Its character class replaces the loose one.
_LOOSE_CHAR = re.compile(r'^char ::= \[\^"\\\\\] \|', re.MULTILINE)
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def _schema_bound_problem(schema: Any) -> str | None:
    """Why ``schema`` would make the grammar converter blow up, or None."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _BOUND_KEYS and isinstance(value, int) and not isinstance(value, bool) \
                    and value > MAX_SCHEMA_REPEAT:
                return f"{key} {value} is over {MAX_SCHEMA_REPEAT}"
            if key == "pattern" and isinstance(value, str):
                product = 1
                for low, high in _QUANTIFIER.findall(value):
                    # int() refuses 4300+ digits; anything over 6 is over the limit anyway
                    product *= max(1, *(10 ** 7 if len(n) > 6 else int(n or 0) for n in (low, high)))
                    if product > MAX_PATTERN_REPEAT:
                        return f"pattern {value[:60]!r} repeats more than {MAX_PATTERN_REPEAT} times"
            stack.append(value)
    return None


# Keywords llama-cpp-python 0.3.36's converter drops, so the grammar lets an answer break them
# (llama.cpp's C++ converter, which llama-server uses, does enforce integer minimum/maximum).
# ``format`` is left out: JSON Schema makes it an annotation, and so does edgepack's scorer.
UNENFORCED_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not", "if", "then", "else",
    "uniqueItems", "contains", "minContains", "maxContains", "minProperties", "maxProperties", "propertyNames",
    "patternProperties", "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems"})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
                  "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def unenforced_keywords(schema: Any) -> tuple[str, ...]:
    """The :data:`UNENFORCED_KEYWORDS` used anywhere in ``schema`` (its subschemas, not property names)."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        found |= UNENFORCED_KEYWORDS & node.keys()
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        stack.extend(node.get(key) for key in _SUBSCHEMA_ONE)
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend(node[key])
    return tuple(sorted(found))


@lru_cache(maxsize=64)
def _grammar_text(schema_json: str) -> str:
    """GBNF for a JSON Schema given as JSON text (cached: a task's schema is compiled once)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return _LOOSE_CHAR.sub(lambda _: _JSON_CHAR, json_schema_to_gbnf(schema_json))


def json_grammar(schema: Any) -> str:
    """llama.cpp grammar text for ``schema``; UsageError naming why it cannot be one."""
    problem = _schema_bound_problem(schema)
    if problem is not None:
        raise UsageError(f"the JSON schema is too large to decode under: {problem}",
                         hint=f"keep length and item bounds at most {MAX_SCHEMA_REPEAT}")
    try:
        # Property order is generation order, so the JSON text keeps the schema's own order.
        return _grammar_text(json.dumps(schema, ensure_ascii=False))
    except Exception as exc:  # noqa: BLE001 - the converter raises what it likes on a schema it cannot read
        raise UsageError(f"the JSON schema cannot be turned into a llama.cpp grammar: "
                         f"{type(exc).__name__}: {str(exc)[:200]}",
                         hint="inline $refs and use the keywords llama.cpp's json-schema-to-grammar supports") from None


# --- what the format registry (edgepack.formats, ``gguf``) reads from a GGUF header ------------
def trained_context(path: Path) -> int | None:
    """``<arch>.context_length``: the context the model was trained for, if the header says."""
    value = read_gguf(Path(path)).arch_value("context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def file_quant(path: Path) -> str | None:
    """The file type llama.cpp's quantizer recorded (``Q4_K_M``); InvalidModelFile for a bad header."""
    return read_gguf(Path(path)).quant


def check_templates(path: Path, *, strict: bool = True) -> None:
    """Check every chat template the GGUF holds, as ``Llama()`` would compile them.

    An unreadable header is left to the loader, which refuses it past the same check with the
    same error (the gate's measurement reports it as the reason for FAIL).
    """
    from edgepack.runtime.chat.check import check_gguf_templates

    try:
        header = read_gguf(Path(path))
    except InvalidModelFile:
        return
    check_gguf_templates(header, strict=strict)


@register_backend("gguf")
class LlamaCppBackend(Backend):
    """A GGUF model loaded in llama.cpp."""

    constrains_json = True
    sampling_options = frozenset({"top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty"})
    serves_logprobs = True

    def __init__(self, llm: Any, header: GGUFInfo, gpu_layers: int) -> None:
        import llama_cpp

        self._llm = llm
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._header = header
        self._gpu_layers = gpu_layers
        self._n_vocab = int(llm.n_vocab())
        self._stop = frozenset(
            t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )
        from edgepack.runtime.chat.tokens import llama_control_tokens

        self._control = llama_control_tokens(llm)
        self._utf8: Utf8Guard | None = None  # built on the first grammar-constrained generation
        bos, eos = llm.token_bos(), llm.token_eos()
        self._special = {
            "bos_token": self._piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            "eos_token": self._piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
        }

    @classmethod
    def prepare(cls) -> None:
        _install_log_hook()

    @classmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> LlamaCppBackend:
        """Check the GGUF header, then load it in llama.cpp (quietly, keeping its errors)."""
        path = Path(path)
        header = read_gguf(path)
        # llama-cpp-python compiles every tokenizer.chat_template* key inside Llama(), with
        # jinja2's constant folding and no limits (a template bomb hangs or takes gigabytes
        # there); the check rehearses that compile in a limited child first (once per template).
        from edgepack.runtime.chat.check import check_gguf_templates

        check_gguf_templates(header)
        import llama_cpp

        _install_log_hook()
        _LOG_LINES.clear()
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                                  n_threads_batch=threads, n_gpu_layers=gpu_layers,
                                  verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise RuntimeFailure(f"llama.cpp could not load {path.name}: {_log_detail(str(exc))}",
                                 hint="check the file was exported for this llama.cpp version "
                                      f"(llama-cpp-python {llama_cpp.__version__})") from exc
        return cls(llm, header, gpu_layers)

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads the context up to a multiple of 256 and reports the padded size, but
        # llama-cpp-python sizes its token buffer (input_ids) to the size asked for: a prompt
        # between the two escaped as a bare numpy ValueError. The smaller one is the real limit.
        return min(int(self._llm.n_ctx()), len(self._llm.input_ids))

    @property
    def stop_tokens(self) -> frozenset[int]:
        return self._stop

    @property
    def chat_template(self) -> str | None:
        return self._header.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    @property
    def control_tokens(self) -> dict[str, int]:
        return dict(self._control)

    @property
    def header(self) -> GGUFInfo:
        return self._header

    @property
    def info(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "backend": "llama.cpp",
            "llama_cpp_python": self._lib.__version__,
            "gpu_offload_supported": bool(self._lib.llama_supports_gpu_offload()),
            "gpu_layers": self._gpu_layers,
            "n_ctx": self.n_ctx,
            "n_vocab": int(self._llm.n_vocab()),
        }

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def _piece(self, token: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # llama.cpp returns minus the size it needs

    def token_bytes(self, token: int) -> bytes:
        return self._piece(token, special=False)

    def check_json_schema(self, schema: Any) -> None:
        super().check_json_schema(schema)
        self._free(self._grammar_sampler(json_grammar(schema)))

    def unenforced_keywords(self, schema: Any) -> tuple[str, ...]:
        return unenforced_keywords(schema)

    def _grammar_sampler(self, grammar: str) -> Any:
        _install_log_hook()
        _LOG_LINES.clear()
        sampler = self._lib.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise UsageError(f"llama.cpp refused the grammar made from the JSON schema: "
                             f"{_log_detail('the grammar does not parse')}")
        return sampler

    def _free(self, sampler: Any) -> None:
        self._lib.llama_sampler_free(sampler)

    def _sampler_chain(self, prompt: list[int], temperature: float, seed: int | None,
                       repeat_penalty: float, grammar: str | None, sampling: Sampling) -> Any:
        """llama-cpp-python's chain (``Llama._init_sampler``), the prompt already in the penalty window.
        Filters the request leaves out keep llama-cpp-python's defaults (top-k 40, top-p 0.95, min-p 0.05)."""
        lib = self._lib
        s = sampling
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            penalties = lib.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, repeat_penalty,
                                                         s.frequency_penalty or 0.0, s.presence_penalty or 0.0)
            for token in prompt[-PENALTY_LAST_N:]:  # llama-server's init_sampler; never into the grammar
                lib.llama_sampler_accept(penalties, token)
            parts = [penalties]
            if grammar is not None:
                parts.append(self._grammar_sampler(grammar))
            if temperature == 0:
                parts.append(lib.llama_sampler_init_greedy())
            else:
                parts += [lib.llama_sampler_init_top_k(40 if s.top_k is None else s.top_k),
                          lib.llama_sampler_init_typical(1.0, 1),
                          lib.llama_sampler_init_top_p(0.95 if s.top_p is None else s.top_p, 1),
                          lib.llama_sampler_init_min_p(0.05 if s.min_p is None else s.min_p, 1),
                          lib.llama_sampler_init_temp(temperature),
                          lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if seed is None else seed)]
            for part in parts:
                lib.llama_sampler_chain_add(chain, part)  # the chain owns (and frees) each part
        except BaseException:
            self._free(chain)
            raise
        return chain

    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True, repeat_penalty: float = 1.0,
                 json_schema: dict[str, Any] | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        tokens = list(tokens)
        sampling = sampling or Sampling()
        budget = self.room_for(tokens, max_tokens=max_tokens, temperature=temperature, repeat_penalty=repeat_penalty)
        grammar = None
        if json_schema is not None:
            self.check_json_schema(json_schema)  # every refusal happens here, not at the first token
            grammar = json_grammar(json_schema)
        guard = self._utf8_guard() if grammar is not None else None
        return self._generate(tokens, budget, stop_at_eos,
                              lambda: self._sampler_chain(tokens, temperature, seed, repeat_penalty, grammar,
                                                          sampling), guard)

    def _utf8_guard(self) -> Utf8Guard:
        if self._utf8 is None:
            self._utf8 = Utf8Guard([self.token_bytes(t) for t in range(self._n_vocab)])
        return self._utf8

    def _generate(self, tokens: list[int], max_tokens: int, stop_at_eos: bool,
                  make_chain: Callable[[], Any], guard: Utf8Guard | None) -> Iterator[int]:
        if max_tokens <= 0:
            return
        llm = self._llm
        chain = make_chain()  # made on the first next(): a generator never started never frees it
        utf8 = 0  # the guard's state: between characters
        try:
            # A fresh state each call: llama-cpp-python would otherwise reuse a cached prompt,
            # which both changes results and makes time-to-first-token meaningless.
            llm.reset()
            _install_log_hook()
            _LOG_LINES.clear()
            step = tokens
            for produced in range(1, max_tokens + 1):
                try:
                    llm.eval(step)
                except RuntimeError as exc:  # llama_decode failed (out of memory, bad state)
                    raise RuntimeFailure(f"llama.cpp failed while generating: {_log_detail(str(exc))}") from exc
                tok = self._sample(chain, guard, utf8)
                if guard is not None:
                    utf8 = guard.after(utf8, tok)
                if stop_at_eos and tok in self._stop:
                    return
                yield tok
                if produced >= max_tokens:
                    return
                step = [tok]
        finally:
            self._free(chain)

    def _sample(self, chain: Any, guard: Utf8Guard | None, utf8: int) -> int:
        """One token from the chain, which accepts it (penalty window, grammar state). -1: the
        logits of the last position decoded; with a ``guard``, tokens that would break the
        answer's UTF-8 are set to -inf for the pick and restored after it (the logprob of the
        token is still the model's own)."""
        lib = self._lib
        if guard is None:
            return int(lib.llama_sampler_sample(chain, self._llm.ctx, -1))
        import numpy as np

        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._llm.ctx, -1), shape=(self._n_vocab,))
        kept = logits.copy()
        logits[guard.banned(utf8)] = -np.inf
        try:
            return int(lib.llama_sampler_sample(chain, self._llm.ctx, -1))
        finally:
            logits[:] = kept

    def last_token_logprob(self, token: int) -> float | None:
        import numpy as np

        # -1: the last row llama.cpp computed, i.e. the logits the token was just sampled from
        # (llama-cpp-python keeps no copy of them unless logits_all is on).
        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        if not ptr:
            return None
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        top = logits.max()
        return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

    def top_logprobs(self, token: int, k: int) -> TokenLogprob:
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return _token_logprob(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)), token, k)

    def prompt_logprobs(self, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
        """One decode of the prompt with logits kept for every position (llama-cpp-python keeps
        them only with ``logits_all``, fixed at load; its batch helper takes the flag per call)."""
        import numpy as np

        tokens = list(tokens)
        if not tokens:
            raise UsageError("cannot score an empty prompt")
        if len(tokens) > self.n_ctx:
            raise UsageError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}")
        llm = self._llm
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        out = [TokenLogprob(tokens[0], None)]
        for start in range(0, len(tokens), llm.n_batch):
            chunk = tokens[start:start + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            try:
                llm._ctx.decode(llm._batch)
            except RuntimeError as exc:
                raise RuntimeFailure(f"llama.cpp failed while scoring the prompt: {_log_detail(str(exc))}") from exc
            rows = np.ctypeslib.as_array(self._lib.llama_get_logits(llm.ctx), shape=(len(chunk), self._n_vocab))
            # Row i predicts the token after chunk[i]; the last row predicts past the prompt.
            for i in range(len(chunk)):
                at = start + i + 1
                if at < len(tokens):
                    out.append(_token_logprob(rows[i], tokens[at], k))
        llm.reset()  # the next generation starts from a clean cache
        return out

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _token_logprob(logits: Any, token: int, k: int) -> TokenLogprob:
    """log-softmax of one row of logits at ``token``, with the ``k`` most likely tokens."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    logz = top + np.log(np.exp(row - top).sum())
    best: tuple[tuple[int, float], ...] = ()
    if k > 0:
        ids = np.argpartition(-row, min(k, row.size - 1))[:k]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((int(i), float(row[i] - logz)) for i in ids)
    return TokenLogprob(token, float(row[token] - logz), best)
