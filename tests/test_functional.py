"""simulate_linear under every input class of SPEC §8 and the reliability issue: non-finite values, extreme
magnitudes, shapes, dtypes, layouts, devices, determinism."""

import pytest
import torch

import sharq

from .conftest import outlier_activations

RECIPES = [r for r in sharq.list_recipes() if r != "outlier-channels"]


def _run(x, w, name, **kw):
    if name == "outlier-channels":
        kw["channel_stats"] = torch.arange(x.shape[-1], dtype=torch.float32)  # keeps the last channels in bf16
    return sharq.simulate_linear(x, w, recipe=name, **kw)


@pytest.mark.parametrize("name", sharq.list_recipes())
def test_non_finite_values_poison_only_their_rows_and_columns(name, rng):
    m, k, n = 12, 96, 20
    x = outlier_activations(rng, m, k)
    w = torch.randn(n, k, generator=rng)
    bad_x = {(1, 5): float("nan"), (4, 60): float("inf"), (7, 0): float("-inf"), (10, 95): float("nan")}
    bad_w = {(3, 17): float("nan"), (11, 80): float("inf")}
    xb, wb, x0, w0 = x.clone(), w.clone(), x.clone(), w.clone()
    for (i, j), v in bad_x.items():
        xb[i, j], x0[i, j] = v, 0.0
    for (i, j), v in bad_w.items():
        wb[i, j], w0[i, j] = v, 0.0
    y, clean = _run(xb, wb, name), _run(x0, w0, name)
    rows, cols = sorted({i for i, _ in bad_x}), sorted({i for i, _ in bad_w})
    # quantized recipes turn a non-finite block into NaN (its scale's NaN code); bf16 keeps IEEE arithmetic
    poisoned = torch.isnan if name != "bf16" else (lambda t: ~torch.isfinite(t))
    assert poisoned(y[rows]).all() and poisoned(y[:, cols]).all()
    keep_r = [i for i in range(m) if i not in rows]
    keep_c = [j for j in range(n) if j not in cols]
    assert torch.equal(y[keep_r][:, keep_c], clean[keep_r][:, keep_c])  # the rest is bit-identical
    with pytest.raises(ValueError, match=r"input has 4 non-finite"):
        _run(xb, w, name, strict=True)
    with pytest.raises(ValueError, match=r"weight has 2 non-finite"):
        _run(x, wb, name, strict=True)


@pytest.mark.parametrize("name", sharq.list_recipes())
def test_extreme_magnitudes_stay_finite_and_defined(name, rng):
    k, n = 64, 8
    w = torch.randn(n, k, generator=rng)
    zeros = torch.zeros(3, k)
    b = torch.randn(n, generator=rng)
    assert torch.equal(_run(zeros, w, name, bias=b), b.expand(3, n))  # all-zero input: exactly the bias
    cases = {
        "subnormal-tiny": torch.randn(3, k, generator=rng) * 1e-40,
        "scale below 2^-9": torch.randn(3, k, generator=rng) * 1e-6,  # amax/2688 far under the UE4M3 minimum
        "scale above 448": torch.randn(3, k, generator=rng) * 1e7,  # amax/2688 over the UE4M3 maximum
        "one huge outlier": torch.randn(3, k, generator=rng).index_put_((torch.tensor([1]), torch.tensor([7])),
                                                                        torch.tensor(1e30)),
    }
    for label, x in cases.items():
        y = _run(x, w, name)
        assert torch.isfinite(y).all(), label
    # Power-of-two rescaling is absorbed exactly by the scales (tensor, block or row) — except HiF4's E6M2 unit
    # scale, which has no tensor scale above it and saturates at 1.5 * 2^15 (documented in docs/RELIABILITY.md).
    x = torch.randn(5, k, generator=rng)
    y = _run(x, w, name)
    for c in (2.0**-12, 2.0**20):  # (2^-20 would hit the 1e-9 floor of the NVFP4 tensor scale)
        if "hif4" in name and c > 1:
            assert not torch.equal(_run(x * c, w, name), y * c)
            continue
        assert torch.equal(_run(x * c, w, name), y * c), c


@pytest.mark.parametrize("name", sharq.list_recipes())
def test_shapes_dtypes_and_layouts(name, rng):
    w = torch.randn(6, 37, generator=rng)  # K neither a multiple of the block nor of 8
    x = torch.randn(2, 3, 4, 37, generator=rng)
    y = _run(x, w, name)
    assert y.shape == (2, 3, 4, 6) and y.dtype == torch.float32
    assert torch.equal(_run(x.reshape(-1, 37), w, name).reshape(2, 3, 4, 6), y)
    assert _run(x[0, 0, 0], w, name).shape == (6,)  # 1-D input
    assert _run(torch.empty(0, 37), w, name).shape == (0, 6)  # M = 0
    assert torch.equal(_run(torch.empty(3, 0), torch.empty(6, 0), name), torch.zeros(3, 6))  # K = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _run(x.to(dtype), w, name).dtype == dtype
    xt = torch.randn(37, 10, generator=rng).T  # non-contiguous
    assert not xt.is_contiguous()
    assert torch.equal(_run(xt, w, name), _run(xt.contiguous(), w, name))
    assert torch.equal(_run(x, w, name), y)  # deterministic run to run


def test_mismatched_inputs_are_clear_errors(rng):
    w = torch.randn(6, 32, generator=rng)
    with pytest.raises(ValueError, match="disagree"):
        sharq.simulate_linear(torch.randn(2, 31), w)
    with pytest.raises(ValueError, match="one device"):
        sharq.simulate_linear(torch.randn(2, 32, device="meta"), w)
    with pytest.raises(ValueError, match="bias"):
        sharq.simulate_linear(torch.randn(2, 32), w, torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point"):
        sharq.simulate_linear(torch.ones(2, 32, dtype=torch.int64), w)


def test_token_scale_is_batch_invariant_and_tensor_scale_is_not(rng):
    w = torch.randn(32, 128, generator=rng)
    row = outlier_activations(rng, 1, 128)
    batch = torch.cat([outlier_activations(rng, 5, 128) * 100, row, torch.randn(3, 128, generator=rng)])
    token = sharq.get_recipe("sharq", scale_granularity="token")
    a1, a9 = token.prepare_activation(row), token.prepare_activation(batch)
    assert torch.equal(a1.values[0], a9.values[5]) and torch.equal(a1.scale[0], a9.scale[5])  # operands exact
    alone, inside = sharq.simulate_linear(row, w, recipe=token), sharq.simulate_linear(batch, w, recipe=token)[5:6]
    torch.testing.assert_close(alone, inside, rtol=1e-6, atol=1e-6)  # up to the GEMM's accumulation order
    # the paper's per-tensor scale is batch-dependent: loud neighbours change this row's result
    assert (sharq.simulate_linear(row, w) - sharq.simulate_linear(batch, w)[5:6]).abs().max() > 1e-3
