"""The endpoint teacher as a scorer of given tokens (on-policy distillation, distill/score_endpoint.py).

The real thing first: ``edgepack serve`` on the tiny GGUF scores student sequences over HTTP
(``echo`` + ``logprobs`` on /v1/completions, token-id prompts), and the scores are llama.cpp's
own prompt logprobs and, within F16 rounding, transformers' log-softmax of the HF model the GGUF
came from. A student whose tokenizer differs in one token shows a row that does not align: it
is masked whole and counted, and the probe refuses such a row. Then vLLM's answer shapes
(``prompt_logprobs`` keyed by token id, and its echo logprobs) come from a scripted server (the
mock of test_endpoint.py) whose numbers are the tiny HF teacher's own, and endpoints that cannot
score are refused by the probe with a UsageError naming the URL.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from edgepack.distill.batching import Example, collate, tokenize_rows
from edgepack.distill.endpoint import EndpointConfig
from edgepack.distill.score_endpoint import EndpointScorer
from edgepack.distill.teachers import resolve_teacher
from edgepack.errors import TeacherEndpointError, UsageError
from tests.distill.test_endpoint import FAST, PROMPTS, mock  # noqa: F401  (fixture)
from tests.runtime.server.helpers import launch

K = 20
ANSWERS = ["Check the motor and reset the breaker.", "Inspect the pump bearing now.",
           "Open the valve slowly.", "Gauge reading is stuck at zero."]
CONFIG = EndpointConfig(concurrency=2, **FAST)


def tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def examples(tok: Any, answers: list[str] = ANSWERS, context: list[dict[str, str]] | None = None) -> list[Example]:
    rows = [{"messages": [{"role": "user", "content": p}], "response": a} for p, a in zip(PROMPTS, answers)]
    out, too_long = tokenize_rows(tok, rows, context or [], 512)
    assert too_long == 0
    return out


def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax [len(ids), V]: row j is the distribution that predicts ids[j] (row 0: unused)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.cat([torch.zeros(1, logits.shape[-1]), torch.log_softmax(logits[:-1], -1)])


def same_rows(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same ids in the same order, their logprobs equal to float32 precision."""
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-5)


def answer_rows(ex: Example) -> range:
    return range(ex.student_prompt, len(ex.student_ids))


# --- a real server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`edgepack serve` on the tiny GGUF; the teacher spec."""
    server = launch(tiny_gguf, tmp_path_factory.mktemp("score-serve"), n_ctx=2048, threads=1, max_queue=4,
                    timeout_s=60.0)
    try:
        yield f"openai:{server.url}/v1#{tiny_gguf.stem}"
    finally:
        assert server.stop() == 0, server.log.read_text(errors="replace")


def test_edgepack_serve_scores_match_llamacpp_and_transformers(served: str, tiny_gguf: Path,
                                                              tiny_llama_dir: Path) -> None:
    from edgepack.runtime.session import open_model

    tok = tokenizer(tiny_llama_dir)
    exs = examples(tok)
    scorer = EndpointScorer(resolve_teacher(served), tok, k=K, config=CONFIG)
    scorer.probe(exs[0])
    sparse, mask = scorer.targets(list(range(len(exs))), exs)

    batch = collate([e.student_ids for e in exs], [e.student_prompt for e in exs], pad_id=0)
    n = len(batch.targets)
    assert len(sparse) == n and mask.shape == (n,) and sparse.topk_ids.shape == (n, K + 1)
    assert mask.tolist() == [1.0] * n  # every answer position scored, the end-of-turn token too
    stats = scorer.describe()
    assert stats["kind"] == "endpoint" and stats["url"].endswith("/v1/completions")
    assert (stats["rows_scored"], stats["rows_unaligned"], stats["positions"], stats["positions_masked"]) == \
        (len(exs), 0, n, 0)
    assert stats["requests"] == len(exs) + 1 and stats["max_tokens"] == 0  # the probe, then one per row

    at, model = 0, hf_model(tiny_llama_dir)
    with open_model(tiny_gguf, threads=1, n_ctx=2048) as session:
        for ex in exs:
            own = session.backend.prompt_logprobs(ex.student_ids, K)  # llama.cpp's, in process
            hf = hf_logprobs(model, ex.student_ids)
            for j in answer_rows(ex):
                ids, lps = sparse.topk_ids[at].tolist(), sparse.topk_logprobs[at].tolist()
                kept = [(i, lp) for i, lp in zip(ids, lps) if lp > -math.inf]
                tail = math.exp(sparse.tail_logmass[at].item())
                # the served token's own logprob, exactly llama.cpp's; and it is among the kept ids
                assert dict(kept)[ex.student_ids[j]] == pytest.approx(own[j].logprob, abs=1e-5)
                # every alternative whose text, as the server prints it, names one student token is
                # llama.cpp's top-k, in order (control tokens print as "" and join the tail)
                printed = {i: session.backend.token_bytes(i).decode("utf-8", "replace") for i, _ in own[j].top}
                mapped = [(i, lp) for i, lp in own[j].top if scorer._piece_to_id.get(printed[i]) == i]
                same_rows(kept[:len(mapped)], mapped)
                # ... and transformers' log-softmax of the HF weights, within F16 rounding
                for i, lp in kept:
                    assert lp == pytest.approx(hf[j, i].item(), abs=0.03)
                # the tail is the mass not kept, by the endpoint's numbers and by transformers'
                assert tail == pytest.approx(1 - sum(math.exp(lp) for _, lp in kept), abs=1e-5)
                assert tail == pytest.approx(1 - sum(hf[j, i].exp().item() for i, _ in kept), abs=0.02)
                at += 1
    assert at == n


def test_the_teacher_is_scored_on_its_own_prompt(served: str, tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    """With teacher-only context turns, the endpoint scores the answer after the teacher's prompt."""
    from edgepack.runtime.session import open_model

    tok = tokenizer(tiny_llama_dir)
    context = [{"role": "user", "content": "Pump P-7 bearing noisy"}, {"role": "assistant", "content": "Check it."}]
    exs = examples(tok, context=context)[:2]
    assert all(e.teacher_prompt > e.student_prompt for e in exs)
    scorer = EndpointScorer(resolve_teacher(served), tok, k=K, config=CONFIG)
    scorer.probe(exs[0])
    sparse, mask = scorer.targets([0, 1], exs)
    assert mask.tolist() == [1.0] * len(sparse)
    chosen = [dict(zip(sparse.topk_ids[at].tolist(), sparse.topk_logprobs[at].tolist())) for at in range(len(sparse))]
    with open_model(tiny_gguf, threads=1, n_ctx=2048) as session:
        teacher, student = [], []
        for ex in exs:
            own = session.backend.prompt_logprobs(ex.teacher_ids, K)
            bare = session.backend.prompt_logprobs(ex.student_ids, K)
            teacher += [(own[j].token, own[j].logprob) for j in range(ex.teacher_prompt, len(ex.teacher_ids))]
            student += [bare[j].logprob for j in range(ex.student_prompt, len(ex.student_ids))]
    assert [c[t] for c, (t, _) in zip(chosen, teacher)] == pytest.approx([lp for _, lp in teacher], abs=1e-5)
    assert [c[t] for c, (t, _) in zip(chosen, teacher)] != pytest.approx(student, abs=1e-3)


def test_on_policy_training_with_an_endpoint_teacher(mock, served: str, tiny_llama_dir: Path, tiny4_dir: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """`distill train --on-policy 1` on an endpoint run: the student's samples are scored by `edgepack serve`.

    The run's endpoint answers chat requests (the data: the tiny teacher's answers and logprobs,
    scripted as in test_train_endpoint.py) and hands completions requests to the real server
    running the same teacher's GGUF, so every on-policy score comes from `edgepack serve`."""
    import urllib.error
    import urllib.request

    from edgepack.distill.data import build_dataset
    from edgepack.distill.train import TrainConfig, train_student
    from tests.distill.test_endpoint import prompts_file
    from tests.distill.test_train_endpoint import PROFILE, teacher_script

    chat = teacher_script(tiny_llama_dir)
    real, model = served.split(":", 1)[1].split("#")

    def script(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if "messages" in body:
            return chat(body, n)
        request = urllib.request.Request(f"{real}/completions", data=json.dumps({**body, "model": model}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    server = mock(script)
    run = tmp_path / "run"
    build_dataset(teacher=server.spec, data=prompts_file(tmp_path / "p.jsonl"), run_dir=run,
                  endpoint=EndpointConfig(top_logprobs=5, **FAST))
    out = train_student(run_dir=run, profile=PROFILE, student=str(tiny4_dir), steps=4, seed=0,
                        config=TrainConfig(lr=1e-2, alpha=0.0, batch_size=4, micro_batch=2, on_policy=1.0))
    op, curve = out["on_policy"], out["loss_curve"]
    assert op["teacher"] == "endpoint" and op["steps_on_policy"] == 4 and all(h["on_policy"] for h in curve)
    scored = op["scorer"]
    assert scored["kind"] == "endpoint" and scored["rows_scored"] == 16 and scored["rows_unaligned"] == 0
    assert scored["positions"] > 0 and scored["positions_masked"] == 0
    completions = [r for r in server.requests if r["path"] == "/v1/completions"]
    assert len(completions) == scored["requests"] == 16 + 1  # the probe, then one per sampled row
    assert all(h["kd"] > 0 for h in curve) and curve[-1]["kd"] < curve[0]["kd"]


def swapped_tokenizer(tiny_llama_dir: Path, folder: Path, exs: list[Example]) -> tuple[Path, int]:
    """The tiny tokenizer with two tokens' ids swapped: one only the last example uses, one none uses.

    The student then writes that text with another id, which the endpoint prints as another text."""
    tok = tokenizer(tiny_llama_dir)
    used = [set(e.student_ids) for e in exs]
    special = set(tok.all_special_ids)
    only_last = sorted(used[-1] - set().union(*used[:-1]) - special)
    unused = [i for i in range(len(tok)) if i not in set().union(*used) and i not in special
              and "\ufffd" not in tok.decode([i]) and tok.decode([i]).strip()]
    a, b = only_last[0], unused[0]
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    spec = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {v: t for t, v in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder, b


def test_a_row_that_does_not_align_is_masked_and_counted(served: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    exs = examples(tokenizer(tiny_llama_dir))
    folder, moved = swapped_tokenizer(tiny_llama_dir, tmp_path, exs)
    student = tokenizer(folder)
    exs = examples(student)
    assert moved in exs[-1].student_ids and all(moved not in e.student_ids for e in exs[:-1])

    scorer = EndpointScorer(resolve_teacher(served), student, k=K, config=CONFIG)
    scorer.probe(exs[0])
    with pytest.raises(UsageError, match=r"cannot score given tokens.*do not decode to the student's tokens") as err:
        scorer.probe(exs[-1])
    assert served.split(":", 1)[1].split("#")[0] in str(err.value) and "edgepack serve" in err.value.hint

    sparse, mask = scorer.targets(list(range(len(exs))), exs)
    sizes = [e.answer_tokens for e in exs]
    assert mask.tolist() == [1.0] * sum(sizes[:-1]) + [0.0] * sizes[-1]
    masked = slice(sum(sizes[:-1]), None)  # masked positions: the token itself, the tail empty
    assert sparse.topk_ids[masked, 0].tolist() == exs[-1].student_ids[exs[-1].student_prompt:]
    assert torch.all(sparse.tail_logmass[masked] == -math.inf)
    stats = scorer.describe()
    assert (stats["rows_scored"], stats["rows_unaligned"], stats["positions_masked"]) == (len(exs), 1, sizes[-1])
    assert stats["first_unaligned"].startswith(f"token {exs[-1].student_ids.index(moved)}:")


# --- vLLM's answer shapes, scripted from the tiny teacher's own numbers ---------------------------------

def vllm_script(model_dir: Path, *, ids_keyed: bool, refuse_zero: bool = False) -> Any:
    """A vLLM-like /v1/completions: echo with logprobs k (prompt_logprobs keyed by id, or only the
    completions logprobs with texts; vLLM's maps hold the top-k and the token itself)."""
    tok, model = tokenizer(model_dir), hf_model(model_dir)

    def script(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if refuse_zero and body["max_tokens"] == 0:
            return 400, {"error": {"message": "max_tokens must be at least 1", "param": "max_tokens"}}
        ids, k = list(body["prompt"]), body["logprobs"]
        lp = hf_logprobs(model, ids)
        if body["max_tokens"]:  # one generated token, echoed after the prompt
            ids.append(int(lp[-1].argmax()))
            lp = torch.cat([lp, lp[-1:]])
        prompt_lp: list[Any] = [None]
        tokens, token_lps, tops = [tok.decode([ids[0]])], [None], [None]
        for j in range(1, len(ids)):
            top = torch.topk(lp[j], k)
            entry = {int(i): float(v) for v, i in zip(top.values, top.indices)}
            entry.setdefault(ids[j], float(lp[j, ids[j]]))
            ranks = sorted(entry, key=lambda i: -entry[i])
            prompt_lp.append({str(i): {"logprob": entry[i], "rank": ranks.index(i) + 1,
                                       "decoded_token": tok.decode([i])} for i in entry})
            tokens.append(tok.decode([ids[j]]))
            token_lps.append(entry[ids[j]])
            tops.append({tok.decode([i]): max(v, -9999.0) for i, v in entry.items()})
        choice = {"index": 0, "text": tok.decode(ids), "finish_reason": "length", "stop_reason": None,
                  "logprobs": {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                               "text_offset": [0] * len(ids)}}
        if ids_keyed:
            choice["prompt_logprobs"] = prompt_lp
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}

    return script


@pytest.mark.parametrize("ids_keyed", [True, False], ids=["prompt_logprobs", "echo-logprobs"])
def test_vllm_shapes_give_the_teachers_top_k(mock, tiny_llama_dir: Path, ids_keyed: bool) -> None:  # noqa: F811
    server = mock(vllm_script(tiny_llama_dir, ids_keyed=ids_keyed, refuse_zero=ids_keyed))
    tok = tokenizer(tiny_llama_dir)
    exs = examples(tok)[:2]
    scorer = EndpointScorer(resolve_teacher(server.spec), tok, k=5, config=CONFIG)
    scorer.probe(exs[0])
    sparse, mask = scorer.targets([0, 1], exs)

    sent = server.requests[-1]
    assert sent["path"] == "/v1/completions"
    assert sent["body"]["echo"] is True and sent["body"]["logprobs"] == 5 and sent["body"]["temperature"] == 0
    assert sent["body"]["prompt"] in [e.teacher_ids for e in exs]
    # The server that refused max_tokens 0 is asked for 1, and the generated token is ignored.
    assert sent["body"]["max_tokens"] == (1 if ids_keyed else 0) == scorer.describe()["max_tokens"]
    assert mask.tolist() == [1.0] * len(sparse)
    at, model = 0, hf_model(tiny_llama_dir)
    for ex in exs:
        hf = hf_logprobs(model, ex.student_ids)
        for j in answer_rows(ex):
            top = torch.topk(hf[j], 5)
            ids, lps = sparse.topk_ids[at].tolist(), sparse.topk_logprobs[at].tolist()
            expected = [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
            if not ids_keyed:  # by text: only tokens whose text is one student token's keep their id
                expected = [(i, v) for i, v in expected if scorer._piece_to_id.get(tok.decode([i])) == i]
            same_rows(list(zip(ids, lps))[:len(expected)], expected)
            kept = [(i, lp) for i, lp in zip(ids, lps) if lp > -math.inf]
            assert ex.student_ids[j] in dict(kept)
            tail = 1 - sum(hf[j, i].exp().item() for i, _ in kept)
            assert math.exp(sparse.tail_logmass[at].item()) == pytest.approx(tail, abs=1e-5)
            at += 1
    assert at == len(sparse)


def test_a_misaligned_row_from_vllm_is_masked(mock, tiny_llama_dir: Path) -> None:  # noqa: F811
    """vLLM decodes with its own tokenizer: a token printed differently marks the row unaligned."""
    inner = vllm_script(tiny_llama_dir, ids_keyed=True)

    def script(body: dict[str, Any], n: int) -> tuple[int, Any]:
        status, reply = inner(body, n)
        if n == 2:  # the second row of targets()
            last = reply["choices"][0]["prompt_logprobs"][-2]
            for item in last.values():
                item["decoded_token"] = "§" + item["decoded_token"]
        return status, reply

    server = mock(script)
    tok = tokenizer(tiny_llama_dir)
    exs = examples(tok)[:2]
    scorer = EndpointScorer(resolve_teacher(server.spec), tok, k=5, config=EndpointConfig(concurrency=1, **FAST))
    scorer.probe(exs[0])
    _, mask = scorer.targets([0, 1], exs)
    assert mask.tolist() == [1.0] * exs[0].answer_tokens + [0.0] * exs[1].answer_tokens
    assert scorer.describe()["rows_unaligned"] == 1


def refuse_echo(body: dict[str, Any], n: int) -> tuple[int, Any]:
    return 400, {"error": {"message": "echo is not supported", "type": "invalid_request_error", "param": "echo"}}


def ignore_echo(body: dict[str, Any], n: int) -> tuple[int, Any]:
    """A server that generates and drops echo and the prompt's logprobs (as llama-server does)."""
    return 200, {"id": "x", "object": "text_completion", "model": "m",
                 "choices": [{"index": 0, "text": "hi", "finish_reason": "length",
                              "logprobs": {"tokens": ["hi"], "token_logprobs": [-0.5],
                                           "top_logprobs": [{"hi": -0.5}], "text_offset": [0]}}]}


def chat_only(body: dict[str, Any], n: int) -> tuple[int, Any]:
    return 404, {"error": {"message": "Not Found"}}


@pytest.mark.parametrize(("script", "lacks"), [(refuse_echo, r"was refused \(HTTP 400 \(echo is not supported\)\)"),
                                               (ignore_echo, "logprobs for 1 tokens, not for the"),
                                               (chat_only, r"was refused \(HTTP 404")],
                         ids=["refuses-echo", "ignores-echo", "no-completions"])
def test_an_endpoint_that_cannot_score_is_refused(mock, tiny_llama_dir: Path, script: Any, lacks: str) -> None:  # noqa: F811
    server = mock(script)
    tok = tokenizer(tiny_llama_dir)
    scorer = EndpointScorer(resolve_teacher(server.spec), tok, k=K, config=CONFIG)
    with pytest.raises(UsageError, match=lacks) as err:
        scorer.probe(examples(tok)[0])
    url = server.spec.split(":", 1)[1].split("#")[0] + "/completions"
    assert str(err.value).startswith(f"teacher endpoint {url} cannot score given tokens")
    assert "\n" not in str(err.value) and "vLLM" in err.value.hint and "--on-policy" in err.value.hint
    assert len(server.requests) == 1  # a refusal is an answer: not retried


def test_a_server_that_stops_scoring_mid_run_is_an_error(mock, tiny_llama_dir: Path) -> None:  # noqa: F811
    inner = vllm_script(tiny_llama_dir, ids_keyed=True)
    server = mock(lambda body, n: inner(body, n) if n == 0 else ignore_echo(body, n))
    tok = tokenizer(tiny_llama_dir)
    exs = examples(tok)[:1]
    scorer = EndpointScorer(resolve_teacher(server.spec), tok, k=5, config=CONFIG)
    scorer.probe(exs[0])
    with pytest.raises(TeacherEndpointError, match="the scoring answer is unusable"):
        scorer.targets([0], exs)


def test_bad_settings(tiny_llama_dir: Path) -> None:
    tok = tokenizer(tiny_llama_dir)
    with pytest.raises(UsageError, match="is not an endpoint"):
        EndpointScorer(resolve_teacher(str(tiny_llama_dir)), tok)
    with pytest.raises(UsageError, match="k must be from 1 to 20"):
        EndpointScorer(resolve_teacher("openai:http://127.0.0.1:9/v1#m"), tok, k=21)
