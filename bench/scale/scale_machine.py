"""bench/scale's view of the machine while it measures: log lines, load, available memory, peak RSS."""

from __future__ import annotations

import os
import sys
import time


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def available_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_mb() -> float:
    from edgepack.export.gate.measure import _peak_rss_mb

    return round(_peak_rss_mb(), 1)
