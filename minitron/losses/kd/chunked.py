"""Chunked linear + KD loss: loss and gradients computed in the forward pass, never N x V.

Tokens are processed in fixed chunks of ``chunk_size`` rows (ignored rows are dropped first
with one ``nonzero()``). Per chunk: fp32 logits of student and teacher (c, V) from one GEMM
each, then a chunk op returns the per-token loss and the gradient w.r.t. the student logits
(in the dtype of the gradient GEMMs), which is immediately folded into fp32 accumulators
``grad_hidden`` (N, Hs), ``grad_weight`` (Vs, Hs) and ``grad_bias`` (Vs,). Backward just
scales them by the incoming scalar gradient (reduction ``mean``/``sum``); for
``reduction="none"`` the gradient depends on the per-token upstream gradient, so backward
re-runs the loop with those row weights.

The chunk op is either the pure-PyTorch :func:`minitron.losses.kd.reference.kd_chunk_reference`
(``impl="chunked"``) or the Triton :func:`minitron_kernels.fused_kl.kd_chunk_triton`
(``impl="triton"``). Precision: logits and all accumulators are fp32. For bf16/fp16 inputs on
CUDA the GEMMs run in the input dtype with fp32 output (``torch.mm(..., out_dtype=float32)``,
logits never rounded to bf16) and the chunk op rounds the fp32 logits gradient once into a
reused bf16/fp16 (c, Vs) buffer that feeds both gradient GEMMs; elsewhere the weights are
upcast to fp32 once per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from minitron.losses.kd.reference import topk_mask_

ChunkFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]
_HALF = (torch.float16, torch.bfloat16)
# device types whose half-precision GEMMs with fp32 output are fast (CPU lacks mm.dtype kernels;
# tests add "cpu" with emulated GEMMs to exercise this path)
_NATIVE_DEVICE_TYPES = ("cuda",)


@dataclass
class KDConfig:
    kind: int
    beta: float
    temperature: float
    top_k: int | None
    reduction: str
    chunk_size: int
    chunk_fn: ChunkFn
    student_softcap: float | None = None  # final-logit soft-caps: logits -> cap * tanh(logits / cap)
    teacher_softcap: float | None = None


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) half-precision inputs, fp32 output straight from the GEMM accumulator."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_f32_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c += a @ b`` for fp32 ``c`` and half-precision ``a``, ``b``, accumulated in fp32."""
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)


@functools.lru_cache(maxsize=None)
def _native_support(device: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """(fp32-output mm works, fp32 in-place addmm works) for half inputs on ``device``, probed once."""
    a = torch.ones(16, 16, device=device, dtype=dtype)
    try:
        ok_mm = bool(_mm_f32(a, a)[0, 0] == 16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False, False
    c = torch.zeros(16, 16, device=device, dtype=torch.float32)
    try:
        _addmm_f32_(c, a, a)
        ok_addmm = bool(c[0, 0] == 16)
    except (RuntimeError, NotImplementedError, TypeError):
        ok_addmm = False
    return ok_mm, ok_addmm


class _Gemm:
    """fp32-output GEMMs against one (V, H) weight, without rounding logits to the input dtype.

    ``native``: bf16/fp16 weight and activations on CUDA; the GEMMs run in that dtype on tensor
    cores with fp32 output, and the logits gradient comes back from the chunk op already in
    ``grad_dtype`` (rounded once). Otherwise the weight is upcast to fp32 once per call.
    """

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype) -> None:
        self.native = False
        self.acc_in_place = False
        if weight.device.type in _NATIVE_DEVICE_TYPES and weight.dtype in _HALF and act_dtype == weight.dtype:
            self.native, self.acc_in_place = _native_support(str(weight.device), weight.dtype)
        self.w = weight if (self.native or weight.dtype == torch.float32) else weight.float()  # (V, H)
        self.grad_dtype = self.w.dtype if self.native else torch.float32

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.native else h.float()

    def logits(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = _mm_f32(h, self.w.t()) if self.native else h @ self.w.t()  # (c, V) fp32
        return out if bias is None else out.add_(bias.float())

    def grad_act(self, g: torch.Tensor) -> torch.Tensor:  # g (c, V) in grad_dtype -> (c, H) fp32
        return _mm_f32(g, self.w) if self.native else g @ self.w

    def acc_grad_weight_(self, gw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:  # gw (V, H) fp32
        if not self.native:
            gw.addmm_(g.t(), h)
        elif self.acc_in_place:  # half x half -> fp32 accumulate straight into gw (no V x H temporary)
            _addmm_f32_(gw, g.t(), h)
        else:  # torch builds whose addmm.dtype_out rejects an fp32 self: one (V, H) fp32 temporary
            gw.add_(_mm_f32(g.t(), h))


def kd_loop(
    hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None,
    ht: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None,
    idx: torch.Tensor | None,  # (n,) kept rows, or None for all rows
    cfg: KDConfig,
    row_scale: float | torch.Tensor | None,  # None: loss only; float: same weight per row; (n,) tensor
    need: tuple[bool, bool, bool] = (True, True, True),  # grads of (hidden, weight, bias)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the chunk loop. Returns ``(per_token_loss (n,), grad_hidden (N, Hs), grad_weight, grad_bias)``."""
    n = hs.shape[0] if idx is None else idx.numel()
    dev = hs.device
    gs, gt = _Gemm(ws, hs.dtype), _Gemm(wt, ht.dtype)
    per_tok = torch.empty(n, dtype=torch.float32, device=dev)  # (n,)
    want = row_scale is not None
    gh = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if want and need[0] else None  # (N, Hs)
    gw = torch.zeros(ws.shape, dtype=torch.float32, device=dev) if want and need[1] else None  # (Vs, Hs)
    gb = torch.zeros(ws.shape[0], dtype=torch.float32, device=dev) if want and need[2] and bs is not None else None
    # native half GEMMs: the chunk op writes the logits gradient straight into this buffer
    gbuf = None
    if want and gs.grad_dtype != torch.float32:
        gbuf = torch.empty(min(cfg.chunk_size, n), ws.shape[0], dtype=gs.grad_dtype, device=dev)  # (c, Vs)
    for i in range(0, n, cfg.chunk_size):
        j = min(i + cfg.chunk_size, n)
        if idx is None:
            h_s, h_t = hs[i:j], ht[i:j]  # (c, Hs), (c, Ht) views
        else:
            rows = idx[i:j]
            h_s, h_t = hs.index_select(0, rows), ht.index_select(0, rows)
        h_s = gs.act(h_s)
        s_logits = gs.logits(h_s, bs)  # (c, Vs) fp32
        t_logits = gt.logits(gt.act(h_t), bt)  # (c, Vt) fp32
        cap_grad = None  # d capped / d raw = 1 - tanh^2, taken before top-k masks logits to -inf
        if cfg.student_softcap:
            s_logits.div_(cfg.student_softcap).tanh_()
            if want:
                cap_grad = 1.0 - s_logits.square()  # (c, Vs) fp32
            s_logits.mul_(cfg.student_softcap)
        if cfg.teacher_softcap:
            t_logits.div_(cfg.teacher_softcap).tanh_().mul_(cfg.teacher_softcap)
        if cfg.top_k is not None:
            topk_mask_(s_logits, t_logits, cfg.top_k)
        scale = None
        if want:
            scale = row_scale[i:j] if torch.is_tensor(row_scale) else torch.full((j - i,), float(row_scale), device=dev)
        loss_c, g = cfg.chunk_fn(s_logits, t_logits, scale, cfg.kind, cfg.beta, cfg.temperature,
                                 grad_out=None if gbuf is None else gbuf[: j - i])  # g (c, Vs) in grad_dtype
        per_tok[i:j] = loss_c
        if g is None:
            continue
        if cap_grad is not None:  # chain rule through the soft-cap, in fp32, written back in g's dtype
            g.copy_(cap_grad.mul_(g.float()))
        if gh is not None:
            if idx is None:
                gh[i:j] = gs.grad_act(g)
            else:
                gh.index_copy_(0, rows, gs.grad_act(g))
        if gw is not None:
            gs.acc_grad_weight_(gw, g, h_s)
        if gb is not None:
            gb += g.sum(0, dtype=torch.float32)
    return per_tok, gh, gw, gb


def _reduce(per_tok: torch.Tensor, idx: torch.Tensor | None, n_total: int, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_tok.sum() / max(per_tok.numel(), 1)
    if reduction == "sum":
        return per_tok.sum()
    if idx is None:
        return per_tok
    return per_tok.new_zeros(n_total).index_copy_(0, idx, per_tok)


class LinearKDFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward (mean/sum) and scaled in backward."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, idx, cfg: KDConfig):  # type: ignore[override]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        n_total = hs.shape[0]
        ctx.cfg, ctx.need = cfg, need
        if cfg.reduction == "none":  # gradient depends on the per-token grad_output: recompute in backward
            per_tok, *_ = kd_loop(hs, ws, bs, ht, wt, bt, idx, cfg, None)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, idx)
            return _reduce(per_tok, idx, n_total, "none")
        n = n_total if idx is None else idx.numel()
        scale = 1.0 / max(n, 1) if cfg.reduction == "mean" else 1.0
        per_tok, gh, gw, gb = kd_loop(hs, ws, bs, ht, wt, bt, idx, cfg, scale, need)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        return _reduce(per_tok, idx, n_total, cfg.reduction)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        cfg = ctx.cfg
        if cfg.reduction == "none":
            hs, ws, bs, ht, wt, bt, idx = ctx.saved_tensors
            go = grad_out.float() if idx is None else grad_out.float().index_select(0, idx)  # (n,)
            _, gh, gw, gb = kd_loop(hs, ws, bs, ht, wt, bt, idx, cfg, go, ctx.need)
            dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        else:
            gh, gw, gb = ctx.saved_tensors
            dtypes = ctx.dtypes
            go = grad_out.float()
            # scale the saved fp32 grads in place: no second (Vs, Hs) buffer (backward runs once)
            gh, gw, gb = (None if g is None else g.mul_(go) for g in (gh, gw, gb))
        out = [None if g is None else g.to(dt) for g, dt in zip((gh, gw, gb), dtypes)]
        return out[0], out[1], out[2], None, None, None, None, None


def linear_kd_loss_fused(
    hs: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor | None,
    ht: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor | None,
    keep: torch.Tensor | None, cfg: KDConfig,
) -> torch.Tensor:
    """Chunked loss with the given chunk op; ``keep`` (N,) bool or None (all rows count)."""
    ht, wt = ht.detach(), wt.detach()
    bt = None if bt is None else bt.detach()
    idx = None if keep is None else keep.nonzero().squeeze(-1)  # the one host sync
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hs, ws, bs)):
        return LinearKDFunction.apply(hs, ws, bs, ht, wt, bt, idx, cfg)
    per_tok, *_ = kd_loop(hs, ws, bs, ht, wt, bt, idx, cfg, None)
    return _reduce(per_tok, idx, hs.shape[0], cfg.reduction)
