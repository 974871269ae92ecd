"""On-policy distillation (GKD): the student samples completions, the teacher scores those tokens.

Off-policy KD (every training mode of modes.py) teaches the student the teacher's distribution
along the *teacher's* answers; at inference the student walks its own, and never learned to
recover from its own mistakes. With ``--on-policy LAMBDA`` (GKD's λ, Agarwal et al. 2024), a
fraction λ of the optimizer steps instead:

1. samples a completion from the student for each row's prompt (batched per micro-batch,
   KV-cached ``generate``, temperature ``--on-policy-temperature``, at most
   ``on_policy_max_new`` tokens — by default the longest teacher answer of the data, in the
   student's tokens — and never past ``max_length``);
2. has the teacher score those tokens — the teacher's distribution at every position of the
   completion — through a *scorer* (:data:`SCORERS`, keyed by exact name):

   ============  =================================================================================
   ``hf``        the local HF teacher in torch: dense logits (divergence as with ``dense`` KD)
   ``gguf``      the run's GGUF teacher through llama.cpp (score_gguf.py): top-k + tail, the
                 teacher never enters torch memory (sparse divergence as with soft labels)
   ``endpoint``  the endpoint teacher (score_endpoint.py): ``echo`` + ``logprobs`` on completions
                 (vLLM, ``edgepack serve``); top-k + tail mapped onto the student's vocabulary,
                 forward KL; an endpoint that cannot score given tokens is refused up front
   ============  =================================================================================

3. takes the run's divergence (forward KL, reverse KL or JSD; on the sparse scorers the sparse
   forms) on those positions alone: the loss is KD only, since there is no reference text to
   take cross-entropy against (the curve's ``ce`` is 0 on on-policy steps, which are marked).

``--on-policy-after N`` is an off-policy warm-up: the first N steps always train on the
teacher's answers, λ applies from step N. A student pruned from the teacher samples noise at
first, and the teacher's scores of noise teach little (GKD and on-policy distillation both start
from a student that already answers in the right shape).

Which steps are on-policy is a pure function of (seed, step), and each micro-batch samples
from its own RNG stream seeded from (seed, step, its first row) inside ``torch.random.fork_rng``:
the global RNG is untouched, so a resumed run draws the same completions, and on the CPU
stays bit-identical with an uninterrupted one. ``auto`` picks the scorer: the endpoint for an
endpoint run, llama.cpp for a soft-label run whose teacher is a GGUF (the teacher stays out of
torch, as soft labels promise), the HF teacher otherwise.

A run with no teacher that can score the student's tokens — ``--loss sft``, a student whose
tokenizer differs from the teacher's, an endpoint run without logprobs — is refused, never
silently trained off-policy.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgepack.distill.batching import Example
from edgepack.distill.device import Device, to_device
from edgepack.distill.losses import DIVERGENCES, SPARSE_DIVERGENCES
from edgepack.distill.modes import RESPONSE_ONLY, SFT, SOFT_LABELS, TOP_LOGPROBS, TrainingMode
from edgepack.errors import UsageError

if TYPE_CHECKING:
    from edgepack.distill.train import TrainConfig
    from edgepack.distill.train_loss import LossTerms, MicroBatch, Objective

HF, GGUF, ENDPOINT = "hf", "gguf", "endpoint"
AUTO = "auto"


def _dense_kd(cfg: TrainConfig) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    divergence = DIVERGENCES[cfg.divergence]
    return lambda s, t: divergence(s[None], t[None], torch.ones(1, s.shape[0], device=s.device),
                                   temperature=cfg.temperature)


def _sparse_kd(cfg: TrainConfig) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    divergence = SPARSE_DIVERGENCES[cfg.divergence]
    return lambda s, t: divergence(s, to_device(t, s.device))


def _masked_kd(cfg: TrainConfig) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    divergence = SPARSE_DIVERGENCES[cfg.divergence]

    def kd(s: torch.Tensor, targets: Any) -> torch.Tensor:
        sparse, mask = to_device(targets, s.device)
        return divergence(s, sparse, mask)

    return kd


@dataclass(frozen=True)
class ScorerKind:
    """What a scorer's targets need: the KD taken on them, the divergences it supports, and how
    the teacher is held while training (what the memory planner counts, as modes.TEACHER_WHILE_TRAINING)."""

    kd: Callable[[TrainConfig], Callable[[torch.Tensor, Any], torch.Tensor]]
    divergences: tuple[str, ...]
    teacher: str


SCORERS: dict[str, ScorerKind] = {
    HF: ScorerKind(_dense_kd, tuple(DIVERGENCES), "online"),
    GGUF: ScorerKind(_sparse_kd, ("forward_kl", "reverse_kl", "jsd"), "none"),  # top-k + tail: no samples
    ENDPOINT: ScorerKind(_masked_kd, ("forward_kl",), "none"),  # as the endpoint's top-logprobs mode
}


def check_options(cfg: TrainConfig, *, endpoint_run: bool, steps: int) -> None:
    """The on-policy options on their own (before anything is loaded); UsageError naming the first wrong one."""
    if not 0.0 <= cfg.on_policy <= 1.0:
        raise UsageError(f"--on-policy is the fraction of steps the student samples, from 0 to 1 (got {cfg.on_policy})")
    if cfg.on_policy == 0.0:
        if cfg.on_policy_after:
            raise UsageError(f"--on-policy-after {cfg.on_policy_after} without --on-policy: no step would sample",
                             hint="add --on-policy LAMBDA, or drop --on-policy-after")
        return
    if not 0 <= cfg.on_policy_after < steps:
        raise UsageError(f"--on-policy-after {cfg.on_policy_after} leaves no on-policy step in --steps {steps}",
                         hint=f"use a warm-up from 0 to {steps - 1} steps")
    if not cfg.on_policy_temperature > 0:
        raise UsageError(f"--on-policy-temperature must be positive (got {cfg.on_policy_temperature})")
    if cfg.on_policy_max_new < 0:
        raise UsageError(f"--on-policy-max-new must be 0 (the longest answer) or more (got {cfg.on_policy_max_new})")
    if cfg.on_policy_teacher not in (AUTO, *SCORERS):
        raise UsageError(f"unknown --on-policy-teacher {cfg.on_policy_teacher!r}",
                         hint=f"use one of {AUTO}, {', '.join(SCORERS)}")
    if cfg.divergence == SFT:
        raise UsageError("--loss sft learns the teacher's text only; on-policy steps need the teacher's scores",
                         hint="pick a KD loss (fkl, rkl, jsd) with --on-policy, or drop --on-policy")
    if endpoint_run and cfg.on_policy_teacher not in (AUTO, ENDPOINT):
        raise UsageError(f"this run's teacher is an endpoint; --on-policy-teacher {cfg.on_policy_teacher} "
                         "needs local weights",
                         hint="use --on-policy-teacher endpoint (or auto)")
    if not endpoint_run and cfg.on_policy_teacher == ENDPOINT:
        raise UsageError("--on-policy-teacher endpoint: this run's teacher is local, not an endpoint",
                         hint="use --on-policy-teacher hf, gguf or auto")


def scorer_name(cfg: TrainConfig, mode: TrainingMode, run_dir: Path) -> str | None:
    """The scorer of this run's on-policy steps (None: off-policy only); UsageError when none can score."""
    if cfg.on_policy == 0.0:
        return None
    if mode.name == RESPONSE_ONLY:
        raise UsageError(f"on-policy distillation needs a teacher that scores the student's tokens; this run is "
                         f"response-only ({mode.reason or 'asked for'})",
                         hint="drop --on-policy, or use a student with the teacher's tokenizer / an endpoint "
                              "that returns logprobs")
    name = cfg.on_policy_teacher
    gguf = _teacher_gguf(run_dir) if name == GGUF or (name == AUTO and mode.name == SOFT_LABELS) else None
    if name == AUTO:
        name = ENDPOINT if mode.name == TOP_LOGPROBS else GGUF if gguf is not None else HF
    if name == GGUF:
        if gguf is None:
            raise UsageError("--on-policy-teacher gguf: this run's teacher came from an HF folder, not a GGUF",
                             hint="use --on-policy-teacher hf")
    supported = SCORERS[name].divergences
    if cfg.divergence not in supported:
        raise UsageError(f"the {name} scorer supports {', '.join(supported)} on on-policy steps (got {cfg.divergence})",
                         hint="pick --loss fkl" + (", rkl or jsd" if len(supported) > 1 else ""))
    return name


def _teacher_gguf(run_dir: Path) -> Path | None:
    from edgepack.distill.score_gguf import run_teacher_gguf

    return run_teacher_gguf(run_dir)


def teacher_while_training(name: str | None, mode: TrainingMode) -> str:
    """``online`` when the on-policy scorer is the HF teacher in torch, else the mode's own."""
    return "online" if name is not None and SCORERS[name].teacher == "online" else mode.teacher_while_training


@dataclass(frozen=True)
class OnPolicy:
    """How this run's on-policy steps sample and score (module docstring)."""

    fraction: float
    after: int
    """Optimizer steps before this one are off-policy (the warm-up)."""
    temperature: float
    max_new_tokens: int
    max_length: int
    seed: int
    pad_id: int
    eos_id: int
    scorer_name: str
    scorer: Any
    """Has ``targets(indices, examples)`` and ``describe()``: train_loss.OnlineTeacher (hf),
    score_gguf.GgufScorer, score_endpoint.EndpointScorer."""
    kd: Callable[[torch.Tensor, Any], torch.Tensor]

    def applies(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) samples: a pure function of (seed, step)."""
        if step < self.after:
            return False
        if self.fraction >= 1.0:
            return True
        return random.Random(f"{self.seed}:on-policy:{step}").random() < self.fraction

    def sample(self, model: Any, examples: Sequence[Example], device: Device, *, step: int, first_row: int
               ) -> list[Example]:
        """``examples`` with their answers replaced by completions the student samples now."""
        prompts = [e.student_ids[:e.student_prompt] for e in examples]
        room = min(self.max_length - len(p) for p in prompts)  # no sequence past max_length
        completions = sample_completions(model, prompts, pad_id=self.pad_id, eos_id=self.eos_id,
                                         temperature=self.temperature,
                                         max_new_tokens=max(1, min(self.max_new_tokens, room)),
                                         seed=_stream_seed(self.seed, step, first_row), device=device)
        return [Example(e.student_ids[:e.student_prompt] + c, e.student_prompt,
                        e.teacher_ids[:e.teacher_prompt] + c, e.teacher_prompt, e.row)
                for e, c in zip(examples, completions)]

    def loss(self, s_logits: torch.Tensor, micro: MicroBatch, objective: Objective) -> LossTerms:
        """KD alone on the sampled tokens (no cross-entropy: the tokens are the student's own)."""
        from edgepack.distill.train_loss import LossTerms

        kd = self.kd(s_logits, self.scorer.targets(micro.indices, micro.examples))
        return LossTerms(kd, kd, torch.zeros((), device=s_logits.device))

    def describe(self, history: Sequence[Any] = ()) -> dict[str, Any]:
        return {"fraction": self.fraction, "after": self.after, "temperature": self.temperature, "max_new_tokens": self.max_new_tokens,
                "teacher": self.scorer_name, "scorer": _describe(self.scorer),
                "steps_on_policy": sum(1 for h in history if getattr(h, "on_policy", False)),
                "completions": sum(getattr(h, "sampled", 0) for h in history),
                "completions_capped": sum(getattr(h, "capped", 0) for h in history)}


def _describe(scorer: Any) -> dict[str, Any]:
    describe = getattr(scorer, "describe", None)
    return describe() if callable(describe) else {"kind": HF}


def _stream_seed(seed: int, step: int, first_row: int) -> int:
    digest = hashlib.sha256(f"{seed}:on-policy-sample:{step}:{first_row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_completions(model: Any, prompts: Sequence[list[int]], *, pad_id: int, eos_id: int, temperature: float,
                       max_new_tokens: int, seed: int, device: Device) -> list[list[int]]:
    """One sampled completion per prompt (left-padded batch, KV cache), each cut after its first EOS.

    Sampling is plain ancestral sampling at ``temperature`` (no top-k/top-p, whatever the model's
    generation_config says) from an RNG stream of its own (``seed``), outside the training RNG.
    """
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None,
                              repetition_penalty=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
                              eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
                              bos_token_id=getattr(model.generation_config, "bos_token_id", None))
    was_training = model.training
    model.eval()
    rng_devices = [torch.device(device.name)] if device.name != "cpu" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices, device_type=device.name), \
                device.autocast():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device.name), attention_mask=attention.to(device.name),
                                 generation_config=config)
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        completions.append(row[:cut])
    return completions


def default_max_new(examples: Sequence[Example], cfg: TrainConfig) -> int:
    """``on_policy_max_new``, or the longest answer of the training data (student tokens, EOS included)."""
    return cfg.on_policy_max_new or max(e.answer_tokens for e in examples)


def open_on_policy(name: str | None, cfg: TrainConfig, *, run_dir: Path, examples: Sequence[Example], tokenizer: Any,
                   pad_id: int, seed: int, online_teacher: Any, data_report: dict[str, Any]) -> OnPolicy | None:
    """The run's :class:`OnPolicy` with its scorer opened (an endpoint is probed first); None when off."""
    if name is None:
        return None
    kd_of = SCORERS[name].kd
    if name == HF:
        scorer = online_teacher
    elif name == GGUF:
        from edgepack.distill.score_gguf import GgufScorer

        path = _teacher_gguf(run_dir)
        assert path is not None  # scorer_name checked it
        # llama.cpp runs between the student's torch ops on the same cores: half of them, so that
        # torch's spinning threads and llama.cpp's do not fight over every core.
        scorer = GgufScorer(path, tokenizer, k=cfg.soft_k, n_ctx=teacher_context(examples, cfg),
                            threads=max(1, (os.cpu_count() or 2) // 2))
    else:
        scorer = _endpoint_scorer(data_report, tokenizer, examples)
    return OnPolicy(cfg.on_policy, cfg.on_policy_after, cfg.on_policy_temperature, default_max_new(examples, cfg),
                    cfg.max_length, seed,
                    pad_id, tokenizer.eos_token_id, name, scorer, kd_of(cfg))


def teacher_context(examples: Sequence[Example], cfg: TrainConfig) -> int:
    """The longest teacher sequence an on-policy step can score: the student's ``max_length`` plus
    the teacher-only context turns its prompt carries."""
    return cfg.max_length + max(e.teacher_prompt - e.student_prompt for e in examples)


def _endpoint_scorer(data_report: dict[str, Any], tokenizer: Any, examples: Sequence[Example]) -> Any:
    from edgepack.distill.endpoint import EndpointConfig
    from edgepack.distill.score_endpoint import EndpointScorer
    from edgepack.distill.teachers import resolve_teacher

    source = resolve_teacher(data_report["teacher"]["spec"])
    recorded = data_report.get("teacher_endpoint") or {}  # how `distill data` called it (key variable, deadline)
    known = {k: recorded[k] for k in ("concurrency", "timeout_s", "api_key_env") if k in recorded}
    scorer = EndpointScorer(source, tokenizer, config=EndpointConfig(**known))
    scorer.probe(examples[0])
    return scorer


def scorer_memory_mb(name: str | None, run_dir: Path, cfg: TrainConfig, teacher_config: Any) -> float:
    """Process memory a scorer holds outside torch: llama.cpp's mapped GGUF, its f32 KV cache over
    the context, and the logits of one example's answer (llama.cpp's buffer and two copies)."""
    if name != GGUF:
        return 0.0
    path = _teacher_gguf(run_dir)
    c = teacher_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kv = cfg.max_length * c.num_hidden_layers * 2 * kv_heads * head_dim * 4
    logits = 3 * cfg.max_length * c.vocab_size * 4
    return ((path.stat().st_size if path is not None else 0) + kv + logits) / 2**20
