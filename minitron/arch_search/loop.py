"""``minitron.search``: Minitron architecture search (docs/method.md section 3).

1. Enumerate every (layers, heads, FFN, hidden) combination (mixture-of-experts models: also
   experts, expert FFN and shared-expert FFN) whose exact parameter count lies in
   ``[budget * (1 - tolerance), budget]``, with at most ``max_width_prune`` of each width axis and
   ``max_depth_prune`` of the layers removed (official limits: 40% / 20%) (:mod:`.space`).
2. Prune every candidate from ONE importance calibration and measure the validation LM loss right
   after pruning.
3. Retrain each candidate (or the ``top`` best by that loss) briefly with knowledge distillation
   from the unpruned model and measure the validation loss again.
4. Rank by the loss after retraining: the paper found that the ranking right after pruning is not
   reliable (it changes during the first few hundred steps), so both rankings are reported
   (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..offload import refuse_offloaded
from ..data import load_text_blocks, resolve_seq_len
from ..evaluation import lm_loss
from ..importance.collect import ImportanceConfig, ImportanceScores, collect_importance
from ..models import resolve_tokenizer
from ..pruner import loss_scores_for, prune
from ..pruning import DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC, Target
from ..pruning.params import count_parameters
from ..validate import check_finite_scores, check_finite_weights
from .config import SearchConfig
from .report import SEARCH_OUTPUTS, SearchResult, write_report
from .space import Candidate, ParamCounter, enumerate_candidates

__all__ = ["search"]

logger = logging.getLogger(__name__)


def _rank(cands: list[Candidate], loss: str, rank: str) -> None:
    scored = sorted((c for c in cands if getattr(c, loss) is not None), key=lambda c: (getattr(c, loss), -c.params))
    for i, c in enumerate(scored, 1):
        setattr(c, rank, i)


def search(
    model: nn.Module,
    calib_data: Any,
    train_data: Any,
    params: float = 0.5,
    config: SearchConfig | None = None,
    *,
    eval_data: Any = None,
    tokenizer: Any = None,
    scores: ImportanceScores | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Search the best pruned architecture within a parameter budget (Minitron, docs/method.md section 3).

    Args:
        model: a supported ``*ForCausalLM``; left unchanged (it is the distillation teacher).
        calib_data: calibration text/token ids for the one importance calibration (ignored when
            ``scores`` are given).
        train_data: text/token ids for the short distillation of each candidate.
        params: budget, a fraction (<= 1) of the model's parameters or an absolute count.
        config: the search options (:class:`SearchConfig`: tolerance, retraining steps, top,
            grid, limits, block sizes, calibration and distillation options); default ``SearchConfig()``.
        eval_data: validation text/token ids; default: the last 10% of the ``train_data`` blocks,
            which are then held out of retraining.
        tokenizer: tokenizer for text data (default: the model's own, found locally).
        scores: precomputed :class:`ImportanceScores` of ``model``.
        output_dir: if given, receives ``candidates.csv``, ``candidates.json``, ``candidates.md``,
            ``losses.png``, ``best/`` (checkpoint + tokenizer) and ``runs/<candidate>/`` (metrics).
            Without it nothing is written (retraining runs in a temporary directory).
        overwrite: allow an ``output_dir`` that is neither new, empty nor a previous search output;
            the search's files then replace same-named ones and nothing else is deleted.
        progress: progress bars.
    Returns:
        A :class:`SearchResult`: the best model (pruned + retrained), the table of all candidates
        with both rankings, and the files written.
    Raises:
        ValueError: unsupported model, bad tolerance/limits, infeasible budget, empty data, ``seq_len``
            beyond ``max_position_embeddings``, NaN/inf weights, an unsafe ``output_dir`` (one that is or
            holds an input, or a non-empty directory not written by a search, unless ``overwrite``).

    Example:
        >>> res = minitron.search(model, texts, texts, params=0.5, tokenizer=tok, output_dir="out/search",
        ...                       config=minitron.SearchConfig(retrain_steps=50, top=4))
        >>> print(res.markdown())
        >>> res.model.save_pretrained("out/best")
    """
    from ..outputs import check_output_dir, mark_output_dir
    from ..owned import unowned

    cfg = config or SearchConfig()
    started = time.time()
    get_adapter(model)
    refuse_offloaded(model, "minitron.search")  # candidates are pruned and trained in memory
    cfg = dataclasses.replace(cfg, seq_len=resolve_seq_len(train_data, cfg.seq_len, [model]))
    check_finite_weights(model)
    if output_dir is not None:
        model_dir = getattr(model.config, "_name_or_path", "")
        check_output_dir(output_dir, "search", inputs=[model_dir, calib_data, train_data, eval_data],
                         overwrite=overwrite, flag="output_dir", fix="overwrite=True", writes=SEARCH_OUTPUTS)
        foreign = unowned(output_dir, "runs")  # the candidates' run folders are rewritten: never a user's
        if foreign:
            raise ValueError(f"output_dir {output_dir} holds {foreign[0]}, which is not part of a minitron "
                             f"distillation run; move {Path(output_dir) / 'runs'} away or choose another output_dir")
    candidates, budget = enumerate_candidates(
        model, params, cfg.tolerance, divisors=cfg.divisors, max_width_prune=cfg.max_width_prune,
        max_depth_prune=cfg.max_depth_prune, axes=cfg.axes, counter=ParamCounter(model))
    if output_dir is not None:
        mark_output_dir(output_dir, "search")
    logger.info("minitron search: %d candidates with %s..%s parameters (model: %s)", len(candidates),
                f"{int(budget * (1 - cfg.tolerance)):,}", f"{budget:,}", f"{count_parameters(model):,}")

    train_blocks, valid = _train_and_valid_blocks(model, tokenizer, train_data, eval_data, cfg)
    timings: dict[str, float] = {}
    t0 = time.time()
    scores = _calibrate(model, tokenizer, calib_data, scores, candidates, cfg, progress)
    timings["calibration"] = round(time.time() - t0, 1)
    t0 = time.time()
    original_loss = lm_loss(model, valid, cfg.batch_size)

    # 1) prune every candidate, loss right after pruning
    for c in candidates:
        pruned = prune(model, target=c.target, scores=scores, progress=False, verbose=False)
        # exact already, except a depth-pruned candidate of a model that mixes sparse and dense MLP
        # layers: counted as the larger of its possible sizes until its layers were chosen
        c.params = count_parameters(pruned)
        c.loss_pruned = lm_loss(pruned, valid, cfg.batch_size)
        del pruned
        logger.info("  pruned %20s %8.3fM  val loss %.4f", c.name, c.params / 1e6, c.loss_pruned)
    _rank(candidates, "loss_pruned", "rank_pruned")
    timings["prune_eval"] = round(time.time() - t0, 1)
    t0 = time.time()

    # 2) retrain the top candidates by distillation from the unpruned model
    if cfg.retrain_steps > 0:
        if output_dir is not None:
            best, best_model = _retrain(model, candidates, scores, train_blocks, valid, cfg, Path(output_dir), progress)
        else:
            with tempfile.TemporaryDirectory(prefix="minitron-search-") as tmp:
                best, best_model = _retrain(model, candidates, scores, train_blocks, valid, cfg, Path(tmp), progress)
        _rank(candidates, "loss_retrained", "rank_retrained")
    else:
        best = min(candidates, key=lambda c: c.rank_pruned)
        best_model = prune(model, target=best.target, scores=scores, progress=False, verbose=False)
    timings["retrain"] = round(time.time() - t0, 1)
    best_model.eval()

    result = SearchResult(best_model, best, candidates, budget, count_parameters(model), original_loss,
                          None if output_dir is None else Path(output_dir),
                          seconds=round(time.time() - started, 1), timings=timings)
    if output_dir is not None:
        result.files = write_report(result, tokenizer=tokenizer)
    logger.info("best: %s (%s parameters) (%.0f s)", best.name, f"{best.params:,}", result.seconds)
    return result


def _blocks(model: nn.Module, tokenizer: Any, data: Any, seq_len: int, n: int | None = None) -> torch.Tensor:
    """(n, seq_len) token blocks of ``data`` (text is tokenised with ``tokenizer`` or the model's own)."""
    tok = None if isinstance(data, torch.Tensor) else resolve_tokenizer(model, tokenizer)
    return load_text_blocks(data, tok, seq_len, n)


def _train_and_valid_blocks(model: nn.Module, tokenizer: Any, train_data: Any, eval_data: Any,
                            cfg: SearchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Retraining blocks and validation blocks (the tail 10% of ``train_data`` when ``eval_data`` is None)."""
    train_blocks = _blocks(model, tokenizer, train_data, cfg.seq_len)
    if eval_data is not None:
        valid = _blocks(model, tokenizer, eval_data, cfg.seq_len, cfg.eval_blocks)
    else:
        n_hold = max(1, train_blocks.shape[0] // 10)
        if train_blocks.shape[0] - n_hold < 1:
            raise ValueError(f"train_data gives only {train_blocks.shape[0]} block(s) of {cfg.seq_len} tokens: pass "
                             "eval_data=... or more training text")
        valid = train_blocks[-n_hold:][: cfg.eval_blocks]
        train_blocks = train_blocks[:-n_hold]
    if valid.shape[0] == 0 or train_blocks.shape[0] == 0:
        raise ValueError(f"empty data: need at least one block of {cfg.seq_len} tokens of training and validation data")
    return train_blocks, valid


def _calibrate(model: nn.Module, tokenizer: Any, calib_data: Any, scores: ImportanceScores | None,
               candidates: list[Candidate], cfg: SearchConfig, progress: bool) -> ImportanceScores:
    """The one importance calibration every candidate is pruned from (checked when given)."""
    if scores is None:
        # the loss-based scores the default criteria need for the most-pruned heads / layers
        smallest = Target(num_attention_heads=min(c.num_attention_heads for c in candidates),
                          num_hidden_layers=min(c.num_hidden_layers for c in candidates))
        importance = loss_scores_for(cfg.importance or ImportanceConfig(batch_size=cfg.batch_size), smallest,
                                     model.config, DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC)
        calib = _blocks(model, tokenizer, calib_data, cfg.seq_len, cfg.num_samples)
        scores = collect_importance(model, calib, importance, progress=progress)
    scores.check_matches(model)
    check_finite_scores(scores)
    return scores


def _retrain(teacher: nn.Module, candidates: list[Candidate], scores: ImportanceScores, train_blocks: torch.Tensor,
             valid: torch.Tensor, cfg: SearchConfig, out: Path, progress: bool) -> tuple[Candidate, nn.Module]:
    """Distil the ``cfg.top`` best-after-pruning candidates from ``teacher`` into ``out/runs/<name>``.

    Returns:
        The candidate with the lowest validation loss after retraining, and its model. The teacher's
        train/eval mode, ``requires_grad`` flags and device are restored.
    """
    from ..distillation import DistillConfig, distill
    from ..distillation.run_dir import drop_weights
    from ..outputs import read_marker

    chosen = sorted(candidates, key=lambda c: c.rank_pruned)[: cfg.top or len(candidates)]
    base = cfg.distill or DistillConfig(
        lr=1e-4, min_lr=1e-5, warmup_steps=max(1, cfg.retrain_steps // 10), seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, save_every=None, eval_every=None, keep_checkpoints=1, plot=False, seed=cfg.seed)
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training
    device = next(teacher.parameters()).device
    best: Candidate | None = None
    best_model: nn.Module | None = None
    try:
        for c in chosen:
            run_dir = out / "runs" / c.name
            # a previous search's run of this candidate: distill(resume=False) removes only its own files
            if run_dir.is_symlink() or (run_dir.exists() and (read_marker(run_dir) or {}).get("kind") != "distill"):
                raise ValueError(f"{run_dir} exists and is not a minitron distillation run; move it away or "
                                 "choose another output_dir")
            run_cfg = DistillConfig(**{**base.to_dict(), "steps": cfg.retrain_steps, "output_dir": str(run_dir),
                                       "resume": False, "progress": progress, "seq_len": cfg.seq_len})
            student = prune(teacher, target=c.target, scores=scores, progress=False, verbose=False)
            student = distill(student, teacher, train_blocks, config=run_cfg)
            c.loss_retrained = lm_loss(student, valid.to(next(student.parameters()).device), cfg.batch_size)
            logger.info("  retrained %17s val loss %.4f -> %.4f", c.name, c.loss_pruned, c.loss_retrained)
            if best is None or c.loss_retrained < best.loss_retrained:
                best, best_model = c, student
            if not cfg.keep_candidates:
                drop_weights(run_dir)
    finally:
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)
        teacher.train(was_training)
        teacher.to(device)
    assert best is not None and best_model is not None
    return best, best_model
