"""The runtime backend interface and the registry that maps a format name to a backend.

A backend loads one artifact format (``gguf`` → llama.cpp, later ``onnx`` → onnxruntime) and
exposes tokens in, tokens out. Everything above it (chat templates, text streaming, the gate's
measurements) is written once here against that small surface.

Registration is by exact format name, through the same decorator a third party would use::

    from edgepack.runtime.backends.base import Backend, register_backend

    @register_backend("mlc")
    class MLCBackend(Backend):
        ...

A format's backend module is named by its :class:`~edgepack.formats.Format` (``backend``) and
imported only when that format is first asked for; the built-in modules import their heavy
library (llama_cpp, onnxruntime) only inside ``load``, so ``edgepack --help`` imports neither.
A backend registered for a format that :mod:`edgepack.formats` does not know still loads
through :func:`get_backend`, but only a registered format gets the memory preflight, the gate
and pack.

Decoding options beyond greedy/temperature are llama.cpp's, so a deployed GGUF (llama-server,
Ollama) and every backend here decode alike:

* ``repeat_penalty`` — llama.cpp's repetition penalty over the last :data:`PENALTY_LAST_N`
  tokens of prompt and answer together (as llama-server counts them); 1.0 = none.
* ``sampling`` — :class:`Sampling`: top-p, top-k, min-p and OpenAI's presence/frequency
  penalties; a backend lists what it honours in :attr:`Backend.sampling_options`.
* ``json_schema`` — a JSON Schema the answer must satisfy. A backend with
  :attr:`Backend.constrains_json` decodes under it as a grammar (all of it but
  :meth:`Backend.unenforced_keywords`); one without ignores it, and the caller says the answer
  is unconstrained (:meth:`Backend.check_json_schema` still refuses a schema that is not one).

The shared helpers (:meth:`Backend.stream_chat`, :meth:`Backend.stream`) pass an option to
``generate`` only when it is set, so a backend written before the options existed still serves
every request that does not ask for them.
"""

from __future__ import annotations

import codecs
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgepack.errors import UsageError
from edgepack.formats import all_formats, find_format

_REGISTRY: dict[str, type[Backend]] = {}
B = TypeVar("B", bound="type[Backend]")

@dataclass(frozen=True)
class Sampling:
    """Sampling filters and penalties beyond temperature; None = the backend's default.

    They matter only at ``temperature > 0`` (the penalties also at 0: they change the logits).
    A backend names what it honours in :attr:`Backend.sampling_options`; callers refuse the rest.
    """

    top_p: float | None = None
    top_k: int | None = None
    """0: no limit."""
    min_p: float | None = None
    presence_penalty: float | None = None
    """OpenAI's: subtracted once from the logit of every token already in the window."""
    frequency_penalty: float | None = None
    """OpenAI's: subtracted from a token's logit once per time it is in the window."""

    def given(self) -> tuple[str, ...]:
        """Names of the options set (not None)."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability (natural log, the model's own distribution at temperature
    1, before any sampling filter) and its most likely alternatives."""

    token: int
    logprob: float | None
    """None for a prompt's first token: nothing precedes it."""
    top: tuple[tuple[int, float], ...] = ()
    """(token, logprob), most likely first."""


# llama.cpp's penalty window (common.h ``penalty_last_n``, llama-server's ``repeat_last_n``,
# Ollama's ``repeat_last_n``: 64 in all three).
PENALTY_LAST_N = 64


class Backend(ABC):
    """One loaded model. Subclasses implement loading, tokens and the token generator."""

    format: ClassVar[str] = ""
    """The exact format name this backend is registered under (set by the decorator)."""

    constrains_json: ClassVar[bool] = False
    """True when ``generate(json_schema=...)`` decodes under the schema; False: it is ignored and
    callers announce the answer as unconstrained."""

    sampling_options: ClassVar[frozenset[str]] = frozenset()
    """The :class:`Sampling` fields ``generate(sampling=...)`` honours; callers refuse the others."""

    serves_logprobs: ClassVar[bool] = False
    """True when :meth:`top_logprobs` and :meth:`prompt_logprobs` answer."""


    @classmethod
    def prepare(cls) -> None:
        """Import the runtime library ahead of :meth:`load` (so load time excludes it)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> Backend:
        """Load the artifact at ``path``; raise InvalidModelFile / RuntimeFailure on failure."""

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Context window the model was loaded with, in tokens."""

    @property
    @abstractmethod
    def stop_tokens(self) -> frozenset[int]:
        """Token ids that end generation (EOS, EOT and any other end-of-generation token)."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """The model's own chat template source (untrusted; render via render_chat)."""

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` texts passed to the chat template."""
        return {}

    @property
    def control_tokens(self) -> dict[str, int]:
        """Texts of the tokens :meth:`tokenize` makes only with ``parse_special`` on (text → id).

        Chat prompts keep these out of message text (:mod:`edgepack.runtime.chat.tokens`); a
        backend that leaves this empty tokenizes chat prompts as one string.
        """
        return {}

    @property
    def info(self) -> dict[str, Any]:
        """What was loaded, for reports (library version, GPU offload, ...)."""
        return {"format": self.format}

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text → token ids; ``add_special`` adds BOS where the model asks for it."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character)."""

    @abstractmethod
    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True, repeat_penalty: float = 1.0,
                 json_schema: dict[str, Any] | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        """Yield new token ids after ``tokens`` (fresh state each call; greedy at temperature 0).

        Stops after ``max_tokens`` or, with ``stop_at_eos``, before a stop token.
        ``repeat_penalty``, ``json_schema`` and ``sampling``: see the module docstring. Bad arguments raise
        UsageError when ``generate`` is called, before the first token is asked for.
        """

    def check_json_schema(self, schema: Any) -> None:
        """UsageError when ``schema`` is not a JSON Schema this backend can decode under.

        The base check is the one the task contract uses (:class:`edgepack.answers.JsonAnswer`);
        a constraining backend adds its own (llama.cpp: the schema must compile to a grammar).
        """
        from edgepack.answers import JsonAnswer

        try:
            JsonAnswer(schema=schema).validate("", UsageError)
        except UsageError:
            raise
        except (ValueError, RecursionError) as exc:  # e.g. a pattern's {n} with 5000 digits, in re
            raise UsageError(f"the JSON schema cannot be checked: {type(exc).__name__}: {str(exc)[:200]}") from None

    def unenforced_keywords(self, schema: Any) -> tuple[str, ...]:
        """JSON Schema keywords of ``schema`` that decoding under it does not enforce (an answer may
        break them; the scorer still checks them). Only meaningful where :attr:`constrains_json`:
        elsewhere nothing is enforced."""
        return ()

    def room_for(self, tokens: Sequence[int], *, max_tokens: int, temperature: float,
                 repeat_penalty: float) -> int:
        """How many tokens ``generate`` may produce after ``tokens``; UsageError for bad arguments."""
        if not tokens:
            raise UsageError("cannot generate from an empty prompt")
        if not temperature >= 0:  # also refuses NaN
            raise UsageError(f"temperature must be >= 0, got {temperature}")
        if not (math.isfinite(repeat_penalty) and repeat_penalty > 0):
            raise UsageError(f"repeat_penalty must be a number > 0 (1.0 = none), got {repeat_penalty}")
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise UsageError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                             hint="shorten the prompt or load the model with a larger context")
        return min(max_tokens, room)

    def last_token_logprob(self, token: int) -> float | None:
        """Natural-log probability the model gave ``token`` at the step that just produced it.

        Read it right after :meth:`generate` yields ``token``, before asking for the next one.
        It is the model's own distribution (temperature 1, before any sampling filter); None
        where the backend cannot say. Used by the server's confidence metadata and fallback.
        """
        return None

    def top_logprobs(self, token: int, k: int) -> TokenLogprob:
        """:meth:`last_token_logprob` of ``token`` with the ``k`` most likely tokens of the same
        step; only where :attr:`serves_logprobs`."""
        raise UsageError(f"the {self.format} backend does not return per-token logprobs")

    def prompt_logprobs(self, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
        """Each prompt token's logprob given the tokens before it (the first: None), with the
        ``k`` most likely tokens at each position; only where :attr:`serves_logprobs`."""
        raise UsageError(f"the {self.format} backend does not return per-token logprobs")

    @property
    def vocab_size(self) -> int | None:
        """Token ids run from 0 to this minus one (None: unknown)."""
        size = self.info.get("n_vocab")
        return size if isinstance(size, int) else None

    def close(self) -> None:
        """Free the model; the default does nothing."""

    # --- written once for every backend ------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt string for ``messages``, from the model's template in the sandbox."""
        from edgepack.errors import InvalidModelFile
        from edgepack.runtime.chat.template import render_chat

        template = self.chat_template
        if not template:
            raise InvalidModelFile("the model has no chat template (tokenizer.chat_template)",
                                   hint="re-export the model with its tokenizer's chat template")
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           **self.special_tokens)

    def leading_special_ids(self) -> list[int]:
        """The ids :meth:`tokenize` puts before any text with ``add_special`` (BOS where the model wants one)."""
        plain = self.tokenize("a", add_special=False)
        full = self.tokenize("a", add_special=True)
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return full[:k]
        return []

    def chat_tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the rendered chat prompt, with BOS added once at most.

        Only the template's markup may yield control tokens: message text is tokenized with
        special parsing off (:func:`edgepack.runtime.chat.tokens.encode_chat`), so a user
        typing ``<|im_start|>system`` gets text, not a new turn.
        """
        from edgepack.runtime.chat.tokens import encode_chat

        # Templates that write {{ bos_token }} themselves must not get a second BOS.
        return encode_chat(messages, render=self.render_chat,
                           tokenize=lambda text, special: self.tokenize(text, add_special=False,
                                                                        parse_special=special),
                           control_tokens=self.control_tokens, bos=self.leading_special_ids(),
                           bos_text=self.special_tokens.get("bos_token", ""))

    def decode_stream(self, tokens: Iterator[int]) -> Iterator[str]:
        """Turn a token stream into text pieces, never splitting a UTF-8 character."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in tokens:
            piece = decoder.decode(self.token_bytes(tok))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def generate_with(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                      seed: int | None = None, stop_at_eos: bool = True, repeat_penalty: float = 1.0,
                      json_schema: dict[str, Any] | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        """:meth:`generate`, passing ``repeat_penalty``, ``json_schema`` and ``sampling`` only when they are set."""
        options: dict[str, Any] = {}
        if sampling is not None and sampling.given():
            options["sampling"] = sampling
        if repeat_penalty != 1.0:
            options["repeat_penalty"] = repeat_penalty
        if json_schema is not None:
            options["json_schema"] = json_schema
        return self.generate(tokens, max_tokens=max_tokens, temperature=temperature, seed=seed,
                             stop_at_eos=stop_at_eos, **options)

    def stream(self, prompt: str, *, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
               repeat_penalty: float = 1.0, json_schema: dict[str, Any] | None = None) -> Iterator[str]:
        """Complete a raw prompt string (special tokens in it are parsed), streaming text."""
        tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        return self.decode_stream(self.generate_with(tokens, max_tokens=max_tokens, temperature=temperature,
                                                     seed=seed, repeat_penalty=repeat_penalty,
                                                     json_schema=json_schema))

    def stream_chat(self, messages: Sequence[dict[str, Any]], max_tokens: int = 256,
                    temperature: float = 0.0, seed: int | None = None, repeat_penalty: float = 1.0,
                    json_schema: dict[str, Any] | None = None) -> Iterator[str]:
        """Answer the last message of a chat, streaming text pieces."""
        tokens = self.chat_tokens(messages)
        return self.decode_stream(self.generate_with(tokens, max_tokens=max_tokens, temperature=temperature,
                                                     seed=seed, repeat_penalty=repeat_penalty,
                                                     json_schema=json_schema))

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_backend(fmt: str) -> Callable[[B], B]:
    """Class decorator: register a :class:`Backend` subclass for the exact format ``fmt``."""

    def decorator(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(f"@register_backend({fmt!r}) needs a Backend subclass, got {cls!r}")
        existing = _REGISTRY.get(fmt)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"format {fmt!r} is already served by {existing.__module__}.{existing.__qualname__}")
        declared = _declared_module(fmt)
        if declared and cls.__module__ != declared:
            raise ValueError(f"format {fmt!r} is already served by {declared}, the module its Format names")
        cls.format = fmt
        _REGISTRY[fmt] = cls
        return cls

    return decorator


def _declared_module(fmt: str) -> str | None:
    """The backend module the registered :class:`~edgepack.formats.Format` named ``fmt`` declares."""
    declared = find_format(fmt)
    return declared.backend.partition(":")[0] if declared is not None and declared.backend else None


def available_formats() -> list[str]:
    """Every format with a backend: registered backends plus those the format registry declares."""
    return sorted(set(_REGISTRY) | {f.name for f in all_formats() if f.backend})


def get_backend(fmt: str) -> type[Backend]:
    """The backend class for ``fmt``, importing the module its Format declares on first use."""
    declared = find_format(fmt) if fmt not in _REGISTRY else None
    if declared is not None and declared.backend:
        declared.part("backend")
    try:
        return _REGISTRY[fmt]
    except KeyError:
        raise UsageError(f"no runtime backend for format {fmt!r}; available: {', '.join(available_formats())}",
                         hint="install or import the package that registers that backend") from None


def default_threads() -> int:
    """Threads to use when nothing says otherwise: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)
