"""Final-logit soft-capping (Gemma 2 / Gemma 3 ``final_logit_softcapping``) in the chunked losses.

The model's own forward caps its logits, ``cap * tanh(logits / cap)``; every loss that projects hidden
states through the lm_head itself (evaluation's chunked cross-entropy, distillation's CE and fused KD)
must cap them too, or perplexity and KD are those of another model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from minitron.distillation import DistillConfig
from minitron.distillation.module import DistillModule
from minitron.evaluation import lm_loss
from minitron.losses import linear_kd_loss
from minitron.losses.cross_entropy import linear_cross_entropy, softcap_of
from minitron.losses.reference import divergence_from_logits

from tests.helpers import make_model


def _logits_loss(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()  # capped by the model itself
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_lm_loss_equals_the_models_own_logits(family, calib_ids):
    model = make_model(family)
    assert lm_loss(model, calib_ids, batch_size=4, chunk_size=7) == pytest.approx(_logits_loss(model, calib_ids), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_cap_matters(family, calib_ids):
    """The test above would pass by accident if the cap never bit: with it removed the loss changes."""
    model = make_model(family)
    assert softcap_of(model) == 30.0
    with torch.no_grad():  # larger logits, so that tanh is far from linear
        model.get_output_embeddings().weight.mul_(20.0)
    capped = lm_loss(model, calib_ids)
    assert capped == pytest.approx(_logits_loss(model, calib_ids), rel=1e-5)
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    assert abs(lm_loss(uncapped, calib_ids) - capped) > 1e-2
    assert lm_loss(uncapped, calib_ids) == pytest.approx(_logits_loss(uncapped, calib_ids), rel=1e-5)


def _kd_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(13, 16, generator=g)
    ws = torch.randn(50, 16, generator=g) * 3.0  # logits of tens: the cap (here 5) bites
    ht, wt = torch.randn(13, 24, generator=g), torch.randn(50, 24, generator=g) * 3.0
    return hs, ws, ht, wt


def _kd_reference(hs, ws, ht, wt, cs, ct, **kw):
    s, t = hs @ ws.t(), ht @ wt.t()
    s, t = torch.tanh(s / cs) * cs, torch.tanh(t / ct) * ct
    return divergence_from_logits(s, t, kw.get("loss", "forward_kl"), kw.get("beta", 0.5), kw.get("temperature", 1.0),
                                  kw.get("top_k")).mean()


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
@pytest.mark.parametrize("kw", [{}, {"loss": "reverse_kl", "temperature": 2.0}, {"loss": "jsd", "top_k": 5}])
def test_kd_loss_caps_both_sides_with_the_right_gradient(impl, kw):
    hs, ws, ht, wt = _kd_case()
    h_ref, w_ref = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    expected = _kd_reference(h_ref, w_ref, ht, wt, 5.0, 7.0, **kw)
    expected.backward()
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = linear_kd_loss(h, w, ht, wt, impl=impl, chunk_size=4, student_softcap=5.0, teacher_softcap=7.0, **kw)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    uncapped = linear_kd_loss(hs, ws, ht, wt, impl=impl, chunk_size=4, **kw)
    assert abs(float(uncapped) - float(got)) > 1e-3


def test_kd_loss_reduction_none_caps_in_backward():
    hs, ws, ht, wt = _kd_case(1)
    weights = torch.rand(13, generator=torch.Generator().manual_seed(2))
    grads = []
    for impl in ("naive", "chunked"):
        h = hs.clone().requires_grad_()
        per_tok = linear_kd_loss(h, ws, ht, wt, impl=impl, reduction="none", chunk_size=4,
                                 student_softcap=5.0, teacher_softcap=5.0)
        (per_tok * weights).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_distillation_losses_are_those_of_the_capped_models(calib_ids):
    teacher = make_model("gemma2", seed=0)
    student = make_model("gemma2", seed=1)
    for m in (teacher, student):
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(20.0)
    module = DistillModule(student, teacher, DistillConfig(loss_impl="chunked"))
    with torch.no_grad():
        out = module(calib_ids, mode="eval")
        s_logits = student(input_ids=calib_ids, use_cache=False).logits.float()
        t_logits = teacher(input_ids=calib_ids, use_cache=False).logits.float()
    assert float(out["lm_sum"] / out["n_lm"]) == pytest.approx(_logits_loss(student, calib_ids), rel=1e-5)
    assert float(out["teacher_lm_sum"] / out["n_lm"]) == pytest.approx(_logits_loss(teacher, calib_ids), rel=1e-5)
    kl = divergence_from_logits(s_logits.reshape(-1, 101), t_logits.reshape(-1, 101), "forward_kl", 0.5, 1.0, None)
    assert float(out["kl_sum"] / out["n_tok"]) == pytest.approx(float(kl.mean()), rel=1e-4)
    ce = linear_cross_entropy(torch.zeros(3, 48), student.get_output_embeddings().weight, torch.tensor([1, 2, 3]),
                              softcap=softcap_of(student))
    assert torch.isfinite(ce)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_kd_loss_softcap_on_the_native_half_gemm_path(impl, monkeypatch):
    """bf16 inputs on the CUDA-style path (fp32-output GEMMs, the logits gradient in a bf16 buffer): the
    soft-cap's chain rule is applied in fp32 and written back into that buffer. Off CUDA the half GEMMs
    are emulated as in tests/test_fused_kl.py."""
    from minitron.losses import fused

    if not torch.cuda.is_available():
        monkeypatch.setattr(fused, "_NATIVE_DEVICE_TYPES", ("cpu",))
        monkeypatch.setattr(fused, "_mm_f32", lambda a, b: a.float() @ b.float())
        monkeypatch.setattr(fused, "_addmm_f32_", lambda c, a, b: c.addmm_(a.float(), b.float()))
        monkeypatch.setattr(fused, "_native_support", lambda device, dt: (True, True))
    hs, ws, ht, wt = (x.bfloat16() for x in _kd_case(3))
    results = {}
    for name in ("naive", impl):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = linear_kd_loss(h, w, ht, wt, impl=name, chunk_size=4, student_softcap=5.0, teacher_softcap=7.0)
        loss.backward()
        results[name] = (loss.float(), h.grad.float(), w.grad.float())
    for got, ref in zip(results[impl], results["naive"]):
        assert float((got - ref).norm() / ref.norm()) < 2e-2
