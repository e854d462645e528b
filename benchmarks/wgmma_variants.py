"""Where a CUDA GEMM's time goes: the kernel as it is, then with one cost taken out at a time by editing its source.
The variants compute wrong outputs on purpose; only their times mean something. Each shape where the packed
backend runs the kernel, GEMM alone (the activation prepared once), over copies of the weight in one CUDA graph
(benchmarks/bench_gemm.py's timing), beside BF16 cuBLAS; the best of two interleaved passes.

    python benchmarks/wgmma_variants.py [--kernel wgmma|decode] [--ms 64,33] [--json out.json]

The wgmma kernel (kernels/cuda_wgmma.py, 25-256 tokens of large layers on Hopper):
- "8 tokens": the producers read 8 tokens of each token tile of the activation and store zeros for the rest (the
  activation's L2 and L1 traffic, an eighth of it at 64 tokens a tile, a sixteenth at 128);
- "weight from L2": every block streams the same 128 weight rows, which then come from L2 (the weight's memory
  latency and bandwidth);
- "both": the two together;
- "no MMA": the MMAs replaced by an integer sum of their operands (the decode and the pipeline without the tensor
  cores).

The decode kernel (kernels/cuda_gemm.py, 1-64 tokens; default --ms 1,16): whether its loop is bound by issue or by
memory, which decides whether fewer instructions a weight can still make it faster:
- "no decode": each A fragment is its raw code words mixed with the scale pair (two logic ops for the E2M1 bit
  placement and scale multiplies of four pairs);
- "no MMA": each MMA replaced by a logic op and an add of its operands into the accumulator;
- "loads only": both (what benchmarks/weight_read.py's loads-only kernels bound);
- "weight from L2": every block streams the same 128 weight rows.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from bench_gemm import SHAPES, SHAPES_70B, CudaCase, save  # benchmarks/, beside this script
from sharq.kernels import cuda_gemm, cuda_wgmma

_FEW_TOKENS = ("const int left = M - (m0 + tg0 * 8 + r);", "const int left = min(M, m0 + 8) - (m0 + tg0 * 8 + r);")
_SAME_ROWS = ("const long n = n0 + h * 8 + g;", "const long n = (n0 + h * 8 + g) % 128;")
_NO_MMA = [("for (int jj = 0; jj < 4; ++jj) wgmma(acc, frag[half][jj], b + (half * 4 + jj) * (STEP >> 4));",
            "for (int jj = 0; jj < 4; ++jj) acc[jj] += __int_as_float(frag[half][jj][0] + frag[half][jj][1]"
            " + frag[half][jj][2] + frag[half][jj][3] + (int)b);"),
           ("          wg_commit();\n          wg_wait_one();", "")]
WGMMA = {"as is": [], "8 tokens": [_FEW_TOKENS], "weight from L2": [_SAME_ROWS],
         "both": [_FEW_TOKENS, _SAME_ROWS], "no MMA": _NO_MMA}
_NO_DECODE = [(f"    a[{i}] = mul_bf16x2(decode_pair(w{i % 2}, i{' + 1' if i > 1 else ''}), sc[{i % 2}][v >> 1]);",
               f"    a[{i}] = w{i % 2}{f' ^ sc[{i % 2}][v >> 1]' if i > 1 else ''};") for i in range(4)]
_DECODE_NO_MMA = [("""  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));""",
                   "  d[0] += __int_as_float(a0 ^ a1 ^ a2 ^ a3 ^ b0 ^ b1);")]
DECODE = {"as is": [], "no decode": _NO_DECODE, "no MMA": _DECODE_NO_MMA, "loads only": _NO_DECODE + _DECODE_NO_MMA,
          "weight from L2": [("      const long n = n0 + rt * 16 + h * 8 + g;",
                              "      const long n = (n0 + rt * 16 + h * 8 + g) % 128;")]}
KERNELS = {"wgmma": (cuda_wgmma, WGMMA, "64,33"), "decode": (cuda_gemm, DECODE, "1,16")}


def edited(source: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        if source.count(old) != 1:
            raise RuntimeError(f"the kernel's source changed: {old!r} is not there once; update this script")
        source = source.replace(old, new)
    return source


def runs_it(kernel: str, m: int, n: int, k: int, capability: tuple[int, int], sms: int) -> bool:
    """Whether the packed backend runs `kernel` for m tokens of this shape."""
    wgmma = cuda_wgmma.choose_tile(m, n, k, capability, sms) is not None
    return wgmma if kernel == "wgmma" else not wgmma and m <= cuda_gemm.MAX_M


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=KERNELS, default="wgmma")
    p.add_argument("--ms", default=None, help="comma-separated token counts (wgmma: 64,33; decode: 1,16)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    module, variants, default_ms = KERNELS[args.kernel]
    if not torch.cuda.is_available() or args.kernel == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_variants needs a CUDA GPU (a Hopper one, sm_90a, for the wgmma kernel)", file=sys.stderr)
        return 2
    sources = {name: edited(module._SOURCE, edits) for name, edits in variants.items()}
    original = module._SOURCE
    capability = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    try:
        for (k, n), m in itertools.product(SHAPES + SHAPES_70B, [int(v) for v in (args.ms or default_ms).split(",")]):
            if not runs_it(args.kernel, m, n, k, capability, sms):
                continue
            case = CudaCase.make("sharq", k, n, m)
            times: dict[str, list[float]] = {}
            for name, source in list(sources.items()) * 2:
                module._SOURCE = source
                cuda_gemm._launch.cache_clear()
                times.setdefault(name, []).append(case.cuda_us(None))
            row = {"kernel": args.kernel, "K": k, "N": n, "M": m, "bf16_us": case.bf16_us,
                   **{name: min(v) for name, v in times.items()}}
            rows.append(row)
            print(f"K={k} N={n} M={m}: BF16 {case.bf16_us:.1f} µs | "
                  + " | ".join(f"{name} {row[name]:.1f}" for name in variants), flush=True)
            del case
    finally:
        module._SOURCE = original
        cuda_gemm._launch.cache_clear()
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
