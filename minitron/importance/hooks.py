"""The forward hooks of one calibration pass, with every per-site update batched.

:func:`minitron.importance.collect.collect_importance` attaches a :class:`CalibrationHooks` to
the decoder and runs it batch by batch. Sites (docs/method.md section 1):

- ``mlp.{l}``: the input of ``down_proj`` (B, S, f);
- ``attn.{l}``: the input of ``o_proj`` (B, S, n_heads * head_dim);
- ``norm.{l}.{k}`` / ``norm.final``: the output of every norm feeding a block, and the final norm (B, S, D);
- mixture-of-experts layers: ``expert_mlp.{l}`` (E * F) each expert's down-projection input times the
  routing weight, ``expert_out.{l}`` (E) the norm of each expert's weighted output, both 0 for tokens
  not routed to the expert (:mod:`minitron.importance.experts`), and ``shared_mlp.{l}`` the shared
  expert's down-projection input;
- Block Importance: the row-wise cosine between each decoder layer's input and output.

Cost (why the hooked pass stays close to a plain one). The statistic of a site is a reduction
over the sequence of ``|a|`` (or ``a^2``); done naively (``a.float().abs().mean(1)``) it
allocates an activation-sized temporary and reads the activation three times. Here:

- the element-wise part runs over sample-sized chunks (<= ``importance_reference.CHUNK_BYTES``) into one reused
  scratch buffer that stays in cache, so each activation is read from memory once and no
  activation-sized temporary exists (the hooks add ~1 MiB to the pass's peak, not one
  activation per site);
- each site only writes its per-sample aggregate ``x`` (B, D) for the batch, into its columns of
  one fused (B, sum of all sites' D) buffer; the running sums ``sum_x += sum_b x_b`` and
  ``sum_x2 += sum_b x_b^2`` of *all* sites are updated together once per batch
  (:meth:`CalibrationHooks.end_batch`): four vector ops instead of ~5 small ops per site;
- nothing the hooks keep across layers is allocated during the forward pass: the fused buffer,
  the row-norm slots and the scratch are sized by :meth:`CalibrationHooks.begin_batch` before it.
  A small tensor allocated mid-pass and kept would sit on the heap between the layers' large
  activations and stop glibc from reusing their space. Measured on SmolLM2-135M (513 MiB,
  2 batches of 8 x 256 tokens): per-site results allocated mid-pass grew calibration's anonymous
  RSS by ~500 MiB; preallocated, by 36 MiB (the previous per-site hooks: 100 MiB);
- Block Importance needs ``|h_in|``, ``|h_out|`` and ``h_in . h_out`` per token: the norm of a
  layer's output is kept and reused as the norm of the next layer's input (the same tensor), and
  the dot product is chunked like the sites.

The reductions themselves (chunked sequence aggregates, their fold, the row cosines) are those of
:mod:`minitron_kernels.importance_reference`, the one reference the Triton kernels are tested
against; the hooks only call them on slices of their fused buffers. On CUDA with Triton the
per-site updates go to the kernels of :mod:`minitron_kernels.importance` instead (one pass each,
no host sync).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn

from minitron_kernels.importance_reference import Scratch, cosine_sum_, fold_aggregates_, seq_aggregate_into

from ..adapters import FamilyAdapter, decoder_layers, layer_io, sparse_layers
from ..offload import execution_device, onloaded
from .aggregate import ACCUMULATE, accumulate_, block_importance_update_, check_aggregation
from .experts import routed_experts_forward


class CalibrationHooks:
    """Importance hooks on a decoder; statistics streamed in fp32, batched per forward pass.

    Use as a context manager around the forward passes, calling :meth:`begin_batch` before and
    :meth:`end_batch` after each::

        with CalibrationHooks(model, adapter, "mean") as hooks:
            for batch in batches:
                hooks.begin_batch(*batch.shape)
                decoder(input_ids=batch, use_cache=False)
                hooks.end_batch()
        sums, counts = hooks.site_sums(), hooks.counts

    Args:
        model: a supported causal LM (only its decoder runs).
        adapter: its :class:`~minitron.adapters.FamilyAdapter`.
        seq_agg: ``mean`` | ``l2`` | ``var``.
        impl: ``auto`` (Triton kernels for CUDA activations when available, else the batched
            PyTorch path), ``reference`` (the batched PyTorch path) or ``triton``.
        sink: leading positions of every sequence left out of the site statistics (attention
            sinks); :meth:`begin_batch` then takes ``seq_len - sink``. Block Importance uses every position.
        extra: more sites ``(name, module, dim, fn)`` read from ``module``'s input: ``fn(module, a)``
            maps the (sink-trimmed) input (B, S, d) to the site's activation (B, S, dim).
        device: where the statistics live (default: the model's execution device,
            :func:`minitron.offload.execution_device`).
    Attributes:
        counts: samples seen per site.
        bi_cos_sum: (L,) fp32 sum over tokens of cos(layer input, layer output).
        bi_count: tokens seen by the Block-Importance sums.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, seq_agg: str = "mean", impl: str = "auto",
                 sink: int = 0, extra: Sequence[tuple[str, nn.Module, int, Callable]] = (),
                 device: torch.device | None = None) -> None:
        check_aggregation("l2", seq_agg)
        self.seq_agg, self.impl, self.sink = seq_agg, impl, sink
        # where the running sums live: the activations' device (from accelerate's hooks when dispatched)
        self.device = torch.device(device) if device is not None else execution_device(model)
        self.layers = decoder_layers(model, adapter)
        self._targets: list[tuple[str, nn.Module, bool]] = []  # (site, module, reads its input)
        self._transforms: dict[str, Callable] = {}
        hidden = model.config.hidden_size
        dims: dict[str, int] = {}
        sparse = sparse_layers(model.config)
        self._experts: list[tuple[int, nn.Module]] = []  # (layer, experts module) of the sparse layers
        self._flat_sites: set[str] = set()
        for l, layer in enumerate(self.layers):
            o_proj = layer.get_submodule(adapter.o_proj)
            if sparse[l]:  # routed experts: statistics from their forward (importance/experts.py)
                experts = layer.get_submodule(adapter.moe.experts)
                n_experts, ffn = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
                dims[f"expert_mlp.{l}"], dims[f"expert_out.{l}"] = n_experts * ffn, n_experts
                self._experts.append((l, experts))
                if adapter.moe.shared_expert:
                    shared_down = layer.get_submodule(f"{adapter.moe.shared_expert}.down_proj")
                    self._targets.append((f"shared_mlp.{l}", shared_down, True))
                    dims[f"shared_mlp.{l}"] = shared_down.in_features
                    self._flat_sites.add(f"shared_mlp.{l}")  # runs on the flattened (B*S, D) tokens
            else:
                down = layer.get_submodule(adapter.down_proj)
                self._targets.append((f"mlp.{l}", down, True))
                dims[f"mlp.{l}"] = down.in_features
            self._targets.append((f"attn.{l}", o_proj, True))
            dims[f"attn.{l}"] = o_proj.in_features
            for k, norm_name in enumerate(adapter.layer_norms):
                self._targets.append((f"norm.{l}.{k}", layer.get_submodule(norm_name), False))
                dims[f"norm.{l}.{k}"] = hidden
        self._targets.append(("norm.final", model.get_submodule(adapter.final_norm), False))
        dims["norm.final"] = hidden
        for name, module, dim, fn in extra:
            self._targets.append((name, module, True))
            dims[name] = dim
            self._transforms[name] = fn
        # all sites' running sums live in two fused fp32 vectors; site s owns [offset, offset + dim)
        self.offsets, total = {}, 0
        for site in dims:
            self.offsets[site] = (total, dims[site])
            total += dims[site]
        self.sum_x = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.sum_x2 = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.counts = {site: 0 for site in self.offsets}
        self.bi_cos_sum = torch.zeros(len(self.layers), dtype=torch.float32, device=self.device)
        self.bi_count = 0
        self._scratch = Scratch()
        # per-batch buffers, allocated by begin_batch() BEFORE the forward pass and reused: a tensor
        # allocated inside the pass and kept alive across layers would sit between the layers'
        # big activations on the heap and stop glibc from reusing their space (with the dynamic
        # mmap threshold this grew a 135M model's calibration RSS by ~1x the model)
        self._x: torch.Tensor | None = None  # (B, total) per-sample aggregates of all sites
        self._rows = torch.empty(0, device=self.device)  # (3, B*S): two row-norm slots + row dot
        self._fired: set[str] = set()
        self._seq_len = 0
        self._norm_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (h_out, its row norms)
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------------------------

    def _fused(self, act: torch.Tensor) -> bool:
        """True: this object's fused PyTorch path; False: the Triton kernels, site by site."""
        return ACCUMULATE.select(self.impl, act.device).name != "triton"

    def begin_batch(self, batch: int, seq_len: int) -> None:
        """Size the per-batch buffers for ``batch`` sequences of ``seq_len`` tokens (before the forward)."""
        total = self.sum_x.numel()
        if self._x is None or self._x.shape[0] < batch:
            self._x = torch.empty(batch, total, dtype=torch.float32, device=self.device)
        if self._rows.shape[-1] < batch * seq_len:
            self._rows = torch.empty(3, batch * seq_len, dtype=torch.float32, device=self.device)
        self._scratch.reserve(max(d for _, d in self.offsets.values()), self.device)
        self._batch_size, self._seq_len = batch, seq_len

    def _site(self, site: str, act: torch.Tensor) -> None:
        act = act.detach()
        if act.dim() == 2:
            act = act.unsqueeze(0)
        offset, dim = self.offsets[site]
        if act.shape[-1] != dim:
            raise ValueError(f"site {site}: activation last dim {act.shape[-1]} != {dim}")
        self.counts[site] += act.shape[0]
        if not self._fused(act):  # one fused Triton kernel updates this site's sums directly
            accumulate_(self.sum_x[offset : offset + dim], self.sum_x2[offset : offset + dim], act,
                        self.seq_agg, impl=self.impl)
            return
        if site in self._fired or (self._fired and tuple(act.shape[:2]) != (self._batch_size, self._seq_len)):
            self.end_batch()  # a module run twice, or another batch shape: fold what we have
        if not self._fired and (self._x is None or tuple(act.shape[:2]) != (self._batch_size, self._seq_len)):
            self.begin_batch(act.shape[0], act.shape[1])  # hooks driven without begin_batch()
        x = self._x[: act.shape[0], offset : offset + dim]  # (B, D) strided view of the fused buffer
        seq_aggregate_into(x, act, self.seq_agg, self._scratch)
        self._fired.add(site)

    def _block(self, index: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        h_in, h_out = h_in.detach(), h_out.detach()
        if index == 0:
            self.bi_count += h_in.shape[0] * h_in.shape[1]
        if not self._fused(h_in):
            block_importance_update_(self.bi_cos_sum[index : index + 1], h_in, h_out, impl=self.impl)
            return
        D = h_in.shape[-1]
        a, b = h_in.reshape(-1, D), h_out.reshape(-1, D)  # (N, D) views
        N = a.shape[0]
        if self._rows.shape[-1] < N:
            self._rows = torch.empty(3, N, dtype=torch.float32, device=a.device)
        cached = self._norm_cache
        if cached is not None and cached[0] is h_in:
            n_in = cached[1]
        else:
            n_in = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32, out=self._rows[(index + 1) % 2, :N])
        # rows slots: |h_out| alternates between 0 and 1 so that it survives as the next layer's |h_in|
        n_out = cosine_sum_(self.bi_cos_sum[index : index + 1], a, b, self._scratch, n_in=n_in,
                            n_out=self._rows[index % 2, :N], dot=self._rows[2, :N])
        self._norm_cache = (h_out, n_out)  # the next layer's input is this very tensor

    def _expert_forward(self, layer: int, experts: nn.Module, hidden_states: torch.Tensor,
                        top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """A sparse layer's experts forward, accumulating per-sample routed statistics (mean / l2 over the
        sequence like every site; tokens not routed to an expert count as 0 for it)."""
        mlp_site, out_site = f"expert_mlp.{layer}", f"expert_out.{layer}"
        if mlp_site in self._fired:
            self.end_batch()  # the module ran twice in one batch: fold what we have
        if self._x is None or self._batch_size * (self._seq_len + self.sink) != hidden_states.shape[0]:
            raise RuntimeError("CalibrationHooks: a sparse layer ran before begin_batch() sized the batch")
        batch, seq = self._batch_size, self._seq_len + self.sink  # tokens per sample, sink included
        (mlp_off, mlp_dim), (out_off, n_experts) = self.offsets[mlp_site], self.offsets[out_site]
        ffn = mlp_dim // n_experts
        x = self._x[:batch]
        x[:, mlp_off : mlp_off + mlp_dim].zero_()
        x[:, out_off : out_off + n_experts].zero_()
        for site in (mlp_site, out_site):
            self._fired.add(site)
            self.counts[site] += batch
        squared = self.seq_agg == "l2"

        def on_expert(e: int, token_idx: torch.Tensor, weight: torch.Tensor, act: torch.Tensor,
                      out: torch.Tensor) -> None:
            sample, pos = token_idx // seq, token_idx % seq
            if self.sink:
                kept = pos >= self.sink
                sample, weight, act, out = sample[kept], weight[kept], act[kept], out[kept]
            w = weight.detach().float()[:, None]
            neurons = act.detach().float().mul_(w)  # (n, F): routed contribution of each neuron
            neurons = neurons.square_() if squared else neurons.abs_()
            x[:, mlp_off + e * ffn : mlp_off + (e + 1) * ffn].index_add_(0, sample, neurons)
            norm = torch.linalg.vector_norm(out.detach().float(), dim=-1).mul_(w[:, 0])  # (n,)
            x[:, out_off + e].index_add_(0, sample, norm.square_() if squared else norm)

        with onloaded(experts):  # replaces accelerate's onloading forward: offloaded expert tensors fetched here
            return routed_experts_forward(experts, hidden_states, top_k_index, top_k_weights, on_expert)

    def __enter__(self) -> "CalibrationHooks":
        if self._experts and self.seq_agg == "var":
            raise ValueError("seq_agg='var' is not available for mixture-of-experts models (routed experts see a "
                             "varying subset of each sequence); use seq_agg='mean' or 'l2'")
        self._saved_forwards = []
        for l, experts in self._experts:  # an instance attribute shadows the class forward until __exit__
            self._saved_forwards.append((experts, experts.__dict__.get("forward")))
            experts.forward = functools.partial(self._expert_forward, l, experts)
        for site, module, reads_input in self._targets:
            if reads_input:
                hook = lambda m, args, site=site: self._site(site, self._trim(site, m, args[0]))  # noqa: E731
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = lambda m, args, out, site=site: self._site(site, self._trim(site, m, out))  # noqa: E731
                self._handles.append(module.register_forward_hook(hook))
        for l, layer in enumerate(self.layers):
            def block_hook(m, args, kwargs, output, l=l):
                self._block(l, *layer_io(args, kwargs, output))
            self._handles.append(layer.register_forward_hook(block_hook, with_kwargs=True))
        return self

    def _trim(self, site: str, module: nn.Module, act: torch.Tensor) -> torch.Tensor:
        """The site's activation: sink positions dropped, then the site's transform if it has one."""
        if site in self._flat_sites and act.dim() == 2:  # (B*S, d) -> (B, S, d) of the current batch
            act = act.view(self._batch_size, -1, act.shape[-1])
        if self.sink:
            act = act[:, self.sink :]
        fn = self._transforms.get(site)
        return fn(module, act) if fn is not None else act

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for experts, saved in getattr(self, "_saved_forwards", []):
            if saved is None:
                experts.__dict__.pop("forward", None)
            else:
                experts.forward = saved
        self._saved_forwards = []
        self._norm_cache = None

    # -- per batch -----------------------------------------------------------------------------

    def end_batch(self) -> None:
        """Fold this batch's per-sample aggregates of every site into the running sums at once."""
        self._norm_cache = None
        if not self._fired:
            return
        x = self._x[: self._batch_size]  # (B, total)
        if len(self._fired) == len(self.offsets):  # the usual case: every site fired once
            sites = [(0, x.shape[1])]
        else:  # some sites did not fire (a layer skipped by another hook): only those that did
            sites = [self.offsets[s] for s in self._fired]
        for offset, dim in sites:
            fold_aggregates_(self.sum_x[offset : offset + dim], self.sum_x2[offset : offset + dim],
                             x[:, offset : offset + dim], self.seq_agg, self._seq_len)
        self._fired.clear()

    def site_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``site -> (sum_x, sum_x2)`` fp32 CPU tensors (D,) of every site."""
        return {s: (self.sum_x[o : o + d].clone().cpu(), self.sum_x2[o : o + d].clone().cpu())
                for s, (o, d) in self.offsets.items()}
