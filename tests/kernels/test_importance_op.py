"""The importance reductions as registered torch.library ops (``minitron_kernels.importance_op``).

``torch.ops.minitron.importance_accumulate_`` / ``block_cos_sum_``: registered, matching an independent fp64
formula on CPU (the reference kernel), passing ``torch.library.opcheck``, compiled with
``torch.compile(fullgraph=True)`` (a graph break fails it) and decomposed by AOTAutograd into the body's
ops (what lets inductor see into them), and, under ``TRITON_INTERPRET=1``, running the Triton kernels'
``wrap_triton`` launches on CPU tensors through the op.

Tolerances (vs fp64 of the same, already-rounded inputs): every dtype is read exactly and summed in fp32,
so only fp32 summation order differs: fp32 / bf16 / fp16 rtol 1e-5, atol 1e-5 (sums of squares of
O(10) values); the Triton launches vs the reference: rtol 1e-5 (atomic-add order), as in
test_importance_kernels.py; torch.compile vs eager: rtol 1e-5 (inductor may reorder the fp32 sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minitron_kernels import importance_op  # noqa: F401 - registers the ops
from minitron_kernels.importance_reference import accumulate_reference, block_importance_reference
from tests.helpers import have_triton, python_subprocess, rerun_in_interpreter, triton_runnable

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=1e-5, atol=1e-5)}
DTYPES = list(TOL)
SHAPES = [(3, 7, 37), (1, 1, 5), (2, 9, 129), (4, 1, 3)]  # non-power-of-two D, S = 1, B = 1
TRITON_OK = triton_runnable() and not torch.cuda.is_available()  # the interpreter on CPU tensors
needs_interpreter = pytest.mark.skipif(not TRITON_OK, reason="the Triton interpreter is not active in this process")


def _act(shape, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2.0 + offset).to(dtype)


def _fp64_sums(act: torch.Tensor, seq_agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent formula: x_b per sample in fp64, then sum_b x_b and sum_b x_b^2."""
    a = act.double()
    x = {"mean": a.abs().mean(1), "l2": a.square().sum(1).sqrt(), "var": a.var(1, unbiased=False)}[seq_agg]
    return x.sum(0).float(), x.square().sum(0).float()


def test_the_ops_are_registered_in_place_on_their_accumulators():
    acc = torch.ops.minitron.importance_accumulate_.default
    cos = torch.ops.minitron.block_cos_sum_.default
    assert "Tensor(a0!) sum_x, Tensor(a1!) sum_x2, Tensor act, str seq_agg, bool use_triton" in str(acc._schema)
    assert "Tensor(a0!) sum_cos, Tensor h_in, Tensor h_out, bool use_triton" in str(cos._schema)
    assert acc.has_kernel_for_dispatch_key("CPU") and cos.has_kernel_for_dispatch_key("CPU")
    assert importance_op.HAVE_TRITON == have_triton()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("shape", SHAPES)
def test_accumulate_op_on_cpu_matches_fp64(shape, seq_agg, dtype):
    d = shape[-1]
    sx, sx2 = torch.zeros(d), torch.zeros(d)
    want = [torch.zeros(d, dtype=torch.float32), torch.zeros(d, dtype=torch.float32)]
    for call in range(2):  # accumulates across calls
        act = _act(shape, dtype, seed=call, offset=3.0 if seq_agg == "var" else 0.0)
        torch.ops.minitron.importance_accumulate_(sx, sx2, act, seq_agg, False)
        for w, part in zip(want, _fp64_sums(act, seq_agg)):
            w += part
    torch.testing.assert_close(sx, want[0], **TOL[dtype])
    torch.testing.assert_close(sx2, want[1], **TOL[dtype])
    ref = [torch.zeros(d), torch.zeros(d)]
    for call in range(2):
        accumulate_reference(*ref, _act(shape, dtype, seed=call, offset=3.0 if seq_agg == "var" else 0.0), seq_agg)
    assert torch.equal(sx, ref[0]) and torch.equal(sx2, ref[1])  # the CPU kernel is the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_cos_op_on_cpu_matches_cosine_similarity(shape, dtype):
    h_in = _act(shape, dtype)
    h_out = (h_in.float() + 0.7 * _act(shape, torch.float32, seed=1)).to(dtype)
    h_out[0, 0] = 0  # a zero row: the eps clamp gives cos 0
    d = shape[-1]
    want = F.cosine_similarity(h_in.double().reshape(-1, d), h_out.double().reshape(-1, d), dim=-1, eps=1e-8)
    acc = torch.zeros(1)
    torch.ops.minitron.block_cos_sum_(acc, h_in, h_out, False)
    torch.testing.assert_close(acc, want.sum().float().reshape(1), **TOL[dtype])


def test_bad_seq_agg_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown seq_agg='max'; allowed values: mean, l2, var"):
        torch.ops.minitron.importance_accumulate_(torch.zeros(5), torch.zeros(5), torch.ones(1, 2, 5), "max", False)


@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
def test_opcheck_accumulate(seq_agg):
    args = (torch.zeros(37), torch.zeros(37), _act((3, 7, 37), torch.bfloat16), seq_agg, False)
    torch.library.opcheck(torch.ops.minitron.importance_accumulate_.default, args)


def test_opcheck_block_cos():
    args = (torch.zeros(1), _act((2, 5, 37), torch.float32), _act((2, 5, 37), torch.float32, seed=1), False)
    torch.library.opcheck(torch.ops.minitron.block_cos_sum_.default, args)


def _both(sx, sx2, act, cos, h_out, seq_agg):
    torch.ops.minitron.importance_accumulate_(sx, sx2, act, seq_agg, False)
    torch.ops.minitron.block_cos_sum_(cos, act, h_out, False)
    return sx2.sqrt() + cos  # something computed after the in-place updates


@pytest.mark.parametrize("seq_agg", ["mean", "var"])
def test_torch_compile_fullgraph_matches_eager_and_sees_into_the_ops(seq_agg):
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    act, h_out = _act((3, 7, 37), torch.bfloat16), _act((3, 7, 37), torch.bfloat16, seed=1)
    eager = [torch.zeros(37), torch.zeros(37), torch.zeros(1)]
    compiled = [t.clone() for t in eager]
    want = _both(eager[0], eager[1], act, eager[2], h_out, seq_agg)
    got = torch.compile(_both, fullgraph=True)(compiled[0], compiled[1], act, compiled[2], h_out, seq_agg)
    for g, w in zip([got, *compiled], [want, *eager]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_both, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(
        torch.zeros(37), torch.zeros(37), act, torch.zeros(1), h_out, seq_agg)
    assert len(graphs) == 1
    if have_triton():  # triton_op: AOTAutograd traced the op's body (the reference's aten ops here)
        assert "minitron.importance_accumulate_" not in graphs[0] and "minitron.block_cos_sum_" not in graphs[0]
        assert "aten.sum" in graphs[0]
    else:  # custom_op: one opaque node each, still no graph break
        assert "minitron.importance_accumulate_" in graphs[0]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 1, 5), (2, 70, 129)])  # S > BLOCK_S, D > BLOCK_D
def test_triton_op_interpreter_launch_matches_reference(shape, seq_agg, dtype, monkeypatch):
    launched = []  # the op's body really takes the Triton launchers (wrap_triton launches), not the reference
    for name in ("accumulate_triton", "block_cos_sum_triton"):
        fn = getattr(importance_op, name)
        monkeypatch.setattr(importance_op, name, lambda *a, _fn=fn, _n=name: (launched.append(_n), _fn(*a))[1])
    d = shape[-1]
    ref, out = [torch.zeros(d), torch.zeros(d)], [torch.zeros(d), torch.zeros(d)]
    act = _act(shape, dtype, offset=3.0 if seq_agg == "var" else 0.0)
    accumulate_reference(*ref, act, seq_agg)
    torch.ops.minitron.importance_accumulate_(*out, act, seq_agg, True)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    h_out = _act(shape, dtype, seed=1)
    want, got = torch.zeros(1), torch.zeros(1)
    block_importance_reference(want, act, h_out)
    torch.ops.minitron.block_cos_sum_(got, act, h_out, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert launched == ["accumulate_triton", "block_cos_sum_triton"]


@pytest.mark.skipif(TRITON_OK or torch.cuda.is_available() or not have_triton(),
                    reason="the interpreter tests ran in-process (or triton is absent)")
def test_triton_op_interpreter_in_subprocess():
    """triton was imported before TRITON_INTERPRET=1 was set: re-run the interpreter tests in a fresh process."""
    rerun_in_interpreter(__file__, "interpreter_launch")


def test_without_triton_minitron_imports_and_the_ops_are_custom_ops():
    """A CPU-only install without triton: the same ops, registered as custom ops, quietly; the reference runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` raises ImportError
        "import torch, minitron\n"
        "from minitron.importance.aggregate import accumulate_, block_importance_update_\n"
        "from minitron_kernels import importance_op\n"
        "assert not importance_op.HAVE_TRITON\n"
        "sx, sx2, c = torch.zeros(5), torch.zeros(5), torch.zeros(1)\n"
        "a = torch.ones(2, 3, 5)\n"
        "assert accumulate_(sx, sx2, a) == 'reference' and sx.tolist() == [2.0] * 5\n"
        "assert block_importance_update_(c, a, a) == 'reference' and c.item() == 6.0\n"
        "try:\n"
        "    accumulate_(sx, sx2, a, impl='triton')\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('impl=triton ran without triton')\n"
        "f = torch.compile(lambda x, y, a: torch.ops.minitron.importance_accumulate_(x, y, a, 'l2', False),\n"
        "                  fullgraph=True, backend='aot_eager')\n"
        "f(sx, sx2, a)\n"
        "print('OK')\n"
    )
    out, err = python_subprocess(code)
    assert out.strip().splitlines()[-1] == "OK"
    assert "triton" not in err.lower(), err[-2000:]  # quiet: no "Triton not available" log from torch
