"""The hooks of one calibration (activation sites, RMSNorm input statistics, per-head output norms).

:class:`CalibrationSession` attaches them to a model and turns what they collected into
:class:`~minitron.importance.collect.ImportanceScores`; :func:`~minitron.importance.collect.collect_importance`
drives it with whole-decoder passes, :mod:`minitron.streaming.calibrate` layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import decoder_layers, get_adapter
from ..offload import onloaded
from .scores import ImportanceConfig, ImportanceScores, model_shape_meta
from .heads import head_output_norms
from .hooks import CalibrationHooks
from .norms import is_rms_norm, norm_eps, normalized_square_sum
from .ranks import all_reduce_

__all__ = ["CalibrationSession", "head_output_site"]


def head_output_site(n_heads: int):
    """The ``attn_out`` site's transform: ``(o_proj, input (B, S, H*hd)) -> (B, S, H)`` per-head output norms.

    Runs in a forward pre-hook, i.e. before accelerate's hook onloads ``o_proj``: an offloaded
    ``o_proj`` is materialised for the product (:func:`minitron.offload.onloaded`).
    """
    def transform(module: nn.Module, act: torch.Tensor) -> torch.Tensor:
        with onloaded(module):
            return head_output_norms(act, module.weight, n_heads)
    return transform



class CalibrationSession:
    """Every importance hook of one calibration, attached to ``model``, and the statistics they collect.

    :func:`collect_importance` drives it with whole-decoder passes; the layer-streamed calibration of
    :mod:`minitron.streaming.calibrate` drives it layer by layer on a ``meta`` skeleton whose layers are
    materialised one at a time. Either way every site sees the same activations, so the statistics
    are the same. Use as a context manager; call ``hooks.begin_batch`` / ``hooks.end_batch`` around
    each batch's pass (or each layer's part of it), then :meth:`scores`.

    Args:
        model: a supported causal LM (or its meta skeleton).
        config: aggregation options (``head_output`` adds the ``attn_out`` sites).
        device: where the statistics live (the activations' device).
    Example:
        >>> with CalibrationSession(model, ImportanceConfig(), torch.device("cpu")) as session:
        ...     session.hooks.begin_batch(8, 256); decoder(input_ids=batch); session.hooks.end_batch()
        >>> scores = session.scores(num_samples=8, seq_len=256)
    """

    def __init__(self, model: nn.Module, config: ImportanceConfig, device: torch.device) -> None:
        self.model, self.config, self.device = model, config, device
        adapter = get_adapter(model)
        sink = config.sink_tokens
        n_heads = model.config.num_attention_heads
        # site -> [sum over tokens of n^2 (D,), tokens]: RMSNorm input statistics. The sums are allocated
        # here, before any forward: a small tensor born inside the pass and kept across layers would sit
        # between the layers' activations on the heap (see CalibrationHooks.begin_batch)
        self.norm_sq: dict[str, list] = {}

        def norm_in_hook(name: str):
            def hook(module, args):
                sums, tokens = normalized_square_sum(args[0][:, sink:], norm_eps(module))
                entry = self.norm_sq[name]
                entry[0] += sums
                entry[1] += tokens
            return hook

        layers = decoder_layers(model, adapter)
        norms = [(f"norm.{l}.{k}", layer.get_submodule(n)) for l, layer in enumerate(layers)
                 for k, n in enumerate(adapter.layer_norms)] + [("norm.final", model.get_submodule(adapter.final_norm))]
        # per-head output contribution: (B, S, H) norms of W_o[:, h] @ a_h, aggregated like any other site
        head_out = [(f"attn_out.{l}", layer.get_submodule(adapter.o_proj), n_heads, head_output_site(n_heads))
                    for l, layer in enumerate(layers)] if config.head_output else []
        hidden = model.config.hidden_size
        for name, norm in norms:
            if is_rms_norm(norm):
                self.norm_sq[name] = [torch.zeros(hidden, dtype=torch.float32, device=device), 0]
        self._norms = [(name, norm) for name, norm in norms if name in self.norm_sq]
        self._norm_in_hook = norm_in_hook
        self._handles: list = []
        self.hooks = CalibrationHooks(model, adapter, config.seq_agg, sink=sink, extra=head_out, device=device)

    def __enter__(self) -> "CalibrationSession":
        self._handles = [norm.register_forward_pre_hook(self._norm_in_hook(name)) for name, norm in self._norms]
        try:
            self.hooks.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []

    def reduce_over_ranks(self) -> None:
        """Under ``torchrun``: add every rank's sums and counts (:mod:`minitron.importance.ranks`); once."""
        if getattr(self, "_reduced", False):
            return
        self._reduced = True
        hooks = self.hooks
        sites = list(hooks.counts)
        norms = list(self.norm_sq)
        tensors = [hooks.sum_x, hooks.sum_x2, hooks.bi_cos_sum, *(self.norm_sq[n][0] for n in norms)]
        counts = all_reduce_(tensors, [hooks.bi_count, *(hooks.counts[s] for s in sites),
                                       *(self.norm_sq[n][1] for n in norms)])
        hooks.bi_count = counts[0]
        hooks.counts.update(zip(sites, counts[1 : 1 + len(sites)]))
        for n, tokens in zip(norms, counts[1 + len(sites):]):
            self.norm_sq[n][1] = tokens

    def scores(self, num_samples: int, seq_len: int) -> "ImportanceScores":
        """The activation statistics collected so far (no loss-based scores), summed over the ranks.

        Args:
            num_samples: calibration blocks seen (by all ranks together).
            seq_len: tokens per block.
        Returns:
            :class:`ImportanceScores` of the model.
        """
        self.reduce_over_ranks()
        meta = model_shape_meta(self.model)
        meta.update(seq_agg=self.config.seq_agg, num_samples=int(num_samples), seq_len=int(seq_len),
                    sink_tokens=self.config.sink_tokens, norm_stats=True)
        hooks = self.hooks
        return ImportanceScores(
            meta=meta,
            sums=hooks.site_sums(),
            counts=dict(hooks.counts),
            bi_cos_sum=hooks.bi_cos_sum.cpu(),
            bi_count=hooks.bi_count,
            batch_agg=self.config.batch_agg,
            norm_ms={name: (total / max(tokens, 1)).cpu() for name, (total, tokens) in self.norm_sq.items()},
        )
