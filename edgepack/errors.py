"""The one exception hierarchy of edgepack.

Every error a user can cause subclasses :class:`EdgepackError` (and a builtin where one
fits) and carries a ``hint``: the CLI prints ``error: <message>`` and ``hint: <hint>`` on
one line each and exits with ``exit_code``. Library code raises these; it never exits.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base class. ``exit_code`` 2 = bad input, 1 = a check or gate that failed."""

    exit_code: int = 2
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint


class UsageError(EdgepackError, ValueError):
    """An option or argument that cannot be used as given."""


class ProfileError(EdgepackError, ValueError):
    """An unknown profile name or a malformed profile file (every problem listed)."""

    default_hint = "run `edgepack profiles list` for the shipped names, or pass a path to a .toml file"


class DataError(EdgepackError, ValueError):
    """A missing, empty or malformed prompts/holdout file."""

    default_hint = "each line must be a JSON object with a `prompt` string or a `messages` list"


class ModelSourceError(EdgepackError, FileNotFoundError):
    """A teacher/student/artifact path that does not exist or is not a model."""

    default_hint = "pass a local HF model dir, a .gguf file, or builtin:smollm2-135m-instruct"


class ArtifactPathError(ModelSourceError):
    """A path given to run, chat, serve or gate that is missing or not a runnable artifact."""

    default_hint = "pass a .edgepack bundle, a .gguf file or an ONNX folder"


class UnsafeModelError(EdgepackError, PermissionError):
    """A model that would execute code to load (pickle, remote code, template injection)."""

    default_hint = "convert the checkpoint to safetensors, or opt in explicitly if you trust it"


class InvalidModelFile(EdgepackError, ValueError):
    """A model file whose bytes are inconsistent (truncated, bad header, NaN weights)."""

    default_hint = "re-create or re-download the file; it is truncated or corrupted"


class UnsupportedArchitecture(EdgepackError, NotImplementedError):
    """An architecture the exporter has no registry entry for."""


class RunDirError(EdgepackError, ValueError):
    """A run directory missing the output of an earlier stage, or one that would be overwritten."""

    default_hint = "run the earlier stage first, or point --out at a new folder"


class RunDirLocked(RunDirError):
    """Another process is running the same stage on this run directory (edgepack/locks.py)."""

    default_hint = "wait for the other process to finish, or stop it; its lock is released when it exits"


class BundleError(EdgepackError, ValueError):
    """A bundle that fails verification (hash, schema, unsafe member, signature).

    Exit 2: a tampered, truncated or unsigned-when-required bundle is bad input to every
    command that takes one (verify included), not a budget the model missed.
    """

    exit_code = 2
    default_hint = "rebuild the bundle with `edgepack pack`, or re-copy it to the device"


class TeacherEndpointError(EdgepackError, ConnectionError):
    """An endpoint teacher (``openai:URL#MODEL``) that is down, times out or keeps failing.

    Exit 2: the endpoint is input the user named. Answers finished before the failure stay in
    the run's teacher cache, so a rerun resumes.
    """

    default_hint = ("check that the server is up and serves MODEL under URL (the API base, e.g. "
                    "http://host:8000/v1); answers already received are cached and a rerun resumes")


class RemoteError(EdgepackError, ConnectionError):
    """A device reached over ssh (``gate --on ssh://...``) that cannot be reached, refuses the
    key, lacks edgepack, drops the copy or whose gate crashes. Exit 2: nothing was gated there."""

    default_hint = "check `ssh user@host` by hand (host, port, key, known_hosts), then gate again"


class BudgetError(EdgepackError, ValueError):
    """A memory or latency budget that no configuration can meet."""


class RuntimeFailure(EdgepackError, RuntimeError):
    """A backend process that crashed, timed out or produced no output."""

    exit_code = 1


class GateFailed(EdgepackError):
    """A gate verdict other than PASS, raised only where a caller requires PASS."""

    exit_code = 1
    default_hint = "see the gate report; try `edgepack gate --search` for a configuration that fits"
