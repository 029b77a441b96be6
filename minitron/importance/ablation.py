"""Loss-based importance: the LM loss with one layer or one head removed, and iterative layer removal.

One-shot layer-drop losses (:func:`layer_drop_losses`, ~``L / 2 + 1`` forwards of the whole model, the
decoder prefix computed once by :class:`minitron.evaluation.DecoderStream`) rank every layer on the full
model; :func:`head_drop_losses` zeroes one query head's ``o_proj`` input at a time (~``n_heads * L / 2``
forwards); :func:`greedy_layer_removal` removes a few layers at a time and re-scores the rest,
~``(k / r) * L / 2`` forwards for ``k`` layers removed ``r`` per round.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import decoder_layers, get_adapter, head_dim_of
from ..evaluation import DecoderStream, eval_mode
from ..offload import execution_device

__all__ = ["greedy_layer_removal", "head_drop_losses", "heads_zeroed", "layer_drop_losses"]


@contextmanager
def heads_zeroed(model: nn.Module, layer: int, heads: Sequence[int]) -> Iterator[None]:
    """Zero the ``o_proj`` input of query ``heads`` of decoder ``layer`` (their contribution is removed).

    Args:
        model: a supported causal LM.
        layer: decoder layer index.
        heads: query-head indices; head h owns ``o_proj`` input columns ``h*head_dim .. (h+1)*head_dim - 1``.
    Example:
        >>> with heads_zeroed(model, 0, [1, 2]):
        ...     loss = lm_loss(model, blocks)
    """
    adapter = get_adapter(model)
    o_proj = decoder_layers(model, adapter)[layer].get_submodule(adapter.o_proj)
    head_dim = head_dim_of(model.config)
    mask = torch.ones(o_proj.in_features, device=execution_device(o_proj), dtype=o_proj.weight.dtype)
    for h in heads:
        mask[h * head_dim : (h + 1) * head_dim] = 0.0
    handle = o_proj.register_forward_pre_hook(lambda module, args: (args[0] * mask, *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_drop_losses(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """LM loss with each decoder layer removed in turn.

    Args:
        model: a supported causal LM (left unchanged).
        blocks: LongTensor (n, S) calibration ids.
        batch_size: blocks per forward.
        progress: tqdm bar.
    Returns:
        (L,) fp32 losses; higher means the layer matters more.
    Example:
        >>> layer_drop_losses(model, blocks[:32]).argsort()[:4]  # the 4 least important layers
    """
    with eval_mode(model):
        stream = DecoderStream(model, blocks, batch_size)
        n = len(stream.layers)
        losses = []
        for l in tqdm(range(n), desc="depth (ppl)", disable=not progress):
            losses.append(stream.tail_loss(range(l + 1, n)))
            stream.advance(l)
    return torch.tensor(losses, dtype=torch.float32)


@torch.no_grad()
def head_drop_losses(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """LM loss with each query head removed in turn (its ``o_proj`` input zeroed; K/V untouched).

    Args:
        model: a supported causal LM (left unchanged).
        blocks: LongTensor (n, S) calibration ids.
        batch_size: blocks per forward.
        progress: tqdm bar.
    Returns:
        (L, n_heads) fp32 losses; higher means the head matters more.
    Example:
        >>> head_drop_losses(model, blocks[:4]).shape  # (num_hidden_layers, num_attention_heads)
    """
    n_heads = model.config.num_attention_heads
    with eval_mode(model):
        stream = DecoderStream(model, blocks, batch_size)
        n = len(stream.layers)
        losses = torch.zeros(n, n_heads, dtype=torch.float32)
        for l in tqdm(range(n), desc="heads (loss)", disable=not progress):
            for h in range(n_heads):
                with heads_zeroed(model, l, [h]):
                    losses[l, h] = stream.tail_loss(range(l, n))
            stream.advance(l)
    return losses


@torch.no_grad()
def greedy_layer_removal(
    model: nn.Module, blocks: torch.Tensor, drop: int, step: int = 1, batch_size: int = 8, progress: bool = False
) -> list[int]:
    """Remove ``drop`` layers, ``step`` at a time, re-scoring the shrunk model between steps.

    Each round scores every remaining layer by the LM loss with it dropped (on the model with the
    layers removed so far) and removes the ``step`` lowest. ``step >= drop`` is the one-shot
    perplexity criterion; ``step=1`` is fully iterative.

    Args:
        model: a supported causal LM (left unchanged).
        blocks: LongTensor (n, S) calibration ids.
        drop: layers to remove.
        step: layers removed per round.
        batch_size: blocks per forward.
        progress: tqdm bar.
    Returns:
        Original indices of the removed layers, in removal order.
    Example:
        >>> greedy_layer_removal(model, blocks[:8], drop=4, step=2)
        [12, 17, 20, 9]
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    with eval_mode(model):
        stream = DecoderStream(model, blocks, batch_size)
        kept = list(range(len(stream.layers)))
        removed: list[int] = []
        rounds = range(0, drop, step)
        for done in tqdm(rounds, desc="depth (iterative ppl)", disable=not progress):
            stream.reset()
            losses = []
            for pos, l in enumerate(kept):
                losses.append(stream.tail_loss(kept[pos + 1 :]))
                stream.advance(l)
            order = sorted(range(len(kept)), key=losses.__getitem__)  # least harmful removal first
            batch = [kept[i] for i in order[: min(step, drop - done)]]
            removed += batch
            kept = [l for l in kept if l not in batch]
    return removed
