"""The four GEMMs of the KD loss (two logits, two gradient) and the reusable chunk workspace.

Precision per path (logits and every accumulator are fp32 on all of them):

=============  ====================================  ======================================
path           logits GEMMs (student, teacher)       gradient GEMMs (d hidden, d weight)
=============  ====================================  ======================================
``native``     bf16/fp16 in, fp32 out (CUDA          same, the logits gradient rounded once
               ``torch.mm(..., out_dtype=fp32)``)     into a bf16/fp16 buffer
``cpu_bf16``   fp32 (weights upcast once per call    bf16 in, bf16 out (oneDNN, AVX512-BF16 /
               into the workspace)                   AMX), upcast and summed into fp32
``fp32``       fp32                                  fp32
=============  ====================================  ======================================

``cpu_bf16`` (bf16 inputs, e.g. under CPU autocast, on a CPU with native bf16 dot products) keeps
the logits GEMMs in fp32 because CPU torch has no bf16 GEMM with an fp32 output (``aten::mm.dtype``
is CUDA-only) and rounding logits to bf16 is the wrong trade: measured at V=49152, H=432 with a
student close to its teacher (logit std 4), bf16 logits give a 57% relative error in dW and dH
(1.6-2.1% for unrelated models), the two bf16 gradient GEMMs 0.23%. The gradient GEMMs are half of
the loss's FLOPs and run ~2.5x faster in bf16 than in fp32 here.

The chunk's (c, V) buffers and the fp32 weight copies come from :mod:`minitron.losses.kd.workspace`.
"""

from __future__ import annotations

import functools

import torch

from minitron.losses.kd.workspace import Workspace

_HALF = (torch.float16, torch.bfloat16)
# device types whose half-precision GEMMs with fp32 output are fast (CPU lacks mm.dtype kernels;
# tests add "cpu" with emulated GEMMs to exercise this path)
_NATIVE_DEVICE_TYPES = ("cuda",)


@functools.lru_cache(maxsize=None)
def cpu_fast_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo.

    Returns:
        True on e.g. Zen 4 / Sapphire Rapids; False elsewhere (or when the flags cannot be read).
    Example:
        >>> isinstance(cpu_fast_bf16(), bool)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) half-precision inputs, fp32 output straight from the GEMM accumulator."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_f32_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``c += a @ b`` for fp32 ``c`` and half-precision ``a``, ``b``, accumulated in fp32."""
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)


@functools.lru_cache(maxsize=None)
def _native_support(device: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """(fp32-output mm works, fp32 in-place addmm works) for half inputs on ``device``, probed once."""
    a = torch.ones(16, 16, device=device, dtype=dtype)
    try:
        ok_mm = bool(_mm_f32(a, a)[0, 0] == 16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False, False
    c = torch.zeros(16, 16, device=device, dtype=torch.float32)
    try:
        _addmm_f32_(c, a, a)
        ok_addmm = bool(c[0, 0] == 16)
    except (RuntimeError, NotImplementedError, TypeError):
        ok_addmm = False
    return ok_mm, ok_addmm


class Gemm:
    """The GEMMs against one (V, H) lm_head weight, on the path of the module docstring.

    Args:
        weight: (V, H) lm_head weight.
        act_dtype: dtype of the hidden states.
        ws: workspace for the fp32 weight copy and the bf16 d-weight product.
        name: prefix of this side's workspace buffers (``s`` / ``t``).
        grads: whether the gradient GEMMs will run (the student side).
    """

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype, ws: Workspace, name: str,
                 grads: bool = False) -> None:
        self.ws, self.name = ws, name
        self.native = self.acc_in_place = self.cpu_bf16 = False
        half = weight.dtype in _HALF and act_dtype == weight.dtype
        if half and weight.device.type in _NATIVE_DEVICE_TYPES:
            self.native, self.acc_in_place = _native_support(str(weight.device), weight.dtype)
        elif half and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and cpu_fast_bf16():
            self.cpu_bf16 = True
        self.w16 = weight if (self.native or self.cpu_bf16) else None  # (V, H) half, for the gradient GEMMs
        if self.native or weight.dtype == torch.float32:
            self.w = weight  # (V, H)
        else:  # fp32 copy for the logits GEMMs, into the workspace: no fresh (V, H) mapping per call
            self.w = ws.get(f"{name}_w32", tuple(weight.shape), torch.float32, weight.device).copy_(weight)
        self.grad_dtype = weight.dtype if (self.native or (self.cpu_bf16 and grads)) else torch.float32

    def logits(self, h: torch.Tensor, bias: torch.Tensor | None, c_max: int) -> torch.Tensor:
        """(c, H) hidden states -> (c, V) fp32 logits (in the workspace buffer ``<name>_logits`` off CUDA)."""
        if self.native:  # CUDA: the caching allocator already reuses the block
            out = _mm_f32(h, self.w.t())
        else:
            out = self.ws.get(f"{self.name}_logits", (c_max, self.w.shape[0]), torch.float32, h.device)[: h.shape[0]]
            torch.mm(h.float(), self.w.t(), out=out)
        return out if bias is None else out.add_(bias.float())

    def grad_act(self, g: torch.Tensor) -> torch.Tensor:
        """(c, V) logits gradient in ``grad_dtype`` -> (c, H) hidden-state gradient (fp32 or bf16 on cpu_bf16)."""
        if self.native:
            return _mm_f32(g, self.w)
        return g @ (self.w16 if self.cpu_bf16 else self.w)

    def acc_grad_weight_(self, gw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
        """``gw (V, H) fp32 += g.t() @ h`` for the chunk's (c, V) gradient and (c, H) hidden states."""
        if self.cpu_bf16 and g.dtype == torch.bfloat16:  # bf16 GEMM, bf16 product, summed in fp32
            tmp = self.ws.get(f"{self.name}_dw16", tuple(gw.shape), torch.bfloat16, gw.device)
            gw.add_(torch.mm(g.t(), h.to(torch.bfloat16), out=tmp))
        elif not self.native:
            gw.addmm_(g.t(), h.float())
        elif self.acc_in_place:  # half x half -> fp32 accumulate straight into gw (no V x H temporary)
            _addmm_f32_(gw, g.t(), h)
        else:  # torch builds whose addmm.dtype_out rejects an fp32 self: one (V, H) fp32 temporary
            gw.add_(_mm_f32(g.t(), h))
