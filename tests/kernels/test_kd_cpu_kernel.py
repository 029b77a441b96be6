"""The fused CPU kernel of the KD chunk (csrc/kd_cpu.cpp) against the pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from minitron.losses.kd import cpu_kernel as K
from minitron.losses.kd.reference import FORWARD_KL, JSD, kd_chunk_reference


def _cpu_has_avx512() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512f" in flags and " avx512dq" in flags


@pytest.fixture(scope="module")
def kernel():
    fn = K.cpu_kernel()
    if fn is None:
        from minitron.ops._loader import load_extension

        # on an AVX-512 machine with the extension built the kernel must be there: never skip silently
        assert not (_cpu_has_avx512() and load_extension() is not None), "extension built, AVX-512 CPU, no kernel"
        pytest.skip("no AVX-512 or no C++ extension: the reference runs instead")
    return fn


SHAPES = [(1, 1), (3, 17), (2, 16), (7, 1000), (5, 4099), (4, 49152)]


@pytest.mark.parametrize("c,v", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference(kernel, c, v, temperature):
    g = torch.Generator().manual_seed(c * 7919 + v)
    s, t = torch.randn(c, v, generator=g) * 4, torch.randn(c, v, generator=g) * 4
    rs = torch.rand(c, generator=g) + 0.1
    want_loss, want_grad = kd_chunk_reference(s.clone(), t.clone(), rs, FORWARD_KL, 0.5, temperature)
    s_k = s.clone()
    loss = kernel(s_k, t.clone(), rs, temperature)
    # fp32 logits, fp64 row sums in the kernel vs torch's fp32 cascade sums: ~1e-6 relative
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(s_k, want_grad, rtol=2e-5, atol=1e-7)
    assert kernel(s.clone(), t.clone(), None, temperature).allclose(want_loss, rtol=2e-5, atol=1e-6)


def test_masked_entries_top_k_and_nan(kernel):
    """-inf teacher entries contribute 0; -inf on both sides (top-k masking) gives 0 gradient there; NaN propagates."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 301, generator=g), torch.randn(6, 301, generator=g)
    t[:, 5:40] = float("-inf")
    s[:3, 5:40] = float("-inf")
    rs = torch.full((6,), 0.25)
    want_loss, want_grad = kd_chunk_reference(s.clone(), t.clone(), rs)
    s_k = s.clone()
    loss = kernel(s_k, t.clone(), rs, 1.0)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(s_k, want_grad, rtol=2e-5, atol=1e-7)
    assert (s_k[:3, 5:40] == 0).all()  # masked on both sides: no gradient (rows 3-5 keep Q there)
    t[2, 7] = float("nan")
    assert torch.isnan(kernel(s.clone(), t.clone(), rs, 1.0)[2])


def test_op_uses_the_kernel_and_falls_back(kernel, monkeypatch):
    """torch.ops.minitron.kd_chunk runs the kernel for forward KL; JSD, vocab padding and the switch use the reference."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 257, generator=g), torch.randn(5, 257, generator=g)
    rs = torch.full((5,), 0.5)
    assert K.cpu_kernel_applies(s, t, FORWARD_KL)
    assert not K.cpu_kernel_applies(s, t, JSD)
    assert not K.cpu_kernel_applies(s, torch.randn(5, 300), FORWARD_KL)
    assert not K.cpu_kernel_applies(s.t().contiguous().t(), t, FORWARD_KL)
    calls = []
    monkeypatch.setattr(K, "_loaded", lambda: (lambda *a: calls.append(1) or kernel(*a)))
    grad = torch.empty(5, 257, dtype=torch.bfloat16)
    loss = torch.ops.minitron.kd_chunk(s.clone(), t.clone(), rs, grad, FORWARD_KL, 0.5, 1.0, False)
    assert calls == [1]
    want_loss, want_grad = kd_chunk_reference(s.clone(), t.clone(), rs)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad.bfloat16(), rtol=1e-2, atol=1e-4)  # rounded once to bf16
    monkeypatch.setenv("MINITRON_KD_CPU_KERNEL", "0")
    torch.ops.minitron.kd_chunk(s.clone(), t.clone(), rs, None, FORWARD_KL, 0.5, 1.0, False)
    assert calls == [1]


def test_linear_kd_loss_same_with_and_without_kernel(kernel, monkeypatch):
    """The whole fused linear KD loss (forward + backward) is the same on the kernel and the reference."""
    from minitron.losses import linear_kd_loss

    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(37, 24, generator=g), torch.randn(37, 40, generator=g)
    ws, wt = torch.randn(999, 24, generator=g) * 0.2, torch.randn(999, 40, generator=g) * 0.2

    def run():
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = linear_kd_loss(h, w, ht, wt, chunk_size=16, temperature=1.5)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    got = run()
    monkeypatch.setenv("MINITRON_KD_CPU_KERNEL", "0")
    want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
