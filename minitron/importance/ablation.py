"""Iterative layer removal: the layer-drop loss criterion re-applied to the shrinking model.

One-shot layer-drop losses (:func:`minitron.evaluation.layer_drop_losses`) rank every layer on the
full model; :func:`greedy_layer_removal` removes a few at a time and re-scores the rest, ~``(k / r) * L / 2``
forwards of the whole model for ``k`` layers removed ``r`` per round.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation import DecoderStream, eval_mode

__all__ = ["greedy_layer_removal"]


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
