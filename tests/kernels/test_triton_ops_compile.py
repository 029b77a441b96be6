"""How torch.compile sees the Triton ops (``minitron::importance_accumulate_``, ``block_cos_sum_``, ``kd_chunk``).

* ``use_triton=True``: the ops are ``torch.library.triton_op``s, so AOTAutograd decomposes each call into its
  body and the graph holds the kernels themselves (``triton_kernel_wrapper_functional`` nodes, which
  inductor inlines as user-defined Triton kernels). Checked on CPU without running anything: the forward
  graph is captured and the compile stopped before a kernel would launch (no GPU here; the kernels are
  compiled Triton, ``TRITON_INTERPRET=0``, in a fresh process).
* ``use_triton=False`` (the CPU path): ``kd_chunk`` stays one opaque node, so a compiled CPU run calls the
  same CPU kernel (fused C++ or reference) as eager: bit-exact (tolerance 0).
"""

from __future__ import annotations

import pytest
import torch

from minitron.losses.kd import op  # noqa: F401 - registers torch.ops.minitron.kd_chunk
from minitron.losses.kd.reference import FORWARD_KL, JSD
from tests.helpers import have_triton, python_subprocess

needs_triton = pytest.mark.skipif(not have_triton(), reason="triton is not installed: the ops are custom ops")

_CAPTURE = """
import torch
from torch._dynamo.backends.common import aot_autograd
import minitron.losses.kd.op  # noqa: F401
from minitron_kernels import importance_op  # noqa: F401
from torch._library.triton import get_triton_kernels_for_op as kernels

for name in ("minitron::importance_accumulate_", "minitron::block_cos_sum_", "minitron::kd_chunk"):
    print(name, sorted(k.fn.__name__ for k in kernels(name)))
graphs = []

class Captured(Exception):
    pass

def capture(gm, example_inputs):
    graphs.append(gm.code)
    raise Captured  # stop before anything launches: there is no GPU to run the kernels on

def f(s, t, scale, sx, sx2, a, c):
    loss = torch.ops.minitron.kd_chunk(s, t, scale, None, 0, 0.5, 1.0, True)
    torch.ops.minitron.importance_accumulate_(sx, sx2, a, "mean", True)
    torch.ops.minitron.block_cos_sum_(c, a, a, True)
    return loss

args = (torch.randn(3, 11), torch.randn(3, 11), torch.full((3,), 1 / 3), torch.zeros(5), torch.zeros(5),
        torch.randn(2, 3, 5), torch.zeros(1))
try:
    torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(*args)
except Exception as e:
    assert "Captured" in repr(e), repr(e)[:2000]
for line in graphs[0].splitlines():
    if "torch.ops.higher_order.triton_kernel_wrapper" in line or "minitron." in line:
        print("GRAPH", line.strip()[:300])
try:  # eager, CPU tensors, no interpreter: the CPU kernel refuses the Triton path with the fix
    torch.ops.minitron.block_cos_sum_(torch.zeros(1), torch.ones(1, 2, 5), torch.ones(1, 2, 5), True)
except ValueError as e:
    print("ERROR", e)
"""


@needs_triton
def test_use_triton_true_compiles_to_the_kernels_themselves():
    out, _ = python_subprocess(_CAPTURE, TRITON_INTERPRET="0")
    lines = out.splitlines()
    assert "minitron::importance_accumulate_ ['_seq_agg_kernel', '_seq_sum_split_kernel']" in lines
    assert "minitron::block_cos_sum_ ['_block_cos_kernel']" in lines
    assert "minitron::kd_chunk ['_kd_chunk_kernel']" in lines
    graph = [line for line in lines if line.startswith("GRAPH")]
    assert not any("minitron." in line for line in graph), graph  # no opaque op left: all decomposed
    assert len(graph) == 3 and all("triton_kernel_wrapper_functional" in line for line in graph), graph
    for arg in ("'S': arg0_1, 'T': arg1_1", "'SUM_X': arg3_1, 'SUM_X2': arg4_1", "'SUM_COS': arg6_1"):
        assert any(arg in line for line in graph), (arg, graph)  # the kernels launched on the op's inputs
    assert "needs TRITON_INTERPRET=1" in lines[-1] and "use use_triton=False" in lines[-1], lines[-1]


@pytest.mark.parametrize("kind,vs,vt", [(FORWARD_KL, 67, 67), (JSD, 61, 67)])
def test_kd_chunk_on_cpu_stays_one_node_and_compiles_bit_exact(kind, vs, vt):
    from torch._dynamo.backends.common import aot_autograd

    def step(s, t, scale):
        loss = torch.ops.minitron.kd_chunk(s, t, scale, None, kind, 0.3, 1.5, False)
        return loss.sum(), s  # s: the gradient, written in place

    g = torch.Generator().manual_seed(0)
    s, t, scale = torch.randn(9, vs, generator=g) * 3, torch.randn(9, vt, generator=g) * 3, torch.full((9,), 1 / 9)
    want = step(s.clone(), t.clone(), scale)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(s.clone(), t.clone(), scale)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(s.clone(), t.clone(), scale)
    assert "minitron.kd_chunk" in graphs[0]  # opaque: the CPU kernel runs, as in eager
