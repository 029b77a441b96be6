"""The candidate space of the architecture search: every (hidden, FFN, heads, layers) grid point
(plus experts, expert FFN and shared-expert FFN on mixture-of-experts models) whose exact parameter
count lies in the budget window.

Parameter counts are exact: the model is instantiated on the meta device with one and with two
layers for each distinct (hidden, FFN, heads) width (:func:`minitron.pruning.params.target_parameters`),
and every layer count follows linearly (decoder layers of one model have equal sizes). On
mixture-of-experts models a one-layer model is split into the parts outside the layers, the layer
without its MLP, and the MLP (sparse or dense); the sparse MLP's count is bilinear in (experts, expert
FFN) plus linear in the shared-expert FFN, fitted from a few meta models per hidden size and
checked on one more point (:class:`minitron.pruning.params.ParamCounter`, re-exported here).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import nn

from ..adapters import get_adapter, kv_heads_of, moe_sizes, moe_spec_of, sparse_layers
from ..pruning.params import ParamCounter, budget_count
from ..pruning.target import MOE_WIDTH_MULTIPLE, Target

__all__ = ["ALL_AXES", "AXES", "AXIS_FIELDS", "MOE_AXES", "Candidate", "ParamCounter", "axis_values",
           "default_divisors", "enumerate_candidates", "model_axes"]

AXES = ("hidden", "ffn", "heads", "layers")  # every model's axes (the search space of a dense model)
MOE_AXES = ("experts", "expert_ffn", "shared_ffn")  # mixture-of-experts models (shared_ffn: Qwen2-MoE)
ALL_AXES = AXES + MOE_AXES
AXIS_FIELDS = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
               "layers": "num_hidden_layers", "experts": "num_experts", "expert_ffn": "expert_intermediate_size",
               "shared_ffn": "shared_expert_intermediate_size"}


def _ffn_is_expert_ffn(config) -> bool:
    """Mixtral: the config's ``intermediate_size`` IS the experts' FFN width (one field, two names)."""
    spec = moe_spec_of(config)
    return spec is not None and spec.cfg_expert_ffn == "intermediate_size"


def model_axes(config) -> tuple[str, ...]:
    """The axes ``config``'s model has, each naming a distinct config field, in :data:`ALL_AXES` order.

    Dense models: ``hidden, ffn, heads, layers``. Mixture-of-experts models add ``experts`` and
    ``expert_ffn`` (and ``shared_ffn`` with a shared expert); ``ffn`` (the dense MLP width) is kept only
    when some layer has a dense MLP (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``): Mixtral's
    ``intermediate_size`` is the expert FFN itself, searched as ``expert_ffn``.

    Example:
        >>> model_axes(mixtral.config)
        ('hidden', 'heads', 'layers', 'experts', 'expert_ffn')
    """
    sizes = moe_sizes(config)
    if sizes["num_experts"] is None:
        return AXES
    has_dense_mlp = not _ffn_is_expert_ffn(config) and not all(sparse_layers(config))
    return tuple(a for a in ALL_AXES if (a != "ffn" or has_dense_mlp)
                 and (a in AXES or sizes[AXIS_FIELDS[a]] is not None))


@dataclass
class Candidate:
    """One architecture of the search and its measurements.

    Args:
        hidden_size / intermediate_size / num_attention_heads / num_hidden_layers: the architecture.
        num_experts / expert_intermediate_size / shared_expert_intermediate_size: the mixture-of-experts
            sizes (keyword-only; None on dense models and for axes the model lacks). On Mixtral
            ``intermediate_size`` equals ``expert_intermediate_size`` (one config field).
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
    num_experts: int | None = field(default=None, kw_only=True)
    expert_intermediate_size: int | None = field(default=None, kw_only=True)
    shared_expert_intermediate_size: int | None = field(default=None, kw_only=True)
    params: int
    loss_pruned: float | None = None
    rank_pruned: int | None = None
    loss_retrained: float | None = None
    rank_retrained: int | None = None

    @property
    def target(self) -> Target:
        """The :class:`Target` of this candidate."""
        return Target(self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_hidden_layers,
                      num_experts=self.num_experts, expert_intermediate_size=self.expert_intermediate_size,
                      shared_expert_intermediate_size=self.shared_expert_intermediate_size)

    @property
    def name(self) -> str:
        """Short id, e.g. ``h192-f576-a8-l7`` (mixture of experts: ``h48-f88-a6-l4-e4-x24-s48``: experts,
        expert FFN, shared-expert FFN)."""
        moe = "".join(f"-{k}{v}" for k, v in (("e", self.num_experts), ("x", self.expert_intermediate_size),
                                               ("s", self.shared_expert_intermediate_size)) if v is not None)
        return f"h{self.hidden_size}-f{self.intermediate_size}-a{self.num_attention_heads}-l{self.num_hidden_layers}{moe}"

    def row(self) -> dict:
        """The candidate as a flat dict (the fields; mixture-of-experts fields only when set)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _MOE_FIELDS}


_MOE_FIELDS = ("num_experts", "expert_intermediate_size", "shared_expert_intermediate_size")


def _pow2_divisor(size: int, floor: int = 8) -> int:
    """Power of two nearest to ``size / 32`` (at least ``floor``): ~32 steps over the full width."""
    return max(floor, 2 ** round(math.log2(max(size / 32, 1))))


def default_divisors(config) -> dict[str, int]:
    """Grid step of every axis when ``divisors`` is not given.

    hidden: lcm(num_attention_heads, power of two nearest hidden/32); FFN: power of two nearest
    ffn/32 (at least 8); heads: ``num_key_value_heads``; layers: 1. Mixture-of-experts models add
    experts: 1 (the grid never goes below ``num_experts_per_tok``), expert FFN and shared-expert FFN:
    as FFN. On those models hidden and expert-FFN steps (given ones too) are made multiples of
    :data:`minitron.pruning.target.MOE_WIDTH_MULTIPLE` (the experts' grouped GEMMs need it).

    Args:
        config: the model's config.
    Returns:
        ``{target field: step}``.
    Example:
        >>> default_divisors(model.config)["num_hidden_layers"]
        1
    """
    out = {
        "hidden_size": math.lcm(int(config.num_attention_heads), _pow2_divisor(int(config.hidden_size))),
        "intermediate_size": _pow2_divisor(int(config.intermediate_size)),
        "num_attention_heads": kv_heads_of(config),
        "num_hidden_layers": 1,
    }
    sizes = moe_sizes(config)
    if sizes["num_experts"] is not None:
        out["num_experts"] = 1
        out["expert_intermediate_size"] = _pow2_divisor(int(sizes["expert_intermediate_size"]))
        if sizes["shared_expert_intermediate_size"] is not None:
            out["shared_expert_intermediate_size"] = _pow2_divisor(int(sizes["shared_expert_intermediate_size"]))
    return out


def _normalise_divisors(config, divisors: dict[str, int] | None) -> dict[str, int]:
    out = default_divisors(config)
    given = {}
    for key, value in (divisors or {}).items():
        name = AXIS_FIELDS.get(key, key)
        if name not in out:
            keys = [a for a in AXIS_FIELDS if AXIS_FIELDS[a] in out]
            raise ValueError(f"unknown divisor key {key!r}; allowed: {', '.join([*keys, *(AXIS_FIELDS[a] for a in keys)])}")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"divisor {key}={value!r} must be a positive integer")
        out[name] = given[name] = value
    if _ffn_is_expert_ffn(config) and "expert_intermediate_size" not in given and "intermediate_size" in given:
        out["expert_intermediate_size"] = given["intermediate_size"]  # Mixtral: one field, either name
    out["num_attention_heads"] = math.lcm(out["num_attention_heads"], kv_heads_of(config))
    if "num_experts" in out:  # the experts' grouped GEMMs need these widths in multiples of MOE_WIDTH_MULTIPLE
        for name in ("hidden_size", "expert_intermediate_size"):
            out[name] = math.lcm(out[name], MOE_WIDTH_MULTIPLE)
    return out


def axis_values(current: int, max_prune: float, divisor: int, searched: bool) -> list[int]:
    """Allowed sizes of one axis, largest first: ``current`` and multiples of ``divisor`` >= ``current*(1-max_prune)``.

    Args:
        current: the model's size on this axis.
        max_prune: largest fraction removed.
        divisor: grid step.
        searched: whether the axis is searched at all (else only ``current``).
    Returns:
        The sizes, descending.
    Example:
        >>> axis_values(48, 0.4, 6, True)
        [48, 42, 36, 30]
    """
    if not searched:
        return [current]
    low = current * (1 - max_prune) - 1e-9
    values = {current} | {v for v in range(divisor, current, divisor) if v >= low}
    return sorted(values, reverse=True)


def _valid(model: nn.Module, target: Target) -> bool:
    """Whether the config class accepts the target (e.g. Llama needs hidden % heads == 0)."""
    try:
        target.validate(model.config)
    except ValueError:
        return False
    return True


def _searched_axes(model: nn.Module, axes: Sequence[str] | None) -> tuple[str, ...]:
    """The axes to search (``None``: every axis the model has); Mixtral's ``ffn`` means ``expert_ffn``."""
    config = model.config
    available = model_axes(config)
    if axes is None:
        return available
    unknown = [a for a in axes if a not in ALL_AXES]
    if unknown or not axes:
        raise ValueError(f"axes={list(axes)!r}: allowed axes are {', '.join(available)} (at least one)")
    if _ffn_is_expert_ffn(config):
        axes = ["expert_ffn" if a == "ffn" else a for a in axes]
    missing = [a for a in axes if a not in available]
    if missing:
        why = {"experts": "not a mixture-of-experts model", "expert_ffn": "not a mixture-of-experts model",
               "shared_ffn": "no shared expert", "ffn": "no dense MLP layer (every layer is a mixture of experts: "
                                                      "search expert_ffn)"}
        raise ValueError(f"axes={list(axes)!r}: {type(model).__name__} has no {', '.join(missing)} axis "
                         f"({'; '.join(why[a] for a in missing)}); its axes are {', '.join(available)}")
    return tuple(dict.fromkeys(axes))


def enumerate_candidates(
    model: nn.Module,
    params: float,
    tolerance: float = 0.05,
    *,
    divisors: dict[str, int] | None = None,
    max_width_prune: float = 0.4,
    max_depth_prune: float = 0.2,
    axes: Sequence[str] | None = None,
    counter: ParamCounter | None = None,
) -> tuple[list[Candidate], int]:
    """All architectures within the budget window, largest first.

    Args:
        model: a supported causal LM.
        params: budget, a fraction of the model's parameters if ``<= 1``, else an absolute count.
        tolerance: candidates have ``budget * (1 - tolerance) <= params <= budget``; in ``[0, 1)``.
        divisors: grid step per axis, keyed by axis (``hidden``/``ffn``/``heads``/``layers``/``experts``/
            ``expert_ffn``/``shared_ffn``) or :class:`Target` field name; defaults from
            :func:`default_divisors`. Heads always stay multiples of the KV heads.
        max_width_prune: largest fraction of hidden, FFN and heads (and experts, expert FFN, shared
            FFN) removed (each axis).
        max_depth_prune: largest fraction of layers removed.
        axes: axes searched; the others keep the model's size. Default (None): every axis the model
            has (:func:`model_axes`: ``hidden, ffn, heads, layers`` on dense models; mixture-of-experts
            models add ``experts``, ``expert_ffn`` and, with a shared expert, ``shared_ffn``). On Mixtral
            ``ffn`` and ``expert_ffn`` are the same config field, searched once as ``expert_ffn``.
        counter: a :class:`ParamCounter` to reuse.
    Returns:
        ``(candidates, budget)`` with ``budget`` the absolute parameter budget. A model whose layers
        mix sparse and dense MLPs counts a depth-pruned candidate with the larger of its possible
        sizes (the layers kept are chosen later, by importance), so the pruned model never exceeds
        the budget; :func:`minitron.search` replaces ``params`` by the pruned model's count.
    Raises:
        ValueError: bad arguments, an axis the model lacks, or no candidate in the window (names the
            budget and the smallest reachable size).

    Example:
        >>> cands, budget = enumerate_candidates(model, 0.5, 0.05)
    """
    get_adapter(model)
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r} must be in [0, 1) (a fraction of the budget, e.g. 0.05)")
    for name, v in (("max_width_prune", max_width_prune), ("max_depth_prune", max_depth_prune)):
        if not 0 <= v < 1:
            raise ValueError(f"{name}={v!r} must be in [0, 1)")
    config = model.config
    axes = _searched_axes(model, axes)
    counter = counter or ParamCounter(model)
    total = counter(Target())
    budget = int(budget_count(params, total))
    low = budget * (1 - tolerance)
    divs = _normalise_divisors(config, divisors)
    current = Target().resolved(config)
    top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    grids = {}
    for axis in model_axes(config):
        name = AXIS_FIELDS[axis]
        limit = max_depth_prune if axis == "layers" else max_width_prune
        grids[name] = axis_values(int(getattr(current, name)), limit, divs[name], axis in axes)
        if axis == "experts":  # every token is routed to top_k experts
            grids[name] = [v for v in grids[name] if v >= top_k]
    names = list(grids)
    mixtral = _ffn_is_expert_ffn(config)
    out: list[Candidate] = []
    smallest: int | None = None
    for values in itertools.product(*grids.values()):
        target = dataclasses.replace(current, **dict(zip(names, values)))  # resolved: every field set
        if mixtral:
            target.intermediate_size = target.expert_intermediate_size  # one config field
        n = counter._bounds(target)[1]
        if not (low <= n <= budget or smallest is None or n < smallest) or not _valid(model, target):
            continue
        smallest = n if smallest is None else min(smallest, n)
        if low <= n <= budget:
            moe = {f: getattr(target, f) for f in _MOE_FIELDS if getattr(target, f) is not None}
            out.append(Candidate(target.hidden_size, target.intermediate_size, target.num_attention_heads,
                                 target.num_hidden_layers, params=n, **moe))
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
