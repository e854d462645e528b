"""CUDA device code shared by the packed NVFP4 GEMM kernels (kernels/cuda_gemm.py, kernels/cuda_wgmma.py): the
weight streamed past L1, the programmatic-launch wait, the activation read through L1, E2M1 and UE4M3 decoded to
bf16 by bit placement (exact: see cuda_gemm's docstring) and the output stored in its dtype. A kernel's source is
its #defines (OUT, BIAS, SPLIT, PLACED among them), then DEVICE_HELPERS, then its own code."""

from .placed import DECODE_SOURCE

SCALE_TABLE_BYTES = 256 * 4  # the static shared memory of build_scale_table's table, in every kernel

DEVICE_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
struct alignas(16) U4 { u32 x, y, z, w; };
__device__ __forceinline__ U4 ld_stream(const U4* p) {  // read once: keep it out of L1
  U4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 ld_stream(const u32* p) {  // the same, one word
  u32 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
// programmatic dependent launch (Hopper): wait here until the kernel before this one (the prepare, which wrote the
// activation and its scale) has finished and its writes are visible; a no-op in a plain launch. The kernels issue
// their first weight chunks (codes and block scales) before it, so those stream while the prepare runs: the weight
// must not be written by the kernel launched just before the GEMM in the same CUDA graph (a model's weights are
// written when it is loaded, never in its forward). The bias and the weight scale are read after it.
__device__ __forceinline__ void wait_prior_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ U4 ld_shared_by_blocks(const U4* p) {
  U4 v;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ u32 word(const U4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// nibbles i and i + 4 of x as a bf16 pair: the E2M1 values times 2^-126. The two nibbles, kept by a mask, are
// multiplied by 2^a + 2^b: one copy of each with its sign at bit 15 (31), one with its other bits at 8..6
// (24..22); the copies do not overlap, so nothing carries, and the last mask keeps those bits (nibbles 2 and 3
// are first moved down to 0 and 1, since a multiply cannot shift right)
__device__ __forceinline__ u32 e2m1_pair(u32 x, int i) {
  const u32 t = (i < 2 ? x : x >> 8) & (0x000F000Fu << 4 * (i & 1));
  return (t * ((1u << (12 - 4 * (i & 1))) + (1u << (6 - 4 * (i & 1))))) & 0x81C081C0u;
}
""" + DECODE_SOURCE + r"""
// what a kernel reads in either code layout (PLACED: kernels/placed.py's, else the canonical one). Pair i of a word
// of codes as bf16 bits: elements i and i + 4 of its 8 (canonical), or 2i and 2i + 1 (placed); the activation's
// pair of the same elements from 16 bytes x holding elements 0 .. 7; and four decoded pairs in element order
// (bf16 elements 0 .. 7 as four words)
__device__ __forceinline__ u32 decode_pair(u32 x, int i) {
#if PLACED
  return e2m1_placed(x, i);
#else
  return e2m1_pair(x, i);
#endif
}
__device__ __forceinline__ u32 x_pair(const U4& x, int i) {
#if PLACED
  return word(x, i);
#else
  return prmt(i & 2 ? x.y : x.x, i & 2 ? x.w : x.z, i & 1 ? 0x7632u : 0x5410u);
#endif
}
__device__ __forceinline__ U4 in_order(u32 p0, u32 p1, u32 p2, u32 p3) {
#if PLACED
  return U4{p0, p1, p2, p3};
#else
  return U4{prmt(p0, p1, 0x5410u), prmt(p2, p3, 0x5410u), prmt(p0, p1, 0x7632u), prmt(p2, p3, 0x7632u)};
#endif
}
// a UE4M3 scale code (float8_e4m3fn bits) times 2^118 as a bf16 pair; exact (4 significant bits, below 2^127)
__device__ __forceinline__ u32 scale_pair(u32 code) {
  u32 e = (code >> 3) & 15u, m = code & 7u;
  // normal: 2^(e - 7) (1 + m/8) 2^118; subnormal: m 2^-9 2^118
  float f = e ? __uint_as_float(((e + 238u) << 23) | (m << 20)) : (float)m * __uint_as_float(236u << 23);
  if (code & 0x80u) f = -f;
  if ((code & 0x7Fu) == 0x7Fu) f = __uint_as_float(0x7FC00000u);
  u32 b = __float_as_uint(f) >> 16;
  return b | (b << 16);
}
// every UE4M3 code's scale_pair, built by each block before its loop: a chunk's scale codes are then looked up (a
// shared load) rather than converted (a dozen instructions, for every row of every chunk)
__device__ __forceinline__ void build_scale_table(u32* table) {
  for (u32 c = threadIdx.x; c < 256; c += blockDim.x) table[c] = scale_pair(c);
}
// a row's scale codes for a thread's 32 elements (one byte, or two for 16-element blocks) as the bf16 pairs of
// its two 16-element halves
__device__ __forceinline__ void row_scale_pairs(const u32* table, u32 codes, u32 (&sc)[2]) {
#if BLOCK == 32
  sc[0] = sc[1] = table[codes];
#else
  sc[0] = table[codes & 0xFFu];
  sc[1] = table[codes >> 8];
#endif
}
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {  // a * b + (-0): the exact product, its sign kept
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}
__device__ __forceinline__ float to_float(const void* p, long i) {
#if BIAS == 1
  return __uint_as_float(((u32)((const u16*)p)[i]) << 16);
#elif BIAS == 2
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(((const u16*)p)[i]));
  return f;
#else
  return ((const float*)p)[i];
#endif
}
__device__ __forceinline__ void store(void* y, long i, float v) {
#if SPLIT || OUT == 2
  ((float*)y)[i] = v;
#elif OUT == 0
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  ((u16*)y)[i] = h;
#else
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  ((u16*)y)[i] = h;
#endif
}

"""

# A kernel's entry for up to three layers that read one activation (q/k/v, gate/up) in one launch, each with its
# own weight, weight scale, bias and output (or fp32 partials, with a K split): the first blocks0 block columns take
# layer 0's rows, the next blocks1 layer 1's, the rest layer 2's. NAME, BOUNDS (its __launch_bounds__) and
# BLOCK_FN (the kernel's one-block function, which takes the layer's arguments and the block's column and split)
# are filled in by each kernel.
GROUP_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(BOUNDS) NAME(
    const U4* c0, const U4* c1, const U4* c2, const u8* s0, const u8* s1, const u8* s2, void* y0, void* y1,
    void* y2, const float* w0, const float* w1, const float* w2, const void* b0, const void* b1, const void* b2,
    const u16* __restrict__ a, const float* __restrict__ sx, int M, int Kp, int lda, int chunks_per_split,
    int blocks0, int blocks1, int n0, int n1, int n2) {
  const int bx = blockIdx.x, l = bx < blocks0 ? 0 : bx < blocks0 + blocks1 ? 1 : 2;
  BLOCK_FN(l == 0 ? c0 : l == 1 ? c1 : c2, l == 0 ? s0 : l == 1 ? s1 : s2, a, l == 0 ? y0 : l == 1 ? y1 : y2, sx,
           l == 0 ? w0 : l == 1 ? w1 : w2, l == 0 ? b0 : l == 1 ? b1 : b2, M, l == 0 ? n0 : l == 1 ? n1 : n2, Kp,
           lda, chunks_per_split, bx - (l > 0 ? blocks0 : 0) - (l > 1 ? blocks1 : 0), blockIdx.y);
}
"""
