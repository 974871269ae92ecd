"""Third-party output goes to a log file, not the terminal.

A command wraps its work in :func:`stage_log`. For its duration, python ``logging`` records
(onnxruntime's quantizer, optimum, transformers), ``warnings`` (torch's TracerWarning, ...)
and edgepack's progress lines are written to ``RUN/logs/<stage>.log``, or, for a command
without a run directory, to a temporary file whose path is printed once if the command fails
(and which is deleted when it succeeds). onnxruntime's C++ logger is set to errors only, and
transformers' and tqdm's progress bars are off, since they write carriage returns.

``EDGEPACK_DEBUG=1`` or ``edgepack -v`` (:func:`set_verbose`) also shows all of it on stderr.
Everything is configured through the libraries' public switches and restored on exit; nothing
happens at import time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from edgepack.constants import LOGS_DIR

PROGRESS_LOGGER = "edgepack.progress"  # progress lines; written to the stage log only, never echoed twice
_FORMAT = "%(asctime)s %(name)s [%(levelname)s] %(message)s"
_ORT_ERROR = 3                         # onnxruntime severity: 0 verbose, 1 info, 2 warning, 3 error
_ORT_WARNING = 2
# Libraries whose logging module keeps its own stderr handler (transformers' design, which
# optimum copies): (package, module with disable_default_handler / enable_propagation).
HF_STYLE_LOGGING = (("transformers", "transformers.utils.logging"), ("optimum", "optimum.utils.logging"))
_state: dict[str, bool] = {"verbose": False}


def set_verbose(on: bool) -> None:
    """Show third-party output on stderr as well (``edgepack -v``)."""
    _state["verbose"] = on


def is_verbose() -> bool:
    """True with ``-v`` or ``EDGEPACK_DEBUG=1``."""
    return _state["verbose"] or os.environ.get("EDGEPACK_DEBUG") == "1"


def stage_log_path(stage: str, run_dir: Path | None) -> Path:
    """``RUN/logs/<stage>.log``, or a per-process temporary file without a run directory."""
    if run_dir is not None:
        return Path(run_dir) / LOGS_DIR / f"{stage}.log"
    return Path(tempfile.gettempdir()) / f"edgepack-{stage}-{os.getpid()}.log"


class _StageFileHandler(logging.FileHandler):
    """Appends to the log, creating its folder (and a header line) only at the first record,
    so a command that fails on bad input before anything is logged writes nothing."""

    def __init__(self, path: Path, stage: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.stage = stage

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        stream = super()._open()
        stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} edgepack {' '.join(sys.argv[1:])}\n")
        return stream


@contextmanager
def stage_log(stage: str, run_dir: Path | None = None, *, hf_logging: bool = True) -> Iterator[Path]:
    """Route third-party logs, warnings and progress lines of ``stage`` to its log file.

    Yields the log's path. On an exception the path is printed once (when anything was
    written) and the exception propagates unchanged. ``hf_logging=False``: a stage that never
    loads transformers or optimum in its own process (the gate) leaves their logging alone, since
    rerouting it imports them (about 2 s with torch, and absent from the lean runtime install).
    """
    path = stage_log_path(stage, run_dir)
    handler = _StageFileHandler(path, stage)
    handler.setFormatter(logging.Formatter(_FORMAT))
    verbose = is_verbose()
    try:
        with ExitStack() as stack:
            stack.enter_context(_root_handlers(handler, verbose))
            stack.enter_context(_progress_logger(handler))
            stack.enter_context(_captured_warnings())
            stack.callback(_quiet_libraries(verbose, hf_logging))
            yield path
    except BaseException:
        handler.close()
        if path.is_file() and path.stat().st_size:
            from edgepack.console import err

            err.print(f"[dim]log of this {stage}: {path}[/dim]", highlight=False, soft_wrap=True)
        raise
    handler.close()
    if run_dir is None:
        path.unlink(missing_ok=True)


@contextmanager
def _root_handlers(handler: logging.Handler, verbose: bool) -> Iterator[None]:
    """The root logger writes to the stage log (and stderr when verbose) instead of its own handlers.

    A root logger that already has a handler also makes ``logging.basicConfig`` at a library's
    import (onnxruntime's quantizer does it) a no-op.
    """
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers = [handler]
    if verbose:
        echo = logging.StreamHandler(sys.stderr)
        echo.setFormatter(logging.Formatter(_FORMAT))
        root.handlers.append(echo)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, level = saved
        root.setLevel(level)


@contextmanager
def _progress_logger(handler: logging.Handler) -> Iterator[None]:
    """Progress lines go to the stage log only: the terminal already shows them once."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers, logger.propagate, level = saved
        logger.setLevel(level)


@contextmanager
def _captured_warnings() -> Iterator[None]:
    """``warnings.warn`` becomes a ``py.warnings`` log record (logging.captureWarnings)."""
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)


def _quiet_libraries(verbose: bool, hf_logging: bool = True) -> Callable[[], None]:
    """Turn off transformers' own stderr handler and bars, tqdm and onnxruntime's C++ log; return the undo."""
    undo: list[Callable[[], None]] = []
    if not verbose and "tqdm" not in sys.modules:  # tqdm reads TQDM_* defaults once, at import
        previous = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loader uses tqdm directly
        undo.append(lambda: _restore_env("TQDM_DISABLE", previous))
    for package, module in HF_STYLE_LOGGING if hf_logging else ():
        if importlib.util.find_spec(package) is not None:
            undo.append(_reroute_hf_logging(importlib.import_module(module), verbose))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(_ORT_WARNING if verbose else _ORT_ERROR)
        undo.append(lambda: onnxruntime.set_default_logger_severity(_ORT_WARNING))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _reroute_hf_logging(hf_logging: Any, verbose: bool) -> Callable[[], None]:
    """Drop a library's own stderr handler and let its records propagate to the root logger."""
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    if bars and not verbose:
        hf_logging.disable_progress_bar()

    def undo() -> None:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        if bars and not verbose:
            hf_logging.enable_progress_bar()

    return undo


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def log_progress(line: str) -> None:
    """Write one progress line to the current stage log (a no-op outside :func:`stage_log`)."""
    logging.getLogger(PROGRESS_LOGGER).info(line)


def run_dir_of(path: Path, depth: int = 3) -> Path | None:
    """The run directory ``path`` is or lies in (``RUN/artifacts/x.gguf`` → ``RUN``), else None."""
    from edgepack.constants import RUN_TOML

    path = Path(path).resolve()
    for folder in [path, *path.parents][:depth + 1]:
        if (folder / RUN_TOML).is_file():
            return folder
    return None
