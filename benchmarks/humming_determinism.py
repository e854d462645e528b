"""Whether humming's GEMM repeats its outputs (20 calls, same input) in its default (stream-K) and batch-invariant
modes, and its GPU time in each (CUDA-graph replays over 12 weight copies), sharq weights, N = 4096 (docs/PERF.md).

    python benchmarks/humming_determinism.py
"""

from __future__ import annotations

import torch

import sharq
from bench_prepare import graph_ms  # benchmarks/, beside this script
from sharq.backends import WeightLayout, humming

MODES = (("stream-K (default)", None), ("batch-invariant", '{"use_batch_invariant": true}'))


def main() -> None:
    recipe = sharq.get_recipe("sharq")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n, k in ((4096, 4096), (4096, 14336)):
        qw = recipe.prepare_weight(torch.randn(n, k, device="cuda") / k**0.5)
        lay = humming.to_layout(qw.packed, qw.scale, None)
        copies = [WeightLayout(tuple(t.clone() for t in lay.tensors[:2]) + lay.tensors[2:], lay.meta, lay.shape)
                  for _ in range(12)]
        alpha = torch.ones(1, device="cuda")
        for m in (1, 16, 64):
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            line = [f"N={n} K={k} M={m}"]
            for name, compute in MODES:
                ys = [humming._gemm(lay, a, alpha, compute) for _ in range(20)]
                same = all(torch.equal(ys[0], y) for y in ys)
                us = 1e3 * graph_ms(lambda: [humming._gemm(c, a, alpha, compute) for c in copies]) / len(copies)
                line.append(f"{name}: {'repeats' if same else 'VARIES'} {us:.1f} µs")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
