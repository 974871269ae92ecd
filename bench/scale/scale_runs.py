"""bench/scale's scratch run per size: random-init teacher and student folders beside a copy of a run's data."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from scale_shapes import Shape, llama_config, param_count


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def make_model(folder: Path, shape: Shape, *, seed: int, tokenizer_from: Path, dtype: str) -> int:
    """A random-init model of ``shape`` saved in ``folder`` (``dtype`` on disk) with the tokenizer; its params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_from / "config.json").read_text())
    config = LlamaConfig(**{k: v for k, v in llama_config(shape, base).items() if not k.startswith("_")})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    return n


def make_run(run: Path, shape: Shape, *, data_from: Path, rows: int, tokenizer_from: Path,
             dtype: str) -> dict[str, Any]:
    """RUN/data (first ``rows`` training rows of ``data_from``), RUN/teacher (seed 0), RUN/../init (seed 1)."""
    from edgepack.hashing import sha256_file

    if run.exists():
        shutil.rmtree(run)
    data = run / "data"
    data.mkdir(parents=True)
    lines = (data_from / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if (data_from / "data" / "teacher_context.json").is_file():
        shutil.copy2(data_from / "data" / "teacher_context.json", data / "teacher_context.json")
    t0 = time.perf_counter()
    teacher = run / "teacher"
    n = make_model(teacher, shape, seed=0, tokenizer_from=tokenizer_from, dtype=dtype)
    sha = sha256_file(teacher / "model.safetensors")
    (teacher / "source.json").write_text(json.dumps({
        "spec": f"random-init:{shape.reference}", "kind": "hf", "name": f"random-init-{shape.hidden}x{shape.layers}",
        "sha256": sha, "path": None, "url": None, "model": None, "allow_pickle": False,
        "trust_remote_code": False, "files": sorted(p.name for p in teacher.iterdir())}, indent=2))
    (teacher / ".complete").write_text("ok\n")
    # The copied data report, pointing at this teacher (the source run's may name teacher-corrected).
    source_report = data_from / "data" / "report.json"  # absent in a run made by the tests' fixtures
    report = json.loads(source_report.read_text()) if source_report.is_file() else {}
    report["teacher_dir"] = "teacher"
    report.setdefault("teacher", {})["sha256"] = sha
    (data / "report.json").write_text(json.dumps(report, indent=2))
    (data / ".complete").write_text("ok\n")
    init = run.parent / "init"
    if init.exists():
        shutil.rmtree(init)
    make_model(init, shape, seed=1, tokenizer_from=tokenizer_from, dtype=dtype)
    return {"params": n, "params_formula": param_count(shape, json.loads(
        (tokenizer_from / "config.json").read_text())["vocab_size"]), "rows": len(lines),
        "init_s": round(time.perf_counter() - t0, 1), "weights_on_disk_dtype": dtype}
