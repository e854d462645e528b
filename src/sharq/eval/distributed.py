"""The torch.distributed process group an evaluation may run in (torchrun / accelerate launch, one process per
GPU): sharq joins what the launcher set up and splits work over it, with no distribution layer of its own."""

from __future__ import annotations


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in an initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
