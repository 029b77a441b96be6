"""Layer-streamed calibration: importance statistics of a checkpoint with one decoder layer in memory.

The mechanism of llm-compressor's sequential onloading and ModelOpt's layerwise calibration, on
minitron's own hooks (:class:`~minitron.importance.session.CalibrationSession`):

1. the model is a ``meta`` skeleton (:func:`minitron.streaming.checkpoint.skeleton`);
2. the embedding output of every calibration batch is computed from only the embedding rows the
   blocks use (read in row chunks), and each layer's keyword arguments (rotary tables, masks) are
   captured once (:class:`minitron.evaluation.DecoderStream`, identity layers);
3. layer ``l`` is read from the checkpoint (each tensor once), every batch's cached hidden states
   (B, S, D) run through it with the hooks attached (the output replaces the input), and the
   layer is put back on ``meta``; then the final norm.

Every site sees exactly the activations of a whole-model pass, so the statistics equal
:func:`minitron.collect_importance` on the loaded model. Peak memory: one layer's weights, the
cached hidden states of all blocks, one batch's activations inside a layer
(:func:`expected_peak_bytes`). Loss-based scores (layer-drop ``ppl``, per-head ``loss``) need
repeated passes over the whole model and are not computed here (the caller falls back to the
activation criteria and says so).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import decoder_layers, get_adapter, head_dim_of, kv_heads_of
from ..evaluation import DecoderStream
from ..heap import trim_heap
from ..importance.collect import ImportanceConfig, ImportanceScores, check_blocks
from ..importance.ranks import rank_blocks
from ..importance.session import CalibrationSession
from ..validate import _all_finite
from .checkpoint import CheckpointReader, load_module_, release_module_

__all__ = ["expected_peak_bytes", "streamed_importance"]

ROW_CHUNK_BYTES = 16 << 20  # embedding rows read per step


def _embedding_rows(reader: CheckpointReader, key: str, ids: torch.Tensor, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Rows ``ids`` (sorted, unique) of the (V, D) embedding ``key``, read in row chunks: (len(ids), D)."""
    vocab, width = reader.shape(key)
    out = torch.empty(ids.numel(), width, dtype=dtype, device=device)  # (U, D)
    step = max(1, ROW_CHUNK_BYTES // max(1, width * reader.dtype(key).itemsize))
    for start in range(0, vocab, step):
        stop = min(vocab, start + step)
        hit = ((ids >= start) & (ids < stop)).nonzero().flatten()
        if hit.numel() == 0:  # no calibration token in these rows: not read
            continue
        rows = reader.read(key, start, stop)[ids[hit] - start]  # (n, D)
        if rows.is_floating_point() and not _all_finite(rows):
            raise ValueError(f"the checkpoint's weight {key} holds NaN/inf values; the checkpoint is corrupt or "
                             "overflowed")
        out[hit.to(device)] = rows.to(device=device, dtype=dtype)
    return out


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the skeleton's real buffers (rotary tables, embedding scales) to the compute device."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[name] = buf.to(device)


def _embedded_stream(model: nn.Module, reader: CheckpointReader, blocks: torch.Tensor, batch_size: int,
                     dtype: torch.dtype, device: torch.device) -> DecoderStream:
    """Each batch's layer-0 input and per-layer arguments, with a compact embedding of the used token ids.

    The embedding module runs its own forward (a scaled embedding keeps its scale) on ids remapped
    into the compact table of the ``U`` distinct ids the blocks use ((U, D) instead of (V, D)).
    """
    adapter = get_adapter(model)
    embed = model.get_submodule(adapter.embed)
    used = torch.unique(blocks)  # (U,) sorted
    saved, padding = embed._parameters["weight"], getattr(embed, "padding_idx", None)
    embed._parameters["weight"] = nn.Parameter(
        _embedding_rows(reader, f"{adapter.embed}.weight", used, dtype, device), requires_grad=False)
    embed.padding_idx = None  # an index of the full table (only the gradient uses it)
    try:
        return DecoderStream(model, torch.searchsorted(used, blocks), batch_size, resettable=False)
    finally:
        embed._parameters["weight"] = saved
        embed.padding_idx = padding


@torch.no_grad()
def streamed_importance(reader: CheckpointReader, model: nn.Module, blocks: torch.Tensor,
                        config: ImportanceConfig | None = None, device: str | torch.device = "cpu",
                        progress: bool = True) -> ImportanceScores:
    """Importance statistics of a checkpoint, calibrated one decoder layer at a time.

    Args:
        reader: the checkpoint folder's :class:`~minitron.streaming.checkpoint.CheckpointReader`.
        model: its ``meta`` skeleton (:func:`~minitron.streaming.checkpoint.skeleton`); left on ``meta``.
        blocks: LongTensor (n, seq_len) of calibration token ids.
        config: aggregation and batching options (``depth_ppl`` / ``head_loss`` are not available).
        device: where layers run and statistics live (``cpu``, ``cuda``).
        progress: tqdm bar over the layers.
    Returns:
        :class:`~minitron.importance.collect.ImportanceScores`, equal to ``collect_importance`` on the
        loaded model (same dtype). Under ``torchrun`` each rank streams its share of ``blocks`` and all
        ranks return the summed statistics.
    Raises:
        ValueError: bad blocks, ``depth_ppl`` / ``head_loss`` requested, NaN/inf weights.
    Example:
        >>> reader = CheckpointReader("ckpt/")
        >>> scores = streamed_importance(reader, skeleton("ckpt/", None, reader), blocks)
    """
    config = config or ImportanceConfig()
    if config.depth_ppl or config.head_loss:
        raise ValueError("layer-streamed calibration computes activation statistics only: layer-drop (depth_ppl) "
                         "and head-drop (head_loss) losses need repeated passes over the whole model; use "
                         "depth_metric='bi' and head_metric='output' (or 'input')")
    adapter = get_adapter(model)
    check_blocks(model, blocks, config)
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    _buffers_to(model, device)
    was_training = model.training
    model.eval()
    layers = decoder_layers(model, adapter)
    final_norm = model.get_submodule(adapter.final_norm)
    try:
        # under torchrun each rank runs its share of the blocks through every layer; sums added at the end
        stream = _embedded_stream(model, reader, rank_blocks(blocks), config.batch_size, dtype, device)
        with CalibrationSession(model, config, device) as session:
            hooks, sink = session.hooks, config.sink_tokens

            def run(fn, b: int) -> None:
                batch, seq = stream.hidden[b].shape[:2]
                hooks.begin_batch(batch, seq - sink)  # per-batch buffers before the pass
                fn(b)
                hooks.end_batch()  # the sites of this layer folded (the others did not fire)

            for l in tqdm(range(len(layers)), desc="calibration (layers)", disable=not progress):
                load_module_(layers[l], f"{adapter.layers}.{l}.", reader, device, dtype)
                try:
                    for b in range(len(stream.hidden)):
                        run(lambda b: stream.step(l, b), b)
                finally:
                    release_module_(layers[l])
                trim_heap()  # the layer's weights and its freed activations go back to the OS
            load_module_(final_norm, f"{adapter.final_norm}.", reader, device, dtype)
            try:
                for b in range(len(stream.hidden)):
                    run(lambda b: final_norm(stream.hidden[b]), b)
            finally:
                release_module_(final_norm)
    finally:
        model.train(was_training)
    return session.scores(blocks.shape[0], blocks.shape[1])


def expected_peak_bytes(config, num_samples: int, seq_len: int, batch_size: int, weight_bytes: int = 2,
                        act_bytes: int = 4) -> dict[str, int]:
    """The memory the streamed prune holds at its peak (calibration), by part, from a model config.

    Calibration holds one decoder layer's weights (``weight_bytes`` per parameter), the cached hidden
    states of every calibration block (``num_samples * seq_len * hidden * act_bytes``, plus the
    per-batch rotary tables), one batch's working set inside a layer (q/k/v/o and the MLP's gate/up/act
    activations, the attention scores of one batch (B, heads, S, S) in fp32) and, while a tensor is
    read, its file pages (the largest weight of a layer). The write pass holds about four row chunks
    (:data:`minitron.streaming.write.CHUNK_BYTES`: file pages, rows read, head fold, kept part). The
    peak is the larger of the two.

    Args:
        config: a Hugging Face config (dense family).
        num_samples: calibration blocks.
        seq_len: tokens per block.
        batch_size: blocks per forward.
        weight_bytes: bytes per weight in the compute dtype (2: bf16, 4: fp32).
        act_bytes: bytes per activation element (the compute dtype's).
    Returns:
        ``{"layer", "cached_hidden", "batch_working_set", "read_pages", "calibration", "write_pass", "total"}``
        in bytes.
    Example:
        >>> expected_peak_bytes(LlamaConfig(), 64, 256, 8)["total"] / 2**30
    """
    d, f = config.hidden_size, config.intermediate_size
    hd = head_dim_of(config)
    heads, kv = config.num_attention_heads, kv_heads_of(config)
    attn = d * heads * hd * 2 + d * kv * hd * 2  # q, o + k, v
    layer = (attn + 3 * d * f + 2 * d) * weight_bytes
    tokens = num_samples * seq_len
    cached = tokens * d * act_bytes + -(-num_samples // batch_size) * 2 * seq_len * hd * act_bytes * batch_size
    b_tokens = min(batch_size, num_samples) * seq_len
    working = b_tokens * (3 * d + 2 * heads * hd + 2 * kv * hd + 3 * f) * act_bytes \
        + min(batch_size, num_samples) * heads * seq_len * seq_len * 4
    from .write import CHUNK_BYTES

    pages = max(d * f, d * heads * hd) * weight_bytes  # the largest weight of a layer, mapped while read
    calibration = layer + cached + working + pages
    write_pass = 4 * CHUNK_BYTES
    return {"layer": layer, "cached_hidden": cached, "batch_working_set": working, "read_pages": pages,
            "calibration": calibration, "write_pass": write_pass, "total": max(calibration, write_pass)}
