"""The scratch path's fused product (kernels/cublaslt.py): α·(a·wᵀ) + bias from one cuBLASLt call with α read from
device memory, against the exact product in float64; where it declines, the caller's epilogue path."""

from __future__ import annotations

import ctypes

import pytest
import torch

from sharq.kernels import cublaslt

CUDA = torch.cuda.is_available()


def test_the_heuristic_result_has_cublaslt_hs_layout():
    """cublasLtMatmulHeuristicResult_t: a 64-byte algo, a size_t, a status, a float and four ints."""
    assert ctypes.sizeof(cublaslt._HeuristicResult) == 96


def test_it_declines_where_it_does_not_apply():
    """No CUDA tensor, α per token, a bias of another dtype than y or not 16-byte aligned: None (the caller keeps
    its epilogue)."""
    cpu = torch.device("cpu")
    assert cublaslt.scaled_matmul(64, 32, 128, torch.bfloat16, False, None, cpu) is None
    if CUDA:
        gpu = torch.device("cuda", 0)
        assert cublaslt.scaled_matmul(64, 32, 128, torch.bfloat16, True, None, gpu) is None
        bias = torch.zeros(32, device=gpu)
        assert cublaslt.scaled_matmul(64, 32, 128, torch.bfloat16, False, bias, gpu) is None
        assert cublaslt.scaled_matmul(64, 32, 128, torch.bfloat16, False, bias.bfloat16()[1:], gpu) is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k", [(33, 64, 128), (300, 200, 96), (2048, 512, 1024)])
def test_it_is_the_exact_product_up_to_accumulation_rounded_once(out_dtype, with_bias, m, n, k):
    """y within K·2⁻²³ relative of the fp32 sum's terms plus one rounding to y's dtype of the exact value (α and
    the bias applied to the fp32 sum: the epilogue path rounded y to bf16 before them), and a CUDA graph's replay
    gives the eager call's bits."""
    g = torch.Generator().manual_seed(m * n + k + with_bias)
    a = (torch.randn(m, k, generator=g) * 4).bfloat16().cuda()
    w = torch.randn(n, k, generator=g).bfloat16().cuda()
    sx, sw = (torch.rand(1, 1, generator=g) + 0.1).cuda(), (torch.rand(1, generator=g) + 0.1).cuda()
    bias = (torch.randn(n, generator=g) * 8).to(out_dtype).cuda() if with_bias else None
    run = cublaslt.scaled_matmul(m, n, k, out_dtype, False, bias, a.device)
    if out_dtype == torch.float16:  # cuBLASLt has no bf16 x bf16 -> fp16 product: the epilogue path stays
        assert run is None
        return
    assert run is not None
    y = run(a, w, sx, sw, bias, torch.empty(m, n, dtype=out_dtype, device="cuda"))
    alpha = (sx.double() * sw.double()).cpu()
    exact = alpha * (a.double().cpu() @ w.double().cpu().T) + (0 if bias is None else bias.double().cpu())
    terms = alpha * (a.double().abs().cpu() @ w.double().abs().cpu().T)
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[out_dtype]
    bound = (k + 2) * 2.0**-23 * terms + u * exact.abs() * (1 + 2.0**-20) + 1e-30
    assert bool(((y.double().cpu() - exact).abs() <= bound).all())
    graph, out = torch.cuda.CUDAGraph(), torch.empty(m, n, dtype=out_dtype, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(a, w, sx, sw, bias, out)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        run(a, w, sx, sw, bias, out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_product_is_made_outside_graph_captures_only():
    """Its β = 0 is written by a kernel, which a capture would only record: a shape first asked for inside a
    capture gets None there (the epilogue path), and its product once asked for outside."""
    device = torch.device("cuda", torch.cuda.current_device())
    x, graph = torch.zeros(1, device=device), torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        inside = cublaslt.scaled_matmul(40, 64, 96, torch.bfloat16, False, None, device)
        x.add_(1)
    assert inside is None
    assert cublaslt.scaled_matmul(40, 64, 96, torch.bfloat16, False, None, device) is not None
