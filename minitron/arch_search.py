"""``minitron.search``: Minitron architecture search (METHOD.md section 3).

1. Enumerate every (layers, heads, FFN, hidden) combination whose analytic parameter
   count lies in ``[budget * (1 - tolerance), budget]``, with at most
   ``max_width_prune`` of each width axis and ``max_depth_prune`` of the layers removed
   (official limits: 40% / 20%).
2. Prune every candidate from ONE importance calibration and measure the validation
   LM loss right after pruning.
3. Retrain each candidate (or the ``top`` best by that loss) briefly with knowledge
   distillation from the unpruned model and measure the validation loss again.
4. Rank by the loss after retraining: the paper found that the ranking right after
   pruning is not reliable (it changes during the first few hundred steps), so both
   rankings are reported.

Parameter counts are exact: the model is instantiated on the meta device with one
and with two layers for each distinct (hidden, FFN, heads) width
(:func:`minitron.sizing.target_parameters`), and every layer count follows linearly
(decoder layers of one model have equal sizes).

Example:
    >>> result = minitron.search(model, calib_texts, train_texts, params=0.5, retrain_steps=200,
    ...                          top=8, eval_data=valid_texts, tokenizer=tok, output_dir="out/search")
    >>> print(result.markdown())
    >>> result.model.save_pretrained("out/best")
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .adapters import get_adapter, kv_heads_of
from .data import load_text_blocks
from .evaluation import lm_loss
from .importance.collect import ImportanceConfig, ImportanceScores, collect_importance
from .models import resolve_tokenizer
from .pruner import loss_scores_for, prune
from .pruning import DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC, Target
from .sizing import count_parameters
from .sizing import target_parameters
from .validate import check_count, check_finite_scores, check_finite_weights, check_seq_len

logger = logging.getLogger(__name__)

AXES = ("hidden", "ffn", "heads", "layers")
AXIS_FIELDS = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
               "layers": "num_hidden_layers"}


@dataclass
class Candidate:
    """One architecture of the search and its measurements.

    Args:
        hidden_size / intermediate_size / num_attention_heads / num_hidden_layers: the architecture.
        params: exact parameter count after pruning.
        loss_pruned: validation LM loss right after pruning (nats/token).
        rank_pruned: 1-based rank by ``loss_pruned`` among all candidates.
        loss_retrained: validation LM loss after ``retrain_steps`` of distillation (None if not retrained).
        rank_retrained: 1-based rank by ``loss_retrained`` among the retrained candidates.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    params: int
    loss_pruned: float | None = None
    rank_pruned: int | None = None
    loss_retrained: float | None = None
    rank_retrained: int | None = None

    @property
    def target(self) -> Target:
        """The :class:`Target` of this candidate."""
        return Target(self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_hidden_layers)

    @property
    def name(self) -> str:
        """Short id, e.g. ``h192-f576-a8-l7``."""
        return f"h{self.hidden_size}-f{self.intermediate_size}-a{self.num_attention_heads}-l{self.num_hidden_layers}"


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
        output_dir: where the table, plot and best checkpoint were written.
        seconds: wall time of the search.
        timings: seconds per phase (``calibration``, ``prune_eval``, ``retrain``).
        files: kind (``csv``, ``json``, ``markdown``, ``plot``, ``best``) -> path written.
    """

    model: nn.Module
    best: Candidate
    candidates: list[Candidate]
    budget: int
    original_params: int
    original_loss: float
    output_dir: Path
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        """The candidate table as markdown (best first by the final ranking)."""
        return markdown_table(self.candidates, self.original_params, self.original_loss, self.budget)


# ---- enumeration -----------------------------------------------------------------------------


def _pow2_divisor(size: int, floor: int = 8) -> int:
    """Power of two nearest to ``size / 32`` (at least ``floor``): ~32 steps over the full width."""
    return max(floor, 2 ** round(math.log2(max(size / 32, 1))))


def default_divisors(config) -> dict[str, int]:
    """Grid step of every axis when ``divisors`` is not given.

    hidden: lcm(num_attention_heads, power of two nearest hidden/32); FFN: power of two nearest
    ffn/32 (at least 8); heads: ``num_key_value_heads``; layers: 1.
    """
    return {
        "hidden_size": math.lcm(int(config.num_attention_heads), _pow2_divisor(int(config.hidden_size))),
        "intermediate_size": _pow2_divisor(int(config.intermediate_size)),
        "num_attention_heads": kv_heads_of(config),
        "num_hidden_layers": 1,
    }


def _normalise_divisors(config, divisors: dict[str, int] | None) -> dict[str, int]:
    out = default_divisors(config)
    for key, value in (divisors or {}).items():
        name = AXIS_FIELDS.get(key, key)
        if name not in out:
            raise ValueError(f"unknown divisor key {key!r}; allowed: {', '.join([*AXIS_FIELDS, *AXIS_FIELDS.values()])}")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"divisor {key}={value!r} must be a positive integer")
        out[name] = value
    out["num_attention_heads"] = math.lcm(out["num_attention_heads"], kv_heads_of(config))
    return out


def axis_values(current: int, max_prune: float, divisor: int, searched: bool) -> list[int]:
    """Allowed sizes of one axis, largest first: ``current`` and multiples of ``divisor`` >= ``current*(1-max_prune)``."""
    if not searched:
        return [current]
    low = current * (1 - max_prune) - 1e-9
    values = {current} | {v for v in range(divisor, current, divisor) if v >= low}
    return sorted(values, reverse=True)


class ParamCounter:
    """Exact parameter counts of pruned configs, cached per width (meta device, 1- and 2-layer models).

    Example:
        >>> counter = ParamCounter(model)
        >>> counter(Target(192, 576, 8, 7)) == target_parameters(model, Target(192, 576, 8, 7))
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._cache: dict[tuple[int, int, int], tuple[int, int]] = {}

    def __call__(self, target: Target) -> int:
        t = target.resolved(self.config)
        key = (t.hidden_size, t.intermediate_size, t.num_attention_heads)
        if key not in self._cache:
            one = target_parameters(self.model, Target(*key, num_hidden_layers=1))
            if self.config.num_hidden_layers >= 2:
                per_layer = target_parameters(self.model, Target(*key, num_hidden_layers=2)) - one
            else:  # a one-layer model: difference to the layer-less model
                per_layer = one - _zero_layer_params(self.model, key)
            self._cache[key] = (one - per_layer, per_layer)
        base, per_layer = self._cache[key]
        return base + t.num_hidden_layers * per_layer


def _zero_layer_params(model: nn.Module, key: tuple[int, int, int]) -> int:
    from .sizing import count_config_parameters

    return count_config_parameters(type(model), Target(*key, num_hidden_layers=0).config_for(model.config))


def _valid(model: nn.Module, target: Target) -> bool:
    """Whether the config class accepts the target (e.g. Llama needs hidden % heads == 0)."""
    try:
        target.validate(model.config)
    except ValueError:
        return False
    return True


def enumerate_candidates(
    model: nn.Module,
    params: float,
    tolerance: float = 0.05,
    *,
    divisors: dict[str, int] | None = None,
    max_width_prune: float = 0.4,
    max_depth_prune: float = 0.2,
    axes: Sequence[str] = AXES,
    counter: ParamCounter | None = None,
) -> tuple[list[Candidate], int]:
    """All architectures within the budget window, largest first.

    Args:
        model: a supported causal LM.
        params: budget, a fraction of the model's parameters if ``<= 1``, else an absolute count.
        tolerance: candidates have ``budget * (1 - tolerance) <= params <= budget``; in ``[0, 1)``.
        divisors: grid step per axis, keyed by axis (``hidden``/``ffn``/``heads``/``layers``) or
            :class:`Target` field name; defaults from :func:`default_divisors`. Heads always stay
            multiples of the KV heads.
        max_width_prune: largest fraction of hidden, FFN and heads removed (each axis).
        max_depth_prune: largest fraction of layers removed.
        axes: axes searched; the others keep the model's size.
        counter: a :class:`ParamCounter` to reuse.
    Returns:
        ``(candidates, budget)`` with ``budget`` the absolute parameter budget.
    Raises:
        ValueError: bad arguments, or no candidate in the window (names the budget and the
            smallest reachable size).

    Example:
        >>> cands, budget = enumerate_candidates(model, 0.5, 0.05)
    """
    get_adapter(model)
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r} must be in [0, 1) (a fraction of the budget, e.g. 0.05)")
    for name, v in (("max_width_prune", max_width_prune), ("max_depth_prune", max_depth_prune)):
        if not 0 <= v < 1:
            raise ValueError(f"{name}={v!r} must be in [0, 1)")
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"axes={list(axes)!r}: allowed axes are {', '.join(AXES)} (at least one)")
    if not isinstance(params, (int, float)) or params <= 0:
        raise ValueError(f"params={params!r} must be a positive fraction (<= 1) or an absolute parameter count")
    counter = counter or ParamCounter(model)
    config = model.config
    total = counter(Target())
    budget = int(params * total) if params <= 1 else int(params)
    low = budget * (1 - tolerance)
    divs = _normalise_divisors(config, divisors)
    grids = {}
    for axis, name in AXIS_FIELDS.items():
        limit = max_depth_prune if axis == "layers" else max_width_prune
        grids[name] = axis_values(int(getattr(config, name)), limit, divs[name], axis in axes)
    out: list[Candidate] = []
    smallest: int | None = None
    for h, f, a, l in itertools.product(*(grids[n] for n in AXIS_FIELDS.values())):
        target = Target(h, f, a, l)
        n = counter(target)
        if not (low <= n <= budget or smallest is None or n < smallest) or not _valid(model, target):
            continue
        smallest = n if smallest is None else min(smallest, n)
        if low <= n <= budget:
            out.append(Candidate(h, f, a, l, n))
    if not out:
        reach = f"the smallest reachable size is {smallest:,} parameters ({smallest / total:.1%})" if smallest else \
            "no valid architecture exists on this grid"
        raise ValueError(
            f"infeasible budget: params={params} means {budget:,} parameters (window {int(low):,}..{budget:,}, "
            f"tolerance {tolerance}) of the model's {total:,}, and no candidate fits; {reach} with at most "
            f"{max_width_prune:.0%} width / {max_depth_prune:.0%} depth pruning on axes {', '.join(axes)}. "
            "Raise the budget or the tolerance, loosen max_width_prune/max_depth_prune, or use finer divisors"
        )
    out.sort(key=lambda c: -c.params)
    return out, budget


# ---- search ----------------------------------------------------------------------------------


def _rank(cands: list[Candidate], loss: str, rank: str) -> None:
    scored = sorted((c for c in cands if getattr(c, loss) is not None), key=lambda c: (getattr(c, loss), -c.params))
    for i, c in enumerate(scored, 1):
        setattr(c, rank, i)


def search(
    model: nn.Module,
    calib_data: Any,
    train_data: Any,
    params: float = 0.5,
    tolerance: float = 0.05,
    retrain_steps: int = 100,
    top: int | None = None,
    *,
    eval_data: Any = None,
    tokenizer: Any = None,
    scores: ImportanceScores | None = None,
    divisors: dict[str, int] | None = None,
    max_width_prune: float = 0.4,
    max_depth_prune: float = 0.2,
    axes: Sequence[str] = AXES,
    distill_config: Any = None,
    output_dir: str | Path = "out/minitron-search",
    seed: int = 0,
    seq_len: int = 256,
    num_samples: int = 1024,
    eval_blocks: int | None = 64,
    batch_size: int = 8,
    importance: ImportanceConfig | None = None,
    keep_candidates: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> SearchResult:
    """Search the best pruned architecture within a parameter budget (Minitron, METHOD.md section 3).

    Args:
        model: a supported ``*ForCausalLM``; left unchanged (it is the distillation teacher).
        calib_data: calibration text/token ids for the one importance calibration (ignored when
            ``scores`` are given).
        train_data: text/token ids for the short distillation of each candidate.
        params: budget, a fraction (<= 1) of the model's parameters or an absolute count.
        tolerance: candidates lie in ``[budget * (1 - tolerance), budget]``.
        retrain_steps: distillation steps per candidate (0 = rank by the loss after pruning only,
            ModelOpt-style; the paper warns that ranking is unreliable).
        top: retrain only the ``top`` candidates with the lowest loss after pruning (None = all).
        eval_data: validation text/token ids; default: the last 10% of the ``train_data`` blocks,
            which are then held out of retraining.
        tokenizer: tokenizer for text data (default: loaded from the model's local path).
        scores: precomputed :class:`ImportanceScores` of ``model``.
        divisors: grid step per axis (see :func:`enumerate_candidates`).
        max_width_prune: largest fraction of each width axis removed (official 0.4).
        max_depth_prune: largest fraction of layers removed (official 0.2).
        axes: axes searched (``hidden``, ``ffn``, ``heads``, ``layers``).
        distill_config: a :class:`minitron.DistillConfig` for retraining; ``steps`` and
            ``output_dir`` are overridden per candidate. Default: lr 1e-4, 10% warmup,
            ``seq_len``/``batch_size`` as here, no intermediate checkpoints.
        output_dir: receives ``candidates.csv``, ``candidates.json``, ``candidates.md``,
            ``losses.png``, ``best/`` (checkpoint + tokenizer) and ``runs/<candidate>/`` (metrics).
        seed: seed of distillation (data order, RNG).
        seq_len: tokens per block for calibration, retraining and evaluation.
        num_samples: calibration blocks.
        eval_blocks: at most this many validation blocks (None = all).
        batch_size: blocks per batch for calibration, evaluation and (default) retraining.
        importance: calibration options (default :class:`ImportanceConfig` with ``batch_size``); the
            loss-based scores of the default criteria (layer-drop losses when layers are searched)
            are switched on.
        keep_candidates: keep every retrained candidate's checkpoint under ``runs/``
            (default: only the best is kept, in ``best/``).
        overwrite: allow an ``output_dir`` that is neither new, empty nor a previous search output;
            the search's files then replace same-named ones and nothing else is deleted.
        progress: progress bars.
        verbose: print the table at the end.
    Returns:
        A :class:`SearchResult`: the best model (pruned + retrained), the table of all candidates
        with both rankings, and the files written.
    Raises:
        ValueError: unsupported model, bad tolerance/limits, infeasible budget, empty data, ``seq_len``
            beyond ``max_position_embeddings``, NaN/inf weights, an unsafe ``output_dir`` (one that is or
            holds an input, or a non-empty directory not written by a search, unless ``overwrite``).

    Example:
        >>> res = minitron.search(model, texts, texts, params=0.5, retrain_steps=50, top=4, tokenizer=tok)
        >>> res.best.name, res.best.loss_retrained
    """
    from .distillation import DistillConfig, distill
    from .outputs import check_output_dir, mark_output_dir, read_marker

    started = time.time()
    get_adapter(model)
    check_count("retrain_steps", retrain_steps, low=0)
    check_count("top", top, allow_none=True)
    check_count("batch_size", batch_size)
    check_seq_len(model, seq_len)
    check_finite_weights(model)
    model_dir = getattr(model.config, "_name_or_path", "")
    check_output_dir(output_dir, "search", inputs=[model_dir, calib_data, train_data, eval_data], overwrite=overwrite,
                     flag="output_dir", fix="overwrite=True")
    counter = ParamCounter(model)
    candidates, budget = enumerate_candidates(
        model, params, tolerance, divisors=divisors, max_width_prune=max_width_prune,
        max_depth_prune=max_depth_prune, axes=axes, counter=counter)
    out = Path(output_dir)
    mark_output_dir(out, "search")
    logger.info("search: %d candidates within %d..%d parameters", len(candidates), budget * (1 - tolerance), budget)
    if verbose:
        print(f"minitron search: {len(candidates)} candidates with {int(budget * (1 - tolerance)):,}..{budget:,} "
              f"parameters (model: {count_parameters(model):,})")

    def blocks_of(data: Any, n: int | None = None) -> torch.Tensor:
        tok = None if isinstance(data, torch.Tensor) else resolve_tokenizer(model, tokenizer)
        return load_text_blocks(data, tok, seq_len, n)

    train_blocks = blocks_of(train_data)
    if eval_data is not None:
        valid = blocks_of(eval_data, eval_blocks)
    else:
        n_hold = max(1, train_blocks.shape[0] // 10)
        if train_blocks.shape[0] - n_hold < 1:
            raise ValueError(f"train_data gives only {train_blocks.shape[0]} block(s) of {seq_len} tokens: pass "
                             "eval_data=... or more training text")
        valid = train_blocks[-n_hold:][:eval_blocks]
        train_blocks = train_blocks[:-n_hold]
    if valid.shape[0] == 0 or train_blocks.shape[0] == 0:
        raise ValueError(f"empty data: need at least one block of {seq_len} tokens of training and validation data")

    timings: dict[str, float] = {}
    t0 = time.time()
    if scores is None:
        # the loss-based scores the default criteria need for the most-pruned heads / layers
        smallest = Target(num_attention_heads=min(c.num_attention_heads for c in candidates),
                          num_hidden_layers=min(c.num_hidden_layers for c in candidates))
        importance = loss_scores_for(importance or ImportanceConfig(batch_size=batch_size), smallest, model.config,
                                     DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC)
        calib = blocks_of(calib_data, num_samples)
        scores = collect_importance(model, calib, importance, progress=progress)
    scores.check_matches(model)
    check_finite_scores(scores)
    timings["calibration"] = round(time.time() - t0, 1)
    t0 = time.time()
    original_loss = lm_loss(model, valid, batch_size)

    # 1) prune every candidate, loss right after pruning
    for c in candidates:
        pruned = prune(model, target=c.target, scores=scores, progress=False, verbose=False)
        c.loss_pruned = lm_loss(pruned, valid, batch_size)
        del pruned
        if verbose:
            print(f"  pruned {c.name:>20} {c.params / 1e6:8.3f}M  val loss {c.loss_pruned:.4f}")
    _rank(candidates, "loss_pruned", "rank_pruned")
    timings["prune_eval"] = round(time.time() - t0, 1)
    t0 = time.time()

    # 2) retrain the top candidates by distillation from the unpruned model
    best: Candidate | None = None
    best_model: nn.Module | None = None
    if retrain_steps > 0:
        chosen = sorted(candidates, key=lambda c: c.rank_pruned)[: top or len(candidates)]
        base = distill_config or DistillConfig(
            lr=1e-4, min_lr=1e-5, warmup_steps=max(1, retrain_steps // 10), seq_len=seq_len, batch_size=batch_size,
            save_every=None, eval_every=None, keep_checkpoints=1, plot=False, seed=seed)
        grad_flags = [p.requires_grad for p in model.parameters()]
        was_training = model.training
        device = next(model.parameters()).device
        try:
            for c in chosen:
                run_dir = out / "runs" / c.name
                if run_dir.exists():  # a previous search's run of this candidate: only ever a distill output
                    if (read_marker(run_dir) or {}).get("kind") != "distill":
                        raise ValueError(f"{run_dir} exists and is not a minitron distillation run; move it away or "
                                         "choose another output_dir")
                    shutil.rmtree(run_dir)
                cfg = DistillConfig(**{**base.to_dict(), "steps": retrain_steps, "output_dir": str(run_dir),
                                       "resume": False, "progress": progress, "seq_len": seq_len})
                student = prune(model, target=c.target, scores=scores, progress=False, verbose=False)
                student = distill(student, model, train_blocks, config=cfg)
                c.loss_retrained = lm_loss(student, valid.to(next(student.parameters()).device), batch_size)
                if verbose:
                    print(f"  retrained {c.name:>17} val loss {c.loss_pruned:.4f} -> {c.loss_retrained:.4f}")
                if best is None or c.loss_retrained < best.loss_retrained:
                    best, best_model = c, student
                if not keep_candidates:
                    shutil.rmtree(run_dir / "final", ignore_errors=True)
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                    (run_dir / "latest").unlink(missing_ok=True)
        finally:
            for p, flag in zip(model.parameters(), grad_flags):
                p.requires_grad_(flag)
            model.train(was_training)
            model.to(device)
        _rank(candidates, "loss_retrained", "rank_retrained")
    else:
        best = min(candidates, key=lambda c: c.rank_pruned)
        best_model = prune(model, target=best.target, scores=scores, progress=False, verbose=False)
    timings["retrain"] = round(time.time() - t0, 1)
    assert best is not None and best_model is not None
    best_model.eval()

    result = SearchResult(best_model, best, candidates, budget, count_parameters(model), original_loss, out,
                          seconds=round(time.time() - started, 1), timings=timings)
    result.files = write_report(result, tokenizer=tokenizer)
    if verbose:
        print(result.markdown())
        print(f"best: {best.name} ({best.params:,} parameters) -> {result.files['best']} "
              f"({result.seconds:.0f} s)")
    return result


# ---- report ----------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(cands: list[Candidate], original_params: int, original_loss: float, budget: int) -> str:
    """Markdown table of the candidates, sorted by the final ranking (retrained first, then by pruned loss)."""
    rows = sorted(cands, key=lambda c: (c.rank_retrained is None, c.rank_retrained or 0, c.rank_pruned or 0))
    lines = [
        f"Budget {budget:,} parameters; unpruned model {original_params:,} parameters, val loss {original_loss:.4f}.",
        "",
        "| candidate | hidden | FFN | heads | layers | params | % | loss pruned | rank pruned | loss retrained | rank retrained |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in rows:
        lines.append(
            f"| {c.name} | {c.hidden_size} | {c.intermediate_size} | {c.num_attention_heads} | {c.num_hidden_layers} | "
            f"{c.params:,} | {100 * c.params / original_params:.1f} | {_fmt(c.loss_pruned)} | {c.rank_pruned or '-'} | "
            f"{_fmt(c.loss_retrained)} | {c.rank_retrained or '-'} |")
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

    Returns:
        Mapping kind -> path written.
    """
    out = result.output_dir
    rows = [{"name": c.name, **asdict(c)} for c in result.candidates]
    files = {"csv": out / "candidates.csv", "json": out / "candidates.json", "markdown": out / "candidates.md",
             "plot": out / "losses.png", "best": out / "best"}
    with files["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files["json"].write_text(json.dumps({
        "budget": result.budget, "original_params": result.original_params, "original_loss": result.original_loss,
        "best": result.best.name, "seconds": result.seconds, "timings": result.timings,
        "candidates": rows}, indent=2), encoding="utf-8")
    files["markdown"].write_text(result.markdown() + "\n", encoding="utf-8")
    _plot(result.candidates, result.original_loss, files["plot"])
    from .atomic import atomic_write_dir

    def save(tmp: Path) -> None:
        result.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_write_dir(files["best"], save)
    return {k: str(v) for k, v in files.items()}
