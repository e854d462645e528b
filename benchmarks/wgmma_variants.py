"""Where the wgmma GEMM's time goes (kernels/cuda_wgmma.py, at any M it takes): the kernel as it is, then with one
cost taken out at a time by editing its source. The variants compute wrong outputs on purpose; only their times
mean something. Each shape where the packed backend runs the wgmma kernel, GEMM alone (the activation prepared
once), over copies of the weight in one CUDA graph (benchmarks/bench_gemm.py's timing), beside BF16 cuBLAS; the
best of two interleaved passes.

    python benchmarks/wgmma_variants.py [--ms 64,33] [--json out.json]

- "8 tokens": the producers read 8 tokens of each token tile of the activation and store zeros for the rest (the
  activation's L2 and L1 traffic, an eighth of it at 64 tokens a tile, a sixteenth at 128);
- "weight from L2": every block streams the same 128 weight rows, which then come from L2 (the weight's memory
  latency and bandwidth);
- "both": the two together;
- "no MMA": the MMAs replaced by an integer sum of their operands (the decode and the pipeline without the tensor
  cores).
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
VARIANTS = {"as is": [], "8 tokens": [_FEW_TOKENS], "weight from L2": [_SAME_ROWS],
            "both": [_FEW_TOKENS, _SAME_ROWS], "no MMA": _NO_MMA}


def edited(source: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        if source.count(old) != 1:
            raise RuntimeError(f"kernels/cuda_wgmma.py changed: {old!r} is not there once; update this script")
        source = source.replace(old, new)
    return source


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="64,33", help="comma-separated token counts")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_variants needs a Hopper GPU (sm_90a)", file=sys.stderr)
        return 2
    sources = {name: edited(cuda_wgmma._SOURCE, edits) for name, edits in VARIANTS.items()}
    original = cuda_wgmma._SOURCE
    capability = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    try:
        for (k, n), m in itertools.product(SHAPES + SHAPES_70B, [int(v) for v in args.ms.split(",")]):
            if cuda_wgmma.choose_tile(m, n, k, capability, sms) is None:
                continue
            case = CudaCase.make("sharq", k, n, m)
            times: dict[str, list[float]] = {}
            for name, source in list(sources.items()) * 2:
                cuda_wgmma._SOURCE = source
                cuda_gemm._launch.cache_clear()
                times.setdefault(name, []).append(case.cuda_us(None))
            row = {"K": k, "N": n, "M": m, "bf16_us": case.bf16_us, **{name: min(v) for name, v in times.items()}}
            rows.append(row)
            print(f"K={k} N={n} M={m}: BF16 {case.bf16_us:.1f} µs | "
                  + " | ".join(f"{name} {row[name]:.1f}" for name in VARIANTS), flush=True)
            del case
    finally:
        cuda_wgmma._SOURCE = original
        cuda_gemm._launch.cache_clear()
    save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
