import os
import random

import pytest
import torch


@pytest.fixture
def rng(request) -> torch.Generator:
    """A fresh seed per test (or SHARQ_SEED to replay one); the seed is printed, so a failure shows it."""
    seed = int(os.environ.get("SHARQ_SEED", random.randrange(2**31)))
    print(f"\n[{request.node.name}] seed={seed} (replay: SHARQ_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def outlier_activations(g: torch.Generator, m: int, k: int, frac: float = 1 / 64) -> torch.Tensor:
    """LLM-like activations: Gaussian with a few channels 10-60x larger."""
    x = torch.randn(m, k, generator=g)
    ch = torch.randperm(k, generator=g)[: max(1, int(k * frac))]
    x[:, ch] *= 10 + 50 * torch.rand(len(ch), generator=g)
    return x
