"""Fused Triton activation preparation: X -> deq(Q₁) + deq(Q₂) in one pass over X (SPEC §5, DESIGN kernels/), and,
in packed mode, the stage payloads themselves (codes, scale codes, 2-bit mask indices; docs/FORMAT.md).

Two kernels per call. `_amax_kernel` reads X once for the finite amax the tensor scale needs (one value, or one per
row); a small X (decode: at most SELF_AMAX_ELEMENTS) skips it, each program finding the amax itself, since there a
launch costs more than re-reading a few KB from L2. `_prepare_kernel` then reads X once more and writes its outputs
once: a program loads BLOCK_M rows × 16·H columns contiguously and splits the tile in registers into 8 tensors x_j
(j = the element's place in its 8-element chunk), each [BLOCK_M, H halves of 16, 2 chunks]. The masks are
elementwise comparisons between the x_j, and the 16- and 32-element block maxima small reductions. Tiles are
8 × 128 (docs/PERF.md: the kernel is bound by instruction issue, about 53 instructions per element on the H200, so
every operation below is counted). On Hopper the kernel lets a GEMM launched after it with programmatic dependent
launch (kernels/cuda_gemm.py) start while it runs.

Bit-exactness with the torch reference (quant.py, masks.py) rests on these choices:
- X / s_x is IEEE (PTX div.rn.f32, subnormals kept), as torch's division is — on CUDA too, since the reference
  divides by tensors, not Python numbers (quant._divide). The block scales need no division: amax / 6 is a
  product with RN(1/6) refined twice (exact by Markstein's theorem), and 1/s for UE4M3 is the hardware
  reciprocal plus one Newton step (exact for all 8 significands; see _reciprocal_ue4m3);
- bf16 rounding is the GPU's round-to-nearest-even conversion; the interpreter's conversion does not round that
  way, so under TRITON_INTERPRET=1 it is done on the bits;
- UE4M3 and E2M1 rounding use the add-and-subtract trick: for 0 <= v < 2^(e+22), fp32 (v + 2^(e+23)) − 2^(e+23)
  rounds v to a multiple of 2^e with round-to-nearest-even, which is the rounding both formats specify; the
  constant is built from v's exponent bits;
- a block's maximum is taken on the bits of |x| as integers, where NaN > Inf > every finite value, so a block
  holding NaN/Inf is seen from its maximum alone and gets the NaN scale (SPEC §8). The pair masks always keep the
  largest element, so the sparse stage's block maxima are X's.

Supported cascades: one or two stages of NVFP4 or MXFP4, the first optionally masked (pair-4:8 or 2:4), blocks
of 16 or 32 — that is nvfp4, mxfp4, sharq, sharq-mxfp4, sparse-only and dense-dense. HiF4 stays on the reference
path. Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how CI checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:  # Triton 3.4+: let a kernel launched after this one with programmatic dependent launch start early
    from triton.language.extra.cuda import gdc_launch_dependents as _launch_dependents
except ImportError:
    _launch_dependents = None

from .. import masks
from ..quant import NVFP4_TENSOR_DIVISOR, TENSOR_SCALE_FLOOR, QTensor
from ..recipes import QActivation, Recipe
from .common import INTERPRETED, NATIVE, cast_rne, div_ieee, require_cuda, round_bf16
from .launch import PLAN_BUFFER_BYTES, Constexprs, FixedLaunches, TritonLaunch, launch_hooks_set, plan_buffers

_FMT = {"nvfp4": 0, "mxfp4": 1}
_MASK = {None: 0, "pair-4:8": 1, "2:4": 2}
_DIVISOR = tl.constexpr(NVFP4_TENSOR_DIVISOR)
_FLOOR = tl.constexpr(TENSOR_SCALE_FLOOR)
_INF_BITS = tl.constexpr(0x7F800000)


@functools.lru_cache(maxsize=256)
def supports(recipe: Recipe) -> bool:
    """Whether the fused kernel implements this recipe's activation cascade. Formats match by name: the kernel is
    SPEC §3's NVFP4 and MXFP4, so the NVFP4 tool variants (nvfp4-torchao, nvfp4-compressed-tensors: no bf16(X/s),
    other scale floors and product orders, SPEC §3.1) run on the reference path, and so do the options of SPEC
    §11 on activations: block scale rules other than "max" here, masks by name (pair-l2-4:8 is not in _MASK). The
    weight options (weight_scale_rule, weight_tensor_scale_rule) are not checked: they change only the values of
    the NVFP4 payload and s_w, which the kernels read as they are."""
    stages = recipe.stages
    return (
        0 < len(stages) <= 2
        and recipe.outlier_fraction == 0
        and all(s.fmt in _FMT and s.block in (16, 32) and s.scale_rule == "max" for s in stages)
        and stages[0].mask in _MASK
        and all(s.mask is None for s in stages[1:])
        and len({s.fmt for s in stages}) == 1
    )


# --- elementwise pieces ----------------------------------------------------------------------------------------
@triton.jit
def _round_to_quantum(v, quantum_exp):
    """Round v >= 0 to a multiple of 2^quantum_exp (RNE): (v + c) − c with c = 2^(quantum_exp + 23)."""
    c = ((quantum_exp + 23 + 127) << 23).to(tl.float32, bitcast=True)
    return (v + c) - c


@triton.jit
def _e2m1_magnitude(a):
    """RNE of a in [0, 6] onto {0, .5, 1, 1.5, 2, 3, 4, 6}: to a multiple of 2^(max(e, 0) − 1), 2^e <= a < 2^(e+1),
    by adding and subtracting 2^(max(e, 0) + 22), built from a's exponent bits."""
    c = (tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000) + (22 << 23)).to(tl.float32, bitcast=True)
    return (a + c) - c


@triton.jit
def _abs_bits(v):
    """|v| as int32 bits: ordered like |v|, with NaN above Inf above every finite value."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _finite_max_zeros(x_ptr, BM: tl.constexpr, BK: tl.constexpr):
    """The accumulator _finite_max_step keeps for tiles [BM, BK] of x_ptr's dtype: packed int16 for bf16 X."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        return tl.zeros((BM, BK), dtype=tl.int16)
    else:
        return tl.zeros((BM, BK), dtype=tl.int32)


@triton.jit
def _finite_max_step(acc, x):
    """acc with the finite |x| of a loaded tile x taken in (Inf and NaN left out). bf16 X stays in its 16 bits:
    |x|'s bits + 0x80 put finite values at 0x80..0x7FFF and Inf/NaN at 0x8000..0x807F, negative as int16, so a
    signed int16 maximum keeps the finite one (+ 0x80). The compiler packs it two a register (for Hopper, LOP3 and
    VIADDMNMX.S16x2 a pair against about 5 instructions an element through fp32): the activation kernel at 8-16
    tokens, most of whose instructions are this re-read, 0.87-0.94 × the time on an H100 (docs/PERF.md, thirtieth
    run). Written in plain Triton, not inline PTX, which kept the loads behind their uses and lost."""
    if x.dtype == tl.bfloat16:
        return tl.maximum(acc, (x.to(tl.int16, bitcast=True) & 0x7FFF) + 0x80)  # int16 arithmetic: wraps
    else:
        a = _abs_bits(x.to(tl.float32))
        return tl.maximum(acc, tl.where(a < _INF_BITS, a, 0))


@triton.jit
def _finite_max_bits(acc, axis: tl.constexpr):
    """The finite max |x| along `axis` of a _finite_max_step accumulator, as fp32 bits (int32)."""
    if acc.dtype == tl.int16:
        return tl.maximum(tl.max(acc, axis=axis).to(tl.int32) - 0x80, 0) << 16
    else:
        return tl.max(acc, axis=axis)


@triton.jit
def _floor_log2(a):
    """floor(log2 a) for positive finite fp32 a, subnormals included (they are scaled by 2^64 first)."""
    tiny = a < 1.1754943508222875e-38
    scaled = tl.where(tiny, a * 18446744073709551616.0, a)
    e = ((scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.where(tiny, e - 64, e)


@triton.jit
def _reciprocal_ue4m3(s):
    """RN(1/s) for a UE4M3 scale s >= 2^-9: the hardware's approximate reciprocal (within 1 ulp) and one Newton
    step, whose error (~2^-46 relative) is far below the 0.033 ulp by which 1/m, for each of the 8 significands m
    of UE4M3, misses an fp32 rounding midpoint — so the result is the correctly rounded reciprocal."""
    if NATIVE:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [s], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return tl.fma(y, tl.fma(-s, y, 1.0), y)
    else:
        return tl.math.div_rn(tl.zeros_like(s) + 1.0, s)


@triton.jit
def _block_scale(amax_bits, FMT: tl.constexpr):
    """(s, 1/s): the dequantized block scale from the block's |x| maximum (as bits) — UE4M3 of clamp(amax/6)
    (NVFP4) or E8M0 2^(floor(log2 amax) − 2) (MXFP4) — and its correctly rounded reciprocal, which the reference
    multiplies by; s is NaN where the block holds a non-finite value."""
    bad = amax_bits >= _INF_BITS
    amax = tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True)
    if FMT == 0:
        # amax / 6 correctly rounded: RN(amax·RN(1/6)) refined twice (Markstein); a quotient small enough for the
        # refinement to underflow is far below the 2^-9 clamp
        q = amax * 0.1666666716337204
        q = tl.fma(tl.fma(-q, 6.0, amax), 0.1666666716337204, q)
        q = tl.fma(tl.fma(-q, 6.0, amax), 0.1666666716337204, q)
        s = tl.minimum(tl.maximum(q, 0.001953125), 448.0)
        s = _round_to_quantum(s, tl.maximum((s.to(tl.int32, bitcast=True) >> 23) - 130, -9))  # 3 mantissa bits
        inv = _reciprocal_ue4m3(s)
    else:
        e = tl.where(amax > 0, _floor_log2(tl.where(amax > 0, amax, 1.0)) - 2, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        s = tl.where(e > -127, ((e + 127) << 23).to(tl.float32, bitcast=True), 5.877471754111438e-39)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, normal: e <= 125 for a finite amax
    return tl.where(bad, float("nan"), s), inv


@triton.jit
def _keep_two(s0, s1, s2, s3):
    """Which 2 of 4 scores are kept: the larger, ties to the lower index. Unit i is dropped when two others are
    ahead of it; g_ij says whether j (> i) is ahead of i."""
    g01, g02, g03 = s1 > s0, s2 > s0, s3 > s0
    g12, g13, g23 = s2 > s1, s3 > s1, s3 > s2
    n01, n02, n03, n12, n13, n23 = s1 <= s0, s2 <= s0, s3 <= s0, s2 <= s1, s3 <= s1, s3 <= s2
    k0 = ~((g01 & g02) | (g01 & g03) | (g02 & g03))
    k1 = ~((n01 & g12) | (n01 & g13) | (g12 & g13))
    k2 = ~((n02 & n12) | (n02 & g23) | (n12 & g23))
    k3 = ~((n03 & n13) | (n03 & n23) | (n13 & n23))
    return k0, k1, k2, k3


@triton.jit
def _kept_nibble(k0, k1, k2, k3):
    """The 2 kept indices of 4 units (exactly two of k0..k3 set), increasing, 2 bits each: first | second << 2."""
    return tl.where(k0, 0, tl.where(k1, 1, 2)) | (tl.where(k3, 3, tl.where(k2, 2, 1)) << 2)


@triton.jit
def _half_amax(a0, a1, a2, a3, a4, a5, a6, a7, BLOCK: tl.constexpr, BM: tl.constexpr, H: tl.constexpr):
    """Block maxima of 8 |x|-bits tensors [BM, H, 2], one per 16-element half [BM, H] (a 32-block's maximum is
    given to both its halves)."""
    a = tl.maximum(tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3)),
                   tl.maximum(tl.maximum(a4, a5), tl.maximum(a6, a7)))
    a = tl.max(a, axis=2)
    if BLOCK == 32:
        a = tl.reshape(tl.broadcast_to(tl.max(tl.reshape(a, (BM, H // 2, 2)), axis=2)[:, :, None], (BM, H // 2, 2)),
                       (BM, H))
    return a


@triton.jit
def _dequantize(v, s):
    """E2M1 rounding of v = x/s (saturating at ±6, sign kept, −0 included), times s."""
    r = _e2m1_magnitude(tl.minimum(tl.abs(v), 6.0))
    signed = (r.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32,
                                                                                                bitcast=True)
    return signed * s


@triton.jit
def _code(v, s):
    """E2M1 code (sign << 3 | magnitude index) of v = x/s, as the reference encodes it (0 in a NaN block)."""
    r = _e2m1_magnitude(tl.minimum(tl.abs(v), 6.0))
    idx = tl.where(r < 2.0, r * 2.0, tl.where(r < 4.0, r + 2.0, r * 0.5 + 4.0)).to(tl.int32)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return tl.where(s == s, idx | (sign << 3), 0)


@triton.jit
def _scale_code(s, FMT: tl.constexpr):
    """The 8-bit code of a block scale value: UE4M3 (NaN 0x7F) or E8M0 (NaN 0xFF)."""
    if FMT == 0:
        e = _floor_log2(tl.where(s == s, s, 1.0))
        inv_unit = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, exact (s >= 2^-9)
        normal = ((e + 7) << 3) | ((s * inv_unit - 1.0) * 8.0).to(tl.int32)
        code = tl.where(s >= 0.015625, normal, (s * 512.0).to(tl.int32))
        return tl.where(s == s, code, 0x7F)
    else:
        return tl.where(s == s, _floor_log2(tl.where(s == s, s, 1.0)) + 127, 0xFF)


# --- tile layout: [BM, 16·H] <-> 8 tensors [BM, H, 2] ------------------------------------------------------------
@triton.jit
def _split8(t, BM: tl.constexpr, H: tl.constexpr):
    """Columns 16h + 8c + j of t go to x_j[:, h, c]; j = 4a + 2b + e splits as the last three axes."""
    c0, c1 = tl.split(tl.reshape(t, (BM, H, 2, 2, 2, 2)))  # e
    c00, c01 = tl.split(c0)  # b
    c10, c11 = tl.split(c1)
    x0, x4 = tl.split(c00)  # a
    x2, x6 = tl.split(c01)
    x1, x5 = tl.split(c10)
    x3, x7 = tl.split(c11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _join8(x0, x1, x2, x3, x4, x5, x6, x7, BM: tl.constexpr, H: tl.constexpr):
    """The inverse of _split8: [BM, 16·H]."""
    even = tl.join(tl.join(x0, x4), tl.join(x2, x6))
    odd = tl.join(tl.join(x1, x5), tl.join(x3, x7))
    return tl.reshape(tl.join(even, odd), (BM, 16 * H))


@triton.jit
def _join4(b0, b1, b2, b3, BM: tl.constexpr, H: tl.constexpr):
    """Four per-chunk bytes [BM, H, 2] -> [BM, 8·H], byte i of chunk c at column 4c + i."""
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BM, 8 * H))


# --- one quantized stage -----------------------------------------------------------------------------------------
@triton.jit
def _stage(x0, x1, x2, x3, x4, x5, x6, x7, amax, codes_ptr, scales_ptr, rows, pid_k, M, Kp,
           BLOCK: tl.constexpr, FMT: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, PACKED: tl.constexpr):
    """Block-quantize the tile (block maxima `amax` [BM, H], as bits), store its packed payload if asked, and
    return the 8 dequantized tensors."""
    s, inv = _block_scale(amax, FMT)
    s, inv = s[:, :, None], inv[:, :, None]
    v0, v1, v2, v3, v4, v5, v6, v7 = x0 * inv, x1 * inv, x2 * inv, x3 * inv, x4 * inv, x5 * inv, x6 * inv, x7 * inv
    if PACKED:
        b = _join4(_code(v0, s) | (_code(v1, s) << 4), _code(v2, s) | (_code(v3, s) << 4),
                   _code(v4, s) | (_code(v5, s) << 4), _code(v6, s) | (_code(v7, s) << 4), BM, H)
        byte = pid_k * 8 * H + tl.arange(0, 8 * H)
        tl.store(codes_ptr + rows[:, None].to(tl.int64) * (Kp // 2) + byte[None, :], b.to(tl.uint8),
                 mask=(rows < M)[:, None] & (byte < Kp // 2)[None, :])
        sc = _scale_code(tl.reshape(s, (BM, H)), FMT)
        per_row = Kp // BLOCK
        if BLOCK == 32:
            sc = tl.max(tl.reshape(sc, (BM, H // 2, 2)), axis=2)
            blk = pid_k * (H // 2) + tl.arange(0, H // 2)
        else:
            blk = pid_k * H + tl.arange(0, H)
        tl.store(scales_ptr + rows[:, None].to(tl.int64) * per_row + blk[None, :], sc.to(tl.uint8),
                 mask=(rows < M)[:, None] & (blk < per_row)[None, :])
    return (_dequantize(v0, s), _dequantize(v1, s), _dequantize(v2, s), _dequantize(v3, s), _dequantize(v4, s),
            _dequantize(v5, s), _dequantize(v6, s), _dequantize(v7, s))


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, M, K, stride_xm, PER_ROW: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """The finite max |x| as int32 bits: per row (one program per BM rows) into amax_ptr[:M], or over the tensor
    into amax_ptr[0]. Over the tensor, programs stride over the tiles and meet in a state of two words,
    amax_ptr[1:3], zero when the pass starts: each atomic-maxes its part into amax_ptr[1] and draws a ticket from
    amax_ptr[2]; the program drawing the last moves the maximum to amax_ptr[0] and zeroes the state again, so a
    state kept from call to call needs no zeroing launch of its own (one kernel and one allocation fewer a call)."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    nk = tl.cdiv(K, BK)
    if PER_ROW:
        start, stop, step = pid * nk, pid * nk + nk, 1
    else:
        start, stop, step = pid, tl.cdiv(M, BM) * nk, nprog
    acc = _finite_max_zeros(x_ptr, BM, BK)
    for t in range(start, stop, step):
        rows = (t // nk) * BM + tl.arange(0, BM)
        cols = (t % nk) * BK + tl.arange(0, BK)
        acc = _finite_max_step(acc, tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                                            mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0))
    if PER_ROW:
        rows = pid * BM + tl.arange(0, BM)
        tl.store(amax_ptr + rows, _finite_max_bits(acc, 1), mask=rows < M)
    else:
        tl.atomic_max(amax_ptr + 1, tl.max(_finite_max_bits(acc, 1), axis=0), sem="relaxed")
        # the ticket is acq_rel (releases this program's maximum, acquires every earlier holder's): the last
        # ticket's holder sees every program's maximum; the other atomics need no fences of their own
        if tl.atomic_add(amax_ptr + 2, 1) == nprog - 1:
            tl.store(amax_ptr, tl.atomic_xchg(amax_ptr + 1, 0, sem="relaxed"))
            tl.store(amax_ptr + 2, 0)


@triton.jit
def _rows_amax_bits(x_ptr, rows, M, stride_xm, BM: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr):
    """The finite max |x| of each of `rows` [BM] as int32 bits (rows past M: row M - 1's), read BK columns at a
    time: how a program of a small call finds the tensor scale itself instead of waiting for _amax_kernel. K comes
    as the constexpr KC so the loop unrolls and every load is in flight at once, not one L2 round trip per step
    (H200, M = 1, K = 14336: 4.1 against 4.9 µs). Reads past the edges are clamped to the last row and column, not
    masked: a maximum does not mind repeats, and unmasked loads need no zeroed registers to land in."""
    acc = _finite_max_zeros(x_ptr, BM, BK)
    base = x_ptr + tl.minimum(rows, M - 1)[:, None].to(tl.int64) * stride_xm
    for k0 in tl.static_range(0, KC, BK):
        cols = k0 + tl.arange(0, BK)
        if k0 + BK > KC:
            cols = tl.minimum(cols, KC - 1)
        acc = _finite_max_step(acc, tl.load(base + cols[None, :]))
    return _finite_max_bits(acc, 1)


@triton.jit
def _tiled_offsets(rows, cols, K, T: tl.constexpr, PLACED: tl.constexpr):
    """Where (row, col) of the values goes in the wgmma kernel's tiled activation (kernels/cuda_wgmma.py,
    tiled_activation and chunk_order): tiles of T rows, each tile's chunks of 128 columns one after another, each
    chunk its B buffer's image."""
    t, e = rows % T, cols % 128
    q, v, w = e >> 5, (e >> 3) & 3, e & 7
    if PLACED:
        i, b = w >> 1, w & 1
    else:
        i, b = w & 3, w >> 2
    in_chunk = (2 * v + (i >> 1)) * (16 * T) + (i & 1) * (8 * T) + 2 * q + b
    chunk = (rows // T).to(tl.int64)[:, None] * (K // 128) + (cols // 128)[None, :]
    return chunk * (T * 128) + ((t >> 3) * 64 + (t & 7) * 8)[:, None] + in_chunk[None, :]


@triton.jit
def _prepare_kernel(x_ptr, amax_ptr, scale_ptr, out_ptr, M, K, stride_xm, stride_om,
                    codes1_ptr, scales1_ptr, idx_ptr, codes2_ptr, scales2_ptr, Kp1, Kp2, idx_bytes,
                    PER_ROW: tl.constexpr, TENSOR_SCALE: tl.constexpr, ROUND_INPUT: tl.constexpr,
                    MASK1: tl.constexpr, BLOCK1: tl.constexpr, TWO_STAGES: tl.constexpr, BLOCK2: tl.constexpr,
                    FMT: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, PACKED: tl.constexpr,
                    SELF_AMAX: tl.constexpr, AMAX_BM: tl.constexpr, AMAX_BK: tl.constexpr, KC: tl.constexpr,
                    PDL: tl.constexpr, TILE: tl.constexpr = 0, TILE_PLACED: tl.constexpr = False):
    if PDL:  # a GEMM launched after this kernel with programmatic dependent launch may start now (it waits for
        _launch_dependents()  # this kernel's output itself): its launch and set-up overlap this kernel
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * 16 * H + tl.arange(0, 16 * H)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    # columns past K read 0 (the reference's zero padding)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=inside, other=0.0)
    x = x.to(tl.float32)
    # Xs = bf16(X / s_x), s_x = max(amax / 2688, 1e-9) (SPEC §3); or bf16(X) without a tensor scale
    if TENSOR_SCALE:
        if PER_ROW:
            if SELF_AMAX:  # each program reads its own rows in full (a small call: one launch instead of two)
                amax = _rows_amax_bits(x_ptr, rows, M, stride_xm, BM, AMAX_BK, KC).to(tl.float32, bitcast=True)
            else:
                amax = tl.load(amax_ptr + rows, mask=rows < M, other=0).to(tl.float32, bitcast=True)
            s = tl.maximum(tl.math.div_rn(amax, _DIVISOR), _FLOOR)
            if pid_k == 0:
                tl.store(scale_ptr + rows, s, mask=rows < M)
            x = round_bf16(div_ieee(x, s[:, None]))
        else:
            if SELF_AMAX:  # each program reads the whole (small) X
                bits = tl.zeros((AMAX_BM,), dtype=tl.int32)
                for r0 in range(0, M, AMAX_BM):
                    bits = tl.maximum(bits, _rows_amax_bits(x_ptr, r0 + tl.arange(0, AMAX_BM), M, stride_xm, AMAX_BM,
                                                            AMAX_BK, KC))
                amax = tl.max(bits, axis=0).to(tl.float32, bitcast=True)
            else:
                amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
            s = tl.maximum(tl.math.div_rn(amax, _DIVISOR), _FLOOR)
            if (pid_m == 0) & (pid_k == 0):
                tl.store(scale_ptr, s)
            x = round_bf16(div_ieee(x, s))
    elif ROUND_INPUT:
        x = round_bf16(x)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x, BM, H)

    # stage 1: optional mask, then block quantization
    a0, a1, a2, a3 = _abs_bits(x0), _abs_bits(x1), _abs_bits(x2), _abs_bits(x3)
    a4, a5, a6, a7 = _abs_bits(x4), _abs_bits(x5), _abs_bits(x6), _abs_bits(x7)
    s0, s1, s2, s3, s4, s5, s6, s7 = x0, x1, x2, x3, x4, x5, x6, x7
    # mask scores are |x| bits, where NaN > Inf > every finite value: the reference's order (NaN is kept, visible)
    if MASK1 == 1:  # pair-4:8: score the 4 pairs of each chunk by their larger |x|
        k0, k1, k2, k3 = _keep_two(tl.maximum(a0, a1), tl.maximum(a2, a3), tl.maximum(a4, a5), tl.maximum(a6, a7))
        s0, s1 = tl.where(k0, x0, 0.0), tl.where(k0, x1, 0.0)
        s2, s3 = tl.where(k1, x2, 0.0), tl.where(k1, x3, 0.0)
        s4, s5 = tl.where(k2, x4, 0.0), tl.where(k2, x5, 0.0)
        s6, s7 = tl.where(k3, x6, 0.0), tl.where(k3, x7, 0.0)
    if MASK1 == 2:  # 2:4 on each half of the chunk
        k0, k1, k2, k3 = _keep_two(a0, a1, a2, a3)
        k4, k5, k6, k7 = _keep_two(a4, a5, a6, a7)
        s0, s1, s2, s3 = tl.where(k0, x0, 0.0), tl.where(k1, x1, 0.0), tl.where(k2, x2, 0.0), tl.where(k3, x3, 0.0)
        s4, s5, s6, s7 = tl.where(k4, x4, 0.0), tl.where(k5, x5, 0.0), tl.where(k6, x6, 0.0), tl.where(k7, x7, 0.0)
    amax1 = _half_amax(a0, a1, a2, a3, a4, a5, a6, a7, BLOCK1, BM, H)  # the masks keep each block's maximum
    d0, d1, d2, d3, d4, d5, d6, d7 = _stage(s0, s1, s2, s3, s4, s5, s6, s7, amax1, codes1_ptr, scales1_ptr, rows,
                                            pid_k, M, Kp1, BLOCK1, FMT, BM, H, PACKED)
    if PACKED and MASK1 != 0:
        chunk = pid_k * 2 * H + tl.arange(0, 2 * H)  # the 8-element chunks of this tile
        if MASK1 == 1:  # the two kept pair indices of each chunk, 2 bits each; two chunks per byte
            nib = tl.where((tl.reshape(chunk, (H, 2)) * 8 < K)[None, :, :], _kept_nibble(k0, k1, k2, k3), 0)
            byte = tl.sum(nib << (tl.arange(0, 2) * 4)[None, None, :], axis=2)
            col = pid_k * H + tl.arange(0, H)
        else:  # 2:4: each chunk is two 4-element groups, 4 indices = one byte
            hi = tl.where((tl.reshape(chunk, (H, 2)) * 8 + 4 < K)[None, :, :], _kept_nibble(k4, k5, k6, k7), 0)
            byte = tl.reshape(_kept_nibble(k0, k1, k2, k3) | (hi << 4), (BM, 2 * H))
            col = chunk
        tl.store(idx_ptr + rows[:, None].to(tl.int64) * idx_bytes + col[None, :], byte.to(tl.uint8),
                 mask=(rows < M)[:, None] & (col < idx_bytes)[None, :])

    # stage 2: the fp32 residual, dense
    if TWO_STAGES:
        r0, r1, r2, r3, r4, r5, r6, r7 = x0 - d0, x1 - d1, x2 - d2, x3 - d3, x4 - d4, x5 - d5, x6 - d6, x7 - d7
        amax2 = _half_amax(_abs_bits(r0), _abs_bits(r1), _abs_bits(r2), _abs_bits(r3), _abs_bits(r4),
                           _abs_bits(r5), _abs_bits(r6), _abs_bits(r7), BLOCK2, BM, H)
        e0, e1, e2, e3, e4, e5, e6, e7 = _stage(r0, r1, r2, r3, r4, r5, r6, r7, amax2, codes2_ptr, scales2_ptr,
                                                rows, pid_k, M, Kp2, BLOCK2, FMT, BM, H, PACKED)
        d0, d1, d2, d3, d4, d5, d6, d7 = d0 + e0, d1 + e1, d2 + e2, d3 + e3, d4 + e4, d5 + e5, d6 + e6, d7 + e7

    out = cast_rne(_join8(d0, d1, d2, d3, d4, d5, d6, d7, BM, H), out_ptr.dtype.element_ty)
    if TILE:
        offsets = _tiled_offsets(rows, cols, K, TILE, TILE_PLACED)
    else:
        offsets = rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptr + offsets, out, mask=inside)


# --- launch ------------------------------------------------------------------------------------------------------
_TILE = dict(BM=8, H=8, num_warps=4)  # rows × halves of 16 per program; chosen on the H200 (docs/PERF.md)
SELF_AMAX_ELEMENTS = 65536  # up to here (8B decode: batch 16 at K = 4096, 4 at 14336) one launch finds the amax itself
SELF_AMAX_TILE = 4096  # elements per load of that re-read (rows × columns)
_AMAX = {per_row: Constexprs(PER_ROW=per_row, BM=8, BK=512, num_warps=4) for per_row in (False, True)}  # the amax pass


@functools.lru_cache(maxsize=None)
def _default_tile(m: int, k: int) -> dict:
    """Below 8 rows, tiles of the next power of two of rows and 256 columns (16 for one row), so no program
    computes rows that are not there (H200: 2.2 against 3.2 µs at M = 1, 3.2 against 4.2 at M = 4, K = 4096).
    From 4 rows, where every program re-reads more than 16384 elements for the amax (a self-amax X), 8 warps and
    256 columns up to 8 rows, 128 above (H100, `python benchmarks/bench_prepare.py --small-m-tiles`: 5.13 -> 3.60
    µs at 8 × 4096, 5.51 -> 5.08 at 16 × 4096, 5.71 -> 4.80 at 4 × 14336, the last two once the amax pass gave way
    to the re-read)."""
    bm = min(triton.next_power_of_2(m), _TILE["BM"])
    if m >= 4 and 16384 < m * k <= SELF_AMAX_ELEMENTS:
        return dict(BM=bm, H=16 if m <= 8 else 8, num_warps=8)
    if m >= _TILE["BM"]:
        return _TILE
    return dict(BM=bm, H=max(16 // bm, 4), num_warps=4)


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that depends only on the recipe and the shapes, worked out once (the eager
    per-call cost is then the output allocations and the launches)."""

    per_row: bool
    tensor_scale: bool
    self_amax: bool
    amax_grid: tuple[int, ...] | None  # the separate amax pass, if any
    grid: tuple[int, int]
    rows: int  # the values' rows: m, or m up to whole tiles of a tiled layout
    kp: tuple[int, ...]  # each stage's K, padded to whole blocks
    blocks: tuple[int, ...]
    fmts: tuple[str, ...]
    mask: str | None
    idx_bytes: int
    constexprs: Constexprs
    amax_launch: TritonLaunch | None  # the amax pass's launch, if any, and the main kernel's
    main_launch: TritonLaunch


def _check_supported(recipe: Recipe) -> None:
    if not supports(recipe):
        raise ValueError(f"the fused kernel does not implement recipe {recipe.name!r}; use the reference backend")


@functools.lru_cache(maxsize=4096)
def _plan(recipe: Recipe, m: int, k: int, round_input: bool, packed: bool, tile: tuple, self_amax: bool | None,
          device: tuple[int, bool], given_amax: bool = False, tiled: tuple[int, bool] | None = None) -> _Plan:
    """`given_amax`: the caller passes the whole input's amax (x a K-slice of it), so the kernel neither finds it
    itself nor has a pass find it. `tiled` (tokens, placed): the values in the wgmma kernel's tiled layout
    (kernels/cuda_wgmma.py's tiled_activation), K a multiple of 128."""
    _check_supported(recipe)  # here, once per recipe and shape (an exception is not cached: every call)
    if tiled and (k % 128 or packed):
        raise ValueError(f"a tiled activation needs K a multiple of 128 (got {k}) and the values alone")
    sms, pdl = device
    bm, h, warps = tile
    stages = recipe.stages
    tensor_scale = recipe.uses_tensor_scale
    per_row = recipe.tensor_scale_per_row
    self_amax = tensor_scale and not given_amax and (m * k <= SELF_AMAX_ELEMENTS if self_amax is None else self_amax)
    amax_grid = None
    if tensor_scale and not self_amax and not given_amax:
        amax_grid = (triton.cdiv(m, 8),) if per_row else (min(triton.cdiv(m, 8) * triton.cdiv(k, 512), 16 * sms),)
    spec = masks.parse_mask(stages[0].mask) if stages[0].mask else None
    amax_bm = bm if per_row else min(triton.next_power_of_2(m), 16)
    # the re-read's width, halved up to twice where that divides K: no clamped last load (H100, 1 x 14336: 2.73
    # against 3.04 µs)
    amax_bk = SELF_AMAX_TILE // amax_bm
    amax_bk = next((bk for bk in (amax_bk, amax_bk // 2, amax_bk // 4) if k % bk == 0), amax_bk)
    constexprs = Constexprs(
        PER_ROW=per_row, TENSOR_SCALE=tensor_scale, ROUND_INPUT=round_input, MASK1=_MASK[stages[0].mask],
        BLOCK1=stages[0].block, TWO_STAGES=len(stages) == 2, BLOCK2=stages[-1].block, FMT=_FMT[stages[0].fmt],
        BM=bm, H=h, PACKED=packed, SELF_AMAX=self_amax, AMAX_BM=amax_bm, AMAX_BK=amax_bk,
        KC=k if self_amax else 0, PDL=pdl, num_warps=warps, TILE=tiled[0] if tiled else 0,
        TILE_PLACED=bool(tiled and tiled[1]))
    grid = (triton.cdiv(m, bm), triton.cdiv(k, 16 * h))
    return _Plan(per_row, tensor_scale, self_amax, amax_grid, grid, -(-m // tiled[0]) * tiled[0] if tiled else m,
                 tuple(-(-k // st.block) * st.block for st in stages), tuple(st.block for st in stages),
                 tuple(st.fmt for st in stages), str(spec) if spec else None,
                 -(-(-(-k // spec.chunk)) * spec.n // 4) if spec else 0, constexprs,
                 None if amax_grid is None else TritonLaunch(_amax_kernel, amax_grid, _AMAX[per_row]),
                 TritonLaunch(_prepare_kernel, grid, constexprs))


def _bound(plan: _Plan) -> _Plan:
    """The plan with its launches bound (TritonLaunch): for one caller whose calls share one specialization."""
    return replace(plan, main_launch=plan.main_launch.bound(),
                   amax_launch=None if plan.amax_launch is None else plan.amax_launch.bound())


@functools.lru_cache
def _device(device: torch.device) -> tuple[int, bool]:
    """(multiprocessors, whether the kernel triggers programmatic dependent launch: compiled, Hopper or later)."""
    if INTERPRETED:
        return 4, False
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, _launch_dependents is not None and props.major >= 9


def _launch(x2d: torch.Tensor, recipe: Recipe, out_dtype: torch.dtype, packed: bool,
            tile: dict | None = None, self_amax: bool | None = None, amax: torch.Tensor | None = None,
            tiled: tuple[int, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[QTensor, ...]]:
    """One call of the kernels. `self_amax` (default: X has at most SELF_AMAX_ELEMENTS) has every program of
    _prepare_kernel find the tensor scale's amax itself, skipping the amax pass and its state: at decode
    sizes a launch costs more than re-reading a few KB of X from L2. A given `amax` (the whole input's, x2d a
    K-slice of it: Recipe.prepare_activation) takes the place of both."""
    require_cuda(x2d, "the triton backend", "use backend='reference' (or TRITON_INTERPRET=1 to run the kernel in "
                 "Triton's interpreter)")
    if amax is not None:
        recipe.check_amax(amax, x2d.shape[0])
    if x2d.numel() == 0:  # nothing to launch; the reference handles empty shapes
        _check_supported(recipe)
        act = recipe.prepare_activation(x2d, amax=amax)
        return act.values.to(out_dtype), act.scale, act.parts
    m, k = x2d.shape
    x = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    tile = tile or _default_tile(m, k)
    plan = _plan(recipe, m, k, x.dtype != torch.bfloat16, packed, (tile["BM"], tile["H"], tile["num_warps"]),
                 self_amax, _device(x.device), amax is not None, tiled)
    return _run(plan, x, m, k, x.stride(0), out_dtype, packed, amax)


def _outputs(plan: _Plan, m: int, k: int, out_dtype: torch.dtype, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the main kernel writes: the values [m, k] (tiled: [plan.rows, k], the rows past m never written) and
    s_x ([m, 1] or [1, 1]; without a tensor scale a 1 the kernel skips)."""
    out = torch.empty(plan.rows, k, dtype=out_dtype, device=device)
    if plan.tensor_scale:
        return out, torch.empty(m if plan.per_row else 1, 1, dtype=torch.float32, device=device)
    return out, torch.ones(1, 1, dtype=torch.float32, device=device)


def _amax_words(plan: _Plan, m: int, device: torch.device) -> torch.Tensor:
    """What the amax pass writes (_amax_kernel): each row's amax, or the tensor's and its state of two words,
    zeroed."""
    if plan.per_row:
        return torch.empty(m, dtype=torch.int32, device=device)
    return torch.zeros(3, dtype=torch.int32, device=device)


def _kept_amax_words(plan: _Plan, m: int, device: torch.device) -> torch.Tensor | None:
    """_amax_words for a launch plan to keep on the current stream, or None inside a CUDA-graph capture, where a
    state's zeroing would only be recorded, not done: there each call makes its own (a node of the graph)."""
    if not plan.per_row and not INTERPRETED and torch.cuda.is_current_stream_capturing():
        return None
    return _amax_words(plan, m, device)


def _run(plan: _Plan, x: torch.Tensor, m: int, k: int, stride_xm: int, out_dtype: torch.dtype, packed: bool,
         amax: torch.Tensor | None, outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
         amax_words: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[QTensor, ...]]:
    """The launches of a plan on x, m rows of k elements `stride_xm` apart (unit column stride), its arguments
    checked by the caller; into `outputs` (_outputs' tensors, reused by a launch plan) where given. `amax_words`:
    the amax pass's (_amax_words; a tensor-wide state left zeroed by the pass that last used it), kept by a launch
    plan; else made for this call."""
    dev = x.device
    out, scale = outputs or _outputs(plan, m, k, out_dtype, dev)
    amax_bits = scale  # a placeholder the kernel does not read (self_amax, or no tensor scale)
    if plan.tensor_scale:  # s_x is written by the main kernel
        if amax is not None:  # the kernel reads an amax as the bits of a non-negative float
            amax_bits = amax.to(device=dev, dtype=torch.float32).reshape(-1).contiguous().view(torch.int32)
        elif plan.amax_grid is not None:
            amax_bits = _amax_words(plan, m, dev) if amax_words is None else amax_words
            plan.amax_launch((x, amax_bits, m, k, stride_xm))
    payload = [(torch.empty(m, kpad // 2, dtype=torch.uint8, device=dev),
                torch.empty(m, kpad // block, dtype=torch.uint8, device=dev)) if packed else (out, out)
               for kpad, block in zip(plan.kp, plan.blocks)]
    indices = torch.empty(m, plan.idx_bytes, dtype=torch.uint8, device=dev) if packed and plan.mask else out
    codes2, scales2 = payload[-1]
    plan.main_launch((x, amax_bits, scale, out, m, k, stride_xm, k, payload[0][0], payload[0][1],
                      indices, codes2, scales2, plan.kp[0], plan.kp[-1], plan.idx_bytes))
    parts = ()
    if packed:
        parts = tuple(
            QTensor(codes, scales, fmt, block, (m, k), mask=plan.mask if i == 0 else None,
                    indices=indices if i == 0 and plan.mask else None)
            for i, (fmt, block, (codes, scales)) in enumerate(zip(plan.fmts, plan.blocks, payload)))
    return out, scale, parts


def dequantized_launcher(recipe: Recipe, m: int, k: int, x_dtype: torch.dtype, device: torch.device,
                         tiled: tuple[int, bool] | None = None
                         ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, tuple]]:
    """prepare_dequantized's launches for contiguous inputs [..., k] of m rows, of x_dtype on `device` (bf16
    values [m, k]), worked out once: an eager layer's plan, whose caller guarantees the input (its leading dims
    are not flattened by a view: the kernel reads rows k apart). Returns x -> (values, scale, ()). Its launches
    are bound (TritonLaunch) for inputs aligned to 16 bytes; others take the general launches. The values and
    scale are written into the same tensors call after call on a stream (launch.plan_buffers; decode sizes): the
    caller reads them before its next call on that stream; so is the amax pass's state, which the pass leaves
    zeroed (_amax_kernel). `tiled`: as prepare_dequantized's."""
    _check_supported(recipe)
    tile = _default_tile(m, k)
    plan = _plan(recipe, m, k, x_dtype != torch.bfloat16, False, (tile["BM"], tile["H"], tile["num_warps"]), None,
                 _device(device), False, tiled)
    bound = _bound(plan)
    device = torch.device(device)
    index = device.index or 0
    nbytes = 2 * plan.rows * k + 4 * m
    outputs = plan_buffers(functools.partial(_outputs, plan, m, k, torch.bfloat16, device), nbytes, index)
    amax_words = (plan_buffers(functools.partial(_kept_amax_words, plan, m, device), 4 * m + 12, index)
                  if plan.amax_launch is not None else lambda: None)
    # launches whose every argument but x is the same call after call (the tensors they write kept by the plan):
    # fixed after a thread's first call on a stream. Under a launch hook (a profiler) launches take Triton's path,
    # which calls it.
    fixed = FixedLaunches(index) if not INTERPRETED and nbytes <= PLAN_BUFFER_BYTES else None

    def general(launches: _Plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The plan's launches (bound or not) on x, into the plan's tensors."""
        return _run(launches, x, m, k, k, torch.bfloat16, False, None, outputs(), amax_words())

    def first_call(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """This thread's first call on this stream: the bound launches, their arguments recorded, then fixed where
        they resolved to the driver's and every tensor they write is the plan's to keep (else the bound launches
        stay, each call). Inside a CUDA-graph capture nothing is decided (the amax state is not kept there)."""
        buffers, words = outputs(), amax_words()
        recordings = {name: _Recording(launch) for name, launch in (("amax_launch", bound.amax_launch),
                                                                     ("main_launch", bound.main_launch)) if launch}
        out, scale, parts = _run(replace(bound, **recordings), x, m, k, k, torch.bfloat16, False, None, buffers,
                                 words)
        if torch.cuda.is_current_stream_capturing():
            return out, scale, parts
        kept = buffers is outputs() and (plan.amax_launch is None or words is amax_words())
        stream = torch._C._cuda_getCurrentRawStream(index)
        launches = tuple(r.launch.fixed(r.args, stream, (0,)) for r in recordings.values()) if kept else (None,)
        fixed.put((None, None, None) if None in launches else (launches, out, scale))
        return out, scale, parts

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if x.data_ptr() & 15:
            return general(plan, x)
        if fixed is None or launch_hooks_set() or torch._C._cuda_getDevice() != index:
            return general(bound, x)
        hit = fixed.get()
        if hit is None:
            return first_call(x)
        launches, out, scale = hit
        if launches is None:
            return general(bound, x)
        x_ptr = x.data_ptr()
        for launch in launches:  # the amax pass, if any, then the main kernel
            launch(x_ptr)
        return out, scale, ()

    return run


class _Recording:
    """A launch that keeps the arguments of its call (the first call of a fixed launch's thread and stream)."""

    def __init__(self, launch: TritonLaunch):
        self.launch, self.args = launch, ()

    def __call__(self, args: Sequence) -> None:
        self.args = args
        self.launch(args)


def prepare_dequantized(x2d: torch.Tensor, recipe: Recipe, out_dtype: torch.dtype = torch.float32,
                        amax: torch.Tensor | None = None, tiled: tuple[int, bool] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ deq(Qᵢ) [M, K] in out_dtype, activation scale s_x [1, 1] or [M, 1]) — the same as
    recipe.prepare_activation(x2d, amax=amax).values / .scale, from one fused pass (plus the amax pass for s_x,
    unless the whole input's `amax` is given). `tiled` (tokens, placed): the values written in the layout the
    wgmma kernel's bulk copies read (kernels/cuda_wgmma.py's tiled_activation; rows past M left unwritten)."""
    values, scale, _ = _launch(x2d, recipe, out_dtype, packed=False, amax=amax, tiled=tiled)
    return values, scale


def prepare_packed(x2d: torch.Tensor, recipe: Recipe) -> QActivation:
    """The packed payloads of every stage (codes, block scale codes, the sparse stage's 2-bit indices; layout in
    docs/FORMAT.md) together with the fp32 dequantized sum: a QActivation equal, field for field, to
    recipe.prepare_activation(x2d)."""
    values, scale, parts = _launch(x2d, recipe, torch.float32, packed=True)
    return QActivation(parts, values, scale)
