"""Jit helpers the kernels share: exact division and bf16 rounding, identical on the GPU and in the interpreter."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# compiled for a GPU, or run by Triton's interpreter (which, like @triton.jit, reads TRITON_INTERPRET at import)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NATIVE = tl.constexpr(not INTERPRETED)


def require_cuda(t: torch.Tensor, what: str, hint: str) -> None:
    """The kernels take CUDA tensors, or CPU tensors under the interpreter; anything else is a clear error."""
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{what} runs on CUDA tensors (got {t.device}); {hint}")


def flat_f32(t: torch.Tensor) -> torch.Tensor:
    """t as the contiguous fp32 values a kernel reads by pointer (t itself when it already is: no op to launch)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.reshape(-1).float().contiguous()


@triton.jit
def div_ieee(a, b):
    """a / b for tensors, IEEE (correctly rounded, subnormals kept). On the GPU this is PTX div.rn.f32 itself:
    Triton links libdevice flushing subnormals to zero, so tl.math.div_rn would lose them. (Divisions whose
    quotient is clamped above the subnormal range, like amax / 6, use tl.math.div_rn.)"""
    if NATIVE:
        a, b = tl.broadcast(a, b)
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def round_bf16(v):
    """Round fp32 to the nearest bf16 value, ties to even, returned as fp32. NaN stays NaN."""
    if NATIVE:
        return v.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v == v, bits.to(tl.float32, bitcast=True), v)


@triton.jit
def cast_rne(v, ty: tl.constexpr):
    """fp32 v in dtype ty, rounded to nearest even on both builds, subnormals kept (for bf16 the interpreter's own
    cast would neither round so nor keep them)."""
    if ty == tl.bfloat16:
        if NATIVE:
            return v.to(tl.bfloat16, fp_downcast_rounding="rtne")
        else:  # rounded on the bits, and the top half taken as bf16 bits (the interpreter's cast flushes subnormals)
            bits = tl.where(v == v, round_bf16(v), float("nan")).to(tl.uint32, bitcast=True)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ty)

