"""Structured pruning of a Hugging Face causal LM to a smaller homogeneous config.

Given importance scores (:mod:`minitron.importance`), a :class:`Target` is turned
into a :class:`PrunePlan` (sorted keep-indices per axis), and the plan is applied
to every weight. The result is an ordinary model of the same class with a smaller
config (``head_dim`` written explicitly, layers renumbered, tied embeddings
re-tied), built on the meta device and filled with the gathered tensors, so no
module attribute can disagree with the config.

Axes (METHOD.md section 2):
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
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .adapters import FamilyAdapter, get_adapter, head_dim_of, kv_heads_of
from .importance.collect import DEFAULT_DEPTH_METRIC, ImportanceScores
from .importance.heads import DEFAULT_HEAD_METRIC, check_head_metric
from .inplace import apply_plan_inplace
from .importance.norms import rescale_factor
from .ops.gather import compact_

logger = logging.getLogger(__name__)

DEPTH_MODES = ("scattered", "contiguous")
# Defaults measured on SmolLM2-135M (benchmarks/results/prune_quality_real.md); the paper's
# criteria stay available by name: depth_metric="bi", head_metric="input", no rescale, no residual.
DEFAULT_NORM_RESCALE = True
DEFAULT_HEAD_RESIDUAL = True


@dataclass
class Target:
    """The pruned architecture; ``None`` keeps an axis as it is.

    Args:
        hidden_size: embedding / residual width.
        intermediate_size: MLP width (FFN neurons).
        num_attention_heads: query heads; a multiple of the (kept) KV heads.
        num_hidden_layers: decoder layers kept.
        num_key_value_heads: KV groups kept. Explicit opt-in: the official Minitron recipe
            never prunes K/V (ModelOpt removed it); whole groups are dropped by the L2 of
            their query-head scores, with their query heads.

    Example:
        >>> Target(hidden_size=3072, intermediate_size=9216)  # Llama-3.1-Minitron-4B-Width from 8B
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    num_key_value_heads: int | None = None

    def resolved(self, config) -> "Target":
        """Fill ``None`` fields from ``config``."""
        current = {f.name: getattr(config, f.name, None) for f in fields(self)}
        current["num_key_value_heads"] = kv_heads_of(config)
        return Target(**{name: value if getattr(self, name) is None else getattr(self, name)
                         for name, value in current.items()})

    def config_for(self, config):
        """A deep copy of ``config`` with this target's sizes, ``head_dim`` explicit and
        ``layer_types`` cut to the new depth (no validation: see :meth:`validate`)."""
        t = self.resolved(config)
        new = copy.deepcopy(config)
        new.head_dim = head_dim_of(config)
        for f in fields(t):
            setattr(new, f.name, getattr(t, f.name))
        if getattr(new, "layer_types", None) is not None:
            new.layer_types = new.layer_types[: t.num_hidden_layers]
        return new

    def validate(self, config, divisors: dict[str, int] | None = None) -> None:
        """Raise ``ValueError`` naming the field and the allowed values if the target is infeasible."""
        original = Target().resolved(config)  # the model's own sizes
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            current = int(getattr(original, f.name))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name}={value!r} must be a positive integer (allowed: 1..{current})")
            if value > current:
                raise ValueError(
                    f"target larger than the model: {f.name}={value} > {current}; "
                    f"pruning can only shrink it (allowed: 1..{current})"
                )
            div = (divisors or {}).get(f.name)
            if div and value % div:
                raise ValueError(
                    f"{f.name}={value} is not divisible by the required divisor {div}; "
                    f"use a multiple of {div} such as {max(div, value // div * div)}"
                )
        t = self.resolved(config)
        kv, group = t.num_key_value_heads, config.num_attention_heads // kv_heads_of(config)
        allowed = ", ".join(str(kv * m) for m in range(1, group + 1))
        if t.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads={t.num_attention_heads} is not a multiple of num_key_value_heads={kv}: "
                f"query heads are kept equally in every KV group (allowed: {allowed})"
            )
        if t.num_attention_heads > kv * group:
            raise ValueError(
                f"num_attention_heads={t.num_attention_heads} is more than num_key_value_heads={kv} groups of "
                f"{group} query heads hold; prune query heads too (allowed: {allowed})"
            )
        try:  # the config class's own checks, as from_pretrained will run them on the saved checkpoint
            type(config).from_dict(self.config_for(config).to_dict())
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            if t.hidden_size % t.num_attention_heads:
                ok = nearest_multiples(t.hidden_size, t.num_attention_heads, config.hidden_size)
                raise ValueError(
                    f"hidden_size={t.hidden_size} is not divisible by num_attention_heads={t.num_attention_heads}, "
                    f"which {type(config).__name__} requires; use a multiple of {t.num_attention_heads} "
                    f"(nearest: {', '.join(map(str, ok))})"
                ) from err
            raise ValueError(f"the pruned config is rejected by {type(config).__name__}: {err}") from err


def nearest_multiples(value: int, divisor: int, upper: int) -> list[int]:
    """The multiples of ``divisor`` in ``[divisor, upper]`` just below and just above ``value``.

    Example:
        >>> nearest_multiples(384, 9, 576)  # hidden_size for 9 heads
        [378, 387]
    """
    below = value // divisor * divisor
    return [m for m in (below, below + divisor) if divisor <= m <= upper] or [divisor]


@dataclass
class PrunePlan:
    """Sorted keep-indices for every axis (``None`` = axis untouched).

    ``heads[l]`` / ``mlp[l]`` are indexed by the ORIGINAL layer number ``l``.
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


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable tie-breaking: lower index first among equal scores
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def select_layers(depth_scores: torch.Tensor, keep: int, mode: str = "scattered") -> torch.Tensor:
    """Pick ``keep`` layers to keep from per-layer scores (higher = more important).

    ``scattered`` keeps the top-``keep`` layers; ``contiguous`` drops the block of
    ``L - keep`` consecutive layers with the lowest total score.
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
    t = target.resolved(config)
    plan = PrunePlan(head_residual=head_residual)
    n_layers = config.num_hidden_layers
    if t.num_hidden_layers < n_layers:
        plan.layers = select_layers(scores.depth(depth_metric), t.num_hidden_layers, depth_mode)
    kept_layers = plan.layers.tolist() if plan.layers is not None else list(range(n_layers))
    if t.hidden_size < config.hidden_size:
        plan.hidden = _top_sorted(scores.hidden(batch_agg), t.hidden_size)
        if norm_rescale:
            plan.norm_scale = norm_scales(scores, plan.hidden, kept_layers)
    if t.intermediate_size < config.intermediate_size:
        mlp = scores.mlp(batch_agg)  # (L, f)
        plan.mlp = {l: _top_sorted(mlp[l], t.intermediate_size) for l in kept_layers}
    if t.num_attention_heads < config.num_attention_heads:
        kv = kv_heads_of(config)
        group = config.num_attention_heads // kv  # query heads per KV head (HF repeat_kv layout)
        heads = scores.heads(batch_agg, head_metric).view(n_layers, kv, group)  # (L, kv, g)
        for l in kept_layers:
            groups = torch.arange(kv)
            if t.num_key_value_heads < kv:  # explicit option: drop whole KV groups, weakest first
                groups = _top_sorted(heads[l].norm(dim=-1), t.num_key_value_heads)
                plan.kv_groups[l] = groups
            keep_per_group = t.num_attention_heads // groups.numel()
            within = torch.stack([_top_sorted(heads[l, g], keep_per_group) for g in groups.tolist()])  # (kv', g')
            plan.heads[l] = (within + groups.unsqueeze(1) * group).flatten()
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

    The baseline that activation importance must beat.
    """
    g = torch.Generator().manual_seed(seed)
    t = target.resolved(config)
    pick = lambda n, k: torch.randperm(n, generator=g)[:k].sort().values  # noqa: E731
    plan = PrunePlan()
    n_layers = config.num_hidden_layers
    if t.num_hidden_layers < n_layers:
        plan.layers = pick(n_layers, t.num_hidden_layers)
    kept_layers = plan.layers.tolist() if plan.layers is not None else list(range(n_layers))
    if t.hidden_size < config.hidden_size:
        plan.hidden = pick(config.hidden_size, t.hidden_size)
    if t.intermediate_size < config.intermediate_size:
        plan.mlp = {l: pick(config.intermediate_size, t.intermediate_size) for l in kept_layers}
    if t.num_attention_heads < config.num_attention_heads:
        kv = kv_heads_of(config)
        group = config.num_attention_heads // kv
        for l in kept_layers:
            groups = pick(kv, t.num_key_value_heads)
            if t.num_key_value_heads < kv:
                plan.kv_groups[l] = groups
            keep = t.num_attention_heads // t.num_key_value_heads
            plan.heads[l] = torch.cat([pick(group, keep) + g_ * group for g_ in groups.tolist()])
    return plan


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept heads in a (n_heads * head_dim, ...) projection."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def fold_dropped_heads(o_weight: torch.Tensor, keep: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """The paper's head residual: add each dropped head's o_proj columns to the kept heads of its group.

    A KV group's query heads read the same values, so a kept head's attention output stands in
    for a dropped one's; each dropped head's columns are split equally over the kept heads of
    its group. Groups with no kept head (whole KV group dropped) contribute nothing.

    Args:
        o_weight: (D, n_heads * head_dim) o_proj weight (not modified).
        keep: kept query-head indices.
        group: query heads per KV head.
        head_dim: channels per head.
    Returns:
        A new (D, n_heads * head_dim) weight; cutting the dropped heads' columns comes after.
    Example:
        >>> fold_dropped_heads(torch.eye(4), torch.tensor([0, 2]), group=2, head_dim=1)[:, [0, 2]]
        tensor([[1., 0.],
                [1., 0.],
                [0., 1.],
                [0., 1.]])
    """
    d, width = o_weight.shape
    n_heads = width // head_dim
    kept = torch.zeros(n_heads, dtype=torch.bool, device=o_weight.device)
    kept[keep.to(o_weight.device)] = True
    kept = kept.view(n_heads // group, group)  # (kv, g)
    w = o_weight.view(d, n_heads // group, group, head_dim)  # (D, kv, g, hd)
    dropped_sum = (w * (~kept)[None, :, :, None]).sum(dim=2)  # (D, kv, hd)
    share = dropped_sum / kept.sum(dim=1).clamp_min(1)[None, :, None]  # split over the kept heads
    return (w + share[:, :, None, :] * kept[None, :, :, None]).reshape(d, width)


def _norm_key(adapter: FamilyAdapter, site: str) -> str:
    """State-dict key of the weight of norm site ``norm.{l}.{k}`` / ``norm.final``."""
    if site == "norm.final":
        return f"{adapter.final_norm}.weight"
    _, l, k = site.split(".")
    return f"{adapter.layers}.{l}.{adapter.layer_norms[int(k)]}.weight"


def _weight_ops(adapter: FamilyAdapter, config, plan: PrunePlan) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Map state-dict key (original names) -> list of (dim, keep-index) gathers to apply in order."""
    ops: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def add(key: str, dim: int, index: torch.Tensor | None) -> None:
        if index is not None:
            ops.setdefault(key, []).append((dim, index))

    hidden = plan.hidden
    add(f"{adapter.embed}.weight", 1, hidden)
    add(f"{adapter.lm_head}.weight", 1, hidden)
    for suffix in ("weight", "bias"):
        add(f"{adapter.final_norm}.{suffix}", 0, hidden)
    head_dim = head_dim_of(config)
    layer_ids = plan.layers.tolist() if plan.layers is not None else range(config.num_hidden_layers)
    for l in layer_ids:
        p = f"{adapter.layers}.{l}."
        q_rows = _head_rows(plan.heads[l], head_dim) if l in plan.heads else None
        kv_rows = _head_rows(plan.kv_groups[l], head_dim) if l in plan.kv_groups else None
        for name in (adapter.k_proj, adapter.v_proj):
            add(p + f"{name}.weight", 0, kv_rows)
            add(p + f"{name}.bias", 0, kv_rows)
        mlp = plan.mlp.get(l)
        for norm in adapter.layer_norms:
            add(p + f"{norm}.weight", 0, hidden)
            add(p + f"{norm}.bias", 0, hidden)
        add(p + f"{adapter.q_proj}.weight", 0, q_rows)
        add(p + f"{adapter.q_proj}.bias", 0, q_rows)
        add(p + f"{adapter.o_proj}.weight", 1, q_rows)
        for name in adapter.mlp_in:
            add(p + f"{name}.weight", 0, mlp)
            add(p + f"{name}.bias", 0, mlp)
        add(p + f"{adapter.down_proj}.weight", 1, mlp)
        for name in adapter.hidden_in:
            add(p + f"{name}.weight", 1, hidden)
        for name in adapter.hidden_out:
            add(p + f"{name}.weight", 0, hidden)
            add(p + f"{name}.bias", 0, hidden)
    return ops


def pruned_config(config, plan: PrunePlan):
    """A deep copy of ``config`` with the pruned sizes, ``head_dim`` explicit and per-layer lists sliced."""
    new = copy.deepcopy(config)
    new.head_dim = head_dim_of(config)
    if plan.hidden is not None:
        new.hidden_size = int(plan.hidden.numel())
    if plan.mlp:
        new.intermediate_size = int(next(iter(plan.mlp.values())).numel())
    if plan.heads:
        new.num_attention_heads = int(next(iter(plan.heads.values())).numel())
    new.num_key_value_heads = (
        int(next(iter(plan.kv_groups.values())).numel()) if plan.kv_groups else kv_heads_of(config)
    )
    if plan.layers is not None:
        kept = plan.layers.tolist()
        new.num_hidden_layers = len(kept)
        if getattr(config, "layer_types", None) is not None:
            new.layer_types = [config.layer_types[l] for l in kept]
    return new


def _gather(tensor: torch.Tensor, steps: list[tuple[int, torch.Tensor]], inplace: bool) -> torch.Tensor:
    for i, (dim, index) in enumerate(steps):
        index = index.to(tensor.device)
        if i == 0 and not inplace:
            tensor = tensor.index_select(dim, index)  # first step copies; later steps compact the copy
        else:
            tensor = compact_(tensor, dim, index)
    return tensor


def tied_embeddings(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan, inplace: bool = False) -> nn.Module:
    """Build the pruned model described by ``plan``.

    Args:
        model: a supported causal LM.
        plan: keep-indices from :func:`make_plan` (or :func:`random_plan`).
        inplace: prune the model itself (:func:`minitron.inplace.apply_plan_inplace`): the
            same model, submodule and parameter objects, their tensors compacted (peak memory
            ~1x model, also for a memory-mapped ``from_pretrained`` checkpoint); otherwise the
            input is left untouched and new tensors are allocated.
    Returns:
        The pruned model (the same object when ``inplace``).
    """
    adapter = get_adapter(model)
    config = model.config
    ops = _weight_ops(adapter, config, plan)
    if inplace:  # same objects, parameters compacted and re-pointed (minitron/inplace.py)
        _fold_and_rescale_(model, adapter, plan)
        return apply_plan_inplace(model, plan, ops, pruned_config(config, plan))
    tied = tied_embeddings(model)
    state = model.state_dict()
    if tied:
        state.pop(f"{adapter.lm_head}.weight", None)
    kept = plan.layers.tolist() if plan.layers is not None else list(range(config.num_hidden_layers))
    renumber = {old: new for new, old in enumerate(kept)}
    layer_prefix = adapter.layers + "."
    scales = {_norm_key(adapter, site): factor for site, factor in plan.norm_scale.items()}
    head_dim = head_dim_of(config)
    group = config.num_attention_heads // kv_heads_of(config)
    folds = {f"{layer_prefix}{l}.{adapter.o_proj}.weight": keep for l, keep in plan.heads.items()} \
        if plan.head_residual else {}

    new_state: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        new_key = key
        if key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix):].split(".", 1)
            if int(index) not in renumber:
                continue
            new_key = f"{layer_prefix}{renumber[int(index)]}.{rest}"
        if key in folds:  # a new tensor: the input model's weight stays as it was
            tensor = fold_dropped_heads(tensor, folds[key], group, head_dim)
        steps = ops.get(key)
        if steps:
            tensor = _gather(tensor, steps, inplace)
        elif not inplace:
            tensor = tensor.clone()
        if key in scales:
            tensor = tensor.mul_(scales[key]) if inplace else tensor * scales[key]
        new_state[new_key] = tensor

    new_config = pruned_config(config, plan)
    with torch.device("meta"):
        new_model = type(model)(new_config)
    missing, unexpected = new_model.load_state_dict(new_state, strict=False, assign=True)
    allowed_missing = {f"{adapter.lm_head}.weight"} if tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned config: missing={missing} unexpected={unexpected}")
    if tied:
        new_model.get_output_embeddings().weight = new_model.get_input_embeddings().weight
    _copy_buffers(model, new_model, renumber, layer_prefix, clone=not inplace)
    new_model.generation_config = copy.deepcopy(model.generation_config)
    new_model.train(model.training)
    return new_model


@torch.no_grad()
def _fold_and_rescale_(model: nn.Module, adapter: FamilyAdapter, plan: PrunePlan) -> None:
    """The in-place path's weight edits before compaction: head-residual folds into ``o_proj`` and the
    (scalar) RMSNorm rescales, written into the model's own tensors (the copy path makes new ones)."""
    params = dict(model.named_parameters())
    config = model.config
    if plan.head_residual:
        group = config.num_attention_heads // kv_heads_of(config)
        for l, keep in plan.heads.items():
            w = params[f"{adapter.layers}.{l}.{adapter.o_proj}.weight"]
            w.copy_(fold_dropped_heads(w, keep, group, head_dim_of(config)))
    for site, factor in plan.norm_scale.items():
        params[_norm_key(adapter, site)].mul_(factor)  # a scalar: the same before or after the gather


def _copy_buffers(old: nn.Module, new: nn.Module, renumber: dict[int, int], layer_prefix: str, clone: bool) -> None:
    """Non-persistent buffers (rotary inv_freq, ...) are not in the state dict: take them from the old model."""
    inverse = {v: k for k, v in renumber.items()}
    for name, buf in list(new.named_buffers()):
        if not buf.is_meta:
            continue
        old_name = name
        if name.startswith(layer_prefix):
            index, rest = name[len(layer_prefix):].split(".", 1)
            old_name = f"{layer_prefix}{inverse[int(index)]}.{rest}"
        source = old.get_buffer(old_name)
        module_name, _, attr = name.rpartition(".")
        module = new.get_submodule(module_name) if module_name else new
        module._buffers[attr] = source.clone() if clone else source


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
