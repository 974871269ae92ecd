"""The training loss curve as a PNG (``RUN/student/loss_curve.png``), written with the student.

Total loss, its KD and cross-entropy parts, and the learning rate per optimizer step, from
the ``loss_curve`` history training records (train_report.json holds the same numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.atomic import atomic_path


def loss_curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot ``history`` (dicts with step, loss, kd, ce, lr) to ``path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, [h["loss"] for h in history], "-o", markersize=2, label="loss")
    if any(h.get("kd") for h in history):
        ax.plot(steps, [h["kd"] for h in history], "--", label="KD term")
    ax.plot(steps, [h["ce"] for h in history], ":", label="cross-entropy on teacher tokens")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per answer token)")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], color="grey", alpha=0.4, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
