"""The activation prepare (kernels/prepare.py's values: X -> s_x and Σ deq(Qᵢ)) as a CUDA kernel, the same bits.

The Triton kernel spreads a tile over its threads and splits it into the eight places of a chunk in registers, which
costs it about 53 instructions an element (H200, docs/PERF.md). Here a thread takes one run of 32 consecutive
elements of a row — a 32-element block, or two 16-element ones, and four 8-element chunks — so the block maxima,
the masks and both stages are the thread's own arithmetic, with no exchange between threads; the 64 bytes of bf16
are four 16-byte loads and four 16-byte stores.

The tensor scale: from an amax pass (or the caller's amax) by pointer, or, for a small X (decode), found by the
launch itself. Then the grid is one thread-block cluster (Hopper) of up to 8 blocks, one run a thread: each block
reduces its runs' finite |x| maxima in shared memory, the cluster barrier publishes them and every block reads the
others' through distributed shared memory. So the X read for the amax is the one the thread quantizes, one round
trip from memory, where the Triton kernel re-reads all of X in every program.

The arithmetic is the Triton kernel's operation for operation (its docstring says why each is exact): IEEE X / s_x
(div.rn), bf16 by round-to-nearest-even conversion, amax / 6 by a product refined twice, 1/s by the hardware
reciprocal and one Newton step, E2M1 and UE4M3 rounding by adding and subtracting a power of two, |x| maxima on the
bits (NaN > Inf > finite); every sum and product is written as an _rn intrinsic, so the compiler cannot contract
one into an FMA. Compiled by NVRTC through PyTorch like the GEMM kernels; where it is missing, or the call is not
one the kernel takes (`fits`), the Triton kernel runs, and it stays the reference the tests hold this one to."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..quant import NVFP4_TENSOR_DIVISOR, TENSOR_SCALE_FLOOR
from ..recipes import Recipe
from .common import INTERPRETED

NAME = "sharq_prepare"
RUNS = (8, 16, 32)  # elements a thread
THREADS = 256  # a block, where the tensor scale comes by pointer
MAX_THREADS = 1024  # a block of a self-amax launch
CLUSTER_BLOCKS = 8  # the most blocks of a self-amax launch (one cluster: the portable size)
SELF_AMAX_RUNS = CLUSTER_BLOCKS * MAX_THREADS  # the most runs a self-amax launch takes
MAX_ROW_SLOTS = 64  # the most rows of a self-amax launch with a scale per row
_FMT = {"nvfp4": 0, "mxfp4": 1}
_MASK = {None: 0, "pair-4:8": 1, "2:4": 2}
_DTYPE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_broken: list[str] = []  # why the kernel could not be compiled here (then the Triton kernel runs)

_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define INF_BITS 0x7F800000u
__device__ __forceinline__ float f32(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ u32 abs_bits(float f) { return bits(f) & 0x7FFFFFFFu; }
__device__ __forceinline__ float round_bf16(float v) {  // to the nearest bf16 (ties to even), as fp32
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return f32((u32)h << 16);
}
__device__ __forceinline__ float to_f32(u16 h) {
#if IN == 0
  return f32((u32)h << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}
__device__ __forceinline__ u32 out_pair(float a, float b) {  // two outputs of 16 bits, a in the low half
  u32 d;
#if OUT == 0
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));
#endif
  return d;
}

// the run of row `row` from column c0 as fp32; 0 past K (the reference's zero padding)
__device__ __forceinline__ void load_run(const void* x, long row, int c0, int K, long stride, float (&v)[RUN]) {
#if IN == 2
  const float* p = (const float*)x + row * stride + c0;
  if (c0 + RUN <= K) {
#pragma unroll
    for (int i = 0; i < RUN / 4; ++i) {
      const float4 f = __ldg((const float4*)p + i);
      v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < RUN; ++i) v[i] = c0 + i < K ? p[i] : 0.f;
  }
#else
  const u16* p = (const u16*)x + row * stride + c0;
  if (c0 + RUN <= K) {
#pragma unroll
    for (int i = 0; i < RUN / 8; ++i) {
      const uint4 w = __ldg((const uint4*)p + i);
      const u32 word[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[8 * i + 2 * j] = to_f32((u16)(word[j] & 0xFFFFu));
        v[8 * i + 2 * j + 1] = to_f32((u16)(word[j] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < RUN; ++i) v[i] = c0 + i < K ? to_f32(p[i]) : 0.f;
  }
#endif
}

// the finite max |x| of a run, as bits
__device__ __forceinline__ u32 run_amax(const float (&v)[RUN]) {
  u32 m = 0;
#pragma unroll
  for (int i = 0; i < RUN; ++i) {
    const u32 a = abs_bits(v[i]);
    m = max(m, a < INF_BITS ? a : 0u);
  }
  return m;
}

// v / s_x, correctly rounded (div.rn's bits), without a division an element: with y = RN(1 / s_x) and
// q = RN(v y), the residual r = v - q s_x is exact (an FMA) and RN(q + r y) = RN(v / s_x) (Markstein's theorem)
// where neither the quotient nor r underflows and nothing overflows; the sign of v is set again for v = -0. A run
// holding a nonzero |v| below max(2^-124 s_x, 2^-100), or one of 2^100 s_x or more (non-finite included),
// divides (div.rn), as the Triton kernel does everywhere.
__device__ __forceinline__ void divide_run(float (&v)[RUN], float sx) {
  const float y = __frcp_rn(sx);
  const u32 least = max(bits(__fmul_rn(sx, 0x1p-124f)), 0x0D800000u) - 1;  // 2^-124 s_x, 2^-100
  const u32 most = bits(__fmul_rn(sx, 0x1p100f));  // 2^100 s_x (Inf's bits where that overflows)
  u32 lo = 0xFFFFFFFFu, hi = 0;
#pragma unroll
  for (int i = 0; i < RUN; ++i) {
    lo = min(lo, abs_bits(v[i]) - 1);  // 0 (as 0xFFFFFFFF) never divides
    hi = max(hi, abs_bits(v[i]));
  }
  if (lo < least || hi >= most) {
#pragma unroll
    for (int i = 0; i < RUN; ++i) v[i] = __fdiv_rn(v[i], sx);
  } else {
#pragma unroll
    for (int i = 0; i < RUN; ++i) {
      const float q = __fmul_rn(v[i], y);
      v[i] = f32(bits(__fmaf_rn(__fmaf_rn(-q, sx, v[i]), y, q)) | (bits(v[i]) & 0x80000000u));
    }
  }
}
// v >= 0 rounded to a multiple of 2^e, ties to even: (v + 2^(e+23)) - 2^(e+23)
__device__ __forceinline__ float round_to_quantum(float v, int e) {
  const float c = f32((u32)(e + 23 + 127) << 23);
  return __fsub_rn(__fadd_rn(v, c), c);
}
// floor(log2 a) for positive finite a, subnormals included
__device__ __forceinline__ int floor_log2(float a) {
  const bool tiny = a < 1.1754943508222875e-38f;
  const float s = tiny ? __fmul_rn(a, 18446744073709551616.f) : a;
  const int e = (int)((bits(s) >> 23) & 0xFFu) - 127;
  return tiny ? e - 64 : e;
}
// the block scale s (NaN where the block holds a non-finite value) and the 1/s the reference multiplies by, from
// the block's max |x| as bits: UE4M3 of clamp(amax / 6) (NVFP4) or E8M0 2^(floor(log2 amax) - 2) (MXFP4)
__device__ __forceinline__ void block_scale(u32 amax_bits, float& s, float& inv) {
  const bool bad = amax_bits >= INF_BITS;
  const float amax = bad ? 0.f : f32(amax_bits);
#if FMT == 0
  float q = __fmul_rn(amax, 0.1666666716337204f);
  q = __fmaf_rn(__fmaf_rn(-q, 6.f, amax), 0.1666666716337204f, q);
  q = __fmaf_rn(__fmaf_rn(-q, 6.f, amax), 0.1666666716337204f, q);
  s = fminf(fmaxf(q, 0.001953125f), 448.f);
  s = round_to_quantum(s, max((int)(bits(s) >> 23) - 130, -9));  // 3 mantissa bits
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(s));
  inv = __fmaf_rn(y, __fmaf_rn(-s, y, 1.f), y);
#else
  int e = amax > 0.f ? floor_log2(amax) - 2 : -127;
  e = min(max(e, -127), 127);
  s = e > -127 ? f32((u32)(e + 127) << 23) : 5.877471754111438e-39f;
  inv = f32((u32)(127 - e) << 23);
#endif
  if (bad) s = f32(0x7FC00000u);
}
// E2M1 rounding of v = x / s (saturating at +-6, sign kept), times s
__device__ __forceinline__ float dequantize(float v, float s) {
  const float a = fminf(fabsf(v), 6.f);
  const float c = f32(max(bits(a) & 0x7F800000u, 0x3F800000u) + (22u << 23));
  const float r = __fsub_rn(__fadd_rn(a, c), c);
  return __fmul_rn(f32(bits(r) | (bits(v) & 0x80000000u)), s);
}
// which 2 of 4 scores are kept: the larger, ties to the lower index (a unit is dropped when two others are ahead)
__device__ __forceinline__ u32 keep_two(u32 s0, u32 s1, u32 s2, u32 s3) {
  const bool g01 = s1 > s0, g02 = s2 > s0, g03 = s3 > s0, g12 = s2 > s1, g13 = s3 > s1, g23 = s3 > s2;
  const bool k0 = !((g01 && g02) || (g01 && g03) || (g02 && g03));
  const bool k1 = !((!g01 && g12) || (!g01 && g13) || (g12 && g13));
  const bool k2 = !((!g02 && !g12) || (!g02 && g23) || (!g12 && g23));
  const bool k3 = !((!g03 && !g13) || (!g03 && !g23) || (!g13 && !g23));
  return (u32)k0 | (u32)k1 << 1 | (u32)k2 << 2 | (u32)k3 << 3;
}
// the |x| maxima (as bits, NaN and Inf included) of the run's blocks of B elements: one a block where B <= RUN;
// where a block spans B / RUN lanes (consecutive runs of a row), their maxima are exchanged (every lane calls this)
template <int B>
__device__ __forceinline__ void block_amax(const float (&v)[RUN], u32 (&amax)[RUN / 8]) {
#pragma unroll
  for (int b = 0; b < (B < RUN ? RUN / B : 1); ++b) {
    u32 m = 0;
#pragma unroll
    for (int i = b * B; i < (B < RUN ? (b + 1) * B : RUN); ++i) m = max(m, abs_bits(v[i]));
#pragma unroll
    for (int l = 1; l < B / RUN; l <<= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, l));
    amax[b] = m;
  }
}
// one block-quantized stage of the run in place: v (whose block maxima are amax) becomes deq(Q(v))
template <int B>
__device__ __forceinline__ void stage(float (&v)[RUN], const u32 (&amax)[RUN / 8]) {
#pragma unroll
  for (int b = 0; b < (B < RUN ? RUN / B : 1); ++b) {
    float s, inv;
    block_scale(amax[b], s, inv);
#pragma unroll
    for (int i = b * B; i < (B < RUN ? (b + 1) * B : RUN); ++i) v[i] = dequantize(__fmul_rn(v[i], inv), s);
  }
}

"""

_KERNEL = r"""
#if CLUSTER > 1
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ u32 peer_load(const u32* p, u32 rank) {  // p in block `rank`'s shared memory
  u32 a, v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
  return v;
}
#endif

extern "C" __global__ void __launch_bounds__(NTHREADS) CLUSTER_DIMS sharq_prepare(
    const void* __restrict__ x, const u32* __restrict__ amax_in, float* __restrict__ scale, void* __restrict__ out,
    int M, int K, int stride_x, int stride_out) {
#if PDL && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // a GEMM launched after this one may start its set-up
#endif
  // a row is ceil(K / 32) * (32 / RUN) runs (the lanes of a 32-element block stay in one row); runs past K read 0
  const int per_row = ((K + 31) >> 5) * (32 / RUN);
  const long run = (long)blockIdx.x * NTHREADS + threadIdx.x;
  const bool live = run < (long)M * per_row;
  const long row = live ? run / per_row : 0;
  const int c0 = live ? (int)(run - row * per_row) * RUN : K;
  float v[RUN];
  load_run(x, row, c0, K, stride_x, v);
#if TENSOR_SCALE
#if SELF_AMAX
  // the launch is one cluster holding every run: the finite max |x| (per row, or over X) from its blocks' shares
  __shared__ u32 mine[PER_ROW ? MAX_ROWS : 1], whole[PER_ROW ? MAX_ROWS : 1];
  for (int i = threadIdx.x; i < (PER_ROW ? MAX_ROWS : 1); i += NTHREADS) mine[i] = 0;
  __syncthreads();
  {
    // a segmented reduction over the warp's lanes of one row (every lane, over X), then one atomic a segment
    const u32 key = PER_ROW ? (u32)row : 0u;
    u32 m = run_amax(v);
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const u32 other = __shfl_down_sync(0xFFFFFFFFu, m, d), other_key = __shfl_down_sync(0xFFFFFFFFu, key, d);
      if (lane + d < 32 && other_key == key) m = max(m, other);
    }
    const u32 before = __shfl_up_sync(0xFFFFFFFFu, key, 1);
    if (live && (lane == 0 || before != key)) atomicMax(&mine[key], m);
  }
#if CLUSTER > 1
  cluster_arrive();
  cluster_wait();
  for (int i = threadIdx.x; i < (PER_ROW ? M : 1); i += NTHREADS) {
    u32 m = 0;
    for (u32 r = 0; r < CLUSTER; ++r) m = max(m, peer_load(&mine[i], r));
    whole[i] = m;
  }
  cluster_arrive();  // this block no longer reads the others' shared memory (waited for before it exits)
#else
  __syncthreads();
  for (int i = threadIdx.x; i < (PER_ROW ? M : 1); i += NTHREADS) whole[i] = mine[i];
#endif
  __syncthreads();
  const float amax = f32(whole[PER_ROW ? row : 0]);
#else
  const float amax = f32(amax_in[PER_ROW ? row : 0]);
#endif
  // s_x = max(amax / 2688, 1e-9) (SPEC §3), written once a row (or once); Xs = bf16(X / s_x)
  const float sx = fmaxf(__fdiv_rn(amax, DIVISOR), FLOOR);
  if (live && c0 == 0 && (PER_ROW || row == 0)) scale[PER_ROW ? row : 0] = sx;
  divide_run(v, sx);
#pragma unroll
  for (int i = 0; i < RUN; ++i) v[i] = round_bf16(v[i]);
#elif ROUND_INPUT
#pragma unroll
  for (int i = 0; i < RUN; ++i) v[i] = round_bf16(v[i]);
#endif

  // stage 1: the optional mask (scores: |x| bits), then block quantization; the masks keep each block's maximum,
  // so the stage's block maxima are X's
  u32 amax1[RUN / 8];
  block_amax<BLOCK1>(v, amax1);
  float d[RUN];
#pragma unroll
  for (int i = 0; i < RUN; ++i) d[i] = v[i];
#if MASK1 == 1  // pair-4:8: the 4 pairs of each 8-element chunk scored by their larger |x|
#pragma unroll
  for (int c = 0; c < RUN / 8; ++c) {
    u32 p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = max(abs_bits(v[8 * c + 2 * j]), abs_bits(v[8 * c + 2 * j + 1]));
    const u32 keep = keep_two(p[0], p[1], p[2], p[3]);
#pragma unroll
    for (int j = 0; j < 8; ++j) d[8 * c + j] = keep >> (j >> 1) & 1u ? v[8 * c + j] : 0.f;
  }
#elif MASK1 == 2  // 2:4 on each 4-element group
#pragma unroll
  for (int c = 0; c < RUN / 4; ++c) {
    const u32 keep = keep_two(abs_bits(v[4 * c]), abs_bits(v[4 * c + 1]), abs_bits(v[4 * c + 2]),
                              abs_bits(v[4 * c + 3]));
#pragma unroll
    for (int j = 0; j < 4; ++j) d[4 * c + j] = keep >> j & 1u ? v[4 * c + j] : 0.f;
  }
#endif
  stage<BLOCK1>(d, amax1);
#if TWO_STAGES  // stage 2: the fp32 residual, dense
  float r[RUN];
#pragma unroll
  for (int i = 0; i < RUN; ++i) r[i] = __fsub_rn(v[i], d[i]);
  u32 amax2[RUN / 8];
  block_amax<BLOCK2>(r, amax2);
  stage<BLOCK2>(r, amax2);
#pragma unroll
  for (int i = 0; i < RUN; ++i) d[i] = __fadd_rn(d[i], r[i]);
#endif

  if (live && c0 < K) {
#if TILE
    // the wgmma kernel's tiled activation (kernels/cuda_wgmma.py): tiles of TILE rows, a tile's 128-column chunks
    // one after another, each its B buffer's image; pair (i, b = 0, 1) of each 8-element group is one word
    u32* o = (u32*)out;
    const long t = row % TILE;
    const long base = ((row / TILE) * (K >> 7) + (c0 >> 7)) * (TILE * 128) + (t >> 3) * 64 + (t & 7) * 8 +
                      2 * ((c0 & 127) >> 5);
#pragma unroll
    for (int g = 0; g < RUN / 8; ++g) {
      const int v8 = ((c0 >> 3) + g) & 3;  // the 8-element group's place in its 32
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#if TILE_PLACED
        const int e0 = 8 * g + 2 * i, e1 = e0 + 1;
#else
        const int e0 = 8 * g + i, e1 = e0 + 4;
#endif
        o[(base + (2 * v8 + (i >> 1)) * (16 * TILE) + (i & 1) * (8 * TILE)) >> 1] = out_pair(d[e0], d[e1]);
      }
    }
#elif OUT == 2
    float* o = (float*)out + row * stride_out + c0;
    if (c0 + RUN <= K) {
#pragma unroll
      for (int i = 0; i < RUN / 4; ++i)
        ((float4*)o)[i] = make_float4(d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < RUN; ++i)
        if (c0 + i < K) o[i] = d[i];
    }
#else
    u16* o = (u16*)out + row * stride_out + c0;
    if (c0 + RUN <= K) {
#pragma unroll
      for (int i = 0; i < RUN / 8; ++i)
        ((uint4*)o)[i] = make_uint4(out_pair(d[8 * i], d[8 * i + 1]), out_pair(d[8 * i + 2], d[8 * i + 3]),
                                    out_pair(d[8 * i + 4], d[8 * i + 5]), out_pair(d[8 * i + 6], d[8 * i + 7]));
    } else {
#pragma unroll
      for (int i = 0; i < RUN; i += 2) {
        const u32 p = out_pair(d[i], d[i + 1]);
        if (c0 + i < K) o[i] = (u16)(p & 0xFFFFu);
        if (c0 + i + 1 < K) o[i + 1] = (u16)(p >> 16);
      }
    }
#endif
  }
#if TENSOR_SCALE && SELF_AMAX && CLUSTER > 1
  cluster_wait();
#endif
}
"""


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: the recipe's cascade, the call's dtypes, scale and layout, and the launch's shape."""

    per_row: bool
    tensor_scale: bool
    round_input: bool
    mask: int  # _MASK
    block1: int
    two_stages: bool
    block2: int
    fmt: int  # _FMT
    x_dtype: int  # _DTYPE
    out_dtype: int  # _DTYPE
    self_amax: bool
    tile: int  # rows of a tiled layout (kernels/cuda_wgmma.py), 0 for row-major values
    tile_placed: bool
    pdl: bool
    run: int  # elements a thread (RUNS)
    threads: int  # a block
    cluster: int  # blocks of a self-amax launch (its one cluster), else 1


def kernel_source(v: Variant) -> str:
    """The kernel's CUDA source for a variant: its #defines, then the kernel."""
    defines = dict(
        PER_ROW=int(v.per_row), TENSOR_SCALE=int(v.tensor_scale), ROUND_INPUT=int(v.round_input), MASK1=v.mask,
        BLOCK1=v.block1, TWO_STAGES=int(v.two_stages), BLOCK2=v.block2, FMT=v.fmt, IN=v.x_dtype, OUT=v.out_dtype,
        SELF_AMAX=int(v.self_amax), TILE=v.tile, TILE_PLACED=int(v.tile_placed), PDL=int(v.pdl), RUN=v.run,
        NTHREADS=v.threads, CLUSTER=v.cluster, MAX_ROWS=MAX_ROW_SLOTS,
        CLUSTER_DIMS=f"__cluster_dims__({v.cluster}, 1, 1)" if v.cluster > 1 else "",
        DIVISOR=f"{NVFP4_TENSOR_DIVISOR!r}f", FLOOR=f"{TENSOR_SCALE_FLOOR!r}f")
    return "".join(f"#define {k} {val}\n" for k, val in defines.items()) + _HELPERS + _KERNEL


def runs(m: int, k: int, run: int) -> int:
    """Threads a call takes: a row is its 32-element blocks' worth of runs (past K, runs that store nothing)."""
    return m * -(-k // 32) * (32 // run)


def variant(recipe: Recipe, m: int, k: int, x_dtype: torch.dtype, out_dtype: torch.dtype, given_amax: bool,
            tiled: tuple[int, bool] | None, pdl: bool, run: int | None = None, cluster: int | None = None
            ) -> Variant | None:
    """The kernel for a call of the dequantized prepare, or None where the kernel does not take it (then the
    Triton kernel runs): a cascade prepare.supports takes, 16- or 32-bit floats in and out (a tiled layout: bf16,
    K a multiple of 128). `run` elements a thread (default: 8 for a self-amax call, 32 above) and, for a self-amax
    call, `cluster` blocks (default: 4 warps or more a block, at most CLUSTER_BLOCKS) override the defaults."""
    from . import prepare  # the Triton kernel's rule of what it implements is this kernel's too

    if not prepare.supports(recipe) or x_dtype not in _DTYPE or out_dtype not in _DTYPE or m <= 0 or k <= 0:
        return None
    if tiled and (out_dtype != torch.bfloat16 or k % 128):
        return None
    stages = recipe.stages
    tensor_scale, per_row = recipe.uses_tensor_scale, recipe.tensor_scale_per_row
    small = runs(m, k, RUNS[0]) <= SELF_AMAX_RUNS
    run = run or (RUNS[0] if small else RUNS[-1])
    n = runs(m, k, run)
    self_amax = tensor_scale and not given_amax and n <= SELF_AMAX_RUNS and (not per_row or m <= MAX_ROW_SLOTS)
    if self_amax:
        cluster = cluster or min(CLUSTER_BLOCKS, -(-n // 128))
        threads = -(-n // (cluster * 32)) * 32
        if threads > MAX_THREADS:
            return None
    else:
        cluster, threads = 1, THREADS
    return Variant(per_row, tensor_scale, x_dtype != torch.bfloat16 and not tensor_scale,
                   _MASK[stages[0].mask], stages[0].block, len(stages) == 2, stages[-1].block, _FMT[stages[0].fmt],
                   _DTYPE[x_dtype], _DTYPE[out_dtype], self_amax, tiled[0] if tiled else 0,
                   bool(tiled and tiled[1]), pdl, run, threads, cluster)


def grid(v: Variant, m: int, k: int) -> int:
    """Blocks of a launch: one cluster for a self-amax launch, else a thread a run."""
    return v.cluster if v.self_amax else -(-runs(m, k, v.run) // v.threads)


def available() -> bool:
    """Whether this torch can compile the kernel (NVRTC through torch.cuda._compile_kernel) and it has not failed."""
    return not INTERPRETED and hasattr(torch.cuda, "_compile_kernel") and not _broken


@functools.lru_cache(maxsize=None)
def _compiled(device_index: int, v: Variant):
    from . import cuda_gemm

    return cuda_gemm._compile(device_index, kernel_source(v), 0, NAME)


Launch = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, int, int], None]


def launcher(v: Variant, m: int, k: int, device: torch.device) -> Launch | None:
    """(x, amax bits or None, scale, out, stride_x, stride_out) -> None: the variant's launch for m x k, worked out
    once; None where it cannot be compiled here (a warning says why, once) or the GPU has no clusters (before
    Hopper)."""
    from . import cuda_gemm
    from .launch import DriverKernel

    if not available() or cuda_gemm._capability(device) < (9, 0):
        return None
    try:
        kernel = _compiled(device.index or 0, v)
    except Exception as e:  # noqa: BLE001 - no NVRTC / headers here: the Triton kernel runs instead
        cuda_gemm.compile_failed(_broken, e, "the CUDA activation prepare", "using the Triton kernel",
                                 stacklevel=2)
        return None
    driver = DriverKernel(kernel.func.value, "ppppiiii")
    blocks = grid(v, m, k)

    def run(x: torch.Tensor, amax: torch.Tensor | None, scale: torch.Tensor, out: torch.Tensor, stride_x: int,
            stride_out: int) -> None:
        driver((blocks, 1, 1), (v.threads, 1, 1), 0, torch.cuda.current_stream(x.device).cuda_stream,
               (x.data_ptr(), scale.data_ptr() if amax is None else amax.data_ptr(), scale.data_ptr(),
                out.data_ptr()), (m, k, stride_x, stride_out))

    return run
