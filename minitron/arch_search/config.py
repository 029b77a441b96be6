"""The options of :func:`minitron.search` (:class:`SearchConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..importance.collect import ImportanceConfig
from ..validate import check_count
from .space import AXIS_FIELDS

__all__ = ["SearchConfig"]


@dataclass
class SearchConfig:
    """How :func:`minitron.search` enumerates, measures and retrains candidates.

    Args:
        tolerance: candidates lie in ``[budget * (1 - tolerance), budget]``.
        retrain_steps: distillation steps per candidate (0 = rank by the loss after pruning only,
            ModelOpt-style; the paper warns that ranking is unreliable).
        top: retrain only the ``top`` candidates with the lowest loss after pruning (None = all).
        divisors: grid step per axis, keyed by axis (``hidden``/``ffn``/``heads``/``layers``/``experts``/
            ``expert_ffn``/``shared_ffn``) or
            :class:`minitron.Target` field (see :func:`minitron.arch_search.enumerate_candidates`).
        max_width_prune: largest fraction of each width axis removed (official 0.4); the experts,
            expert-FFN and shared-FFN axes of mixture-of-experts models are width axes.
        max_depth_prune: largest fraction of layers removed (official 0.2).
        axes: axes searched (``hidden``, ``ffn``, ``heads``, ``layers``; mixture-of-experts models also
            ``experts``, ``expert_ffn``, ``shared_ffn``), each also accepted under the :class:`minitron.Target`
            field it sets (``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_hidden_layers``,
            ``num_experts``, ``expert_intermediate_size``, ``shared_expert_intermediate_size``; stored as the
            short axis name). None (default): every axis the model has (:func:`minitron.arch_search.model_axes`).
        seed: seed of distillation (data order, RNG).
        seq_len: tokens per block for calibration, retraining and evaluation (default: the rows of a 2-D
            token-id tensor of ``train_data``, else 256 or the model's ``max_position_embeddings`` if smaller).
        num_samples: calibration blocks.
        eval_blocks: at most this many validation blocks (None = all).
        batch_size: blocks per batch for calibration, evaluation and (default) retraining.
        importance: calibration options (default :class:`ImportanceConfig` with ``batch_size``); the
            loss-based scores of the default criteria (layer-drop losses when layers are searched)
            are switched on.
        distill: a :class:`minitron.DistillConfig` for retraining; ``steps`` and ``output_dir`` are
            set per candidate. Default: lr 1e-4, 10% warmup, ``seq_len``/``batch_size`` as here, no
            intermediate checkpoints.
        keep_candidates: keep every retrained candidate's checkpoint under ``runs/`` of the output
            directory (default: only the best is kept, in ``best/``).

    Example:
        >>> SearchConfig(retrain_steps=200, top=8, axes=("ffn", "layers"), seq_len=512)
    """

    tolerance: float = 0.05
    retrain_steps: int = 100
    top: int | None = None
    divisors: dict[str, int] | None = None
    max_width_prune: float = 0.4
    max_depth_prune: float = 0.2
    axes: Sequence[str] | None = None
    seed: int = 0
    seq_len: int | None = None
    num_samples: int = 1024
    eval_blocks: int | None = 64
    batch_size: int = 8
    importance: ImportanceConfig | None = None
    distill: Any = None
    keep_candidates: bool = False

    def __post_init__(self) -> None:
        check_count("retrain_steps", self.retrain_steps, low=0)
        check_count("top", self.top, allow_none=True)
        check_count("batch_size", self.batch_size)
        check_count("seq_len", self.seq_len, allow_none=True)
        check_count("num_samples", self.num_samples)
        check_count("eval_blocks", self.eval_blocks, allow_none=True)
        # a Target field names its axis (one vocabulary: README's table of names)
        field_axes = {name: axis for axis, name in AXIS_FIELDS.items()}
        self.axes = None if self.axes is None else tuple(field_axes.get(a, a) for a in self.axes)
