"""The packed NVFP4 GEMM for 25 to 256 tokens on Hopper's warpgroup MMA (wgmma): the decoded weight as the register
A operand, the activation staged once per block in shared memory as the B operand.

The decode kernel (kernels/cuda_gemm.py) gives every warp its own 16-32 weight rows and has each read the whole
activation, which at 33-64 tokens is 3.6-7 times the weight's bytes, and its accumulators cap it at 8 warps a
multiprocessor (docs/PERF.md). Here a block of two warpgroups takes 128 weight rows and shares one copy of each
128-element chunk of the activation:

- Producer warps (4) read the activation chunk for all 64 token slots (tokens beyond M are zeros), pair elements
  i and i + 4 of each 8 as the weight decode does (kernels/cuda_gemm.py's K-permutation: a thread's 16 bytes of
  a row are 32 consecutive elements, one scale block) and store them as wgmma's K-major B tile in `slots` shared
  buffers (core matrices of 8 tokens x 8 k, no swizzle), then signal the buffer's "full" mbarrier. The stores go
  through the generic proxy, so they are fenced (fence.proxy.async) before the signal.
- Consumer warpgroups stream their 64 rows each (16 per warp, 16 bytes a row per thread, `stages` chunks ahead in
  registers), decode them by bit placement into the A fragments of m64n64k16 (the same fragment as mma.sync's
  m16n8k16 A in each warp), and start 4 wgmmas per half chunk, one half in flight while the next is decoded; once
  a chunk's MMAs are done its buffer's "empty" mbarrier is signalled. No block-wide barrier in the loop.
- fp32 accumulation in the tensor cores, K split over blocks (partials added in order by the epilogue kernel) by
  the layer's shape alone, and a fixed N of 64 tokens: a token's output is the same at every M up to 64.
- Above 64 tokens (prefill) a launch takes M in tiles of `tokens` (wgmma's N, up to 256; grid z), each block
  decoding its rows' weight again: the decode is spread over `tokens` tokens, where the decode into a bf16
  scratch weight + cuBLAS (what those sizes run otherwise) writes and reads 4.5 bytes a weight. There the K split
  also counts the token tiles, so it depends on M.

The bulk-copy variant (`WgmmaTile.bulk`) has no producer warps: the prepare kernel writes the activation tiled
(tiled_activation: each chunk of a token tile the exact image of a B buffer), and one thread fills a buffer with
one `cp.async.bulk`, its bytes counted on the buffer's "full" mbarrier. The consumers are unchanged, so the sums
are too. The packed backend runs it where the prepare's activation feeds that launch alone (bulk_tile;
cuda_gemm.bulk_launcher, bulk_group_launcher): for the token tiles, 1.28-1.57 x the producer warps at 128-512
tokens on an H100, and up to 64 tokens with one consumer warpgroup a block and the K split of two, 1.00-1.61 x on
an H200 (docs/PERF.md, twenty-fourth and twenty-fifth runs).

The staged kernel (`WgmmaTile.staged`; not routed to yet: `python benchmarks/bench_gemm.py --staged` times it) is
the warp-specialized form for prefill sizes, where the loop above is latency bound: the producers (8 warps)
decode the weight into shared memory as wgmma's K-major A tile, each element in its place (no K permutation), and
copy the activation in as it is (cp.async, zeros beyond M), so the consumers only issue MMAs with both operands
in shared memory, and the decode of one chunk runs beside the MMAs of the one before it (two buffers or more).

Measured on an H200 (docs/PERF.md): m64n64k16 wgmma with these operands reaches 635-870 TFLOP/s
(benchmarks/wgmma_peak.py), so the MMA is not what limits this kernel; its loop is latency bound (two consumer warps
a scheduler). It takes over from the decode kernel where that measured faster: 33-64 tokens on layers of more
than 2^24 weights (2^24 where K >= N), and 17-64 on those of more than 2^26; and from decode + cuBLAS at 65-512
tokens on layers of at least 2^24 weights (choose_tile). Hopper only (wgmma is sm_90a)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .cuda_source import DEVICE_HELPERS, GROUP_ENTRY, SCALE_TABLE_BYTES

NAME = "sharq_nvfp4_wgmma"
GROUP_NAME = "sharq_nvfp4_wgmma_group"
TOKENS = 64  # wgmma's N up to 64 tokens: every launch there computes 64 token columns
ROWS = 64  # weight rows a warpgroup
MAX_TOKENS = 256  # wgmma's largest N
SHARED_LIMIT = 227 * 1024  # a Hopper block's shared memory (the scale table's static bytes and the buffers)
# Above cuda_gemm.MAX_M tokens: tiles of WIDE_TOKENS tokens up to WIDE_MAX_M tokens; more go to the decode into the
# scratch weight + cuBLAS. The 8B shapes (`python benchmarks/bench_gemm.py --wide --ms 256,384,512,768,1024`,
# docs/PERF.md), H100: 1.57-2.10 x decode + cuBLAS at 256 tokens; at 512 1.22-1.30 x on three shapes and level on
# 4096 x 6144 (0.95 x at 384); 0.73-1.01 x at 768. The H200 had 1.10-1.18 x and 0.91 x at 512. Against the rewritten
# scratch path (`python benchmarks/bench_gemm.py --bulk --ms 768,1024`, H100, thirty-third run) the bulk-copy tiles take
# 0.99-1.22 x its time at 768 tokens, and a batch-2 prefill of 512 tokens took 1.16 x as long with the limit at 1024
WIDE_TOKENS = 128
WIDE_MAX_M = 512


@dataclass(frozen=True)
class WgmmaTile:
    """A launch of the wgmma kernel: consumer warpgroups a block (64 rows each), weight chunks in flight per
    thread, K splits over blocks, producer warps, activation buffers, and the tokens a block takes (wgmma's N; a
    launch covers M in tiles of that many, grid z)."""

    warpgroups: int = 2
    stages: int = 4  # H200 sweep (docs/PERF.md): 4 chunks ahead 0-12 % faster than 2 on 20 of 23 shapes x M
    splits: int = 1
    producers: int = 4
    slots: int = 4
    tokens: int = TOKENS
    staged: bool = False  # the producers decode the weight into shared memory too (both MMA operands there)
    placed: bool = False  # the kernel that reads codes in kernels/placed.py's layout (the packed-placed backend's)
    bulk: bool = False  # the activation arrives tiled (tiled_activation): one bulk copy a chunk, one producer warp

    def __post_init__(self):
        if not (8 <= self.tokens <= MAX_TOKENS and self.tokens % 8 == 0):
            raise ValueError(f"WgmmaTile(tokens={self.tokens}): wgmma takes 8 to {MAX_TOKENS} tokens in steps of 8")
        if self.bulk:
            if self.staged or self.producers != 1:
                raise ValueError(f"WgmmaTile(bulk=True, producers={self.producers}, staged={self.staged}): the bulk "
                                 f"copies take one producer warp and the register-fed kernel")
        elif self.staged:
            parts = self.producers * 32 // self.rows if self.producers * 32 % self.rows == 0 else 0
            if self.producers % 4 or parts not in (1, 2, 4) or self.tokens % (2 * self.producers):
                raise ValueError(f"WgmmaTile(producers={self.producers}, staged=True): whole warpgroups of producer "
                                 f"threads, 1, 2 or 4 a weight row of the block's {self.rows}, and {self.tokens} "
                                 f"tokens a multiple of twice the producer warps")
            if self.slots < 2:  # the producers fill a slot while the consumers' MMAs read another
                raise ValueError(f"WgmmaTile(slots={self.slots}, staged=True): at least 2 buffers")
        elif self.producers % 4 or (self.tokens // 8) % (self.producers // 4):
            raise ValueError(f"WgmmaTile(producers={self.producers}): whole warpgroups of producer warps, sharing "
                             f"{self.tokens // 8} groups of 8 tokens evenly")
        if shared_bytes(self) + SCALE_TABLE_BYTES > SHARED_LIMIT:
            raise ValueError(f"{self}: {shared_bytes(self)} bytes of buffers and a {SCALE_TABLE_BYTES}-byte "
                             f"scale table, more than a block's {SHARED_LIMIT}")

    @property
    def rows(self) -> int:
        return ROWS * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups + 32 * self.producers


def choose_tile(m: int, n: int, kp: int, capability: tuple[int, int], multiprocessors: int) -> WgmmaTile | None:
    """The wgmma launch for m tokens of an [n, kp] NVFP4 weight, or None where another path measured faster or
    this kernel does not run: 33-64 tokens on more than 2^24 weights (2^24 where K >= N), 17-64 on more than 2^26;
    tiles of WIDE_TOKENS from 65 to WIDE_MAX_M tokens on at least 2^24 weights; N a multiple of 128, Hopper. K split
    by with_splits.

    17-32 tokens, the layer (prepare + launch, bulk copies where bulk_tile routes) against the decode kernel's on an
    H100 (`python benchmarks/bench_gemm.py --bulk --ms 17,24,32,48,64`, docs/PERF.md, twenty-seventh run): 4096 x
    28672 1.30-1.40 x, 8192 x 10240 1.42-1.54 x, 8192 x 28672 1.22-1.31 x, 28672 x 8192 1.06-1.10 x; 8192 x 8192
    0.97 x at 17 and 14336 x 4096 0.90-0.93 x keep the decode kernel there, and so does 4096 x 6144 (1.03-1.09 x
    alone, but the 8B decode step at batch 32 took 2.5 % longer with its q/k/v group on the wgmma kernel; level
    with the group's epilogue in one launch, twenty-eighth run). 33-64 tokens of 4096 x 4096, with_splits' split:
    the layer 0.80-0.88 x the decode kernel's (bulk copies, one warpgroup; twenty-eighth run)."""
    if capability != (9, 0) or kp % 128:
        return None
    if m > TOKENS:
        if m > WIDE_MAX_M or n * kp < 1 << 24:
            return None
        t = WgmmaTile(tokens=WIDE_TOKENS)
    else:
        # 17-32 tokens: more than 2^26 weights; 33-64: more than 2^24, or 2^24 where K >= N (4096 x 4096, with
        # with_splits' one-warpgroup split)
        least = 1 << 26 if m < 33 else (1 << 24) - (kp >= n)
        if m < 17 or n * kp <= least:
            return None
        t = WgmmaTile()
    if n % t.rows:
        return None
    return with_splits(t, m, n, kp, multiprocessors)


def with_splits(t: WgmmaTile, m: int, n: int, kp: int, multiprocessors: int) -> WgmmaTile:
    """Launch t with choose_tile's K split for m tokens of an [n, kp] weight (k_splits over its blocks: by the
    shape alone up to TOKENS tokens, within one wave for the token tiles). Up to TOKENS tokens a layer with K ≥ N
    (square and down projections) counts its blocks as if they had ROWS rows, halving the split of two warpgroups:
    at 33-64 tokens on an H100 (`python benchmarks/bench_gemm.py --bulk --ms 33,48,64`, docs/PERF.md,
    twenty-eighth run) the layer took 0.84-0.85 x the time on 14336 x 4096, 0.95-0.98 x on 28672 x 8192 (today's
    launch, plain activation), 0.93 x on 8192 x 8192 (bulk copies, one warpgroup), where the wider layers
    (4096 x 6144, 8192 x 10240) were 1.04-1.15 x slower with it."""
    rows = ROWS if m <= TOKENS and kp >= n else t.rows
    return replace(t, splits=k_splits(n // rows * token_tiles(m, t), kp, multiprocessors, one_wave=m > TOKENS))


def bulk_tile(t: WgmmaTile, n: int, kp: int, multiprocessors: int) -> WgmmaTile | None:
    """The bulk-copy variant of launch t for an [n, kp] weight (n: a group's summed width; its activation tiled by
    the prepare kernel, one bulk copy a chunk), where it measured faster with t's K split, so with t's sums bit for
    bit (the split, not the rows a block, orders a token's sums). `python benchmarks/bench_gemm.py --bulk`, 8B and
    70B shapes (docs/PERF.md, twenty-fourth and twenty-fifth runs):

    - above TOKENS tokens, t's token tiles with 2 chunks in flight: 1.28-1.57 x at 128-512 tokens (H100);
    - up to TOKENS, one consumer warpgroup a block (twice the blocks) unless K > 2 N (down_proj, whose layer with
      the tiled prepare was 3-9 % slower at 33-48 tokens on an H100): on an H200 1.00-1.61 x the GEMM alone and
      0.98-1.49 x the layer at 25-64 tokens; 2 chunks in flight where it has more than 2 and at most 3 blocks a
      multiprocessor (4096 x 6144, 8192 x 10240: 1.20-1.24 x 4 in flight on an H100), else 4 (448-512 blocks: 2 in
      flight 11-17 % slower; 256 blocks, K >= N with with_splits' one-warpgroup split: 4 in flight timed, twenty-
      eighth run)."""
    if t.staged:
        return None
    if t.tokens > TOKENS:
        return replace(t, bulk=True, producers=1, stages=2)
    if kp > 2 * n:
        return None
    one = replace(t, warpgroups=1, bulk=True, producers=1)
    return replace(one, stages=2 if 2 * multiprocessors < n // one.rows * one.splits <= 3 * multiprocessors else 4)


def token_tiles(m: int, t: WgmmaTile) -> int:
    """Blocks along M (grid z) of a launch for m tokens."""
    return -(-m // t.tokens)


def k_splits(blocks: int, kp: int, multiprocessors: int, one_wave: bool = False) -> int:
    """K splits over `blocks` blocks, keeping at least 4 chunks of 128 a split: doubled until the multiprocessors
    have a block each, or with `one_wave` while the blocks still fit one wave (a block a multiprocessor). Up to 64
    tokens the former (the blocks are the layer's row blocks alone, so a token's output does not depend on the
    batch there); the token tiles the latter, which was the fastest split or within 3.3 % of it at every shape and M
    of the H200 sweep (`python benchmarks/bench_gemm.py --wide`, 96-256 tokens), where filling the GPU was up to
    31 % slower."""
    chunks, splits = kp // 128, 1
    while chunks // (splits * 2) >= 4 and (blocks * splits * 2 <= multiprocessors if one_wave
                                           else blocks * splits < multiprocessors):
        splits *= 2
    return splits


def chunk_order(tokens: int, placed: bool) -> torch.Tensor:
    """Where each (token, element) of a chunk of `tokens` activation rows x 128 elements sits in the register-fed
    kernel's B buffer (bf16 offsets, [tokens, 128]): core matrices of 8 tokens x 8 k slots, the two k halves of a
    16-slot step `tokens` * 8 apart, steps 16 * tokens apart; k slots 2q, 2q + 1 (+ 8 for the second half) of
    step 2v + (i >> 1) hold pair i of elements 32 q + 8 v .. + 7, the pair the weight decode gives (elements i
    and i + 4 on canonical codes, 2i and 2i + 1 on placed ones)."""
    t, e = torch.arange(tokens).view(-1, 1), torch.arange(128).view(1, -1)
    q, v, w = e >> 5, (e >> 3) & 3, e & 7
    i, b = (w >> 1, w & 1) if placed else (w & 3, w >> 2)
    step, half, slot = 2 * v + (i >> 1), i & 1, 2 * q + b
    return step * (16 * tokens) + half * (8 * tokens) + (t >> 3) * 64 + (t & 7) * 8 + slot


def tiled_activation(a: torch.Tensor, tokens: int, placed: bool) -> torch.Tensor:
    """The activation a [M, K] (K a multiple of 128) as the bulk-copy kernel (WgmmaTile.bulk) reads it: M in tiles
    of `tokens` (the last padded with zeros), each tile's chunks of 128 elements one after another, each chunk
    the B buffer's image (chunk_order), so one copy of contiguous bytes fills a buffer. Returned as
    [tiles * tokens, K], the tiles one after another."""
    m, k = a.shape
    tiles = -(-m // tokens)
    x = torch.zeros(tiles * tokens, k, dtype=a.dtype, device=a.device)
    x[:m] = a
    x = x.view(tiles, tokens, k // 128, 128).transpose(1, 2).reshape(tiles, k // 128, tokens * 128)
    out = torch.empty_like(x)
    out[..., chunk_order(tokens, placed).reshape(-1).to(a.device)] = x
    return out.view(tiles * tokens, k)


def shared_bytes(t: WgmmaTile) -> int:
    """The buffers (a chunk of 128 elements of t.tokens activation rows in bf16, and of t.rows decoded weight rows
    where t.staged) and their two mbarriers."""
    return t.slots * ((t.tokens + (t.rows if t.staged else 0)) * 128 * 2 + 16)


def kernel_source(t: WgmmaTile, block: int, out: int, bias: int, sx_row: bool, group: bool = False) -> str:
    """The CUDA source of tile t's kernel for block-`block` weights, output and bias dtype codes (cuda_gemm._OUT,
    _BIAS) and a scale per token or not, for one layer (NAME) or a group of layers that read one activation
    (GROUP_NAME)."""
    defines = dict(WG=t.warpgroups, STAGES=t.stages, PW=t.producers, XS=t.slots, NTG=t.tokens // 8, BLOCK=block,
                   OUT=out, BIAS=bias, SX_ROW=int(sx_row), SPLIT=int(t.splits > 1), GROUP=int(group),
                   STAGED=int(t.staged), PLACED=int(t.placed), BULK=int(t.bulk))
    return ("".join(f"#define {k} {v}\n" for k, v in defines.items()) + DEVICE_HELPERS + _wgmma_function(t.tokens)
            + _SOURCE)


def _wgmma_function(tokens: int) -> str:
    """wgmma m64nNk16 (N = tokens) with B (K-major, no swizzle) by descriptor: `wgmma`, A (4 registers of bf16
    pairs) from registers; `wgmma_ss`, A (K-major, no swizzle) by descriptor too, both descriptors given by their
    low words (a_desc_lo, b_desc_lo; the high word is the 128-byte stride of either)."""
    nd = tokens // 2
    d = ", ".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    head = f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.bf16.bf16 {{{d}}}, "
    return (f"__device__ __forceinline__ void wgmma(float (&d)[{nd}], const u32 (&a)[4], unsigned long long b) {{\n"
            f'  asm volatile("{head}{{%{nd}, %{nd + 1}, %{nd + 2}, %{nd + 3}}}, %{nd + 4}, 1, 1, 1, 0;"\n'
            f'      : {outs}\n      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));\n}}\n'
            f"__device__ __forceinline__ void wgmma_ss(float (&d)[{nd}], u32 a, u32 b) {{\n"
            f'  asm volatile("{{\\n.reg .b64 da, db;\\nmov.b64 da, {{%{nd}, %{nd + 2}}};\\n'
            f'mov.b64 db, {{%{nd + 1}, %{nd + 2}}};\\n{head}da, db, 1, 1, 1, 0, 0;\\n}}"\n'
            f'      : {outs}\n      : "r"(a), "r"(b), "r"(128u >> 4));\n}}\n')


_SOURCE = r"""
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
__device__ __forceinline__ void wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
__device__ __forceinline__ void mbar_init(u32 a, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 a) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" :: "r"(a) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 a, u32 parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}" :: "r"(a), "r"(parity) : "memory");
}
// `bytes` from global src to shared dst by the async proxy, counted on mbarrier bar (which this thread arrives on)
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// B of one 16-element step: core matrices of 8 tokens x 8 k (128 bytes), the two k halves NTG * 128 bytes apart
// (leading byte offset), token groups 128 bytes apart (stride byte offset), no swizzle
__device__ __forceinline__ unsigned long long b_desc(u32 addr) {
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)(NTG * 128 >> 4) << 16)
       | ((unsigned long long)(128 >> 4) << 32);
}

// a consumer thread's accumulators (rows n0 + g and n0 + g + 8, tokens m0 + 8 t + 2 q and + 1) into y: K split by's
// fp32 partials, or the output with alpha = s_x s_w and the bias applied
__device__ __forceinline__ void store_tile(const float (&acc)[NTG * 4], void* __restrict__ y,
                                           const float* __restrict__ sx, const float* __restrict__ sw,
                                           const void* __restrict__ bias, int M, int N, int n0, int m0, int by,
                                           int g, int q) {
#if !SPLIT
  const float sw0 = sw[0];
#endif
#pragma unroll
  for (int t = 0; t < NTG; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + g + (i >> 1) * 8, m = m0 + t * 8 + 2 * q + (i & 1);
      if (m >= M) continue;
      const float v = acc[t * 4 + i] * 256.f;  // the 2^-8 of the decoded weight
#if SPLIT
      store(y, ((long)by * M + m) * N + n, v);
#else
      const float alpha = (SX_ROW ? sx[m] : sx[0]) * sw0;
#if BIAS
      store(y, (long)m * N + n, fmaf(v, alpha, to_float(bias, n)));
#else
      store(y, (long)m * N + n, v * alpha);
#endif
#endif
    }
}
// before any warp takes up its role: each buffer's "full" mbarrier (every producer thread arrives) and "empty"
// one (every consumer thread), and the block's scale table
__device__ __forceinline__ void block_setup(u32 full, u32 empty, u32* scale_table) {
  if (threadIdx.x == 0)
    for (int s = 0; s < XS; ++s) {
      mbar_init(full + 8 * s, BULK ? 1 : PW * 32);
      mbar_init(empty + 8 * s, WG * 128);
    }
  build_scale_table(scale_table);
  __syncthreads();
}
#if STAGED
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 bytes) {  // bytes < 16: zeros after them
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// the low words of the descriptors of one step's A (the decoded weight: core matrices of 8 rows x 8 k, the two k
// halves WG * 8 * 128 bytes apart, the block's row groups) and B (as b_desc); both high words are the 128 bytes
// between row (token) groups. Moved by a step in 16-byte units, the address field (14 bits) does not carry.
__device__ __forceinline__ u32 a_desc_lo(u32 addr) { return ((addr & 0x3FFFFu) >> 4) | ((WG * 8 * 128 >> 4) << 16); }
__device__ __forceinline__ u32 b_desc_lo(u32 addr) { return ((addr & 0x3FFFFu) >> 4) | ((NTG * 128 >> 4) << 16); }

// one block's 64 * WG rows (block column bx) and K split (by) of one weight, both MMA operands in shared memory:
// the producers decode the weight there (each element in its place: no K permutation) and copy the activation in
// as it is; the consumers only issue MMAs
__device__ __forceinline__ void wgmma_block(
    const U4* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ a, void* __restrict__ y,
    const float* __restrict__ sx, const float* __restrict__ sw, const void* __restrict__ bias, int M, int N,
    int Kp, int lda, int chunks_per_split, int bx, int by) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ROWS = 64 * WG;
  constexpr u32 BSTEP = 2 * NTG * 128, ASTEP = 2 * WG * 8 * 128;  // bytes of one step's activation, weight
  constexpr u32 ACHUNK = 8 * ASTEP, SLOT = ACHUNK + 8 * BSTEP;    // a slot: the weight chunk, then the activation's
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int c_begin = by * chunks_per_split, m0 = blockIdx.z * (NTG * 8);  // the block's first token
  const int chunks = min(c_begin + chunks_per_split, Kp >> 7) - c_begin;
  const u32 base = smem_addr(smem), full = base + XS * SLOT, empty = full + XS * 8;
  __shared__ u32 scale_table[256];
  block_setup(full, empty, scale_table);
  if (warp >= WG * 4) {
    // producer thread pt: part `part` (128 / PARTS elements, L 16-byte loads) of weight row r of each chunk, decoded
    // and scaled, pairs put back in element order (the decode pairs elements i and i + 4 of each 8), each 8
    // elements (k group kg of the chunk) one 16-byte row of a core matrix: ((kg * WG * 8) + r / 8) * 128 + r % 8 * 16.
    // The activation: 16-byte pieces p = pt + i * PT of a chunk, piece p being k group kg (bits 0, 4, 5, 6 of p)
    // of token t (bits 1-3, then 7 up), so a warp reads 64 contiguous bytes of 8 tokens and writes four whole core
    // matrices; the copies of tokens beyond M read nothing and write zeros.
    constexpr int PT = PW * 32, PARTS = PT / ROWS, L = 4 / PARTS, SB = 128 / BLOCK / PARTS, PIECES = NTG * 8 * 16 / PT;
    const int pt = tid - WG * 128, r = pt % ROWS, part = pt / ROWS;
    const long n = (long)bx * ROWS + r;
    const U4* wp = codes + n * (Kp >> 5) + c_begin * 4 + part * L;
    const u8* sp = scales + n * (Kp / BLOCK) + c_begin * (128 / BLOCK) + part * SB;
    const u32 a_dst = (u32)((part * (16 / PARTS) * WG * 8 + (r >> 3)) * 128 + (r & 7) * 16);
    const int kg = (pt & 1) | ((pt >> 3) & 14), t0 = ((pt >> 1) & 7) | ((pt >> 7) << 3);
    const int a_left = M - (m0 + t0);  // piece i reads a token below M where i * PT / 16 < a_left
    // piece 0's source in the next chunk to copy; a piece of a token beyond M reads nothing (a copy of 0 bytes)
    const u16* a_next = a + (long)min(m0 + t0, M - 1) * lda + c_begin * 128 + kg * 8;
    const long a_step = (long)(PT / 16) * lda;
    const u32 b_dst = ACHUNK + (u32)((kg * NTG + (t0 >> 3)) * 128 + (t0 & 7) * 16);
    struct Part { U4 w[L]; unsigned long long s; };
    Part st[STAGES];
    auto load_w = [&](Part& p) {  // the next chunk's codes and scale codes of the thread's part of its row
#pragma unroll
      for (int i = 0; i < L; ++i) p.w[i] = ld_stream(wp + i);
      if (SB == 8) p.s = *(const unsigned long long*)sp;
      else if (SB == 4) p.s = *(const u32*)sp;
      else if (SB == 2) p.s = *(const u16*)sp;
      else p.s = *sp;
      wp += 4;
      sp += 128 / BLOCK;
    };
    auto copy_act = [&](u32 slot) {  // the next chunk's activation into slot
      const u16* src = a_next;
#pragma unroll
      for (int i = 0; i < PIECES; ++i) {
        cp_async16(slot + b_dst + i * (PT / 128) * 128, src, i * (PT / 16) < a_left ? 16u : 0u);
        src += a_step;
      }
      a_next += 128;
    };
    auto put = [&](const Part& p, u32 slot) {
      u32 block_scale[SB];  // the bf16 pairs of the part's block scales
#pragma unroll
      for (int b = 0; b < SB; ++b) block_scale[b] = scale_table[(u32)(p.s >> (8 * b)) & 0xFFu];
#pragma unroll
      for (int i = 0; i < L; ++i)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int lw = 4 * i + v;  // the part's word lw: elements 8 lw .. 8 lw + 7 of it
          const u32 x = word(p.w[i], v), sc = block_scale[lw * 8 / BLOCK];
          const U4 e = in_order(mul_bf16x2(decode_pair(x, 0), sc), mul_bf16x2(decode_pair(x, 1), sc),
                                mul_bf16x2(decode_pair(x, 2), sc), mul_bf16x2(decode_pair(x, 3), sc));
          asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};"
                       :: "r"(slot + a_dst + lw * (WG * 8 * 128)), "r"(e.x), "r"(e.y), "r"(e.z), "r"(e.w)
                       : "memory");
        }
    };
#pragma unroll
    for (int u = 0; u < STAGES; ++u)
      if (u < chunks) load_w(st[u]);
    wait_prior_grid();  // the weight's first chunks are on their way; the activation comes from the prepare
    for (int u0 = 0; u0 < chunks; u0 += STAGES) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) {
        const int c = u0 + s, slot = c % XS;
        if (c < chunks) {
          const u32 buffer = base + slot * SLOT;
          if (c >= XS) mbar_wait(empty + 8 * slot, (c / XS + 1) & 1);  // chunk c - XS's MMAs are done
          copy_act(buffer);  // on its way while the weight is decoded
          cp_async_commit();
          put(st[s], buffer);
          if (c + STAGES < chunks) load_w(st[s]);
          cp_async_wait_all();
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // both visible to wgmma (the async proxy)
          mbar_arrive(full + 8 * slot);
        }
      }
    }
    return;
  }
  // consumer: warpgroup wg takes rows 64 wg .. 64 wg + 63 of the block; warp w of the block rows n0 .. n0 + 15
  const int g = lane >> 2, q = lane & 3, n0 = bx * ROWS + warp * 16;
  // the warpgroup's rows, from lane 0: seen as uniform, the descriptors are built in uniform registers
  const u32 a_rows = (u32)(__shfl_sync(0xffffffffu, warp >> 2, 0) * 8 * 128);
  float acc[NTG * 4];
#pragma unroll
  for (int i = 0; i < NTG * 4; ++i) acc[i] = 0.f;
  int slot = 0, last = XS - 1;  // chunk c's buffer and chunk c - 1's
  u32 phase = 0;
  for (int c = 0; c < chunks; ++c) {
    mbar_wait(full + 8 * slot, phase);
    const u32 ad = a_desc_lo(base + slot * SLOT + a_rows), bd = b_desc_lo(base + slot * SLOT + ACHUNK);
    wg_fence();
#pragma unroll
    for (int j = 0; j < 8; ++j) wgmma_ss(acc, ad + j * (ASTEP >> 4), bd + j * (BSTEP >> 4));
    wg_commit();
    wg_wait_one();  // chunk c - 1's MMAs are done: its buffer is free
    if (c > 0) mbar_arrive(empty + 8 * last);
    last = slot;
    if (++slot == XS) slot = 0, phase ^= 1;
  }
  wait_prior_grid();  // s_x comes from the prepare
  wg_wait_all();
  store_tile(acc, y, sx, sw, bias, M, N, n0, m0, by, g, q);
}
#else
// one block's 64 * WG rows (block column bx) and K split (by) of one weight
__device__ __forceinline__ void wgmma_block(
    const U4* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ a, void* __restrict__ y,
    const float* __restrict__ sx, const float* __restrict__ sw, const void* __restrict__ bias, int M, int N,
    int Kp, int lda, int chunks_per_split, int bx, int by) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr u32 STEP = 2 * NTG * 128, CHUNK = 8 * STEP;  // bytes of one step's and one chunk's activation
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int c_begin = by * chunks_per_split, m0 = blockIdx.z * (NTG * 8);  // the block's first token
  const int chunks = min(c_begin + chunks_per_split, Kp >> 7) - c_begin;
  const u32 base = smem_addr(smem), full = base + XS * CHUNK, empty = full + XS * 8;
  __shared__ u32 scale_table[256];
  block_setup(full, empty, scale_table);
#if BULK
  if (warp >= WG * 4) {
    // producer: chunk c of the tiled activation (tiled_activation: each chunk of a token tile the buffer's image,
    // contiguous) into buffer c % XS by one bulk copy, which counts its bytes on the buffer's "full" mbarrier
    if (lane == 0) {
      const u16* src = a + ((long)blockIdx.z * (Kp >> 7) + c_begin) * (NTG * 8 * 128);
      wait_prior_grid();
      for (int c = 0; c < chunks; ++c) {
        const int s = c % XS;
        if (c >= XS) mbar_wait(empty + 8 * s, ((c / XS) + 1) & 1);  // chunk c - XS's MMAs are done
        bulk_copy(base + s * CHUNK, src + (long)c * (NTG * 8 * 128), CHUNK, full + 8 * s);
      }
    }
    return;
  }
#else
  if (warp >= WG * 4) {
    wait_prior_grid();
    // producer: chunk c of the activation into buffer c % XS. Producer warp pw takes 8 elements qq * 32 + 8 v ..
    // + 7 (16 bytes; v = pw % 4, qq = lane % 4) of token r = lane / 4 of token groups tg = pw / 4 + it * PW / 4;
    // pair i of them (elements i, i + 4) is k slots 2 qq, 2 qq + 1 of step 2 v + (i >> 1), k half i & 1: word qq
    // of row r of core matrix ((step * 2 + k half) * NTG + tg). Load it is load 0 moved by it * PW / 4 token
    // groups: one pointer and one offset for all of them. A load's four words (steps 2 v, 2 v + 1 x k halves)
    // are one stmatrix of four 8 x 8 matrices: lane l holds word l % 4 of row l / 4 of each, which is the
    // fragment stmatrix stores, and gives the address of row l % 8 of matrix l / 8.
    constexpr int TG_STEP = PW / 4, LOADS = NTG / TG_STEP;
    const int pw = warp - WG * 4, v = pw & 3, tg0 = pw >> 2, r = lane >> 2, qq = lane & 3;
    const u16* src = a + (long)(m0 + tg0 * 8 + r) * lda + c_begin * 128 + qq * 32 + 8 * v;
    const long src_step = (long)TG_STEP * 8 * lda;
    const u32 dst = (u32)((4 * v * NTG + tg0) * 128 + (lane & 7) * 16 + ((lane >> 3) & 1) * NTG * 128
                          + (lane >> 4) * STEP);
    const int left = M - (m0 + tg0 * 8 + r);  // load it reads a token below M where it * TG_STEP * 8 < left
    // two chunks in flight; a token beyond M is never loaded, so its slots stay the zeros they start as (no
    // zeroing per load)
    U4 x[2][LOADS] = {};
    auto load = [&](U4 (&xs)[LOADS]) {
#pragma unroll
      for (int it = 0; it < LOADS; ++it)
        if (it * TG_STEP * 8 < left) xs[it] = ld_shared_by_blocks((const U4*)(src + it * src_step));
      src += 128;
    };
    auto put = [&](const U4 (&xs)[LOADS], u32 buffer) {
#pragma unroll
      for (int it = 0; it < LOADS; ++it) {
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
                     :: "r"(buffer + dst + it * TG_STEP * 128), "r"(x_pair(xs[it], 0)), "r"(x_pair(xs[it], 1)),
                     "r"(x_pair(xs[it], 2)), "r"(x_pair(xs[it], 3)));
      }
    };
    if (chunks > 0) load(x[0]);
    if (chunks > 1) load(x[1]);
    for (int c0 = 0; c0 < chunks; c0 += 2) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = c0 + h;
        if (c < chunks) {
          const int s = c % XS;
          if (c >= XS) mbar_wait(empty + 8 * s, ((c / XS) + 1) & 1);  // chunk c - XS's MMAs are done
          put(x[h], base + s * CHUNK);
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to wgmma (the async proxy)
          mbar_arrive(full + 8 * s);
          if (c + 2 < chunks) load(x[h]);
        }
      }
    }
    return;
  }
#endif
  // consumer: warp w of warpgroup wg takes rows n0 .. n0 + 15, rows g and g + 8 of them in this thread
  const int n0 = bx * (64 * WG) + warp * 16;
  const U4* wrow[2];
  const u8* srow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long n = n0 + h * 8 + g;
    wrow[h] = codes + n * (Kp >> 5) + q + c_begin * 4;
    srow[h] = scales + n * (Kp / BLOCK) + q * (32 / BLOCK) + c_begin * (128 / BLOCK);
  }
  struct Stage { U4 w[2]; u32 s[2]; };
  Stage st[STAGES];
  auto load_w = [&](Stage& s) {  // the next chunk's codes and scale codes of the thread's two rows
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s.w[h] = ld_stream(wrow[h]);
#if BLOCK == 32
      s.s[h] = *srow[h];
#else
      s.s[h] = *(const u16*)srow[h];
#endif
      wrow[h] += 4;
      srow[h] += 128 / BLOCK;
    }
  };
  float acc[NTG * 4];
#pragma unroll
  for (int i = 0; i < NTG * 4; ++i) acc[i] = 0.f;
  u32 frag[2][4][4];  // the A fragments of half a chunk (4 steps); one half in flight while the other is decoded
  // step j's A fragment: pairs 2j (k slots 2q, 2q + 1) and 2j + 1 (2q + 8, 2q + 9) of rows g, g + 8
  auto decode = [&](const Stage& s, const u32 (&sc)[2][2], int half, u32 (&af)[4][4]) {
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = half * 4 + jj, v = j >> 1, i = (j & 1) * 2;
      const u32 w0 = word(s.w[0], v), w1 = word(s.w[1], v);
      af[jj][0] = mul_bf16x2(decode_pair(w0, i), sc[0][v >> 1]);
      af[jj][1] = mul_bf16x2(decode_pair(w1, i), sc[1][v >> 1]);
      af[jj][2] = mul_bf16x2(decode_pair(w0, i + 1), sc[0][v >> 1]);
      af[jj][3] = mul_bf16x2(decode_pair(w1, i + 1), sc[1][v >> 1]);
    }
  };
#pragma unroll
  for (int u = 0; u < STAGES; ++u)
    if (u < chunks) load_w(st[u]);
  wait_prior_grid();  // the weight's first chunks are on their way (sx, read at the end, comes from the prepare)
  for (int u0 = 0; u0 < chunks; u0 += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      const int u = u0 + s;
      if (u < chunks) {
        const int buffer = u % XS;
        mbar_wait(full + 8 * buffer, (u / XS) & 1);
        const unsigned long long b = b_desc(base + buffer * CHUNK);  // + 16-byte units: no carry out of the field
        u32 sc[2][2];  // decoded once a chunk: both halves use them
#pragma unroll
        for (int h = 0; h < 2; ++h) row_scale_pairs(scale_table, st[s].s[h], sc[h]);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          decode(st[s], sc, half, frag[half]);
          if (half == 1 && u + STAGES < chunks) load_w(st[s]);
          wg_fence();
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) wgmma(acc, frag[half][jj], b + (half * 4 + jj) * (STEP >> 4));
          wg_commit();
          wg_wait_one();  // the previous half's MMAs are done: its fragments may be overwritten
          if (half == 0 && u > 0) mbar_arrive(empty + 8 * ((u - 1) % XS));  // and chunk u - 1's buffer is free
        }
      }
    }
  }
  wg_wait_all();
  store_tile(acc, y, sx, sw, bias, M, N, n0, m0, by, g, q);
}
#endif
#if !GROUP
extern "C" __global__ void __launch_bounds__(WG * 128 + PW * 32, 1) sharq_nvfp4_wgmma(
    const U4* __restrict__ codes, const u8* __restrict__ scales, const u16* __restrict__ a, void* __restrict__ y,
    const float* __restrict__ sx, const float* __restrict__ sw, const void* __restrict__ bias, int M, int N,
    int Kp, int lda, int chunks_per_split) {
  wgmma_block(codes, scales, a, y, sx, sw, bias, M, N, Kp, lda, chunks_per_split, blockIdx.x, blockIdx.y);
}
#else
""" + GROUP_ENTRY.replace("NAME", "sharq_nvfp4_wgmma_group").replace("BOUNDS", "WG * 128 + PW * 32, 1").replace(
    "BLOCK_FN", "wgmma_block") + "#endif\n"
