"""The search's result and its report: markdown table, csv/json/md files, loss plot, best checkpoint."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..outputs import write_output_dir
from ..atomic import fresh_temp_name
from ..owned import replace_owned, write_text_owned
from .space import Candidate

__all__ = ["SEARCH_OUTPUTS", "SearchResult", "markdown_table", "write_report"]

SEARCH_OUTPUTS = ("candidates.csv", "candidates.json", "candidates.md", "losses.png", "best", "runs")
"""The names a search writes in its output directory (checked before the search starts)."""


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Args:
        model: the best candidate, pruned and retrained (a standard HF model).
        best: its :class:`Candidate` row.
        candidates: every candidate, in enumeration order (largest first).
        budget: the parameter budget (absolute).
        original_params: parameters of the unpruned model.
        original_loss: validation LM loss of the unpruned model.
        output_dir: where the table, plot and best checkpoint were written (None: nothing was written).
        seconds: wall time of the search.
        timings: seconds per phase (``calibration``, ``prune_eval``, ``retrain``).
        files: kind (``csv``, ``json``, ``markdown``, ``plot``, ``best``) -> path written (empty without
            ``output_dir``).
    """

    model: nn.Module
    best: Candidate
    candidates: list[Candidate]
    budget: int
    original_params: int
    original_loss: float
    output_dir: Path | None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        """The candidate table as markdown (best first by the final ranking)."""
        return markdown_table(self.candidates, self.original_params, self.original_loss, self.budget)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(cands: list[Candidate], original_params: int, original_loss: float, budget: int) -> str:
    """Markdown table of the candidates, sorted by the final ranking (retrained first, then by pruned loss).

    Args:
        cands: the measured candidates.
        original_params / original_loss: size and validation loss of the unpruned model.
        budget: the absolute parameter budget.
    Returns:
        The table, preceded by one line naming the budget and the unpruned model.
    """
    rows = sorted(cands, key=lambda c: (c.rank_retrained is None, c.rank_retrained or 0, c.rank_pruned or 0))
    # mixture-of-experts columns only when some candidate has that axis
    moe = [(title, f) for title, f in (("experts", "num_experts"), ("expert FFN", "expert_intermediate_size"),
                                       ("shared FFN", "shared_expert_intermediate_size"))
           if any(getattr(c, f) is not None for c in cands)]
    lines = [
        f"Budget {budget:,} parameters; unpruned model {original_params:,} parameters, val loss {original_loss:.4f}.",
        "",
        "| candidate | hidden | FFN | heads | layers | " + "".join(f"{title} | " for title, _ in moe)
        + "params | % | loss pruned | rank pruned | loss retrained | rank retrained |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(moe) + "---:|---:|---:|---:|---:|---:|",
    ]
    for c in rows:
        extra = "".join(f"{'-' if getattr(c, f) is None else getattr(c, f)} | " for _, f in moe)
        lines.append(
            f"| {c.name} | {c.hidden_size} | {c.intermediate_size} | {c.num_attention_heads} | {c.num_hidden_layers} | "
            f"{extra}{c.params:,} | {100 * c.params / original_params:.1f} | {_fmt(c.loss_pruned)} | "
            f"{c.rank_pruned or '-'} | {_fmt(c.loss_retrained)} | {c.rank_retrained or '-'} |")
    return "\n".join(lines)


def _plot(cands: list[Candidate], original_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(cands, key=lambda c: c.rank_pruned or 0)
    x = list(range(len(order)))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(order) + 2), 4.5))
    ax.plot(x, [c.loss_pruned for c in order], "o-", label="after pruning")
    rx = [i for i, c in enumerate(order) if c.loss_retrained is not None]
    if rx:
        ax.plot(rx, [order[i].loss_retrained for i in rx], "s-", label="after retraining")
    ax.axhline(original_loss, color="gray", ls="--", lw=1, label="unpruned")
    ax.set_xticks(x)
    ax.set_xticklabels([c.name for c in order], rotation=70, fontsize=7)
    ax.set_xlabel("candidate (sorted by loss after pruning)")
    ax.set_ylabel("validation LM loss (nats/token)")
    ax.set_title("Minitron search: loss before / after retraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: SearchResult, tokenizer: Any = None) -> dict[str, str]:
    """Write ``candidates.{csv,json,md}``, ``losses.png`` and ``best/`` into ``result.output_dir``.

    Each file replaces its name atomically (a symlink there is replaced, never written through) and
    is recorded in the directory's marker; a ``best/`` that is not minitron's (accepted with
    ``overwrite`` before the search) gets the checkpoint's files by name and keeps every other file.

    Args:
        result: a finished search with an ``output_dir``.
        tokenizer: saved with the best checkpoint when given.
    Returns:
        Mapping kind -> path written.
    Example:
        >>> write_report(result, tok)["best"]
        'out/minitron-search/best'
    """
    if result.output_dir is None:
        raise ValueError("write_report needs result.output_dir")
    out = Path(result.output_dir)
    rows = [{"name": c.name, **c.row()} for c in result.candidates]
    files = {"csv": out / "candidates.csv", "json": out / "candidates.json", "markdown": out / "candidates.md",
             "plot": out / "losses.png", "best": out / "best"}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_owned(out, "candidates.csv", table.getvalue())
    write_text_owned(out, "candidates.json", json.dumps({
        "budget": result.budget, "original_params": result.original_params, "original_loss": result.original_loss,
        "best": result.best.name, "seconds": result.seconds, "timings": result.timings,
        "candidates": rows}, indent=2))
    write_text_owned(out, "candidates.md", result.markdown() + "\n")
    staged = fresh_temp_name(out, ".losses.tmp-", ".png")
    _plot(result.candidates, result.original_loss, staged)
    replace_owned(out, "losses.png", staged)

    def save(tmp: Path) -> None:
        result.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_output_dir(files["best"], "best", save, overwrite=True)
    return {k: str(v) for k, v in files.items()}
