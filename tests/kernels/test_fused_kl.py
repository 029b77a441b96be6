"""Fused linear + KD loss: chunked and Triton paths vs the naive fp32 reference.

The Triton path runs on CUDA when available, else on CPU under TRITON_INTERPRET=1, which
tests/kernels/conftest.py sets before triton is first imported. Should triton have been imported
without it anyway, the Triton/Liger tests skip in-process and
``test_triton_paths_in_interpreter_subprocess`` re-runs them in a fresh pytest process started
with TRITON_INTERPRET=1 (small shapes keep the interpreter fast).

Tolerances (max |a - b| / max |b| over the whole tensor, ``_rel``):
  fp32 inputs:       loss and every gradient 2e-5 (all paths accumulate in fp32; only
                     summation order differs).
  bf16/fp16 inputs:  loss 1e-4 (logits are fp32 on every path: CPU upcasts the weights,
                     CUDA uses fp32-output GEMMs); gradients 1.5e-2, i.e. about two bf16 ulps:
                     grads are returned in the input dtype (one rounding), and on CUDA the grad
                     logits are rounded to bf16 before the dX / dW GEMMs (as autograd would do
                     in a bf16 model).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import have_triton, rerun_in_interpreter, triton_runnable

from minitron.losses import last_impl, linear_kd_loss

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
# the interpreter evaluates masked -inf lanes with numpy (inf - inf in discarded branches)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
N, HS, HT, V = 37, 24, 16, 1003  # odd shapes; chunk_size=10 does not divide N
CHUNK = 10
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-4, 1.5e-2), torch.float16: (1e-4, 1.5e-2)}  # (loss, grad)


TRITON_OK = triton_runnable()
IMPLS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="triton not runnable here"))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _inputs(vs=V, vt=V, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    d = dict(
        student_hidden=mk(N, HS).requires_grad_(),
        student_weight=mk(vs, HS, scale=0.3).requires_grad_(),
        teacher_hidden=mk(N, HT),
        teacher_weight=mk(vt, HT, scale=0.3),
    )
    if bias:
        d["student_bias"] = mk(vs, scale=0.5).requires_grad_()
        d["teacher_bias"] = mk(vt, scale=0.5)
    return d


def _run(impl, inputs, **kw):
    inp = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    out = linear_kd_loss(**inp, impl=impl, chunk_size=CHUNK, **kw)
    # non-uniform upstream gradient for reduction="none" (exercises the recompute path)
    w = torch.linspace(0.5, 1.5, N, device=out.device) if out.dim() else 1.0
    (out * w).sum().backward()
    grads = {k: v.grad for k, v in inp.items() if v.requires_grad}
    assert inp["teacher_hidden"].grad is None and inp["teacher_weight"].grad is None
    return out.detach(), grads


def _labels(seed=1):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 100, (N,), generator=g)
    lab[::3] = -100
    lab[-4:] = -100
    return lab.to(DEVICE)


CASES = {
    "forward_kl": dict(),
    "labels_ignore_index": dict(labels="labels"),
    "mask": dict(mask="mask"),
    "temperature2": dict(temperature=2.0, labels="labels"),
    "vocab_teacher_smaller": dict(vt=V - 97),  # teacher padded with -inf: forward KL finite
    "vocab_student_smaller_reverse": dict(vs=V - 97, loss="reverse_kl"),  # student padded: reverse KL finite
    "vocab_mismatch_jsd": dict(vs=V - 50, loss="jsd"),
    "top_k": dict(top_k=17),
    "top_k_temperature_jsd": dict(top_k=5, temperature=2.0, loss="jsd", beta=0.3),
    "reverse_kl": dict(loss="reverse_kl"),
    "jsd_beta_half": dict(loss="jsd", beta=0.5),
    "reduction_sum": dict(reduction="sum", labels="labels"),
    "reduction_none": dict(reduction="none", labels="labels"),
    "reduction_none_jsd": dict(reduction="none", loss="jsd", beta=0.5),
    "bias": dict(bias=True, loss="reverse_kl"),
}


def _case(name):
    kw = dict(CASES[name])
    shape = dict(vs=kw.pop("vs", V), vt=kw.pop("vt", V), bias=kw.pop("bias", False))
    if kw.get("labels") == "labels":
        kw["labels"] = _labels()
    if kw.get("mask") == "mask":
        kw["mask"] = _labels(seed=2) != -100
    return shape, kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_fp32(impl, case):
    shape, kw = _case(case)
    inputs = _inputs(**shape)
    ref, ref_g = _run("naive", inputs, **kw)
    out, g = _run(impl, inputs, **kw)
    assert last_impl() == impl
    tol_loss, tol_grad = TOL[torch.float32]
    assert torch.isfinite(ref).all()
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) <= tol_loss, (case, _rel(out, ref))
    for k in ref_g:
        assert g[k].dtype == inputs[k].dtype and g[k].shape == inputs[k].shape
        assert _rel(g[k], ref_g[k]) <= tol_grad, (case, k, _rel(g[k], ref_g[k]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_naive_half(impl, dtype):
    inputs = _inputs(dtype=dtype, vt=V - 3, bias=True)
    kw = dict(labels=_labels(), temperature=2.0)
    ref, ref_g = _run("naive", inputs, **kw)
    out, g = _run(impl, inputs, **kw)
    tol_loss, tol_grad = TOL[dtype]
    assert _rel(out, ref) <= tol_loss
    for k in ref_g:
        assert g[k].dtype == dtype
        assert _rel(g[k], ref_g[k]) <= tol_grad, (k, _rel(g[k], ref_g[k]))


@pytest.mark.parametrize("impl", ["naive", *IMPLS])
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_all_masked_is_zero_without_nan(impl, loss):
    inputs = _inputs(bias=True)
    out, g = _run(impl, inputs, mask=torch.zeros(N, dtype=torch.bool, device=DEVICE), loss=loss)
    assert out.item() == 0.0
    for k, v in g.items():
        assert v is not None and torch.isfinite(v).all() and v.abs().max().item() == 0.0, k
    out, _ = _run(impl, inputs, labels=torch.full((N,), -100, device=DEVICE), reduction="none")
    assert out.shape == (N,) and (out == 0).all()


def test_naive_matches_kl_div_formula():
    """Independent check of the reference: forward KL = F.kl_div(log q, log p, log_target) / n."""
    inp = _inputs()
    s = (inp["student_hidden"].float() @ inp["student_weight"].float().t()) / 2.0
    t = (inp["teacher_hidden"].float() @ inp["teacher_weight"].float().t()) / 2.0
    direct = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / N * 4.0
    naive = linear_kd_loss(**inp, temperature=2.0, impl="naive")
    assert _rel(naive, direct) <= 1e-6


def test_naive_vocab_padding_is_minus_inf():
    """Padding the smaller teacher vocab with -inf == a huge negative pad; zero padding would differ."""
    inp = _inputs(vt=V - 97)
    naive = linear_kd_loss(**inp, impl="naive")
    s = inp["student_hidden"].float() @ inp["student_weight"].float().t()
    t = inp["teacher_hidden"].float() @ inp["teacher_weight"].float().t()
    direct = lambda pad: F.kl_div(  # noqa: E731
        F.log_softmax(s, -1), F.log_softmax(F.pad(t, (0, 97), value=pad), -1), log_target=True, reduction="sum"
    ) / N
    assert _rel(naive, direct(-1e9)) <= 1e-6
    assert _rel(naive, direct(0.0)) > 1e-2


def test_naive_jsd_limits_and_topk_full():
    inp = _inputs()
    fwd = linear_kd_loss(**inp, impl="naive")
    rev = linear_kd_loss(**inp, loss="reverse_kl", impl="naive")
    assert linear_kd_loss(**inp, loss="jsd", beta=0.0, impl="naive").item() == pytest.approx(fwd.item(), rel=1e-6)
    assert linear_kd_loss(**inp, loss="jsd", beta=1.0, impl="naive").item() == pytest.approx(rev.item(), rel=1e-6)
    jsd = linear_kd_loss(**inp, loss="jsd", beta=0.5, impl="naive").item()
    assert 0.0 < jsd < min(fwd.item(), rev.item())
    assert linear_kd_loss(**inp, top_k=V, impl="naive").item() == pytest.approx(fwd.item(), rel=1e-6)


def test_dispatch_and_errors():
    inp = _inputs()
    with torch.no_grad():
        out = linear_kd_loss(**inp)  # no autograd: loss-only loop
    assert last_impl() == ("triton" if CUDA and TRITON_OK else "chunked")
    assert torch.isfinite(out)
    for bad in (dict(impl="fast"), dict(loss="mse"), dict(reduction="avg"), dict(beta=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            linear_kd_loss(**inp, **bad)


@pytest.mark.parametrize("impl", ["naive", *IMPLS])
@pytest.mark.parametrize("beta,tau", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_liger_fused_linear_jsd(impl, beta, tau):
    """Cross-check with Liger's LigerFusedLinearJSD (skipped when liger_kernel is absent).

    Liger's conventions (checked in liger_kernel/ops/jsd.py and fused_linear_jsd.py): X = student
    log-probs, Y = teacher log-probs, loss = beta KL(P||M) + (1-beta) KL(Q||M) with
    M = beta P + (1-beta) Q, and beta=0 special-cased to forward KL(P_teacher || Q_student),
    beta=1 to reverse KL; temperature divides both logits but the loss is NOT multiplied by
    tau^2; mean over tokens whose label != ignore_index. So ours / tau^2 == Liger, for the
    loss and for the student hidden / weight gradients.
    """
    pytest.importorskip("liger_kernel")
    if not TRITON_OK:
        pytest.skip("Liger needs triton (CUDA, or the interpreter on CPU: see the subprocess test)")
    from liger_kernel.transformers import LigerFusedLinearJSD

    inp = _inputs()
    labels = _labels()
    ours, g = _run(impl, inp, loss="jsd", beta=beta, temperature=tau, labels=labels)
    lig_in = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inp.items()}
    lig = LigerFusedLinearJSD(jsd_beta=beta, temperature=tau)(
        lig_in["student_hidden"], lig_in["student_weight"], lig_in["teacher_hidden"], lig_in["teacher_weight"], labels
    )
    lig.backward()
    scale = 1.0 / tau**2
    assert _rel(ours * scale, lig.detach()) <= 2e-5
    for k in ("student_hidden", "student_weight"):
        assert _rel(g[k] * scale, lig_in[k].grad) <= 2e-5, k


@pytest.mark.skipif(CUDA or TRITON_OK or not have_triton(), reason="Triton tests already ran in-process")
def test_triton_paths_in_interpreter_subprocess():
    """Run this file's Triton and Liger tests in a fresh process with TRITON_INTERPRET=1."""
    # no Triton test may skip there; only the Liger comparisons when liger_kernel is absent, and this test itself
    rerun_in_interpreter(__file__, "triton or liger", allowed_skips=r"could not import 'liger_kernel'|already ran in-process")


def _chunk_fns():
    from minitron_kernels.fused_kl_reference import kd_chunk_reference

    fns = [pytest.param(kd_chunk_reference, id="reference")]
    if TRITON_OK:
        from minitron_kernels.fused_kl import kd_chunk_triton

        fns.append(pytest.param(kd_chunk_triton, id="triton"))
    else:
        fns.append(pytest.param(None, id="triton", marks=pytest.mark.skip(reason="triton not runnable here")))
    return fns


@pytest.mark.parametrize("chunk_fn", _chunk_fns())
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_grad_written_once_in_half(chunk_fn, kind, dtype):
    """grad_out: the logits gradient lands in a half buffer, rounded once from the fp32 gradient.

    Tolerance, relative to the largest entry: half an ulp at most (round to nearest; bf16
    2^-8 -> 4e-3, fp16 2^-11 -> 5e-4), doubled for Triton in the CPU interpreter, whose numpy
    fp32 -> bf16 cast truncates (compiled Triton rounds to nearest even).
    """
    from minitron_kernels.fused_kl_reference import kd_chunk_reference

    g = torch.Generator().manual_seed(kind)
    c, vs, vt = 13, 1003, 997  # odd rows; the smaller vocab is padded with -inf
    if kind == 1:  # reverse KL is finite only when the student's support lies inside the teacher's
        vs, vt = vt, vs
    s = (torch.randn(c, vs, generator=g) * 3).to(DEVICE)
    t = (torch.randn(c, vt, generator=g) * 3).to(DEVICE)
    scale = torch.linspace(0.5, 1.5, c, device=DEVICE)
    ref_loss, ref_grad = kd_chunk_reference(s.clone(), t.clone(), scale, kind, 0.3, 2.0)  # fp32
    buf = torch.full((c, vs), float("nan"), dtype=dtype, device=DEVICE)
    loss, grad = chunk_fn(s.clone(), t.clone(), scale, kind, 0.3, 2.0, grad_out=buf)
    assert grad.data_ptr() == buf.data_ptr() and grad.dtype == dtype
    assert _rel(loss, ref_loss) <= 2e-5
    assert torch.isfinite(grad).all()
    tol = (4e-3 if dtype == torch.bfloat16 else 5e-4) * (2 if chunk_fn is not kd_chunk_reference and not CUDA else 1)
    assert _rel(grad.float(), ref_grad) <= tol, _rel(grad.float(), ref_grad)
    # the loss-only call leaves the buffer alone
    buf.fill_(7.0)
    _, none = chunk_fn(s.clone(), t.clone(), None, kind, 0.3, 2.0, grad_out=buf)
    assert none is None and (buf == 7.0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("acc_in_place", [True, False], ids=["addmm_fp32_out", "mm_plus_add"])
def test_native_half_gemm_path(impl, acc_in_place, monkeypatch):
    """The CUDA bf16 path (fp32-output GEMMs, bf16 logits gradient fed to the dX / dW GEMMs).

    Off CUDA the half GEMMs with fp32 output are emulated (bf16 inputs upcast exactly, fp32
    accumulation, which is what the tensor-core GEMM computes up to summation order), so the
    chunk loop's half-precision plumbing is checked everywhere. Spies assert every GEMM got
    half inputs (nothing silently upcast) and that dW accumulated in fp32.
    """
    from minitron.losses import fused

    calls = {"mm": 0, "addmm": 0}
    dtype = torch.bfloat16

    def mm_f32(a, b):
        assert a.dtype == dtype and b.dtype == dtype, (a.dtype, b.dtype)
        calls["mm"] += 1
        return a.float() @ b.float() if not CUDA else torch.mm(a, b, out_dtype=torch.float32)

    def addmm_f32_(c, a, b):
        assert c.dtype == torch.float32 and a.dtype == dtype and b.dtype == dtype
        calls["addmm"] += 1
        c.addmm_(a.float(), b.float())

    if not CUDA:
        monkeypatch.setattr(fused, "_NATIVE_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fused, "_mm_f32", mm_f32)
    monkeypatch.setattr(fused, "_addmm_f32_", addmm_f32_)
    monkeypatch.setattr(fused, "_native_support", lambda device, dt: (True, acc_in_place))
    inputs = _inputs(dtype=dtype, vt=V - 3, bias=True)
    kw = dict(labels=_labels(), temperature=2.0)
    ref, ref_g = _run("naive", inputs, **kw)
    out, g = _run(impl, inputs, **kw)
    n_chunks = -(-int((_labels() != -100).sum()) // CHUNK)
    # per chunk: student + teacher logits, dX, and dW (via mm when not accumulating in place)
    assert calls["mm"] == n_chunks * (3 if acc_in_place else 4)
    assert calls["addmm"] == (n_chunks if acc_in_place else 0)
    tol_loss, tol_grad = TOL[dtype]
    assert _rel(out, ref) <= tol_loss
    for k in ref_g:
        assert g[k].dtype == dtype
        assert _rel(g[k], ref_g[k]) <= tol_grad, (k, _rel(g[k], ref_g[k]))


def test_native_support_probe_on_this_device():
    """The capability probe runs without raising; on CPU the fp32-output half GEMMs are absent."""
    from minitron.losses import fused

    ok_mm, ok_addmm = fused._native_support(DEVICE, torch.bfloat16)
    if not CUDA:
        assert (ok_mm, ok_addmm) == (False, False)
    assert ok_mm or not ok_addmm


def test_linear_kd_loss_under_autocast_runs_outside_it():
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(12, 16, generator=g), torch.randn(50, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(12, 24, generator=g), torch.randn(50, 24, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_kd_loss(hs, ws, ht, wt, impl="chunked")
    got.backward()
    ref = linear_kd_loss(hs.bfloat16(), ws.detach().bfloat16(), ht.bfloat16(), wt.bfloat16(), impl="naive")
    assert got.dtype == torch.float32 and ws.grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="checks the no-GPU error")
def test_triton_impl_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hs, ws = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA GPU .*use impl='auto' or 'chunked'"):
        linear_kd_loss(hs, ws, torch.randn(4, 8), torch.randn(10, 8), impl="triton")
