"""The options of :func:`minitron.prune` (:class:`PruneConfig`), checked when the config is built.

The *what* of a prune is a :class:`~minitron.pruning.target.Target` (or a ``params=`` budget); the
*how* (calibration size, criteria, folds, the random baseline) is a :class:`PruneConfig`, in the
style of torchao's per-verb configs. Every field is validated in ``__post_init__``, so a bad option
is refused before any data is read or any forward pass runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..importance.collect import DEFAULT_DEPTH_METRIC, DEPTH_METRICS, ImportanceConfig
from ..importance.heads import DEFAULT_HEAD_METRIC, check_head_metric
from ..validate import check_count
from .plan import DEFAULT_HEAD_RESIDUAL, DEFAULT_NORM_RESCALE, DEPTH_MODES
from .target import check_divisors

__all__ = ["LEGACY_PRUNE_KWARGS", "METHODS", "PruneConfig", "config_from_legacy"]

METHODS = ("activation", "random")

# the keyword arguments minitron.prune took before PruneConfig; each still works as an override of config
# (with a DeprecationWarning); batch_agg and importance go to config.importance
LEGACY_PRUNE_KWARGS = ("importance", "seq_len", "num_samples", "batch_agg", "depth_metric", "depth_mode",
                       "depth_rounds", "head_metric", "norm_rescale", "head_residual", "budget_blocks", "method",
                       "seed", "divisors")


@dataclass
class PruneConfig:
    """How :func:`minitron.prune` calibrates and ranks (the target itself is a :class:`minitron.Target`).

    Args:
        importance: calibration options (sequence/batch aggregation, batch size, loss-score blocks); the
            batch aggregation of the pruning scores is ``importance.batch_agg`` (its only home).
        num_samples: calibration blocks read from the data (official recipe: 1024; the ``minitron prune``
            command defaults to 64, see its ``--help``).
        seq_len: calibration block length in tokens. ``None``: a 2-D token-id tensor ``(B, S)`` is used as B
            blocks of S tokens; other data is packed into 256-token blocks (fewer when the model's
            ``max_position_embeddings`` is smaller).
        chat_template: render plain-text calibration documents with the tokenizer's chat template (chats,
            ``messages`` records, always are).
        depth_metric: ``ppl`` (LM loss with the layer dropped; default, ~L/2 extra forwards over
            ``importance.ppl_max_blocks`` blocks, only when layers are pruned) or ``bi`` (Block Importance,
            the paper's; free).
        depth_mode: ``scattered`` or ``contiguous`` layer removal.
        depth_rounds: with ``depth_metric="ppl"``, remove layers over this many rounds, re-scoring the shrunk
            model between rounds (needs calibration data); 1 (default) is one-shot.
        head_metric: ``output`` (each head's contribution after o_proj; default), ``input`` (the paper's
            o_proj-input criterion) or ``loss`` (LM loss with the head dropped).
        norm_rescale: after hidden pruning, scale RMSNorm weights by the calibrated kept/full RMS ratio.
        head_residual: fold dropped heads' o_proj columns into the kept heads of their KV group.
        budget_blocks: calibration blocks that score each candidate shape of a ``params=`` budget.
        method: ``activation`` (Minitron importance) or ``random`` (a baseline of the same size).
        seed: seed of the random baseline.
        divisors: required divisors per :class:`~minitron.Target` field, e.g. ``{"hidden_size": 64}``.

    Raises:
        ValueError: an unknown criterion, mode, method or aggregation, a count that is not a positive
            integer, ``depth_rounds > 1`` without ``depth_metric="ppl"`` and ``depth_mode="scattered"``,
            or a bad divisor; the message names the field and the allowed values.

    Example:
        >>> cfg = PruneConfig(num_samples=64, depth_metric="bi", importance=ImportanceConfig(batch_agg="mean"))
        >>> small = minitron.prune(model, "calib.jsonl", minitron.Target(num_hidden_layers=16), config=cfg)
    """

    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    num_samples: int = 1024
    seq_len: int | None = None
    chat_template: bool = False
    depth_metric: str = DEFAULT_DEPTH_METRIC
    depth_mode: str = "scattered"
    depth_rounds: int = 1
    head_metric: str = DEFAULT_HEAD_METRIC
    norm_rescale: bool = DEFAULT_NORM_RESCALE
    head_residual: bool = DEFAULT_HEAD_RESIDUAL
    budget_blocks: int = 8
    method: str = "activation"
    seed: int = 0
    divisors: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.importance, ImportanceConfig):
            raise ValueError(f"importance must be a minitron.ImportanceConfig, got {type(self.importance).__name__}")
        check_count("num_samples", self.num_samples)
        check_count("seq_len", self.seq_len, allow_none=True)
        check_count("depth_rounds", self.depth_rounds)
        check_count("budget_blocks", self.budget_blocks)
        if self.depth_metric not in DEPTH_METRICS:  # checked even when the target prunes no layer
            raise ValueError(f"unknown depth_metric={self.depth_metric!r}; allowed values: {', '.join(DEPTH_METRICS)}")
        if self.depth_mode not in DEPTH_MODES:
            raise ValueError(f"unknown depth_mode={self.depth_mode!r}; allowed values: {', '.join(DEPTH_MODES)}")
        check_head_metric(self.head_metric)
        if self.method not in METHODS:
            raise ValueError(f"unknown method={self.method!r}; allowed values: {', '.join(METHODS)}")
        if self.depth_rounds > 1 and (self.depth_metric != "ppl" or self.depth_mode != "scattered"):
            raise ValueError(f"depth_rounds={self.depth_rounds}: > 1 only with depth_metric='ppl' and "
                             "depth_mode='scattered' (iterative removal re-scores by layer-drop loss)")
        for name in ("chat_template", "norm_rescale", "head_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        check_divisors(self.divisors)

    def plan_options(self) -> dict[str, Any]:
        """The keyword arguments :func:`minitron.pruning.make_plan` takes from this config."""
        return dict(batch_agg=self.importance.batch_agg, depth_metric=self.depth_metric, depth_mode=self.depth_mode,
                    head_metric=self.head_metric, norm_rescale=self.norm_rescale, head_residual=self.head_residual)


def config_from_legacy(config: PruneConfig | None, legacy: dict[str, Any]) -> PruneConfig:
    """``config`` (default :class:`PruneConfig`) with the pre-config keyword arguments of ``prune`` applied.

    Args:
        config: the caller's config, or None.
        legacy: keyword arguments from :data:`LEGACY_PRUNE_KWARGS` (``batch_agg`` and ``importance`` are
            folded into ``config.importance``; ``None`` values are ignored).
    Returns:
        A new, validated config; ``config`` itself is not changed.
    Raises:
        ValueError: an unknown keyword (named, with the allowed ones) or an invalid value.
    Example:
        >>> config_from_legacy(None, {"depth_metric": "bi"}).depth_metric
        'bi'
    """
    config = config or PruneConfig()
    if not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a minitron.PruneConfig, got {type(config).__name__}")
    unknown = sorted(set(legacy) - set(LEGACY_PRUNE_KWARGS))
    if unknown:
        raise ValueError(f"minitron.prune got unknown keyword argument(s) {', '.join(unknown)}; pass options as "
                         f"config=minitron.PruneConfig(...) (fields: {', '.join(f.name for f in dataclasses.fields(PruneConfig))})")
    changes = {k: v for k, v in legacy.items() if v is not None and k not in ("importance", "batch_agg")}
    importance = legacy.get("importance") or config.importance
    if legacy.get("batch_agg") is not None:
        importance = dataclasses.replace(importance, batch_agg=legacy["batch_agg"])
    return dataclasses.replace(config, importance=importance, **changes)
