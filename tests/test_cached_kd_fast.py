"""The fast top-k + tail KD loss (gradient computed in forward) against its plain-autograd reference (issue #27).

``topk_tail_kd_loss`` (:mod:`minitron.losses.cached_chunked`) vs ``topk_tail_kd_loss_reference`` on odd shapes
(V, H not powers of two, N not a multiple of the chunk), k = 1 and k = V (no tail), masks, temperature,
soft-cap, bias, both reductions. Tolerances, relative to the largest entry of the reference:

* fp32 inputs: loss 1e-5, gradients 2e-5 (same fp32 logits; only the order of the sums differs);
* bf16 inputs / bf16 autocast: loss 1e-4 (the logits stay fp32 from the same bf16-rounded operands),
  gradients 2e-2 (the gradient GEMMs run in bf16 on CPUs with native bf16: the (c, V) logits gradient is
  rounded once to bf16, and gradients of bf16 inputs come back in bf16).
"""

from __future__ import annotations

import pytest
import torch

from minitron.losses.cached import topk_tail_kd_loss, topk_tail_kd_loss_reference
from minitron.losses.kd.workspace import release_workspace, workspace_for

TOL = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (1e-4, 2e-2)}  # (loss, gradients)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _case(n=37, h=19, v=101, k=7, tau=1.0, seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.4
    bs = torch.randn(v, generator=g) * 0.2 if bias else None
    t = torch.randn(n, v, generator=g) * 2.0  # teacher logits
    top = t.topk(k, -1)
    return hs.to(dtype), ws.to(dtype), bs, top.indices, top.values, (t / tau).logsumexp(-1)


def _run(fn, hs, ws, bs, ids, z, lse, **kw):
    """Loss and gradients w.r.t. (hidden, weight[, bias]) of fresh leaves."""
    leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    if bs is not None:
        leaves.append(bs.clone().requires_grad_())
    loss = fn(leaves[0], leaves[1], ids, z, lse, student_bias=leaves[2] if bs is not None else None, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _check(got, ref, dtype):
    tol_loss, tol_grad = TOL[dtype]
    assert _rel(got[0], ref[0]) <= tol_loss, (got[0], ref[0])
    for name, a, b in zip(("hidden", "weight", "bias"), got[1], ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol_grad, (name, _rel(a, b))


@pytest.mark.parametrize("n,h,v,k,chunk,tau,cap,reduction", [
    (37, 19, 101, 7, 8, 1.0, None, "mean"),  # N not a multiple of the chunk
    (37, 19, 101, 1, 16, 1.0, None, "sum"),  # k = 1
    (23, 13, 67, 67, 5, 1.0, None, "mean"),  # k = V: no tail bucket
    (29, 21, 131, 11, 29, 2.5, None, "mean"),  # temperature, one chunk
    (31, 17, 97, 9, 7, 0.7, 3.0, "sum"),  # soft-cap and temperature
])
def test_fast_matches_reference_fp32(n, h, v, k, chunk, tau, cap, reduction):
    case = _case(n, h, v, k, tau)
    kw = dict(temperature=tau, chunk_size=chunk, student_softcap=cap, reduction=reduction)
    _check(_run(topk_tail_kd_loss, *case, **kw), _run(topk_tail_kd_loss_reference, *case, **kw), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_rows_fp32(reduction):
    hs, ws, bs, ids, z, lse = _case(n=41, k=5)
    mask = torch.rand(41, generator=torch.Generator().manual_seed(3)) > 0.4
    hs[~mask] = float("nan")  # what a padded position may hold: must not reach the loss or the gradients
    kw = dict(mask=mask, chunk_size=6, reduction=reduction)
    got, ref = _run(topk_tail_kd_loss, hs, ws, bs, ids, z, lse, **kw), _run(topk_tail_kd_loss_reference, hs, ws, bs,
                                                                              ids, z, lse, **kw)
    _check(got, ref, torch.float32)
    assert (got[1][0][~mask] == 0).all()


def test_all_rows_masked_gives_zero():
    hs, ws, bs, ids, z, lse = _case()
    loss, grads = _run(topk_tail_kd_loss, hs, ws, bs, ids, z, lse, mask=torch.zeros(37))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


def test_bf16_inputs():
    """bf16 hidden states and weight (no autocast): fp32 logits, gradients in bf16, within the bf16 tolerance."""
    case = _case(n=45, h=27, v=157, k=9, dtype=torch.bfloat16, bias=False)
    kw = dict(chunk_size=16, temperature=1.5)
    _check(_run(topk_tail_kd_loss, *case, **kw), _run(topk_tail_kd_loss_reference, *case, **kw), torch.bfloat16)


def test_bf16_autocast():
    """Under CPU autocast the GEMM operands are rounded to bf16 once (as linear_kd_loss does); the logits stay fp32.

    Reference: the same loss on the bf16-rounded operands in fp32 math, autocast off. Gradients of the fp32
    leaves come back in fp32.
    """
    hs, ws, bs, ids, z, lse = _case(n=45, h=27, v=157, k=9)
    kw = dict(chunk_size=16, student_softcap=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(topk_tail_kd_loss, hs, ws, bs, ids, z, lse, **kw)
    rounded = (hs.bfloat16().float(), ws.bfloat16().float())
    ref = _run(topk_tail_kd_loss_reference, *rounded, bs, ids, z, lse, **kw)
    _check(got, ref, torch.bfloat16)
    assert got[1][0].dtype == torch.float32 and got[1][1].dtype == torch.float32


def test_teacher_mass_all_in_topk_and_zero_probabilities():
    """P_t = 0 (the teacher has no mass outside its k ids) and p_k = 0 entries: same result as the reference, no NaN."""
    hs, ws, bs, ids, z, _ = _case(k=6)
    z = z.clone()
    z[:5, -1] = float("-inf")  # p_k == 0 for the last id of the first rows
    lse = z.logsumexp(-1)  # the teacher's whole mass in its k ids: P_t = 0
    got, ref = _run(topk_tail_kd_loss, hs, ws, bs, ids, z, lse), _run(topk_tail_kd_loss_reference, hs, ws, bs, ids, z,
                                                                        lse)
    _check(got, ref, torch.float32)
    assert torch.isfinite(got[0])


def test_non_finite_hidden_gives_nan_loss_like_reference():
    """A NaN in a counted row makes the loss NaN (the trainer then stops on its non-finite-loss check), never a
    silently finite number."""
    hs, ws, bs, ids, z, lse = _case()
    hs[4, 2] = float("nan")
    assert torch.isnan(topk_tail_kd_loss(hs, ws, ids, z, lse, student_bias=bs))
    assert torch.isnan(topk_tail_kd_loss_reference(hs, ws, ids, z, lse, student_bias=bs))


def test_no_grad_matches_grad_path():
    hs, ws, bs, ids, z, lse = _case()
    with torch.no_grad():
        plain = topk_tail_kd_loss(hs, ws, ids, z, lse, student_bias=bs, chunk_size=8)
    assert _rel(plain, _run(topk_tail_kd_loss, hs, ws, bs, ids, z, lse, chunk_size=8)[0]) <= 1e-6


def test_chunks_reuse_the_workspace():
    """The chunk's (c, V) buffers live in this thread's workspace, and a second call allocates none."""
    release_workspace()
    case = _case(n=64, v=211)
    _run(topk_tail_kd_loss, *case, chunk_size=16)
    space = workspace_for(case[0])
    before = space.nbytes()
    assert before >= 16 * 211 * 4  # at least the (16, 211) fp32 logits buffer
    _run(topk_tail_kd_loss, *case, chunk_size=16)
    assert space.nbytes() == before


def test_bad_chunk_size():
    hs, ws, bs, ids, z, lse = _case()
    with pytest.raises(ValueError, match="chunk_size"):
        topk_tail_kd_loss(hs, ws, ids, z, lse, chunk_size=0)
