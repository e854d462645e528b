"""The layer epilogue y ← y·α + bias (one Triton pass) against the same arithmetic in torch, and a launch plan's
split-K epilogue (a group launch's layers in one launch) against one launch per layer. Runs under the Triton
interpreter without CUDA."""

import pytest
import torch

pytest.importorskip("triton")

from sharq.kernels.epilogue import (  # noqa: E402
    reduce_scale_and_bias,
    reduce_scale_and_bias_launcher,
    scale_and_bias_,
)

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


@pytest.mark.parametrize("ns", [(300, 64, 64), (256, 512), (100,), (512, 0, 256)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_a_plans_epilogue_gives_each_layer_its_own_epilogues_bits(ns, splits, per_row, bias_dtype, out_dtype, rng):
    """One launch for a plan's layers (q/k/v: up to three, widths not multiples of the 256-column block, an empty
    one; or a single layer) sums, scales and biases each layer's split-K partials as a launch of its own would, bit
    for bit, call after call of the one bound launch (fresh partials and s_x each call, as a plan passes them)."""
    lead = (3, 11)
    m = 33
    sws = [(torch.rand((), generator=rng) + 0.01).to(DEVICE) for _ in ns]
    biases = [None if bias_dtype is None else torch.randn(n, generator=rng).to(bias_dtype).to(DEVICE) for n in ns]
    run = reduce_scale_and_bias_launcher(splits, [(*lead, n) for n in ns], sws, biases, per_row, out_dtype,
                                         torch.device(DEVICE))
    for _ in range(2):
        partials = [(torch.randn(splits, m, n, generator=rng) * 30).to(DEVICE) for n in ns]
        sx = (torch.rand(m if per_row else 1, 1, generator=rng) + 0.01).to(DEVICE)
        got = run(partials, sx)
        for y, p, sw, b in zip(got, partials, sws, biases, strict=True):
            assert y.dtype == out_dtype and y.shape == (*lead, p.shape[2])
            assert torch.equal(y.view(m, -1), reduce_scale_and_bias(p, sx, sw, b, out_dtype))
            summed = p[0].cpu()
            for s in range(1, splits):  # in split order, in fp32
                summed = summed + p[s].cpu()
            alpha = (sx.cpu() * sw.cpu()).double()  # the fp32 product, as the kernel forms it
            expected = summed.double() * alpha + (0 if b is None else b.cpu().double())  # one rounding: the FMA
            assert torch.equal(y.view(m, -1).cpu(), expected.float().to(out_dtype))


def test_a_plans_epilogue_refuses_what_one_launch_cannot_take():
    one, dev = torch.ones((), device=DEVICE), torch.device(DEVICE)
    with pytest.raises(ValueError, match="1-3 layers"):
        reduce_scale_and_bias_launcher(2, [(4, 64)] * 4, [one] * 4, [None] * 4, False, torch.float32, dev)
    with pytest.raises(ValueError, match="1-3 layers"):  # another [*lead]
        reduce_scale_and_bias_launcher(2, [(4, 64), (5, 64)], [one] * 2, [None] * 2, False, torch.float32, dev)
    with pytest.raises(ValueError, match="1-3 layers"):  # an s_w short
        reduce_scale_and_bias_launcher(2, [(4, 64)] * 2, [one], [None] * 2, False, torch.float32, dev)
    with pytest.raises(ValueError, match="every layer or none"):
        reduce_scale_and_bias_launcher(2, [(4, 64)] * 2, [one] * 2, [None, torch.zeros(64, device=DEVICE)], False,
                                       torch.float32, dev)
