"""One CUDA-graph capture of a forward, shared by the decode loop (generate.py) and the perplexity run
(eval/perplexity.py), so that both warm up and fail the same way."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def warm_up(forward: Callable[[], T], device: torch.device) -> T:
    """forward() once eagerly on a side stream, as a capture of it needs first: Triton and cuBLAS initialize and
    lazy buffers appear outside the capture."""
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        out = forward()
    stream.wait_stream(side)
    return out


def capture(forward: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, output) of forward() captured after its warm_up: the capture records the kernels without running
    them, and the output is the graph's own buffer, written by each replay. A capture that fails (an operation a
    graph cannot hold, e.g. a host sync) raises and leaves the device usable (_clear_capture_mark)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.device(device), torch.cuda.graph(graph):
            out = forward()
    except Exception:
        _clear_capture_mark(device)
        raise
    return graph, out


def _clear_capture_mark(device: torch.device) -> None:
    """A capture that CUDA invalidates fails in torch's capture_end before torch tells the device's random
    generator that the capture is over (torch 2.11), and every later random op on that device then raises "Offset
    increment outside graph capture". An empty capture that ends cleanly clears the mark."""
    with warnings.catch_warnings(), torch.cuda.device(device):
        warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # what torch says of an empty capture
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
