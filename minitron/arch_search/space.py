"""The candidate space of the architecture search: every (hidden, FFN, heads, layers) grid point
whose exact parameter count lies in the budget window.

Parameter counts are exact: the model is instantiated on the meta device with one and with two
layers for each distinct (hidden, FFN, heads) width (:func:`minitron.sizing.target_parameters`),
and every layer count follows linearly (decoder layers of one model have equal sizes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from ..adapters import get_adapter, kv_heads_of
from ..pruning import Target
from ..sizing import count_config_parameters, target_parameters

__all__ = ["AXES", "AXIS_FIELDS", "Candidate", "ParamCounter", "axis_values", "default_divisors",
           "enumerate_candidates"]

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


def _pow2_divisor(size: int, floor: int = 8) -> int:
    """Power of two nearest to ``size / 32`` (at least ``floor``): ~32 steps over the full width."""
    return max(floor, 2 ** round(math.log2(max(size / 32, 1))))


def default_divisors(config) -> dict[str, int]:
    """Grid step of every axis when ``divisors`` is not given.

    hidden: lcm(num_attention_heads, power of two nearest hidden/32); FFN: power of two nearest
    ffn/32 (at least 8); heads: ``num_key_value_heads``; layers: 1.

    Args:
        config: the model's config.
    Returns:
        ``{target field: step}``.
    Example:
        >>> default_divisors(model.config)["num_hidden_layers"]
        1
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


class ParamCounter:
    """Exact parameter counts of pruned configs, cached per width (meta device, 1- and 2-layer models).

    Args:
        model: the unpruned model (only its class and config are read).

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
