"""CUDA-event timing shared by the benchmark scripts."""

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
