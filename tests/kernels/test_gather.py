"""Tests for minitron.ops.gather.compact_ (in-place structured gather).

Runs against the C++ extension when it is available (prebuilt or JIT-built; the first JIT
build takes ~1 min) and always against the pure-PyTorch fallback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minitron.ops.gather import CompactFallbackWarning, compact_, gather_backend

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HAS_EXT = gather_backend("cpu") == "cpu-ext"
BACKENDS = [pytest.param("auto", marks=pytest.mark.skipif(not HAS_EXT, reason="C++ extension unavailable")), "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _index(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "first":
        return torch.tensor([0])
    if kind == "last":
        return torch.tensor([n - 1])
    if kind == "all":
        return torch.arange(n)
    if kind == "single":
        return torch.randint(0, n, (1,), generator=gen)
    if kind == "prefix_gap":  # identity prefix then a gap: exercises the skip logic
        return torch.cat([torch.arange(n // 3), torch.arange(n // 2, n)]).unique()
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    return torch.randperm(n, generator=gen)[:k].sort().values


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("kind", ["first", "last", "all", "single", "random", "prefix_gap"])
def test_matches_index_select(backend, dtype, dim, kind):
    gen = torch.Generator().manual_seed(hash((str(dtype), dim, kind)) % 2**31)
    for shape in [(37, 53), (1, 19), (64, 7)]:
        # tiny staging budget (16..80 bytes) -> many staged + direct waves
        for stage in (-1, 16 * int(torch.randint(1, 6, (1,), generator=gen))):
            w = _rand(shape, dtype, gen)
            idx = _index(kind, shape[dim], gen)
            ref = w.index_select(dim, idx)
            out = compact_(w, dim, idx, backend=backend, _stage_bytes=stage)
            assert out.shape == ref.shape and out.dtype == dtype
            assert torch.equal(out, ref), (shape, dim, kind, stage)
            assert out.untyped_storage().nbytes() == ref.numel() * ref.element_size()
            assert w.shape == ref.shape and torch.equal(w, ref)  # input re-pointed in place


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_random_and_1d(backend):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(301, 517, generator=gen)
    for dim in (0, 1):
        x = w.clone()
        idx = torch.randperm(x.shape[dim], generator=gen)[: x.shape[dim] // 2].sort().values
        assert torch.equal(compact_(x, dim, idx, backend=backend), w.index_select(dim, idx))
    v = torch.randn(1001, generator=gen).to(torch.bfloat16)
    idx = torch.randperm(1001, generator=gen)[:400].sort().values
    ref = v[idx]
    out = compact_(v, 0, idx, backend=backend)
    assert out.shape == (400,) and torch.equal(out, ref)
    assert out.untyped_storage().nbytes() == 800


def test_empty_index():
    w = torch.randn(5, 6)
    out = compact_(w, 1, torch.empty(0, dtype=torch.long))
    assert out.shape == (5, 0) and out.untyped_storage().nbytes() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_really_shrinks_and_parameter_updated(backend):
    lin = torch.nn.Linear(300, 200)
    w_ref = lin.weight.detach().clone()
    idx = torch.arange(0, 200, 2)
    out = compact_(lin.weight, 0, idx, backend=backend)
    assert isinstance(lin.weight, torch.nn.Parameter) and lin.weight.requires_grad
    assert lin.weight.shape == (100, 300)
    assert lin.weight.untyped_storage().nbytes() == 100 * 300 * 4
    assert torch.equal(lin.weight, w_ref[idx]) and torch.equal(out, w_ref[idx])
    assert lin.weight.data_ptr() == out.data_ptr()  # same (shrunk) storage
    # columns of a big tensor: on the C++ path the shrink is an in-place realloc
    big = torch.randn(1024, 1024)
    p0 = big.data_ptr()
    out = compact_(big, 1, torch.arange(0, 1024, 4), backend=backend)
    assert out.untyped_storage().nbytes() == 1024 * 256 * 4
    if backend == "auto":
        assert out.data_ptr() == p0  # glibc realloc shrinks in place: no second copy


BAD_CASES = {
    "unsorted": (0, lambda: torch.tensor([3, 1])),
    "duplicate": (0, lambda: torch.tensor([1, 1, 2])),
    "out_of_range_hi": (1, lambda: torch.tensor([0, 9])),
    "negative": (0, lambda: torch.tensor([-1, 2])),
    "wrong_dim": (2, lambda: torch.tensor([0])),
    "float_index": (0, lambda: torch.tensor([0.0, 1.0])),
    "2d_index": (0, lambda: torch.tensor([[0, 1]])),
    "index_on_meta": (0, lambda: torch.tensor([0, 1], device="meta")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_and_leaves_tensor_untouched(backend, case):
    dim, make_idx = BAD_CASES[case]
    w = torch.randn(5, 9)
    before, ptr, nbytes = w.clone(), w.data_ptr(), w.untyped_storage().nbytes()
    with pytest.raises(ValueError) as ei:
        compact_(w, dim, make_idx(), backend=backend)
    assert "compact_" in str(ei.value)
    assert torch.equal(w, before) and w.data_ptr() == ptr and w.untyped_storage().nbytes() == nbytes


def test_bad_dtype_and_rank():
    for bad in (torch.zeros(4, 4, dtype=torch.complex64), torch.zeros(4, 4, dtype=torch.bool)):
        before = bad.clone()
        with pytest.raises(ValueError, match="unsupported dtype"):
            compact_(bad, 0, torch.tensor([0]))
        assert torch.equal(bad, before)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        compact_(torch.zeros(2, 3, 4), 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range for a 1-D"):
        compact_(torch.zeros(4), 1, torch.tensor([0]))


def test_copy_path_for_noncontiguous_and_shared_views():
    w = torch.randn(8, 6)
    before = w.clone()
    t = w.t()  # non-contiguous
    idx = torch.tensor([1, 4])
    with pytest.warns(CompactFallbackWarning, match="not contiguous"):
        out = compact_(t, 0, idx)
    assert torch.equal(out, before.t()[idx]) and torch.equal(w, before)
    with pytest.warns(CompactFallbackWarning, match="view"):
        out = compact_(w[2:6], 1, idx)
    assert torch.equal(out, before[2:6][:, idx]) and torch.equal(w, before)


def test_forced_fallback_env(monkeypatch):
    monkeypatch.setenv("MINITRON_GATHER_BACKEND", "torch")
    assert gather_backend("cpu") == "torch-fallback"
    w = torch.randn(33, 17, dtype=torch.float16)
    idx = torch.tensor([0, 5, 16])
    ref = w.index_select(1, idx)
    assert torch.equal(compact_(w, 1, idx), ref)


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension unavailable")
def test_opcheck_and_compile():
    op = torch.ops.minitron.compact_.default
    samples = [
        (torch.randn(7, 5), 0, torch.tensor([1, 3, 6])),
        (torch.randn(7, 5, dtype=torch.bfloat16), 1, torch.tensor([0, 4])),
        (torch.randn(4, 9, dtype=torch.float16), 1, torch.tensor([2, 3, 8])),
    ]
    for args in samples:
        torch.library.opcheck(op, args)

    def f(w, idx):
        torch.ops.minitron.compact_(w, 0, idx)
        return w[: idx.numel()] * 2

    w = torch.randn(9, 4)
    idx = torch.tensor([2, 5, 8])
    ref = w[idx] * 2
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(w.clone(), idx)
    assert torch.equal(got, ref)
    # the Python wrapper runs eagerly inside compiled code (graph break)
    g = torch.compile(lambda x, i: compact_(x, 1, i).sum(), backend="eager")
    x, i2 = torch.randn(5, 8), torch.tensor([1, 3, 7])
    assert torch.allclose(g(x.clone(), i2), x[:, i2].sum())


def test_op_is_defined_without_the_extension():
    """Schema, fake kernel and pure-PyTorch kernel of minitron::compact_ exist before (and without) minitron._C."""
    import os
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        import minitron.ops
        from minitron.ops import gather_backend
        assert gather_backend("cpu") == "torch-fallback"
        assert "minitron._C" not in sys.modules and "minitron_C_jit" not in sys.modules
        w = torch.randn(7, 5)
        idx = torch.tensor([1, 3, 6])
        ref = w.index_select(0, idx)
        torch.ops.minitron.compact_(w, 0, idx)
        assert torch.equal(w.reshape(-1)[: ref.numel()].view(3, 5), ref)
        torch.library.opcheck(torch.ops.minitron.compact_.default, (torch.randn(4, 9), 1, torch.tensor([2, 3, 8])))
        print("OK")
    """)
    env = {**os.environ, "MINITRON_GATHER_BACKEND": "torch", "PYTHONPATH": str(CSRC.parent)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def test_binary_from_other_sources_is_recognised_before_loading(tmp_path):
    """A prebuilt minitron._C without this tree's ABI tag (e.g. one that still defines the op schema, which
    would abort the process on load) is told apart by reading the file; the loaded extension carries the tag."""
    from minitron.ops import _loader, build_spec

    old = tmp_path / "old.so"
    old.write_bytes(b"\x7fELF ... TORCH_LIBRARY(minitron, m) ... minitron-ext-abi=1;")
    new = tmp_path / "new.so"
    new.write_bytes(b"\x7fELF ... " + build_spec.EXT_ABI_TAG.encode() + b" ...")
    assert not build_spec.abi_matches(old) and build_spec.abi_matches(new)
    assert not build_spec.abi_matches(tmp_path / "missing.so")
    if HAS_EXT:
        assert _loader.load_extension().EXT_ABI == build_spec.EXT_ABI


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension unavailable")
def test_wave_count_is_small():
    from minitron.ops import _loader

    mod = _loader.load_extension()
    idx = torch.arange(0, 4096, 2)
    # 4096x4096, keep 50% rows, 1 MiB staging (fp32): O(log) waves, not O(rows)
    assert mod.plan_waves(4096, 4096, 0, idx, 1 << 18) < 20
    assert mod.plan_waves(4096, 4096, 1, idx, 1 << 18) < 30


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    res = subprocess.run(
        ["nvcc", "-std=c++17", "-O2", "-c", str(CSRC / "gather_cuda_kernel.cu"), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_glue_and_kernel_compile_check():
    """nvcc-compiles the kernel and syntax-checks the torch CUDA glue (works with CPU torch)."""
    import sys

    res = subprocess.run(["bash", str(CSRC / "check_cuda_compile.sh"), sys.executable],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK: g++ -fsyntax-only" in res.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or gather_backend("cuda") != "cuda-ext", reason="needs CUDA ext")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches(dtype):
    gen = torch.Generator().manual_seed(1)
    for shape, dim in [((257, 1031), 0), ((257, 1031), 1), ((3, 5), 1)]:
        w = torch.randn(shape, generator=gen).to(dtype).cuda()
        idx = torch.randperm(shape[dim], generator=gen)[: shape[dim] // 2 + 1].sort().values.cuda()
        ref = w.index_select(dim, idx)
        for stage in (-1, 64):
            x = w.clone()
            assert torch.equal(compact_(x, dim, idx, _stage_bytes=stage), ref)
