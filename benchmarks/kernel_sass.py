"""The CUDA decode GEMM's machine code, read on any machine (no GPU): each launch compiled for Hopper by NVRTC, its
main loop found in the SASS, and its instructions counted per weight (docs/PERF.md).

    pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm
    python benchmarks/kernel_sass.py [--ms 1,8,16,32,64] [--shapes 8b,70b] [--variants] [--staged] [--placed]
        [--json out.json]

A warp's main loop streams chunks of 128 K-elements of 16·rt weight rows (its HMMAs: 8 per chunk per row tile
per 8 tokens), so warp instructions per weight = loop instructions / (chunks · 128 · 16 · rt); in the wgmma kernel
(Hopper, where cuda_wgmma.choose_tile takes the shape) a consumer warp's 16 rows take 8 HGMMAs a chunk. A multiprocessor
issues at most 4 warp instructions a cycle; at the H200's copy bandwidth (4.17 TB/s measured) 132 multiprocessors
at 1.76–1.98 GHz receive 30–34 NVFP4 weights (0.53 bytes each with W32 scales) a cycle each, so a loop above
0.12–0.13 instructions per weight cannot keep up with memory even when nothing stalls. Launches are those
the packed backend makes on an H200 (32-element blocks, bf16 out, no bias); --variants adds every launch bench_gemm.py --cuda-sweep
times.
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import replace

import bench_gemm  # benchmarks/bench_gemm.py, beside this script

from sharq._format import format_table
from sharq.kernels import cuda_gemm, cuda_wgmma, nvrtc

SHAPES = {"8b": bench_gemm.SHAPES, "70b": bench_gemm.SHAPES_70B}
CLASSES = {"HMMA": "mma", "HGMMA": "mma", "HFMA2": "scale", "HMUL2": "scale", "LOP3": "integer", "SHF": "integer",
           "IMAD": "integer", "PRMT": "permute", "LDG": "load", "LDS": "load", "LDGSTS": "load"}


def analyse(t: cuda_gemm.CudaTile | cuda_wgmma.WgmmaTile, m: int) -> dict:
    """Registers, spills and the main loop's warp instructions per weight, in total and by class, of tile t's
    kernel at m tokens (32-element blocks, bf16 out, no bias). The wgmma kernel's main loop is its consumers'
    (8 HGMMAs a 128-element chunk of a warp's 16 rows); its producer warps' loop is counted apart, as the warp
    instructions all of a block's producers issue a weight of the block's."""
    if isinstance(t, cuda_wgmma.WgmmaTile):
        built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 32, 0, 0, False), "sm_90a")
        marker, per_chunk, rows = "HGMMA", 8, 16
    else:
        mt = cuda_gemm.n8_tiles(m)
        built = nvrtc.compile_cubin(cuda_gemm.kernel_source(t, mt, 32, 0, 0, False))
        marker, per_chunk, rows = "HMMA", 8 * t.rt * mt, 16 * t.rt
    sass = nvrtc.disassemble(built.cubin)
    loop = nvrtc.main_loop(sass, marker)
    producers = None
    if isinstance(t, cuda_wgmma.WgmmaTile) and t.staged:  # its producers' loop: one 16-byte store a code word
        loop = nvrtc.main_loop(sass, marker, exclude="STS")
        ploop = nvrtc.main_loop(sass, "STS")
        words = 16 * t.rows // (t.producers * 32)  # a producer thread's code words a chunk
        producers = t.producers * len(ploop) / (ploop.count("STS") / words) / (t.rows * 128)
    elif isinstance(t, cuda_wgmma.WgmmaTile):  # its producer warps' loop: one stmatrix a 16-byte load
        ploop = nvrtc.main_loop(sass, "STSM")
        loads = t.tokens // 8 // (t.producers // 4)  # a producer thread's loads a chunk
        producers = t.producers * len(ploop) / (ploop.count("STSM") / loads) / (t.rows * 128)
    chunks, weights = loop.count(marker) / per_chunk, nvrtc.weights_per_loop(loop, marker, per_chunk, rows)
    by_class = collections.Counter(CLASSES.get(op, "other") for op in loop)
    return {"tile": str(t), "M": m, "registers": built.registers, "spilled": built.spilled,
            "loop_instructions": len(loop), "chunks_per_iteration": chunks, "per_weight": len(loop) / weights,
            "producer_per_weight": producers,
            **{f"{c}_per_weight": by_class[c] / weights for c in ("integer", "scale", "permute", "load", "mma",
                                                                  "other")}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,8,16,32,64")
    p.add_argument("--shapes", default="8b")
    p.add_argument("--multiprocessors", type=int, default=132, help="the GPU choose_tile plans for (H200: 132)")
    p.add_argument("--variants", action="store_true", help="every launch bench_gemm.py --cuda-sweep times")
    p.add_argument("--staged", action="store_true", help="also the staged wgmma kernel's launch options "
                   "(bench_gemm.STAGED) at each shape and M of at least 64")
    p.add_argument("--placed", action="store_true", help="every launch also reading codes in kernels/placed.py's "
                   "layout")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not nvrtc.available() or nvrtc.nvdisasm() is None:
        print("needs NVRTC and nvdisasm: pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm", file=sys.stderr)
        return 2
    cuda_gemm._multiprocessors = lambda device: args.multiprocessors
    rows = []
    for shape in args.shapes.split(","):
        for k, n in SHAPES[shape]:
            for m in (int(x) for x in args.ms.split(",")):
                decode = cuda_gemm.choose_tile(m, n, k, None)
                auto = cuda_wgmma.choose_tile(m, n, k, (9, 0), args.multiprocessors) or decode
                variants = [auto] if not args.variants else list(dict.fromkeys(
                    [auto, *bench_gemm.sweep_tiles(m, n, decode)]))
                if auto is decode and m > cuda_gemm.MAX_M:  # the backend decodes for cuBLAS there
                    variants = []
                if args.staged and m >= 64:
                    variants += [replace(cuda_wgmma.WgmmaTile(**option), splits=cuda_wgmma.k_splits(
                        n // 64 // option.get("warpgroups", 2) * -(-m // option["tokens"]), k, args.multiprocessors,
                        one_wave=True)) for option in bench_gemm.STAGED if n % (64 * option.get("warpgroups", 2)) == 0]
                if args.placed:
                    variants = [v for t in variants for v in (t, replace(t, placed=True))]
                for t in variants:
                    row = {"K": k, "N": n, **analyse(t, m), "chosen": t == auto}
                    rows.append(row)
    keys = ("per_weight", "integer_per_weight", "scale_per_weight", "permute_per_weight", "load_per_weight",
            "mma_per_weight", "other_per_weight")
    print(format_table(
        ["K × N", "M", "launch", "chosen", "regs", "spill B", "loop", "instr/weight", "LOP3/SHF/IMAD", "HMUL2",
         "PRMT", "loads", "HMMA", "other", "producers"],
        [[f"{r['K']} × {r['N']}", str(r["M"]), r["tile"].replace("CudaTile", ""), "yes" if r["chosen"] else "",
          str(r["registers"]), str(r["spilled"]), str(r["loop_instructions"])] + [f"{r[key]:.4f}" for key in keys]
         + ["" if r["producer_per_weight"] is None else f"{r['producer_per_weight']:.4f}"] for r in rows]))
    bench_gemm.save(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
