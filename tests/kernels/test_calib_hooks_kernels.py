"""The calibration hooks' Triton route (one kernel per site) equals their batched PyTorch route."""

from __future__ import annotations

import pytest
import torch

from minitron.adapters import get_adapter
from minitron.importance.hooks import CalibrationHooks
from tests.helpers import have_triton, make_model, rerun_in_interpreter, triton_runnable


@pytest.mark.skipif(not triton_runnable(), reason="triton not runnable here (see the subprocess test)")
@pytest.mark.parametrize("seq_agg", ["mean", "l2"])
def test_kernel_route_matches_batched_route(calib_ids, seq_agg):
    """With the Triton kernels (CUDA, or CPU under TRITON_INTERPRET) each site updates its slice of the
    fused sums directly; the statistics equal the batched PyTorch route."""
    model = make_model("qwen2")
    ids = calib_ids[:3, :9]
    hooks = {}
    for impl in ("reference", "triton"):
        with torch.no_grad(), CalibrationHooks(model, get_adapter(model), seq_agg, impl=impl) as h:
            for part in (ids[:2], ids[2:]):
                h.begin_batch(*part.shape)
                model.model(input_ids=part, use_cache=False)
                h.end_batch()
        hooks[impl] = h
    ref, tri = hooks["reference"], hooks["triton"]
    torch.testing.assert_close(tri.sum_x, ref.sum_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri.sum_x2, ref.sum_x2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri.bi_cos_sum, ref.bi_cos_sum, rtol=1e-5, atol=1e-5)
    assert tri.counts == ref.counts and tri.bi_count == ref.bi_count == ids.numel()


def test_kernel_route_in_interpreter_subprocess():
    if triton_runnable() or not have_triton():
        pytest.skip("ran in-process" if triton_runnable() else "triton not installed")
    rerun_in_interpreter(__file__, "kernel_route_matches")
