"""The pruned architecture (:class:`Target`): its validation and the one pruned-config builder."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Sequence

from ..adapters import head_dim_of, kv_heads_of

__all__ = ["Target", "nearest_multiples"]


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
        """This target with its ``None`` fields filled from ``config``.

        Args:
            config: the unpruned model's config.
        Returns:
            A new :class:`Target` with every field set.
        Example:
            >>> Target(hidden_size=384).resolved(config).num_hidden_layers == config.num_hidden_layers
            True
        """
        current = {f.name: getattr(config, f.name, None) for f in fields(self)}
        current["num_key_value_heads"] = kv_heads_of(config)
        return Target(**{name: value if getattr(self, name) is None else getattr(self, name)
                         for name, value in current.items()})

    def config_for(self, config, kept_layers: Sequence[int] | None = None):
        """The pruned config: a deep copy of ``config`` with this target's sizes (no validation: see
        :meth:`validate`). The one builder of pruned configs (parameter counts, validation, weight surgery).

        Args:
            config: the unpruned model's config.
            kept_layers: original indices of the layers that stay; per-layer lists (``layer_types``)
                are taken at these indices. Default: the first ``num_hidden_layers`` layers.
        Returns:
            A new config with ``head_dim`` written explicitly.
        Example:
            >>> Target(hidden_size=384).config_for(model.config).hidden_size
            384
        """
        t = self.resolved(config)
        new = copy.deepcopy(config)
        new.head_dim = head_dim_of(config)
        for f in fields(t):
            setattr(new, f.name, getattr(t, f.name))
        if getattr(config, "layer_types", None) is not None:
            kept = range(t.num_hidden_layers) if kept_layers is None else kept_layers
            new.layer_types = [config.layer_types[l] for l in kept]
        return new

    def validate(self, config, divisors: dict[str, int] | None = None) -> None:
        """Raise ``ValueError`` naming the field and the allowed values if the target is infeasible.

        Args:
            config: the unpruned model's config.
            divisors: optional required divisor per field, e.g. ``{"hidden_size": 64}``.
        Raises:
            ValueError: a field is not a positive integer, grows the model, misses its divisor, breaks the
                KV grouping, or the config class rejects the pruned config.
        Example:
            >>> Target(num_attention_heads=5).validate(config)  # 3 KV heads: raises, allowed 3, 6, 9
        """
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
            if "short_factor" in str(err) or "long_factor" in str(err):  # Phi-3 longrope
                hd = head_dim_of(config)
                raise ValueError(
                    f"{type(config).__name__} checks its longrope factors against hidden_size / num_attention_heads, "
                    f"so the pruned model must keep hidden_size = num_attention_heads * head_dim ({hd}): "
                    f"{t.hidden_size} != {t.num_attention_heads} * {hd}; prune both together, e.g. "
                    f"hidden_size={t.num_attention_heads * hd} with num_attention_heads={t.num_attention_heads}"
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
