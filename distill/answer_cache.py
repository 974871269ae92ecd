"""The on-disk cache of teacher answers (``RUN/cache/teacher``): a rerun never pays twice.

Every teacher answer, local (GGUF, HF) or from an endpoint, is stored as one JSON file named
by the sha256 of what decides it: the teacher's identity, the decoding parameters, the
messages and whatever else the generator names (an endpoint's ``top_logprobs``). Files are
written atomically (edgepack.atomic), so answers finished before a crash or a kill are kept
and a rerun of ``distill data`` asks the teacher only for the missing ones. An entry that is
unreadable, of another schema or of another key counts as missing and is replaced; so does
one holding NaN or Infinity (not JSON; a cache written before endpoint logprobs were checked
may hold them), and entries are written as strict JSON.

Used by endpoint.py (:class:`EndpointTeacher`) and generate.py (:class:`CachedGenerator`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.atomic import write_text

if TYPE_CHECKING:
    from edgepack.distill.generate import Generation, Messages

CACHE_SCHEMA = 1


def answer_key(teacher: str, decoding: dict[str, Any], messages: Messages, **extra: Any) -> str:
    """sha256 of what decides an answer: teacher identity, decoding parameters, messages, ``extra``."""
    blob = json.dumps({"teacher": teacher, "decoding": decoding, "messages": messages, **extra},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class AnswerCache:
    """One folder of cached answers, with hit and miss counters (thread safe)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # counters, and atomic_path's temporary name is per process

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Generation | None:
        """The cached answer for ``key``, or None (counted as a miss)."""
        found = self._read(key)
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        return found

    def put(self, key: str, gen: Generation, *, teacher: str, request: dict[str, Any]) -> None:
        """Store ``gen`` atomically. ``request`` is what was asked (never credentials)."""
        entry = {"schema": CACHE_SCHEMA, "key": key, "teacher": teacher, "request": request,
                 "generation": asdict(gen)}
        text = json.dumps(entry, indent=2, allow_nan=False, default=str) + "\n"  # ValueError on NaN
        with self._lock:
            write_text(self.path(key), text)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses}

    def _read(self, key: str) -> Generation | None:
        from edgepack.distill.generate import Generation

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
            if entry.get("schema") != CACHE_SCHEMA or entry.get("key") != key:
                return None
            return Generation.from_dict(entry["generation"])
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return None  # unreadable entry: ask again; the fresh answer replaces it atomically


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
