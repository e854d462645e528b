"""CUDA-event timing and the test inputs shared by the benchmark scripts."""

from __future__ import annotations

import torch


def median_ms(fn, reps: int = 20) -> float:
    """Median of `reps` CUDA-event timings of fn() (after one warm-up call), in ms."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def outlier_x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """bf16 activations [m, k] on the GPU with a few large channels (1 in 64, 10-60 x), as LLM inputs have."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    ch = torch.randperm(k, device="cuda", generator=g)[: k // 64]
    x[:, ch] *= 10 + 50 * torch.rand(len(ch), device="cuda", generator=g)
    return x.to(torch.bfloat16)
