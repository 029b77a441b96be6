"""Compile every Triton kernel for NVIDIA GPUs ahead of time, on a machine without one.

Triton lowers a kernel source -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin on the host (ptxas
ships with triton); only loading the cubin needs a driver. The CPU interpreter that runs the
kernel tests executes the Python semantics with numpy, so it cannot see what breaks or slows
the real backend: lowering/layout errors, register spills to local memory, shared memory use.
This module compiles each kernel at the launch configurations its dispatch picks
(:func:`minitron_kernels.fused_kl.launch_config`, :func:`minitron_kernels.importance.seq_agg_launch_config`,
:func:`minitron_kernels.importance.block_cos_launch_config`) for representative shapes and
reads the resource usage of the cubin with ``cuobjdump``.

It must run in a process where triton is NOT in interpreter mode (``TRITON_INTERPRET`` unset),
since interpreted kernels cannot be lowered; the CLI refuses otherwise.

Usage:
    python -m minitron_kernels.aot_compile --arch 80 90          # markdown table
    python -m minitron_kernels.aot_compile --arch 90 --json      # one JSON list on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# representative shapes of the dispatch: odd/small and production sizes
KD_VOCABS = (1003, 32000, 128256, 256000)  # padded vocab of a chunk -> fused_kl.launch_config
SEQ_AGG_SHAPES = ((37, 24), (4096, 4096), (2048, 14336))  # (S, D) -> importance.seq_agg_launch_config
BLOCK_COS_WIDTHS = (24, 4096)  # D -> importance.block_cos_launch_config
ACT_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class KernelBuild:
    """Result of compiling one kernel configuration for one GPU architecture."""

    kernel: str
    arch: int
    config: str  # constexprs, pointer dtypes and warps, e.g. "KIND=0 HAS_GRAD=1 BLOCK_V=4096 G=*bf16 warps=8"
    ok: bool
    regs: int = -1  # registers per thread
    local_bytes: int = -1  # spill / stack memory per thread (0 = no spills)
    shared_bytes: int = -1  # static shared memory per program
    seconds: float = 0.0
    error: str = ""


def _kd_specs() -> list[tuple]:
    from minitron_kernels.fused_kl import _kd_chunk_kernel, launch_config

    base = {"S": "*fp32", "T": "*fp32", "LOSS": "*fp32", "SCALE": "*fp32", "stride_s": "i32", "stride_t": "i32",
            "stride_g": "i32", "Vs": "i32", "Vt": "i32", "V": "i32", "inv_tau": "fp32", "tau": "fp32", "beta": "fp32"}
    specs = []
    for v in KD_VOCABS:
        cfg = launch_config(v)
        warps = cfg.pop("num_warps")
        for kind in (0, 1, 2):
            # loss only; grads in place (fp32, the CPU/fp32 path); grads into a bf16/fp16 buffer (CUDA half path)
            for has_grad, g in ((False, "*fp32"), (True, "*fp32"), (True, "*bf16"), (True, "*fp16")):
                sig = {**base, "G": g}
                const = {"KIND": kind, "HAS_GRAD": has_grad, **cfg}
                label = f"KIND={kind} HAS_GRAD={int(has_grad)} BLOCK_V={cfg['BLOCK_V']} G={g} warps={warps}"
                specs.append(("fused_kl._kd_chunk_kernel", _kd_chunk_kernel, sig, const, warps, label))
    return specs


def _importance_specs() -> list[tuple]:
    from minitron_kernels.importance import (
        SEQ_AGG_CODES,
        _block_cos_kernel,
        _seq_agg_kernel,
        _seq_sum_split_kernel,
        block_cos_launch_config,
        seq_agg_launch_config,
    )

    specs = []
    for s, d in SEQ_AGG_SHAPES:
        cfg = seq_agg_launch_config(s, d)
        warps = cfg.pop("num_warps")
        for dt in ACT_DTYPES:
            for agg, code in SEQ_AGG_CODES.items():
                # contiguous activations: the channel stride is 1 and Triton specializes it
                sig = {"A": f"*{dt}", "SUM_X": "*fp32", "SUM_X2": "*fp32", "S": "i32", "D": "i32",
                       "stride_b": "i32", "stride_s": "i32", "stride_d": "constexpr"}
                const = {"stride_d": 1, "AGG": code, **cfg}
                label = f"{agg} A=*{dt} BLOCK_S={cfg['BLOCK_S']} BLOCK_D={cfg['BLOCK_D']} warps={warps}"
                specs.append(("importance._seq_agg_kernel", _seq_agg_kernel, sig, const, warps, label))
                if agg != "var":  # the split-sequence variant (small batches)
                    sig = {"A": f"*{dt}", "PARTIAL": "*fp32", "S": "i32", "D": "i32", "rows_per_split": "i32",
                           "stride_b": "i32", "stride_s": "i32", "stride_d": "constexpr"}
                    specs.append(("importance._seq_sum_split_kernel", _seq_sum_split_kernel, sig, const, warps, label))
    for d in BLOCK_COS_WIDTHS:
        cfg = block_cos_launch_config(d)
        warps = cfg.pop("num_warps")
        for dt in ACT_DTYPES:
            sig = {"X": f"*{dt}", "Y": f"*{dt}", "SUM_COS": "*fp32", "N": "i32", "D": "i32", "stride_x": "i32",
                   "stride_y": "i32", "eps": "fp32"}
            label = f"X,Y=*{dt} BLOCK_R={cfg['BLOCK_R']} BLOCK_D={cfg['BLOCK_D']} warps={warps}"
            specs.append(("importance._block_cos_kernel", _block_cos_kernel, sig, dict(cfg), warps, label))
    return specs


def kernel_specs() -> list[tuple]:
    """(kernel name, jit function, signature, constexprs, num_warps, label) per distinct build."""
    seen, out = set(), []
    for spec in _kd_specs() + _importance_specs():
        if (spec[0], spec[5]) not in seen:  # different shapes often map to the same configuration
            seen.add((spec[0], spec[5]))
            out.append(spec)
    return out


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nv

    bundled = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes, shared bytes) of the single function in a cubin."""
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither bundled with triton nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"]), int(fields["SHARED"])


def compile_one(name: str, fn, signature: dict, constexprs: dict, num_warps: int, label: str, arch: int) -> KernelBuild:
    """Compile one configuration to a cubin for ``sm_<arch>``; errors are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        regs, local, shared = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - report every failure with the configuration that caused it
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        return KernelBuild(name, arch, label, False, seconds=time.perf_counter() - t0, error=msg)
    return KernelBuild(name, arch, label, True, regs, local, shared, time.perf_counter() - t0)


def compile_all(archs: tuple[int, ...] = (90,)) -> list[KernelBuild]:
    """Compile every kernel configuration of :func:`kernel_specs` for each architecture.

    Args:
        archs: CUDA compute capabilities as integers (80 = A100, 90 = H100/H200).
    Returns:
        One :class:`KernelBuild` per (configuration, arch).
    Example:
        >>> builds = compile_all((90,))
        >>> assert all(b.ok and b.local_bytes == 0 for b in builds)
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default
    return [compile_one(*spec, arch=arch) for arch in archs for spec in kernel_specs()]


def markdown(builds: list[KernelBuild]) -> str:
    rows = ["| kernel | sm | configuration | ok | regs/thread | spill bytes | shared bytes | compile s |",
            "|---|---|---|---|---|---|---|---|"]
    for b in builds:
        rows.append(f"| {b.kernel} | {b.arch} | {b.config} | {'yes' if b.ok else 'NO: ' + b.error} | {b.regs} | "
                    f"{b.local_bytes} | {b.shared_bytes} | {b.seconds:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    ap.add_argument("--out", default=None, help="also write the markdown table (with versions) to this file")
    args = ap.parse_args(argv)
    builds = compile_all(tuple(args.arch))
    print(json.dumps([asdict(b) for b in builds]) if args.json else markdown(builds))
    if args.out:
        import triton

        head = (f"# Triton kernels compiled for NVIDIA GPUs (no GPU used)\n\n"
                f"Command: `python -m minitron_kernels.aot_compile {' '.join(argv or sys.argv[1:])}`; "
                f"triton {triton.__version__}, ptxas bundled with triton. One row per launch configuration "
                "the dispatch picks for the representative shapes in `kernels/minitron_kernels/aot_compile.py`. "
                "regs/thread and spill bytes (STACK + LOCAL) from `cuobjdump -res-usage`; spill 0 = no "
                "register spills. Compile seconds are on the 2-core CPU (cache cold or warm).\n\n")
        with open(args.out, "w") as f:
            f.write(head + markdown(builds) + "\n")
    return 0 if all(b.ok for b in builds) else 1


if __name__ == "__main__":
    sys.exit(main())
