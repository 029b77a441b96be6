"""Triton importance kernels vs their PyTorch references (minitron_kernels.importance_reference).

Runs on CUDA when available, else on CPU under TRITON_INTERPRET=1 (set by tests/kernels/conftest.py
before triton is first imported). Should triton have been imported without it anyway, the kernel
tests skip in-process and ``test_kernels_in_interpreter_subprocess`` re-runs them in a fresh
pytest process with TRITON_INTERPRET=1 set from the start.

Tolerances: the kernels read the activation in its own dtype and accumulate in fp32, like the
reference (which upcasts first), so all dtypes agree to fp32 summation-order error: rtol 1e-5
(atomic adds make the order nondeterministic across D-blocks / row blocks).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tests.helpers import have_triton, rerun_in_interpreter, triton_runnable

from minitron.importance.aggregate import (
    ImportanceAccumulator,
    accumulate_,
    accumulate_reference,
    block_importance_reference,
    block_importance_update_,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


TRITON_OK = triton_runnable()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton not runnable here (see subprocess test)")
SHAPES = [(3, 7, 37), (1, 1, 5), (2, 130, 300), (5, 65, 129)]  # odd; S > BLOCK_S, D > BLOCK_D


def _act(shape, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2.0 + offset).to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("shape", SHAPES)
def test_accumulate_triton_matches_reference(shape, seq_agg, dtype):
    d = shape[-1]
    ref = [torch.zeros(d, device=DEVICE) for _ in range(2)]
    out = [torch.zeros(d, device=DEVICE) for _ in range(2)]
    for call in range(3):  # several accumulation calls, different batches
        act = _act(shape, dtype, seed=call, offset=3.0 if seq_agg == "var" else 0.0)
        accumulate_reference(*ref, act, seq_agg)
        assert accumulate_(*out, act, seq_agg, impl="triton") == "triton"
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("shape", [(2, 130, 37), (1, 7, 300), (3, 200, 5)])
def test_accumulate_triton_split_sequence_matches_reference(shape, splits, seq_agg, dtype):
    """S cut into pieces (partial sums in a (B, D) scratch): the tail split, a split count above
    the number of S tiles, and var (which never splits) all match the reference."""
    from minitron_kernels.importance import accumulate_triton

    d = shape[-1]
    ref = [torch.zeros(d, device=DEVICE) for _ in range(2)]
    out = [torch.zeros(d, device=DEVICE) for _ in range(2)]
    act = _act(shape, dtype, offset=3.0 if seq_agg == "var" else 0.0)
    strided = act.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous batch stride
    for a in (act, strided):
        accumulate_reference(*ref, a, seq_agg)
        accumulate_triton(*out, a, seq_agg, splits=splits)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_seq_splits_fill_the_gpu():
    pytest.importorskip("triton")
    from minitron_kernels.importance import seq_splits

    sms4 = 4 * 132  # H100
    assert seq_splits(8, 4096, 4096, "mean", sms4) == 3  # 8 x 32 programs -> x3
    assert seq_splits(1, 4096, 4096, "l2", sms4) == 17  # 32 programs -> x17
    assert seq_splits(8, 4096, 14336, "mean", sms4) == 1  # 896 programs already fill it
    assert seq_splits(1, 4096, 4096, "var", sms4) == 1  # var never splits
    assert seq_splits(1, 100, 4096, "mean", sms4) == 2  # at most one split per S tile (64 rows)
    assert seq_splits(1, 4096, 4096, "mean", 1) == 1  # CPU


@needs_triton
def test_accumulate_triton_strided_2d_and_4d():
    act = _act((4, 9, 2, 19), torch.float32)  # (B, S, heads, hd) -> D = 38, like the reference
    strided = act.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous (B, S, ...) view
    ref = [torch.zeros(38, device=DEVICE) for _ in range(2)]
    out = [torch.zeros(38, device=DEVICE) for _ in range(2)]
    accumulate_reference(*ref, strided, "l2")
    accumulate_(*out, strided, "l2", impl="triton")
    two_d = act[0].reshape(9, 38)  # (S, D): one sample
    accumulate_reference(*ref, two_d, "mean")
    accumulate_(*out, two_d, "mean", impl="triton")
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 33, 300)])
def test_block_importance_triton_matches_cosine_similarity(shape, dtype):
    h_in = _act(shape, dtype)
    h_out = (h_in.float() + 0.7 * _act(shape, torch.float32, seed=1)).to(dtype)
    h_out[0, 0] = 0  # a zero row: cosine_similarity's eps clamp gives 0
    want = F.cosine_similarity(h_in.float().reshape(-1, shape[-1]), h_out.float().reshape(-1, shape[-1]), dim=-1)
    acc = torch.zeros(1, device=DEVICE)
    for _ in range(2):
        assert block_importance_update_(acc, h_in, h_out, impl="triton") == "triton"
    torch.testing.assert_close(acc, 2 * want.sum().reshape(1), rtol=1e-5, atol=1e-5)


def test_reference_paths_and_dispatch():
    act = _act((3, 7, 37), torch.float32)
    sx, sx2 = torch.zeros(37, device=DEVICE), torch.zeros(37, device=DEVICE)
    assert accumulate_(sx, sx2, act, "mean", impl="reference") == "reference"
    expected = "triton" if CUDA and have_triton() else "reference"
    assert accumulate_(sx, sx2, act, "mean") == expected
    acc = torch.zeros(1, device=DEVICE)
    assert block_importance_update_(acc, act, act, impl="reference") == "reference"
    torch.testing.assert_close(acc, torch.tensor([21.0], device=DEVICE))  # cos(x, x) = 1 per row
    ref = torch.zeros(1, device=DEVICE)
    block_importance_reference(ref, act, -act)
    torch.testing.assert_close(ref, torch.tensor([-21.0], device=DEVICE))
    with pytest.raises(ValueError):
        accumulate_(sx, sx2, act, "mean", impl="cuda")
    acc_obj = ImportanceAccumulator(37, device=DEVICE)
    acc_obj.update(act, impl="reference")
    assert acc_obj.count == 3


@pytest.mark.skipif(CUDA or TRITON_OK or not have_triton(), reason="kernel tests already ran in-process")
def test_kernels_in_interpreter_subprocess():
    """Run this file's Triton tests in a fresh process with TRITON_INTERPRET=1."""
    rerun_in_interpreter(__file__, "triton")
