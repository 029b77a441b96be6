"""Loss curve PNG from ``metrics.jsonl`` (matplotlib, Agg backend; skipped with a warning if absent)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from minitron.distillation.metrics import as_float, read_rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete JSON rows of a metrics file (empty list if it does not exist; a crash's partial line skipped)."""
    return read_rows(path)


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Plot training loss (and eval loss / KL to teacher if logged) against step.

    Args:
        metrics_path: ``metrics.jsonl`` written by the trainer.
        out_png: output image path.
    Returns:
        True if the image was written, False if matplotlib is missing or there is nothing to plot.
    Example:
        >>> plot_loss_curve("run/metrics.jsonl", "run/loss_curve.png")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the loss-curve plot (pip install matplotlib)")
        return False
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [as_float(r["loss"]) for r in train], label="train loss", lw=1)
    for key, label in (("lm_loss", "eval LM loss"), ("kl_to_teacher", "eval KL to teacher")):
        pts = [(r["step"], as_float(r[key])) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True
