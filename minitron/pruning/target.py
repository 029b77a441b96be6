"""The pruned architecture (:class:`Target`): its validation and the one pruned-config builder."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Sequence

from ..adapters import head_dim_of, kv_heads_of, moe_sizes, moe_spec_of, sparse_layers

__all__ = ["MOE_WIDTH_MULTIPLE", "Target", "check_divisors", "model_sizes", "nearest_multiples"]

# hidden and expert FFN widths of a pruned MoE model: 8 elements = 16 bytes in bf16/fp16 (the row alignment
# torch's grouped GEMM requires; 32 bytes in fp32)
MOE_WIDTH_MULTIPLE = 8


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
        num_experts: experts kept in every sparse (MoE) layer, ranked per layer by their
            router-weighted output norm; at least ``num_experts_per_tok``.
        expert_intermediate_size: FFN width of every expert (the same in all experts, as the fused
            expert tensors require; each expert keeps its own most important neurons). On Mixtral,
            whose config calls it ``intermediate_size``, either field may be given.
        shared_expert_intermediate_size: FFN width of the shared expert (Qwen2-MoE).

    Example:
        >>> Target(hidden_size=3072, intermediate_size=9216)  # Llama-3.1-Minitron-4B-Width from 8B
        >>> Target(num_experts=4, expert_intermediate_size=512)  # a mixture-of-experts model
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    num_key_value_heads: int | None = None
    num_experts: int | None = None
    expert_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None

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
        current = model_sizes(config)
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        spec = moe_spec_of(config)
        if spec is not None and spec.cfg_expert_ffn == "intermediate_size":  # Mixtral: one field, two names
            own["expert_intermediate_size"] = own["expert_intermediate_size"] or own["intermediate_size"]
            own["intermediate_size"] = own["expert_intermediate_size"]
        return Target(**{name: value if own[name] is None else own[name] for name, value in current.items()})

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
        spec = moe_spec_of(config)
        names = {"num_experts": spec and spec.cfg_experts, "expert_intermediate_size": spec and spec.cfg_expert_ffn,
                 "shared_expert_intermediate_size": spec and spec.cfg_shared_ffn}
        for f in fields(t):
            value = getattr(t, f.name)
            if value is not None:
                setattr(new, names.get(f.name, f.name), value)
        kept = list(range(t.num_hidden_layers) if kept_layers is None else kept_layers)
        if getattr(config, "layer_types", None) is not None:
            new.layer_types = [config.layer_types[l] for l in kept]
        if spec is not None and hasattr(config, "mlp_only_layers") and kept != list(range(config.num_hidden_layers)):
            # depth pruning renumbers layers: name the dense ones explicitly, none implied by the step
            sparse = sparse_layers(config)
            new.mlp_only_layers = [i for i, l in enumerate(kept) if not sparse[l]]
            new.decoder_sparse_step = 1
        return new

    def validate(self, config, divisors: dict[str, int] | None = None) -> None:
        """Raise ``ValueError`` naming the field and the allowed values if the target is infeasible.

        Args:
            config: the unpruned model's config.
            divisors: optional required divisor per field, e.g. ``{"hidden_size": 64}``.
        Raises:
            ValueError: a divisor is not a positive integer of a known field; a field is not a positive
                integer, grows the model, misses its divisor, breaks the KV grouping, or the config class
                rejects the pruned config.
        Example:
            >>> Target(num_attention_heads=5).validate(config)  # 3 KV heads: raises, allowed 3, 6, 9
        """
        check_divisors(divisors)
        original = Target().resolved(config)  # the model's own sizes
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if getattr(original, f.name) is None:
                raise ValueError(f"{f.name}={value!r}: {type(config).__name__} has no such axis "
                                 f"({'no shared expert' if f.name.startswith('shared') else 'not a mixture-of-experts model'}); "
                                 "leave it unset")
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
        if (spec := moe_spec_of(config)) is not None:
            if spec.cfg_expert_ffn == "intermediate_size" and None not in (self.intermediate_size, self.expert_intermediate_size) \
                    and self.intermediate_size != self.expert_intermediate_size:
                raise ValueError(f"intermediate_size={self.intermediate_size} and expert_intermediate_size="
                                 f"{self.expert_intermediate_size} name the same {type(config).__name__} field (the "
                                 "experts' FFN width); give one of them")
            for name in ("hidden_size", "expert_intermediate_size"):  # experts' rows feed grouped GEMMs
                value = getattr(t, name)
                if value % MOE_WIDTH_MULTIPLE and value != getattr(original, name):
                    ok = nearest_multiples(value, MOE_WIDTH_MULTIPLE, getattr(original, name))
                    raise ValueError(
                        f"{name}={value}: transformers runs {type(config).__name__}'s experts as grouped GEMMs "
                        "(experts_implementation 'grouped_mm', the default), which need rows of a multiple of 16 "
                        f"bytes; use a multiple of {MOE_WIDTH_MULTIPLE} (nearest: {', '.join(map(str, ok))})")
            if spec.cfg_expert_ffn != "intermediate_size" and self.intermediate_size is not None \
                    and self.intermediate_size != config.intermediate_size and all(sparse_layers(config)):
                raise ValueError(f"intermediate_size={self.intermediate_size}: every layer of this "
                                 f"{type(config).__name__} is a mixture-of-experts layer, so no dense MLP has that width; "
                                 "prune the experts' FFN with expert_intermediate_size (CLI: --expert-intermediate-size)")
            top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
            if t.num_experts is not None and t.num_experts < top_k:
                raise ValueError(f"num_experts={t.num_experts} is fewer than num_experts_per_tok={top_k}: every token "
                                 f"is routed to {top_k} experts; keep at least {top_k} (allowed: {top_k}.."
                                 f"{original.num_experts})")
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


def check_divisors(divisors: dict[str, int] | None) -> None:
    """Raise unless every key of ``divisors`` is a :class:`Target` field and every value an integer >= 1.

    A 0 or a misspelt key would otherwise be skipped silently.

    Example:
        >>> check_divisors({"hidden_size": 0})  # raises: must be a positive integer
    """
    names = [f.name for f in fields(Target)]
    for key, div in (divisors or {}).items():
        if key not in names:
            raise ValueError(f"unknown divisor key {key!r}; allowed: {', '.join(names)}")
        if isinstance(div, bool) or not isinstance(div, int) or div < 1:
            raise ValueError(f"divisor {key}={div!r} must be a positive integer")


def model_sizes(config) -> dict[str, int | None]:
    """Every :class:`Target` field's current value in ``config`` (``None``: the model has no such axis)."""
    sizes = {f.name: getattr(config, f.name, None) for f in fields(Target)}
    sizes["num_key_value_heads"] = kv_heads_of(config)
    return {**sizes, **moe_sizes(config)}


def nearest_multiples(value: int, divisor: int, upper: int) -> list[int]:
    """The multiples of ``divisor`` in ``[divisor, upper]`` just below and just above ``value``.

    Example:
        >>> nearest_multiples(384, 9, 576)  # hidden_size for 9 heads
        [378, 387]
    """
    below = value // divisor * divisor
    return [m for m in (below, below + divisor) if divisor <= m <= upper] or [divisor]
