"""Perplexity over non-overlapping windows (SPEC §9)."""

from __future__ import annotations

import time
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


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl"
               ) -> Perplexity:
    """exp(mean NLL of every predicted token) over windows [n, seqlen]."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(batches), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        ids = batches[i: i + batch_size].to(device)
        logits = model(ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ppl = torch.tensor(nll / count, dtype=torch.float64).exp().item()  # inf, not an OverflowError, if it explodes
    return Perplexity(ppl, nll, count, len(batches), batches.shape[1], seconds)
