"""The domains shipped with edgepack, run as ``--data builtin:NAME`` (``distill data``, ``pipeline``).

:data:`SHIPPED_DOMAINS` is keyed by the exact NAME: ``demo`` (the default: plant alarm triage into
six labels, ``distill/demo``) and ``workorders`` (maintenance work orders into a JSON object,
``distill/domains/workorders``). A domain is a folder of files and one row here: its training
rows (``seed.jsonl``), its holdout (``holdout.jsonl``), the teacher's worked examples
(``shots.jsonl``), the system prompt and, when the answer is not a label from the rows, the file
of its JSON Schema. distill/data.py turns one into rows, a teacher context and a task; nothing
else asks which domain it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgepack.errors import UsageError
from edgepack.hashing import sha256_file
from edgepack.task import DEMO_LABELS, DEMO_SYSTEM_PROMPT

if TYPE_CHECKING:
    from edgepack.answers import JsonAnswer

_HERE = Path(__file__).resolve().parent
DEMO_DIR = _HERE / "demo"
DEMO_SEED = DEMO_DIR / "seed.jsonl"
DEMO_HOLDOUT = DEMO_DIR / "holdout.jsonl"
DEMO_SHOTS = DEMO_DIR / "shots.jsonl"
DOMAINS_DIR = _HERE / "domains"
BUILTIN_DATA = "builtin:"  # --data builtin:NAME names a shipped domain, as --teacher builtin:NAME a shipped teacher


@dataclass(frozen=True)
class ShippedDomain:
    """A domain shipped with edgepack, run as ``--data builtin:NAME``: a fixed training file
    (``seed.jsonl``) and holdout (``holdout.jsonl``) of ``{"id", "prompt", "reference"}`` rows
    (``label`` too for a labels task), the teacher's worked examples (``shots.jsonl``, the
    reference as the assistant turn), the system prompt every row gets and the answer kind."""

    name: str
    folder: Path
    system_prompt: str | Path
    """The system prompt's text, or the file in ``folder`` that holds it."""
    labels: tuple[str, ...] | None = None
    """A labels task's label set (its rows carry a ``label``)."""
    schema: str | None = None
    """A json task: the file in ``folder`` holding the answer's JSON Schema."""

    @property
    def spec(self) -> str:
        return BUILTIN_DATA + self.name

    @property
    def seed(self) -> Path:
        return self.folder / "seed.jsonl"

    @property
    def holdout(self) -> Path:
        return self.folder / "holdout.jsonl"

    @property
    def shots(self) -> Path:
        return self.folder / "shots.jsonl"

    def system(self) -> str:
        """The system prompt (read from its file, if it has one)."""
        from edgepack.task import read_system_prompt

        if isinstance(self.system_prompt, Path):
            return read_system_prompt(self.folder / self.system_prompt)
        return self.system_prompt

    def answer(self) -> JsonAnswer | None:
        """The answer kind when it is not the rows' labels (a json task's schema), else None."""
        from edgepack.answers import JsonAnswer

        return JsonAnswer.from_file(self.folder / self.schema) if self.schema else None

    def files(self) -> dict[str, str]:
        """The row files' content hashes (part of data/'s identity; the task's hash covers the rest)."""
        return {p.name: sha256_file(p) for p in (self.seed, self.holdout, self.shots)}


# name (exactly as after ``builtin:``) → the domain. Data, not code: a new domain is a folder and a row.
SHIPPED_DOMAINS: dict[str, ShippedDomain] = {
    # plant alarm triage → `Category: <one of six labels>` + `Action: ...` (edgepack/task.py DEMO_TASK)
    "demo": ShippedDomain("demo", DEMO_DIR, DEMO_SYSTEM_PROMPT, labels=DEMO_LABELS),
    # maintenance work orders → {"asset", "fault", "priority", "action"} (distill/domains/workorders/README.md)
    "workorders": ShippedDomain("workorders", DOMAINS_DIR / "workorders", Path("system.txt"), schema="schema.json"),
}
DEMO_DOMAIN = "demo"
"""The domain of a run without ``--data`` (run.toml's ``data`` default, ``builtin:demo``)."""


def shipped_domain(data: Path | str | None) -> ShippedDomain | None:
    """The shipped domain ``data`` names (None: the demo; ``builtin:NAME``: NAME), or None for a
    prompts file. An unknown NAME is a UsageError listing the shipped ones."""
    if data is None:
        return SHIPPED_DOMAINS[DEMO_DOMAIN]
    spec = str(data)
    if not spec.startswith(BUILTIN_DATA):
        return None
    domain = SHIPPED_DOMAINS.get(spec.removeprefix(BUILTIN_DATA))
    if domain is None:
        raise UsageError(f"unknown shipped domain {spec!r}",
                         hint=f"use one of {', '.join(d.spec for d in SHIPPED_DOMAINS.values())}, or a prompts JSONL")
    return domain
