"""How fast can a batch-1 GEMM read its weight's codes at all? Loads only (each lane xors what it reads), no decode
and no MMA, on the decode kernel's access pattern and grid against a tiled layout and against persistent blocks,
beside a plain streaming read of the same bytes and a device copy (docs/PERF.md).

    python benchmarks/weight_read.py [--json out.json]

Why: the decode kernel (kernels/cuda_gemm.py) reads its weight at 0.5-0.6 of copy bandwidth at one token, and the
fourth run measured its loads alone at 0.63 of copy (0.70 with a weight tiled so that a warp's loads are 512
contiguous bytes): the limit is in how the weight is read, not in the decode. This separates the candidates:

- *rows*: the canonical layout as the kernel reads it: blocks of 32 rows (two row tiles of 16), lane (g, q) reads
  16 bytes at q * 16 of rows g, g + 8, g + 16, g + 24 in each 128-element chunk, the warps of a block take
  interleaved chunks of K;
- *tiled*: the same bytes with each 32-row tile's chunk stored as 2 KB in fragment order (a warp's load is 512
  contiguous bytes);
- *grid*: one block a 32-row tile (the kernel's launch today), or *pN*: persistent blocks, N a multiprocessor, each
  walking the tiles blockIdx.x, + gridDim.x, ... with its loads DEPTH chunks ahead across tile boundaries (no
  waves, no ramp-up per tile);
- *stream*: a grid-stride read of the whole buffer, UNROLL loads in flight a thread (what reading bytes can reach).

GB/s of the codes read (scales left out), GPU time from CUDA-graph replays over copies of the weight larger than
the L2 together (benchmarks/bench_gemm.py's method and copy count); the kernels compiled as the GEMM's are
(cuda_gemm._compile)."""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from bench_gemm import SHAPES, SHAPES_70B, copies, graph_ms, save  # benchmarks/, beside this script
from sharq.kernels import cuda_gemm

SOURCE = r"""
typedef unsigned int u32;
struct __align__(16) U4 { u32 x, y, z, w; };
__device__ __forceinline__ U4 ldg(const U4* p) {
  U4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// xor into acc after the loads in program order (a volatile asm is not moved above them: all stay in flight)
__device__ __forceinline__ void eat(u32& acc, const U4& v) {
  asm volatile("xor.b32 %0, %0, %1;\n\txor.b32 %0, %0, %2;\n\txor.b32 %0, %0, %3;\n\txor.b32 %0, %0, %4;"
               : "+r"(acc) : "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
#if KERNEL == 0
// lane (g, q)'s 16 bytes of row i * 8 + g of 32-row tile `tile` in chunk c (64 bytes a row)
__device__ __forceinline__ const U4* piece(const U4* w, long tile, int c, int i, int g, int q, int lane, int kb) {
#if TILED  // a tile's 32 rows of chunk c are 2 KB in a row, in fragment order
  return w + (tile * (kb >> 6) + c) * 128 + i * 32 + lane;
#else      // the canonical rows: row n's chunk c at n * kb + c * 64
  return w + ((tile * 32 + i * 8 + g) * kb + c * 64 + q * 16) / 16;
#endif
}
extern "C" __global__ void __launch_bounds__(WARPS * 32) read_tiles(const U4* __restrict__ w, u32* out, int kb,
                                                                    int tiles) {
  const int lane = threadIdx.x & 31, wk = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int per_warp = (kb >> 6) / WARPS;  // chunks a warp a tile (K's chunks a multiple of WARPS)
#if PERSIST
  const int mine = tiles > (int)blockIdx.x ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
#else
  const int mine = 1;
#endif
  const int items = mine * per_warp;  // this warp's (tile, chunk) items in order, read through a cursor
  long tile = blockIdx.x;
  int c = wk;
  auto issue = [&](U4 (&slot)[4], bool valid) {
#pragma unroll
    for (int i = 0; i < 4; ++i) slot[i] = valid ? ldg(piece(w, tile, c, i, g, q, lane, kb)) : U4{0, 0, 0, 0};
    c += WARPS;
    if (c >= (kb >> 6)) c = wk, tile += gridDim.x;
  };
  u32 acc = 0;
  U4 v[DEPTH][4];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) issue(v[d], d < items);
  for (int it0 = 0; it0 < items; it0 += DEPTH) {  // a rotating pipeline: item it0 + d in slot d
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
      for (int i = 0; i < 4; ++i) eat(acc, v[d][i]);
      issue(v[d], it0 + d + DEPTH < items);
    }
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // the loads have a use
}
#else
extern "C" __global__ void read_stream(const U4* __restrict__ w, u32* out, long n16) {
  u32 acc = 0;
  const long stride = (long)gridDim.x * blockDim.x;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += stride * UNROLL) {
    U4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = i + u * stride < n16 ? ldg(w + i + u * stride) : U4{0, 0, 0, 0};
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) eat(acc, v[u]);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
#endif
"""

# (tiled, blocks a multiprocessor (0: one block a tile), warps a block, chunks in flight a warp)
TILE_VARIANTS = list(itertools.product((False, True), (0, 2, 4, 8), (4, 8), (2, 4, 8)))
STREAM_VARIANTS = list(itertools.product((4, 8), (4, 8)))  # (loads in flight a thread, blocks a multiprocessor)


def source(**defines: int) -> str:
    """The kernels' source with their #defines (KERNEL 0: read_tiles, 1: read_stream)."""
    return "".join(f"#define {k} {int(v)}\n" for k, v in defines.items()) + SOURCE


def tile_source(tiled: bool, per_sm: int, warps: int, depth: int) -> str:
    return source(KERNEL=0, TILED=tiled, PERSIST=per_sm > 0, WARPS=warps, DEPTH=depth)


def stream_source(unroll: int) -> str:
    return source(KERNEL=1, UNROLL=unroll)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("weight_read needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for k, n in SHAPES + SHAPES_70B:
        kb, nbytes = k // 2, n * k // 2
        ws = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
              for _ in range(copies(nbytes))]
        dst = torch.empty_like(ws[0])

        def gbps(src: str, name: str, grid: int, threads: int, *args, ws=ws, nbytes=nbytes) -> float:
            """GB/s of the codes read by kernel `name` of `src` (compiled once) over the copies."""
            f = cuda_gemm._compile(device, src, 0, name)
            return nbytes / graph_ms([lambda w=w: f(grid=(grid, 1, 1), block=(threads, 1, 1), args=[w, sink, *args])
                                      for w in ws]) / 1e6

        row = {"K": k, "N": n, "MB": nbytes / 1e6,
               "copy_GBps": 2 * nbytes / graph_ms([lambda w=w, dst=dst: dst.copy_(w) for w in ws]) / 1e6}
        for unroll, per_sm in STREAM_VARIANTS:
            row[f"stream_u{unroll}_p{per_sm}"] = gbps(stream_source(unroll), "read_stream", sms * per_sm, 256,
                                                      nbytes // 16)
        for tiled, per_sm, warps, depth in TILE_VARIANTS:
            if (k // 128) % warps:
                continue
            name = f"{'tiled' if tiled else 'rows'}_{f'p{per_sm}' if per_sm else 'grid'}_w{warps}_d{depth}"
            row[name] = gbps(tile_source(tiled, per_sm, warps, depth), "read_tiles",
                             min(n // 32, sms * per_sm) if per_sm else n // 32, 32 * warps, kb, n // 32)
        rows.append(row)
        del ws, dst
        torch.cuda.empty_cache()
        print(f"{k} x {n} ({nbytes / 1e6:.0f} MB of codes): a device copy {row['copy_GBps']:.0f} GB/s (read + write)")
        for kind in ("stream", "rows_grid", "tiled_grid", "rows_p", "tiled_p"):
            best = max(((name, v) for name, v in row.items() if name.startswith(kind)), key=lambda t: t[1],
                       default=None)
            if best:
                print(f"    best {kind:10s} {best[1]:6.0f} GB/s  ({best[0]})", flush=True)
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
