"""The packed 4-bit weight GEMM against the reference product on the exact dequantized weight (quant.py), within
what fp32 accumulation and the output's rounding can err by (`_check` derives the bound). Runs under the Triton
interpreter without CUDA (small shapes)."""

import itertools

import pytest
import torch

pytest.importorskip("triton")

import sharq  # noqa: E402
from sharq.kernels import cuda_gemm, gemm  # noqa: E402
from sharq.quant import QTensor, dequantize_blocks  # noqa: E402

from ..conftest import outlier_activations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _payload(rng, n, k, recipe):
    r = sharq.get_recipe(recipe)
    w = torch.randn(n, k, generator=rng) * torch.rand(n, 1, generator=rng) * 3
    qw = r.prepare_weight(w)
    return qw.packed, qw.scale, r


def _check(y, a, packed, sx, sw, bias, out_dtype):
    """y = α·(a·Ŵᵀ) + bias as packed_matmul computes it (a bf16, Ŵ the exact dequantized payload, α = s_x·s_w,
    bias as the kernel reads it) against the exact value in float64, within a bound that holds for every input
    whose sums stay in the normal range (below it, roundings err by absolute amounts left out here). With
    S = Σₖ aₖŵₖ and A = Σₖ |aₖŵₖ| (each product is exact in fp32), it adds up the roundings on the way:
    - the fp32 sum acc: each product passes through at most K rounded operations (additions, split-K's sum of
      partials, a block scale's multiplication), each off by at most 2⁻²³ relative (a whole unit in the last
      place: tensor cores truncate), so |acc − S| ≤ γ·A, γ = K·2⁻²³ / (1 − K·2⁻²³) (Higham, Accuracy and
      Stability of Numerical Algorithms, Lemma 3.1);
    - above SMALL_M with a bf16 output (these tests' shapes there are not the CUDA kernel's: decode + cuBLAS),
      cuBLAS rounds acc to bf16 before α: a further 2⁻⁸·(|S| + γ·A);
    - α rounded to fp32, α̂ = α·(1 + δ), |δ| ≤ 2⁻²⁴: E = |α̂·acc − α·S| ≤ |α|·((1 + 2⁻²⁴)·(those) + 2⁻²⁴·|S|);
    - v = α̂·acc + bias, one fp32 FMA, rounded to the output dtype: |y − v| ≤ u·|v| ≤ u·(|exact| + E), u = 2⁻²⁴
      (fp32), 2⁻¹¹ (fp16) or 2⁻⁸ (bf16: rounding to nearest errs by at most u/(1 + u)·|v|, whose slack holds the FMA's own
      fp32 rounding).
    So |y − exact| ≤ E + u·(|exact| + E). An output halfway between the two bf16 values just above a power of two
    attains the rounding term up to a factor 1/(1 + u): random inputs reach 0.98 of this bound."""
    w = dequantize_blocks(packed).double().cpu()  # the exact Ŵ [N, K]
    a = a.double().cpu()
    sx, sw = sx.double().cpu(), sw.double().cpu()
    alpha = (sx * sw).reshape(-1, 1) if sx.numel() > 1 else sx * sw
    k = a.shape[1]
    gamma = k * 2.0**-23 / (1 - k * 2.0**-23)
    s, total = a @ w.T, a.abs() @ w.abs().T
    exact = alpha * s + (0 if bias is None else bias.double().cpu())
    sum_error = gamma * total
    if out_dtype == torch.bfloat16 and a.shape[0] > gemm.SMALL_M:  # decoded_matmul: cuBLAS's bf16 output
        sum_error = sum_error + 2.0**-8 * (s.abs() + gamma * total)
    e = alpha.abs() * ((1 + 2.0**-24) * sum_error + 2.0**-24 * s.abs())
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[out_dtype]
    bound = e + u * (exact.abs() + e)
    assert y.dtype == out_dtype and y.shape == exact.shape
    err = (y.double().cpu() - exact).abs()
    worst = int((err / bound).nan_to_num(nan=0.0).argmax())
    at = divmod(worst, y.shape[1])
    assert bool((err <= bound).all()), (f"max excess {(err / bound)[at].item():.3g} at {at}: y {y[at].item()!r}, "
                                        f"exact {exact[at].item()!r}, bound {bound[at].item():.3g}")


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,k,n", [(1, 224, 70), (3, 100, 33), (16, 96, 64), (17, 96, 64), (70, 160, 40),
                                   (70, 100, 33)])  # the last: decode + cuBLAS with K short of the payload's
def test_packed_matmul_is_the_exact_product_up_to_accumulation(recipe, m, k, n, rng):
    packed, sw, r = _payload(rng, n, k, recipe)
    a = outlier_activations(rng, m, k).to(torch.bfloat16)
    per_row = bool(torch.randint(0, 2, (), generator=rng))
    sx = torch.rand(m if per_row else 1, 1, generator=rng) + 0.01
    bias = torch.randn(n, generator=rng).to(torch.bfloat16) if m % 2 else None
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):  # fp16: its products before α overflowed
        y = gemm.packed_matmul(a.to(DEVICE), packed.codes.to(DEVICE), packed.scales.to(DEVICE), r.weight_fmt,
                               r.weight_block, sx.to(DEVICE), sw.to(DEVICE),
                               None if bias is None else bias.to(DEVICE), out_dtype)
        _check(y, a, packed, sx, sw, bias, out_dtype)


def _weight_options() -> list[tuple[str, str, int]]:
    """(recipe, weight format, weight block) for every built-in recipe and weight option the packed backend takes."""
    from sharq.backends import get_backend

    out = []
    for name, fmt, block in itertools.product(sharq.list_recipes(compat=True), ("nvfp4", "mxfp4"), (16, 32)):
        try:
            recipe = sharq.get_recipe(name, weight_fmt=fmt, weight_block=block)
        except ValueError:  # not a block this format has
            continue
        if get_backend("packed").supports(recipe):
            out.append((name, fmt, block))
    return out


@pytest.mark.parametrize("name,fmt,block", _weight_options())
def test_every_weight_option_the_packed_backend_takes_is_the_exact_product(name, fmt, block, rng):
    """Weight formats and blocks other than a recipe's own (a recipe option) through the packed backend's kernels,
    at a small-M kernel's size and above SMALL_M, on loud inputs: within the fp32-accumulation bound of the exact
    product (NVFP4 weights with MXFP4 activations gave NaN here; the backend now refuses that pairing)."""
    from sharq.kernels.prepare import prepare_dequantized

    r = sharq.get_recipe(name, weight_fmt=fmt, weight_block=block)
    qw = r.prepare_weight(torch.randn(48, 128, generator=rng))
    for m in (3, gemm.SMALL_M + 8):
        x = outlier_activations(rng, m, 128) * 1e4
        a, sx = prepare_dequantized(x.to(DEVICE), r, torch.bfloat16)
        y = gemm.packed_matmul(a, qw.packed.codes.to(DEVICE), qw.packed.scales.to(DEVICE), fmt, block, sx,
                               qw.scale.to(DEVICE), None, torch.float32)
        _check(y, a, qw.packed, sx, qw.scale, None, torch.float32)


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_decoded_launcher_gives_packed_matmuls_bits(recipe, out_dtype, rng):
    """Above SMALL_M an eager layer's plan (decoded_launcher: the checks done once) computes what packed_matmul
    computes on the same weight, bit for bit, for any activation it is given later, into the input's leading
    shape."""
    m, k, n = gemm.SMALL_M + 7, 160, 40
    packed, sw, r = _payload(rng, n, k, recipe)
    bias = torch.randn(n, generator=rng).to(torch.bfloat16) if out_dtype != torch.float16 else None
    codes, scales = packed.codes.to(DEVICE), packed.scales.to(DEVICE)
    b = None if bias is None else bias.to(DEVICE)
    for per_row in (False, True):
        run = gemm.decoded_launcher(codes, scales, r.weight_fmt, r.weight_block, sw.to(DEVICE), b, out_dtype,
                                    (1, m), per_row)
        for _ in range(2):
            a = outlier_activations(rng, m, k).to(torch.bfloat16).to(DEVICE)
            sx = (torch.rand(m if per_row else 1, 1, generator=rng) + 0.01).to(DEVICE)
            want = gemm.packed_matmul(a, codes, scales, r.weight_fmt, r.weight_block, sx, sw.to(DEVICE), b,
                                      out_dtype)
            assert torch.equal(run(a, sx), want[None])


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("tile", [gemm.Tile(64, 16, 128, 1), gemm.Tile(64, 16, 128, 3), gemm.Tile(32, 32, 128, 2),
                                  gemm.Tile(32, 1, 256, 1, kernel="gemv"), gemm.Tile(16, 1, 64, 3, kernel="gemv")])
def test_tiles_and_split_k_agree(recipe, tile, rng):
    m, k, n = 2, 32 * 13, 66
    packed, sw, r = _payload(rng, n, k, recipe)
    a = outlier_activations(rng, m, k).to(torch.bfloat16)
    sx = torch.rand(m, 1, generator=rng) + 0.5
    bias = torch.randn(n, generator=rng)
    y = gemm.packed_matmul(a.to(DEVICE), packed.codes.to(DEVICE), packed.scales.to(DEVICE), r.weight_fmt,
                           r.weight_block, sx.to(DEVICE), sw.to(DEVICE), bias.to(DEVICE), torch.float32, tile=tile)
    _check(y, a, packed, sx, sw, bias, torch.float32)


def test_dequantize_packed_is_exact(rng):
    for recipe in ("sharq", "nvfp4", "mxfp4"):
        packed, _, r = _payload(rng, 37, 200, recipe)
        w = gemm.dequantize_packed(packed.codes.to(DEVICE), packed.scales.to(DEVICE), r.weight_fmt, r.weight_block,
                                   200)
        assert torch.equal(w.cpu(), dequantize_blocks(packed).to(torch.bfloat16))


@pytest.mark.parametrize("fmt,block", [("nvfp4", 32), ("nvfp4", 16), ("mxfp4", 32)])
@pytest.mark.parametrize("tile", [None, gemm.Tile(64, 1, 32, 1, kernel="gemv")])
def test_every_scale_and_element_code_decodes_exactly(fmt, block, tile):
    """All 256 scale codes × all 16 element codes in both nibbles (NaN codes included), against quant.py: the
    dequantizing kernel, and the GEMM itself (times an identity, which returns Ŵᵀ exactly)."""
    codes = torch.arange(16, dtype=torch.uint8)
    byte = (codes.repeat_interleave(16) | (codes.repeat(16) << 4)).reshape(1, 256)  # every (low, high) pair
    packed_codes = byte[:, : 16].repeat(256, 1)  # 32 elements per row
    packed_codes[:, :16] = byte[0, torch.randperm(256)[:16]]
    scales = torch.arange(256, dtype=torch.uint8).reshape(256, 1).repeat(1, 32 // block)
    want = dequantize_blocks(QTensor(packed_codes, scales, fmt, block, (256, 32)))
    nan = want.isnan()
    triton_decode = torch.empty(256, 32, dtype=torch.bfloat16, device=DEVICE)
    gemm._dequantizer(packed_codes.to(DEVICE), scales.to(DEVICE), fmt, block, 32, bound=False,
                      cuda=False)(triton_decode)
    for got in (gemm.dequantize_packed(packed_codes.to(DEVICE), scales.to(DEVICE), fmt, block, 32), triton_decode):
        # bit for bit, the sign of zero included (scale code 0x80 is -0): NaN where the reference has NaN
        assert torch.equal(got.cpu().isnan(), nan)
        assert torch.equal(got.cpu().view(torch.int16)[~nan], want.to(torch.bfloat16).view(torch.int16)[~nan])
    eye = torch.eye(32, dtype=torch.bfloat16, device=DEVICE)
    one = torch.ones(1, 1, device=DEVICE)
    y = gemm.packed_matmul(eye, packed_codes.to(DEVICE), scales.to(DEVICE), fmt, block, one, one, None,
                           torch.float32, tile=tile).cpu().T
    # E8M0 rows whose values overflow (0·Inf is NaN in any product) or are fp32-subnormal (the MMA may flush
    # them: |ŵ| < 2^-126, MXFP4 only) are left out; NVFP4's values are all normal
    rows = slice(None) if fmt == "nvfp4" else slice(3, 250)
    assert torch.equal(y[rows].isnan(), want[rows].isnan())
    assert torch.equal(y[rows].nan_to_num(), want[rows].nan_to_num())


def test_a_nan_block_scale_poisons_its_output_channel_only(rng):
    m, k, n = 3, 64, 20
    packed, sw, r = _payload(rng, n, k, "sharq")
    scales = packed.scales.clone()
    scales[5, 1] = 0x7F  # UE4M3 NaN
    a = outlier_activations(rng, m, k).to(torch.bfloat16)
    y = gemm.packed_matmul(a.to(DEVICE), packed.codes.to(DEVICE), scales.to(DEVICE), "nvfp4", 32,
                           torch.ones(1, 1, device=DEVICE), sw.to(DEVICE), None, torch.float32).cpu()
    assert torch.isnan(y[:, 5]).all() and torch.isfinite(y[:, [i for i in range(n) if i != 5]]).all()


def test_bad_arguments_are_clear_errors(rng):
    packed, sw, _ = _payload(rng, 8, 64, "sharq")
    a = torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
    args = (packed.codes.to(DEVICE), packed.scales.to(DEVICE))
    one = torch.ones(1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="bf16"):
        gemm.packed_matmul(a.float(), *args, "nvfp4", 32, one, sw.to(DEVICE), None, torch.float32)
    with pytest.raises(ValueError, match="nvfp4/mxfp4"):
        gemm.packed_matmul(a, *args, "hif4", 64, one, sw.to(DEVICE), None, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        gemm.packed_matmul(torch.randn(2, 96).to(torch.bfloat16).to(DEVICE), *args, "nvfp4", 32, one,
                           sw.to(DEVICE), None, torch.float32)


# --- the packed backend -------------------------------------------------------------------------------------------
def test_auto_resolves_packed_then_triton_on_cuda_and_reference_elsewhere():
    """NVFP4 weights on the placed layout, MXFP4 on the canonical one; humming, installed or not, is never auto's
    choice (it is opt-in: its outputs vary from call to call)."""
    from sharq.backends import resolve_backend

    for name, want in [("sharq", "packed-placed"), ("nvfp4", "packed-placed"), ("sharq-plus", "packed-placed"),
                       ("dense-dense", "packed-placed"),
                       ("sharq-mxfp4", "packed"), ("hif4", "triton"), ("fp8", "triton"), ("bf16", "triton"),
                       ("outlier-channels", "triton")]:
        for dtype in (torch.bfloat16, torch.float32):
            assert resolve_backend("auto", sharq.get_recipe(name), "cuda", (128, 64), dtype) == want, (name, dtype)
        assert resolve_backend("auto", sharq.get_recipe(name), "cpu") == "reference"
    with pytest.raises(ValueError, match="backend 'packed' does not run recipe 'hif4'"):
        resolve_backend("packed", sharq.get_recipe("hif4"), "cuda")


def _check_layer(layer, x):
    """The packed layer's output on x against the exact product of its own state: the kernel's bf16 activation
    (the reference's fp32 sum rounded once to bf16, docs/PERF.md), its payload, s_w and bias (the model's dtype,
    fp32 here, which the kernel adds unrounded). Returns the output."""
    y = layer(x.to(DEVICE)).cpu()
    act = layer.recipe.prepare_activation(x.float())
    _check(y, act.values.to(torch.bfloat16), layer.packed, act.scale, layer.weight_scale.cpu(),
           None if layer.bias is None else layer.bias.cpu(), x.dtype)
    return y


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "sharq-mxfp4"])
def test_packed_layer_holds_only_the_payload_and_matches_the_simulator(recipe, rng):
    """A SharQLinear on the packed backend keeps no bf16 Ŵ (state: 4.25–4.5 bits per weight plus scales) and
    computes the product of the kernel's bf16 activation and the exact Ŵ within the accumulation bound, so the
    reference backend's output within the bf16 rounding of the activation."""
    linear = torch.nn.Linear(160, 48)  # its weight and bias from the global generator, which the test's seed seeds
    layer = sharq.SharQLinear.from_linear(linear, recipe, backend="packed").to(DEVICE)
    reference = sharq.SharQLinear.from_linear(linear, recipe, backend="reference")
    assert layer.weight_values is None and reference.weight_values is not None
    r = sharq.get_recipe(recipe)
    assert layer.weight_bytes == 48 * 160 * r.weight_bits / 8 + 4 + 48 * 4  # payload, fp32 s_w, fp32 bias
    x = outlier_activations(rng, 5, 160).to(torch.bfloat16)
    y = _check_layer(layer, x)
    torch.testing.assert_close(y.float(), reference(x).float(), rtol=0.02, atol=0.02)


def test_packed_layer_adds_its_fp32_bias_unrounded():
    """An fp32 bias just below a bf16 rounding midpoint (off its bf16 rounding by almost 2⁻⁹ relative) and a small
    product that lifts the sum past it: the bf16 output rounds up, away from the bf16-rounded bias. Checked against
    the bias the layer holds, the error is one output rounding; against the bias rounded to bf16 it would be nearly
    two, past any bound that counts one (the packed-layer test met this edge at 1 of 520 seeds, seed 140)."""
    bias = torch.tensor(0.0625 * (1 + 2.0**-8)).nextafter(torch.tensor(0.0)).reshape(1)  # fp32, just below
    linear = torch.nn.Linear(32, 1)
    with torch.no_grad():
        linear.weight.zero_()[0, 0] = 2.0**-13
        linear.bias.copy_(bias)
    layer = sharq.SharQLinear.from_linear(linear, "sharq", backend="packed").to(DEVICE)
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    y = _check_layer(layer, x)  # v ≈ 2⁻¹³ + bias, just above the midpoint 2⁻⁴·(1 + 2⁻⁸)
    assert y.item() == 0.0625 * (1 + 2.0**-7) and bias.to(torch.bfloat16).item() == 0.0625


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and threads on a GPU")
def test_concurrent_layers_on_the_decode_path_do_not_share_a_scratch_weight(rng):
    """Above the CUDA kernel's MAX_M the payload is decoded into a scratch bf16 weight: two threads, each on its
    own stream, running different layers at once get the results they get alone."""
    import threading

    m = cuda_gemm.MAX_M + 31
    jobs = []
    for _ in range(2):
        packed, sw, r = _payload(rng, 512, 1024, "sharq")
        a = outlier_activations(rng, m, 1024).to(torch.bfloat16).cuda()
        args = (a, packed.codes.cuda(), packed.scales.cuda(), "nvfp4", 32, torch.ones(1, 1, device="cuda"),
                sw.cuda(), None, torch.float32)
        jobs.append((args, gemm.packed_matmul(*args)))
    results: list[list[bool]] = [[], []]

    def run(i: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(50):
                y = gemm.packed_matmul(*jobs[i][0])
                results[i].append(torch.equal(y, jobs[i][1]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[0]) and all(results[1]) and len(results[0]) == len(results[1]) == 50
