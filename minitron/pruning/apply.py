"""Weight surgery: build the pruned model a :class:`PrunePlan` describes.

Every weight is gathered along its pruned axes (hidden columns/rows, MLP neurons, query heads,
KV groups, whole layers); dropped heads' o_proj columns are optionally folded into the kept heads
of their KV group first (the paper's head residual) and RMSNorm weights are rescaled by the plan's
factors. The result is an ordinary model of the same class with a smaller config (``head_dim``
written explicitly, layers renumbered, tied embeddings re-tied), built on the meta device and
filled with the gathered tensors, so no module attribute can disagree with the config. With
``inplace=True`` the model's own parameters are compacted instead (:mod:`minitron.pruning.inplace`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapters import FamilyAdapter, get_adapter, head_dim_of, kv_heads_of, moe_sizes, sparse_layers
from .inplace import apply_plan_inplace
from ..offload import refuse_offloaded
from ..ops.expert_gather import compact_any_, select_any
from .plan import PrunePlan

__all__ = ["apply_plan", "fold_dropped_heads", "pruned_config", "tied_embeddings"]


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
    sparse = sparse_layers(config)
    for l in layer_ids:
        p = f"{adapter.layers}.{l}."
        q_rows = _head_rows(plan.heads[l], head_dim) if l in plan.heads else None
        kv_rows = _head_rows(plan.kv_groups[l], head_dim) if l in plan.kv_groups else None
        if adapter.qkv_proj:  # fused rows [q heads | k heads | v heads]
            add(p + f"{adapter.qkv_proj}.weight", 0, _fused_qkv_rows(config, q_rows, kv_rows))
            add(p + f"{adapter.qkv_proj}.bias", 0, _fused_qkv_rows(config, q_rows, kv_rows))
        else:
            for name in (adapter.k_proj, adapter.v_proj):
                add(p + f"{name}.weight", 0, kv_rows)
                add(p + f"{name}.bias", 0, kv_rows)
            add(p + f"{adapter.q_proj}.weight", 0, q_rows)
            add(p + f"{adapter.q_proj}.bias", 0, q_rows)
        mlp = plan.mlp.get(l)
        for norm in adapter.layer_norms:
            add(p + f"{norm}.weight", 0, hidden)
            add(p + f"{norm}.bias", 0, hidden)
        add(p + f"{adapter.o_proj}.weight", 1, q_rows)
        if mlp is not None and adapter.gate_up_proj:  # fused rows [gate | up]
            mlp_rows = torch.cat([mlp, mlp + config.intermediate_size])
        else:
            mlp_rows = mlp
        for name in adapter.mlp_in:
            add(p + f"{name}.weight", 0, mlp_rows)
            add(p + f"{name}.bias", 0, mlp_rows)
        add(p + f"{adapter.down_proj}.weight", 1, mlp)
        for name in adapter.hidden_in:
            add(p + f"{name}.weight", 1, hidden)
        for name in adapter.hidden_out:
            add(p + f"{name}.weight", 0, hidden)
            add(p + f"{name}.bias", 0, hidden)
        if sparse[l]:
            _expert_ops(add, p, adapter, config, plan, l)
    return ops


def _expert_ops(add, prefix: str, adapter: FamilyAdapter, config, plan: PrunePlan, layer: int) -> None:
    """The gathers of one sparse (MoE) layer: router rows, the 3-D expert tensors, the shared expert.

    Experts (dim 0) are gathered first, so each kept expert's own neuron indices (``plan.expert_mlp``,
    rows in kept-expert order) apply to the expert-pruned tensor.
    """
    moe, hidden = adapter.moe, plan.hidden
    experts, neurons = plan.experts.get(layer), plan.expert_mlp.get(layer)
    ffn = moe_sizes(config)["expert_intermediate_size"]
    add(prefix + f"{moe.router}.weight", 0, experts)  # (E, D): one router row per expert
    add(prefix + f"{moe.router}.weight", 1, hidden)
    gate_up, down = prefix + f"{moe.experts}.gate_up_proj", prefix + f"{moe.experts}.down_proj"
    add(gate_up, 0, experts)  # (E, 2F, D): rows [gate | up] per expert
    add(gate_up, 1, None if neurons is None else torch.cat([neurons, neurons + ffn], dim=1))
    add(gate_up, 2, hidden)
    add(down, 0, experts)  # (E, D, F)
    add(down, 1, hidden)
    add(down, 2, neurons)
    if moe.shared_expert:
        shared = plan.shared_mlp.get(layer)
        s = prefix + moe.shared_expert
        for name in ("gate_proj", "up_proj"):
            add(f"{s}.{name}.weight", 0, shared)
            add(f"{s}.{name}.weight", 1, hidden)
        add(f"{s}.down_proj.weight", 1, shared)
        add(f"{s}.down_proj.weight", 0, hidden)
        add(prefix + f"{moe.shared_gate}.weight", 1, hidden)  # (1, D)


def _fused_qkv_rows(config, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None) -> torch.Tensor | None:
    """Kept rows of a fused (q | k | v) projection: query heads in the q part, KV groups in k and v."""
    if q_rows is None and kv_rows is None:
        return None
    head_dim = head_dim_of(config)
    nq, nkv = config.num_attention_heads * head_dim, kv_heads_of(config) * head_dim
    q = q_rows if q_rows is not None else torch.arange(nq)
    kv = kv_rows if kv_rows is not None else torch.arange(nkv)
    return torch.cat([q, nq + kv, nq + nkv + kv])


def _scalar_edits(model: nn.Module, adapter: FamilyAdapter, plan: PrunePlan) -> dict[str, tuple[float, float]]:
    """State-dict key (original names) -> ``(factor, offset)``: the weight becomes ``(w + offset) * factor - offset``.

    * RMSNorm rescales (``plan.norm_scale``); a ``(1 + weight)`` norm (Gemma) scales ``1 + w``.
    * Embeddings multiplied by ``sqrt(config.hidden_size)`` at forward time (Gemma): the pruned model
      multiplies by ``sqrt(K)`` instead of ``sqrt(D)``, so the kept embedding rows are scaled by
      ``c = sqrt(D / K)`` and the stream keeps its original per-channel values; with tied embeddings
      the lm_head is scaled by ``c`` too, which the final norm undoes (factor ``1 / c``).

    Every edit is a scalar, so it commutes with the gathers.
    """
    edits: dict[str, tuple[float, float]] = {
        _norm_key(adapter, site): (factor, adapter.norm_offset) for site, factor in plan.norm_scale.items()}
    if adapter.embed_scaled and plan.hidden is not None and plan.hidden.numel() < model.config.hidden_size:
        c = (model.config.hidden_size / plan.hidden.numel()) ** 0.5
        edits[f"{adapter.embed}.weight"] = (c, 0.0)
        if tied_embeddings(model):
            key = f"{adapter.final_norm}.weight"
            factor, _ = edits.get(key, (1.0, adapter.norm_offset))
            edits[key] = (factor / c, adapter.norm_offset)
    return edits


def _edit(tensor: torch.Tensor, factor: float, offset: float, inplace: bool) -> torch.Tensor:
    if not inplace:
        tensor = tensor.clone()
    if offset:
        return tensor.add_(offset).mul_(factor).sub_(offset)
    return tensor.mul_(factor)


def _reset_embed_scale(model: nn.Module, adapter: FamilyAdapter) -> None:
    """Set a scaled embedding's ``embed_scale`` buffer to ``sqrt(config.hidden_size)`` of the (pruned) config,
    the value stock ``from_pretrained`` computes (the buffer is not saved)."""
    emb = model.get_submodule(adapter.embed)
    old = getattr(emb, "embed_scale", None)
    if adapter.embed_scaled and isinstance(old, torch.Tensor):
        emb.embed_scale = torch.tensor(model.config.hidden_size ** 0.5, dtype=old.dtype, device=old.device)


def pruned_config(config, plan: PrunePlan):
    """The config of a model pruned by ``plan``: :meth:`Target.config_for` of :meth:`PrunePlan.target`,
    per-layer lists (``layer_types``) taken at the kept layers.

    Args:
        config: the unpruned model's config.
        plan: keep-indices per axis.
    Returns:
        A new config (``head_dim`` explicit).
    Example:
        >>> pruned_config(model.config, plan).num_hidden_layers
    """
    kept = plan.layers.tolist() if plan.layers is not None else None
    return plan.target(config).config_for(config, kept)


def _gather(tensor: torch.Tensor, steps: list[tuple[int, torch.Tensor]], inplace: bool) -> torch.Tensor:
    for i, (dim, index) in enumerate(steps):
        index = index.to(tensor.device)
        if i == 0 and not inplace:
            tensor = select_any(tensor, dim, index)  # first step copies; later steps compact the copy
        else:
            tensor = compact_any_(tensor, dim, index)
    return tensor


def tied_embeddings(model: nn.Module) -> bool:
    """True when the output embedding (lm_head) shares the input embedding's weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def layer_renumbering(config, plan: PrunePlan) -> dict[int, int]:
    """Old decoder-layer index -> its index in the pruned model, for every kept layer."""
    kept = plan.layers.tolist() if plan.layers is not None else list(range(config.num_hidden_layers))
    return {old: new for new, old in enumerate(kept)}


def renamed_key(key: str, layer_prefix: str, renumber: dict[int, int]) -> str | None:
    """``key``'s name in the pruned model (its decoder layer renumbered), or None when that layer is dropped."""
    if not key.startswith(layer_prefix):
        return key
    index, rest = key[len(layer_prefix):].split(".", 1)
    new = renumber.get(int(index))
    return None if new is None else f"{layer_prefix}{new}.{rest}"


def head_folds(adapter: FamilyAdapter, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """``o_proj`` weight key -> kept query heads of its layer, for the head-residual fold (empty without it)."""
    if not plan.head_residual:
        return {}
    return {f"{adapter.layers}.{l}.{adapter.o_proj}.weight": keep for l, keep in plan.heads.items()}


def apply_plan(model: nn.Module, plan: PrunePlan, inplace: bool = False) -> nn.Module:
    """Build the pruned model described by ``plan``.

    Args:
        model: a supported causal LM.
        plan: keep-indices from :func:`make_plan` (or :func:`random_plan`).
        inplace: prune the model itself (:func:`minitron.pruning.inplace.apply_plan_inplace`): the
            same model, submodule and parameter objects, their tensors compacted (peak memory
            ~1x model, also for a memory-mapped ``from_pretrained`` checkpoint); otherwise the
            input is left untouched and new tensors are allocated.
    Returns:
        The pruned model (the same object when ``inplace``).
    Example:
        >>> small = apply_plan(model, make_plan(scores, Target(intermediate_size=1024), model.config))
    """
    adapter = get_adapter(model)
    refuse_offloaded(model, "minitron.apply_plan")  # meta / offloaded weights: never a half-pruned model
    config = model.config
    ops = _weight_ops(adapter, config, plan)
    if inplace:  # same objects, parameters compacted and re-pointed (minitron/pruning/inplace.py)
        edits = _scalar_edits(model, adapter, plan)
        layer_prefix = adapter.layers + "."
        _fold_and_rescale_(model, adapter, plan, {k: v for k, v in edits.items() if k.startswith(layer_prefix)})
        model = apply_plan_inplace(model, plan, ops, pruned_config(config, plan))
        # embedding / final norm: scaled after compaction, so only the kept columns are written (a
        # memory-mapped embedding is never dirtied in full)
        params = dict(model.named_parameters())
        for key, (factor, offset) in edits.items():
            if not key.startswith(layer_prefix):
                _edit(params[key].data, factor, offset, inplace=True)
        _reset_embed_scale(model, adapter)
        return model
    tied = tied_embeddings(model)
    state = model.state_dict()
    if tied:
        state.pop(f"{adapter.lm_head}.weight", None)
    renumber = layer_renumbering(config, plan)
    layer_prefix = adapter.layers + "."
    scales = _scalar_edits(model, adapter, plan)
    head_dim = head_dim_of(config)
    group = config.num_attention_heads // kv_heads_of(config)
    folds = head_folds(adapter, plan)

    new_state: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        new_key = renamed_key(key, layer_prefix, renumber)
        if new_key is None:  # a dropped layer
            continue
        if key in folds:  # a new tensor: the input model's weight stays as it was
            tensor = fold_dropped_heads(tensor, folds[key], group, head_dim)
        steps = ops.get(key)
        if steps:
            tensor = _gather(tensor, steps, inplace)
        elif not inplace:
            tensor = tensor.clone()
        if key in scales:
            tensor = _edit(tensor, *scales[key], inplace=True)  # tensor is already this prune's own copy
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
    _reset_embed_scale(new_model, adapter)
    new_model.generation_config = copy.deepcopy(model.generation_config)
    new_model.train(model.training)
    return new_model


@torch.no_grad()
def _fold_and_rescale_(model: nn.Module, adapter: FamilyAdapter, plan: PrunePlan,
                       edits: dict[str, tuple[float, float]]) -> None:
    """The in-place path's weight edits before compaction: head-residual folds into ``o_proj`` and the
    (scalar) edits of the layers' norms (:func:`_scalar_edits`, original layer numbers), written into
    the model's own tensors (the copy path makes new ones)."""
    params = dict(model.named_parameters())
    config = model.config
    group = config.num_attention_heads // kv_heads_of(config)
    for key, keep in head_folds(adapter, plan).items():
        w = params[key]
        w.copy_(fold_dropped_heads(w, keep, group, head_dim_of(config)))
    for key, (factor, offset) in edits.items():
        _edit(params[key].data, factor, offset, inplace=True)  # a scalar: the same before or after the gather


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
