"""The CUDA small-M GEMM (kernels/cuda_gemm.py, and the wgmma kernel it hands 17-64 tokens of large layers to and,
in token tiles, prefill sizes up to its WIDE_MAX_M; kernels/cuda_wgmma.py) against the exact product on the
dequantized Ŵ. GPU only: the kernels are compiled by NVRTC, which CPU CI does not have (the Triton kernels they
stand in for are checked there; their sources compile there)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from sharq.kernels import cuda_gemm, cuda_wgmma, gemm
from sharq.kernels.placed import place_codes
from sharq.quant import QTensor, dequantize_blocks

from ..conftest import hopper

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_gemm.available(),
                                reason="needs a CUDA GPU and torch.cuda._compile_kernel")


def _payload(n: int, k: int, block: int, seed: int) -> QTensor:
    """Random codes (every one of the 16) and realistic scale codes (UE4M3 0x08..0x7E, subnormals included)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 0x7F, (n, k // block), generator=g, dtype=torch.uint8)
    return QTensor(codes.cuda(), scales.cuda(), "nvfp4", block, (n, k))


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    """An activation on an NVFP4 recipe's grid: code · scale values (multiples of 2^-10, 8 significant bits)."""
    g = torch.Generator().manual_seed(seed)
    q = _payload(m, k, 16, seed + 1)
    x = dequantize_blocks(QTensor(q.codes.cpu(), torch.randint(0x30, 0x50, (m, k // 16), generator=g,
                                                                 dtype=torch.uint8), "nvfp4", 16, (m, k)))
    return x.to(torch.bfloat16).cuda()


def _bound_ok(y: torch.Tensor, a: torch.Tensor, q: QTensor, alpha: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> float:
    """Max error over the fp32-accumulation bound plus one rounding to out_dtype (pass: <= 1)."""
    w = dequantize_blocks(QTensor(q.codes.cpu(), q.scales.cpu(), "nvfp4", q.block_size, q.shape)).double()
    ad = a.double().cpu()
    exact = alpha.double().cpu() * (ad @ w.T) + (0 if bias is None else bias.double().cpu())
    eps = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
    bound = (a.shape[1] * 2.0**-23 * alpha.double().abs().cpu() * (ad.abs() @ w.abs().T) + eps * exact.abs()
             + 1e-30)
    return float(((y.double().cpu() - exact).abs() / bound).max())


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("m,n,k", [(1, 256, 1024), (3, 512, 2048), (8, 128, 4096), (13, 4096, 512),
                                   (32, 1024, 1024), (47, 768, 2048), (64, 512, 1024),
                                   # on Hopper the wgmma kernel: 33-64 tokens of > 2^24 weights (K split in 4
                                   # at 64 tokens), 25-32 where N >= 4 K
                                   (40, 8192, 4096), (64, 6144, 4096), (28, 16384, 2048)])
def test_matches_the_exact_product(block, m, n, k):
    seed = m * 1000 + block + n + k
    q, a = _payload(n, k, block, seed), _x(m, k, seed)
    sx, sw = torch.rand(1, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    assert cuda_gemm.fits(a, q.codes, q.scales, "nvfp4", block, None, torch.float32)
    y = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, None, torch.float32)
    assert _bound_ok(y, a, q, sx * sw, None, torch.float32) <= 1


@pytest.mark.parametrize("tile", [cuda_gemm.CudaTile(1, 8, 4, 1), cuda_gemm.CudaTile(2, 4, 2, 1),
                                  cuda_gemm.CudaTile(1, 4, 1, 4), cuda_gemm.CudaTile(1, 1, 3, 2),
                                  cuda_gemm.CudaTile(2, 4, 1, 2, 3, wn=2, direct=True),
                                  cuda_gemm.CudaTile(1, 8, 2, 1, min_blocks=3),
                                  pytest.param(cuda_wgmma.WgmmaTile(), marks=hopper),
                                  pytest.param(cuda_wgmma.WgmmaTile(splits=2), marks=hopper),
                                  pytest.param(cuda_wgmma.WgmmaTile(stages=2), marks=hopper),
                                  pytest.param(cuda_wgmma.WgmmaTile(1, 3, 2, 8, 6), marks=hopper)])
@pytest.mark.parametrize("out_dtype,bias_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                  (torch.float32, torch.float16), (torch.bfloat16, None)])
def test_every_launch_shape_output_and_bias(tile, out_dtype, bias_dtype):
    m, n, k = 5, 256, 2048
    q, a = _payload(n, k, 32, 7), _x(m, k, 8)
    sx = (torch.rand(m, device="cuda") + 0.5) * 2**-12  # one scale per token; small enough for fp16 outputs
    sw = torch.rand(1, device="cuda") + 0.5
    bias = None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype)
    y = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, sx, sw, bias, out_dtype, tile=tile)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert _bound_ok(y, a, q, sx[:, None] * sw, bias, out_dtype) <= 1


@pytest.mark.parametrize("tile", [cuda_gemm.CudaTile(1, 8, 4, 1, placed=True),
                                  cuda_gemm.CudaTile(2, 4, 1, 2, 3, wn=2, direct=True, placed=True),
                                  cuda_gemm.CudaTile(1, 4, 1, 1, 4, placed=True),
                                  pytest.param(cuda_wgmma.WgmmaTile(placed=True), marks=hopper),
                                  pytest.param(cuda_wgmma.WgmmaTile(tokens=128, splits=2, placed=True), marks=hopper),
                                  pytest.param(cuda_wgmma.WgmmaTile(tokens=128, staged=True, slots=3, producers=8,
                                                                    placed=True), marks=hopper)])
@pytest.mark.parametrize("block", [16, 32])
def test_placed_codes_give_the_exact_product(tile, block):
    """The kernels reading codes in kernels/placed.py's layout (`placed=True`), given the placed payload: the
    exact product's bound at 1, 13 and 150 tokens (the wgmma launches from 13 up), with a bias and a scale per
    token."""
    n, k = 256, 2048
    q = _payload(n, k, block, 90 + block)
    codes = place_codes(q.codes)
    for m in (1, 13, 150):
        if isinstance(tile, cuda_gemm.CudaTile) and m > cuda_gemm.MAX_M or isinstance(tile, cuda_wgmma.WgmmaTile) \
                and m == 1:
            continue
        a, sx = _x(m, k, 91 + m), torch.rand(m, device="cuda") + 0.5
        sw, bias = torch.rand(1, device="cuda") + 0.5, torch.randn(n, device="cuda").to(torch.bfloat16)
        y = cuda_gemm.nvfp4_mma(a, codes, q.scales, block, sx, sw, bias, torch.bfloat16, tile=tile)
        assert _bound_ok(y, a, q, sx[:, None] * sw, bias, torch.bfloat16) <= 1, m


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("m", [1, 8, 13, 32])
@pytest.mark.parametrize("rt,wk,ring,splits", [(1, 8, 3, 1), (2, 4, 4, 1), (1, 4, 4, 2), (2, 1, 2, 1)])
def test_the_cp_async_ring_gives_the_register_stages_result_bit_for_bit(block, m, rt, wk, ring, splits):
    """Where the weight is staged changes nothing else: same K partition, same order of sums."""
    n, k = 512, 4096
    q, a = _payload(n, k, block, m + rt + ring), _x(m, k, m)
    sx, sw = torch.rand(1, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda")
    staged = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.float32,
                                 tile=cuda_gemm.CudaTile(rt, wk, 2, splits))
    ringed = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.float32,
                                 tile=cuda_gemm.CudaTile(rt, wk, 1, splits, ring))
    assert torch.equal(ringed, staged)
    assert _bound_ok(ringed, a, q, sx * sw, bias, torch.float32) <= 1


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("n,k,m,launch", [(16384, 2048, 1, (1, 3, 0)), (16384, 2048, 4, (2, 3, 8)),
                                          (16384, 2048, 8, (2, 3, 8)), (6144, 5120, 1, (1, 4, 0)),
                                          (6144, 5120, 8, (1, 4, 0)), (8192, 8192, 8, (2, 3, 0)),
                                          (8192, 8192, 4, (1, 3, 0))])
def test_the_ring_launches_up_to_8_tokens_give_the_plain_rings_result_bit_for_bit(block, n, k, m, launch):
    """choose_tile's ring launches up to 8 tokens (two row tiles capped at 64 registers where N >= 2 K above one
    token; one row tile of 4 warps with a ring of 4 where K > 4096; two row tiles of 8 warps at 8 tokens) sum exactly
    as the uncapped ring of 3 with the other number of row tiles does: same warps, same K split, same order."""
    t = cuda_gemm.choose_tile(m, n, k, torch.device("cuda"))
    assert (t.rt, t.ring, t.min_blocks) == launch, t  # (row tiles, ring chunks, register cap)
    q, a = _payload(n, k, block, 11 * m + n), _x(m, k, 5 * m)
    sx, sw = torch.rand(m, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    got = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.bfloat16)
    want = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.bfloat16,
                               tile=cuda_gemm.CudaTile(3 - t.rt, t.wk, 1, t.splits, 3, direct=True))
    assert torch.equal(got, want)
    assert _bound_ok(got, a, q, sx[:, None] * sw, bias, torch.bfloat16) <= 1


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("m", [1, 9, 32])
@pytest.mark.parametrize("rt,wk,ring,splits,wn", [(1, 8, 3, 1, 2), (2, 4, 0, 2, 2), (1, 4, 3, 1, 1), (2, 2, 0, 1, 1)])
def test_warps_on_more_rows_and_the_activation_read_where_used_change_nothing(block, m, rt, wk, ring, splits, wn):
    """Row groups per block (wn) and the activation read per use (direct) keep each accumulator's order of sums:
    the output equals the one-group, staged launch with the same K partition bit for bit."""
    n, k = 512, 4096
    q, a = _payload(n, k, block, m + rt + wn), _x(m, k, m + 1)
    sx, sw = torch.rand(m, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.bfloat16,
                               tile=cuda_gemm.CudaTile(rt, wk, 1 if ring else 2, splits, ring))
    for direct in (False, True):
        got = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.bfloat16,
                                  tile=cuda_gemm.CudaTile(rt, wk, 1 if ring else 2, splits, ring, wn, direct))
        assert torch.equal(got, want), (direct, (got.float() - want.float()).abs().max())


_SLOW_WRITE = r"""
extern "C" __global__ void slow_write(const unsigned short* src, unsigned short* dst, int n, int cycles) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // as the prepare kernel: a programmatic GEMM may start now
#endif
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}
"""


@pytest.mark.parametrize("programmatic", [False, True])
# the decode kernel (weight staged in registers; through the cp.async ring; two row tiles); on Hopper the wgmma kernel
@pytest.mark.parametrize("m,n", [(8, 1024), (1, 8192), (16, 2048), (40, 8192)])
def test_a_programmatic_launch_waits_for_the_kernel_that_writes_its_activation(programmatic, m, n, monkeypatch):
    """Launched programmatically (inside a CUDA graph, on Hopper: these shapes are ones _launch takes it for), the
    GEMM starts while the kernel before it runs (which lets it, as the prepare kernel does), issues its first weight
    chunks and must still read the activation that kernel writes (a kernel that spins ~50 µs before writing it).
    Eager calls and plain launches are checked alike."""
    from sharq.kernels import launch

    monkeypatch.setattr(launch, "PROGRAMMATIC_LAUNCH", programmatic)
    slow = torch.cuda._compile_kernel(_SLOW_WRITE, "slow_write")
    k = 4096
    q, x = _payload(n, k, 32, 31), _x(m, k, 32)
    one = torch.ones(1, device="cuda")
    want = cuda_gemm.nvfp4_mma(x, q.codes, q.scales, 32, one, one, None, torch.float32)
    a = torch.zeros_like(x)

    def step():
        a.zero_()
        slow(grid=(4, 1, 1), block=(256, 1, 1), args=[x, a, x.numel(), 100_000])
        return cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, one, one, None, torch.float32)

    assert torch.equal(step(), want)
    graph = torch.cuda.CUDAGraph()
    step()
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(3):
        graph.replay()
        assert torch.equal(y, want)


@pytest.mark.parametrize("tile", [None, pytest.param(cuda_wgmma.WgmmaTile(), marks=hopper)])
def test_every_code_and_scale_decodes_exactly(tile):
    """One-hot activations read the weight back element by element: Ŵ[n, k] for every k of a 128-element chunk
    (all four threads' blocks, the K-permutation, and in the wgmma kernel the activation's pairs as the B tile),
    every E2M1 code and every scale code, NaN included."""
    n, k = 256, 128
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    codes[:, :8] = torch.arange(16, dtype=torch.uint8)[0::2] | (torch.arange(16, dtype=torch.uint8)[1::2] << 4)
    scales = torch.arange(256, dtype=torch.uint8).reshape(n, 1).repeat(1, k // 32)
    q = QTensor(codes.cuda(), scales.cuda(), "nvfp4", 32, (n, k))
    want = dequantize_blocks(QTensor(codes, scales, "nvfp4", 32, (n, k))).float()
    one = torch.ones(1, device="cuda")
    for c in range(0, k, 32):
        a = torch.zeros(32, k, dtype=torch.bfloat16, device="cuda")
        a[torch.arange(32), c + torch.arange(32)] = 1
        y = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, one, one, None, torch.float32, tile=tile).cpu()
        got, ref = y.T, want[:, c:c + 32]
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("n,k", [(1024, 4096), (6144, 4096), (16384, 2048), (4096, 8192)])
def test_outputs_repeat_and_do_not_depend_on_the_batch(n, k):
    """Each kernel sums a token's products in an order fixed by the layer's shape, so a token's output is the same
    bits at every M the kernel takes: the decode kernel's (1-64 on 1024 x 4096; 1-32 on 6144 x 4096 and 4096 x
    8192; 1-24 on 16384 x 2048) and, on Hopper, the wgmma kernel's (the rest up to 64; on 4096 x 8192 with the K
    split of K >= N)."""
    q, a = _payload(n, k, 16, 11), _x(cuda_gemm.MAX_M, k, 12)
    one = torch.ones(1, device="cuda")
    capability = torch.cuda.get_device_capability()
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count

    def wgmma(m):
        return cuda_wgmma.choose_tile(m, n, k, capability, multiprocessors) is not None

    widest = {kind: max(m for m in range(1, cuda_gemm.MAX_M + 1) if wgmma(m) == kind)
              for kind in {wgmma(m) for m in range(1, cuda_gemm.MAX_M + 1)}}
    y = {kind: cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 16, one, one, None, torch.bfloat16)
         for kind, m in widest.items()}
    assert torch.equal(y[wgmma(64)], cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 16, one, one, None, torch.bfloat16))
    for m in (1, 2, 8, 9, 16, 17, 24, 25, 32, 33, 48, 63):
        assert torch.equal(cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 16, one, one, None, torch.bfloat16),
                           y[wgmma(m)][:m]), m


@hopper
def test_where_the_wgmma_kernel_does_not_compile_the_decode_kernel_takes_its_shapes(monkeypatch):
    """An NVRTC without sm_90a (say) costs the wgmma kernel alone: one warning, then the decode kernel's output."""
    compile_ = cuda_gemm._compile.__wrapped__

    def failing(device, source, shared, name="sharq_nvfp4_mma", arch_suffix=""):
        if name == cuda_wgmma.NAME:
            raise RuntimeError("no sm_90a here")
        return compile_(device, source, shared, name, arch_suffix)

    m, n, k = 40, 8192, 4096
    q, a = _payload(n, k, 32, 41), _x(100, k, 42)
    one = torch.ones(1, device="cuda")
    want = cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 32, one, one, None, torch.float32,
                               tile=cuda_gemm.choose_tile(m, n, k, a.device))
    monkeypatch.setattr(cuda_gemm, "_compile", failing)
    monkeypatch.setattr(cuda_gemm, "_wgmma_broken", [])
    monkeypatch.setattr(cuda_wgmma, "WIDE_MAX_M", 128)
    cuda_gemm._launch.cache_clear()
    try:
        with pytest.warns(UserWarning, match="wgmma GEMM could not be compiled"):
            y = cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 32, one, one, None, torch.float32)
        assert torch.equal(y, want) and cuda_gemm.available()
        # above 64 tokens no CUDA launch: packed_matmul decodes for cuBLAS (the Triton kernels stay available)
        assert not cuda_gemm.fits(a, q.codes, q.scales, "nvfp4", 32, None, torch.float32)
        assert cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, one, one, None, torch.float32) is None
        assert cuda_gemm.available()
    finally:
        cuda_gemm._launch.cache_clear()


@hopper
@pytest.mark.parametrize("tile", [cuda_wgmma.WgmmaTile(tokens=128), cuda_wgmma.WgmmaTile(tokens=128, splits=2),
                                  cuda_wgmma.WgmmaTile(tokens=128, warpgroups=1, stages=2),
                                  cuda_wgmma.WgmmaTile(tokens=64, warpgroups=1, splits=3),
                                  # the staged kernel: the weight decoded into shared memory by the producers
                                  cuda_wgmma.WgmmaTile(tokens=128, staged=True, slots=3, producers=8),
                                  cuda_wgmma.WgmmaTile(tokens=128, staged=True, slots=2, producers=4, splits=2),
                                  cuda_wgmma.WgmmaTile(tokens=256, staged=True, slots=2, producers=4),
                                  cuda_wgmma.WgmmaTile(tokens=64, staged=True, producers=8, warpgroups=1, splits=3)])
@pytest.mark.parametrize("block,out_dtype,bias_dtype", [(32, torch.bfloat16, torch.bfloat16),
                                                      (16, torch.float32, None)])
def test_token_tiles_match_the_exact_product_and_a_tokens_output_does_not_depend_on_the_batch(
        tile, block, out_dtype, bias_dtype):
    """Above 64 tokens the wgmma kernel takes M in tiles of tile.tokens (grid z), the last one partly beyond M: the
    exact product's bound at 300 tokens (one scale each, with and without a bias and a K split), and with the same
    launch a token's output is the same bits at every M (its column of the MMA sums in an order of its own)."""
    n, k = 256, 2048
    q, a = _payload(n, k, block, 61 + block), _x(300, k, 62)
    sx, sw = torch.rand(300, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    bias = None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype)
    y = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, out_dtype, tile=tile)
    assert y.shape == (300, n) and _bound_ok(y, a, q, sx[:, None] * sw, bias, out_dtype) <= 1
    for m in (1, 65, 129, 200):
        got = cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, block, sx[:m], sw, bias, out_dtype, tile=tile)
        assert torch.equal(got, y[:m]), m


@hopper
def test_a_group_launch_on_token_tiles_gives_each_layer_its_own_launch_bit_for_bit():
    m, k, ns = 150, 2048, (512, 128, 128)
    a, sx = _x(m, k, 71), torch.rand(m, device="cuda") + 0.5
    qs = [_payload(n, k, 16, 72 + i) for i, n in enumerate(ns)]
    sws = [torch.rand(1, device="cuda") + 0.5 for _ in ns]
    biases = [torch.randn(n, device="cuda").to(torch.bfloat16) for n in ns]
    for tile in (cuda_wgmma.WgmmaTile(tokens=128), cuda_wgmma.WgmmaTile(tokens=128, splits=2),
                 cuda_wgmma.WgmmaTile(tokens=128, staged=True, slots=3, producers=8, splits=2)):
        ys = cuda_gemm.nvfp4_mma_group(a, [(q.codes, q.scales, sw) for q, sw in zip(qs, sws)], biases, 16, sx,
                                       torch.bfloat16, tile=tile)
        for y, q, sw, bias in zip(ys, qs, sws, biases):
            assert torch.equal(y, cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 16, sx, sw, bias, torch.bfloat16,
                                                      tile=tile))
            assert _bound_ok(y, a, q, sx[:, None] * sw, bias, torch.bfloat16) <= 1


@hopper
@pytest.mark.parametrize("tile,bulk_options", [
    (cuda_wgmma.WgmmaTile(), {}), (cuda_wgmma.WgmmaTile(tokens=128, splits=2), {}),
    (cuda_wgmma.WgmmaTile(tokens=128, slots=6, stages=2), {}),
    (cuda_wgmma.WgmmaTile(splits=2), {"warpgroups": 1}), (cuda_wgmma.WgmmaTile(), {"warpgroups": 1, "stages": 2})])
@pytest.mark.parametrize("placed", [False, True])
def test_bulk_copies_of_the_tiled_activation_give_the_producer_warps_output_bit_for_bit(tile, bulk_options, placed):
    """WgmmaTile.bulk reads the activation as tiled_activation lays it out (one bulk copy a chunk) and must give
    what the producer warps give from the plain activation, bit for bit: one layer (M not a multiple of the
    tile's tokens, a K split, a bias) and a group launch; on canonical and placed codes; also with one consumer
    warpgroup a block (bulk_tile's launch up to 64 tokens: the K split, not the rows a block, orders the sums)."""
    m, k, ns, block = 150 if tile.tokens > 64 else 40, 2048, (512, 128, 128), 16
    a, sx = _x(m, k, 81), torch.rand(1, device="cuda") + 0.5
    qs = [_payload(n, k, block, 82 + i) for i, n in enumerate(ns)]
    codes = [place_codes(q.codes) if placed else q.codes for q in qs]
    sws = [torch.rand(1, device="cuda") + 0.5 for _ in ns]
    biases = [torch.randn(n, device="cuda").to(torch.bfloat16) for n in ns]
    plain, bulk = replace(tile, placed=placed), replace(tile, placed=placed, bulk=True, producers=1, **bulk_options)
    tiled = cuda_wgmma.tiled_activation(a, tile.tokens, placed)
    want = cuda_gemm.nvfp4_mma(a, codes[0], qs[0].scales, block, sx, sws[0], biases[0], torch.bfloat16, tile=plain)
    got = cuda_gemm.nvfp4_mma(tiled, codes[0], qs[0].scales, block, sx, sws[0], biases[0], torch.bfloat16, tile=bulk)
    assert torch.equal(got[:m], want)
    weights = [(c, q.scales, sw) for c, q, sw in zip(codes, qs, sws)]
    wants = cuda_gemm.nvfp4_mma_group(a, weights, biases, block, sx, torch.bfloat16, tile=plain)
    gots = cuda_gemm.nvfp4_mma_group(tiled, weights, biases, block, sx, torch.bfloat16, tile=bulk)
    assert all(torch.equal(g[:m], w) for g, w in zip(gots, wants))


@hopper
def test_packed_matmul_and_eager_plans_take_token_tiles_up_to_wide_max_m(monkeypatch):
    """From 65 to WIDE_MAX_M tokens a layer of at least 2^24 weights runs on the wgmma kernel's token tiles (the
    launch choose_tile gives), one-off and as an eager plan; above, packed_matmul decodes for cuBLAS and the CUDA
    plan declines (the packed backend's eager plan then decodes too)."""
    monkeypatch.setattr(cuda_wgmma, "WIDE_MAX_M", 256)
    n, k = 4096, 4096
    q, a = _payload(n, k, 32, 81), _x(257, k, 82)
    one = torch.ones(1, device="cuda")
    mps = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (65, 256):
        t = cuda_wgmma.choose_tile(m, n, k, (9, 0), mps)
        assert t is not None and t.tokens == cuda_wgmma.WIDE_TOKENS
        y = gemm.packed_matmul(a[:m], q.codes, q.scales, "nvfp4", 32, one, one, None, torch.bfloat16)
        assert torch.equal(y, cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 32, one, one, None, torch.bfloat16,
                                                  tile=t))
        plan = cuda_gemm.launcher(q.codes, q.scales, "nvfp4", 32, one, None, (m,), False, torch.bfloat16)
        assert plan is not None and torch.equal(plan(a[:m].contiguous(), one.reshape(1, 1)), y)
    y = gemm.packed_matmul(a, q.codes, q.scales, "nvfp4", 32, one, one, None, torch.bfloat16)
    assert torch.equal(y, gemm.decoded_matmul(a, q.codes, q.scales, "nvfp4", 32, one, one, None, torch.bfloat16))
    assert cuda_gemm.launcher(q.codes, q.scales, "nvfp4", 32, one, None, (257,), False, torch.bfloat16) is None


@pytest.mark.parametrize("m", [4, 48])
def test_packed_matmul_takes_it_where_it_fits_and_agrees_with_the_triton_kernel(m):
    n, k = 512, 1024
    q, a = _payload(n, k, 32, 21 + m), _x(m, k, 22 + m)
    sx, sw = torch.rand(1, 1, device="cuda") + 0.5, torch.rand(1, device="cuda") + 0.5
    y = gemm.packed_matmul(a, q.codes, q.scales, "nvfp4", 32, sx, sw, None, torch.float32)
    direct = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, sx.reshape(-1), sw, None, torch.float32)
    assert torch.equal(y, direct)
    triton_y = gemm.packed_matmul(a, q.codes, q.scales, "nvfp4", 32, sx, sw, None, torch.float32,
                                  tile=gemm.choose_tile(m, n, k, a.device))
    assert _bound_ok(triton_y, a, q, sx * sw, None, torch.float32) <= 1
    assert _bound_ok(y, a, q, sx * sw, None, torch.float32) <= 1


def test_shapes_it_does_not_fit_are_refused_by_fits():
    q = _payload(256, 1024, 32, 1)
    a = _x(4, 1024, 2)
    assert not cuda_gemm.fits(a[:, :1000], q.codes, q.scales, "nvfp4", 32, None, torch.bfloat16)  # K != Kp
    assert not cuda_gemm.fits(_x(cuda_gemm.MAX_M + 1, 1024, 3), q.codes, q.scales, "nvfp4", 32, None,
                              torch.bfloat16)  # M > MAX_M
    assert not cuda_gemm.fits(a, q.codes[:250], q.scales[:250], "nvfp4", 32, None, torch.bfloat16)  # N % 16
    assert not cuda_gemm.fits(a, q.codes, q.scales, "mxfp4", 32, None, torch.bfloat16)


_GROUP_TILES = [None, cuda_gemm.CudaTile(1, 4, 2, 1), cuda_gemm.CudaTile(2, 8, 1, 1, 3, direct=True),
                cuda_gemm.CudaTile(1, 4, 1, 2, 3, direct=True),  # a K split: fp32 partials per layer
                pytest.param(cuda_wgmma.WgmmaTile(), marks=hopper), pytest.param(cuda_wgmma.WgmmaTile(splits=2),
                                                                                  marks=hopper)]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("m", [1, 13, 40])
@pytest.mark.parametrize("ns,bias_dtype", [((512, 128, 128), None), ((256, 768), torch.bfloat16),
                                           ((128, 256, 384), torch.float32)])
@pytest.mark.parametrize("tile", _GROUP_TILES)
def test_a_group_launch_gives_each_layer_its_own_launch_bit_for_bit(block, m, ns, bias_dtype, tile):
    """Layers that read one activation (q/k/v, gate/up) in one launch: each output equals that layer's own launch
    with the same tile bit for bit (its own weight, weight scale, bias; same K partition), and the exact product's
    bound, on both kernels, with and without a K split over blocks. By default (tile None) these small layers group
    up to 8 tokens only (above, one launch each measured faster where no layer splits K)."""
    k = 2048
    a = _x(m, k, 31 + m)
    qs = [_payload(n, k, block, 32 + i + m) for i, n in enumerate(ns)]
    sws = [torch.rand(1, device="cuda") + 0.5 for _ in ns]
    biases = [None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype) for n in ns]
    sx = torch.rand(m, device="cuda") + 0.5
    weights = [(q.codes, q.scales, sw) for q, sw in zip(qs, sws)]
    ys = cuda_gemm.nvfp4_mma_group(a, weights, biases, block, sx, torch.bfloat16, tile=tile)
    if tile is None and m > 8:
        assert ys is None
        return
    assert ys is not None and len(ys) == len(ns)
    for y, q, sw, bias in zip(ys, qs, sws, biases):
        own = cuda_gemm.nvfp4_mma(a, q.codes, q.scales, block, sx, sw, bias, torch.bfloat16,
                                  tile=tile or cuda_gemm.group_tile(m, ns, k, a.device))
        assert y.shape == (m, q.shape[0]) and torch.equal(y, own)
        assert _bound_ok(y, a, q, sx[:, None] * sw, bias, torch.bfloat16) <= 1


@hopper
def test_a_group_on_the_wgmma_kernels_shapes_takes_it():
    """Where the summed width is the wgmma kernel's shape (here 16384 x 2048 at 40 tokens), the group launches on it:
    each output equals the layer's own wgmma launch with that tile bit for bit."""
    m, k, ns = 40, 2048, (8192, 8192)
    a = _x(m, k, 51)
    qs = [_payload(n, k, 32, 52 + i) for i, n in enumerate(ns)]
    one = torch.ones(1, device="cuda")
    t = cuda_gemm.group_tile(m, ns, k, a.device)
    assert isinstance(t, cuda_wgmma.WgmmaTile)
    ys = cuda_gemm.nvfp4_mma_group(a, [(q.codes, q.scales, one) for q in qs], [None, None], 32, one, torch.float32)
    for y, q in zip(ys, qs):
        assert torch.equal(y, cuda_gemm.nvfp4_mma(a, q.codes, q.scales, 32, one, one, None, torch.float32, tile=t))


def test_a_group_launch_is_refused_where_one_launch_per_layer_measured_faster_or_cannot_take_them():
    """Above 8 tokens on layers that alone do not split K, and layers that are not whole blocks of the tile: None
    (each layer then launches on its own)."""
    q = _payload(8192, 1024, 32, 3)
    one = torch.ones(1, device="cuda")
    wide = [(q.codes, q.scales, one)] * 2  # 8192 rows each: alone the group's K partition (4 warps, no K split)
    assert cuda_gemm.nvfp4_mma_group(_x(16, 1024, 4), wide, [None, None], 32, one, torch.bfloat16) is None
    assert cuda_gemm.group_launcher(wide, [None, None], "nvfp4", 32, (16,), False, torch.bfloat16) is None
    assert cuda_gemm.group_launcher(wide, [None, None], "nvfp4", 32, (8,), False, torch.bfloat16) is not None
    odd = [(q.codes[:48], q.scales[:48], one), (q.codes, q.scales, one)]  # 48 rows: not whole 2-row-tile blocks
    assert cuda_gemm.nvfp4_mma_group(_x(1, 1024, 5), odd, [None, None], 32, one, torch.bfloat16,
                                     tile=cuda_gemm.CudaTile(2, 4, 1, 1, 3, direct=True)) is None


@pytest.mark.parametrize("k,ns", [(2048, (2048, 512, 512)), (2048, (4608, 4608)), (2048, (2048, 2048, 2048))])
def test_a_layers_output_does_not_depend_on_the_batch_where_groups_come_and_go(k, ns):
    """As a model runs them (group_launcher where it takes the layers, else one launch each): a token's output is
    the same bits at every M of the decode kernel's range (up to 24 tokens, 16 where the group's summed width takes
    the wgmma kernel from 17), also where the group gives way to single launches."""
    capability = torch.cuda.get_device_capability()
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    top = max(m for m in range(1, 25) if all(cuda_wgmma.choose_tile(m, n, k, capability, multiprocessors) is None
                                             for n in (sum(ns), *ns)))
    a = _x(top, k, 61)
    qs = [_payload(n, k, 16, 62 + i) for i, n in enumerate(ns)]
    one = torch.ones(1, device="cuda")

    def outputs(m):
        run = cuda_gemm.group_launcher([(q.codes, q.scales, one) for q in qs], [None] * len(ns), "nvfp4", 16, (m,),
                                       False, torch.bfloat16)
        if run is not None:
            return run(a[:m], one)
        return [cuda_gemm.nvfp4_mma(a[:m], q.codes, q.scales, 16, one, one, None, torch.bfloat16) for q in qs]

    want = outputs(top)
    for m in (m for m in (1, 2, 8, 9, 16, 17, 23) if m < top):
        assert all(torch.equal(y, w[:m]) for y, w in zip(outputs(m), want)), m


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_a_plans_fixed_launches_read_each_calls_input_and_write_its_own_output(m, bias):
    """A launch plan's launches are fixed after a thread's first call on a stream (launch.DriverKernel.fixed): a
    later call, with other activation and scale tensors, still computes its own product into a fresh output, bit
    for bit the one-off launch's, one layer or a group, on a side stream and from another thread alike."""
    k, ns = 1024, (512, 128, 128)
    qs = [_payload(n, k, 16, 70 + i + m) for i, n in enumerate(ns)]
    sws = [torch.rand(1, device="cuda") + 0.5 for _ in ns]
    biases = [torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None for n in ns]
    weights = [(q.codes, q.scales, sw) for q, sw in zip(qs, sws)]
    one = cuda_gemm.launcher(qs[0].codes, qs[0].scales, "nvfp4", 16, sws[0], biases[0], (m,), True, torch.bfloat16)
    group = cuda_gemm.group_launcher(weights, biases, "nvfp4", 16, (m,), True, torch.bfloat16)
    assert one is not None and group is not None
    calls = [(_x(m, k, 80 + i), torch.rand(m, 1, device="cuda") + 0.5) for i in range(4)]
    wants = [(cuda_gemm.nvfp4_mma(a, qs[0].codes, qs[0].scales, 16, sx, sws[0], biases[0], torch.bfloat16),
              cuda_gemm.nvfp4_mma_group(a, weights, biases, 16, sx, torch.bfloat16)) for a, sx in calls]

    def check(results):
        for (y, ys), (want, group_want) in zip(results, wants):
            assert torch.equal(y, want) and all(torch.equal(g, w) for g, w in zip(ys, group_want))

    def run_all():
        return [(one(a, sx), group(a, sx)) for a, sx in calls]

    check(run_all())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = run_all()
    side.synchronize()
    check(on_side)
    from_thread = []
    worker = threading.Thread(target=lambda: from_thread.append(run_all()) or torch.cuda.synchronize())
    worker.start()
    worker.join()
    check(from_thread[0])
