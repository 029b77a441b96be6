"""``LinearKDLoss(impl="triton")``: the drop-in loss on the Triton chunk op vs the naive fp32 reference.

On CPU the kernel runs in the Triton interpreter (``tests/kernels/conftest.py``), so shapes are tiny;
tolerances as ``tests/test_linear_kd_loss.py`` (fp32: 2e-5 of the largest entry, loss and gradients).
"""

from __future__ import annotations

import pytest
import torch

from minitron.losses import last_impl
from tests.helpers import have_triton, rerun_in_interpreter, triton_runnable
from tests.test_linear_kd_loss import _grads, _inputs, _labels, _naive, _ours, _rel

TRITON_OK = triton_runnable()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
CASES = {
    "liger_defaults_bias": dict(bias=True),
    "forward_kl_softcap_topk": dict(beta=0.0, student_softcap=3.0, teacher_softcap=2.0, top_k=9, temperature=2.0),
    "reverse_kl_teacher_padding": dict(beta=1.0, vt=80, weight_hard_loss=0.0, weight_soft_loss=1.0),
    "attention_mask_num_items": dict(attention_mask=True, num_items_in_batch=11),
}


@pytest.mark.skipif(not TRITON_OK, reason="triton not runnable here (see the subprocess test)")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_naive(case):
    kw = dict(CASES[case])
    n, vs = 13, 67
    inputs = _inputs(n, 12, 20, vs, kw.pop("vt", vs), bias=kw.pop("bias", False))
    labels = _labels(n, vs)
    if kw.pop("attention_mask", False):
        kw["attention_mask"] = (torch.arange(n) % 4 != 2).long()
    ref, ref_g = _grads(_naive, inputs, labels=labels, **kw)
    out, g = _grads(_ours, inputs, labels=labels, impl="triton", chunk_size=5, **kw)
    assert last_impl() == "triton"
    assert _rel(out, ref) <= 2e-5, (_rel(out, ref), out, ref)
    for k in ref_g:
        assert _rel(g[k], ref_g[k]) <= 2e-5, (k, _rel(g[k], ref_g[k]))


@pytest.mark.skipif(TRITON_OK or not have_triton(), reason="Triton tests already ran in-process")
def test_triton_in_interpreter_subprocess():
    rerun_in_interpreter(__file__, "triton_matches_naive")
