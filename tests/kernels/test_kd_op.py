"""The KD op's pieces on CPU: the registered custom op, torch.compile, the bf16 gradient GEMMs, the workspace.

Tolerances (``_rel`` = ||a - b||_2 / ||b||_2 unless named otherwise):
  custom op vs the reference it wraps:     exact (same code, same buffers);
  torch.compile vs eager, fp32:            loss 1e-5, gradients 1e-5 (summation order only);
  cpu_bf16 gradient GEMMs vs fp32 path:    dH, dW 1e-2 relative L2 on bf16-valued inputs (measured 2.3e-3
                                           at V=49152, H=432: the logits gradient and each chunk's
                                           product are rounded once to bf16), loss 1e-5 (logits are fp32).
"""

from __future__ import annotations

import resource

import pytest
import torch

from minitron.losses import linear_kd_loss
from minitron.losses.kd import gemm, op  # noqa: F401 - op registers torch.ops.minitron.kd_chunk
from minitron.losses.kd.reference import FORWARD_KL, JSD, REVERSE_KL, kd_chunk_reference
from minitron.losses.kd.workspace import Workspace, release_workspace


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _loss_and_grads(dtype, n=67, hs=24, ht=40, v=1003, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(v, hs, generator=g) * 0.8).to(dtype).requires_grad_()  # logit std ~4
    h_t, w_t = torch.randn(n, ht, generator=g).to(dtype), (torch.randn(v, ht, generator=g) * 0.6).to(dtype)
    loss = linear_kd_loss(h_s, w_s, h_t, w_t, **kw)
    loss.backward()
    return loss.detach(), h_s.grad.float(), w_s.grad.float()


@pytest.mark.parametrize("kind", [FORWARD_KL, REVERSE_KL, JSD])
@pytest.mark.parametrize("vs,vt", [(1003, 1003), (997, 1003), (1003, 990)])
def test_custom_op_matches_the_reference_and_writes_the_gradient_over_the_student_logits(kind, vs, vt, monkeypatch):
    # bit-exact against the reference: the fused CPU kernel is compared in test_kd_cpu_kernel.py
    monkeypatch.setenv("MINITRON_KD_CPU_KERNEL", "0")
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(13, vs, generator=g) * 3, torch.randn(13, vt, generator=g) * 3
    scale = torch.full((13,), 1 / 13)
    ref_loss, ref_grad = kd_chunk_reference(s.clone(), t.clone(), scale, kind, 0.3, 1.7)
    s_op = s.clone()
    loss = torch.ops.minitron.kd_chunk(s_op, t.clone(), scale, None, kind, 0.3, 1.7, False)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)  # reverse KL, Vt < Vs: inf
    torch.testing.assert_close(s_op, ref_grad, rtol=0, atol=0, equal_nan=True)  # vocab padding: copied back into s_logits
    g16 = torch.empty(13, vs, dtype=torch.bfloat16)
    torch.ops.minitron.kd_chunk(s.clone(), t.clone(), scale, g16, kind, 0.3, 1.7, False)
    torch.testing.assert_close(g16, ref_grad.bfloat16(), rtol=0, atol=0, equal_nan=True)


def test_custom_op_passes_opcheck():
    """Schema, mutation annotations and the fake kernel agree with what the op does."""
    s, t = torch.randn(5, 33), torch.randn(5, 31)
    torch.library.opcheck(torch.ops.minitron.kd_chunk.default, (s, t, torch.full((5,), 0.2), None, 0, 0.5, 2.0, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_of_linear_kd_loss_matches_eager_on_cpu():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    kw = dict(temperature=2.0, chunk_size=16, labels=torch.tensor([1, -100] * 33 + [5]), impl="chunked")
    eager = _loss_and_grads(torch.float32, **kw)
    torch._dynamo.reset()
    compiled_fn = torch.compile(linear_kd_loss, backend="eager")  # dynamo tracing + the op's fake kernel
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(67, 24, generator=g).requires_grad_()
    w_s = (torch.randn(1003, 24, generator=g) * 0.8).requires_grad_()
    h_t, w_t = torch.randn(67, 40, generator=g), torch.randn(1003, 40, generator=g) * 0.6
    loss = compiled_fn(h_s, w_s, h_t, w_t, **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-5, atol=1e-6)
    assert _rel(h_s.grad, eager[1]) < 1e-5 and _rel(w_s.grad, eager[2]) < 1e-5


@pytest.mark.parametrize("top_k,temperature", [(None, 1.0), (50, 2.0)])
def test_cpu_bf16_gradient_gemms_stay_within_tolerance_of_the_fp32_path(monkeypatch, top_k, temperature):
    """bf16 inputs on a native-bf16 CPU: logits GEMMs in fp32, the two gradient GEMMs in bf16."""
    monkeypatch.setattr(gemm, "cpu_fast_bf16", lambda: True)  # the path is taken (and correct) on any CPU
    w = torch.randn(10, 4).bfloat16()
    assert gemm.Gemm(w, torch.bfloat16, Workspace(), "s", grads=True).cpu_bf16
    kw = dict(temperature=temperature, top_k=top_k, chunk_size=16, impl="chunked")
    loss16, gh16, gw16 = _loss_and_grads(torch.bfloat16, **kw)
    # the fp32 path on the same bf16 values: cast the inputs up, compute in fp32
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(67, 24, generator=g).bfloat16().float().requires_grad_()
    w_s = (torch.randn(1003, 24, generator=g) * 0.8).bfloat16().float().requires_grad_()
    h_t = torch.randn(67, 40, generator=g).bfloat16().float()
    w_t = (torch.randn(1003, 40, generator=g) * 0.6).bfloat16().float()
    loss32 = linear_kd_loss(h_s, w_s, h_t, w_t, **kw)
    loss32.backward()
    assert abs(loss16.item() - loss32.item()) <= 1e-5 * abs(loss32.item())
    err_h, err_w = _rel(gh16, h_s.grad), _rel(gw16, w_s.grad)
    assert err_h < 1e-2 and err_w < 1e-2, (err_h, err_w)
    assert err_w > 0  # the bf16 GEMMs did run (an fp32 path on these values would match exactly)


def test_chunk_buffers_are_reused_across_chunks_and_calls():
    """The second call faults in (almost) no new pages: no (c, V) buffer is mapped afresh.

    Buffers are 64 MiB (512 x 32768 fp32), above glibc's largest mmap threshold (32 MiB), so a fresh
    allocation per chunk would be a fresh mapping: >= 5 such buffers per chunk, 16k pages each.
    """
    release_workspace()
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(1024, 8, generator=g).requires_grad_()
    w_s = torch.randn(32768, 8, generator=g).requires_grad_()
    h_t, w_t = torch.randn(1024, 8, generator=g), torch.randn(32768, 8, generator=g)

    def step():
        h_s.grad = w_s.grad = None
        linear_kd_loss(h_s, w_s, h_t, w_t, chunk_size=512, impl="chunked").backward()

    step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    page_per_buffer = 512 * 32768 * 4 // 4096
    assert faults < page_per_buffer, f"{faults} minor faults: a (c, V) buffer was mapped afresh"
    assert release_workspace() >= 2 * 512 * 32768 * 4


def test_default_chunk_size_follows_the_vocabulary_and_an_explicit_one_wins(monkeypatch):
    from minitron.losses.kd import chunked

    assert [chunked.default_chunk_size(v, "cpu") for v in (1003, 49152, 128256, 256000)] == [4096, 1024, 256, 128]
    seen = []
    real = chunked.kd_loop
    monkeypatch.setattr(chunked, "kd_loop", lambda *a, **k: seen.append(a[7].chunk_size) or real(*a, **k))
    _loss_and_grads(torch.float32, impl="chunked")
    _loss_and_grads(torch.float32, impl="chunked", chunk_size=16)
    assert seen == [4096, 16]
    with pytest.raises(ValueError, match="chunk_size=0 must be an integer >= 1, or None"):
        _loss_and_grads(torch.float32, chunk_size=0)
