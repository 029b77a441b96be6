"""Structured pruning of a Hugging Face causal LM to a smaller homogeneous config.

Given importance scores (:mod:`minitron.importance`), a :class:`Target` (:mod:`.target`) is
turned into a :class:`PrunePlan` of sorted keep-indices per axis (:mod:`.plan`), and the plan is
applied to every weight (:mod:`.apply`; in place, on the model's own tensors: :mod:`.inplace`).
A ``params=`` budget becomes a :class:`Target` by measurement (:mod:`.budget`, candidates scored under
:mod:`.masked_eval`) or by scaling (:mod:`.sizing`); every parameter count comes from :mod:`.params`.

Axes (docs/method.md section 2):
- hidden (embedding channels): one global selection for embed_tokens columns, all
  norms, q/k/v/gate/up input columns, o/down output rows, final norm, lm_head columns;
- MLP neurons: gate/up rows and down columns, per layer, same count everywhere;
- attention heads: query heads ranked within each KV group, the same number kept
  per group; q rows and o columns; K and V untouched; optionally (the paper's head
  residual) each dropped head's o_proj columns are added, split equally, to the kept
  heads of its KV group before the columns are cut;
- depth: whole decoder layers, lowest scores first (scattered) or the best
  contiguous block.
After hidden pruning every RMSNorm weight is optionally multiplied by the calibrated
ratio of the kept to the full RMS of its input (:mod:`minitron.importance.norms`).

Example:
    >>> from minitron.pruning import Target, make_plan, apply_plan
    >>> small = apply_plan(model, make_plan(scores, Target(hidden_size=384), model.config))
"""

from __future__ import annotations

from ..importance.collect import DEFAULT_DEPTH_METRIC
from ..importance.heads import DEFAULT_HEAD_METRIC
from .apply import apply_plan, fold_dropped_heads, pruned_config, tied_embeddings
from .plan import (DEFAULT_HEAD_RESIDUAL, DEFAULT_NORM_RESCALE, DEPTH_MODES, PrunePlan, make_plan, norm_scales,
                   random_plan, select_layers)
from .config import PruneConfig
from .params import count_parameters
from .target import Target, nearest_multiples

__all__ = [
    "DEFAULT_DEPTH_METRIC", "DEFAULT_HEAD_METRIC", "DEFAULT_HEAD_RESIDUAL", "DEFAULT_NORM_RESCALE", "DEPTH_MODES",
    "PruneConfig", "PrunePlan", "Target", "apply_plan", "count_parameters", "fold_dropped_heads", "make_plan", "nearest_multiples",
    "norm_scales", "pruned_config", "random_plan", "select_layers", "tied_embeddings",
]

