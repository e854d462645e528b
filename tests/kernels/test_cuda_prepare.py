"""The CUDA activation prepare (kernels/cuda_prepare.py) against the Triton kernel, bit for bit, on a Hopper GPU;
its sources compile on the CPU (NVRTC) in the last tests."""

from __future__ import annotations

import itertools

import pytest
import torch

import sharq
from sharq.kernels import cuda_gemm, cuda_prepare, nvrtc, prepare

on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_gemm.available()
    or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU and torch.cuda._compile_kernel")
KERNEL_RECIPES = ["nvfp4", "mxfp4", "sharq", "sharq-mxfp4", "sparse-only", "dense-dense"]


def _x(m: int, k: int, seed: int, dtype=torch.bfloat16, specials: bool = False) -> torch.Tensor:
    """Heavy-tailed rows with outlier channels; `specials`: NaN, ±Inf, ±0, subnormals and huge values sprinkled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[:, torch.randint(0, k, (max(k // 64, 1),), generator=g)] *= 40.0
    if specials:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:max(flat.numel() // 50, 8)]
        pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38, -1e-30])
        flat[idx] = pool[torch.arange(idx.numel()) % pool.numel()]
    return x.to(dtype).cuda()


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every value's bits; NaN where the other has NaN (payloads are the hardware's canonical NaN either way)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    ints = {2: torch.int16, 4: torch.int32}[want.element_size()]
    mismatch = (got.view(ints) != want.view(ints)) & ~nan
    assert not mismatch.any(), f"{int(mismatch.sum())} of {want.numel()} differ, first at {mismatch.nonzero()[0]}"


def _check(x: torch.Tensor, recipe, out_dtype=torch.bfloat16, amax=None, run=None, cluster=None) -> None:
    got = prepare.cuda_dequantized(x, recipe, out_dtype, amax=amax, run=run, cluster=cluster)
    assert got is not None, "the CUDA kernel did not take the call"
    want = prepare.prepare_dequantized(x, recipe, out_dtype, amax=amax)
    _same_bits(got[0], want[0])
    _same_bits(got[1], want[1])


@on_hopper
@pytest.mark.parametrize("name", KERNEL_RECIPES)
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 1000), (16, 4096), (5, 14336), (64, 14336), (300, 4104)])
def test_it_gives_the_triton_kernels_bits(name, m, k):
    """Every kernel recipe, self-amax (one cluster) and amax-pass launches, K not a multiple of 32, specials."""
    recipe = sharq.get_recipe(name)
    for specials in (False, True):
        _check(_x(m, k, m * k + specials, specials=specials), recipe)


@on_hopper
@pytest.mark.parametrize("run,cluster", [(8, 1), (8, 2), (8, 8), (16, 4), (32, 1), (32, 8)])
def test_every_run_and_cluster_gives_the_same_bits(run, cluster):
    recipe = sharq.get_recipe("sharq")
    for m, k in ((1, 4096), (8, 4096), (16, 1000)):
        _check(_x(m, k, run + cluster + m, specials=True), recipe, run=run, cluster=cluster)
    _check(_x(200, 4096, run), recipe, run=run)  # an amax-pass launch


@on_hopper
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float16, torch.bfloat16), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float16)])
def test_other_dtypes(x_dtype, out_dtype):
    for name in ("sharq", "mxfp4"):
        _check(_x(7, 4096, 5, x_dtype, specials=True), sharq.get_recipe(name), out_dtype)


@on_hopper
def test_a_scale_per_token_and_a_given_amax():
    recipe = sharq.get_recipe("sharq", scale_granularity="token")
    for m, k in ((1, 4096), (16, 4096), (70, 4096), (300, 2048)):
        _check(_x(m, k, m, specials=True), recipe)
    x = _x(9, 4096, 1)
    _check(x, sharq.get_recipe("sharq"), amax=torch.tensor([[1234.5]]))
    _check(x, recipe, amax=x.float().abs().amax(dim=1, keepdim=True) * 3)


@on_hopper
@pytest.mark.parametrize("placed", [False, True])
def test_the_tiled_layout(placed):
    recipe = sharq.get_recipe("sharq")
    for m, tile in ((5, 64), (130, 128)):
        x = _x(m, 4096, m)
        got = prepare.cuda_dequantized(x, recipe, tiled=(tile, placed))
        want = prepare.prepare_dequantized(x, recipe, torch.bfloat16, tiled=(tile, placed))
        valid = _tiled_valid(m, 4096, tile)
        _same_bits(got[0].view(-1)[valid], want[0].view(-1)[valid])
        _same_bits(got[1], want[1])


def _tiled_valid(m: int, k: int, tile: int) -> torch.Tensor:
    """The flat positions of a tiled activation that hold rows below m."""
    rows = -(-m // tile) * tile
    pos = torch.arange(rows * k, device="cuda")
    chunk, within = pos // (tile * 128), pos % (tile * 128)
    t = (within % (8 * tile)) // 8  # a chunk image is 16 runs of 8 * tile elements, token t's 8 at 8 t of each
    row = (chunk // (k // 128)) * tile + t
    return row < m


_DIVIDE = r"""
extern "C" __global__ void divide(const float* x, float* q, float sx, int n) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * RUN;
  if (i >= n) return;
  float v[RUN];
  for (int j = 0; j < RUN; ++j) v[j] = x[i + j];
  divide_run(v, sx);
  for (int j = 0; j < RUN; ++j) q[i + j] = v[j];
}
"""


@on_hopper
def test_the_division_by_the_tensor_scale_for_every_bf16_value():
    """X / s_x is a product and one correction (Markstein) where the quotient is normal: every bf16 bit pattern
    (each run of 8 of them, in order and shuffled, so that runs also mix magnitudes) against scales from the
    floor to 2^126, every one div.rn's quotient (torch's CUDA division) bit for bit."""
    kernel = torch.cuda._compile_kernel("#define RUN 8\n" + cuda_prepare._HELPERS + _DIVIDE, "divide")
    everything = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    g = torch.Generator().manual_seed(7)
    x = torch.cat([everything, everything[torch.randperm(everything.numel(), generator=g)]]).cuda()
    scales = torch.cat([torch.tensor([1e-9, 2.0**-29, 1.0, 1.5, 2.0**100, 2.0**126]),
                        torch.exp(torch.empty(60).uniform_(-20.7, 87.0, generator=g))])
    q = torch.empty_like(x)
    for sx in scales.tolist():
        kernel(grid=(x.numel() // 8 // 128, 1, 1), block=(128, 1, 1), args=[x, q, sx, x.numel()])
        _same_bits(q, x / torch.tensor(sx, device="cuda"))


@on_hopper
def test_calls_it_does_not_take():
    recipe = sharq.get_recipe("sharq")
    x = _x(4, 4096, 0)
    assert prepare.cuda_dequantized(x[:, 1:], recipe) is None  # rows not 16-byte aligned
    assert prepare.cuda_dequantized(x, sharq.get_recipe("hif4")) is None
    assert prepare.cuda_dequantized(_x(4, 100, 0), recipe, tiled=(64, False)) is None  # K not a multiple of 128


@pytest.mark.skipif(not nvrtc.available(), reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("name", KERNEL_RECIPES)
def test_the_sources_compile_without_spills(name):
    recipe = sharq.get_recipe(name)
    shapes = [(1, 4096, None, None), (16, 4096, 16, None), (64, 14336, None, (64, True)), (2048, 4096, None, None),
              (8, 4096, 8, (128, False))]
    for (m, k, run, tiled), dt in itertools.product(shapes, (torch.bfloat16, torch.float32)):
        v = cuda_prepare.variant(recipe, m, k, dt, torch.bfloat16, False, tiled, True, run)
        built = nvrtc.compile_cubin(cuda_prepare.kernel_source(v), "sm_90")
        assert built.spilled == 0, (v, built.log[-500:])
