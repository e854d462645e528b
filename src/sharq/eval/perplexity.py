"""Perplexity over non-overlapping windows (SPEC §9)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    seqlen: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("nan")


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Tokenize the whole text once, without special tokens (BOS is added per window where the model needs it)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def bos_token(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself starts every text with it (Gemma), else None (SmolLM2). Read from what
    the tokenizer does, not from `add_bos_token`, which some tokenizers leave False while their post-processor
    adds BOS."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos if bos is not None and ids and ids[0] == bos else None


def windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start of `ids`, the remainder dropped. With a BOS id, each
    window is BOS + seqlen-1 text tokens."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    body = seqlen - (bos_id is not None)
    budget = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n = budget // body
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens (budget {budget}): too short for one window of "
                         f"{seqlen}; lower --seqlen or give more text")
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
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):  # warm up (kernel compilation, lazy buffers) outside the capture
            self._eager(static_ids)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._eager(static_ids)
        return graph, static_ids, logits


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl",
               cuda_graphs: bool = True) -> Perplexity:
    """exp(mean NLL of every predicted token) over windows [n, seqlen]. On CUDA the forward is replayed from a
    CUDA graph (GraphedForward) unless cuda_graphs=False."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    forward = GraphedForward(model, use_graphs=cuda_graphs and device.type == "cuda")
    nll, count = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(batches), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        ids = batches[i: i + batch_size].to(device)
        logits = forward(ids)[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ppl = torch.tensor(nll / count, dtype=torch.float64).exp().item()  # inf, not an OverflowError, if it explodes
    return Perplexity(ppl, nll, count, len(batches), batches.shape[1], seconds)
