"""Fused Triton activation preparation: X -> deq(Q₁) + deq(Q₂) in one pass over X (SPEC §5, DESIGN kernels/), and,
in packed mode, the stage payloads themselves (codes, scale codes, 2-bit mask indices; docs/FORMAT.md).

One program handles BLOCK_M rows × (2·SUPER) halves of 16 columns. Every element is held as one of 8 register
tensors x_j (j = its position in its 8-element chunk), each shaped [BLOCK_M, halves, 2 chunks], so the masks are
elementwise comparisons between the x_j, and the 16- and 32-element block maxima are small reductions.

Bit-exactness with the torch reference (quant.py, masks.py) rests on four choices:
- divisions use `div_rn` (IEEE, correctly rounded), as torch does;
- bf16 rounding is done on the bits (round to nearest even), not by a cast whose rounding differs between the
  interpreter and the GPU;
- UE4M3 and E2M1 rounding use the add-and-subtract trick: for 0 <= v < c/2^23·2^22, fp32 (v + c) − c rounds v
  to a multiple of c/2^23 with round-to-nearest-even, which is the rounding both formats specify;
- NaN/Inf are tracked as an explicit per-block flag (Triton's max may drop NaN), which sets the block scale to NaN.

Supported cascades: one or two stages of NVFP4 or MXFP4, the first optionally masked (pair-4:8 or 2:4), blocks
of 16 or 32 — that is nvfp4, mxfp4, sharq, sharq-mxfp4, sparse-only and dense-dense. HiF4 stays on the reference
path. Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how CI checks it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import masks
from ..quant import QTensor, nvfp4_tensor_scale
from ..recipes import QActivation, Recipe

_FMT = {"nvfp4": 0, "mxfp4": 1}
_MASK = {None: 0, "pair-4:8": 1, "2:4": 2}


def supports(recipe: Recipe) -> bool:
    """Whether the fused kernel implements this recipe's activation cascade."""
    stages = recipe.stages
    return (
        0 < len(stages) <= 2
        and recipe.outlier_fraction == 0
        and all(s.fmt in _FMT and s.block in (16, 32) for s in stages)
        and stages[0].mask in _MASK
        and all(s.mask is None for s in stages[1:])
        and len({s.fmt for s in stages}) == 1
    )


@triton.jit
def _div(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def _round_to_quantum(v, quantum_exp):
    """Round v >= 0 to a multiple of 2^quantum_exp (RNE): (v + c) − c with c = 2^(quantum_exp + 23)."""
    c = ((quantum_exp + 23 + 127) << 23).to(tl.float32, bitcast=True)
    return (v + c) - c


@triton.jit
def _bf16_rne(v):
    """Round fp32 to the nearest bf16 value, ties to even, returned as fp32 (the integer rounding of the top 16
    bits; the interpreter's own bf16 cast truncates). NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v == v, bits.to(tl.float32, bitcast=True), v)


@triton.jit
def _e2m1(v):
    """RNE onto the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, v already clamped to [-6, 6]. The sign bit is copied,
    so -0 stays -0 (code 8), as the reference decodes it."""
    a = tl.abs(v)
    qexp = tl.where(a < 2.0, -1, tl.where(a < 4.0, 0, 1))
    r = _round_to_quantum(a, qexp)
    return tl.where((v.to(tl.int32, bitcast=True) >> 31) != 0, -r, r)


@triton.jit
def _floor_log2(a):
    """floor(log2 a) for positive finite fp32 a, subnormals included (they are scaled by 2^64 first)."""
    tiny = a < 1.1754943508222875e-38
    scaled = tl.where(tiny, a * 18446744073709551616.0, a)
    e = ((scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.where(tiny, e - 64, e)


@triton.jit
def _block_scale(amax, bad, FMT: tl.constexpr):
    """The dequantized block scale: UE4M3 of clamp(amax/6) (NVFP4) or E8M0 2^(floor(log2 amax) − 2) (MXFP4);
    NaN where the block holds a non-finite value."""
    if FMT == 0:
        s = tl.minimum(tl.maximum(_div(amax, 6.0), 0.001953125), 448.0)
        s = _round_to_quantum(s, tl.maximum(_floor_log2(s) - 3, -9))
    else:
        e = tl.where(amax > 0, _floor_log2(tl.where(amax > 0, amax, 1.0)) - 2, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        s = tl.where(e > -127, ((e + 127) << 23).to(tl.float32, bitcast=True), 5.877471754111438e-39)
    return tl.where(bad > 0, float("nan"), s)


@triton.jit
def _rank_keep(s0, s1, s2, s3):
    """Keep the 2 best of 4 scores, ties to the lower index (s_j ahead of s_i when s_j > s_i, or equal and j < i)."""
    r0 = (s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)
    r1 = (s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)
    r2 = (s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)
    r3 = (s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)
    return r0 < 2, r1 < 2, r2 < 2, r3 < 2


@triton.jit
def _score(v):
    a = tl.abs(v)
    return tl.where(a == a, a, float("inf"))  # NaN ranks highest: it is kept and stays visible


@triton.jit
def _nonfinite(v):
    return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)


@triton.jit
def _quantize8(x0, x1, x2, x3, x4, x5, x6, x7, BLOCK: tl.constexpr, FMT: tl.constexpr,
               BM: tl.constexpr, H: tl.constexpr):
    """Block-quantize the 8 position tensors ([BM, H, 2] each) with blocks of 16 (one half) or 32 (two halves);
    returns the 8 dequantized tensors."""
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                      tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    bad = tl.maximum(tl.maximum(tl.maximum(_nonfinite(x0), _nonfinite(x1)), tl.maximum(_nonfinite(x2), _nonfinite(x3))),
                     tl.maximum(tl.maximum(_nonfinite(x4), _nonfinite(x5)), tl.maximum(_nonfinite(x6), _nonfinite(x7))))
    amax = tl.max(tl.where(bad > 0, 0.0, amax), axis=2)  # [BM, H]: per 16-element half
    bad = tl.max(bad, axis=2)
    if BLOCK == 32:  # pairs of halves share one scale
        amax = tl.reshape(tl.broadcast_to(tl.max(tl.reshape(amax, (BM, H // 2, 2)), axis=2)[:, :, None],
                                          (BM, H // 2, 2)), (BM, H))
        bad = tl.reshape(tl.broadcast_to(tl.max(tl.reshape(bad, (BM, H // 2, 2)), axis=2)[:, :, None],
                                         (BM, H // 2, 2)), (BM, H))
    s = _block_scale(amax, bad, FMT)[:, :, None]
    inv = _div(1.0, s)
    v0 = tl.minimum(tl.maximum(x0 * inv, -6.0), 6.0)
    v1 = tl.minimum(tl.maximum(x1 * inv, -6.0), 6.0)
    v2 = tl.minimum(tl.maximum(x2 * inv, -6.0), 6.0)
    v3 = tl.minimum(tl.maximum(x3 * inv, -6.0), 6.0)
    v4 = tl.minimum(tl.maximum(x4 * inv, -6.0), 6.0)
    v5 = tl.minimum(tl.maximum(x5 * inv, -6.0), 6.0)
    v6 = tl.minimum(tl.maximum(x6 * inv, -6.0), 6.0)
    v7 = tl.minimum(tl.maximum(x7 * inv, -6.0), 6.0)
    # a NaN scale poisons the whole block, code 0 included (0 * NaN is NaN)
    return (_e2m1(v0) * s, _e2m1(v1) * s, _e2m1(v2) * s, _e2m1(v3) * s, _e2m1(v4) * s, _e2m1(v5) * s,
            _e2m1(v6) * s, _e2m1(v7) * s, v0, v1, v2, v3, v4, v5, v6, v7, s)


@triton.jit
def _code(v):
    """E2M1 code (sign << 3 | magnitude index) of a clamped scaled value, as the reference encodes it (NaN -> 0)."""
    r = tl.abs(_e2m1(v))
    idx = tl.where(r < 2.0, r * 2.0, tl.where(r < 4.0, r + 2.0, r * 0.5 + 4.0)).to(tl.int32)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return tl.where(v == v, idx | (sign << 3), 0)


@triton.jit
def _scale_code(s, FMT: tl.constexpr):
    """The 8-bit code of a block scale value: UE4M3 (NaN 0x7F) or E8M0 (NaN 0xFF)."""
    if FMT == 0:
        e = _floor_log2(tl.where(s == s, s, 1.0))
        normal = ((e + 7) << 3) | ((s * _div(1.0, ((e + 127) << 23).to(tl.float32, bitcast=True)) - 1.0) * 8.0
                                    ).to(tl.int32)
        code = tl.where(s >= 0.015625, normal, (s * 512.0).to(tl.int32))
        return tl.where(s == s, code, 0x7F)
    else:
        return tl.where(s == s, _floor_log2(tl.where(s == s, s, 1.0)) + 127, 0xFF)


@triton.jit
def _store_payload(codes_ptr, scales_ptr, rows, row_ok, rmask, base, halves, Kp, v0, v1, v2, v3, v4, v5, v6, v7, s,
                   BLOCK: tl.constexpr, FMT: tl.constexpr, BM: tl.constexpr, H: tl.constexpr):
    """Store one stage's packed codes (two per byte, even element low) and its block scale codes."""
    crow = codes_ptr + rows[:, None, None].to(tl.int64) * (Kp // 2)
    byte = base // 2
    tl.store(crow + byte + 0, (_code(v0) | (_code(v1) << 4)).to(tl.uint8), mask=row_ok & (base + 0 < Kp))
    tl.store(crow + byte + 1, (_code(v2) | (_code(v3) << 4)).to(tl.uint8), mask=row_ok & (base + 2 < Kp))
    tl.store(crow + byte + 2, (_code(v4) | (_code(v5) << 4)).to(tl.uint8), mask=row_ok & (base + 4 < Kp))
    tl.store(crow + byte + 3, (_code(v6) | (_code(v7) << 4)).to(tl.uint8), mask=row_ok & (base + 6 < Kp))
    sc = tl.max(tl.broadcast_to(_scale_code(s, FMT), (BM, H, 2)), axis=2)  # [BM, H]: one per half
    srow = scales_ptr + rows[:, None].to(tl.int64) * (Kp // BLOCK)
    h = halves[None, :]
    if BLOCK == 32:
        tl.store(srow + h // 2, sc.to(tl.uint8), mask=rmask & (h % 2 == 0) & (h * 16 < Kp))
    else:
        tl.store(srow + h, sc.to(tl.uint8), mask=rmask & (h * 16 < Kp))


@triton.jit
def _prepare_kernel(x_ptr, scale_ptr, out_ptr, M, K, stride_xm, stride_om,
                    codes1_ptr, scales1_ptr, idx_ptr, codes2_ptr, scales2_ptr, Kp1, Kp2, idx_bytes, chunks,
                    PER_ROW: tl.constexpr, TENSOR_SCALE: tl.constexpr,
                    MASK1: tl.constexpr, BLOCK1: tl.constexpr, TWO_STAGES: tl.constexpr, BLOCK2: tl.constexpr,
                    FMT: tl.constexpr, BM: tl.constexpr, H: tl.constexpr, PACKED: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    halves = pid_k * H + tl.arange(0, H)
    chunks = tl.arange(0, 2)
    base = halves[None, :, None] * 16 + chunks[None, None, :] * 8  # [1, H, 2]: first column of each chunk
    row_ok = (rows < M)[:, None, None]
    xrow = x_ptr + rows[:, None, None].to(tl.int64) * stride_xm
    if TENSOR_SCALE:
        if PER_ROW:
            sx = tl.load(scale_ptr + rows, mask=rows < M, other=1.0)[:, None, None]
        else:
            sx = tl.load(scale_ptr)
    # load the 8 positions; columns past K read 0 (the reference's zero padding)
    x0 = tl.load(xrow + base + 0, mask=row_ok & (base + 0 < K), other=0.0).to(tl.float32)
    x1 = tl.load(xrow + base + 1, mask=row_ok & (base + 1 < K), other=0.0).to(tl.float32)
    x2 = tl.load(xrow + base + 2, mask=row_ok & (base + 2 < K), other=0.0).to(tl.float32)
    x3 = tl.load(xrow + base + 3, mask=row_ok & (base + 3 < K), other=0.0).to(tl.float32)
    x4 = tl.load(xrow + base + 4, mask=row_ok & (base + 4 < K), other=0.0).to(tl.float32)
    x5 = tl.load(xrow + base + 5, mask=row_ok & (base + 5 < K), other=0.0).to(tl.float32)
    x6 = tl.load(xrow + base + 6, mask=row_ok & (base + 6 < K), other=0.0).to(tl.float32)
    x7 = tl.load(xrow + base + 7, mask=row_ok & (base + 7 < K), other=0.0).to(tl.float32)
    # Xs = bf16(X / s_x), or bf16(X) without a tensor scale
    if TENSOR_SCALE:
        x0, x1, x2, x3 = _div(x0, sx), _div(x1, sx), _div(x2, sx), _div(x3, sx)
        x4, x5, x6, x7 = _div(x4, sx), _div(x5, sx), _div(x6, sx), _div(x7, sx)
    x0, x1, x2, x3 = _bf16_rne(x0), _bf16_rne(x1), _bf16_rne(x2), _bf16_rne(x3)
    x4, x5, x6, x7 = _bf16_rne(x4), _bf16_rne(x5), _bf16_rne(x6), _bf16_rne(x7)

    # stage 1: optional mask, then block quantization
    s0, s1, s2, s3, s4, s5, s6, s7 = x0, x1, x2, x3, x4, x5, x6, x7
    if MASK1 == 1:  # pair-4:8: score the 4 pairs of each chunk by their larger |x|
        k0, k1, k2, k3 = _rank_keep(tl.maximum(_score(x0), _score(x1)), tl.maximum(_score(x2), _score(x3)),
                                    tl.maximum(_score(x4), _score(x5)), tl.maximum(_score(x6), _score(x7)))
        s0, s1 = tl.where(k0, x0, 0.0), tl.where(k0, x1, 0.0)
        s2, s3 = tl.where(k1, x2, 0.0), tl.where(k1, x3, 0.0)
        s4, s5 = tl.where(k2, x4, 0.0), tl.where(k2, x5, 0.0)
        s6, s7 = tl.where(k3, x6, 0.0), tl.where(k3, x7, 0.0)
    if MASK1 == 2:  # 2:4 on each half of the chunk
        k0, k1, k2, k3 = _rank_keep(_score(x0), _score(x1), _score(x2), _score(x3))
        k4, k5, k6, k7 = _rank_keep(_score(x4), _score(x5), _score(x6), _score(x7))
        s0, s1, s2, s3 = tl.where(k0, x0, 0.0), tl.where(k1, x1, 0.0), tl.where(k2, x2, 0.0), tl.where(k3, x3, 0.0)
        s4, s5, s6, s7 = tl.where(k4, x4, 0.0), tl.where(k5, x5, 0.0), tl.where(k6, x6, 0.0), tl.where(k7, x7, 0.0)
    d0, d1, d2, d3, d4, d5, d6, d7, v0, v1, v2, v3, v4, v5, v6, v7, sc = _quantize8(
        s0, s1, s2, s3, s4, s5, s6, s7, BLOCK1, FMT, BM, H)
    rmask = (rows < M)[:, None]
    if PACKED:
        _store_payload(codes1_ptr, scales1_ptr, rows, row_ok, rmask, base, halves, Kp1, v0, v1, v2, v3, v4, v5,
                       v6, v7, sc, BLOCK1, FMT, BM, H)
        chunk = halves[None, :, None] * 2 + chunks[None, None, :]  # the 8-element chunk's index
        if MASK1 == 1:  # the two kept pair indices of each chunk, 2 bits each; two chunks per byte
            first = tl.where(k0, 0, tl.where(k1, 1, 2))
            second = tl.where(k3, 3, tl.where(k2, 2, 1))
            nib = tl.where(chunk * 8 < K, first | (second << 2), 0)
            byte = tl.sum(nib << (chunks[None, None, :] * 4), axis=2)
            irow = idx_ptr + rows[:, None].to(tl.int64) * idx_bytes
            tl.store(irow + halves[None, :], byte.to(tl.uint8), mask=rmask & (halves[None, :] < idx_bytes))
        if MASK1 == 2:  # 2:4: each 8-element chunk is two 4-element chunks, 4 indices = one byte
            fa = tl.where(k0, 0, tl.where(k1, 1, 2))
            sa = tl.where(k3, 3, tl.where(k2, 2, 1))
            fb = tl.where(k4, 0, tl.where(k5, 1, 2))
            sb = tl.where(k7, 3, tl.where(k6, 2, 1))
            byte = (fa | (sa << 2)) | tl.where(chunk * 8 + 4 < K, (fb << 4) | (sb << 6), 0)
            irow = idx_ptr + rows[:, None, None].to(tl.int64) * idx_bytes
            tl.store(irow + chunk, byte.to(tl.uint8), mask=row_ok & (chunk < idx_bytes))

    # stage 2: the fp32 residual, dense
    if TWO_STAGES:
        e0, e1, e2, e3, e4, e5, e6, e7, v0, v1, v2, v3, v4, v5, v6, v7, sc = _quantize8(
            x0 - d0, x1 - d1, x2 - d2, x3 - d3, x4 - d4, x5 - d5, x6 - d6, x7 - d7, BLOCK2, FMT, BM, H)
        if PACKED:
            _store_payload(codes2_ptr, scales2_ptr, rows, row_ok, rmask, base, halves, Kp2, v0, v1, v2, v3, v4,
                           v5, v6, v7, sc, BLOCK2, FMT, BM, H)
        d0, d1, d2, d3, d4, d5, d6, d7 = d0 + e0, d1 + e1, d2 + e2, d3 + e3, d4 + e4, d5 + e5, d6 + e6, d7 + e7

    orow = out_ptr + rows[:, None, None].to(tl.int64) * stride_om
    ty = out_ptr.dtype.element_ty
    if ty == tl.bfloat16:  # round here, so the cast below is exact everywhere
        d0, d1, d2, d3 = _bf16_rne(d0), _bf16_rne(d1), _bf16_rne(d2), _bf16_rne(d3)
        d4, d5, d6, d7 = _bf16_rne(d4), _bf16_rne(d5), _bf16_rne(d6), _bf16_rne(d7)
    tl.store(orow + base + 0, d0.to(ty), mask=row_ok & (base + 0 < K))
    tl.store(orow + base + 1, d1.to(ty), mask=row_ok & (base + 1 < K))
    tl.store(orow + base + 2, d2.to(ty), mask=row_ok & (base + 2 < K))
    tl.store(orow + base + 3, d3.to(ty), mask=row_ok & (base + 3 < K))
    tl.store(orow + base + 4, d4.to(ty), mask=row_ok & (base + 4 < K))
    tl.store(orow + base + 5, d5.to(ty), mask=row_ok & (base + 5 < K))
    tl.store(orow + base + 6, d6.to(ty), mask=row_ok & (base + 6 < K))
    tl.store(orow + base + 7, d7.to(ty), mask=row_ok & (base + 7 < K))


def _launch(x2d: torch.Tensor, recipe: Recipe, out_dtype: torch.dtype, packed: bool, block_m: int = 16,
            halves: int = 4):
    if not supports(recipe):
        raise ValueError(f"the fused kernel does not implement recipe {recipe.name!r}; use the reference backend")
    if x2d.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton backend runs on CUDA tensors (got {x2d.device}); use backend='reference' "
                         "(or TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)")
    m, k = x2d.shape
    per_row = recipe.scale_granularity == "token"
    if recipe.uses_tensor_scale:
        scale = nvfp4_tensor_scale(x2d, per_row=per_row)
    else:
        scale = torch.ones(1, 1, dtype=torch.float32, device=x2d.device)
    stages = recipe.stages
    two = len(stages) == 2
    dev = x2d.device
    kp = [-(-k // st.block) * st.block for st in stages]
    out = torch.empty(m, k, dtype=out_dtype, device=dev)
    payload = []
    for st, kpad in zip(stages, kp):
        codes = torch.empty(m, kpad // 2, dtype=torch.uint8, device=dev) if packed else out
        scales = torch.empty(m, kpad // st.block, dtype=torch.uint8, device=dev) if packed else out
        payload.append((codes, scales))
    spec = masks.parse_mask(stages[0].mask) if stages[0].mask else None
    chunks = -(-k // spec.chunk) if spec else 0
    idx_bytes = -(-chunks * (spec.n if spec else 0) // 4)
    indices = torch.empty(m, idx_bytes, dtype=torch.uint8, device=dev) if packed and spec else out
    if m and k:
        x = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, 16 * halves))
        codes2, scales2 = payload[1] if two else payload[0]
        _prepare_kernel[grid](
            x, scale.reshape(-1).contiguous(), out, m, k, x.stride(0), out.stride(0),
            payload[0][0], payload[0][1], indices, codes2, scales2, kp[0], kp[-1], idx_bytes, chunks,
            PER_ROW=per_row, TENSOR_SCALE=recipe.uses_tensor_scale, MASK1=_MASK[stages[0].mask],
            BLOCK1=stages[0].block, TWO_STAGES=two, BLOCK2=stages[-1].block, FMT=_FMT[stages[0].fmt], BM=block_m,
            H=halves, PACKED=packed)
    parts = ()
    if packed:
        parts = tuple(
            QTensor(codes, scales, st.fmt, st.block, (m, k),
                    mask=str(spec) if i == 0 and spec else None, indices=indices if i == 0 and spec else None)
            for i, (st, (codes, scales)) in enumerate(zip(stages, payload)))
    return out, scale, parts


def prepare_dequantized(x2d: torch.Tensor, recipe: Recipe, out_dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ deq(Qᵢ) [M, K] in out_dtype, activation scale s_x [1, 1] or [M, 1]) — the same as
    recipe.prepare_activation(x2d).values / .scale, from one fused pass (plus the amax pass for s_x)."""
    values, scale, _ = _launch(x2d, recipe, out_dtype, packed=False)
    return values, scale


def prepare_packed(x2d: torch.Tensor, recipe: Recipe) -> QActivation:
    """The packed payloads of every stage (codes, block scale codes, the sparse stage's 2-bit indices; layout in
    docs/FORMAT.md) together with the fp32 dequantized sum: a QActivation equal, field for field, to
    recipe.prepare_activation(x2d)."""
    values, scale, parts = _launch(x2d, recipe, torch.float32, packed=True)
    return QActivation(parts, values, scale)
