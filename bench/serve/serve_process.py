"""``python -m edgepack serve MODEL --port 0 ...`` as a child process, for the serve benchmarks.

Both ``run.py`` (load and overhead) and ``task_fidelity.py`` start the server the same way: on
loopback, a free port read back from its "serving http://..." line, its output in a log file;
:meth:`ServeProcess.stop` sends SIGTERM and waits (then kills).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServeProcess:
    """``edgepack serve`` on a free loopback port (``url``, ``port``, ``start_s`` once started)."""

    def __init__(self, model: Path, log_path: Path, args: list[str], *, start_timeout_s: float = 300.0) -> None:
        self.cmd = [sys.executable, "-m", "edgepack", "serve", str(model), "--port", "0", *args]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        while not (found := re.search(r"serving (http://\S+)", log_path.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() - started > start_timeout_s:
                self.proc.kill()
                raise RuntimeError(f"the server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        self.url = found.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.start_s = time.monotonic() - started

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code
