"""Training on an endpoint teacher's answers: top-k logprobs KD, response-only, and eval.

The endpoint is a scripted OpenAI-compatible server (tests/distill/test_endpoint.py's mock)
whose answers come from a real tiny teacher: each answer is a fixed text, its tokens and
top-k alternatives are the teacher's own log-softmax at each answer position, as a server
running that teacher would return them (token text, not ids).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from edgepack.constants import DATA_DIR, DATA_REPORT, STUDENT_DIR
from edgepack.distill.data import build_dataset, read_jsonl
from edgepack.distill.endpoint import EndpointConfig
from edgepack.distill.evaluate import evaluate_run
from edgepack.distill.train import TrainConfig, train_student
from edgepack.errors import UsageError
from edgepack.profiles import load_profile
from tests.distill.test_endpoint import FAST, PROMPTS, echo, mock, prompts_file  # noqa: F401  (fixture)

PROFILE = load_profile("cpu-x86-2c")
CONFIG = TrainConfig(lr=1e-2, save_every=100, warmup_fraction=0.2, alpha=0.0, batch_size=4, micro_batch=2)
K = 5


def teacher_script(teacher_dir: Path, leading_space_every: int = 0):
    """Answers from the tiny teacher: text fixed per prompt, logprobs the teacher's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    def script(body: dict[str, Any], n: int) -> tuple[int, Any]:
        prompt = body["messages"][-1]["content"]
        text = f"Inspect {prompt.split()[0]} now."
        answer_ids = tok(text, add_special_tokens=False).input_ids
        prompt_ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1:-1]
        logp = torch.log_softmax(logits.float(), -1)
        content = []
        for pos, token in enumerate(answer_ids):
            top = torch.topk(logp[pos], K)
            content.append({"token": tok.decode([token]), "logprob": float(logp[pos, token]),
                            "top_logprobs": [{"token": tok.decode([int(i)]), "logprob": float(v)}
                                             for v, i in zip(top.values, top.indices)]})
        if leading_space_every and n % leading_space_every == 0:
            content[0]["token"] = " " + content[0]["token"]  # what a server may send: no longer aligned
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": {"content": content} if body.get("logprobs") else None}
        return 200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice]}

    return script


def test_top_logprobs_train_and_eval(mock, tmp_path: Path, tiny4_dir: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    server = mock(teacher_script(tiny4_dir, leading_space_every=4))
    run = tmp_path / "run"
    report = build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=run,
                           endpoint=EndpointConfig(top_logprobs=K, **FAST))
    assert report["distillation"] == "top-logprobs"
    with pytest.raises(UsageError, match="no weights to derive an `auto` student"):
        train_student(run_dir=run, profile=PROFILE, steps=1)
    with pytest.raises(UsageError, match="forward KL only"):
        train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=1,
                      config=TrainConfig(divergence="reverse_kl"))

    out = train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=6, seed=0, config=CONFIG)
    assert out["mode"] == "top-logprobs" and out["mode_reason"] is None
    stats = out["endpoint_logprobs"]
    rows = read_jsonl(run / DATA_DIR / "train.jsonl")
    # Every 4th request had its first token text shifted: those rows are unaligned, the rest used.
    assert stats["rows"] == len(rows) and 0 < stats["unaligned_rows"] < stats["rows"]
    assert stats["k"] >= K and 0.0 < stats["mass_retained"] <= 1.0
    assert all(h["kd"] > 0 for h in out["loss_curve"])
    assert out["loss_curve"][-1]["kd"] < out["loss_curve"][0]["kd"]
    assert out["teacher_params"] is None  # an endpoint: unknown

    ev = evaluate_run(run_dir=run)
    assert ev["distilled"]["kl"] is None and "endpoint" in ev["kl_note"]
    assert ev["distilled"]["ce"] > 0 and ev["undistilled"]["ce"] > 0


def test_top_logprob_targets_equal_the_teachers_distribution(mock, tmp_path: Path, tiny4_dir: Path) -> None:  # noqa: F811
    """The sparse targets rebuilt from token text are the teacher's top-k ids and logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import tokenize_rows
    from edgepack.distill.endpoint_targets import EndpointTargets

    server = mock(teacher_script(tiny4_dir))
    run = tmp_path / "run"
    build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl", 5), run_dir=run,
                  endpoint=EndpointConfig(top_logprobs=K, **FAST))
    tok = AutoTokenizer.from_pretrained(tiny4_dir)
    rows = read_jsonl(run / DATA_DIR / "train.jsonl")
    examples, _ = tokenize_rows(tok, rows, [], 256)
    targets = EndpointTargets(tok, rows, examples)
    sparse, mask = targets.targets(range(1), examples[:1])
    ex = examples[0]
    model = AutoModelForCausalLM.from_pretrained(tiny4_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ex.student_ids])).logits[0].float(), -1)
    n = ex.answer_tokens
    assert mask.tolist() == [1.0] * (n - 1) + [0.0]  # the end-of-turn position has no endpoint distribution
    for pos in range(n - 1):
        dense = logp[ex.student_prompt - 1 + pos]
        got = {int(i): float(v) for i, v in zip(sparse.topk_ids[pos], sparse.topk_logprobs[pos]) if v > -math.inf}
        top = torch.topk(dense, K)
        expected = {int(i): float(v) for i, v in zip(top.indices, top.values)}
        # Every alternative whose text one token decodes to is kept, at the teacher's logprob.
        for i, v in expected.items():
            if i in got:
                assert got[i] == pytest.approx(v, abs=1e-5)
        assert len(got) >= K - 1
        tail = 1.0 - sum(math.exp(v) for v in got.values())
        assert float(sparse.tail_logmass[pos].exp()) == pytest.approx(max(tail, 0.0), abs=1e-5)


def test_no_logprobs_trains_response_only_and_says_why(mock, tmp_path: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    server = mock(echo(logprobs=False))
    run = tmp_path / "run"
    build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=run,
                  endpoint=EndpointConfig(**FAST))
    assert json.loads((run / DATA_DIR / DATA_REPORT).read_text())["distillation"] == "response-only"
    out = train_student(run_dir=run, profile=PROFILE, student=str(tiny_llama_dir), steps=3, seed=0, config=CONFIG)
    assert out["mode"] == "response-only" and "carry no logprobs" in out["mode_reason"]
    assert all(h["kd"] == 0.0 and h["loss"] == h["ce"] for h in out["loss_curve"])
    assert (run / STUDENT_DIR / "model.safetensors").is_file()
