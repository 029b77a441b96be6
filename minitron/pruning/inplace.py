"""Apply a :class:`~minitron.pruning.PrunePlan` to a model in place: same objects, smaller tensors.

``apply_plan(model, plan, inplace=True)`` lands here. Nothing is rebuilt and nothing is swapped:

* every pruned weight is compacted with :func:`minitron.ops.gather.compact_` and its
  ``nn.Parameter`` is re-pointed at the result (``param.data = ...``), so the model, each
  submodule and each parameter stays the same Python object. References taken before
  pruning (accelerate hooks, PEFT wrappers, optimiser-free training loops, a user's
  ``layer = model.model.layers[3]``) see the pruned weights; forward hooks stay registered.
* removed decoder layers are taken out of the layer ``ModuleList`` and the kept ones renumbered
  (``"0" .. "k-1"``, ``self_attn.layer_idx``), so KV caches line up with the new depth.
* ``model.config`` is updated in place (the same object every submodule holds) and the size
  attributes modules cache at construction (``in_features``, ``embedding_dim``,
  ``normalized_shape``, ``layer_idx``, ``num_key_value_groups``, ...) are copied from a model of
  the pruned config built on the meta device wherever they differ from one built from the
  original config, so no attribute can disagree with the config whatever the family, and
  attributes set by loaders or users are left as they are.

Memory: a weight in ordinary RAM is compacted inside its own storage (``W + 4 MiB``); a weight
memory-mapped from a checkpoint (stock ``from_pretrained``) is copied to a private buffer a chunk
at a time while its file pages are dropped (``W + 4 MiB`` too, :mod:`minitron.ops.mapped`); the
pages of removed layers are dropped as well. The whole prune therefore peaks at about the
model's size plus a few MiB, whichever way the model was loaded.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ..adapters import decoder_layers, get_adapter
from ..ops.expert_gather import compact_any_
from ..ops.mapped import release_pages_

_SCALARS = (int, float, bool, str, type(None))


def _is_plain(value) -> bool:
    """Ints, floats, strings, None and tuples/lists of them: the size attributes modules cache."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _sync_attributes(module: nn.Module, before: nn.Module | None, after: nn.Module) -> None:
    """Set on ``module`` the plain public attributes that the config change alters.

    ``before`` / ``after`` are the same module built (on the meta device) from the original and
    from the pruned config; an attribute is copied from ``after`` only where the two differ
    (``in_features``, ``layer_idx``, ...), so anything a loader or a user set (``name_or_path``)
    is kept. Private attributes (``_parameters``, hooks, accelerate's ``_hf_hook``, ...) and
    objects (configs, functions, submodules) are never touched.
    """
    missing = object()
    for key, value in after.__dict__.items():
        if key.startswith("_") or key == "training" or not _is_plain(value):
            continue
        if before is None or before.__dict__.get(key, missing) != value:
            module.__dict__[key] = value


@torch.no_grad()
def apply_plan_inplace(model: nn.Module, plan, weight_ops: dict, new_config) -> nn.Module:
    """Prune ``model`` to ``plan`` by mutating its parameters, layer list and config.

    Args:
        model: a supported causal LM; it becomes the pruned model.
        plan: the :class:`~minitron.pruning.PrunePlan` (``plan.layers``: kept layers, original numbers).
        weight_ops: state-dict key (original names) -> ``[(dim, keep_index), ...]`` gathers, from
            ``minitron.pruning._weight_ops``.
        new_config: the pruned config (``minitron.pruning.apply.pruned_config``).
    Returns:
        ``model`` itself.
    Raises:
        RuntimeError: a parameter's pruned shape disagrees with ``new_config`` (a family the
            adapter describes wrongly); the model is then partly pruned and must be discarded.

    Example:
        >>> layer = model.model.layers[0]
        >>> apply_plan(model, plan, inplace=True) is model
        True
        >>> layer.mlp.up_proj.weight.shape  # the reference taken before sees the pruned weight
        torch.Size([512, 288])
    """
    adapter = get_adapter(model)
    n_layers = model.config.num_hidden_layers
    kept = plan.layers.tolist() if plan.layers is not None else list(range(n_layers))

    # 1. weights of the kept layers and of the embeddings/head/final norm, one tensor at a time;
    #    named_parameters() lists a tied lm_head once (under the embedding), so it is gathered once
    params = dict(model.named_parameters())
    for key, steps in weight_ops.items():
        param = params.get(key)
        if param is None:  # absent bias, or the tied lm_head
            continue
        for dim, index in steps:
            param.data = compact_any_(param.data if param.dim() == 3 else param, dim, index.to(param.device))

    # 2. depth: keep the chosen layers in order, renumbered; drop the file pages of the others
    if len(kept) < n_layers:
        layers = decoder_layers(model, adapter)
        old = list(layers)
        for i in sorted(set(range(n_layers)) - set(kept)):
            for p in old[i].parameters():
                release_pages_(p)
        layers._modules = OrderedDict((str(new), old[orig]) for new, orig in enumerate(kept))

    # 3. config (same object everywhere) and the attributes modules cached from it
    with torch.device("meta"):
        original = dict(type(model)(copy.deepcopy(model.config)).named_modules())
        reference = type(model)(copy.deepcopy(new_config))
    model.config.__dict__.update(copy.deepcopy(new_config).__dict__)
    layer_prefix = adapter.layers + "."
    for name, after in reference.named_modules():
        old_name = name  # the same module before pruning: layer n was layer kept[n]
        if name.startswith(layer_prefix):
            index, _, rest = name[len(layer_prefix):].partition(".")
            old_name = f"{layer_prefix}{kept[int(index)]}" + (f".{rest}" if rest else "")
        _sync_attributes(model.get_submodule(name), original.get(old_name), after)

    # 4. every tensor must now have exactly the shape the pruned config builds
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        raise RuntimeError(f"in-place prune left tensors that do not fit the pruned config: {bad[:8]}")
    return model
