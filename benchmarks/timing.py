"""CUDA-event timing (of calls, and of decode steps) and the test inputs shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch

from sharq.generate import DecodeSession


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


def warm_session(model, batch: int, max_len: int, **options) -> tuple[DecodeSession, torch.Tensor]:
    """A sharq.generate.DecodeSession of `model` (`options`: cuda_graph, compile) on `batch` rows of a seeded
    random 16-token prompt, prefilled and stepped twice (kernels compiled, launch plans made, the graph captured):
    (the session, its next token)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=model.device,
                        generator=torch.Generator(device=model.device).manual_seed(0))
    session = DecodeSession(model, batch, max_len, **options)
    token = session.prefill(ids).argmax(-1)
    for _ in range(2):
        token = session.step(token).argmax(-1)
    return session, token


def timed_steps(session, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[float], list[float]]:
    """`steps` greedy decode steps of a sharq.generate.DecodeSession, each from an idle GPU: (the last token,
    CUDA-event ms of each step, the host's wall ms in each step() until its last launch returned: where that is the
    step's time, the step is host-bound)."""
    times, host_times = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        logits = session.step(token)
        host_times.append((time.perf_counter() - began) * 1e3)
        token = logits.argmax(-1)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return token, times, host_times


def outlier_x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """bf16 activations [m, k] on the GPU with a few large channels (1 in 64, 10-60 x), as LLM inputs have."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    ch = torch.randperm(k, device="cuda", generator=g)[: k // 64]
    x[:, ch] *= 10 + 50 * torch.rand(len(ch), device="cuda", generator=g)
    return x.to(torch.bfloat16)
