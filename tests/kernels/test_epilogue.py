"""The layer epilogue y ← y·α + bias (one Triton pass) against the same arithmetic in torch. Runs under the Triton
interpreter without CUDA."""

import pytest
import torch

pytest.importorskip("triton")

from sharq.kernels.epilogue import scale_and_bias_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("per_col", [False, True])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
def test_epilogue_matches_torch(dtype, per_row, per_col, bias_dtype, rng):
    m, n = 5, 300
    y = (torch.randn(m, n, generator=rng) * 50).to(dtype)
    sx = torch.rand(m if per_row else 1, 1, generator=rng) + 0.01
    sw = torch.rand(n, generator=rng) + 0.01 if per_col else torch.rand((), generator=rng) + 0.01
    bias = None if bias_dtype is None else torch.randn(n, generator=rng).to(bias_dtype)
    alpha = (sx * sw).double()  # fp32 product, as the kernel forms it
    expected = y.double() * alpha + (0 if bias is None else bias.double())  # one rounding: the kernel's FMA
    got = scale_and_bias_(y.to(DEVICE), sx.to(DEVICE), sw.to(DEVICE), None if bias is None else bias.to(DEVICE))
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), expected.float().to(dtype))


def test_epilogue_is_in_place_and_checks_layout(rng):
    y = torch.randn(4, 64, generator=rng).to(DEVICE)
    out = scale_and_bias_(y, torch.full((1, 1), 2.0, device=DEVICE), torch.ones((), device=DEVICE))
    assert out.data_ptr() == y.data_ptr()
    with pytest.raises(ValueError, match="unit stride"):
        scale_and_bias_(torch.randn(64, 4, device=DEVICE).T, torch.ones(1, 1, device=DEVICE),
                        torch.ones((), device=DEVICE))
