"""Activation-based importance of every prunable axis, from forward passes only.

One calibration pass with forward hooks (METHOD.md section 1) streams fp32
accumulators for
- MLP neurons: the input of ``down_proj`` (B, S, f),
- attention heads: the input of ``o_proj`` (B, S, n_heads * head_dim),
- embedding channels: the output of every norm feeding a block and the final norm (B, S, D),
- depth (Block Importance): row-wise cosine between each layer's input and output.
Depth by perplexity (drop one layer, measure LM loss) needs one extra pass per
layer and runs only when asked.

Raw running sums are kept (not scores), so the batch aggregation can be chosen
at prune time and one calibration serves many targets: :class:`ImportanceScores`
saves to and loads from a safetensors file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import FamilyAdapter, decoder_layers, get_adapter, head_dim_of, kv_heads_of
from ..losses.cross_entropy import linear_cross_entropy_sum
from .aggregate import check_aggregation, finalize
from .hooks import CalibrationHooks, _layer_io

logger = logging.getLogger(__name__)

DEPTH_METRICS = ("bi", "ppl")


@dataclass
class ImportanceConfig:
    """How importance is estimated.

    Args:
        seq_agg: sequence aggregation at calibration time (``mean`` | ``l2`` | ``var``).
        batch_agg: default batch aggregation when turning sums into scores (``l2`` | ``mean`` | ``var``).
        batch_size: calibration sequences per forward pass.
        depth_ppl: also score layers by the LM-loss increase when each is dropped.
        ppl_max_blocks: calibration blocks used for the per-layer perplexity passes.
    """

    seq_agg: str = "mean"
    batch_agg: str = "l2"
    batch_size: int = 8
    depth_ppl: bool = False
    ppl_max_blocks: int = 32

    def __post_init__(self) -> None:
        check_aggregation(self.batch_agg, self.seq_agg)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class ImportanceScores:
    """Raw importance statistics of one model, reusable for many pruning targets.

    ``sums[site] = (sum_x, sum_x2)`` fp32 per channel and ``counts[site]`` the number
    of samples, for sites ``mlp.{l}``, ``attn.{l}``, ``norm.{l}.{k}`` and ``norm.final``.
    ``bi_cos_sum`` (L,) sums the per-token cosine between layer input and output over
    ``bi_count`` tokens. ``ppl_loss`` (L,) is the calibration LM loss with layer l dropped.
    """

    meta: dict
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]]
    counts: dict[str, int]
    bi_cos_sum: torch.Tensor
    bi_count: int
    ppl_loss: torch.Tensor | None = None
    base_loss: float | None = None
    batch_agg: str = "l2"

    def site_scores(self, site: str, batch_agg: str | None = None) -> torch.Tensor:
        sum_x, sum_x2 = self.sums[site]
        return finalize(sum_x, sum_x2, self.counts[site], batch_agg or self.batch_agg)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_hidden_layers"])

    def mlp(self, batch_agg: str | None = None) -> torch.Tensor:
        """Neuron scores (L, f)."""
        return torch.stack([self.site_scores(f"mlp.{l}", batch_agg) for l in range(self.num_layers)])

    def heads(self, batch_agg: str | None = None) -> torch.Tensor:
        """Query-head scores (L, n_heads): per-channel scores, L2 over head_dim."""
        n_heads, head_dim = self.meta["num_attention_heads"], self.meta["head_dim"]
        per_channel = torch.stack([self.site_scores(f"attn.{l}", batch_agg) for l in range(self.num_layers)])
        return per_channel.view(self.num_layers, n_heads, head_dim).norm(dim=-1)

    def hidden(self, batch_agg: str | None = None) -> torch.Tensor:
        """Embedding-channel scores (D,): sum over all norm sites of the per-site scores."""
        sites = [s for s in self.sums if s.startswith("norm.")]
        return torch.stack([self.site_scores(s, batch_agg) for s in sites]).sum(dim=0)

    def depth(self, metric: str = "bi") -> torch.Tensor:
        """Layer scores (L,), higher = more important.

        ``bi``: Block Importance ``1 - mean cos(h_in, h_out)``; ``ppl``: LM loss with the layer removed.
        """
        if metric == "bi":
            return 1.0 - self.bi_cos_sum / max(self.bi_count, 1)
        if metric == "ppl":
            if self.ppl_loss is None:
                raise ValueError(
                    "depth metric 'ppl' needs per-layer perplexity scores; calibrate with "
                    "ImportanceConfig(depth_ppl=True) (CLI: --depth-metric ppl)"
                )
            return self.ppl_loss.clone()
        raise ValueError(f"unknown depth metric {metric!r}; allowed values: {', '.join(DEPTH_METRICS)}")

    def save(self, path: str | Path) -> None:
        """Write all statistics to one safetensors file (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for site, (sum_x, sum_x2) in self.sums.items():
            tensors[f"{site}.sum_x"] = sum_x.contiguous().cpu()
            tensors[f"{site}.sum_x2"] = sum_x2.contiguous().cpu()
        tensors["bi_cos_sum"] = self.bi_cos_sum.cpu()
        if self.ppl_loss is not None:
            tensors["ppl_loss"] = self.ppl_loss.cpu()
        header = {
            "meta": self.meta, "counts": self.counts, "bi_count": self.bi_count,
            "base_loss": self.base_loss, "batch_agg": self.batch_agg, "format": "minitron-importance-v1",
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"minitron": json.dumps(header)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceScores":
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"importance file not found: {path}; create it with `minitron prune --save-scores`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("minitron", "{}"))
        if header.get("format") != "minitron-importance-v1":
            raise ValueError(f"{path} is not a minitron importance file")
        tensors = load_file(str(path))
        sums = {site: (tensors[f"{site}.sum_x"], tensors[f"{site}.sum_x2"]) for site in header["counts"]}
        return cls(
            meta=header["meta"], sums=sums, counts={k: int(v) for k, v in header["counts"].items()},
            bi_cos_sum=tensors["bi_cos_sum"], bi_count=int(header["bi_count"]),
            ppl_loss=tensors.get("ppl_loss"), base_loss=header.get("base_loss"), batch_agg=header["batch_agg"],
        )

    def check_matches(self, model: nn.Module) -> None:
        """Raise if these scores were computed on a model of another shape."""
        for key, value in model_shape_meta(model).items():
            if self.meta.get(key) != value:
                raise ValueError(
                    f"importance scores were computed for {key}={self.meta.get(key)} but the model has "
                    f"{key}={value}; recompute scores for this model"
                )


def model_shape_meta(model: nn.Module) -> dict:
    c = model.config
    return {
        "model_type": c.model_type, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": kv_heads_of(c),
        "num_hidden_layers": c.num_hidden_layers, "head_dim": head_dim_of(c),
    }


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
    :class:`minitron.importance.hooks.CalibrationHooks` (batched per-site updates).

    Args:
        model: a supported Hugging Face causal LM (left unchanged).
        blocks: LongTensor (n, seq_len) of calibration token ids (see :func:`minitron.data.load_text_blocks`).
        config: aggregation and batching options.
        progress: show a tqdm bar.
    Returns:
        :class:`ImportanceScores` for this model.

    Example:
        >>> scores = collect_importance(model, blocks, ImportanceConfig(batch_size=4))
        >>> scores.mlp().shape  # (num_layers, intermediate_size)
    """
    config = config or ImportanceConfig()
    adapter = get_adapter(model)
    if blocks.numel() == 0 or blocks.dim() != 2:
        raise ValueError("empty calibration data: blocks must be a non-empty LongTensor (n_blocks, seq_len)")
    device = next(model.parameters()).device
    meta = model_shape_meta(model)
    meta.update(seq_agg=config.seq_agg, num_samples=int(blocks.shape[0]), seq_len=int(blocks.shape[1]))

    was_training = model.training
    model.eval()
    base = model.get_submodule(adapter.layers.rsplit(".", 1)[0])  # the decoder stack: no lm_head, no logits
    try:
        with CalibrationHooks(model, adapter, config.seq_agg) as hooks:
            for start in tqdm(range(0, blocks.shape[0], config.batch_size), desc="calibration", disable=not progress):
                batch = blocks[start : start + config.batch_size].to(device)  # (B, S)
                hooks.begin_batch(*batch.shape)  # per-batch buffers allocated before the pass
                base(input_ids=batch, use_cache=False)
                hooks.end_batch()  # all sites' running sums updated at once
    finally:
        model.train(was_training)

    scores = ImportanceScores(
        meta=meta,
        sums=hooks.site_sums(),
        counts=dict(hooks.counts),
        bi_cos_sum=hooks.bi_cos_sum.cpu(),
        bi_count=hooks.bi_count,
        batch_agg=config.batch_agg,
    )
    if config.depth_ppl:
        ppl_blocks = blocks[: config.ppl_max_blocks]
        scores.base_loss = lm_loss(model, ppl_blocks, config.batch_size, progress=False)
        scores.ppl_loss = layer_drop_losses(model, ppl_blocks, config.batch_size, adapter, progress)
    return scores


class _SkipLayer:
    """Forward hook that turns a decoder layer into the identity (its output = its input)."""

    def __call__(self, module, args, kwargs, output):
        h_in, _ = _layer_io(args, kwargs, output)
        if isinstance(output, tuple):
            return (h_in, *output[1:])
        return h_in


@torch.no_grad()
def lm_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False,
            chunk_size: int = 1024) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` (n, S); exp() of it is the perplexity.

    Runs the decoder, then the chunked cross-entropy over ``chunk_size`` tokens at a time
    (:func:`minitron.losses.cross_entropy.linear_cross_entropy_sum`): no (B, S, V) fp32 logits.

    Args:
        model: a supported causal LM (decoder stack + final norm + lm_head).
        blocks: LongTensor (n, seq_len).
        batch_size: blocks per forward pass.
        progress: tqdm bar.
        chunk_size: tokens per (chunk, V) logits tile.
    Returns:
        Token-weighted mean loss (nats).
    Example:
        >>> math.exp(lm_loss(model, blocks))  # perplexity
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)  # (V, H), (V,) | None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="eval", disable=not progress):
            batch = blocks[start : start + batch_size].to(device)  # (B, S)
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state  # (B, S, H), normed
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(S-1), H)
            total += linear_cross_entropy_sum(h, weight, batch[:, 1:].reshape(-1), bias, chunk_size=chunk_size).item()
            tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean LM loss) of ``model`` on ``blocks`` (n, seq_len)."""
    return math.exp(lm_loss(model, blocks, batch_size))


def layer_drop_losses(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, adapter: FamilyAdapter, progress: bool = True
) -> torch.Tensor:
    """LM loss with each decoder layer removed in turn -> (L,); higher means the layer matters more."""
    layers = decoder_layers(model, adapter)
    losses = []
    for layer in tqdm(layers, desc="depth (ppl)", disable=not progress):
        handle = layer.register_forward_hook(_SkipLayer(), with_kwargs=True)
        try:
            losses.append(lm_loss(model, blocks, batch_size))
        finally:
            handle.remove()
    return torch.tensor(losses, dtype=torch.float32)
