"""Teacher answers: one greedy completion per chat prompt, by teacher kind.

Generators are registered by :attr:`TeacherSource.kind` in :data:`GENERATORS`. Each opens
the teacher once and yields a function ``messages -> Generation``; :func:`generate_many`
answers a batch in order (concurrently for endpoint teachers, see endpoint.py). A local
teacher's prompts are rendered with the chat template of its materialized folder
(``RUN/teacher``, or ``RUN/teacher-corrected`` after teacher correction) in edgepack's bounded
sandbox (:func:`~edgepack.runtime.chat.template.render_hf_chat`, the text transformers'
``apply_chat_template`` gives, with loops, numbers and strings bounded), and tokenized by
:mod:`edgepack.runtime.chat.tokens`: the template's markup (``<|im_start|>``...) becomes its
control tokens, message text never does (a prompt that types ``<|im_start|>system``
stays text). Endpoint teachers send the messages as they are; the server applies its model's
own template.

*Stop strings* (``DecodeParams.stop``, ``distill data --stop``) end an answer where the teacher
writes one, as OpenAI's and llama-server's ``stop`` do: a base model never ends its turn, so
without them every answer runs to ``max_new_tokens`` and is dropped as truncated. Each kind
stops with its library's own mechanism (llama.cpp ``create_completion(stop=...)``, transformers
``generate(stop_strings=...)``, the endpoint's ``stop``); the answer is the text before the
stop string, ``finished``, and its token count (and an endpoint's logprobs) cover that text only.

Every answer can be kept in the on-disk answer cache (answer_cache.py): endpoint teachers
always use it; local teachers do when :func:`open_generator` gets ``cache_dir``, and then
load their weights only on the first answer that is not cached, so a rerun after a crash
regenerates only the missing answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.distill.answer_cache import AnswerCache, answer_key
from edgepack.distill.teachers import TeacherSource
from edgepack.errors import UsageError
from edgepack.stop import MAX_STOP_STRINGS, cut_at_stop

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class DecodeParams:
    """How teacher answers are decoded (recorded in data/report.json)."""

    max_new_tokens: int = 64
    """Answers that reach this many tokens without EOS are dropped as ``truncated``."""
    temperature: float = 0.0
    """0 = greedy (the default: distillation data should be the teacher's mode)."""
    seed: int = 0
    """Sampling seed (only matters when temperature > 0)."""
    n_ctx: int = 2048
    """Context window the GGUF teacher is opened with."""
    stop: tuple[str, ...] = ()
    """Stop strings (``--stop``): an answer ends before the first one the teacher writes, and is
    finished (see the module docstring). At most :data:`MAX_STOP_STRINGS`, none empty."""

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        # Absent without --stop, so a data/ and cached answers from before the option stay valid.
        if self.stop:
            out["stop"] = list(self.stop)
        else:
            del out["stop"]
        return out


@dataclass(frozen=True)
class Generation:
    """One teacher answer."""

    text: str
    tokens: int
    """Tokens of ``text`` (a stop string's tokens not counted)."""
    finished: bool
    """True when the teacher emitted EOS or a stop string; False when it hit ``max_new_tokens``."""
    token_logprobs: list[tuple[str, float]] | None = None
    """Endpoint teachers: (token string, logprob) of each generated token, when returned."""
    top_logprobs: list[list[tuple[str, float]]] | None = None
    """Endpoint teachers: the top-k (token string, logprob) alternatives at each position."""
    no_logprobs_reason: str | None = None
    """Endpoint teachers: why this answer carries no logprobs (None: it does, or a local teacher)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Generation:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        chosen, top = d.get("token_logprobs"), d.get("top_logprobs")
        return cls(text=str(d["text"]), tokens=int(d["tokens"]), finished=bool(d["finished"]),
                   token_logprobs=None if chosen is None else [(str(t), float(lp)) for t, lp in chosen],
                   top_logprobs=None if top is None else [[(str(t), float(lp)) for t, lp in alts] for alts in top],
                   no_logprobs_reason=d.get("no_logprobs_reason"))

    def soft_labels(self) -> dict[str, Any]:
        """Fields for a data row: the teacher's per-token logprobs, when it returned them."""
        if self.top_logprobs is None or self.token_logprobs is None:
            return {}
        return {"teacher_logprobs": [list(p) for p in self.token_logprobs],
                "teacher_top_logprobs": [[list(p) for p in alts] for alts in self.top_logprobs]}


GenerateFn = Callable[[Messages], Generation]


def generate_many(generate: GenerateFn, batch: list[Messages],
                  on_done: Callable[[int], None] | None = None) -> list[Generation]:
    """Answers for ``batch`` in order: the generator's own batch entry point when it has one
    (an endpoint teacher runs requests concurrently), else one call per prompt."""
    many = getattr(generate, "generate_many", None)
    if many is not None:
        return many(batch, on_done)
    out: list[Generation] = []
    for messages in batch:
        out.append(generate(messages))
        if on_done is not None:
            on_done(len(out))
    return out


def cache_stats(generate: GenerateFn) -> dict[str, int] | None:
    """Answer-cache hits and misses of this generator; None when it has no cache."""
    cache = getattr(generate, "cache", None)
    return cache.stats() if isinstance(cache, AnswerCache) else None


def describe_generator(generate: GenerateFn) -> dict[str, Any] | None:
    """An endpoint teacher's settings and counters (requests, cache hits, retries); None for local ones."""
    describe = getattr(generate, "describe", None)
    return describe() if describe is not None else None


def distillation_mode(gens: list[Generation], endpoints: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Report keys saying what the student can learn from these answers.

    ``dense``: a local teacher, whose full distributions training computes itself;
    ``top-logprobs``: every answer came with the endpoint's top-k logprobs;
    ``response-only``: some or all came without them (``distillation_reason`` says why), so
    only the answer text can be learned. ``endpoints`` are :func:`describe_generator` results
    of the generators that produced ``gens``; their counters are summed into
    ``teacher_endpoint`` (None for local teachers).
    """
    described = [e for e in endpoints if e is not None]
    endpoint = None
    if described:
        endpoint = {**described[-1], **{k: sum(e[k] for e in described) for k in ("requests", "cache_hits", "retries")},
                    "max_in_flight": max(e["max_in_flight"] for e in described)}
    missing = [g.no_logprobs_reason for g in gens if g.no_logprobs_reason is not None]
    if endpoint is None and not missing:
        mode, reason = "dense", None
    elif not missing:
        mode, reason = "top-logprobs", None
    else:
        mode = "response-only"
        reason = f"{len(missing)} of {len(gens)} teacher answers came without per-token logprobs: {missing[0]}"
    return {"distillation": mode, "distillation_reason": reason, "teacher_endpoint": endpoint}


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The chat-templated prompt text, ending with the assistant header."""
    from edgepack.runtime.chat.template import render_hf_chat

    return render_hf_chat(tokenizer, messages)


@contextmanager
def _llamacpp(source: TeacherSource, teacher_dir: Path, params: DecodeParams,
              threads: int | None = None) -> Iterator[GenerateFn]:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgepack.runtime.chat.tokens import encode_chat, llama_control_tokens

    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.chat.check import check_gguf_templates

    check_gguf_templates(read_gguf(source.path))  # before Llama() compiles them, unbounded
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    llm = Llama(model_path=str(source.path), n_ctx=params.n_ctx, n_threads=threads or os.cpu_count(),
                seed=params.seed, verbose=False)
    control = llama_control_tokens(llm)

    def tokenize(text: str, special: bool) -> list[int]:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def generate(messages: Messages) -> Generation:
        # No BOS of llama.cpp's own: the HF template writes it where the model wants one.
        ids = encode_chat(messages, render=lambda m: render_prompt(tok, m), tokenize=tokenize,
                          control_tokens=control)
        if len(ids) + params.max_new_tokens > params.n_ctx:
            raise UsageError(f"a prompt of {len(ids)} tokens does not fit the teacher context ({params.n_ctx})",
                             hint="shorten the prompt")
        # llama.cpp keeps the KV cache of the longest common prefix between calls, so the
        # shared system prompt and demonstrations are evaluated once.
        out = llm.create_completion(ids, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_k=1 if params.temperature == 0 else 40, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0, seed=params.seed, stop=list(params.stop) or None)
        choice = out["choices"][0]
        text, tokens = choice["text"], int(out["usage"]["completion_tokens"])
        if params.stop and choice["finish_reason"] == "stop":
            # llama-cpp-python cuts before the first stop string *in the list* that the text holds,
            # so when one token completes two (``f`` and ``Lü`` in ``Lüf``) the later one may win:
            # cut again before the earliest. Its count includes the stop string's tokens.
            text = cut_at_stop(text, params.stop)[0]
            tokens = len(tokenize(text, False))
        return Generation(text=text, tokens=tokens, finished=choice["finish_reason"] == "stop")

    try:
        yield generate
    finally:
        llm.close()


@contextmanager
def _transformers(source: TeacherSource, teacher_dir: Path, params: DecodeParams) -> Iterator[GenerateFn]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.runtime.chat.tokens import hf_chat_ids

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32,
                                                 trust_remote_code=source.trust_remote_code)
    model.eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    sampling = ({"do_sample": True, "temperature": params.temperature} if params.temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    stopping = {"stop_strings": list(params.stop), "tokenizer": tok} if params.stop else {}

    def generate(messages: Messages) -> Generation:
        ids = torch.tensor([hf_chat_ids(tok, messages)], dtype=torch.long)
        torch.manual_seed(params.seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **sampling, **stopping)
        new = out[0, ids.shape[1]:].tolist()
        finished = eos in new
        if finished:
            new = new[:new.index(eos)]
        text = tok.decode(new, skip_special_tokens=True)
        if not params.stop:
            return Generation(text=text, tokens=len(new), finished=finished)
        # generate() stops after the token that completes a stop string and keeps it: cut the
        # text there. A stop string of special tokens is already out of the decoded text; an
        # end before max_new_tokens without EOS is still a stop string.
        text, hit = cut_at_stop(text, params.stop)
        if hit or (not finished and len(new) < params.max_new_tokens):
            return Generation(text=text, tokens=len(tok(text, add_special_tokens=False)["input_ids"]), finished=True)
        return Generation(text=text, tokens=len(new), finished=finished)

    yield generate


def _endpoint(source: TeacherSource, cache_dir: Path, params: DecodeParams, **options: Any) -> Any:
    from edgepack.distill.endpoint import open_endpoint

    return open_endpoint(source, cache_dir, params, **options)


# kind → opener(source, folder, params, **options). ``folder`` is the teacher's local folder:
# the materialized weights (RUN/teacher or RUN/teacher-corrected) for local kinds, the answer
# cache for endpoints.
# The GGUF opener takes ``threads`` (None: every core); the endpoint opener takes ``endpoint``.
GENERATORS: dict[str, Callable[..., Any]] = {
    "gguf": _llamacpp,
    "hf": _transformers,
    "openai": _endpoint,
}
REMOTE_KINDS = frozenset({"openai"})  # cache their answers themselves (in ``folder``)


class CachedGenerator:
    """A local teacher behind the answer cache.

    ``load()`` opens the teacher (its weights) on the first answer that is not cached, so a
    rerun whose answers are all cached never loads the model. Keys: ``sha256:<teacher file
    or folder hash>``, the decoding parameters and the messages.
    """

    def __init__(self, load: Callable[[], GenerateFn], cache: AnswerCache, source: TeacherSource,
                 params: DecodeParams) -> None:
        self.cache, self.params = cache, params
        self.teacher = f"sha256:{source.sha256}"
        self._load = load
        self._generate: GenerateFn | None = None

    def __call__(self, messages: Messages) -> Generation:
        key = answer_key(self.teacher, self.params.describe(), messages)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self._generate is None:
            self._generate = self._load()
        gen = self._generate(messages)
        self.cache.put(key, gen, teacher=self.teacher,
                       request={"decoding": self.params.describe(), "messages": messages})
        return gen


@contextmanager
def _cached_local(opener: Callable[..., Any], source: TeacherSource, teacher_dir: Path, params: DecodeParams,
                  cache_dir: Path, **options: Any) -> Iterator[CachedGenerator]:
    with ExitStack() as stack:
        yield CachedGenerator(lambda: stack.enter_context(opener(source, teacher_dir, params, **options)),
                              AnswerCache(cache_dir), source, params)


def open_generator(source: TeacherSource, teacher_dir: Path, params: DecodeParams, *,
                   cache_dir: Path | None = None, **options: Any) -> Any:
    """Context manager yielding ``generate(messages) -> Generation`` for this teacher.

    ``options`` go to the opener (``endpoint=EndpointConfig(...)`` for endpoint teachers,
    ``threads=N`` for GGUF ones). ``cache_dir`` keeps a local teacher's answers in the answer
    cache (endpoint teachers always cache, in ``teacher_dir``).
    """
    opener = GENERATORS.get(source.kind)
    if opener is None:
        raise UsageError(f"generating with {source.kind!r} teachers is not available yet",
                         hint="use a local HF folder, a .gguf or builtin:smollm2-135m-instruct")
    if cache_dir is not None and source.kind not in REMOTE_KINDS:
        return _cached_local(opener, source, Path(teacher_dir), params, Path(cache_dir), **options)
    return opener(source, Path(teacher_dir), params, **options)
