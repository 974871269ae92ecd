"""Builders for runtime tests: GGUF copies with edited metadata, byte-level GGUF mutations,
hand-made tar files for the bundle verifier, and small profile files."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path
from typing import Any

PROFILE_TOML = """\
name = "{name}"
description = "test profile"

[device]
kind = "{device}"
arch = "{arch}"
threads = {threads}
memory_budget_mb = {memory_budget_mb}
{gpu}
[deploy]
choices = {choices}
context_length = {context_length}

[latency]
prompt_tokens = {prompt_tokens}
ttft_p95_ms = {ttft_p95_ms}
min_decode_tokens_per_s = {min_decode_tokens_per_s}

[quality]
min_relative_quality = {min_relative_quality}

[training]
device = "cpu"
memory_mb = 4096
"""


def write_profile(folder: Path, name: str, **overrides: Any) -> Path:
    """A profile TOML in ``folder`` (defaults: an x86 CPU, 1 thread, generous budgets).

    One thread: on a shared 2-core CI box, llama.cpp's two threads spin on each other
    whenever another process takes a core, and runs slow down tenfold.
    """
    values: dict[str, Any] = dict(name=name, device="cpu", arch="x86_64", threads=1, memory_budget_mb=4096,
                                  choices='["gguf:Q8_0", "gguf:F16"]', context_length=256, prompt_tokens=32,
                                  ttft_p95_ms=60000, min_decode_tokens_per_s=0.5, min_relative_quality=0.5,
                                  gpu="")
    values.update(overrides)
    if values["device"] != "cpu" and not values["gpu"]:
        values["gpu"] = "gpu_memory_mb = 4096\n"
    path = Path(folder) / f"{name}.toml"
    path.write_text(PROFILE_TOML.format(**values))
    return path


def rewrite_gguf(src: Path, dst: Path, overrides: dict[str, Any]) -> Path:
    """Copy a GGUF with some string metadata replaced or added (gguf-py, as gguf_new_metadata)."""
    import gguf

    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(dst, overrides.get("general.architecture", arch))
    pending = dict(overrides)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = pending.pop(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for key, value in pending.items():
        if key != "general.architecture":
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


def gguf_offsets(path: Path) -> dict[str, int]:
    """Byte offsets of interesting places in a GGUF (via gguf-py's reader)."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    first = r.tensors[0].field
    # tensor info parts: name_len, name, n_dims, dims, type, offset
    parts_offsets = []
    off = first.offset
    for part in first.parts:
        parts_offsets.append(off)
        off += part.nbytes
    tokens = r.fields["tokenizer.ggml.tokens"]
    tok_off = tokens.offset
    key_parts = tokens.parts
    # key_len, key, type, elem_type, count, ...
    count_off = tok_off + sum(p.nbytes for p in key_parts[:4])
    tmpl = r.fields["tokenizer.chat_template"]
    tmpl_len_off = tmpl.offset + sum(p.nbytes for p in tmpl.parts[:3])
    return {"n_tensors": 8, "n_kv": 16, "tensor0_n_dims": parts_offsets[2], "tensor0_type": parts_offsets[4],
            "tensor0_offset": parts_offsets[5], "tokens_elem_type": tok_off + sum(p.nbytes for p in key_parts[:3]),
            "tokens_count": count_off, "template_len": tmpl_len_off, "data": r.data_offset}


def patch(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


def tar_member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = 0o644
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


HOLDOUT_ROWS = [
    {"id": "h1", "messages": [{"role": "user", "content": "Pump P-101 bearing noise and vibration."}],
     "response": "Category: mechanical\nAction: Inspect the bearings.", "label": "mechanical", "reference": None},
    {"id": "h2", "messages": [{"role": "user", "content": "Motor starter contacts are burnt."}],
     "response": "Category: electrical\nAction: Replace the contacts.", "label": "electrical", "reference": None},
]


def tiny_task() -> Any:
    """The demo's contract with a one-line system prompt: the gate prepends it to every holdout
    row, and the demo's own prompt (~450 tokens) does not fit the tiny profiles' 256-token context."""
    from dataclasses import replace

    from edgepack.task import DEMO_TASK

    return replace(DEMO_TASK, system_prompt="Name the alarm's category.")


def make_run_dir(run: Path, student_src: Path, profiles: list[Path], *, quants: tuple[str, ...] = ("Q8_0",),
                 task: Any = None, write_task: bool = True) -> Path:
    """A real run directory from the tiny model: every stage's files as the stages write them,
    artifacts exported by edgepack's own exporter and gated for each profile by the real gate.

    Distillation itself is not run (the tiny random model stands in for a trained student);
    its reports are small but have the shape the distill stage writes. ``task``: the RUN/task.json
    ``distill data`` would write (default :func:`tiny_task`; none with ``write_task=False``).
    """
    import json
    import shutil

    from edgepack.atomic import write_json
    from edgepack.constants import COMPLETE_MARKER, GATE_DIR
    from edgepack.export.api import export_model
    from edgepack.profiles import load_profile
    from edgepack.runconfig import write_run_config
    from edgepack.export.gate.gate import run_gate

    run.mkdir(parents=True)
    write_run_config(run, {"profile": load_profile(str(profiles[0])).name, "teacher": "builtin:smollm2-135m-instruct",
                           "data": "builtin:demo", "seed": 0})
    (run / "teacher").mkdir()
    write_json(run / "teacher" / "source.json", {"spec": "builtin:smollm2-135m-instruct", "kind": "builtin",
                                                 "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "ab" * 32,
                                                 "license": "apache-2.0"})
    (run / "teacher" / COMPLETE_MARKER).write_text("ok\n")
    shutil.copytree(student_src, run / "student")
    write_json(run / "student" / "student.json", {"architecture": "LlamaForCausalLM", "layers": 2, "hidden": 64})
    write_json(run / "student" / "train_report.json", {"steps": 0, "note": "tiny test student, not trained"})
    (run / "student" / COMPLETE_MARKER).write_text("ok\n")
    (run / "data").mkdir()
    (run / "data" / "holdout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HOLDOUT_ROWS))
    write_json(run / "data" / "report.json", {"kept": 2, "dropped": 0})
    (run / "data" / COMPLETE_MARKER).write_text("ok\n")
    if write_task:
        from edgepack.task import save_task

        save_task(task or tiny_task(), run / "task.json")
    export = export_model(source=run, fmt="gguf", quants=list(quants), out_dir=None)
    for path in (run / "artifacts" / a["path"] for a in export["artifacts"]):
        for i, profile_path in enumerate(profiles):
            profile = load_profile(str(profile_path))
            report = run_gate(artifact=path, profile=profile, holdout=run / "data" / "holdout.jsonl")
            # RUN/gate/<artifact>.json as the pipeline writes it; extra profiles get their own file.
            name = f"{path.name}.json" if i == 0 else f"{path.name}.{profile.name}.json"
            write_json(run / GATE_DIR / name, report)
    return run


def task_bundle(tiny_gguf: Path, path: Path, task: Any, *, n_ctx: int = 512) -> Path:
    """A bundle of the tiny GGUF (gate status PASS) carrying ``task`` (a Task, or None for none)."""
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.bundle.archive import BundleFile, write_bundle
    from edgepack.runtime.memory import estimate_gguf_memory

    manifest = {"schema_version": 1, "model": "tiny", "format": "gguf", "quant": "F16", "profile": {"name": "t"},
                "entrypoint": "tiny-F16.gguf", "files": [], "gate_status": "PASS",
                "runtime": {"context_length": n_ctx, "threads": 1,
                            "memory_estimate": estimate_gguf_memory(read_gguf(tiny_gguf), n_ctx)}}
    if task is not None:
        manifest["task"] = task.to_json()
    write_bundle(path, manifest, [BundleFile("tiny-F16.gguf", tiny_gguf)])
    return path
