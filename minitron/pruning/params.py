"""The one parameter counter: every parameter count and budget of minitron is computed here.

- :func:`count_parameters`: distinct parameters of a live (or meta) module;
- :func:`target_parameters`: exact count of ``model`` pruned to a :class:`Target`, by instantiating the
  pruned config on the meta device (no memory, no compute), so every family's biases, norms and tied
  embeddings are counted the way Hugging Face builds them;
- :class:`ParamCounter`: the same counts, cached per width for the many targets of a search (dense
  models: one- and two-layer meta models per width, every layer count following linearly; mixture of
  experts: by parts, :class:`_MoECounter`);
- :func:`budget_count` / :func:`budget_of`: what a ``params=`` budget means in parameters, and the one
  refusal of a budget on a mixture-of-experts model;
- :func:`default_hidden_divisor`: the grid step the budget rules keep ``hidden_size`` on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from ..adapters import get_adapter, moe_spec_of, sparse_layers
from .target import Target

__all__ = ["MIN_COUNT_FRACTION", "ParamCounter", "budget_count", "budget_of", "count_config_parameters",
           "count_parameters", "default_hidden_divisor", "target_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters of ``model`` (tied weights counted once).

    Args:
        model: any module (meta-device models work: only shapes are read).
    Returns:
        The parameter count.
    Example:
        >>> count_parameters(model) / 1e6  # millions
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_config_parameters(model_cls: type[nn.Module], config) -> int:
    """Exact number of distinct parameters of ``model_cls(config)``, counted on the meta device."""
    with torch.device("meta"):
        return count_parameters(model_cls(config))


def target_parameters(model: nn.Module, target: Target) -> int:
    """Parameter count of ``model`` pruned to ``target``."""
    return count_config_parameters(type(model), target.config_for(model.config))


# a count below this fraction of the model is taken for a mistyped fraction or percentage (50 for 50%)
MIN_COUNT_FRACTION = 0.01


def budget_count(params: float, total: int) -> float:
    """The absolute parameter count a ``params`` budget means: a fraction in (0, 1] of ``total``, or a count > 1.

    Args:
        params: the user's budget.
        total: the model's parameter count.
    Returns:
        ``params * total`` for a fraction, else ``params``.
    Raises:
        ValueError: not a positive number, or a value > 1 (read as a count) under 1% of ``total`` or above
            it. The message says how the value was read.
    Example:
        >>> budget_count(0.5, 1000), budget_count(300, 1000)
        (500.0, 300)
    """
    if isinstance(params, bool) or not isinstance(params, (int, float)) or not math.isfinite(params) or params <= 0:
        raise ValueError(f"params={params!r} must be a fraction in (0, 1] of the model's parameters (e.g. 0.5) or "
                         "an absolute parameter count")
    if params <= 1:
        return params * total
    read = f"params={params:g} is read as an absolute parameter count (values > 1 are counts, not fractions)"
    if params < MIN_COUNT_FRACTION * total:
        raise ValueError(f"{read}, under {MIN_COUNT_FRACTION:.0%} of the model's {total:,}; for a fraction of the "
                         "model pass a value in (0, 1] (e.g. 0.5 for half)")
    if params > total:
        raise ValueError(f"{read}, more than the model's {total:,} parameters; pass a smaller count or a fraction "
                         "in (0, 1]")
    return int(params)


def budget_of(model: nn.Module, params: float, flag: str = "params") -> float:
    """The absolute parameter budget of ``params`` (:func:`budget_count`: a fraction ``<= 1`` of the model's
    count, or a count), for the rules that choose a dense shape (hidden / FFN / layers).

    Args:
        model: the model to prune.
        params: the user's budget.
        flag: how the caller names the option, for the messages (``params``, ``--params``).
    Returns:
        The budget in parameters.
    Raises:
        ValueError: a mixture-of-experts model (the budget rules choose dense shapes; the message names the
            explicit MoE target fields and ``minitron.search``), an invalid budget (:func:`budget_count`), or
            one that leaves the model as large as it is.
    Example:
        >>> budget_of(model, 0.5) == 0.5 * count_parameters(model)
        True
    """
    if moe_spec_of(model.config) is not None:
        raise ValueError(f"{flag}={params}: parameter budgets choose hidden/FFN shapes of dense models; for the "
                         f"mixture-of-experts {type(model).__name__} give an explicit target "
                         "(minitron.Target(num_experts=..., expert_intermediate_size=..., ...); on the command line "
                         "--experts, --expert-ffn, --shared-expert-ffn, --hidden-size, --heads, --layers) or let "
                         "minitron.search rank candidates on the MoE axes")
    total = target_parameters(model, Target())
    budget = budget_count(params, total)
    if budget >= total:
        raise ValueError(f"{flag}={params} gives a budget of {budget:.0f} >= the model's {total} parameters; nothing to prune")
    return budget


def default_hidden_divisor(config) -> int:
    """The step ``hidden_size`` keeps under a ``params=`` budget when no divisor is given.

    64 for hidden >= 1024 (else 8), made a multiple of the head count too: some config classes
    (Llama) require ``hidden_size % num_attention_heads == 0``.

    Args:
        config: the model's config.
    Returns:
        ``lcm(64 or 8, num_attention_heads)``.
    Example:
        >>> default_hidden_divisor(LlamaConfig(hidden_size=576, num_attention_heads=9))
        72
    """
    return math.lcm(64 if config.hidden_size >= 1024 else 8, config.num_attention_heads)


class ParamCounter:
    """Exact parameter counts of pruned configs, cached per width (meta device, 1- and 2-layer models).

    Mixture-of-experts models are counted by parts (:class:`_MoECounter`): the parts outside the
    decoder layers, a layer without its MLP, and a sparse or dense MLP; a model whose layers mix
    sparse and dense MLPs (Qwen ``mlp_only_layers``) is counted for the layers ``kept_layers`` names
    (default: the first ``num_hidden_layers``, as :meth:`minitron.Target.config_for` builds).

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
        self._moe = _MoECounter(model) if moe_spec_of(self.config) is not None else None

    def __call__(self, target: Target, kept_layers: Sequence[int] | None = None) -> int:
        return self._count(target.resolved(self.config), kept_layers)

    def bounds(self, target: Target) -> tuple[int, int]:
        """(fewest, most) parameters of ``target`` over every choice of kept layers.

        Equal unless the model mixes sparse and dense MLP layers and ``target`` drops layers: which
        kind the depth ranking drops is known only after calibration.
        """
        return self._bounds(target.resolved(self.config))

    def _count(self, t: Target, kept_layers: Sequence[int] | None = None) -> int:
        """The count of an already resolved target (every field set)."""
        if self._moe is not None:
            kept = range(t.num_hidden_layers) if kept_layers is None else kept_layers
            return self._moe.count(t, sum(self._moe.sparse[l] for l in kept), len(kept))
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

    def _bounds(self, t: Target) -> tuple[int, int]:
        if self._moe is None:
            n = self._count(t)
            return n, n
        n_sparse = sum(self._moe.sparse)
        n_dense = len(self._moe.sparse) - n_sparse
        keep = t.num_hidden_layers
        counts = [self._moe.count(t, s, keep) for s in (max(0, keep - n_dense), min(n_sparse, keep))]
        return min(counts), max(counts)


class _MoECounter:
    """Parameter counts of a mixture-of-experts model by parts, from one-layer meta models.

    ``count(t, n_sparse, n_layers) = outside(hidden) + n_layers * layer_rest(hidden, heads)
    + n_sparse * sparse_mlp(hidden, experts, expert FFN, shared FFN) + n_dense * dense_mlp(hidden, FFN)``.
    ``sparse_mlp`` is fitted per hidden size as ``c0 + c1 E + c2 E x + c3 s`` (router rows, fused
    expert tensors, shared expert) from four meta models and checked against a fifth; if the check
    fails (a family whose MLP does not follow that form) every point is measured.
    """

    def __init__(self, model: nn.Module) -> None:
        self.cls, self.config = type(model), model.config
        adapter = get_adapter(model)
        self.sparse = sparse_layers(self.config)
        self.layer_prefix = f"{adapter.layers}.0."
        self.mlp_prefix = self.layer_prefix + adapter.moe.router.split(".")[0] + "."
        self.first = {kind: next((l for l, s in enumerate(self.sparse) if s == kind), None) for kind in (True, False)}
        self._outside: dict[int, int] = {}
        self._rest: dict[tuple[int, int], int] = {}
        self._dense: dict[tuple[int, int], int] = {}
        self._sparse_fit: dict[int, tuple[int, int, int, int] | None] = {}
        self._sparse: dict[tuple, int] = {}

    def _measure(self, t: Target, sparse: bool) -> tuple[int, int, int]:
        """(outside the layers, layer without MLP, MLP) parameters of a one-layer model of layer kind ``sparse``."""
        layer = self.first[sparse]
        config = Target(t.hidden_size, t.intermediate_size, t.num_attention_heads, 1, num_experts=t.num_experts,
                        expert_intermediate_size=t.expert_intermediate_size,
                        shared_expert_intermediate_size=t.shared_expert_intermediate_size,
                        ).config_for(self.config, kept_layers=[layer])
        outside = rest = mlp = 0
        with torch.device("meta"):
            model = self.cls(config)
        for name, p in model.named_parameters():  # tied weights once (named_parameters drops duplicates)
            if name.startswith(self.mlp_prefix):
                mlp += p.numel()
            elif name.startswith(self.layer_prefix):
                rest += p.numel()
            else:
                outside += p.numel()
        self._outside.setdefault(t.hidden_size, outside)
        self._rest.setdefault((t.hidden_size, t.num_attention_heads), rest)
        return outside, rest, mlp

    def _sparse_mlp(self, t: Target) -> int:
        h, e, x, s = t.hidden_size, t.num_experts, t.expert_intermediate_size, t.shared_expert_intermediate_size or 0
        if h not in self._sparse_fit:
            self._sparse_fit[h] = self._fit(t)
        fit = self._sparse_fit[h]
        if fit is not None:
            c0, c1, c2, c3 = fit
            return c0 + c1 * e + c2 * e * x + c3 * s
        key = (h, e, x, s)
        if key not in self._sparse:
            self._sparse[key] = self._measure(t, True)[2]
        return self._sparse[key]

    def _fit(self, t: Target) -> tuple[int, int, int, int] | None:
        shared = t.shared_expert_intermediate_size is not None

        def mlp(e: int, x: int, s: int | None) -> int:
            return self._measure(dataclasses.replace(t, num_experts=e, expert_intermediate_size=x,
                                                     shared_expert_intermediate_size=s if shared else None), True)[2]

        e, x, s = t.num_experts, t.expert_intermediate_size, t.shared_expert_intermediate_size or 0
        p = mlp(e, x, s)
        c3 = mlp(e, x, s + 1) - p if shared else 0
        dx = mlp(e, x + 1, s) - p  # = c2 * e
        if dx % e:
            return None
        c2 = dx // e
        c1 = mlp(e + 1, x, s) - p - c2 * x
        c0 = p - c1 * e - c2 * e * x - c3 * s
        e2, x2, s2 = e + 2, x + 3, s + 2
        if mlp(e2, x2, s2) != c0 + c1 * e2 + c2 * e2 * x2 + c3 * (s2 if shared else 0):
            return None
        return c0, c1, c2, c3

    def count(self, t: Target, n_sparse: int, n_layers: int) -> int:
        h, a = t.hidden_size, t.num_attention_heads
        kind = self.first[True] is not None
        if h not in self._outside or (h, a) not in self._rest:
            self._measure(t, kind)
        total = self._outside[h] + n_layers * self._rest[(h, a)]
        if n_sparse:
            total += n_sparse * self._sparse_mlp(t)
        if n_layers - n_sparse:
            key = (h, t.intermediate_size)
            if key not in self._dense:
                self._dense[key] = self._measure(t, False)[2]
            total += (n_layers - n_sparse) * self._dense[key]
        return total


def _zero_layer_params(model: nn.Module, key: tuple[int, int, int]) -> int:
    return count_config_parameters(type(model), Target(*key, num_hidden_layers=0).config_for(model.config))
