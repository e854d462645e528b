"""Packed 4-bit weight GEMM: y = α · (A · Ŵᵀ) + bias with Ŵ read from its packed payload (docs/FORMAT.md: E2M1
codes two per byte, one UE4M3 or E8M0 scale code per block of 16 or 32) and decoded in registers.

Hopper has no FP4 matrix instructions, but at small M a layer is bound by the bytes of its weight, and the packed
payload is 4.25–4.5 bits per weight instead of bf16's 16. Each code times its block scale is exact in bf16
(E2M1 has 2 significant bits, UE4M3 4, E8M0 1), so the bf16 MMA sees exactly the reference's Ŵ and the product
is the reference's up to fp32 accumulation order.

- `packed_matmul` at small M (decode) on NVFP4 weights: the CUDA kernel of kernels/cuda_gemm.py (tensor cores fed
  from registers) where it compiles and the shape fits (on Hopper also 65-256 tokens of large layers, in the wgmma
  kernel's token tiles); otherwise the Triton kernels below.
- `_packed_mm_kernel`, "swap AB": a program computes a [BN, BM] tile of yᵀ as
  Ŵ-tile · Aᵀ-tile, so the weight rows fill the MMA's large side and the few tokens its small one. Where the
  output has too few tiles to keep every multiprocessor streaming, K is split over programs that write fp32
  partials, summed with α and the bias by the epilogue kernel; otherwise α and the bias are applied in-kernel.
- at M <= GEMV_M (batch-1 decode) `_packed_gemv_kernel`: the same payload decoded into fused multiply-adds on the
  CUDA cores, one program row per token, K split the same way (about 2× the MMA kernel there, docs/PERF.md).
- at large M (prefill) the weight is decoded once into a bf16 scratch buffer reused by every layer (the CUDA
  kernel of kernels/cuda_dequantize.py for NVFP4 where it runs, else `_dequantize_kernel`), then multiplied by
  cuBLASLt with α and the bias in its epilogue (kernels/cublaslt.py; else cuBLAS and the epilogue kernel): the
  decode is a small extra next to the GEMM there.
Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how CI checks it).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import cublaslt, cuda_dequantize, cuda_gemm
from .common import INTERPRETED, NATIVE, cast_rne, flat_f32, require_cuda
from .epilogue import reduce_scale_and_bias, scale_and_bias_launcher
from .launch import Constexprs, TritonLaunch, launch_triton, stream_key
from .placed import unplace_codes

_FMT = {"nvfp4": 0, "mxfp4": 1}
# up to here the Triton small-M kernels (MXFP4 weights and the shapes the CUDA kernel does not take; it runs NVFP4
# weights up to cuda_gemm.MAX_M, on Hopper more where cuda_gemm.fits says); above, decode to scratch + cuBLAS
# (decoded_matmul). docs/PERF.md,
# bench_gemm.py --crossover on the H200: the Triton MMA kernel is faster at M <= 32 on every shape, slower from 48
SMALL_M = 32


def supports(fmt: str, block: int | None) -> bool:
    """Whether packed_matmul reads weights of this format and block size. The NVFP4 tool variants (SPEC §3.1)
    have the same payload layout but are not read here: packed_matmul picks its decoder by format name, and the
    packed backend also needs the fused activation kernel, which implements SPEC §3 only."""
    return fmt in _FMT and block in (16, 32)


# --- decoding ------------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_value(code):
    """The E2M1 value of 4-bit codes (int32 0..15, sign << 3 | magnitude index) as fp32, exactly: magnitudes
    0, 0.5 and, for index i >= 2, 2^((i >> 1) - 1) · (1 + (i & 1) / 2), built from the bits."""
    mag = code & 7
    normal = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)
    bits = tl.where(mag >= 2, normal, tl.where(mag == 1, 0x3F000000, 0))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_value(code, FMT: tl.constexpr):
    """Block scale codes (int32) as fp32: UE4M3, the bits of float8_e4m3fn (NaN 0x7F, subnormals m·2^-9; the sign
    bit, never set in a payload sharq writes, decodes as e4m3fn's), or E8M0 (2^(code-127), NaN 0xFF)."""
    if FMT == 0:
        e = (code >> 3) & 15
        normal = ((e + 120) << 23) | ((code & 7) << 20)
        s = tl.where(e > 0, normal.to(tl.float32, bitcast=True), (code & 7).to(tl.float32) * 0.001953125)
        # the sign by its bit, so 0x80 is -0: Triton 3.6 compiles -s as 0 - s, +0 for s = +0
        s = (s.to(tl.int32, bitcast=True) | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)
        return tl.where((code & 0x7F) == 0x7F, float("nan"), s)
    else:
        bits = tl.where(code > 0, code << 23, 0x00400000)  # code 0 is 2^-127, an fp32 subnormal
        return tl.where(code == 0xFF, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _weight_tile(codes_ptr, scales_ptr, rn, k0, N, Kp, BLOCK: tl.constexpr, FMT: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    """Ŵ[rn, k0 : k0 + BK] in bf16, [BN, BK], decoded from the packed payload (columns past Kp read as 0)."""
    byte = k0 // 2 + tl.arange(0, BK // 2)
    rows = rn[:, None].to(tl.int64)
    c = tl.load(codes_ptr + rows * (Kp // 2) + byte[None, :], mask=(rn < N)[:, None] & (byte < Kp // 2)[None, :],
                other=0).to(tl.int32)
    codes = tl.reshape(tl.join(c & 15, c >> 4), (BN, BK))  # element 2i is the low nibble
    blk = k0 // BLOCK + tl.arange(0, BK // BLOCK)
    sc = tl.load(scales_ptr + rows * (Kp // BLOCK) + blk[None, :],
                 mask=(rn < N)[:, None] & (blk < Kp // BLOCK)[None, :], other=0).to(tl.int32)
    w = tl.reshape(_e2m1_value(codes), (BN, BK // BLOCK, BLOCK)) * _scale_value(sc, FMT)[:, :, None]
    return cast_rne(tl.reshape(w, (BN, BK)), tl.bfloat16)  # exact: at most 6 significant bits


# --- small M: the packed GEMM --------------------------------------------------------------------------------------
# Bytes b3 b2 b1 b0 of $2 spread to 16-bit lanes (prmt), each nibble's magnitude bits shifted to fp16 bits 9-11 and
# its sign to bit 15 (shift by m and s: 9 and 12 for the low nibble, 5 and 8 for the high one), two fp16 per output.
_E2M1_FP16_ASM = """{{ .reg .b32 t<2>, m<2>, s<2>;
prmt.b32 t0, $2, 0, 0x5140; prmt.b32 t1, $2, 0, 0x7362;
shl.b32 m0, t0, {m}; shl.b32 s0, t0, {s}; shl.b32 m1, t1, {m}; shl.b32 s1, t1, {s};
and.b32 m0, m0, 0x0E000E00; and.b32 s0, s0, 0x80008000; or.b32 $0, m0, s0;
and.b32 m1, m1, 0x0E000E00; and.b32 s1, s1, 0x80008000; or.b32 $1, m1, s1; }}"""
_E2M1_FP16_LOW = tl.constexpr(_E2M1_FP16_ASM.format(m=9, s=12))
_E2M1_FP16_HIGH = tl.constexpr(_E2M1_FP16_ASM.format(m=5, s=8))


@triton.jit
def _e2m1_fp16(c, HIGH: tl.constexpr):
    """The low (or HIGH) nibbles of code bytes c [.., n] as fp16 E2M1 values times 2^-14: the nibble's sign, two
    exponent bits and mantissa bit placed straight into fp16's sign, low exponent bits and top mantissa bit (for
    exponent 0 that is an fp16 subnormal, which is again the value times 2^-14). Bit placement only: on the GPU four
    bytes per 32-bit register in a few integer instructions (byte permute, shifts, masks)."""
    if NATIVE:
        if HIGH:
            return tl.inline_asm_elementwise(_E2M1_FP16_HIGH, "=r,=r,r", [c], dtype=tl.float16, is_pure=True,
                                             pack=4)
        else:
            return tl.inline_asm_elementwise(_E2M1_FP16_LOW, "=r,=r,r", [c], dtype=tl.float16, is_pure=True,
                                             pack=4)
    else:
        x = c.to(tl.int32)
        if HIGH:
            x = x >> 4
        return (((x & 7) << 9) | ((x & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _dot(a, b, acc):
    """acc + a·b, fp32 accumulation; bf16 tiles multiplied as their exact fp32 values in the interpreter, which
    (Triton 3.9) multiplies bf16 tiles as raw integers."""
    if NATIVE:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)


@triton.jit
def _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, kc, k_end, M, N, K, Kp, stride_am, BLOCK: tl.constexpr):
    """The loads of one 32-element chunk at kc for _nvfp4_chunk: codes [BN, 16] bytes, scale codes [BN, 32/BLOCK],
    and the even and odd activation elements [16, BM]."""
    byte = kc // 2 + tl.arange(0, 16)
    rows = rn[:, None].to(tl.int64)
    c = tl.load(codes_ptr + rows * (Kp // 2) + byte[None, :],
                mask=(rn < N)[:, None] & (byte < tl.minimum(Kp, k_end) // 2)[None, :], other=0)
    blk = kc // BLOCK + tl.arange(0, 32 // BLOCK)
    s = tl.load(scales_ptr + rows * (Kp // BLOCK) + blk[None, :],
                mask=(rn < N)[:, None] & (blk < tl.minimum(Kp, k_end) // BLOCK)[None, :], other=0)
    even = kc + 2 * tl.arange(0, 16)
    a_rows = a_ptr + rm[None, :].to(tl.int64) * stride_am
    a_even = tl.load(a_rows + even[:, None], mask=(rm < M)[None, :] & (even < K)[:, None], other=0.0)
    a_odd = tl.load(a_rows + even[:, None] + 1, mask=(rm < M)[None, :] & (even + 1 < K)[:, None], other=0.0)
    return c, s, a_even, a_odd


@triton.jit
def _nvfp4_chunk(c, s, a_even, a_odd, acc, BLOCK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """acc + Ŵ-chunk · A-chunkᵀ for NVFP4 weights, in fp16: the even and the odd elements (low and high nibbles) as
    two K = 16 products, so no nibble is ever moved. The activation of an NVFP4 recipe is a multiple of 2^-10 of at
    most 8 significant bits below 2^13, exact in fp16; the codes are exact times 2^-14. With 32-element blocks the
    scale multiplies the chunk's product; with 16-element blocks, each element, in fp16 and times 2^6: code · 2^-14
    · scale · 2^6 lies in [2^-18, 10.5] with at most 5 significant bits, exact in fp16 (subnormal below 2^-14), so
    the kernel's sum is then the product times 2^-8 (put back after the loop)."""
    w_even, w_odd = _e2m1_fp16(c, False), _e2m1_fp16(c, True)
    if BLOCK == 32:
        f = _scale_value(s.to(tl.int32), 0) * 16384.0
        part = _dot(w_odd, a_odd.to(tl.float16), _dot(w_even, a_even.to(tl.float16),
                                                      tl.zeros((BN, BM), dtype=tl.float32)))
        return acc + part * f
    else:
        g = (_scale_value(s.to(tl.int32), 0) * 64.0).to(tl.float16)[:, :, None]  # [BN, 2, 1]: the chunk's 2 blocks
        w_even = tl.reshape(tl.reshape(w_even, (BN, 2, 8)) * g, (BN, 16))
        w_odd = tl.reshape(tl.reshape(w_odd, (BN, 2, 8)) * g, (BN, 16))
        return _dot(w_odd, a_odd.to(tl.float16), _dot(w_even, a_even.to(tl.float16), acc))


@triton.jit
def _finish(acc, y_ptr, sx_ptr, sw_ptr, bias_ptr, rn, rm, pid_k, M, N, stride_split, stride_ym, SPLIT: tl.constexpr,
            SX_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store yᵀ tile acc [BN, BM]: α·acc + bias in y's dtype, or (SPLIT) the fp32 partial in y[pid_k]."""
    inside = (rn < N)[:, None] & (rm < M)[None, :]
    ptrs = rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    if SPLIT:
        tl.store(y_ptr + pid_k * stride_split + ptrs, acc, mask=inside)
    else:
        sx = tl.load(sx_ptr + rm, mask=rm < M, other=1.0)[None, :] if SX_PER_ROW else tl.load(sx_ptr)
        alpha = sx * tl.load(sw_ptr)
        if HAS_BIAS:
            y = tl.fma(acc, alpha, tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None])
        else:
            y = acc * alpha
        tl.store(y_ptr + ptrs, cast_rne(y, y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _packed_mm_kernel(a_ptr, codes_ptr, scales_ptr, y_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, Kp, stride_am,
                      stride_split, stride_ym, k_per_split, BLOCK: tl.constexpr, FMT: tl.constexpr,
                      SPLIT: tl.constexpr, SX_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
    """yᵀ[rn, rm] = Ŵ[rn, :] · A[rm, :]ᵀ over this program's K range; then α·y + bias into y (SPLIT false), or the
    fp32 partial into y[pid_k] (SPLIT true; the epilogue kernel finishes)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, Kp)
    if FMT == 0:
        # NVFP4: steps of four 32-element chunks, whose loads are issued one step ahead (a memory-bound kernel
        # needs many loads in flight; each product waits on shared memory, so nothing else would overlap them)
        c0, s0, e0, o0 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k_start, k_end, M, N, K, Kp, stride_am,
                                     BLOCK)
        c1, s1, e1, o1 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k_start + 32, k_end, M, N, K, Kp,
                                     stride_am, BLOCK)
        c2, s2, e2, o2 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k_start + 64, k_end, M, N, K, Kp,
                                     stride_am, BLOCK)
        c3, s3, e3, o3 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k_start + 96, k_end, M, N, K, Kp,
                                     stride_am, BLOCK)
        for k0 in range(k_start, k_end, 128):
            n0, t0, f0, g0 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k0 + 128, k_end, M, N, K, Kp,
                                         stride_am, BLOCK)
            n1, t1, f1, g1 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k0 + 160, k_end, M, N, K, Kp,
                                         stride_am, BLOCK)
            n2, t2, f2, g2 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k0 + 192, k_end, M, N, K, Kp,
                                         stride_am, BLOCK)
            n3, t3, f3, g3 = _nvfp4_load(a_ptr, codes_ptr, scales_ptr, rn, rm, k0 + 224, k_end, M, N, K, Kp,
                                         stride_am, BLOCK)
            acc = _nvfp4_chunk(c0, s0, e0, o0, acc, BLOCK, BN, BM)
            acc = _nvfp4_chunk(c1, s1, e1, o1, acc, BLOCK, BN, BM)
            acc = _nvfp4_chunk(c2, s2, e2, o2, acc, BLOCK, BN, BM)
            acc = _nvfp4_chunk(c3, s3, e3, o3, acc, BLOCK, BN, BM)
            c0, s0, e0, o0, c1, s1, e1, o1 = n0, t0, f0, g0, n1, t1, f1, g1
            c2, s2, e2, o2, c3, s3, e3, o3 = n2, t2, f2, g2, n3, t3, f3, g3
        if BLOCK == 16:
            acc = acc * 256.0  # the 2^-8 of _nvfp4_chunk's 16-element blocks
    else:
        for k0 in range(k_start, k_end, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[None, :].to(tl.int64) * stride_am + rk[:, None],
                        mask=(rm < M)[None, :] & (rk < K)[:, None], other=0.0)  # Aᵀ tile [BK, BM]
            acc = _dot(_weight_tile(codes_ptr, scales_ptr, rn, k0, N, Kp, BLOCK, FMT, BN, BK), a, acc)
    _finish(acc, y_ptr, sx_ptr, sw_ptr, bias_ptr, rn, rm, pid_k, M, N, stride_split, stride_ym, SPLIT, SX_PER_ROW,
            HAS_BIAS)


# --- M <= GEMV_M: the packed GEMV on CUDA cores ------------------------------------------------------------------
@triton.jit
def _packed_gemv_kernel(a_ptr, codes_ptr, scales_ptr, y_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K, Kp, stride_am,
                        stride_split, stride_ym, k_per_split, BLOCK: tl.constexpr, FMT: tl.constexpr,
                        SPLIT: tl.constexpr, SX_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
    """y[m, rn] = Ŵ[rn, :] · A[m, :] for one token m (program axis 2) over this program's K range, with fused
    multiply-adds instead of the tensor cores: at one token an MMA wastes 15 of its 16 rows and its operand
    staging, while here each code costs its decode, one conversion and one FMA. Codes are decoded to fp16 times
    2^-14 (bit placement, _e2m1_fp16), multiplied by the activation in fp32 (exact: 2 × 8 significant bits), summed
    over each scale block in fp32 and scaled once per block."""
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    # rows and K ranges are whole blocks: telling the compiler lets it load a block's codes as one vector
    row_bytes = tl.multiple_of(Kp // 2, BLOCK // 2)
    codes_rows = codes_ptr + rn[:, None].to(tl.int64) * row_bytes
    scales_rows = scales_ptr + rn[:, None].to(tl.int64) * (Kp // BLOCK)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, Kp)
    end_bytes = tl.multiple_of(k_end // 2, BLOCK // 2)
    a_row = a_ptr + m.to(tl.int64) * stride_am
    acc = tl.zeros((BN, BK // BLOCK), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        byte = tl.multiple_of(k0 // 2, BLOCK // 2) + tl.arange(0, BK // 2)
        c = tl.load(codes_rows + byte[None, :], mask=(rn < N)[:, None] & (byte < end_bytes)[None, :], other=0)
        blk = k0 // BLOCK + tl.arange(0, BK // BLOCK)
        s = tl.load(scales_rows + blk[None, :], mask=(rn < N)[:, None] & (blk < k_end // BLOCK)[None, :],
                    other=0).to(tl.int32)
        rk = k0 + tl.arange(0, BK)  # the activation: one row, shared by the BN weight rows
        a_even, a_odd = tl.split(tl.reshape(tl.load(a_row + rk, mask=rk < K, other=0.0).to(tl.float32),
                                            (BK // 2, 2)))
        # the even and the odd elements summed apart (as measured; Triton reduces each block as a tree either way,
        # FMUL + FFMA + FADD, not one chain of FFMA: docs/PERF.md)
        part = tl.sum(tl.reshape(_e2m1_fp16(c, False).to(tl.float32) * a_even[None, :], (BN, BK // BLOCK, BLOCK // 2)),
                      axis=2)
        part += tl.sum(tl.reshape(_e2m1_fp16(c, True).to(tl.float32) * a_odd[None, :], (BN, BK // BLOCK, BLOCK // 2)),
                       axis=2)
        acc += (part * 16384.0) * _scale_value(s, FMT)  # 2^14 first: E8M0 scales times 2^14 could overflow fp32
    y = tl.reshape(tl.sum(acc, axis=1), (BN, 1))
    _finish(y, y_ptr, sx_ptr, sw_ptr, bias_ptr, rn, m + tl.arange(0, 1), pid_k, M, N, stride_split, stride_ym,
            SPLIT, SX_PER_ROW, HAS_BIAS)


# --- large M: decode to scratch ------------------------------------------------------------------------------------
@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, w_ptr, N, K, Kp, BLOCK: tl.constexpr, FMT: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    w = _weight_tile(codes_ptr, scales_ptr, rn, k0, N, Kp, BLOCK, FMT, BN, BK)
    rk = k0 + tl.arange(0, BK)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return 4 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count


# One bf16 scratch weight per (device, stream), grown to the largest layer and reused by every layer that runs on
# that stream: kernels on one stream run in launch order, so a layer's decode and GEMM never meet another layer's
# writes; a second stream (or a CUDA graph being captured on one) gets its own buffer. Host threads that share a
# stream take _scratch_lock across their decode + GEMM launches, so the two launches stay adjacent in the stream.
# Each buffer keeps the [n, k] views of it that layers asked for (and their transposes), made once per buffer.
_scratch: dict[tuple[torch.device, int], tuple[torch.Tensor, dict]] = {}
_scratch_lock = threading.Lock()


def _scratch_weight(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 [n, k] view of the current stream's scratch buffer on `device`, and its transpose (call under
    _scratch_lock)."""
    key = (device, stream_key(device.index))
    entry = _scratch.get(key)
    if entry is None or entry[0].numel() < n * k:
        _scratch.pop(key, None)
        entry = _scratch[key] = (torch.empty(n * k, dtype=torch.bfloat16, device=device), {})
    views = entry[1].get((n, k))
    if views is None:
        w = entry[0][: n * k].view(n, k)
        views = entry[1][n, k] = (w, w.T)
    return views


def dequantize_packed(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, k: int,
                      out: torch.Tensor | None = None, placed: bool = False) -> torch.Tensor:
    """Ŵ [N, k] in bf16 from a packed payload (codes [N, Kp/2], in kernels/placed.py's layout where `placed`;
    scales [N, Kp/block])."""
    require_cuda(codes, "dequantize_packed", "use quant.dequantize_blocks on the CPU")
    n = codes.shape[0]
    w = torch.empty(n, k, dtype=torch.bfloat16, device=codes.device) if out is None else out
    if n and k:
        _dequantizer(codes, scales, fmt, block, k, bound=False, cuda=w.is_contiguous() and w.data_ptr() % 16 == 0,
                     placed=placed)(w)
    return w


def _dequantizer(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, k: int, bound: bool,
                 cuda: bool = True, placed: bool = False) -> Callable[[torch.Tensor], None]:
    """w -> None, decoding the payload into w (bf16 [N, k], contiguous): the CUDA kernel where `cuda` (w 16-byte
    aligned) and it takes the payload (kernels/cuda_dequantize.py, the same bits), else the Triton kernel (a `bound`
    launch: for a plan's calls). Placed codes the Triton kernel reads put back each call (a fallback: the CUDA
    decode takes every NVFP4 payload of whole K where NVRTC runs)."""
    if cuda and (run := cuda_dequantize.launcher(codes, scales, fmt, block, k, placed)):
        return run
    n, flags = codes.shape[0], _DEQUANTIZE[fmt, block]
    launch = TritonLaunch(_dequantize_kernel, (triton.cdiv(n, flags["BN"]), triton.cdiv(k, flags["BK"])), flags,
                          bound=bound)
    if placed:
        return lambda w: launch((unplace_codes(codes), scales, w, n, k, codes.shape[1] * 2))
    return lambda w: launch((codes, scales, w, n, k, codes.shape[1] * 2))


_DEQUANTIZE = {(fmt, block): Constexprs(BLOCK=block, FMT=code, BN=32, BK=256, num_warps=4)
               for fmt, code in _FMT.items() for block in (16, 32)}


@dataclass(frozen=True)
class Tile:
    """A launch of a small-M kernel: weight rows × tokens × K per step (NVFP4 weights step by 128 in the MMA
    kernel), K splits, warps, pipeline stages, and which kernel: "mma" (tensor cores, any M) or "gemv" (CUDA
    cores, one program row per token)."""

    bn: int = 128
    bm: int = 16
    bk: int = 128
    splits: int = 1
    warps: int = 4
    stages: int = 3
    kernel: str = "mma"


GEMV_M = 2  # up to here the CUDA-core kernel (bench_gemm.py --sweep: at M = 4 the MMA kernel is faster)


def _splits(tiles: int, kp: int, bk: int, per_multiprocessor: int, device: torch.device) -> int:
    """Split K until there are about `per_multiprocessor` programs per multiprocessor (so every one streams
    weights), each split at least two steps long."""
    splits = 1
    while tiles * splits * 2 <= per_multiprocessor * _multiprocessors(device) and kp // (splits * 2) >= 2 * bk:
        splits *= 2
    return splits


def choose_tile(m: int, n: int, kp: int, device: torch.device) -> Tile:
    """M <= GEMV_M: the CUDA-core kernel, 32 weight rows by 256 elements a step, K split to about four programs
    per multiprocessor. Otherwise the MMA kernel: 128 weight rows by the tokens rounded up to 16..64, about two
    (from benchmarks/bench_gemm.py --sweep on the H200: within 4 % of the best launch on every shape)."""
    if m <= GEMV_M:
        bn, bk = 32, 256
        return Tile(bn, 1, bk, _splits(triton.cdiv(n, bn) * m, kp, bk, 4, device), warps=4, stages=1,
                    kernel="gemv")
    bm = min(64, max(16, triton.next_power_of_2(m)))
    bn, bk = 128, 128
    return Tile(bn, bm, bk, _splits(triton.cdiv(n, bn) * triton.cdiv(m, bm), kp, bk, 2, device))


def decoded_matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int,
                   sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                   placed: bool = False) -> torch.Tensor:
    """packed_matmul's path above SMALL_M: the payload decoded into the shared bf16 scratch weight, then cuBLASLt's
    product with α and the bias (else cuBLAS and the epilogue). Arguments as packed_matmul's, already checked there
    (sx, sw flat fp32); a's K may be short of the payload's, and a need not be aligned for cuBLASLt (then cuBLAS and
    the epilogue)."""
    m, k = a.shape
    aligned = a.data_ptr() % cublaslt.ALIGNMENT == 0 and a.stride(0) == k
    return _DecodedLaunch(codes, scales, fmt, block, sw, bias, out_dtype, (m,), sx.numel() > 1, placed, k=k,
                          fused=aligned, bound=False)(a, sx)


def product(a: torch.Tensor, wt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a · wt (bf16) by cuBLAS for a layer of out_dtype, before α (also the triton backend's GEMM): a bf16 layer's
    rounded to bf16, any other's fp32 straight from the fp32 accumulator (an fp16 layer's is rounded only after α:
    the unscaled product can exceed fp16's range where the output does not)."""
    if out_dtype == torch.bfloat16:
        return torch.mm(a, wt)
    return torch.mm(a, wt, out_dtype=torch.float32) if not INTERPRETED else a.float() @ wt.float()


class _DecodedLaunch:
    """decoded_matmul with one weight for activations [M, K], worked out once (an eager layer's plan above the
    CUDA kernel's tokens, prefill): the decode's launch bound, the product's (cuBLASLt's, or cuBLAS + the
    epilogue's launch) chosen, the scratch views kept, so a call is the decode launch and the product, into an
    output [*lead, N]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, sw: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, lead: tuple[int, ...], sx_rows: bool,
                 placed: bool, k: int | None = None, fused: bool = True, bound: bool = True):
        """`k`: the activation's K (default the payload's); `fused`: cuBLASLt may take the product (the activation
        is aligned for it); `bound`: the Triton launches are a plan's (bound once), not one call's."""
        self.device, self.out_dtype, self.sw, self.bias = codes.device, out_dtype, flat_f32(sw), bias
        self.n, self.k = codes.shape[0], k or codes.shape[1] * 2
        self.shape = (*lead, self.n)
        m = math.prod(lead)
        self.dequantize = _dequantizer(codes, scales, fmt, block, self.k, bound=bound, placed=placed)
        self.fused = cublaslt.scaled_matmul(m, self.n, self.k, out_dtype, sx_rows and m > 1, bias, codes.device) \
            if fused else None
        self.epilogue = None if self.fused else scale_and_bias_launcher(m, self.n, sw, bias, sx_rows, bound)

    def __call__(self, a: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        with _scratch_lock:
            w, wt = _scratch_weight(self.n, self.k, self.device)
            self.dequantize(w)
            if self.fused is not None:
                y = torch.empty(self.shape, dtype=self.out_dtype, device=self.device)
                return self.fused(a, w, sx, self.sw, self.bias, y)
            y = self.epilogue(product(a, wt, self.out_dtype), sx)
        return y.to(self.out_dtype).view(self.shape)


def decoded_launcher(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, sw: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, lead: tuple[int, ...], sx_rows: bool,
                     placed: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """decoded_matmul with this weight for activations [M, K] (M = prod(lead)), its checks done once: an eager
    layer's plan above the CUDA kernel's tokens (prefill), whose caller guarantees a contiguous bf16 activation
    [M, K] (K the payload's) and its fp32 scale ([M, 1] if `sx_rows`, else [1, 1]; contiguous), both fresh from
    the prepare kernel. Returns (a, sx) -> y [*lead, N], the bits packed_matmul gives."""
    return _DecodedLaunch(codes, scales, fmt, block, sw, bias, out_dtype, lead, sx_rows, placed)


def packed_matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int,
                  sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                  tile: Tile | None = None, placed: bool = False) -> torch.Tensor:
    """α · (a · Ŵᵀ) + bias [M, N] in out_dtype; a bf16 [M, K], Ŵ the packed payload (codes [N, Kp/2], scales
    [N, Kp/block], format nvfp4 or mxfp4), α = s_x ([1, 1] or [M, 1]) · s_w ([] or [1]). A `tile` runs the
    packed kernel with that launch shape at any M (benchmarks, tests). `placed`: NVFP4 codes in
    kernels/placed.py's layout, which the CUDA kernels read as they are; the Triton kernels (a fallback where
    those do not run) get them put back for the call."""
    require_cuda(a, "packed_matmul", "use backend='reference' on the CPU")
    if a.dtype != torch.bfloat16 or a.dim() != 2 or a.stride(-1) != 1:
        raise ValueError(f"packed_matmul takes a contiguous bf16 [M, K] activation, got {a.dtype} {tuple(a.shape)}")
    if not supports(fmt, block):
        raise ValueError(f"packed_matmul reads nvfp4/mxfp4 weights in blocks of 16 or 32, not {fmt}/{block}")
    (m, k), n, kp = a.shape, codes.shape[0], codes.shape[1] * 2
    if kp < k or kp % block or scales.shape != (n, kp // block):
        raise ValueError(f"packed weight codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not fit K={k}")
    sx, sw = flat_f32(sx), flat_f32(sw)
    if sw.numel() != 1:
        raise ValueError("packed_matmul takes one weight scale s_w per layer")
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=a.device) + (0 if bias is None else bias.to(out_dtype))
    if placed and fmt != "nvfp4":
        raise ValueError(f"placed codes are NVFP4's, not {fmt}'s")
    if tile is None and not INTERPRETED and cuda_gemm.fits(a, codes, scales, fmt, block, bias, out_dtype):
        y = cuda_gemm.nvfp4_mma(a, codes, scales, block, sx, sw, bias, out_dtype, placed=placed)
        if y is not None:
            return y
    if m > SMALL_M and tile is None:
        return decoded_matmul(a, codes, scales, fmt, block, sx, sw, bias, out_dtype, placed)
    if placed:
        codes = unplace_codes(codes)
    t = tile or choose_tile(m, n, kp, a.device)
    if t.kernel not in ("mma", "gemv") or t.bk % block:
        raise ValueError(f"bad tile {t}: kernel 'mma' or 'gemv', bk a multiple of the weight block {block}")
    if fmt == "nvfp4" and t.kernel == "mma" and t.bk != 128:
        raise ValueError("the packed kernel steps through NVFP4 weights 128 elements at a time: Tile(bk=128)")
    k_per_split = triton.cdiv(triton.cdiv(kp, t.splits), t.bk) * t.bk
    split = t.splits > 1
    y = torch.empty((t.splits, m, n) if split else (m, n), dtype=torch.float32 if split else out_dtype,
                    device=a.device)
    args = (a, codes, scales, y, sx, sw, bias if bias is not None else sx, m, n, k, kp, a.stride(0), m * n, n,
            k_per_split)
    flags = _flags(t, block, fmt, split, sx.numel() > 1, bias is not None)
    if t.kernel == "gemv":
        launch_triton(_packed_gemv_kernel, (triton.cdiv(n, t.bn), t.splits, m), args, flags)
    else:
        launch_triton(_packed_mm_kernel, (triton.cdiv(n, t.bn), t.splits, triton.cdiv(m, t.bm)), args, flags)
    return reduce_scale_and_bias(y, sx, sw, bias, out_dtype) if split else y


@functools.lru_cache(maxsize=None)
def _flags(t: Tile, block: int, fmt: str, split: bool, sx_per_row: bool, has_bias: bool) -> Constexprs:
    """The small-M kernels' constexprs and launch options for a tile."""
    return Constexprs(BLOCK=block, FMT=_FMT[fmt], SPLIT=split, SX_PER_ROW=sx_per_row, HAS_BIAS=has_bias, BN=t.bn,
                      BK=t.bk, num_warps=t.warps, num_stages=t.stages, **({"BM": t.bm} if t.kernel == "mma" else {}))
