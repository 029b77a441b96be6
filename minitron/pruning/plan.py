"""Keep-indices per axis (:class:`PrunePlan`), chosen from importance scores or at random.

One procedure builds every plan (:func:`_build_plan`): layers first, then on the kept layers
hidden channels (one global selection), MLP neurons (per layer, same count) and query heads
(ranked within each KV group, the same number kept per group; whole KV groups only on explicit
request). :func:`make_plan` feeds it importance scores (the highest kept), :func:`random_plan`
uniformly random picks (the baseline importance must beat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..adapters import kv_heads_of, moe_spec_of, sparse_layers
from ..importance.collect import DEFAULT_DEPTH_METRIC, ImportanceScores
from ..importance.heads import DEFAULT_HEAD_METRIC, check_head_metric
from ..importance.norms import rescale_factor
from .target import Target

__all__ = ["DEFAULT_HEAD_RESIDUAL", "DEFAULT_NORM_RESCALE", "DEPTH_MODES", "PrunePlan", "make_plan", "norm_scales",
           "random_plan", "select_layers"]

DEPTH_MODES = ("scattered", "contiguous")
# Defaults measured on SmolLM2-135M (benchmarks/results/prune_quality_real.md); the paper's
# criteria stay available by name: depth_metric="bi", head_metric="input", no rescale, no residual.
DEFAULT_NORM_RESCALE = True
DEFAULT_HEAD_RESIDUAL = True


@dataclass
class PrunePlan:
    """Sorted keep-indices for every axis (``None`` = axis untouched).

    ``heads[l]`` / ``mlp[l]`` are indexed by the ORIGINAL layer number ``l``; ``mlp`` holds the dense
    MLP layers only. Mixture-of-experts layers: ``experts[l]`` kept expert ids, ``expert_mlp[l]``
    (experts kept, k) each kept expert's own kept neurons (rows in kept-expert order), ``shared_mlp[l]``
    the shared expert's kept neurons.
    ``norm_scale[site]`` multiplies the kept weight of a norm site (``norm.{l}.{k}`` with the
    original ``l``, or ``norm.final``). ``head_residual`` folds dropped heads' o_proj columns
    into the kept heads of their KV group.
    """

    hidden: torch.Tensor | None = None
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: torch.Tensor | None = None
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_scale: dict[str, float] = field(default_factory=dict)
    head_residual: bool = False
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_mlp: dict[int, torch.Tensor] = field(default_factory=dict)

    def target(self, config) -> Target:
        """The architecture this plan prunes ``config`` to.

        Args:
            config: the unpruned model's config.
        Returns:
            A :class:`Target` with the plan's kept counts; axes the plan leaves alone are ``None``.
        Example:
            >>> make_plan(scores, Target(hidden_size=384), config).target(config).hidden_size
            384
        """
        first = lambda d: int(next(iter(d.values())).numel()) if d else None  # noqa: E731 - same count in every layer
        return Target(
            hidden_size=None if self.hidden is None else int(self.hidden.numel()),
            intermediate_size=first(self.mlp),
            num_attention_heads=first(self.heads),
            num_hidden_layers=None if self.layers is None else int(self.layers.numel()),
            num_key_value_heads=first(self.kv_groups),
            num_experts=first(self.experts),
            expert_intermediate_size=int(next(iter(self.expert_mlp.values())).shape[1]) if self.expert_mlp else None,
            shared_expert_intermediate_size=first(self.shared_mlp),
        )


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable tie-breaking: lower index first among equal scores
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def select_layers(depth_scores: torch.Tensor, keep: int, mode: str = "scattered") -> torch.Tensor:
    """Pick ``keep`` layers to keep from per-layer scores (higher = more important).

    ``scattered`` keeps the top-``keep`` layers; ``contiguous`` drops the block of
    ``L - keep`` consecutive layers with the lowest total score.

    Args:
        depth_scores: (L,) per-layer scores.
        keep: layers to keep.
        mode: ``scattered`` or ``contiguous``.
    Returns:
        Sorted (keep,) original indices of the kept layers.
    Example:
        >>> select_layers(torch.tensor([3.0, 0.5, 1.0, 2.0]), 2, "contiguous")  # drops layers 1..2 (sum 1.5)
        tensor([0, 3])
    """
    n = depth_scores.numel()
    if mode == "scattered":
        return _top_sorted(depth_scores, keep)
    if mode == "contiguous":
        drop = n - keep
        if drop == 0:
            return torch.arange(n)
        sums = torch.stack([depth_scores[s : s + drop].sum() for s in range(n - drop + 1)])
        start = int(torch.argmin(sums))
        return torch.cat([torch.arange(start), torch.arange(start + drop, n)])
    raise ValueError(f"unknown depth_mode={mode!r}; allowed values: {', '.join(DEPTH_MODES)}")


class _ScoreSelector:
    """Keeps the highest-scoring indices of each axis (scores computed only for the axes pruned)."""

    def __init__(self, scores: ImportanceScores, config, batch_agg: str | None, depth_metric: str,
                 depth_mode: str, head_metric: str) -> None:
        self.scores, self.config, self.batch_agg = scores, config, batch_agg
        self.depth_metric, self.depth_mode, self.head_metric = depth_metric, depth_mode, head_metric

    def _site(self, site: str) -> torch.Tensor:
        return self.scores.site_scores(site, self.batch_agg)

    @cached_property
    def _heads(self) -> torch.Tensor:
        kv = kv_heads_of(self.config)
        group = self.config.num_attention_heads // kv  # query heads per KV head (HF repeat_kv layout)
        return self.scores.heads(self.batch_agg, self.head_metric).view(self.config.num_hidden_layers, kv, group)

    def layers(self, keep: int) -> torch.Tensor:
        return select_layers(self.scores.depth(self.depth_metric), keep, self.depth_mode)

    def hidden(self, keep: int) -> torch.Tensor:
        return _top_sorted(self.scores.hidden(self.batch_agg), keep)

    def mlp(self, layer: int, keep: int) -> torch.Tensor:
        return _top_sorted(self._site(f"mlp.{layer}"), keep)

    def experts(self, layer: int, keep: int) -> torch.Tensor:
        return _top_sorted(self.scores.experts(layer, self.batch_agg), keep)

    def expert_mlp(self, layer: int, experts: torch.Tensor, keep: int) -> torch.Tensor:
        per_expert = self.scores.expert_mlp(layer, self.batch_agg)  # (E, F): each expert ranks its own neurons
        return torch.stack([_top_sorted(per_expert[e], keep) for e in experts.tolist()])

    def shared_mlp(self, layer: int, keep: int) -> torch.Tensor:
        return _top_sorted(self._site(f"shared_mlp.{layer}"), keep)

    def kv_groups(self, layer: int, keep: int) -> torch.Tensor:
        return _top_sorted(self._heads[layer].norm(dim=-1), keep)  # weakest groups (L2 of their heads) dropped

    def heads_in_group(self, layer: int, group: int, keep: int) -> torch.Tensor:
        return _top_sorted(self._heads[layer, group], keep)


class _RandomSelector:
    """Uniformly random indices of each axis, from one seeded generator (draws in :func:`_build_plan` order)."""

    def __init__(self, config, seed: int) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    def _pick(self, n: int, keep: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[:keep].sort().values

    def layers(self, keep: int) -> torch.Tensor:
        return self._pick(self.config.num_hidden_layers, keep)

    def hidden(self, keep: int) -> torch.Tensor:
        return self._pick(self.config.hidden_size, keep)

    def mlp(self, layer: int, keep: int) -> torch.Tensor:
        return self._pick(self.config.intermediate_size, keep)

    def experts(self, layer: int, keep: int) -> torch.Tensor:
        return self._pick(getattr(self.config, moe_spec_of(self.config).cfg_experts), keep)

    def expert_mlp(self, layer: int, experts: torch.Tensor, keep: int) -> torch.Tensor:
        width = getattr(self.config, moe_spec_of(self.config).cfg_expert_ffn)
        return torch.stack([self._pick(width, keep) for _ in experts.tolist()])

    def shared_mlp(self, layer: int, keep: int) -> torch.Tensor:
        return self._pick(getattr(self.config, moe_spec_of(self.config).cfg_shared_ffn), keep)

    def kv_groups(self, layer: int, keep: int) -> torch.Tensor:
        return self._pick(kv_heads_of(self.config), keep)

    def heads_in_group(self, layer: int, group: int, keep: int) -> torch.Tensor:
        return self._pick(self.config.num_attention_heads // kv_heads_of(self.config), keep)


def _build_plan(select: _ScoreSelector | _RandomSelector, target: Target, config, head_residual: bool) -> PrunePlan:
    """The plan of ``target``: every pruned axis asks ``select`` which sorted indices to keep."""
    t = target.resolved(config)
    plan = PrunePlan(head_residual=head_residual)
    n_layers = config.num_hidden_layers
    if t.num_hidden_layers < n_layers:
        plan.layers = select.layers(t.num_hidden_layers)
    kept_layers = plan.layers.tolist() if plan.layers is not None else list(range(n_layers))
    if t.hidden_size < config.hidden_size:
        plan.hidden = select.hidden(t.hidden_size)
    sparse = sparse_layers(config)
    original = Target().resolved(config)
    if t.intermediate_size < config.intermediate_size:
        plan.mlp = {l: select.mlp(l, t.intermediate_size) for l in kept_layers if not sparse[l]}
    moe_layers = [l for l in kept_layers if sparse[l]]
    for l in moe_layers:  # experts first: each kept expert then keeps its own neurons
        experts = torch.arange(original.num_experts)
        if t.num_experts < original.num_experts:
            experts = plan.experts[l] = select.experts(l, t.num_experts)
        if t.expert_intermediate_size < original.expert_intermediate_size:
            plan.expert_mlp[l] = select.expert_mlp(l, experts, t.expert_intermediate_size)
        if t.shared_expert_intermediate_size is not None and \
                t.shared_expert_intermediate_size < original.shared_expert_intermediate_size:
            plan.shared_mlp[l] = select.shared_mlp(l, t.shared_expert_intermediate_size)
    if t.num_attention_heads < config.num_attention_heads:
        kv = kv_heads_of(config)
        group = config.num_attention_heads // kv  # query heads per KV group
        keep_per_group = t.num_attention_heads // t.num_key_value_heads
        for l in kept_layers:
            groups = select.kv_groups(l, t.num_key_value_heads)  # all kv groups (sorted) unless pruned
            if t.num_key_value_heads < kv:
                plan.kv_groups[l] = groups
            # kept query heads as indices into the layer's (kv * group) heads, group-major
            plan.heads[l] = torch.cat([select.heads_in_group(l, g, keep_per_group) + g * group
                                       for g in groups.tolist()])
    return plan


def make_plan(
    scores: ImportanceScores,
    target: Target,
    config,
    batch_agg: str | None = None,
    depth_metric: str = DEFAULT_DEPTH_METRIC,
    depth_mode: str = "scattered",
    head_metric: str = DEFAULT_HEAD_METRIC,
    norm_rescale: bool = DEFAULT_NORM_RESCALE,
    head_residual: bool = DEFAULT_HEAD_RESIDUAL,
) -> PrunePlan:
    """Turn importance scores and a target into keep-indices.

    Args:
        scores: statistics from :func:`minitron.importance.collect_importance` for this model.
        target: the architecture to reach (validated against ``config``).
        config: the model's config.
        batch_agg: batch aggregation (default: the one stored with the scores).
        depth_metric: ``ppl`` (LM loss with the layer dropped; default) or ``bi`` (Block
            Importance, the paper's).
        depth_mode: ``scattered`` or ``contiguous``.
        head_metric: ``output`` (contribution after o_proj; default), ``input`` (the paper's
            o_proj-input criterion) or ``loss`` (LM loss with the head dropped).
        norm_rescale: after hidden pruning, scale each RMSNorm weight by the calibrated
            kept/full RMS ratio of its input (default on).
        head_residual: fold dropped heads' o_proj columns into the kept heads of their group
            (the paper's head residual; default on).
    Returns:
        A :class:`PrunePlan`.

    Example:
        >>> plan = make_plan(scores, Target(hidden_size=384), model.config)
        >>> small = apply_plan(model, plan)
    """
    check_head_metric(head_metric)
    select = _ScoreSelector(scores, config, batch_agg, depth_metric, depth_mode, head_metric)
    plan = _build_plan(select, target, config, head_residual)
    if plan.hidden is not None and norm_rescale:
        kept_layers = plan.layers.tolist() if plan.layers is not None else list(range(config.num_hidden_layers))
        plan.norm_scale = norm_scales(scores, plan.hidden, kept_layers)
    return plan


def norm_scales(scores: ImportanceScores, hidden: torch.Tensor, kept_layers: list[int]) -> dict[str, float]:
    """Per RMSNorm site, the factor ``rms_K / rms_D`` for the kept channels ``hidden``.

    Args:
        scores: importance statistics with ``norm_ms`` (collected by this minitron version).
        hidden: kept hidden-channel indices.
        kept_layers: original indices of the layers that stay.
    Returns:
        ``{site: factor}``; empty for LayerNorm families (nothing to rescale).
    """
    if not scores.meta.get("norm_stats"):
        raise ValueError("norm_rescale needs RMSNorm input statistics this importance file lacks (written by "
                         "an older minitron); recompute the scores or pass norm_rescale=False")
    kept = set(kept_layers)
    return {site: rescale_factor(mean_sq, hidden) for site, mean_sq in scores.norm_ms.items()
            if site == "norm.final" or int(site.split(".")[1]) in kept}


def random_plan(config, target: Target, seed: int = 0) -> PrunePlan:
    """A plan of the same shape as :func:`make_plan` with uniformly random channels, heads and layers.

    The baseline that activation importance must beat. No head residual, no norm rescale.

    Args:
        config: the model's config.
        target: the architecture to reach.
        seed: seed of the random picks (same seed, same plan).
    Returns:
        A :class:`PrunePlan`.
    Example:
        >>> small = apply_plan(model, random_plan(model.config, Target(hidden_size=384), seed=1))
    """
    return _build_plan(_RandomSelector(config, seed), target, config, head_residual=False)
