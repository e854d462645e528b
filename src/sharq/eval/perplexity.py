"""Perplexity over non-overlapping windows (SPEC §9)."""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import check_count
from .._cuda_graph import capture, warm_up
from .._format import plural
from ..models import input_device, is_dispatched
from .distributed import process_rank


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    seqlen: int
    seconds: float
    batch_nll: tuple[float, ...] = ()  # each forward's NLL sum, in order (nll_sum adds them up in this order)

    @property
    def tokens_per_s(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("nan")


def windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start of `ids`, the remainder dropped. With a BOS id, each
    window is BOS + seqlen-1 text tokens."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    body = seqlen - (bos_id is not None)
    budget = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n = budget // body
    if n == 0:
        window = f"one window of {seqlen} ({plural(body, 'text token')})"
        if budget < ids.numel():
            raise ValueError(f"max_tokens {max_tokens} is too small for {window}: raise it or lower seqlen")
        raise ValueError(f"the text has {plural(ids.numel(), 'token')}: too short for {window}; lower seqlen or give "
                         "more text")
    w = ids[: n * body].reshape(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


class GraphedForward:
    """model(ids).logits, replayed from one CUDA graph per input shape: a quantized layer launches several kernels,
    and in eager mode the host's launch cost, not the GPU, sets the pace (benchmarks/bench_model.py). Windows of a
    perplexity run share one shape, so one capture serves them all. The logits returned are the graph's own
    buffer, overwritten by the next call. With use_graphs=False, or once a capture fails (an operation the graph
    cannot hold), the model runs eagerly."""

    def __init__(self, model, use_graphs: bool = True):
        self.model, self.graphs, self.eager = model, {}, not use_graphs

    def _eager(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self._eager(ids)
        if ids.shape not in self.graphs:
            try:
                self.graphs[ids.shape] = self._capture(ids)
            except Exception as e:  # noqa: BLE001 - any capture failure: fall back, visibly
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); running eagerly",
                              stacklevel=2)
                self.eager = True
                return self._eager(ids)
        graph, static_ids, logits = self.graphs[ids.shape]
        static_ids.copy_(ids)
        graph.replay()
        return logits

    def _capture(self, ids: torch.Tensor):
        static_ids = ids.clone()
        forward = functools.partial(self._eager, static_ids)
        warm_up(forward, ids.device)
        graph, logits = capture(forward, ids.device)
        return graph, static_ids, logits


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl",
               cuda_graphs: bool = True) -> Perplexity:
    """exp(mean NLL of every predicted token) over windows [n, seqlen]. On CUDA the forward is replayed from a
    CUDA graph (GraphedForward) unless cuda_graphs=False."""
    from tqdm.auto import tqdm

    batch_size = check_count("batch_size", batch_size)
    if len(batches) == 0:
        raise ValueError("no windows to evaluate")
    device = input_device(model)
    # a model accelerate spread over devices moves tensors between them in hooks: no graph captures that
    forward = GraphedForward(model, use_graphs=cuda_graphs and device.type == "cuda" and not is_dispatched(model))
    parts, count = [], 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(batches), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        ids = batches[i: i + batch_size].to(device)
        logits = forward(ids)[:, :-1].float()
        parts.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum").item())
        count += ids[:, 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return _result(parts, count, len(batches), batches.shape[1], time.perf_counter() - start)


def _result(parts: list[float], count: int, windows: int, seqlen: int, seconds: float) -> Perplexity:
    nll = 0.0
    for part in parts:  # in order: a run split over processes adds the same numbers in the same order
        nll += part
    ppl = torch.tensor(nll / count, dtype=torch.float64).exp().item()  # inf, not an OverflowError, if it explodes
    return Perplexity(ppl, nll, count, windows, seqlen, seconds, tuple(parts))


def distributed_perplexity(model, batches: torch.Tensor, batch_size: int = 1, progress: bool = True,
                           desc: str = "ppl", cuda_graphs: bool = True) -> Perplexity:
    """perplexity() split over the processes of a torch.distributed run (torchrun / accelerate launch: one per
    GPU), the same number bit for bit: process r runs the forwards (batches of batch_size windows, as one process
    would cut them) r, r + world, r + 2·world, …, and the per-forward NLL sums are gathered and added in forward
    order. A batch's per-tensor activation scale spans the same windows either way, so nothing else changes.
    Without an initialized process group, perplexity() itself."""
    rank, world = process_rank()
    if world == 1:
        return perplexity(model, batches, batch_size, progress, desc, cuda_graphs)
    import torch.distributed as dist

    forwards = -(-len(batches) // batch_size)
    mine = [w for f in range(rank, forwards, world) for w in range(f * batch_size, min((f + 1) * batch_size,
                                                                                        len(batches)))]
    # a process with no forward (fewer forwards than processes) still joins the gather, with nothing to add
    p = perplexity(model, batches[mine], batch_size, progress, desc, cuda_graphs) if mine else None
    gathered: list = [None] * world
    dist.all_gather_object(gathered, ((), 0.0) if p is None else (p.batch_nll, p.seconds))
    parts = [gathered[f % world][0][f // world] for f in range(forwards)]
    return _result(parts, len(batches) * (batches.shape[1] - 1), len(batches), batches.shape[1],
                   max(seconds for _, seconds in gathered))
