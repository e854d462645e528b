"""The packed NVFP4 GEMM at small M (decode) as a CUDA kernel: tensor cores fed from registers.

Triton stages both operands of its MMA through shared memory, which costs a memory-bound decode GEMM most of its
speed (docs/PERF.md). This kernel keeps the decoded weight in registers as the MMA's A operand ("swap AB": weight
rows fill the m16 side, tokens the n8 side of `mma.sync.m16n8k16`), reads the canonical payload of docs/FORMAT.md
as it is (no layout of its own) with one 16-byte load per row per 128-element chunk, and decodes E2M1 by bit
placement:

- A K-permutation makes the loads contiguous. Within one MMA the order of K does not matter as long as A and B
  agree, so the thread that owns k-slots {2q, 2q+1, 2q+8, 2q+9} of each of a chunk's eight MMAs takes the 32
  consecutive elements q·32 … q·32+31 of its rows (one 32-element scale block, or two 16-element ones), and
  loads the activation at the same 32 elements.
- Decode: nibbles i and i+4 of a 32-bit word become one bf16 pair (sign to bit 15, the two exponent bits and the
  mantissa bit to bits 8..6: the E2M1 value times 2^-126, a bf16 subnormal for 0.5) by a mask that keeps the
  two nibbles, one multiply that places two copies of each (shifted for the sign and for the rest; they do not
  overlap, so nothing carries) and a mask that keeps the right bits of each copy, then one bf16x2 multiply by
  the block scale times 2^118, which is exact (the product, code · scale · 2^-8, has at most 6 significant bits
  and lies in [2^-18, 10.5]). The block scales are looked up in a table of all 256 UE4M3 codes each block builds
  in shared memory at its start. The activation elements are paired to match with one byte permute per pair.
- The weight goes global -> shared memory by cp.async, a ring of three chunks per warp, so more bytes are in
  flight without registers to hold them, or is staged in registers (`choose_tile` says where each measured
  faster). Either way each thread gets the same 16 bytes, so the result is the same bit for bit.
- A warp either holds its chunk's activation in registers or reads 16 bytes of one token where the MMAs use them
  (`CudaTile.direct`: how 33 to 64 tokens fit in the registers, and faster at 9 to 16), and a block may hold
  several groups of warps on neighbouring rows (`CudaTile.wn`) so that they share the activation's loads in L1.
  Neither changes the order in which an output's products are added, so neither changes a bit of the result.
- fp32 accumulation in the tensor cores; the warps of a block split K and their sums meet in shared memory in a
  fixed order, so the output is the same from call to call and for every M it takes (batch-invariant); where
  there are too few blocks for the GPU, K is also split over blocks, whose fp32 partials the epilogue kernel adds
  in order.
- On Hopper, inside a CUDA graph, launched with programmatic dependent launch where that measured faster
  (`_programmatic`): the blocks start while the prepare kernel still runs, issue their first weight chunks (which
  no kernel of the forward writes) and wait (`griddepcontrol.wait`) before reading the activation, so the launch,
  the set-up and the first weight bytes overlap the prepare.

On Hopper, 33-64 tokens of layers with more than 2^24 weights (17-64 above 2^26) go to the wgmma kernel
instead (kernels/cuda_wgmma.py: 128 rows a block share one staged activation), which measured faster there, and
so do 65-256 tokens of layers of at least 2^24 weights, in its tiles of 128 tokens (faster than the decode into a
scratch weight + cuBLAS that larger M takes); the launch plan below picks it, with the same arguments. Either
kernel also has a group entry (nvfp4_mma_group): up to three layers that read one activation (q/k/v, gate/up), each
with its own weight, scale, bias and output, in one launch whose blocks take the rows of the layer they fall in,
where `group_tile` says that measured faster.

Compiled at first use by NVRTC through PyTorch (`torch.cuda._compile_kernel`), one binary per launch variant, and
launched by cuLaunchKernel itself (kernels/launch.py) with the launch worked out once per shape (`_launch`). Where
that is missing (no CUDA toolkit headers, another torch) or the shape does not fit (`fits`), packed_matmul runs the
Triton kernels, which stay the reference implementation CPU CI checks in the interpreter. Tested against the exact
product on the H200 (tests/kernels/test_cuda_gemm.py)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import cuda_activation, cuda_wgmma
from .cuda_activation import Fold
from .cuda_source import DEVICE_HELPERS, GROUP_ENTRY
from .launch import DriverKernel, FixedLaunches, plan_buffers

_SOURCE = DEVICE_HELPERS + cuda_activation.SOURCE + r"""
#if FOLD  // s_x is written during the launch (fold_prepare): read through L2
#define SX0 __ldcg(sx)
#else
#define SX0 sx[0]
#endif
struct Stage {
  U4 w[RT][2];   // codes of rows g and g + 8 of each row tile: this thread's 32 elements of the chunk
  u32 s[RT][2];  // their scale codes (one byte, or two for 16-element blocks)
#if !XDIRECT
  U4 x[MT][4];   // the activation of token mt * 8 + g at the same 32 elements
#endif
};
#if RING
// the weight codes and scales go global -> shared by cp.async into a ring of RING chunks per warp: bytes in flight
// without registers holding them (each lane reads back only what it copied, so the warp needs no barrier for
// the codes; the scales, copied by one lane per row, are read after a __syncwarp)
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src));
}
// one row's scale codes of a chunk, where `copy` (one lane a row): a predicated copy, no branch around it
__device__ __forceinline__ void cp_async_scales(void* dst, const void* src, bool copy) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n@p cp.async.ca.shared.global [%0], [%1], %3;\n}"
               :: "r"(smem_addr(dst)), "l"(src), "r"((u32)copy), "n"(512 / BLOCK / 4));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_ring() { asm volatile("cp.async.wait_group %0;" :: "n"(RING - 1)); }
struct Slot {
  U4 w[RT][2][32];                    // lane l's 16 bytes of rows g and g + 8 of each row tile
  u32 s[RT][2][8][BLOCK == 16 ? 2 : 1];  // the scale codes of the chunk, per row: 4 (or 8) bytes
};
#endif
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// one block's rows (block column bx) and K split (by) of one weight
__device__ __forceinline__ void gemm_block(
    const U4* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ a, void* __restrict__ y,
    const float* __restrict__ sx, const float* __restrict__ sw, const void* __restrict__ bias, int M, int N,
    int Kp, int lda, int chunks_per_split, int bx, int by) {
  // warps wk = 0 .. WK-1 of a block split K; WN such groups take neighbouring row tiles (and share the
  // activation's loads in L1)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int wk = warp % WK, wn = warp / WK;
#if FOLD  // a is x, the layer's input: the activation is prepared into sx's buffer, after s_x and the ticket
  const u16* const x_in = a;
  a = (const u16*)(sx + 4);
#endif
  __shared__ u32 scale_table[256];  // built once the first chunks are on their way
  const int n0 = (bx * WN + wn) * (16 * RT);
  const int c_begin = by * chunks_per_split;
  const int c_end = min(c_begin + chunks_per_split, Kp >> 7);
  const U4* wrow[RT][2];
  const u8* srow[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long n = n0 + rt * 16 + h * 8 + g;
      wrow[rt][h] = codes + n * (Kp >> 5) + q;
      srow[rt][h] = scales + n * (Kp / BLOCK) + q * (32 / BLOCK);
    }
  // token mt * 8 + g's activation, or token 0's where there is no such token: its MMA column is never stored, and
  // columns do not mix, so an unpredicated load is safe and costs the loop no select
  const U4* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xrow[mt] = (const U4*)(a + (long)(mt * 8 + g < M ? mt * 8 + g : 0) * lda) + q * 4;
  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][mt][i] = 0.f;

  // this warp's chunks: c_begin + warp, + WK, ... (neighbouring warps read neighbouring chunks of each row)
  const int mine = c_end - c_begin > wk ? (c_end - c_begin - wk + WK - 1) / WK : 0;
  auto chunk = [&](int u) { return c_begin + wk + u * WK; };  // this warp's u-th chunk
  auto ld_x = [&](int mt, int c, int v) {  // 16 bytes of token mt * 8 + g's activation at chunk c
#if FOLD
    return ld_folded(xrow[mt] + c * 16 + v);
#else
    return ld_shared_by_blocks(xrow[mt] + c * 16 + v);
#endif
  };
  auto load_x = [&](Stage& s, int c) {  // the activation at chunk c
#if !XDIRECT
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int v = 0; v < 4; ++v) s.x[mt][v] = ld_x(mt, c, v);
#endif
  };
#if !RING  // the weight staged in registers: STAGES chunks in flight
  auto load_w = [&](Stage& s, int c) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s.w[rt][h] = ld_stream(wrow[rt][h] + c * 4);
#if BLOCK == 32
        s.s[rt][h] = srow[rt][h][c * 4];
#else
        s.s[rt][h] = *(const u16*)(srow[rt][h] + c * 8);
#endif
      }
  };
#endif
  // the activation pair matching weight pair i = 2 (j % 2) + h of word v = j / 2 of a chunk (MMA j), from the 16
  // bytes x = s.x[mt][v] (elements 8v + i, 8v + i + 4 of the thread's 32; placed codes: 8v + 2i, + 1)
  auto bpair = [](const U4& x, int j, int h) { return x_pair(x, 2 * (j & 1) + h); };
  auto scale_pairs = [&](const Stage& s, int rt, u32 (&sc)[2][2]) {  // [row half][16-element half of the 32]
#pragma unroll
    for (int h = 0; h < 2; ++h) row_scale_pairs(scale_table, s.s[rt][h], sc[h]);
  };
  // MMA j's A fragment of row tile rt: pairs 2j (k-slots 2q, 2q+1) and 2j + 1 (2q + 8, 2q + 9) of rows g, g + 8
  auto a_frag = [](const Stage& s, int rt, int j, const u32 (&sc)[2][2], u32 (&a)[4]) {
    const int v = j >> 1, i = (j & 1) * 2;
    const u32 w0 = word(s.w[rt][0], v), w1 = word(s.w[rt][1], v);
    a[0] = mul_bf16x2(decode_pair(w0, i), sc[0][v >> 1]);
    a[1] = mul_bf16x2(decode_pair(w1, i), sc[1][v >> 1]);
    a[2] = mul_bf16x2(decode_pair(w0, i + 1), sc[0][v >> 1]);
    a[3] = mul_bf16x2(decode_pair(w1, i + 1), sc[1][v >> 1]);
  };
#if XDIRECT
  // many tokens: the activation is read where it is used, 16 bytes a token at a time, rather than held for the
  // whole chunk (MT * 16 registers); each accumulator still adds MMAs j = 0 .. 7 in order, so the sums are those
  // of the staged launch bit for bit
  auto compute = [&](const Stage& s, int c) {
    u32 sc[RT][2][2];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) scale_pairs(s, rt, sc[rt]);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      u32 a[RT][2][4];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) a_frag(s, rt, 2 * v + jj, sc[rt], a[rt][jj]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const U4 x = ld_x(mt, c, v);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * v + jj;
          const u32 b0 = bpair(x, j, 0), b1 = bpair(x, j, 1);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
            mma(acc[rt][mt], a[rt][jj][0], a[rt][jj][1], a[rt][jj][2], a[rt][jj][3], b0, b1);
        }
      }
    }
  };
#else
  auto compute = [&](const Stage& s, int) {
    u32 b[MT][16];  // made once, used by every row tile
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        b[mt][2 * j] = bpair(s.x[mt][j >> 1], j, 0);
        b[mt][2 * j + 1] = bpair(s.x[mt][j >> 1], j, 1);
      }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      u32 sc[2][2];
      scale_pairs(s, rt, sc);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        u32 a[4];
        a_frag(s, rt, j, sc, a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma(acc[rt][mt], a[0], a[1], a[2], a[3], b[mt][2 * j], b[mt][2 * j + 1]);
      }
    }
  };
#endif
#if RING
  extern __shared__ __align__(16) unsigned char smem[];
  Slot* ring = (Slot*)smem + warp * RING;
  auto issue = [&](int u, int slot) {  // this warp's u-th chunk into ring slot `slot` (u % RING)
    Slot& sl = ring[slot];
    const int c = chunk(u);
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        cp_async16(&sl.w[rt][h][lane], wrow[rt][h] + c * 4);
        cp_async_scales(&sl.s[rt][h][g][0], srow[rt][h] + c * (128 / BLOCK), q == 0);
      }
  };
#pragma unroll
  for (int u = 0; u < RING - 1; ++u) {
    if (u < mine) issue(u, u);
    cp_async_commit();
  }
  build_scale_table(scale_table);
  __syncthreads();
  wait_prior_grid();  // the weight's first chunks are on their way; the activation is read from here on
#if FOLD
  fold_prepare(x_in, (float*)sx, M, Kp);
#endif
  Stage cur;
  if (mine > 0) load_x(cur, chunk(0));
  for (int u0 = 0; u0 < mine; u0 += RING) {  // RING chunks an iteration: every slot index a constant
#pragma unroll
    for (int r = 0; r < RING; ++r) {
      const int u = u0 + r;
      if (u < mine) {
        __syncwarp();  // every lane is done with the slot the next copy overwrites
        if (u + RING - 1 < mine) issue(u + RING - 1, (r + RING - 1) % RING);
        cp_async_commit();
        cp_async_wait_ring();
        __syncwarp();  // and the scale codes other lanes copied are visible
        const Slot& sl = ring[r];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            cur.w[rt][h] = sl.w[rt][h][lane];
#if BLOCK == 32
            cur.s[rt][h] = ((const u8*)sl.s[rt][h][g])[q];
#else
            cur.s[rt][h] = ((const u16*)sl.s[rt][h][g])[q];
#endif
          }
#if XNEXT
        Stage nxt;
        if (u + 1 < mine) load_x(nxt, chunk(u + 1));
        compute(cur, chunk(u));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int v = 0; v < 4; ++v) cur.x[mt][v] = nxt.x[mt][v];
#else
        compute(cur, chunk(u));
        if (u + 1 < mine) load_x(cur, chunk(u + 1));
#endif
      }
    }
  }
#else
  Stage st[STAGES];
#pragma unroll
  for (int u = 0; u < STAGES; ++u)
    if (u < mine) load_w(st[u], chunk(u));
  build_scale_table(scale_table);
  __syncthreads();
  wait_prior_grid();  // the weight's first chunks are on their way; the activation is read from here on
#if FOLD
  fold_prepare(x_in, (float*)sx, M, Kp);
#endif
#pragma unroll
  for (int u = 0; u < STAGES; ++u)
    if (u < mine) load_x(st[u], chunk(u));
  for (int s0 = 0; s0 < mine; s0 += STAGES) {
#pragma unroll
    for (int u = 0; u < STAGES; ++u) {
      if (s0 + u < mine) {
        compute(st[u], chunk(s0 + u));
        if (s0 + u + STAGES < mine) {
          load_w(st[u], chunk(s0 + u + STAGES));
          load_x(st[u], chunk(s0 + u + STAGES));
        }
      }
    }
  }

#endif

  // the warps' sums, added in warp order
#if WK > 1
#if RING
  __syncthreads();  // every warp is done with its ring, which now holds the warps' sums
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  float(*red)[RT * MT * 4][32] = (float(*)[RT * MT * 4][32])smem + wn * (WK - 1);
  if (wk > 0) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[wk - 1][(rt * MT + mt) * 4 + i][lane] = acc[rt][mt][i];
  }
  __syncthreads();
  if (wk > 0) return;
#pragma unroll
  for (int w = 0; w < WK - 1; ++w)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rt][mt][i] += red[w][(rt * MT + mt) * 4 + i][lane];
#endif
#if !SPLIT
  const float sw0 = sw[0];
#endif
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = n0 + rt * 16 + g + (i >> 1) * 8, m = mt * 8 + 2 * q + (i & 1);
        if (m >= M) continue;
        const float v = acc[rt][mt][i] * 256.f;  // the 2^-8 of the decoded weight
#if SPLIT
        store(y, ((long)by * M + m) * N + n, v);
#else
        const float alpha = (SX_ROW ? sx[m] : SX0) * sw0;
#if BIAS
        store(y, (long)m * N + n, fmaf(v, alpha, to_float(bias, n)));
#else
        store(y, (long)m * N + n, v * alpha);
#endif
#endif
      }
}
// MIN_BLOCKS: blocks a multiprocessor must fit, which caps the registers a thread (CudaTile.min_blocks)
#if !GROUP
extern "C" __global__ void __launch_bounds__(WN * WK * 32, MIN_BLOCKS) sharq_nvfp4_mma(
    const U4* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ a, void* __restrict__ y,
    const float* __restrict__ sx, const float* __restrict__ sw, const void* __restrict__ bias, int M, int N,
    int Kp, int lda, int chunks_per_split) {
  gemm_block(codes, scales, a, y, sx, sw, bias, M, N, Kp, lda, chunks_per_split, blockIdx.x, blockIdx.y);
}
#else
""" + GROUP_ENTRY.replace("NAME", "sharq_nvfp4_mma_group").replace("BOUNDS", "WN * WK * 32, MIN_BLOCKS").replace(
    "BLOCK_FN", "gemm_block") + r"""#endif
"""

_OUT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_BIAS = {None: 0, torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
MAX_M = 64  # tokens per launch: up to eight n8 tiles
_RING_WEIGHTS = 1 << 24  # up to 8 tokens, larger weights stream through the cp.async ring (choose_tile)


@dataclass(frozen=True)
class CudaTile:
    """A launch of the CUDA kernel: row tiles of 16 per warp, warps per block that split K, chunks in flight per
    warp, K splits over blocks, groups of such warps per block on neighbouring rows, and whether the activation
    is read where it is used rather than staged for a chunk."""

    rt: int = 1
    wk: int = 8
    stages: int = 4
    splits: int = 1
    ring: int = 0  # > 0: the weight goes through a cp.async ring of this many chunks per warp (stages unused)
    wn: int = 1
    direct: bool = False
    min_blocks: int = 0  # blocks a multiprocessor must hold (a register cap); 0: 2 up to 16 tokens with wn = 1, else 1
    placed: bool = False  # the kernel that reads codes in kernels/placed.py's layout (the packed-placed backend's)

    @property
    def rows(self) -> int:
        """Weight rows a block takes."""
        return 16 * self.rt * self.wn

    @property
    def threads(self) -> int:
        return 32 * self.wk * self.wn


def fits(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int,
         bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """Whether the kernel runs this product: the weight's side (weight_fits) and an activation on the GPU with
    K = Kp and 16-byte aligned rows."""
    m, k = a.shape
    return (a.is_cuda and k == codes.shape[1] * 2 and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0
            and weight_fits(codes, scales, fmt, block, bias, out_dtype, m))


def weight_fits(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, bias: torch.Tensor | None,
                out_dtype: torch.dtype, m: int) -> bool:
    """Whether the kernel runs this weight for M = m tokens: NVFP4 weights, whole 128-element chunks, whole
    16-row tiles, at most MAX_M tokens (more where the wgmma kernel's token tiles take them), 16-byte aligned rows
    (8-byte aligned scale rows: the ring copies them in 4 or 8 bytes), on a GPU with bf16 tensor cores."""
    n, kp = codes.shape[0], codes.shape[1] * 2
    return (fmt == "nvfp4" and block in (16, 32) and 0 < m and kp % 128 == 0 and n % 16 == 0
            and codes.is_cuda and out_dtype in _OUT and (bias is None or bias.dtype in _BIAS)
            and codes.is_contiguous() and scales.is_contiguous() and scales.data_ptr() % 8 == 0
            and codes.data_ptr() % 16 == 0 and (bias is None or bias.is_contiguous())
            and _capability(codes.device) >= (8, 0) and available()
            and (m <= MAX_M or _wgmma_tile(m, n, kp, codes.device) is not None))


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgmma_tile(m: int, n: int, kp: int, device: torch.device) -> cuda_wgmma.WgmmaTile | None:
    """cuda_wgmma.choose_tile's launch on this device, None where it takes none or the kernel failed to compile."""
    return None if _wgmma_broken else cuda_wgmma.choose_tile(m, n, kp, _capability(device), _multiprocessors(device))


_broken: list[str] = []  # why the kernel could not be compiled here (then packed_matmul keeps to Triton)
_wgmma_broken: list[str] = []  # why the wgmma kernel could not be (then the decode kernel takes its shapes)
_bulk_broken: list[str] = []  # why its bulk-copy variant could not be (then the producer warps feed it)


def compile_failed(broken: list[str], e: Exception, what: str, instead: str, stacklevel: int) -> None:
    """Remember in `broken` why a kernel could not be compiled here (its caller's path is then off) and say so in
    a warning, which names what runs instead."""
    broken.append(f"{type(e).__name__}: {e}")
    warnings.warn(f"sharq: {what} could not be compiled ({broken[0][:300]}); {instead}", stacklevel=stacklevel + 1)


def available() -> bool:
    """Whether this torch can compile the kernel (NVRTC through torch.cuda._compile_kernel) and it has not failed."""
    return hasattr(torch.cuda, "_compile_kernel") and not _broken


def n8_tiles(m: int) -> int:
    """Tiles of 8 tokens a launch for m tokens (MT): 1, 2, 4 or 8."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def kernel_source(t: CudaTile, mt: int, block: int, out: int, bias: int, sx_row: bool, group: bool = False,
                  fold: Fold | None = None) -> str:
    """The CUDA source of tile t's kernel for mt tiles of 8 tokens, block-`block` weights, output and bias dtype
    codes (_OUT, _BIAS) and a scale per token or not, for one layer (sharq_nvfp4_mma) or a group of layers that
    read one activation (sharq_nvfp4_mma_group): the launch's #defines, then the kernel. With `fold` the launch
    prepares its activation itself (kernels/cuda_activation.py): it takes the layer's input as `a` and, as `sx`,
    a buffer of cuda_activation.buffer_bytes."""
    if fold is not None and sx_row:
        raise ValueError("a folded launch has one tensor scale, not one per token")
    # up to 16 tokens the registers are capped for two blocks a multiprocessor by default (measured 0-15 % faster,
    # same outputs); the 32-token launch needs more than that cap allows without spilling
    min_blocks = t.min_blocks or (2 if mt <= 2 and t.wn == 1 else 1)
    defines = dict(RT=t.rt, MT=mt, WK=t.wk, WN=t.wn, STAGES=t.stages, BLOCK=block, OUT=out, BIAS=bias,
                   SX_ROW=int(sx_row), SPLIT=int(t.splits > 1), RING=t.ring, XDIRECT=int(t.direct),
                   XNEXT=int(mt <= 2 and not t.direct), MIN_BLOCKS=min_blocks, GROUP=int(group),
                   PLACED=int(t.placed), **(fold.defines() if fold else {"FOLD": 0}))
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE


@functools.lru_cache(maxsize=None)
def _compile(device_index: int, source: str, shared_bytes: int, name: str = "sharq_nvfp4_mma",
             arch_suffix: str = ""):
    """The kernel compiled for this GPU (NVRTC, once per source; `arch_suffix` "a" for sm_90a's wgmma), its dynamic
    shared memory allowed."""
    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        kernel = torch.cuda._compile_kernel(source, name, compute_capability=f"{major}{minor}{arch_suffix}",
                                            nvcc_options=["-std=c++17"])
        if shared_bytes >= 48 * 1024:
            kernel.set_shared_memory_config(shared_bytes)
        return kernel


def _kernel(device_index: int, t: CudaTile, mt: int, block: int, out: int, bias: int, sx_row: bool,
            group: bool = False, fold: Fold | None = None):
    """The decode kernel compiled for tile t (kernel_source's arguments), its shared memory allowed."""
    return _compile(device_index, kernel_source(t, mt, block, out, bias, sx_row, group, fold),
                    _shared_bytes(t, mt, block), "sharq_nvfp4_mma_group" if group else "sharq_nvfp4_mma")


def _shared_bytes(t: CudaTile, mt: int, block: int) -> int:
    """Dynamic shared memory of a launch: the warps' rings (if any), which the warps' sums reuse at the end."""
    slot = t.rt * 2 * 32 * 16 + t.rt * 2 * 8 * 4 * (2 if block == 16 else 1)
    return max(t.wn * t.wk * t.ring * slot, t.wn * (t.wk - 1) * t.rt * mt * 4 * 32 * 4)


def choose_tile(m: int, n: int, kp: int, device: torch.device) -> CudaTile:
    """Blocks of 8 warps (4 for layers wider than 4096 and than K, which have blocks enough; 8 warps on 70B's
    8192 x 8192 and 28672 x 8192 ran 1.2-1.3 x faster at 16 tokens, 1.03-1.09 x at one), K split over blocks
    until the multiprocessors have a 16-row tile each. Up to 8 tokens the activation is read where it is used; a
    weight of more than 2^24 elements goes through a cp.async ring per warp: from 2 tokens two row tiles a warp where
    N is at least twice K, 3 chunks, and at most 64 registers a thread (32 warps a multiprocessor: 896 blocks of
    4096 x 28672 in one wave rather than 1.13; at one token one row tile: prepare + GEMM 1.10 x there, 1.18 x on
    8192 x 28672); at 8 tokens two row tiles, uncapped, on 8-warp layers wider than 4096 (70B's o_proj and down:
    1.08 and 1.20 x); else one row tile, 4 chunks with 4 warps and K > 4096, otherwise 3; smaller weights are
    staged in registers, two chunks in flight. Row tiles change no sum, so they may follow M. 9 to 16 and 33 to 64
    tokens:
    two row tiles (the activation's loads serve twice the weight), one chunk in flight, the activation read where
    used (with one row tile, N not a multiple of 32: staged, two chunks in flight up to 16 tokens; the ring
    above 32). 17 to 32: the ring, the activation staged, two row tiles where N > 2048. From the sweeps of
    `bench_gemm.py --cuda-sweep` (docs/PERF.md), H200; up to 8 tokens on the ring from `bench_gemm.py --ring`
    and the warps from `bench_gemm.py --k-partition` (H100). The K partition (wk, splits) depends on the layer's
    shape alone, so a token's output does not change with the batch."""
    wk = 8 if n <= 4096 or n <= kp else 4
    two_rows = n % 32 == 0
    min_blocks = 0
    if m <= 8 and n * kp > _RING_WEIGHTS:
        wide, deep = n >= 2 * kp and m > 1, wk == 8 and n > 4096 and m == 8
        rt, stages, direct = (2 if two_rows and (wide or deep) else 1), 1, True
        ring = 4 if rt == 1 and wk == 4 and kp > 4096 else 3
        if wide:
            min_blocks = 32 // wk
    elif m <= 8:
        rt, stages, ring, direct = 1, 2, 0, True
    elif m <= 16:
        rt, stages, ring, direct = (2, 1, 0, True) if two_rows else (1, 2, 0, False)
    elif m <= 32:
        rt, stages, ring, direct = (2 if two_rows and n > 2048 else 1), 1, 3, False
    else:
        rt, stages, ring, direct = (2, 1, 0, True) if two_rows else (1, 1, 3, True)
    rows, chunks, splits = n // 16, kp // 128, 1  # counted in 16-row tiles, whatever rt: the same K split at every M
    while rows * splits < _multiprocessors(device) and chunks // (splits * 2) >= 2 * wk:
        splits *= 2
    return CudaTile(rt, wk, stages, splits, ring, direct=direct, min_blocks=min_blocks)


@dataclass(frozen=True)
class _Launch:
    """Everything about a launch that depends on the shapes alone, worked out once per shape (the eager per-call
    cost is then the output's allocation and one cuLaunchKernel)."""

    kernel: DriverKernel
    device: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    splits: int
    chunks_per_split: int

    def output(self, shape: tuple[int, ...], out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """What the kernel writes for one layer's y of `shape` [..., n]: y itself, or with a K split its fp32
        partials [splits, M, n]."""
        if self.splits > 1:
            return torch.empty((self.splits, math.prod(shape[:-1]), shape[-1]), dtype=torch.float32, device=device)
        return torch.empty(shape, dtype=out_dtype, device=device)

    def fixed(self, ptrs: tuple[int, ...], ints: tuple[int, ...], slots: tuple[int, ...]) -> Callable[..., None]:
        """start's launch with the pointers at `slots` passed by each call, the rest fixed (DriverKernel.fixed), on
        the current stream (its device current)."""
        return self.kernel.fixed(self.grid, self.block, self.shared_bytes,
                                 torch._C._cuda_getCurrentRawStream(self.device), ptrs, ints, slots)

    def start(self, ptrs: tuple[int, ...], ints: tuple[int, ...]) -> None:
        """cuLaunchKernel on the launch's device's current stream."""
        if self.device == torch.cuda.current_device():
            self.kernel(self.grid, self.block, self.shared_bytes, torch._C._cuda_getCurrentRawStream(self.device),
                        ptrs, ints)
        else:  # a model spread over several GPUs: launch in that device's context
            with torch.cuda.device(self.device):
                self.kernel(self.grid, self.block, self.shared_bytes,
                            torch._C._cuda_getCurrentRawStream(self.device), ptrs, ints)


def _build(device: int, t: CudaTile | cuda_wgmma.WgmmaTile, m: int, n: int, k: int, block: int, out: int,
           bias: int, sx_row: bool, group: bool = False, fold: Fold | None = None) -> _Launch:
    """Tile t's launch (either kernel; one layer's entry or the group entry) for m tokens of width n, its kernel
    compiled, programmatic (launch.PROGRAMMATIC_LAUNCH) where _programmatic says. `fold`: the decode kernel's launch
    that prepares its activation itself (kernel_source)."""
    tiles = cuda_wgmma.token_tiles(m, t) if isinstance(t, cuda_wgmma.WgmmaTile) else 1
    if tiles > 65535:  # the grid's z limit
        raise ValueError(f"{t} takes {m} tokens in {tiles} token tiles, more than a grid's 65535: use wider tiles")
    programmatic = _programmatic(device, m, n, k)
    if fold is not None and isinstance(t, cuda_wgmma.WgmmaTile):
        raise ValueError(f"{t}: only the decode kernel's launches fold the prepare")
    if isinstance(t, cuda_wgmma.WgmmaTile):
        shared = cuda_wgmma.shared_bytes(t)
        kernel = _compile(device, cuda_wgmma.kernel_source(t, block, out, bias, sx_row, group), shared,
                          cuda_wgmma.GROUP_NAME if group else cuda_wgmma.NAME, "a")
    else:
        mt = n8_tiles(m)
        shared, kernel = _shared_bytes(t, mt, block), _kernel(device, t, mt, block, out, bias, sx_row, group, fold)
    params = "p" * 17 + "i" * 9 if group else "p" * 7 + "i" * 5
    return _Launch(DriverKernel(kernel.func.value, params, programmatic), device, (n // t.rows, t.splits, tiles),
                   (t.threads, 1, 1), shared, t.splits, -(-(k // 128) // t.splits))


def _programmatic(device: int, m: int, n: int, k: int) -> bool:
    """Whether a launch for m tokens of an [n, k] weight may start while the prepare kernel before it runs
    (programmatic dependent launch, Hopper and later): where that measured faster, more than 8 tokens, or up to
    8 on the kernels that stage a chunk in registers (at most 2^24 weights) or give a warp two row tiles (N >= 2 K)
    (H200, `python benchmarks/bench_gemm.py --programmatic`, prepare + GEMM in a graph on the 8B and 70B shapes:
    0.5-1.9 µs less a layer, 4096 x 28672 at 8 tokens 38.9 -> 35.7). The one-row-tile cp.async ring never gained
    and lost on deep layers: 8192 x 10240 at one token 25.9 -> 31.1 µs, 28672 x 8192 62.6 -> 98.9, and 4096 x 6144
    at 4 and 6 tokens 13.3 -> 16.1 and 15.9 -> 18.9, likely because blocks started beside the prepare's leave part
    of the GEMM's first wave for a second."""
    return _capability(device) >= (9, 0) and (m > 8 or n * k <= _RING_WEIGHTS or n >= 2 * k)


class _NoWgmma(RuntimeError):
    """More than MAX_M tokens and no wgmma launch for them: the caller decodes the weight for cuBLAS instead."""


@functools.lru_cache(maxsize=4096)
def _launch(device: int, m: int, n: int, k: int, block: int, out: int, bias: int, sx_row: bool,
            tile: CudaTile | cuda_wgmma.WgmmaTile | None, placed: bool = False, fold: Fold | None = None) -> _Launch:
    """The launch for one layer (_build): choose_tile's, or where cuda_wgmma.choose_tile takes the shape (17-64
    tokens on large layers and its token tiles above, Hopper) or `tile` is a WgmmaTile, the wgmma kernel's, with
    the same arguments. The decode kernel takes at most MAX_M tokens. `placed`: the codes are in
    kernels/placed.py's layout (the tile's kernel variant that reads it); `fold` as _build's (a CudaTile's)."""
    if fold is not None:
        if not isinstance(tile, CudaTile) or n % tile.rows:
            raise ValueError(f"a folded launch needs its CudaTile (the fold depends on its threads), N a multiple of "
                             f"its rows: got {tile} for N = {n}")
        return _build(device, replace(tile, placed=True) if placed else tile, m, n, k, block, out, bias, sx_row,
                      fold=fold)
    asked = isinstance(tile, cuda_wgmma.WgmmaTile)
    w = tile if asked else None if tile else _wgmma_tile(m, n, k, torch.device("cuda", device))
    if w is not None and placed:
        w = replace(w, placed=True)
    if w is not None:
        if n % w.rows:
            raise ValueError(f"{w} needs N a multiple of {w.rows}")
        try:
            return _build(device, w, m, n, k, block, out, bias, sx_row)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an NVRTC without sm_90a: the decode kernel takes these shapes
            if asked:
                raise
            compile_failed(_wgmma_broken, e, "the wgmma GEMM",
                           "using the decode kernel up to 64 tokens and decode + cuBLAS above", stacklevel=4)
    if m > MAX_M:
        if tile is not None:
            raise ValueError(f"the decode kernel takes at most {MAX_M} tokens, got {m} for {tile}")
        raise _NoWgmma(f"no wgmma launch for {m} tokens")
    t = tile or choose_tile(m, n, k, torch.device("cuda", device))
    if n % t.rows:
        raise ValueError(f"CudaTile rt={t.rt} wn={t.wn} needs N a multiple of {t.rows}, got {n}")
    return _build(device, replace(t, placed=True) if placed else t, m, n, k, block, out, bias, sx_row)


@dataclass(frozen=True)
class _GroupLaunch:
    """A launch of the group kernel: the launch as _Launch has it, and the block columns of each layer."""

    launch: _Launch
    blocks: tuple[int, ...]


GROUP_MAX = 3  # layers one group launch takes (q/k/v)


def group_tile(m: int, ns: tuple[int, ...], k: int, device: torch.device) -> CudaTile | cuda_wgmma.WgmmaTile | None:
    """The launch for layers of widths `ns` that read one activation [m, k] as one group: the tile the launch plan
    picks for their summed width (the wgmma kernel's where cuda_wgmma.choose_tile takes it, else choose_tile's),
    where that measured faster than a launch per layer (H200, `python benchmarks/bench_gemm.py --groups`): on the
    decode kernel up to 8 tokens (8B q/k/v at one token 17.4 -> 9.7 µs, gate/up 35.8 -> 29.1), and above 8 unless
    every layer alone would sum in the group's order (the same warps splitting K, no K split over blocks: wide
    layers such as gate/up, which lost up to 12 % grouped at 16-24; q/k/v, whose narrow k and v split K alone, won:
    24.7 -> 14.0 µs at 16 tokens), so that where the choice changes with M the outputs do not (batch invariance);
    on the wgmma kernel where a layer alone would split K, or would not run on it and has at most 2^26 weights
    (8B gate/up at 32 tokens 71.7 -> 57.4 µs, at 64 76.4 -> 64.1; 70B gate/up, whose layers alone fill the GPU,
    lost 11 % at 32 tokens, where its layers alone take the decode kernel at 1.1 TB/s, and 2-3 % at 48-64), the
    same rule for its token tiles above MAX_M. None elsewhere (the layers launch one by one)."""
    if not 2 <= len(ns) <= GROUP_MAX:
        return None
    n = sum(ns)
    wgmma = _wgmma_tile(m, n, k, device)
    if wgmma is not None:
        alone = [_wgmma_tile(m, w, k, device) for w in ns]
        return wgmma if any(t.splits > 1 if t else w * k <= 1 << 26 for t, w in zip(alone, ns)) else None
    if m > MAX_M:
        return None
    group = choose_tile(m, n, k, device)
    if m > 8 and all(_same_sums(choose_tile(m, w, k, device), group) for w in ns):
        return None
    return group


def _same_sums(a: CudaTile, b: CudaTile) -> bool:
    """Whether two decode-kernel launches add a token's products in the same order (same K partition): the rest of
    a tile (row tiles, stages, ring, row groups, where the activation is read) changes no bit (GPU tests)."""
    return (a.wk, a.splits) == (b.wk, b.splits)


@functools.lru_cache(maxsize=1024)
def _group_launch(device: int, m: int, ns: tuple[int, ...], k: int, block: int, out: int, bias: int, sx_row: bool,
                  tile: CudaTile | cuda_wgmma.WgmmaTile | None, placed: bool = False, fold: Fold | None = None
                  ) -> _GroupLaunch | None:
    """One launch for layers of widths `ns` that read one activation, with `tile` or group_tile's, or None where
    group_tile says none or a layer is not a whole number of the tile's blocks. With a K split over blocks each
    layer gets its own fp32 partials. `placed`, `fold` as _launch."""
    t = tile or group_tile(m, ns, k, torch.device("cuda", device))
    if t is None or not 2 <= len(ns) <= GROUP_MAX:
        return None
    if any(w % t.rows for w in ns):
        return None
    t = replace(t, placed=True) if placed else t
    return _GroupLaunch(_build(device, t, m, sum(ns), k, block, out, bias, sx_row, group=True, fold=fold),
                        tuple(w // t.rows for w in ns))


def group_launcher(weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], biases: list[torch.Tensor | None],
                   fmt: str, block: int, lead: tuple[int, ...], sx_rows: bool, out_dtype: torch.dtype,
                   placed: bool = False, tile: CudaTile | cuda_wgmma.WgmmaTile | None = None,
                   fold: Fold | None = None) -> Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]] | None:
    """The products of one activation [M, K] (M = prod(lead), contiguous) with several layers' weights ((codes,
    scales, sw) each; the layers that read one input, as q/k/v) in one launch, worked out once: (a, sx) -> [y per
    layer, [*lead, N_i]], each as `launcher`'s would be for its layer with the group's tile. None where one launch
    does not run them (_group_launch; the layers disagree in K, device or bias dtype; a weight the kernel does not
    take). `placed`: the codes are in kernels/placed.py's layout; `tile`: bulk_group_launcher's launch, or
    fold_group_launcher's with its `fold` (then a is the layers' input and sx the fold's buffer)."""
    m = math.prod(lead)
    codes0 = weights[0][0]
    bias_dtypes = {None if b is None else b.dtype for b in biases}
    # each weight as the kernel takes it; the tokens are the group launch's to take (group_tile, on the summed
    # width: above MAX_M q/k/v's narrow k and v, which no launch of theirs would take alone, join q's token tiles)
    if (len(bias_dtypes) > 1 or any(c.shape[1] != codes0.shape[1] or c.device != codes0.device
                                    or not (sw.numel() == 1 and sw.dtype == torch.float32 and sw.is_contiguous())
                                    or not weight_fits(c, s, fmt, block, b, out_dtype, min(m, MAX_M))
                                    for (c, s, sw), b in zip(weights, biases))):
        return None
    device = codes0.get_device()
    try:
        plan = _group_launch(device, m, tuple(c.shape[0] for c, _, _ in weights), codes0.shape[1] * 2, block,
                             _OUT[out_dtype], _BIAS[bias_dtypes.pop()], sx_rows and m > 1, tile, placed, fold)
    except Exception as e:  # noqa: BLE001 - as _try_launch: no NVRTC here, the layers launch one by one
        warnings.warn(f"sharq: the CUDA group GEMM could not be compiled ({type(e).__name__}: {str(e)[:300]})",
                      stacklevel=2)
        return None
    if plan is None:
        return None
    return _group_run(plan, weights, biases, lead, out_dtype, sx_rows and m > 1, planned=True)


def bulk_group_launcher(weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        biases: list[torch.Tensor | None], fmt: str, block: int, lead: tuple[int, ...], sx_rows: bool,
                        out_dtype: torch.dtype, placed: bool = False
                        ) -> tuple[Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]], int] | None:
    """`group_launcher` on the wgmma kernel's bulk-copy variant, where the group's launch is the wgmma kernel's
    and cuda_wgmma.bulk_tile has a variant of it: (run, tokens) as bulk_launcher's; None elsewhere."""
    codes0 = weights[0][0]
    if not codes0.is_cuda:
        return None
    ns, kp = tuple(c.shape[0] for c, _, _ in weights), codes0.shape[1] * 2
    tile = _bulk_tile(group_tile(math.prod(lead), ns, kp, codes0.device), sum(ns), kp, codes0.device)
    run = None if tile is None else group_launcher(weights, biases, fmt, block, lead, sx_rows, out_dtype, placed,
                                                    tile)
    return None if run is None else (run, tile.tokens)


def _bulk_tile(t: CudaTile | cuda_wgmma.WgmmaTile | None, n: int, kp: int, device: torch.device
               ) -> cuda_wgmma.WgmmaTile | None:
    """cuda_wgmma.bulk_tile's variant of launch t on this device; None where t is not the wgmma kernel's or the
    bulk copies failed to compile here."""
    if _bulk_broken or not isinstance(t, cuda_wgmma.WgmmaTile):
        return None
    return cuda_wgmma.bulk_tile(t, n, kp, _multiprocessors(device))


def nvfp4_mma_group(a: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    biases: list[torch.Tensor | None], block: int, sx: torch.Tensor, out_dtype: torch.dtype,
                    tile: CudaTile | cuda_wgmma.WgmmaTile | None = None, placed: bool = False
                    ) -> list[torch.Tensor] | None:
    """[α_i · (a · Ŵ_iᵀ) + bias_i] for the layers' weights ((codes, scales, sw) each) in one launch, with `tile`
    (default: the launch plan's for their summed width), or None where one launch does not take them. `placed`:
    the codes are in kernels/placed.py's layout."""
    m, k = a.shape
    plan = _group_launch(a.get_device(), m, tuple(c.shape[0] for c, _, _ in weights), k, block, _OUT[out_dtype],
                         _BIAS[None if biases[0] is None else biases[0].dtype], sx.numel() > 1, tile, placed)
    return None if plan is None else _group_run(plan, weights, biases, (m,), out_dtype, sx.numel() > 1)(a, sx)


def _row_stride(a: torch.Tensor) -> int:
    """The elements between a's rows: a [M, K] activation's, or a folded launch's input [..., K] (contiguous)."""
    return a.stride(0) if a.dim() == 2 else a.shape[-1]


def _starter(launch: _Launch, template: tuple[int, ...], slots: tuple[int, ...],
             ints: Callable[[torch.Tensor], tuple[int, ...]], planned: bool
             ) -> Callable[[tuple[int, ...], torch.Tensor], None]:
    """(values, a) -> launch.start of the pointers `template` with values[i] at slots[i] (a call's activation,
    output and scale pointers) and the int arguments ints(a) of its activation a. `planned` (a launch plan's,
    called again and again with contiguous activations of one shape, so the same ints): after the first call on a
    thread and stream, calls launch fixed (launch.DriverKernel.fixed), passing the values alone."""
    fixed = FixedLaunches(launch.device) if planned else None

    def start(values: tuple[int, ...], a: torch.Tensor) -> None:
        current = fixed is not None and torch._C._cuda_getDevice() == launch.device
        hit = fixed.get() if current else None
        if hit is not None:
            hit(*values)
            return
        ptrs, sizes = list(template), ints(a)
        for slot, value in zip(slots, values):
            ptrs[slot] = value
        launch.start(ptrs, sizes)
        if current:
            fixed.put(launch.fixed(ptrs, sizes, slots))

    return start


def _group_run(plan: _GroupLaunch, weights, biases, lead: tuple[int, ...], out_dtype: torch.dtype, sx_row: bool,
               planned: bool = False) -> Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """(a, sx) -> [y per layer, each [*lead, N_i]] for activations a [M, K] (M = prod(lead), unit column stride)
    and sx fp32, contiguous ([M, 1] where `sx_row`, else [1, 1]): the group's pointers and sizes, which depend on
    the weights alone, and its K-split epilogue worked out once. `planned`: the launch is a plan's (_starter)."""
    from .epilogue import reduce_scale_and_bias_launcher

    launch, m, pad = plan.launch, math.prod(lead), GROUP_MAX - len(weights)
    shapes = [(*lead, c.shape[0]) for c, _, _ in weights]
    device = weights[0][0].device

    def outputs() -> list[torch.Tensor]:
        return [launch.output(shape, out_dtype, device) for shape in shapes]

    epilogue = None
    if launch.splits > 1:  # the fp32 partials the epilogue reads: the same tensors call after call
        outputs = plan_buffers(outputs, 4 * launch.splits * m * sum(s[-1] for s in shapes), launch.device)
        epilogue = reduce_scale_and_bias_launcher(launch.splits, shapes, [sw for _, _, sw in weights], biases,
                                                  sx_row, out_dtype, device)
    codes, scales, sws = ([t.data_ptr() for t in ts] + [0] * pad for ts in zip(*weights))
    sizes = (launch.chunks_per_split, plan.blocks[0], plan.blocks[1] if len(plan.blocks) > 2 else 1 << 30,
             *[c.shape[0] for c, _, _ in weights], *[0] * pad)
    biased = [None if b is None else b.data_ptr() for b in biases]

    y_at, a_at = 2 * GROUP_MAX, 5 * GROUP_MAX  # where the outputs' and a's pointers are among the parameters
    unbiased = tuple(4 * GROUP_MAX + i for i, b in enumerate(biased) if b is None)  # sx's pointer in a bias's place
    template = (*codes, *scales, *[0] * GROUP_MAX, *sws, *[b or 0 for b in biased], *[0] * pad, 0, 0)
    start = _starter(launch, template, (*range(y_at, y_at + len(weights)), a_at, a_at + 1, *unbiased),
                     lambda a: (m, a.shape[-1], _row_stride(a), *sizes), planned)

    def run(a: torch.Tensor, sx: torch.Tensor) -> list[torch.Tensor]:
        ys = outputs()
        sx_ptr = sx.data_ptr()
        start((*[y.data_ptr() for y in ys], a.data_ptr(), sx_ptr, *[sx_ptr] * len(unbiased)), a)
        return ys if epilogue is None else epilogue(ys, sx)  # with a K split: the layers' partials in one launch

    return run


def nvfp4_mma(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block: int, sx: torch.Tensor,
              sw: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
              tile: CudaTile | cuda_wgmma.WgmmaTile | None = None, placed: bool = False) -> torch.Tensor | None:
    """α · (a · Ŵᵀ) + bias [M, N] in out_dtype, as gemm.packed_matmul (arguments checked there; sx, sw flat fp32),
    or None where the kernel cannot be compiled here (a warning says why, once). `placed`: the codes are in
    kernels/placed.py's layout."""
    (m, k), n = a.shape, codes.shape[0]
    plan = _try_launch(a.get_device(), m, n, k, block, out_dtype, None if bias is None else bias.dtype,
                       sx.numel() > 1, tile, placed)
    return None if plan is None else _single_run(plan, codes, scales, sw, bias, (m,), out_dtype,
                                                 sx.numel() > 1)(a, sx)


def _try_launch(device: int, m: int, n: int, k: int, block: int, out_dtype: torch.dtype,
                bias_dtype: torch.dtype | None, sx_row: bool, tile: CudaTile | cuda_wgmma.WgmmaTile | None,
                placed: bool = False, fold: Fold | None = None) -> _Launch | None:
    """_launch, or None where the kernel cannot be compiled here (a warning says why, once)."""
    try:
        return _launch(device, m, n, k, block, _OUT[out_dtype], _BIAS[bias_dtype], sx_row, tile, placed, fold)
    except ValueError:
        raise
    except _NoWgmma:
        return None
    except Exception as e:  # noqa: BLE001 - no NVRTC / headers here: the Triton kernels run instead
        if isinstance(tile, cuda_wgmma.WgmmaTile) and tile.bulk:  # bulk_launcher's: the caller takes the plain one
            compile_failed(_bulk_broken, e, "the wgmma kernel's bulk copies", "using its producer warps",
                           stacklevel=4)
            return None
        compile_failed(_broken, e, "the CUDA GEMM", "using the Triton kernels", stacklevel=4)
        return None


def _single_run(plan: _Launch, codes: torch.Tensor, scales: torch.Tensor, sw: torch.Tensor,
                bias: torch.Tensor | None, lead: tuple[int, ...], out_dtype: torch.dtype, sx_row: bool,
                planned: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(a, sx) -> y [*lead, N] for activations a [M, K] (M = prod(lead), unit column stride) and sx fp32,
    contiguous ([M, 1] where `sx_row`, else [1, 1]): the pointers that depend on the weight alone, and a K split's
    epilogue, worked out once, so a call allocates y (with a K split, reuses its fp32 partials) and launches.
    `planned`: the launch is a plan's (_starter)."""
    from .epilogue import reduce_scale_and_bias_launcher

    n, m = codes.shape[0], math.prod(lead)
    shape, weight, sw_ptr = (*lead, n), (codes.data_ptr(), scales.data_ptr()), sw.data_ptr()
    bias_ptr = None if bias is None else bias.data_ptr()
    output = functools.partial(plan.output, shape, out_dtype, codes.device)
    epilogue = None
    if plan.splits > 1:
        output = plan_buffers(output, 4 * plan.splits * m * n, plan.device)
        epilogue = reduce_scale_and_bias_launcher(plan.splits, [shape], [sw], [bias], sx_row, out_dtype,
                                                  codes.device)

    unbiased = bias_ptr is None
    # a, y, sx (and sx again in the bias's place) are the call's
    start = _starter(plan, (*weight, 0, 0, 0, sw_ptr, bias_ptr or 0), (2, 3, 4, 6) if unbiased else (2, 3, 4),
                     lambda a: (m, n, a.shape[-1], _row_stride(a), plan.chunks_per_split), planned)

    def run(a: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        y = output()
        sx_ptr = sx.data_ptr()
        start((a.data_ptr(), y.data_ptr(), sx_ptr, sx_ptr) if unbiased else (a.data_ptr(), y.data_ptr(), sx_ptr), a)
        return y if epilogue is None else epilogue((y,), sx)[0]

    return run


def launcher(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, sw: torch.Tensor,
             bias: torch.Tensor | None, lead: tuple[int, ...], sx_rows: bool, out_dtype: torch.dtype,
             placed: bool = False, tile: CudaTile | cuda_wgmma.WgmmaTile | None = None, fold: Fold | None = None
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The product with this weight for activations [M, K] (M = prod(lead); bf16, contiguous, 16-byte aligned: a
    prepare kernel's output) worked out once: an eager layer's plan. Returns (a, sx) -> y [*lead, N], sx the
    activation scale (fp32 [M, 1] if `sx_rows`, else [1, 1]); None where the kernel does not run this weight.
    `placed`: the codes are in kernels/placed.py's layout; `tile`: bulk_launcher's launch instead of the plan's, or
    fold_launcher's with its `fold` (then a is the layer's input and sx the fold's buffer)."""
    m = math.prod(lead)
    if not (weight_fits(codes, scales, fmt, block, bias, out_dtype, m) and sw.numel() == 1
            and sw.dtype == torch.float32 and sw.is_contiguous()):
        return None
    plan = _try_launch(codes.get_device(), m, codes.shape[0], codes.shape[1] * 2, block, out_dtype,
                       None if bias is None else bias.dtype, sx_rows and m > 1, tile, placed, fold)
    if plan is None:
        return None
    return _single_run(plan, codes, scales, sw, bias, lead, out_dtype, sx_rows and m > 1, planned=True)


def bulk_launcher(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, sw: torch.Tensor,
                  bias: torch.Tensor | None, lead: tuple[int, ...], sx_rows: bool, out_dtype: torch.dtype,
                  placed: bool = False) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int] | None:
    """`launcher` on the wgmma kernel's bulk-copy variant, where the launch plan runs the wgmma kernel and
    cuda_wgmma.bulk_tile has a variant of its launch (same sums): (run, tokens), run reading its activation as
    cuda_wgmma.tiled_activation lays it out in tiles of `tokens` (the prepare kernel's `tiled` output); None
    elsewhere (then `launcher`, on the plain activation)."""
    if not codes.is_cuda:
        return None
    n, kp = codes.shape[0], codes.shape[1] * 2
    tile = _bulk_tile(_wgmma_tile(math.prod(lead), n, kp, codes.device), n, kp, codes.device)
    run = None if tile is None else launcher(codes, scales, fmt, block, sw, bias, lead, sx_rows, out_dtype, placed,
                                              tile)
    return None if run is None else (run, tile.tokens)


def _fold_buffer(m: int, k: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A folded launch's buffer (cuda_activation.buffer_bytes: s_x, the ticket, the values), zeroed when made, as
    its s_x [1, 1] fp32 view (what the launch takes as sx, and a K split's epilogue reads). The launch leaves its
    ticket zeroed, so a buffer is zeroed once: eager calls keep one per stream (plan_buffers); CUDA graphs captured
    from this plan share one made with it, so their launches need no zeroing node (such a node took a 4096 × 6144
    layer's graph from 17.4 to 19.1 µs at one token, H100), and, as plan_buffers' graphs, are replayed one after
    another, not at once. A plan
    first made inside a capture has none: each of its calls makes its own, whose zeroing is a node of the graph."""
    nbytes = cuda_activation.buffer_bytes(m, k)

    def make() -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)[:4].view(torch.float32).view(1, 1)

    capturing = torch.cuda.is_current_stream_capturing
    for_graphs = None if capturing() else make()
    kept = plan_buffers(lambda: None if capturing() else make(), nbytes, device.index or 0)

    def buffer() -> torch.Tensor:
        b = kept()
        if b is None:
            b = make() if for_graphs is None else for_graphs
        return b

    return buffer


def _fold(recipe, m: int, n: int, kp: int, tile: CudaTile | cuda_wgmma.WgmmaTile | None) -> Fold | None:
    """The fold of a decode-kernel launch `tile` for m tokens of width n (cuda_activation.fold_for), None for other
    launches and where the launch has fewer blocks than the fold's slices."""
    fold = cuda_activation.fold_for(recipe, m, kp, tile.threads) if isinstance(tile, CudaTile) else None
    return fold if fold is not None and fold.blocks <= n // tile.rows * tile.splits else None


def fold_launcher(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, sw: torch.Tensor,
                  bias: torch.Tensor | None, lead: tuple[int, ...], recipe, out_dtype: torch.dtype,
                  placed: bool = False) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`launcher`'s product with the activation prepared by the launch itself (kernels/cuda_activation.py): x ->
    y [*lead, N] for the layer's input x [M, K] (bf16, contiguous, 16-byte aligned) under `recipe`, the same bits
    as the prepare kernel's launch followed by `launcher`'s; one launch where those are two. None where the
    launch plan's launch is not the decode kernel's or the recipe's prepare does not fold (fold_for)."""
    m = math.prod(lead)
    if not codes.is_cuda or m > MAX_M:
        return None
    n, kp = codes.shape[0], codes.shape[1] * 2
    if _wgmma_tile(m, n, kp, codes.device) is not None:
        return None
    tile = choose_tile(m, n, kp, codes.device)
    fold = _fold(recipe, m, n, kp, tile)
    run = None if fold is None else launcher(codes, scales, fmt, block, sw, bias, lead, False, out_dtype, placed,
                                             tile, fold)
    if run is None:
        return None
    buffer = _fold_buffer(m, kp, codes.device)
    return lambda x: run(x, buffer())


def fold_group_launcher(weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        biases: list[torch.Tensor | None], fmt: str, block: int, lead: tuple[int, ...], recipe,
                        out_dtype: torch.dtype, placed: bool = False
                        ) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """`group_launcher`'s products with the activation prepared by the group's launch itself, as fold_launcher's:
    x -> [y per layer]; None where the group's launch is not the decode kernel's or does not fold."""
    m, codes0 = math.prod(lead), weights[0][0]
    if not codes0.is_cuda or m > MAX_M:
        return None
    kp, ns = codes0.shape[1] * 2, tuple(c.shape[0] for c, _, _ in weights)
    tile = group_tile(m, ns, kp, codes0.device)
    fold = _fold(recipe, m, sum(ns), kp, tile)
    run = None if fold is None else group_launcher(weights, biases, fmt, block, lead, False, out_dtype, placed,
                                                   tile, fold)
    if run is None:
        return None
    buffer = _fold_buffer(m, kp, codes0.device)
    return lambda x: run(x, buffer())
