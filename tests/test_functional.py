"""simulate_linear under every input class of SPEC §8 and docs/RELIABILITY.md: non-finite values, extreme
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


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_sharq_decompose_keeps_the_leading_shape(granularity, rng):
    """Both payloads dequantize to x's shape [..., K] and s_x broadcasts against them: the activation of x, the
    2-D input's row for row."""
    recipe = sharq.get_recipe("sharq", scale_granularity=granularity)
    x = outlier_activations(rng, 6, 80).reshape(2, 3, 80)
    sparse, residual, s_x = sharq.sharq_decompose(x, recipe)
    assert sparse.shape == residual.shape == (2, 3, 80)
    assert s_x.shape == ((2, 3, 1) if granularity == "token" else (1, 1, 1))
    act = (sharq.dequantize(sparse) + sharq.dequantize(residual)) * s_x
    want = recipe.prepare_activation(x.reshape(6, 80))
    assert torch.equal(act.reshape(6, 80), want.values * want.scale)


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
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # the output follows x: it saturated at 448, silently
        with pytest.raises(TypeError, match="16 bits or more"):
            sharq.simulate_linear(torch.ones(2, 32).to(dtype), w, recipe="mxfp4")


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


# Recipes whose first step rounds X itself to bf16 (no tensor scale in front): a finite value beyond bf16's range
# becomes ±Inf there, so it behaves as a non-finite input (SPEC §8).
ROUNDS_X_ITSELF = {"bf16", "fp8", "mxfp4", "hif4", "sharq-mxfp4", "sharq-hif4"}


@pytest.mark.parametrize("name", sharq.list_recipes())
def test_finite_inputs_beyond_bf16_follow_the_overflow_rule(name, rng):
    k, n = 64, 8
    w = torch.randn(n, k, generator=rng) * 1e-3
    x = torch.randn(4, k, generator=rng)
    x[1, 9] = 3.4e38  # finite in fp32, above bf16's largest value (3.3895e38)
    y = _run(x, w, name)
    if name in ROUNDS_X_ITSELF:
        clean = x.clone()
        clean[1, 9] = 0.0
        assert (torch.isnan(y[1]) if name != "bf16" else ~torch.isfinite(y[1])).all()
        rest = [0, 2, 3]
        assert torch.equal(y[rest], _run(clean, w, name)[rest])
        with pytest.raises(ValueError, match="output has 8 non-finite value.*overflows"):
            _run(x, w, name, strict=True)
    else:  # the tensor scale brings X/s_x into range: the result is finite, the huge value times its column
        assert torch.isfinite(y).all()
        stats = torch.arange(k, dtype=torch.float32) if name == "outlier-channels" else None
        recipe = sharq.get_recipe(name)
        channels = recipe.select_channels(stats) if stats is not None else None
        w_eff = recipe.prepare_weight(w, channels).effective()
        torch.testing.assert_close(y[1], 3.4e38 * w_eff[:, 9], rtol=1e-3, atol=0.1)  # atol: a bf16 channel's share
        _run(x, w, name, strict=True)


@pytest.mark.parametrize("name", sharq.list_recipes())
def test_a_float64_value_beyond_fp32_is_an_inf_in_its_row_alone(name, rng):
    """sharq computes in fp32, where a float64 value beyond its range (1e39) is Inf: its row comes out non-finite
    and every other row is what it is with that value at 0 (recipes with a tensor scale took the amax over float64
    values, an fp32 scale of Inf, and made every row NaN)."""
    w = (torch.randn(8, 64, generator=rng) * 1e-3).double()
    x = torch.randn(4, 64, generator=rng, dtype=torch.float64)
    x[1, 9] = 0.0
    clean = _run(x, w, name)
    x[1, 9] = 1e39
    y = _run(x, w, name)
    assert not torch.isfinite(y[1]).any()
    assert torch.equal(y[[0, 2, 3]], clean[[0, 2, 3]])


def test_strict_catches_a_result_that_overflows(rng):
    w = torch.full((4, 32), 1e3)
    x = torch.full((2, 32), 1e37)
    assert torch.isinf(sharq.simulate_linear(x, w, recipe="nvfp4")).all()  # IEEE: beyond fp32 is ±Inf
    with pytest.raises(ValueError, match="output has 8 non-finite"):
        sharq.simulate_linear(x, w, recipe="nvfp4", strict=True)


def test_fp8_keeps_large_finite_results_finite(rng):
    """fp8's per-row scale multiplies the output, not the GEMM operands, so |x| up to 1e37 (a finite result)
    stays finite, and within what E4M3 rounding explains: each operand element rounds within 2⁻⁴ of itself, or
    2⁻¹⁰ of its row's scale amax/448 where it is subnormal, so a product errs by at most
    e_x·(|w| + e_w) + |x|·e_w; the fp32 scales and GEMM add at most K·2⁻²³ of Σ|x̂||ŵ|. (A 5 % bound on the
    relative norm error, in its place before, was inside fp8's own noise: about 1 seed in 75 exceeded it.)"""
    x = (torch.randn(5, 64, generator=rng) * 1e37).double()
    w = (torch.randn(8, 64, generator=rng) / 8).double()
    y = sharq.simulate_linear(x.float(), w.float(), recipe="fp8")
    assert torch.isfinite(y).all()
    e_x, e_w = (2.0**-4 * t.abs() + 2.0**-10 * t.abs().amax(1, keepdim=True) / 448 for t in (x, w))
    bound = e_x @ (w.abs() + e_w).T + x.abs() @ e_w.T + 64 * 2.0**-23 * (x.abs() + e_x) @ (w.abs() + e_w).T
    assert ((y.double() - x @ w.T).abs() <= bound).all()


def test_non_finite_outlier_channel_makes_its_row_nan(rng):
    x = outlier_activations(rng, 4, 96)
    w = torch.randn(6, 96, generator=rng)
    for bad in (float("inf"), float("-inf"), float("nan")):
        xb = x.clone()
        xb[2, 95] = bad  # channel 95 has the largest statistic: kept in bf16
        y = _run(xb, w, "outlier-channels")
        assert torch.isnan(y[2]).all() and torch.equal(y[[0, 1, 3]], _run(x, w, "outlier-channels")[[0, 1, 3]])


@pytest.mark.parametrize("name", ["sharq", "fp8", "outlier-channels"])
def test_gradients_are_those_of_the_unquantized_linear(name, rng):
    """simulate_linear's backward is the straight-through estimator: exactly the gradients of x·Wᵀ + b."""
    x = outlier_activations(rng, 6, 48).requires_grad_()
    w = torch.randn(10, 48, generator=rng).requires_grad_()
    b = torch.randn(10, generator=rng).requires_grad_()
    dy = torch.randn(6, 10, generator=rng)
    _run(x, w, name, bias=b).backward(dy)
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.nn.functional.linear(x, w, b).backward(dy)
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", "packed", "packed-placed"])
def test_the_custom_ops_fakes_give_what_the_ops_return(backend, rng):
    """What torch.compile sees of a layer (functional's custom ops) must describe what they return, dtype, shape
    and strides alike (torch.library.opcheck): the prepare's fake once gave the packed backend's bf16 values as
    fp32, and inductor put a buffer of twice their size on their storage (a heap overflow, on the GPU a write
    past the allocation). On the GPU where there is one, else in Triton's interpreter for the kernels' backends."""
    from sharq import functional
    from sharq.nn import SharQLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels' backends take CUDA tensors on a GPU machine
    layers = [SharQLinear.from_linear(torch.nn.Linear(64, n), "sharq", backend=backend).to(device)
              for n in (64, 32, 32)]
    x = outlier_activations(rng, 5, 64).to(device)
    r = layers[0].recipe
    with torch.no_grad():
        torch.library.opcheck(torch.ops.sharq.prepare_activation, (x, r.key, backend, None, None))
        values, scale, dense = torch.ops.sharq.prepare_activation(x, r.key, backend, None, None)
        ws, layouts = [m.forward_weight() for m in layers], [m._layout for m in layers]
        for w, layout, m in zip(ws, layouts, layers):
            p = w.packed
            torch.library.opcheck(torch.ops.sharq.matmul, (
                values, scale, dense, w.values, None if p is None else p.codes, None if p is None else p.scales,
                w.scale, None, m.bias, [] if layout is None else list(layout.tensors),
                "" if layout is None else layout.meta, r.key, backend, m.out_features, torch.float32))
        if backend.startswith("packed"):
            codes = [(w.packed.codes, w.packed.scales) if lo is None else lo.tensors for w, lo in zip(ws, layouts)]
            torch.library.opcheck(torch.ops.sharq.matmul_group, (
                values, scale, [c for c, _ in codes], [s for _, s in codes], [w.scale for w in ws],
                [m.bias for m in layers], r.key, backend, torch.float32, "" if layouts[0] is None else "placed"))
    assert functional.prepare(x, r, backend).values.dtype == values.dtype
