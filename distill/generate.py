"""Teacher answers: one greedy completion per chat prompt, by teacher kind.

Generators are registered by :attr:`TeacherSource.kind` in :data:`GENERATORS`. Each opens
the teacher once and yields a function ``messages -> Generation``. Prompts are always
rendered with the chat template of the materialized teacher folder (``RUN/teacher``) through
transformers' ``apply_chat_template``, which renders in jinja2's ImmutableSandboxedEnvironment;
the GGUF generator feeds the rendered text to llama.cpp with ``special=True`` so ChatML
markers become their special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.distill.teachers import TeacherSource
from edgepack.errors import UsageError

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

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """One teacher answer."""

    text: str
    tokens: int
    finished: bool
    """True when the teacher emitted EOS; False when it hit ``max_new_tokens``."""


GenerateFn = Callable[[Messages], Generation]


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The chat-templated prompt text, ending with the assistant header."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@contextmanager
def _llamacpp(source: TeacherSource, teacher_dir: Path, params: DecodeParams) -> Iterator[GenerateFn]:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    llm = Llama(model_path=str(source.path), n_ctx=params.n_ctx, n_threads=os.cpu_count(),
                seed=params.seed, verbose=False)

    def generate(messages: Messages) -> Generation:
        ids = llm.tokenize(render_prompt(tok, messages).encode("utf-8"), add_bos=False, special=True)
        if len(ids) + params.max_new_tokens > params.n_ctx:
            raise UsageError(f"a prompt of {len(ids)} tokens does not fit the teacher context ({params.n_ctx})",
                             hint="shorten the prompt")
        # llama.cpp keeps the KV cache of the longest common prefix between calls, so the
        # shared system prompt and demonstrations are evaluated once.
        out = llm.create_completion(ids, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_k=1 if params.temperature == 0 else 40, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0, seed=params.seed)
        choice = out["choices"][0]
        return Generation(text=choice["text"], tokens=int(out["usage"]["completion_tokens"]),
                          finished=choice["finish_reason"] == "stop")

    try:
        yield generate
    finally:
        llm.close()


@contextmanager
def _transformers(source: TeacherSource, teacher_dir: Path, params: DecodeParams) -> Iterator[GenerateFn]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32,
                                                 trust_remote_code=source.trust_remote_code)
    model.eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    sampling = ({"do_sample": True, "temperature": params.temperature} if params.temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})

    def generate(messages: Messages) -> Generation:
        ids = tok(render_prompt(tok, messages), add_special_tokens=False, return_tensors="pt").input_ids
        torch.manual_seed(params.seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **sampling)
        new = out[0, ids.shape[1]:].tolist()
        finished = eos in new
        if finished:
            new = new[:new.index(eos)]
        return Generation(text=tok.decode(new, skip_special_tokens=True), tokens=len(new), finished=finished)

    yield generate


GENERATORS: dict[str, Callable[[TeacherSource, Path, DecodeParams], Any]] = {
    "gguf": _llamacpp,
    "hf": _transformers,
}


def open_generator(source: TeacherSource, teacher_dir: Path, params: DecodeParams) -> Any:
    """Context manager yielding ``generate(messages) -> Generation`` for this teacher."""
    opener = GENERATORS.get(source.kind)
    if opener is None:
        raise UsageError(f"generating with {source.kind!r} teachers is not available yet",
                         hint="use a local HF folder, a .gguf or builtin:smollm2-135m-instruct")
    return opener(source, Path(teacher_dir), params)
