"""The CUDA weight decode (kernels/cuda_dequantize.py) against the Triton decode and quant.py, bit for bit. GPU
only (NVRTC compiles it there; its source compiles on the CPU in test_cuda_gemm_source.py)."""

from __future__ import annotations

import pytest
import torch

from sharq.kernels import cuda_dequantize, cuda_gemm, gemm
from sharq.kernels.placed import place_codes
from sharq.quant import QTensor, dequantize_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_gemm.available(),
                                reason="needs a CUDA GPU and torch.cuda._compile_kernel")


def _triton(codes: torch.Tensor, scales: torch.Tensor, block: int, k: int) -> torch.Tensor:
    w = torch.empty(codes.shape[0], k, dtype=torch.bfloat16, device=codes.device)
    gemm._dequantizer(codes, scales, "nvfp4", block, k, bound=False, cuda=False)(w)
    return w


@pytest.mark.parametrize("block", [32, 16])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 96), (256, 4096), (4099, 4096)])
def test_it_gives_the_triton_decode_bit_for_bit(block, n, k):
    """Random codes and every scale code (NaN and sign bits included), at group counts that leave the grid's
    last pass ragged; the plan's launch and the one-off call alike, and the placed codes' kernel."""
    g = torch.Generator().manual_seed(n * k + block)
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
    scales = torch.randint(0, 256, (n, k // block), generator=g, dtype=torch.uint8).cuda()
    run = cuda_dequantize.launcher(codes, scales, "nvfp4", block, k)
    assert run is not None
    w = torch.full((n, k), 7.0, dtype=torch.bfloat16, device="cuda")
    run(w)
    want = _triton(codes, scales, block, k)
    _assert_same_bits(w, want)
    _assert_same_bits(gemm.dequantize_packed(codes, scales, "nvfp4", block, k), want)
    ref = dequantize_blocks(QTensor(codes.cpu(), scales.cpu(), "nvfp4", block, (n, k))).to(torch.bfloat16)
    assert torch.equal(w.cpu().isnan(), ref.isnan()) and torch.equal(w.cpu().nan_to_num(), ref.nan_to_num())
    # the same payload in the placed layout (kernels/placed.py), read by the placed kernel: the same bits
    placed = cuda_dequantize.launcher(place_codes(codes), scales, "nvfp4", block, k, placed=True)
    w.fill_(7.0)
    placed(w)
    _assert_same_bits(w, want)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every value's bits, NaN where the other has NaN (a NaN's payload bits are the arithmetic's: the CUDA
    multiply gives the canonical NaN)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_payloads_it_does_not_take_go_to_the_triton_decode():
    """MXFP4, a K short of the payload's, misaligned codes or output: no CUDA launch, and dequantize_packed still
    exact."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (64, 64), generator=g, dtype=torch.uint8).cuda()
    scales = torch.randint(0, 0x7F, (64, 4), generator=g, dtype=torch.uint8).cuda()
    assert cuda_dequantize.launcher(codes, scales, "mxfp4", 32, 128) is None
    assert cuda_dequantize.launcher(codes, scales, "nvfp4", 32, 96) is None
    assert cuda_dequantize.launcher(codes[:, 1:33], scales[:, :2], "nvfp4", 32, 64) is None
    w = gemm.dequantize_packed(codes, scales, "nvfp4", 32, 96)
    ref = dequantize_blocks(QTensor(codes.cpu(), scales.cpu(), "nvfp4", 32, (64, 128))).to(torch.bfloat16)[:, :96]
    assert torch.equal(w.cpu(), ref)
    out = torch.empty(64 * 128 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(64, 128)  # 2 bytes off
    gemm.dequantize_packed(codes, scales, "nvfp4", 32, 128, out=out)
    full = dequantize_blocks(QTensor(codes.cpu(), scales.cpu(), "nvfp4", 32, (64, 128))).to(torch.bfloat16)
    assert torch.equal(out.cpu(), full)
