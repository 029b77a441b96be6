"""Activation-based importance of every prunable axis, from forward passes only.

One calibration pass with forward hooks (docs/method.md section 1) streams fp32
accumulators for
- MLP neurons: the input of ``down_proj`` (B, S, f),
- attention heads: the input of ``o_proj`` (B, S, n_heads * head_dim) (the paper's ``input``
  criterion) and each head's contribution after ``o_proj`` (B, S, n_heads) (``output``),
- embedding channels: the output of every norm feeding a block and the final norm (B, S, D),
  and, for RMSNorms, the mean normalised square of their inputs (to rescale the kept norm
  weights after hidden pruning, :mod:`minitron.importance.norms`),
- depth (Block Importance): row-wise cosine between each layer's input and output.
Loss-based scores (drop one layer, or one head, and measure the LM loss) re-run part of the
model per layer or head (:mod:`minitron.evaluation`) and run only when asked.

Raw running sums are kept (not scores), so the batch aggregation can be chosen
at prune time and one calibration serves many targets: :class:`ImportanceScores`
saves to and loads from a safetensors file. The options and the statistics themselves
(:class:`ImportanceConfig`, :class:`ImportanceScores`) live in :mod:`minitron.importance.scores`
and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..evaluation import lm_loss
from .ablation import head_drop_losses, layer_drop_losses
from ..offload import check_loadable, execution_device, execution_devices
from ..validate import check_token_ids
from .scores import (DEFAULT_DEPTH_METRIC, DEPTH_METRICS, ImportanceConfig, ImportanceScores, is_importance_file,
                     model_shape_meta)

__all__ = ["DEFAULT_DEPTH_METRIC", "DEPTH_METRICS", "ImportanceConfig", "ImportanceScores", "check_blocks",
           "collect_importance", "is_importance_file", "model_shape_meta"]

logger = logging.getLogger(__name__)



@torch.no_grad()
def collect_importance(
    model: nn.Module,
    blocks: torch.Tensor,
    config: ImportanceConfig | None = None,
    progress: bool = True,
) -> ImportanceScores:
    """Run calibration forward passes and return raw importance statistics.

    The passes run the decoder stack only (embeddings, layers, final norm): no lm_head and no
    logits, which no importance site needs. Only ``config.depth_ppl`` evaluates the LM loss,
    through the chunked cross-entropy (:func:`lm_loss`). The hooks are
    :class:`minitron.importance.hooks.CalibrationHooks` (batched per-site updates), set up by
    :class:`CalibrationSession`. A model dispatched with accelerate (``device_map``, cpu/disk
    offload) runs on its hooks' execution device.

    Args:
        model: a supported Hugging Face causal LM (left unchanged).
        blocks: LongTensor (n, seq_len) of calibration token ids (see :func:`minitron.data.load_text_blocks`).
        config: aggregation and batching options.
        progress: show a tqdm bar.
    Returns:
        :class:`ImportanceScores` for this model. Under ``torchrun`` (an initialised process group) each
        rank calibrates its share of ``blocks`` and every rank returns the statistics of all of them
        (:mod:`minitron.importance.ranks`; loss-based scores are computed on every rank).

    Example:
        >>> scores = collect_importance(model, blocks, ImportanceConfig(batch_size=4))
        >>> scores.mlp().shape  # (num_layers, intermediate_size)
    """
    config = config or ImportanceConfig()
    if config.head_output is None:  # automatic: on, so the scores fit prune's default head criterion later
        config = dataclasses.replace(config, head_output=True)
    adapter = get_adapter(model)
    check_blocks(model, blocks, config)
    check_loadable(model, "minitron.collect_importance")
    devices = execution_devices(model)
    if len(devices) > 1:
        raise ValueError(f"calibration needs one execution device, but the model's device_map spreads it over "
                         f"{', '.join(map(str, devices))}; dispatch it to one device (offloading the rest to cpu/disk) "
                         "or use minitron.prune_checkpoint, which calibrates layer by layer")
    device = execution_device(model)  # from accelerate's hooks when dispatched: never a meta parameter's
    from .ranks import rank_blocks
    from .session import CalibrationSession  # (imports this module)

    sink = config.sink_tokens
    local = rank_blocks(blocks)  # under torchrun: this rank's share; the sums are added over the ranks
    was_training = model.training
    model.eval()
    base = model.get_submodule(adapter.layers.rsplit(".", 1)[0])  # the decoder stack: no lm_head, no logits
    try:
        with CalibrationSession(model, config, device) as session:
            hooks = session.hooks
            for start in tqdm(range(0, local.shape[0], config.batch_size), desc="calibration", disable=not progress):
                batch = local[start : start + config.batch_size].to(device)  # (B, S)
                hooks.begin_batch(batch.shape[0], batch.shape[1] - sink)  # per-batch buffers before the pass
                base(input_ids=batch, use_cache=False)
                hooks.end_batch()  # all sites' running sums updated at once
    finally:
        model.train(was_training)

    scores = session.scores(blocks.shape[0], blocks.shape[1])
    if config.depth_ppl:
        ppl_blocks = blocks[: config.ppl_max_blocks]
        scores.base_loss = lm_loss(model, ppl_blocks, config.batch_size, progress=False)
        scores.ppl_loss = layer_drop_losses(model, ppl_blocks, config.batch_size, progress)
    if config.head_loss:
        scores.head_loss = head_drop_losses(model, blocks[: config.head_loss_blocks], config.batch_size, progress)
    return scores


def check_blocks(model: nn.Module, blocks: torch.Tensor, config: ImportanceConfig) -> None:
    """Raise a one-line ``ValueError`` for calibration blocks the model cannot take (empty, ids, sink).

    Args:
        model: the model (or skeleton) to calibrate; its embedding's row count is the vocabulary.
        blocks: LongTensor (n, seq_len).
        config: the calibration options (``sink_tokens``).
    """
    if blocks.numel() == 0 or blocks.dim() != 2:
        raise ValueError("empty calibration data: blocks must be a non-empty LongTensor (n_blocks, seq_len)")
    check_token_ids(model, blocks, "calibration data")
    if config.sink_tokens >= blocks.shape[1]:
        raise ValueError(f"sink_tokens={config.sink_tokens} leaves no position of the {blocks.shape[1]}-token blocks")
