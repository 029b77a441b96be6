"""The options of a calibration (:class:`ImportanceConfig`) and what it records (:class:`ImportanceScores`).

Raw running sums are kept (not scores), so the batch aggregation can be chosen at prune time and
one calibration serves many targets: :class:`ImportanceScores` saves to and loads from a
safetensors file. :func:`minitron.importance.collect.collect_importance` fills them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import head_dim_of, kv_heads_of, moe_sizes, moe_spec_of
from ..validate import check_count
from .aggregate import check_aggregation, finalize
from .heads import DEFAULT_HEAD_METRIC, check_head_metric

__all__ = ["DEFAULT_DEPTH_METRIC", "DEPTH_METRICS", "ImportanceConfig", "ImportanceScores", "is_importance_file",
           "model_shape_meta"]

DEPTH_METRICS = ("ppl", "bi")
DEFAULT_DEPTH_METRIC = "ppl"  # measured best on SmolLM2-135M (benchmarks/results/prune_quality_real.md)


@dataclass
class ImportanceConfig:
    """How importance is estimated.

    Args:
        seq_agg: sequence aggregation at calibration time (``mean`` | ``l2`` | ``var``).
        batch_agg: default batch aggregation when turning sums into scores (``l2`` | ``mean`` | ``var``).
        batch_size: calibration sequences per forward pass.
        depth_ppl: also score layers by the LM loss when each is dropped (~L/2 extra forwards
            over ``ppl_max_blocks`` blocks).
        ppl_max_blocks: calibration blocks used for the per-layer perplexity passes.
        head_loss: also score query heads by the LM loss when each is dropped (~n_heads * L / 2
            extra forwards over ``head_loss_blocks`` blocks).
        head_loss_blocks: calibration blocks used for the per-head loss passes.
        head_output: also score query heads by their contribution after ``o_proj`` (the default
            ``head_metric="output"``; a (hd, hd) product per head and token, ~5% of a calibration
            pass on SmolLM2-135M). ``None`` (default): on in :func:`collect_importance` (so its
            scores serve ``minitron.prune``'s default head criterion on any later target), and in
            ``minitron.prune`` only when the target prunes heads.
        sink_tokens: leading positions of every block left out of the activation statistics
            (attention sinks: the first tokens carry outsized activations in real models).
    """

    seq_agg: str = "mean"
    batch_agg: str = "l2"
    batch_size: int = 8
    depth_ppl: bool = False
    ppl_max_blocks: int = 32
    head_loss: bool = False
    head_loss_blocks: int = 8
    head_output: bool | None = None
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        check_aggregation(self.batch_agg, self.seq_agg)
        for name in ("batch_size", "ppl_max_blocks", "head_loss_blocks"):  # a bool or a float is refused too
            check_count(name, getattr(self, name))
        check_count("sink_tokens", self.sink_tokens, low=0)
        for name in ("depth_ppl", "head_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.head_output is not None and not isinstance(self.head_output, bool):
            raise ValueError(f"head_output must be True, False or None (automatic), got {self.head_output!r}")


@dataclass
class ImportanceScores:
    """Raw importance statistics of one model, reusable for many pruning targets.

    ``sums[site] = (sum_x, sum_x2)`` fp32 per channel and ``counts[site]`` the number
    of samples, for sites ``mlp.{l}``, ``attn.{l}`` (o_proj input channels), ``attn_out.{l}``
    (per-head contribution after o_proj), ``norm.{l}.{k}`` and ``norm.final``.
    ``norm_ms[site]`` (D,) is the mean over tokens of the squared normalised input of each
    RMSNorm site (:mod:`minitron.importance.norms`).
    ``bi_cos_sum`` (L,) sums the per-token cosine between layer input and output over
    ``bi_count`` tokens. ``ppl_loss`` (L,) is the calibration LM loss with layer l dropped,
    ``head_loss`` (L, n_heads) with one query head dropped.
    """

    meta: dict
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]]
    counts: dict[str, int]
    bi_cos_sum: torch.Tensor
    bi_count: int
    ppl_loss: torch.Tensor | None = None
    base_loss: float | None = None
    batch_agg: str = "l2"
    norm_ms: dict[str, torch.Tensor] = field(default_factory=dict)
    head_loss: torch.Tensor | None = None

    def site_scores(self, site: str, batch_agg: str | None = None) -> torch.Tensor:
        sum_x, sum_x2 = self.sums[site]
        return finalize(sum_x, sum_x2, self.counts[site], batch_agg or self.batch_agg)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_hidden_layers"])

    def mlp(self, batch_agg: str | None = None) -> torch.Tensor:
        """Neuron scores (L, f) of the dense MLPs (mixture-of-experts layers: :meth:`expert_mlp`)."""
        missing = [l for l in range(self.num_layers) if f"mlp.{l}" not in self.sums]
        if missing:
            raise ValueError(f"layers {missing} are mixture-of-experts layers without a dense MLP: read their neuron "
                             "scores with expert_mlp(layer) (and shared-expert ones with site_scores('shared_mlp.<l>'))")
        return torch.stack([self.site_scores(f"mlp.{l}", batch_agg) for l in range(self.num_layers)])

    def heads(self, batch_agg: str | None = None, metric: str = DEFAULT_HEAD_METRIC) -> torch.Tensor:
        """Query-head scores (L, n_heads), higher = more important.

        Args:
            batch_agg: batch aggregation (default: the stored one).
            metric: ``output`` (default): the head's contribution after o_proj (norm of ``W_o[:, h] @ a_h``);
                ``input`` (paper): per-channel scores of the o_proj input, L2 over head_dim;
                ``loss``: calibration LM loss with the head dropped (needs ``head_loss=True``).
        """
        check_head_metric(metric)
        if metric == "loss":
            if self.head_loss is None:
                raise ValueError("head metric 'loss' needs per-head loss scores; calibrate with "
                                 "ImportanceConfig(head_loss=True) (CLI: --head-metric loss)")
            return self.head_loss.clone()
        if metric == "output":
            if "attn_out.0" not in self.sums:
                raise ValueError("head metric 'output' needs per-head output norms; calibrate with "
                                 "ImportanceConfig(head_output=True), or rank heads by the paper's o_proj-input "
                                 "score with head_metric='input' (CLI: --head-metric input)")
            return torch.stack([self.site_scores(f"attn_out.{l}", batch_agg) for l in range(self.num_layers)])
        n_heads, head_dim = self.meta["num_attention_heads"], self.meta["head_dim"]
        per_channel = torch.stack([self.site_scores(f"attn.{l}", batch_agg) for l in range(self.num_layers)])
        return per_channel.view(self.num_layers, n_heads, head_dim).norm(dim=-1)

    def experts(self, layer: int, batch_agg: str | None = None) -> torch.Tensor:
        """Expert scores (E,) of a sparse layer: the norm of each expert's routed contribution to the
        residual stream, ``w_e(t) * ||expert_e(x_t)||`` (0 for tokens not routed to it), aggregated over
        tokens and samples like every activation site."""
        return self.site_scores(f"expert_out.{layer}", batch_agg)

    def expert_mlp(self, layer: int, batch_agg: str | None = None) -> torch.Tensor:
        """Per-expert neuron scores (E, F) of a sparse layer: each expert's down-projection input on the
        tokens routed to it, times the token's routing weight (0 elsewhere)."""
        n_experts = int(self.meta["num_experts"])
        return self.site_scores(f"expert_mlp.{layer}", batch_agg).view(n_experts, -1)

    def hidden(self, batch_agg: str | None = None) -> torch.Tensor:
        """Embedding-channel scores (D,): sum over all norm sites of the per-site scores."""
        sites = [s for s in self.sums if s.startswith("norm.")]
        return torch.stack([self.site_scores(s, batch_agg) for s in sites]).sum(dim=0)

    def depth(self, metric: str = DEFAULT_DEPTH_METRIC) -> torch.Tensor:
        """Layer scores (L,), higher = more important.

        ``ppl`` (default): LM loss with the layer removed (needs ``depth_ppl=True``); ``bi``: Block
        Importance ``1 - mean cos(h_in, h_out)`` (the paper's).
        """
        if metric == "bi":
            return 1.0 - self.bi_cos_sum / max(self.bi_count, 1)
        if metric == "ppl":
            if self.ppl_loss is None:
                raise ValueError(
                    "depth metric 'ppl' needs per-layer perplexity scores; calibrate with "
                    "ImportanceConfig(depth_ppl=True), or rank layers by Block Importance with depth_metric='bi' "
                    "(CLI: --depth-metric bi)"
                )
            return self.ppl_loss.clone()
        raise ValueError(f"unknown depth metric {metric!r}; allowed values: {', '.join(DEPTH_METRICS)}")

    def save(self, path: str | Path) -> None:
        """Write all statistics to one safetensors file (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for site, (sum_x, sum_x2) in self.sums.items():
            tensors[f"{site}.sum_x"] = sum_x.contiguous().cpu()
            tensors[f"{site}.sum_x2"] = sum_x2.contiguous().cpu()
        for site, mean_sq in self.norm_ms.items():
            tensors[f"{site}.norm_ms"] = mean_sq.contiguous().cpu()
        tensors["bi_cos_sum"] = self.bi_cos_sum.cpu()
        for name in ("ppl_loss", "head_loss"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous().cpu()
        header = {
            "meta": self.meta, "counts": self.counts, "bi_count": self.bi_count, "norm_sites": list(self.norm_ms),
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

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("minitron", "{}"))
            if header.get("format") != "minitron-importance-v1":
                raise ValueError("no minitron-importance-v1 header")
            tensors = load_file(str(path))
            sums = {site: (tensors[f"{site}.sum_x"], tensors[f"{site}.sum_x2"]) for site in header["counts"]}
            return cls(
                meta=header["meta"], sums=sums, counts={k: int(v) for k, v in header["counts"].items()},
                bi_cos_sum=tensors["bi_cos_sum"], bi_count=int(header["bi_count"]),
                ppl_loss=tensors.get("ppl_loss"), base_loss=header.get("base_loss"), batch_agg=header["batch_agg"],
                norm_ms={site: tensors[f"{site}.norm_ms"] for site in header.get("norm_sites", [])},
                head_loss=tensors.get("head_loss"),
            )
        except Exception as e:  # noqa: BLE001 - garbage, truncated or foreign files: one line naming the file
            raise ValueError(f"{path} is not a readable minitron importance file ({e}); recreate it with "
                             "`minitron prune --save-scores`") from None

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
    meta = {
        "model_type": c.model_type, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": kv_heads_of(c),
        "num_hidden_layers": c.num_hidden_layers, "head_dim": head_dim_of(c),
    }
    if moe_spec_of(c) is not None:
        meta.update(moe_sizes(c))
    return meta


def is_importance_file(path: Any) -> bool:
    """Whether ``path`` is a readable minitron importance file (a previous ``save_scores`` / ``--save-scores``).

    Args:
        path: a file path.
    Returns:
        True when :meth:`ImportanceScores.load` reads it.
    Example:
        >>> is_importance_file("scores.safetensors")
        True
    """
    try:
        ImportanceScores.load(path)
    except (ValueError, OSError):
        return False
    return True
