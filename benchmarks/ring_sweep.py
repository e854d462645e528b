"""The decode kernel's launches on the cp.async ring at a few tokens (kernels/cuda_gemm.py), on the 8B and 70B
shapes: ring depth (3, 4, 6 or 8 chunks a warp), one or two row tiles a warp, 4 or 8 warps splitting K, and a
register cap for 32 warps a multiprocessor; GPU µs over weight copies (bench_gemm.py's method), GB/s of the
payload, registers, blocks a multiprocessor and waves. How choose_tile's ring launches up to 8 tokens were chosen
(docs/PERF.md).

    python benchmarks/ring_sweep.py [--ms 1,4,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from bench_gemm import SHAPES, SHAPES_70B, CudaCase, kernel_resources, save  # benchmarks/, beside this script
from sharq.kernels import cuda_gemm


def variants(m: int, n: int, k: int, auto: cuda_gemm.CudaTile) -> list[cuda_gemm.CudaTile]:
    """choose_tile's launch, then the ring launches around it (another warp count only at ring depths 3 and 4,
    uncapped: it changes the K partition, so it would hold for every M)."""
    tiles = [auto]
    for wk, rt, ring, cap in itertools.product((4, 8), (1, 2), (3, 4, 6, 8), (False, True)):
        if n % (16 * rt) or ring == 8 and not cap or wk != auto.wk and (ring > 4 or cap):
            continue
        tiles.append(cuda_gemm.CudaTile(rt, wk, 1, auto.splits, ring, direct=True, min_blocks=32 // wk if cap else 0))
    return list(dict.fromkeys(tiles))


def blocks_per_multiprocessor(t: cuda_gemm.CudaTile, registers: int, shared: int) -> int:
    """Blocks a Hopper multiprocessor holds at once: 64K registers (allocated by 8 a thread), 228 KB of shared
    memory (1 KB of it reserved a block, plus the kernel's 1 KB scale table), 64 warps, 32 blocks."""
    return min(65536 // (-(-registers // 8) * 8 * t.threads), 233472 // (shared + 2048), 64 // (t.threads // 32), 32)


def sweep(ms: tuple[int, ...]) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        case = CudaCase.make("sharq", k, n, m)
        auto = cuda_gemm.choose_tile(m, n, k, case.act.values.device)
        nbytes = case.p.codes.numel() + case.p.scales.numel()
        timed = []
        for t in variants(m, n, k, auto):
            us = case.cuda_us(t)
            registers, local = kernel_resources(t, m, case.r.weight_block)
            per_sm = blocks_per_multiprocessor(t, registers, cuda_gemm._shared_bytes(t, cuda_gemm.n8_tiles(m),
                                                                                      case.r.weight_block))
            timed.append({"tile": str(t), "us": us, "GBps": nbytes / us / 1e3, "registers": registers,
                          "local_bytes": local, "blocks_per_sm": per_sm,
                          "waves": n // t.rows * t.splits / (per_sm * sms), "chosen": t == auto})
        timed.sort(key=lambda r: r["us"])
        chosen = next(r for r in timed if r["chosen"])
        print(f"K={k} N={n} M={m}: bf16 {case.bf16_us:.1f} us; chosen {chosen['us']:.1f} us", flush=True)
        for r in timed[:6]:
            print(f"   {r['us']:6.1f} us {r['GBps']:5.0f} GB/s x{case.bf16_us / r['us']:.2f} {r['registers']:3d} "
                  f"registers, {r['local_bytes']} B local, {r['blocks_per_sm']}/SM, {r['waves']:.2f} waves "
                  f"{r['tile'].replace('CudaTile', '')}", flush=True)
        rows.append({"K": k, "N": n, "M": m, "bf16_us": case.bf16_us, "variants": timed})
        del case
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="1,4,8")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("ring_sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "ring_sweep": sweep(tuple(int(m) for m in args.ms.split(",")))}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
