"""A toy third-party artifact format, registered the way a plugin package registers one.

tests/edgepack/test_formats.py copies this file into a temporary folder as ``edgepack_toy.py``
beside an ``edgepack_toy-0.1.dist-info`` whose ``entry_points.txt`` names :data:`FORMAT` in the
``edgepack.formats`` group, and puts that folder on ``sys.path`` and ``PYTHONPATH``: edgepack
and the gate's child processes find the format exactly as they would find an installed plugin.
Nothing in edgepack knows the name ``toy``.

The model is a byte-level bigram table in a ``.toy`` file (JSON): for each byte, the byte
that most often follows it in a corpus, and :data:`EOS` where none does. Tokens are bytes
(0-255) plus ``EOS``; decoding is greedy from the last token, so it is pure Python and instant.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import InvalidModelFile
from edgepack.formats import Format
from edgepack.progress import ProgressFn
from edgepack.runtime.backends.base import Backend, register_backend

if TYPE_CHECKING:
    from edgepack.profiles import Profile

NAME = "toy"
QUANT = "bigram"
EOS = 256
MAGIC = "edgepack-toy-bigram"
RUNTIME_ALLOWANCE_BYTES = 1 << 20
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")

FORMAT = Format(
    name=NAME, quants=(QUANT,), suffixes=(".toy",), runtime_base_bytes=RUNTIME_ALLOWANCE_BYTES,
    default_quant=QUANT, exact_file_quant=True,
    backend="edgepack_toy", exporter="edgepack_toy:export", artifact_memory="edgepack_toy:artifact_memory",
    trained_context="edgepack_toy:trained_context", file_quant="edgepack_toy:file_quant",
    check_templates="edgepack_toy:check_templates", traffic="edgepack_toy:traffic", payload="edgepack_toy:payload",
)


# --- the file --------------------------------------------------------------------------------
def train(corpus: bytes) -> list[int]:
    """next[t]: the token that most often follows ``t`` in ``corpus`` (EOS ends it); EOS starts it."""
    best: dict[int, tuple[int, int]] = {}  # byte -> (count, -next): the most frequent, then the smallest
    for (a, b), n in Counter(zip(corpus, corpus[1:])).items():
        best[a] = max(best.get(a, (0, 0)), (n, -b))
    table = [EOS] * (EOS + 1)
    for a, (_, neg_b) in best.items():
        table[a] = -neg_b
    table[EOS] = corpus[0] if corpus else EOS
    return table


def write_toy(path: Path, corpus: bytes, *, context_length: int, chat_template: str = TEMPLATE) -> Path:
    """A ``.toy`` file trained on ``corpus``."""
    doc = {"magic": MAGIC, "quant": QUANT, "context_length": context_length, "chat_template": chat_template,
           "next": train(corpus)}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def read_toy(path: Path) -> dict[str, Any]:
    """The checked contents of a ``.toy`` file; InvalidModelFile for anything else."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFile(f"{Path(path).name} is not a toy model: {exc}") from exc
    table = doc.get("next") if isinstance(doc, dict) else None
    if doc.get("magic") != MAGIC or not isinstance(table, list) or len(table) != EOS + 1 \
            or not all(isinstance(t, int) and 0 <= t <= EOS for t in table):
        raise InvalidModelFile(f"{Path(path).name} is not a toy model (bad magic or table)")
    return doc


# --- the runtime backend ---------------------------------------------------------------------
@register_backend(NAME)
class ToyBackend(Backend):
    """Greedy decoding from a bigram table."""

    def __init__(self, doc: dict[str, Any], n_ctx: int) -> None:
        self._next = doc["next"]
        self._template = doc.get("chat_template")
        self._n_ctx = n_ctx

    @classmethod
    def load(cls, path: Path, *, threads: int, n_ctx: int, gpu_layers: int = 0) -> ToyBackend:
        return cls(read_toy(path), n_ctx)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def stop_tokens(self) -> frozenset[int]:
        return frozenset({EOS})

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def info(self) -> dict[str, Any]:
        return {"format": NAME, "library": "edgepack_toy"}

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < EOS else b""

    def generate(self, tokens: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        last = tokens[-1] if tokens else EOS
        for _ in range(max_tokens):
            last = self._next[last]
            if stop_at_eos and last == EOS:
                return
            yield last


# --- the parts the format registry names -----------------------------------------------------
def export(hf_dir: Path, model: str, out: Path, wanted: list[str],
           progress: ProgressFn) -> tuple[list[dict[str, Any]], list[str]]:
    """``<model>-bigram.toy`` trained on the HF dir's ``corpus.txt``."""
    from edgepack.hashing import sha256_file

    path = write_toy(out / f"{model}-{QUANT}.toy", (Path(hf_dir) / "corpus.txt").read_bytes(), context_length=512)
    entry = {"path": path.name, "format": NAME, "quant": QUANT, "bytes": path.stat().st_size,
             "sha256": sha256_file(path)}
    return [entry], [f"toy: bigram table from {Path(hf_dir).name}/corpus.txt"]


def artifact_memory(path: Path, n_ctx: int) -> dict[str, Any]:
    """The table's bytes (no KV cache: a bigram model has no state) plus a 1 MiB allowance."""
    weights = Path(path).stat().st_size
    return {"weights_bytes": weights, "kv_cache_bytes": 0, "runtime_allowance_bytes": RUNTIME_ALLOWANCE_BYTES,
            "total_bytes": weights + RUNTIME_ALLOWANCE_BYTES, "n_ctx": n_ctx,
            "basis": f"toy table {weights} B + allowance {RUNTIME_ALLOWANCE_BYTES} B"}


def trained_context(path: Path) -> int | None:
    """The context the file says it was made for."""
    return read_toy(path).get("context_length")


def file_quant(path: Path) -> str | None:
    """The quantization the file records (always ``bigram``)."""
    return read_toy(path)["quant"]


def check_templates(path: Path, *, strict: bool = True) -> None:
    """The file's chat template, checked in edgepack's sandbox like the built-ins' templates."""
    from edgepack.runtime.chat.check import check_chat_templates

    template = read_toy(path).get("chat_template")
    if template:
        check_chat_templates({"chat_template": template}, render="chat_template", strict=strict, where=Path(path).name)


def traffic(path: Path) -> dict[str, Any]:
    """One table row per decoded token."""
    return {"weight_bytes_per_token": 8, "kv_bytes_per_position": 0, "weight_bytes_total": Path(path).stat().st_size,
            "basis": "toy: one table entry per token"}


def payload(model: Path, model_name: str, profile: Profile) -> dict[str, Any]:
    """The ``.toy`` file alone (byte-level: no tokenizer files) and its runtime facts."""
    from edgepack.runtime.bundle.archive import BundleFile

    doc = read_toy(model)
    runtime = {"backend": "edgepack_toy", "context_length": profile.context_length, "threads": profile.threads,
               "device": profile.device, "memory_estimate": artifact_memory(model, profile.context_length)}
    return {"files": [BundleFile(model.name, model)], "entrypoint": model.name,
            "chat_template": doc.get("chat_template"), "runtime": runtime, "notes": [], "has_tokenizer": True,
            "file_quant": doc["quant"]}
