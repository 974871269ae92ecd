"""Teacher correction: adapt a small teacher to the labelled seed data before distilling.

A small teacher is often not competent on a narrow domain: the embedded 135M teacher,
quantized to Q4_1, labels the demo's plant alarms near chance when asked zero-shot. As
Minitron does before pruning and distilling, :func:`correct_teacher` first fine-tunes the
teacher on the training split's ``(prompt, reference)`` pairs with a LoRA adapter (peft),
merges it, and saves the result as ``RUN/teacher-corrected``:

* the merged model as an HF folder (safetensors, the teacher's tokenizer and chat template),
  which training loads for the teacher's logits;
* the same model as a GGUF (:data:`CorrectionConfig.generation_quant`), which the data stage
  generates with through llama.cpp (the fast path on CPU);
* ``correction.json``: the recipe, the loss curve and the teacher's holdout score under the
  task's primary metric (label accuracy for the demo, field F1 for a JSON task...) before and
  after, both measured the same way (greedy llama.cpp answers to the student's prompt, no
  demonstrations, scored by :func:`edgepack.scoring.score_answers`).

The recipe, top to bottom: setup (LoRA on every linear layer) → train (AdamW, warmup then
linear decay, loss on the answer tokens only) → merge → convert → measure. The prompt prefix
every row shares (the system prompt) is run once per step without gradient under the current
weights and reused as a KV cache for the batch; the answer still sees an exact forward pass,
only the gradient through the shared prefix's keys and values is dropped. On 2 CPU cores this
makes a step about four times cheaper for the demo, whose system prompt is 180 of ~200 tokens.

The LoRA steps run on the :class:`~edgepack.distill.device.Device` the caller resolved
(``distill data --device/--precision``, the pipeline's ``device``): the adapted model on it,
the forward under its autocast (bf16/fp16 on accelerators, bf16 on the CPU when asked), fp16
gradients scaled (a step whose scaled gradients overflow is skipped, as GradScaler does, and
marked ``skipped_fp16_overflow`` in the loss curve). The weights stay fp32 (the merge adds the adapters to them), and the merge,
the GGUF conversion and the scoring run on the CPU as before. The CPU in fp32 is the default
and leaves correction.json's identity as it always was; any other device or precision enters
it (:func:`device_identity`), and correction.json records where it trained and whether the
result is bit-reproducible.

Holdout rows are never trained on. The folder is written atomically and reused on a rerun
with the same teacher, rows, recipe and device.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import atomic_dir, is_complete, write_json
from edgepack.constants import TEACHER_CORRECTED_DIR, TEACHER_SOURCE
from edgepack.errors import DataError, RunDirError
from edgepack.progress import ProgressFn, null_progress
from edgepack.task import DEMO_TASK, LabelsAnswer, Task

if TYPE_CHECKING:
    from edgepack.distill.device import Device

CORRECTION_REPORT = "correction.json"
# Every attention and MLP Linear of the supported families; PEFT skips names a model lacks.
# Phi-3 fuses q|k|v into qkv_proj and gate|up into gate_up_proj.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj")


@dataclass(frozen=True)
class CorrectionConfig:
    """The LoRA SFT recipe (defaults: the demo, a few minutes on 2 CPU cores)."""

    steps: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = LORA_TARGETS
    warmup_steps: int = 3
    max_length: int = 512
    """Prompt + reference tokens; longer rows are skipped (counted)."""
    generation_quant: str = "Q8_0"
    """The GGUF type the corrected teacher generates with (``F16`` for no quantization)."""
    eval_max_tokens: int = 16
    """A labels task's answers are cut here (enough for ``Category: <label>``: accuracy reads only
    the label); other kinds are scored on whole answers (the task's max tokens)."""

    def describe(self) -> dict[str, Any]:
        """As stored in reports (JSON types: the tuple becomes a list, so a reread compares equal)."""
        return json.loads(json.dumps(asdict(self)))


def gguf_name(config: CorrectionConfig) -> str:
    return f"teacher-{config.generation_quant}.gguf"


def device_identity(device: Device | None) -> dict[str, str] | None:
    """Where the correction trains, as identities record it: None for the CPU in fp32 (the default,
    absent so corrections made before the option are reused), else the device and precision."""
    if device is None or (device.name, device.precision) == ("cpu", "fp32"):
        return None
    return {"device": device.name, "precision": device.precision}


def correct_teacher(*, teacher_dir: Path, before: Any, train: list[Any], holdout: list[Any], out_dir: Path,
                    seed: int = 0, config: CorrectionConfig | None = None, task: Task = DEMO_TASK,
                    device: Device | None = None, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """LoRA-SFT ``teacher_dir`` on ``train`` rows with references; return correction.json.

    ``before`` is the original teacher's :class:`TeacherSource` (its holdout score under
    ``task``'s primary metric is measured through the same generator the data stage uses).
    ``train``/``holdout`` are ``PromptRow``s; only training rows with a ``reference`` are
    learned from, only holdout rows with a label or a reference are scored. ``device``
    (device.py ``resolve_device``; None: the CPU in fp32) is where the LoRA steps run.
    """
    from edgepack.distill.device import CPU

    cfg, device = config or CorrectionConfig(), device or CPU
    out_dir = Path(out_dir)
    sft_rows = [r for r in train if r.reference]
    if not sft_rows:
        raise DataError("teacher correction needs training rows with a `reference` answer; none has one",
                        hint="add `reference` answers to the prompts file, or run without --correct-teacher")
    before_sha = json.loads((Path(teacher_dir) / TEACHER_SOURCE).read_text())["sha256"]
    identity: dict[str, Any] = {"teacher_sha256": before_sha, "rows": _rows_digest(sft_rows), "seed": seed,
                                "config": cfg.describe()}
    if (where := device_identity(device)) is not None:
        identity["device"] = where
    if is_complete(out_dir):
        report = json.loads((out_dir / CORRECTION_REPORT).read_text())
        if report.get("identity") != identity:
            raise RunDirError(f"{out_dir} holds a teacher corrected with other data or settings",
                              hint="use a new run folder, or the same teacher, data, seed, device and precision")
        return {**report, "skipped": True}
    if out_dir.exists():
        raise RunDirError(f"{out_dir} exists but is not complete", hint="delete it and rerun")

    scored = [r for r in holdout if r.label or r.reference]
    score_before = holdout_score(before, Path(teacher_dir), scored, task, cfg, progress, "correct: score before")
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        history, used = _train_lora(Path(teacher_dir), sft_rows, tmp, seed, cfg, device, progress)
        train_s = time.perf_counter() - t0
        gguf = _write_gguf(tmp, cfg, progress)
        source = corrected_source(tmp, gguf, before_sha)
        score_after = holdout_score(source, tmp, scored, task, cfg, progress, "correct: score after")
        report = {
            "identity": identity,
            "method": "LoRA SFT on the training split's references, merged (peft)",
            "rows": len(sft_rows), "rows_used": used, "rows_too_long": len(sft_rows) - used,
            "steps": cfg.steps,
            "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "loss_curve": history,
            "train_s": round(train_s, 1),
            **device.describe(),
            "generation_gguf": gguf.name,
            "holdout_scored": len(scored),
            "metric": task.primary_metric,
            "score_before": score_before,
            "score_after": score_after,
            "score_note": "greedy llama.cpp/transformers answers to the student's prompt (no demonstrations), "
                          f"scored by the task's {task.primary_metric} against the holdout's labels or references",
        }
        write_json(tmp / TEACHER_SOURCE, source.describe() | {"path": gguf.name, "corrected_from": before_sha})
        write_json(tmp / CORRECTION_REPORT, report)
    return report


def corrected_source(folder: Path, gguf: Path, before_sha: str) -> Any:
    """The corrected teacher as a GGUF :class:`TeacherSource` (identity: its GGUF's sha256)."""
    from edgepack.distill.teachers import TeacherSource
    from edgepack.hashing import sha256_file

    return TeacherSource(spec=f"corrected:{before_sha[:12]}", kind="gguf", name=TEACHER_CORRECTED_DIR,
                         sha256=sha256_file(gguf), path=gguf)


def load_corrected_source(folder: Path) -> Any:
    """:func:`corrected_source` for a finished ``RUN/teacher-corrected`` folder."""
    recorded = json.loads((Path(folder) / TEACHER_SOURCE).read_text())
    return corrected_source(Path(folder), Path(folder) / recorded["path"], recorded["corrected_from"])


def holdout_score(source: Any, teacher_dir: Path, rows: list[Any], task: Task, cfg: CorrectionConfig,
                  progress: ProgressFn, what: str) -> float | None:
    """``task``'s primary metric of the greedy answers to ``rows`` (None: nothing to score)."""
    from edgepack.distill.generate import DecodeParams, open_generator
    from edgepack.scoring import score_answers

    if not rows:
        return None
    max_tokens = cfg.eval_max_tokens if isinstance(task.answer, LabelsAnswer) else task.decoding.max_tokens
    answers = []
    progress(what, 0, len(rows))
    with open_generator(source, teacher_dir, DecodeParams(max_new_tokens=max_tokens)) as generate:
        for i, row in enumerate(rows):
            answers.append(generate(row.messages).text)
            progress(what, i + 1, len(rows))
    primary = score_answers(task, answers, [{"label": r.label, "reference": r.reference} for r in rows])["primary"]
    return None if primary is None else round(primary, 4)


def _rows_digest(rows: list[Any]) -> str:
    import hashlib

    blob = json.dumps([[r.messages, r.reference] for r in rows], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _train_lora(teacher_dir: Path, rows: list[Any], out: Path, seed: int, cfg: CorrectionConfig, device: Device,
                progress: ProgressFn) -> tuple[list[dict[str, Any]], int]:
    """Setup → train (on ``device``) → merge (on the CPU); writes the merged HF folder to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepack.distill.batching import common_prefix_len, tokenize_rows
    from edgepack.distill.device import seeded

    with seeded(device, seed):
        # ------------------------------------------------------------ setup
        tok = AutoTokenizer.from_pretrained(teacher_dir)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        examples, _ = tokenize_rows(tok, [{"messages": r.messages, "response": r.reference} for r in rows], [],
                                    cfg.max_length)
        if not examples:
            raise DataError(f"no reference row fits {cfg.max_length} tokens")
        # Keep one prompt token out of the prefix: the position before the answer is trained on.
        prefix = min(common_prefix_len([e.student_ids for e in examples]),
                     min(e.student_prompt for e in examples) - 1)
        # fp32 weights on every device: the merge adds the adapters to the stored base weights,
        # and autocast already runs the forward in half precision where asked.
        base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)  # adapters initialized on the CPU: the same start on every device
        model.to(device.name)  # a no-op on the CPU
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * max(0.0, 1 - s / cfg.steps))
        scaler = device.grad_scaler()  # fp16 only
        order = _epoch_order(len(examples), cfg.steps * cfg.batch_size, seed)

        # ------------------------------------------------------------ train
        history: list[dict[str, Any]] = []
        progress("correct: LoRA SFT", 0, cfg.steps)
        for step in range(cfg.steps):
            part = [examples[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
            loss = _answer_loss(model, part, prefix, pad_id, device)
            if not math.isfinite(float(loss.detach())):
                raise DataError(f"teacher correction diverged at step {step + 1} (loss {float(loss.detach())})",
                                hint="lower CorrectionConfig.lr")
            row: dict[str, Any] = {"step": step + 1, "loss": round(float(loss.detach()), 5)}
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed fp16
                scaler.update()
                if scaler.get_scale() < scale:
                    row["skipped_fp16_overflow"] = True
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(row)
            progress("correct: LoRA SFT", step + 1, cfg.steps)

        # ------------------------------------------------------------ merge (on the CPU: GGUF conversion reads it)
        merged = model.to("cpu").merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        _copy_tokenizer(teacher_dir, out)
        return history, len(examples)


def _answer_loss(model: Any, part: list[Any], prefix: int, pad_id: int, device: Device) -> Any:
    """Cross-entropy on ``part``'s answer tokens. The shared ``prefix`` runs once without gradient
    and is reused as the batch's KV cache (module docstring); the forward runs under the device's
    autocast, the loss in fp32 outside it (as in train_step.py)."""
    import torch

    from edgepack.distill.batching import collate

    with device.placement(), device.autocast():
        kwargs: dict[str, Any] = {}
        attention_prefix = torch.ones(len(part), prefix, dtype=torch.long)
        if prefix:
            with torch.no_grad():
                cache = model(input_ids=torch.tensor([part[0].student_ids[:prefix]]), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(part))
            kwargs["past_key_values"] = cache
        batch = collate([e.student_ids[prefix:] for e in part], [e.student_prompt for e in part], pad_id,
                        offset=prefix)
        logits = model(input_ids=batch.ids, attention_mask=torch.cat([attention_prefix, batch.attention], 1),
                       **kwargs).logits
    return torch.nn.functional.cross_entropy(logits[batch.predicts].float(), batch.targets)


def _epoch_order(n: int, total: int, seed: int) -> list[int]:
    """Seeded per-epoch shuffles of ``range(n)``, concatenated to ``total`` indices."""
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        perm = list(range(n))
        random.Random(f"correct:{seed}:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return order[:total]


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from edgepack.distill.teachers import HF_TOKENIZER_FILES

    for name in (*HF_TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_gguf(folder: Path, cfg: CorrectionConfig, progress: ProgressFn) -> Path:
    """The merged model as a GGUF llama.cpp generates with; the F16 intermediate is removed."""
    from edgepack.export.gguf.convert import convert_hf_to_gguf
    from edgepack.export.gguf.quantize import quantize_gguf

    progress("correct: GGUF", 0, 1)
    f16 = folder / "teacher-F16.gguf"
    convert_hf_to_gguf(folder, f16, "F16")
    final = folder / gguf_name(cfg)
    if cfg.generation_quant != "F16":
        quantize_gguf(f16, final, cfg.generation_quant)
        f16.unlink()
    progress("correct: GGUF", 1, 1)
    return final
