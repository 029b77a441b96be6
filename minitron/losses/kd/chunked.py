"""Chunked linear + KD loss: loss and gradients computed in the forward pass, never N x V.

Tokens are processed in fixed chunks of ``chunk_size`` rows (ignored rows are dropped first
with one ``nonzero()``). Per chunk: fp32 logits of student and teacher (c, V) from one GEMM
each, then a chunk op returns the per-token loss and the gradient w.r.t. the student logits
(in the dtype of the gradient GEMMs), which is immediately folded into fp32 accumulators
``grad_hidden`` (N, Hs), ``grad_weight`` (Vs, Hs) and ``grad_bias`` (Vs,). Backward just
scales them by the incoming scalar gradient (reduction ``mean``/``sum``); for
``reduction="none"`` the gradient depends on the per-token upstream gradient, so backward
re-runs the loop with those row weights.

The chunk op is ``torch.ops.minitron.kd_chunk`` (:mod:`minitron.losses.kd.op`): the pure-PyTorch
:func:`minitron.losses.kd.reference.kd_chunk_reference` (``impl="chunked"``, what runs on CPU) or the
Triton :func:`minitron_kernels.fused_kl.kd_chunk_triton` (``impl="triton"``). Precision of the four
GEMMs per device and dtype, and the reused chunk buffers: :mod:`minitron.losses.kd.gemm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minitron.losses.kd import op  # noqa: F401 - defines torch.ops.minitron.kd_chunk
from minitron.losses.kd.gemm import Gemm
from minitron.losses.kd.workspace import workspace_for
from minitron.losses.kd.reference import topk_mask_

#: CPU rule of :func:`default_chunk_size`: the chunk's workspace stays under this many bytes
CHUNK_WORKSPACE_BYTES = 1 << 30
# workspace bytes per row and vocabulary entry on CPU: student and teacher fp32 logits and two fp32
# chunk-op temporaries (16), the bool mask (1), the bf16 logits gradient of the cpu_bf16 path (2)
_BYTES_PER_ENTRY = 19


def default_chunk_size(vocab: int, device: torch.device | str) -> int:
    """Tokens per chunk when the caller gives none.

    CPU: the largest power of two whose (chunk, vocab) workspace fits :data:`CHUNK_WORKSPACE_BYTES`
    (1 GiB), between 64 and 4096 rows: 1024 at V = 49152 (SmolLM2), 256 at V = 128256 (Llama 3), 4096
    for small vocabularies. Larger chunks amortise the per-chunk d-weight update (one (V, H) read and
    write per chunk) and the per-op overhead of the elementwise pass; cache-sized row blocks of that
    pass were measured 1.2x (256 rows) to 6.6x (16 rows) slower than one 1024-row block at V = 49152,
    because the pure-PyTorch pass is several ops, each re-reading the tile anyway. CUDA: 1024 (the
    Triton kernel is one program per row; the chunk only bounds memory).

    Args:
        vocab: the larger of the two vocabularies.
        device: where the loss runs.
    Returns:
        The chunk size in tokens.
    Example:
        >>> default_chunk_size(49152, "cpu")
        1024
    """
    if torch.device(device).type != "cpu":
        return 1024
    rows = max(CHUNK_WORKSPACE_BYTES // (_BYTES_PER_ENTRY * max(vocab, 1)), 1)
    return int(min(4096, max(64, 1 << (rows.bit_length() - 1))))


@dataclass
class KDConfig:
    kind: int
    beta: float
    temperature: float
    top_k: int | None
    reduction: str
    chunk_size: int
    use_triton: bool = False  # the chunk op's kernel: Triton, else the pure-PyTorch reference
    student_softcap: float | None = None  # final-logit soft-caps: logits -> cap * tanh(logits / cap)
    teacher_softcap: float | None = None


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
    want = row_scale is not None
    space = workspace_for(hs)
    gs = Gemm(ws, hs.dtype, space, "s", grads=want)
    gt = Gemm(wt, ht.dtype, space, "t")
    c_max = max(min(cfg.chunk_size, n), 1)
    per_tok = torch.empty(n, dtype=torch.float32, device=dev)  # (n,)
    gh = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if want and need[0] else None  # (N, Hs)
    gw = torch.zeros(ws.shape, dtype=torch.float32, device=dev) if want and need[1] else None  # (Vs, Hs)
    gb = torch.zeros(ws.shape[0], dtype=torch.float32, device=dev) if want and need[2] and bs is not None else None
    # half-precision gradient GEMMs: the chunk op writes the logits gradient straight into this buffer
    gbuf = None
    if want and gs.grad_dtype != torch.float32:
        gbuf = space.get("g16", (c_max, ws.shape[0]), gs.grad_dtype, dev)  # (c, Vs)
    for i in range(0, n, cfg.chunk_size):
        j = min(i + cfg.chunk_size, n)
        if idx is None:
            h_s, h_t = hs[i:j], ht[i:j]  # (c, Hs), (c, Ht) views
        else:
            rows = idx[i:j]
            h_s, h_t = hs.index_select(0, rows), ht.index_select(0, rows)
        s_logits = gs.logits(h_s, bs, c_max)  # (c, Vs) fp32, workspace
        t_logits = gt.logits(h_t, bt, c_max)  # (c, Vt) fp32, workspace
        cap_grad = None  # d capped / d raw = 1 - tanh^2, taken before top-k masks logits to -inf
        if cfg.student_softcap:
            s_logits.div_(cfg.student_softcap).tanh_()
            if want:
                cap_grad = torch.mul(s_logits, s_logits, out=space.get("cap", (c_max, ws.shape[0]), torch.float32,
                                                                          dev)[: j - i]).neg_().add_(1.0)  # (c, Vs)
            s_logits.mul_(cfg.student_softcap)
        if cfg.teacher_softcap:
            t_logits.div_(cfg.teacher_softcap).tanh_().mul_(cfg.teacher_softcap)
        if cfg.top_k is not None:
            topk_mask_(s_logits, t_logits, cfg.top_k)
        scale = None
        if want:
            scale = row_scale[i:j] if torch.is_tensor(row_scale) else torch.full((j - i,), float(row_scale), device=dev)
        g_out = None if gbuf is None else gbuf[: j - i]
        loss_c = torch.ops.minitron.kd_chunk(s_logits, t_logits, scale, g_out, cfg.kind, cfg.beta, cfg.temperature,
                                             cfg.use_triton)
        per_tok[i:j] = loss_c
        if not want:
            continue
        g = s_logits if g_out is None else g_out  # (c, Vs) in grad_dtype
        if cap_grad is not None:  # chain rule through the soft-cap, in fp32, written back in g's dtype
            g.copy_(cap_grad.mul_(g))
        if gh is not None:
            if idx is None:
                gh[i:j] = gs.grad_act(g)
            else:
                gh.index_copy_(0, rows, gs.grad_act(g).float())
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
