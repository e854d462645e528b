"""The activation prepare (kernels/prepare.py's values: X -> s_x and Σ deq(Qᵢ)) as CUDA device code, run by the
decode GEMM's own first blocks (kernels/cuda_gemm.py, a `fold` launch): one launch a layer at decode sizes.

An eager decode step is host-bound, and a prepare launch costs it about 7 % (a copy of the model whose plans skip
every prepare ran 1.07-1.14 × faster, H100, docs/PERF.md). Folding the prepare into the GEMM by having every block
redo it costs up to 7 blocks a multiprocessor the whole chain; here the launch's first FOLD_BLOCKS blocks (the
first the GPU dispatches) each prepare a slice of the activation, a thread a run of 8 elements, into a buffer the
launch plan keeps, and publish it by a ticket: each adds one to ticket[0] after its stores (release); every block,
once it has issued its first weight chunks, waits until ticket[0] counts all of them (acquire) and then reads the
activation coherently (through L2: these bytes are written during the launch). ticket[1] counts the blocks past
that wait; the last one zeroes both, so the next launch finds them zero (and a CUDA graph's replay needs no reset).
Each slice block finds the tensor's amax itself (the whole X is at most FOLD_ELEMENTS elements: a few KB, read
from L2), as prepare.py's self-amax launches do.

The arithmetic is the Triton kernel's, operation for operation, as the CUDA activation kernel of the twenty-ninth
run had it (it matched the Triton kernel bit for bit on an H100; it lost to it as a kernel of its own): IEEE X / s_x
(Markstein's quotient, or div.rn where that could underflow), bf16 by round-to-nearest-even, amax / 6 by a product
refined twice, 1/s by the hardware reciprocal and one Newton step, E2M1 and UE4M3 rounding by adding and
subtracting a power of two, block maxima on the bits (NaN > Inf > finite); every sum and product an _rn intrinsic,
so the compiler cannot contract one into an FMA. bf16 inputs, one tensor scale (not one per token)."""

from __future__ import annotations

from dataclasses import dataclass

from ..quant import NVFP4_TENSOR_DIVISOR, TENSOR_SCALE_FLOOR
from ..recipes import Recipe

RUN = 8  # elements a thread: 16 bytes of bf16 in and out
FOLD_ELEMENTS = 1 << 15  # the most elements of X a folded launch prepares (8 tokens at K = 4096)
_FMT = {"nvfp4": 0, "mxfp4": 1}
_MASK = {None: 0, "pair-4:8": 1, "2:4": 2}


@dataclass(frozen=True)
class Fold:
    """What a folded launch's prepare is: the recipe's cascade (mask, block sizes, format) and its slice blocks."""

    mask: int  # _MASK
    block1: int
    two_stages: bool
    block2: int
    fmt: int  # _FMT
    blocks: int  # the launch's first blocks that prepare the activation

    def defines(self) -> dict:
        return dict(FOLD=1, FOLD_BLOCKS=self.blocks, RUN=RUN, MASK1=self.mask, BLOCK1=self.block1,
                    TWO_STAGES=int(self.two_stages), BLOCK2=self.block2, FMT=self.fmt,
                    DIVISOR=f"{NVFP4_TENSOR_DIVISOR!r}f", FLOOR=f"{TENSOR_SCALE_FLOOR!r}f")


def fold_for(recipe: Recipe, m: int, k: int, threads: int) -> Fold | None:
    """The fold of a launch of `threads` threads a block for x [m, k] (bf16) under `recipe`, or None where the
    prepare cannot be folded: a cascade the prepare kernel does not implement, no tensor scale or one per token,
    more than FOLD_ELEMENTS elements, K not a multiple of 128 (whole chunks: no run crosses a row)."""
    from . import prepare

    if not prepare.supports(recipe) or not recipe.uses_tensor_scale or recipe.tensor_scale_per_row:
        return None
    if m <= 0 or k % 128 or m * k > FOLD_ELEMENTS:
        return None
    stages = recipe.stages
    runs = m * k // RUN
    return Fold(_MASK[stages[0].mask], stages[0].block, len(stages) == 2, stages[-1].block, _FMT[stages[0].fmt],
                -(-runs // threads))


def buffer_bytes(m: int, k: int) -> int:
    """A folded launch's buffer: s_x (fp32), the ticket's two words, padding to 16 bytes, the values [m, k] bf16."""
    return 16 + 2 * m * k


SOURCE = r"""
#if FOLD
#define INF_BITS 0x7F800000u
__device__ __forceinline__ float f32(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ u32 abs_bits(float f) { return bits(f) & 0x7FFFFFFFu; }
__device__ __forceinline__ float round_bf16(float v) {  // to the nearest bf16 (ties to even), as fp32
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return f32((u32)h << 16);
}
__device__ __forceinline__ u32 bf16_pair(float a, float b) {  // a in the low half
  u32 d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));
  return d;
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
// the |x| maximum (as bits, NaN and Inf included) of the block of B elements holding this run: a block of 16 or 32
// spans B / RUN neighbouring lanes, which exchange their maxima (every lane of the warp calls this)
template <int B>
__device__ __forceinline__ u32 block_amax(const float (&v)[RUN]) {
  u32 m = 0;
#pragma unroll
  for (int i = 0; i < RUN; ++i) m = max(m, abs_bits(v[i]));
#pragma unroll
  for (int l = 1; l < B / RUN; l <<= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, l));
  return m;
}
// one block-quantized stage of the run in place: v (whose block maximum is amax) becomes deq(Q(v))
__device__ __forceinline__ void stage(float (&v)[RUN], u32 amax) {
  float s, inv;
  block_scale(amax, s, inv);
#pragma unroll
  for (int i = 0; i < RUN; ++i) v[i] = dequantize(__fmul_rn(v[i], inv), s);
}
// the run's deq(Q(S)) + deq(Q(R)) from Xs = bf16(X / s_x), as the prepare kernel's values
__device__ __forceinline__ void cascade(float (&v)[RUN]) {
  // stage 1: the optional mask (scores: |x| bits), then block quantization; the masks keep each block's
  // maximum, so the stage's block maximum is X's
  const u32 amax1 = block_amax<BLOCK1>(v);
  float d[RUN];
#pragma unroll
  for (int i = 0; i < RUN; ++i) d[i] = v[i];
#if MASK1 == 1  // pair-4:8: the 4 pairs of the 8-element chunk scored by their larger |x|
  {
    u32 p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = max(abs_bits(v[2 * j]), abs_bits(v[2 * j + 1]));
    const u32 keep = keep_two(p[0], p[1], p[2], p[3]);
#pragma unroll
    for (int j = 0; j < 8; ++j) d[j] = keep >> (j >> 1) & 1u ? v[j] : 0.f;
  }
#elif MASK1 == 2  // 2:4 on each 4-element group
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const u32 keep = keep_two(abs_bits(v[4 * c]), abs_bits(v[4 * c + 1]), abs_bits(v[4 * c + 2]),
                              abs_bits(v[4 * c + 3]));
#pragma unroll
    for (int j = 0; j < 4; ++j) d[4 * c + j] = keep >> j & 1u ? v[4 * c + j] : 0.f;
  }
#endif
  stage(d, amax1);
#if TWO_STAGES  // stage 2: the fp32 residual, dense
  float r[RUN];
#pragma unroll
  for (int i = 0; i < RUN; ++i) r[i] = __fsub_rn(v[i], d[i]);
  stage(r, block_amax<BLOCK2>(r));
#pragma unroll
  for (int i = 0; i < RUN; ++i) d[i] = __fadd_rn(d[i], r[i]);
#endif
#pragma unroll
  for (int i = 0; i < RUN; ++i) v[i] = d[i];
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// 16 bytes of the activation this launch wrote: through L2, which its writers' stores reached
__device__ __forceinline__ U4 ld_folded(const U4* p) {
  const uint4 v = __ldcg((const uint4*)p);
  return U4{v.x, v.y, v.z, v.w};
}
// the activation of x [M, K] (bf16, rows K apart, K a multiple of 128) and its s_x, written into the launch
// plan's buffer (s_x, the ticket's two words, padding, then the values [M, K]) by the launch's first FOLD_BLOCKS
// blocks; every block returns once all of it is written. Called by every thread of every block, after the wait
// for the kernel before (which wrote x).
__device__ void fold_prepare(const u16* x, float* buffer, int M, int K) {
  u32* ticket = (u32*)buffer + 1;
  u16* act = (u16*)(buffer + 4);
  const u32 block = blockIdx.y * gridDim.x + blockIdx.x;
  if (block < FOLD_BLOCKS) {
    __shared__ u32 amax_bits;
    if (threadIdx.x == 0) amax_bits = 0;
    __syncthreads();
    // the finite max |x| of all of X, on the bf16 bits (NaN and Inf left out, as the tensor scale's rule)
    const long words = (long)M * K / 8;
    u32 m = 0;
    for (long i = threadIdx.x; i < words; i += blockDim.x) {
      const uint4 w = __ldcg((const uint4*)x + i);
      const u32 word4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u32 lo = (word4[j] & 0x7FFFu) << 16, hi = word4[j] & 0x7FFF0000u;
        m = max(m, max(lo < INF_BITS ? lo : 0u, hi < INF_BITS ? hi : 0u));
      }
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
    if ((threadIdx.x & 31) == 0) atomicMax(&amax_bits, m);
    __syncthreads();
    // s_x = max(amax / 2688, 1e-9) (SPEC §3); Xs = bf16(X / s_x)
    const float sx = fmaxf(__fdiv_rn(f32(amax_bits), DIVISOR), FLOOR);
    if (block == 0 && threadIdx.x == 0) buffer[0] = sx;
    const long runs = (long)M * (K / RUN);
    // every lane of a warp takes part in each pass (the block maxima are exchanged between lanes); a run of 16 or
    // 32 elements never crosses a row (K is a multiple of 128)
    for (long first = (long)block * blockDim.x; first < runs; first += (long)FOLD_BLOCKS * blockDim.x) {
      const long run = first + threadIdx.x;
      const bool live = run < runs;
      const long e0 = live ? run * RUN : 0;  // rows are K apart in x and in the values
      const uint4 w = __ldcg((const uint4*)(x + e0));
      const u32 word4[4] = {w.x, w.y, w.z, w.w};
      float v[RUN];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = f32(word4[j] << 16);
        v[2 * j + 1] = f32(word4[j] & 0xFFFF0000u);
      }
      divide_run(v, sx);
#pragma unroll
      for (int i = 0; i < RUN; ++i) v[i] = round_bf16(v[i]);
      cascade(v);
      if (live)
        *(uint4*)(act + e0) = make_uint4(bf16_pair(v[0], v[1]), bf16_pair(v[2], v[3]), bf16_pair(v[4], v[5]),
                                         bf16_pair(v[6], v[7]));
    }
    __syncthreads();  // the block's stores, then its ticket (release: they are seen by whoever sees the ticket)
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(ticket, 1u);
    }
  }
  if (threadIdx.x == 0) {
    while (ld_acquire(ticket) < FOLD_BLOCKS) {
    }
    // this block reads the ticket no more: the launch's last block past its wait zeroes it for the next launch
    const u32 blocks = gridDim.x * gridDim.y * gridDim.z;
    if (atomicAdd(ticket + 1, 1u) == blocks - 1) {
      ticket[0] = 0;
      ticket[1] = 0;
    }
  }
  __syncthreads();
}
#endif
"""
