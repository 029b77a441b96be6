"""Layer-drop losses (the ``ppl`` depth criterion) of a checkpoint with one decoder layer in memory.

:func:`minitron.importance.ablation.layer_drop_losses` re-runs the tail of the loaded model once per dropped
layer (~L/2 passes over the weights). Streamed, the weights are read once instead: every "layer l
dropped" variant is a *branch* of hidden states carried alongside the main stream. When layer ``j``
is in memory it is applied to every open branch (``l < j``), then branch ``j`` opens with layer
``j``'s input (it skips ``j``) and the main stream runs ``j``. After the last layer, the final norm
and the ``lm_head`` (read whole, or the tied embedding) give each branch's loss and the main stream's
(the base loss). The arithmetic per batch is that of the in-memory path (same layers, same
arguments, same chunked cross-entropy), only in another order.

Memory: ``L`` branches of ``ppl_blocks x S x D`` activations plus the ``lm_head``
(:func:`layer_drop_bytes`); :func:`minitron.prune_checkpoint` uses this when it fits its budget and
falls back to Block Importance otherwise, saying so.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import decoder_layers, get_adapter
from ..evaluation import _next_token_loss_sum
from ..heap import trim_heap
from ..losses.cross_entropy import softcap_of
from .calibrate import _buffers_to, _embedded_stream
from .checkpoint import CheckpointReader, load_module_, release_module_

__all__ = ["layer_drop_bytes", "streamed_layer_drop_losses"]


def layer_drop_bytes(config, ppl_blocks: int, seq_len: int, act_bytes: int, weight_bytes: int) -> int:
    """Extra memory of :func:`streamed_layer_drop_losses`: ``L + 1`` hidden-state copies and the lm_head.

    Args:
        config: the model's config.
        ppl_blocks: calibration blocks scored.
        seq_len: tokens per block.
        act_bytes / weight_bytes: bytes per activation / weight element in the compute dtype.
    Returns:
        Bytes.
    """
    streams = (config.num_hidden_layers + 1) * ppl_blocks * seq_len * config.hidden_size * act_bytes
    return streams + config.vocab_size * config.hidden_size * weight_bytes


def _loss(hidden: list[torch.Tensor], ids: list[torch.Tensor], norm: nn.Module, head: torch.Tensor,
          bias: torch.Tensor | None, softcap: float | None) -> float:
    """Token-mean next-token loss of per-batch hidden states (B, S, D), as ``DecoderStream.tail_loss``."""
    total, tokens = 0.0, 0
    for h, y in zip(hidden, ids):
        batch_total, batch_tokens = _next_token_loss_sum(norm(h), y, head, bias, 1024, softcap)
        total += batch_total
        tokens += batch_tokens
    return total / max(tokens, 1)


@torch.no_grad()
def streamed_layer_drop_losses(reader: CheckpointReader, model: nn.Module, blocks: torch.Tensor, batch_size: int,
                               device: str | torch.device = "cpu",
                               progress: bool = True) -> tuple[float, torch.Tensor]:
    """The base loss and the loss with each layer dropped, each layer read from the checkpoint once.

    Args:
        reader: the checkpoint folder's reader.
        model: its ``meta`` skeleton (left on ``meta``).
        blocks: LongTensor (n, S) of token ids (``ImportanceConfig.ppl_max_blocks`` of the calibration).
        batch_size: blocks per forward.
        device: compute device.
        progress: tqdm bar over the layers.
    Returns:
        ``(base_loss, losses (L,) fp32)``: :func:`minitron.lm_loss` and
        :func:`minitron.importance.ablation.layer_drop_losses` of the loaded model.
    Example:
        >>> base, losses = streamed_layer_drop_losses(reader, skeleton(path, None, reader), blocks[:32], 8)
    """
    adapter = get_adapter(model)
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    _buffers_to(model, device)
    model.eval()
    layers = decoder_layers(model, adapter)
    stream = _embedded_stream(model, reader, blocks, batch_size, dtype, device)
    ids = [blocks[s : s + batch_size].to(device) for s in range(0, blocks.shape[0], batch_size)]  # original ids
    branches: list[list[torch.Tensor]] = []  # branches[l][b]: batch b's hidden states with layer l skipped
    for j in tqdm(range(len(layers)), desc="depth (ppl, streamed)", disable=not progress):
        load_module_(layers[j], f"{adapter.layers}.{j}.", reader, device, dtype)
        try:
            for branch in branches:
                for b, h in enumerate(branch):
                    branch[b] = stream.run_layer(j, b, h)
            branches.append(list(stream.hidden))  # layer j's input, carried past it
            for b in range(len(stream.hidden)):
                stream.step(j, b)
        finally:
            release_module_(layers[j])
        trim_heap()
    norm = model.get_submodule(adapter.final_norm)
    head_key = f"{adapter.lm_head}.weight" if f"{adapter.lm_head}.weight" in reader.files else f"{adapter.embed}.weight"
    load_module_(norm, f"{adapter.final_norm}.", reader, device, dtype)
    try:
        head = reader.read(head_key).to(device=device, dtype=dtype)  # (V, D)
        bias_key = f"{adapter.lm_head}.bias"
        bias = reader.read(bias_key).to(device=device, dtype=dtype) if bias_key in reader.files else None
        softcap = softcap_of(model)
        base = _loss(stream.hidden, ids, norm, head, bias, softcap)
        losses = [_loss(branch, ids, norm, head, bias, softcap) for branch in branches]
    finally:
        release_module_(norm)
    return base, torch.tensor(losses, dtype=torch.float32)
