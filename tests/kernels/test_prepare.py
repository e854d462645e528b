"""The fused Triton preparation kernel against the reference cascade, bit for bit. On a machine without CUDA it
runs under the Triton interpreter (TRITON_INTERPRET=1, small shapes)."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import sharq  # noqa: E402
from sharq.kernels.common import div_ieee  # noqa: E402
from sharq.kernels.prepare import _FMT, _block_scale, dequantized_launcher, prepare_dequantized, supports  # noqa: E402
from sharq.quant import quantize_blocks  # noqa: E402

from ..conftest import outlier_activations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_RECIPES = ["nvfp4", "mxfp4", "sharq", "sharq-mxfp4", "sparse-only", "dense-dense"]


def test_supported_recipes():
    assert all(supports(sharq.get_recipe(r)) for r in KERNEL_RECIPES)
    assert not any(supports(sharq.get_recipe(r)) for r in ("bf16", "fp8", "hif4", "sharq-hif4", "outlier-channels"))


@pytest.mark.parametrize("name", KERNEL_RECIPES)
@pytest.mark.parametrize("m,k", [(5, 96), (3, 32 * 7), (1, 8192), (4, 50)])
def test_kernel_matches_reference_bit_for_bit(name, m, k, rng):
    x = (outlier_activations(rng, m, k) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=rng))).to(DEVICE)
    recipe = sharq.get_recipe(name)
    values, scale = prepare_dequantized(x, recipe)
    ref = recipe.prepare_activation(x)
    assert torch.equal(scale, ref.scale)
    assert torch.equal(values, ref.values)


@pytest.mark.parametrize("name,granularity", [("sharq", "tensor"), ("sharq", "token"), ("nvfp4", "tensor")])
@pytest.mark.parametrize("m,k", [(5, 3400), (12, 1400)])
def test_the_8_warp_tiles_of_4_to_16_tokens_give_the_reference_bits(name, granularity, m, k, rng):
    """From 4 rows, where each program re-reads more than 16384 elements for the amax, the default tile has 8 warps
    and 256 columns up to 8 rows, 128 above (here with a partial last tile and rows past M): the reference's bits."""
    from sharq.kernels.prepare import _default_tile

    assert (_default_tile(m, k)["num_warps"], _default_tile(m, k)["H"]) == (8, 16 if m <= 8 else 8)
    x = (outlier_activations(rng, m, k) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=rng))).to(DEVICE)
    recipe = sharq.get_recipe(name, scale_granularity=granularity)
    values, scale = prepare_dequantized(x, recipe)
    ref = recipe.prepare_activation(x)
    assert torch.equal(scale, ref.scale) and torch.equal(values, ref.values)


@pytest.mark.parametrize("tokens,placed", [(64, False), (128, True)])
@pytest.mark.parametrize("m", [3, 70])
def test_the_tiled_values_are_the_plain_values_in_the_wgmma_kernels_layout(tokens, placed, m, rng):
    """With `tiled` the kernel writes the values where kernels/cuda_wgmma.py's tiled_activation puts them (each
    chunk of a token tile its B buffer's image), the scale unchanged; plain and tiled from the launch plan too."""
    from sharq.kernels.cuda_wgmma import chunk_order

    k = 256
    x = outlier_activations(rng, m, k).to(DEVICE)
    recipe = sharq.get_recipe("sharq")
    plain, scale = prepare_dequantized(x, recipe, torch.bfloat16)
    for tiled, tiled_scale in [prepare_dequantized(x, recipe, torch.bfloat16, tiled=(tokens, placed)),
                               dequantized_launcher(recipe, m, k, x.dtype, x.device, tiled=(tokens, placed))(x)[:2]]:
        tiles = -(-m // tokens)
        assert tiled.shape == (tiles * tokens, k) and torch.equal(tiled_scale, scale)
        images = tiled.reshape(tiles, k // 128, tokens * 128)[..., chunk_order(tokens, placed).to(DEVICE)]
        back = images.permute(0, 2, 1, 3).reshape(tiles * tokens, k)  # [tile, token, chunk, element]
        assert torch.equal(back[:m], plain)
    with pytest.raises(ValueError, match="multiple of 128"):
        prepare_dequantized(x[:, :96], recipe, torch.bfloat16, tiled=(tokens, placed))


@pytest.mark.parametrize("self_amax", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("m,k", [(1, 3000), (9, 200), (37, 96)])
def test_one_launch_amax_equals_the_amax_pass(self_amax, granularity, m, k, rng):
    """Small calls find the tensor scale's amax inside the main kernel (one launch); both ways give the
    reference's payloads, with non-finite values (which the amax skips) and rows past M in the last row tile."""
    x = (outlier_activations(rng, m, k) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=rng)))
    x[0, 7], x[-1, 1] = float("inf"), float("nan")
    assert_packed_launch_is_the_reference(x, sharq.get_recipe("sharq", scale_granularity=granularity), self_amax)


def assert_packed_launch_is_the_reference(x: torch.Tensor, recipe, self_amax: bool, same_codes=torch.equal) -> None:
    """One packed launch on x (the amax found by the program itself or by the amax pass) gives the reference's
    scale, values (NaN where it has NaN) and payloads; codes compared by `same_codes`."""
    from sharq.kernels.prepare import _launch

    values, scale, parts = _launch(x.to(DEVICE), recipe, torch.float32, packed=True, self_amax=self_amax)
    ref = recipe.prepare_activation(x)
    assert torch.equal(scale.cpu(), ref.scale)
    assert torch.equal(values.isnan().cpu(), ref.values.isnan())
    assert torch.equal(values.cpu().nan_to_num(), ref.values.nan_to_num())
    for g, r in zip(parts, ref.parts):
        assert same_codes(g.codes.cpu(), r.codes) and torch.equal(g.scales.cpu(), r.scales)


def zero_unsigned(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 code bytes with -0 (0b1000) written as 0: SPEC §1 lets a negative value that rounds to zero keep
    either (the kernel and the reference differ there on values like X's subnormals)."""
    low, high = codes & 0xF, codes >> 4
    return torch.where(low == 8, 0, low) | (torch.where(high == 8, 0, high) << 4)


def bf16_patterns(rng, m: int, k: int) -> torch.Tensor:
    """bf16 X [m, k] of random bit patterns, row r's magnitudes below a limit of its own (a subnormal, the smallest
    normal, 1, the largest finite value, or no limit: NaN and ±Inf among them), one row of ±Inf and NaN alone and
    one of -0.0: what the amax sees when it works on X's 16 bits."""
    limits = torch.tensor([0x0002, 0x0080, 0x0081, 0x3F81, 0x7F80, 0x8000])[torch.arange(m - 2) % 6]
    bits = torch.randint(0, 1 << 30, (m - 2, k), generator=rng) % limits[:, None]
    bits = bits | (torch.randint(0, 2, (m - 2, k), generator=rng) << 15)  # signs
    specials = torch.tensor([0x7F80, 0xFF80, 0x7FC1, 0xFFFF])[torch.randint(0, 4, (1, k), generator=rng)]
    bits = torch.cat([bits, specials, torch.full((1, k), 0x8000)])[torch.randperm(m, generator=rng)]
    return bits.to(torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("per_row", [True, False])
def test_the_amax_pass_on_bf16_bits(per_row, rng):
    """The amax pass takes bf16 X's finite max |x| on its 16 bits, two a register: the reference's finite_amax to
    the bit over NaN, ±Inf, subnormals, -0.0 and the largest finite value, rows and tensor alike."""
    from sharq.kernels.prepare import _amax_kernel

    x = bf16_patterns(rng, 14, 600)
    ref = sharq.quant.finite_amax(x, per_row).reshape(-1)
    got = torch.zeros(len(ref) if per_row else 3, dtype=torch.int32, device=DEVICE)  # the tensor's: its state too
    _amax_kernel[(2,) if per_row else (3,)](x.to(DEVICE), got, 14, 600, 600, PER_ROW=per_row, BM=8, BK=512)
    assert torch.equal(got[:len(ref)].cpu().view(torch.float32), ref)


def test_the_tensor_amax_pass_leaves_its_state_zeroed(rng):
    """The tensor-wide pass leaves its two state words zero, so the next pass on the same words (a launch plan's,
    kept from call to call) finds the next X's amax, a smaller one after a larger one too, for any program count."""
    from sharq.kernels.prepare import _amax_kernel

    words = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    for scale, programs in ((1e3, 3), (1.0, 5), (1e-2, 1), (7.0, 4)):
        x = (torch.randn(21, 700, generator=rng) * scale).to(torch.bfloat16)
        _amax_kernel[(programs,)](x.to(DEVICE), words, 21, 700, 700, PER_ROW=False, BM=8, BK=512)
        assert torch.equal(words[:1].cpu().view(torch.float32), sharq.quant.finite_amax(x, False).reshape(-1))
        assert words[1:].tolist() == [0, 0]


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_a_launcher_with_an_amax_pass_gives_each_call_its_own_scale(granularity, rng):
    """Above SELF_AMAX_ELEMENTS a launch plan runs the amax pass, on a state it keeps (tensor-wide) or rows of its
    own: call after call, a quieter X after a louder one, the reference's values and scale, in kept tensors."""
    from sharq.kernels.prepare import SELF_AMAX_ELEMENTS

    m, k = 17, 4096
    assert m * k > SELF_AMAX_ELEMENTS
    recipe = sharq.get_recipe("sharq", scale_granularity=granularity)
    run = dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device(DEVICE))
    outputs = set()
    for loudness in (40.0, 0.5, 3.0):
        x = (outlier_activations(rng, m, k) * loudness).to(torch.bfloat16)
        values, scale, _ = run(x.to(DEVICE))
        outputs.add((values.data_ptr(), scale.data_ptr()))
        ref = recipe.prepare_activation(x)
        assert torch.equal(scale.cpu(), ref.scale) and torch.equal(values.cpu(), ref.values.to(torch.bfloat16))
    assert len(outputs) == 1


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_a_launcher_with_an_amax_pass_first_called_inside_a_capture_replays_right(rng):
    """A launch plan whose first call on a stream is inside a CUDA-graph capture keeps no amax state there (its
    zeroing would only be recorded): each graph makes its own at each replay. Two graphs captured on one stream,
    replayed in either order, and eager calls between them give the reference."""
    from sharq._cuda_graph import capture

    m, k = 32, 4096
    recipe = sharq.get_recipe("sharq")
    xs = [(outlier_activations(rng, m, k) * s).to(torch.bfloat16).cuda() for s in (30.0, 0.25)]
    refs = [recipe.prepare_activation(x.cpu()) for x in xs]
    prepare_dequantized(xs[0], recipe, torch.bfloat16)  # the kernels compiled before any capture
    run = dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device("cuda"))
    graphs = [capture(lambda x=x: tuple(t.clone() for t in run(x)[:2]), torch.device("cuda")) for x in xs]
    for i in (1, 0, 0, 1):
        graphs[i][0].replay()
        values, scale = graphs[i][1]
        eager_values, eager_scale, _ = run(xs[1 - i])
        for (v, s), ref in (((values, scale), refs[i]), ((eager_values, eager_scale), refs[1 - i])):
            assert torch.equal(s.cpu(), ref.scale) and torch.equal(v.cpu(), ref.values.to(torch.bfloat16))


@pytest.mark.parametrize("self_amax", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_bf16_inputs_scale_as_the_reference(self_amax, granularity, rng):
    """bf16 X of every kind of bit pattern (bf16_patterns) gets the reference's tensor scale and payloads, its
    amax found by the program itself (one launch) or by the amax pass."""
    recipe = sharq.get_recipe("sharq", scale_granularity=granularity)
    # the second X holds ±0 and NaN alone (its finite amax 0: the floor scale)
    for x in (bf16_patterns(rng, 14, 328), bf16_patterns(rng, 8, 328)[:, :200] * 0):
        assert_packed_launch_is_the_reference(
            x, recipe, self_amax, lambda a, b: torch.equal(zero_unsigned(a), zero_unsigned(b)))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_kernel_takes_the_whole_inputs_amax_for_a_k_slice(granularity, rng):
    """A K-slice (a row-parallel shard) given the whole input's amax: the kernel reads it in place of its own amax
    pass and gives the reference's preparation of the slice with that amax, bit for bit."""
    recipe = sharq.get_recipe("sharq", scale_granularity=granularity)
    x = torch.randn(6, 128, generator=rng)
    x[:, :64] = outlier_activations(rng, 6, 64) * 30  # the loud half: the quiet one alone would scale otherwise
    amax = sharq.quant.finite_amax(x, granularity == "token")
    half = x[:, 64:].contiguous()
    ref = recipe.prepare_activation(half, amax=amax)
    values, scale = prepare_dequantized(half.to(DEVICE), recipe, amax=amax.to(DEVICE))
    assert torch.equal(scale.cpu(), ref.scale) and torch.equal(values.cpu(), ref.values)
    assert not torch.equal(prepare_dequantized(half.to(DEVICE), recipe)[1].cpu(), ref.scale)


@pytest.mark.parametrize("name,granularity", [("sharq", "tensor"), ("nvfp4", "token"), ("mxfp4", "tensor")])
@pytest.mark.parametrize("lead", [(3,), (2, 1, 5), (1, 40)])
def test_the_eager_launcher_takes_the_input_as_it_comes(name, granularity, lead, rng):
    """An eager layer's prepare (dequantized_launcher) reads x [*lead, K] as the layer gets it, with no view
    per call, aligned (its bound launches) or not (the general ones), and gives prepare_dequantized's bf16
    values [M, K] and scale on x's rows, bit for bit, written into the same tensors call after call."""
    recipe = sharq.get_recipe(name, scale_granularity=granularity)
    k, m = 64, math.prod(lead)
    run = dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device(DEVICE))
    base = outlier_activations(rng, m * k + 1, 1).reshape(-1).to(torch.bfloat16).to(DEVICE)
    other = outlier_activations(rng, m, k).to(torch.bfloat16).to(DEVICE).view(*lead, k)
    outputs = set()
    for x in (base[: m * k].view(*lead, k), base[1:].view(*lead, k), other):  # 16-byte aligned, 2 bytes off
        values, scale, _ = run(x)
        outputs.add((values.data_ptr(), scale.data_ptr()))
        want_values, want_scale = prepare_dequantized(x.reshape(m, k), recipe, torch.bfloat16)
        assert values.shape == (m, k) and torch.equal(values, want_values) and torch.equal(scale, want_scale)
    assert len(outputs) == 1  # launch.plan_buffers: the plan's tensors, rewritten by each call


@pytest.mark.skipif(DEVICE != "cuda", reason="launches are fixed on a GPU only (the interpreter takes Triton's)")
@pytest.mark.parametrize("m,k,granularity", [(1, 4096, "tensor"), (8, 512, "tensor"), (32, 4096, "tensor"),
                                             (32, 4096, "token")])
def test_the_eager_launchers_fixed_launch_reads_each_calls_input_on_every_stream_and_thread(m, k, granularity, rng):
    """After a thread's first call on a stream the eager prepare's launches (with 32 × 4096, the amax pass too) are
    fixed (launch.DriverKernel.fixed), x's pointer passed by each call: fresh inputs still give
    prepare_dequantized's bits, on the default stream, a side stream and from another thread (on a stream of its
    own), each with its own tensors."""
    import threading

    recipe = sharq.get_recipe("sharq", scale_granularity=granularity)
    run = dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device(DEVICE))
    xs = [outlier_activations(rng, m, k).to(torch.bfloat16).to(DEVICE) * (i + 1) for i in range(4)]
    wants = [prepare_dequantized(x, recipe, torch.bfloat16) for x in xs]

    def calls() -> list:
        out = [tuple(t.clone() for t in run(x)[:2]) for x in xs]
        torch.cuda.current_stream().synchronize()
        return out

    side, from_thread = torch.cuda.Stream(), []
    with torch.cuda.stream(side):
        on_side = calls()
    def in_thread():  # on a stream of its own: a fresh thread's first CUDA call makes the device's context current
        with torch.cuda.stream(torch.cuda.Stream()):
            from_thread.append(calls())

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    for got in (calls(), on_side, from_thread[0]):
        assert all(torch.equal(v, wv) and torch.equal(s, ws) for (v, s), (wv, ws) in zip(got, wants))


@pytest.mark.parametrize("name", ["sharq", "sharq-mxfp4", "nvfp4"])
def test_kernel_non_finite_blocks_token_scale_and_ties(name, rng):
    x = torch.randint(-3, 4, (6, 64), generator=rng).float() * 0.5  # tie-heavy
    x[1, 3], x[4, 40], x[5, 63] = float("nan"), float("inf"), float("-inf")
    x = x.to(DEVICE)
    for granularity in ("tensor", "token") if sharq.get_recipe(name).uses_tensor_scale else ("tensor",):
        recipe = sharq.get_recipe(name, scale_granularity=granularity)
        values, scale = prepare_dequantized(x, recipe)
        ref = recipe.prepare_activation(x)
        assert torch.equal(scale, ref.scale)
        assert torch.equal(values.isnan(), ref.values.isnan())
        ok = ~ref.values.isnan()
        assert torch.equal(values[ok], ref.values[ok])


def test_kernel_bf16_output_and_edge_shapes(rng):
    recipe = sharq.get_recipe("sharq")
    x = outlier_activations(rng, 3, 64).to(DEVICE)
    values, _ = prepare_dequantized(x, recipe, out_dtype=torch.bfloat16)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, recipe.prepare_activation(x).values.to(torch.bfloat16))
    empty, _ = prepare_dequantized(torch.empty(0, 64, device=DEVICE), recipe)
    assert empty.shape == (0, 64)
    with pytest.raises(ValueError, match="does not implement"):
        prepare_dequantized(x, sharq.get_recipe("hif4"))


@pytest.mark.parametrize("name", ["sharq", "nvfp4", "dense-dense", "hif4", "fp8"])
def test_triton_backend_matches_reference_within_bf16_rounding(name, rng):
    """Kernel recipes: the activation is the reference sum rounded once to bf16, so the layer output differs from
    the reference by at most what that rounding explains; other recipes fall back to the reference preparation."""
    x = outlier_activations(rng, 7, 96).to(DEVICE)
    w = torch.randn(24, 96, generator=rng).to(DEVICE)
    b = torch.randn(24, generator=rng).to(DEVICE)
    ref = sharq.simulate_linear(x, w, b, recipe=name)
    got = sharq.simulate_linear(x, w, b, recipe=name, backend="triton")
    recipe = sharq.get_recipe(name)
    act = recipe.prepare_activation(x)
    qw = recipe.prepare_weight(w)
    # bound: |Σ_k (x̂_k − bf16(x̂_k)) ŵ_k| ≤ 2⁻⁸ Σ_k |x̂_k ŵ_k| (bf16's unit roundoff: 8 significant bits), times
    # α, plus both GEMMs' fp32 accumulation (K·2⁻²⁴ each). The GEMM's output is fp32, never rounded to bf16: on the
    # CPU it was, and 10 of 300 seeds exceeded 2⁻⁸·α·Σ|x̂ŵ| (sharq, dense-dense; by up to 1.2 times), none since
    k = x.shape[1]
    bound = (act.values.abs() @ qw.values.float().abs().T) * (act.scale * qw.scale).abs() * (2.0**-8 + 2 * k * 2.0**-24)
    assert ((got - ref).abs() <= bound + 1e-6).all()
    if not supports(recipe):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("name", KERNEL_RECIPES + ["pair2:4-nvfp4"])
@pytest.mark.parametrize("m,k", [(5, 96), (3, 32 * 7 + 4), (2, 52)])
def test_packed_mode_equals_the_reference_payloads(name, m, k, rng):
    from sharq.kernels.prepare import prepare_packed
    from sharq.recipes import Stage

    if name == "pair2:4-nvfp4":  # a 2:4 backbone with an NVFP4 residual: the kernel's 2:4 index packing
        recipe = sharq.get_recipe("sharq", stages=(Stage("nvfp4", 32, "2:4"), Stage("nvfp4", 16)))
    else:
        recipe = sharq.get_recipe(name)
    x = (outlier_activations(rng, m, k) * torch.exp2(torch.randint(-8, 8, (m, 1), generator=rng))).to(DEVICE)
    x[0, 1] = -0.0
    x[1, [0, 2, 4, 5]], x[1, 6], x[-1, 9] = float("inf"), float("nan"), float("-inf")  # NaN ranks above Inf
    got, ref = prepare_packed(x, recipe), recipe.prepare_activation(x)
    assert torch.equal(got.values.isnan(), ref.values.isnan())
    finite = ~ref.values.isnan()
    assert torch.equal(got.values[finite], ref.values[finite]) and torch.equal(got.scale, ref.scale)
    assert len(got.parts) == len(ref.parts)
    for g, r in zip(got.parts, ref.parts):
        assert (g.fmt, g.block_size, g.shape, g.mask) == (r.fmt, r.block_size, r.shape, r.mask)
        assert torch.equal(g.scales, r.scales)
        assert torch.equal(g.codes, r.codes)
        assert (g.indices is None) == (r.indices is None)
        if r.indices is not None:
            assert torch.equal(g.indices, r.indices)


@triton.jit
def _divide_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    s = tl.load(s_ptr + tl.program_id(0))
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + cols, mask=cols < n, other=1.0)
    tl.store(out_ptr + tl.program_id(0) * n + cols, div_ieee(x, s), mask=cols < n)


def test_tensor_scale_division_is_correctly_rounded(rng):
    """The kernel's X / s_x against IEEE division (torch's, with a tensor divisor), for every finite bf16 x
    (subnormals included; a sample under the interpreter) and tensor scales over their whole range."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = bits[torch.isfinite(bits)].float()
    n_scales = 256 if DEVICE == "cuda" else 6
    if DEVICE != "cuda":
        x = x[torch.randperm(len(x), generator=rng)[:4096]]
    amax = torch.rand(n_scales, generator=rng) * torch.exp2(torch.randint(-60, 128, (n_scales,), generator=rng).float())
    s = torch.clamp_min(amax / torch.tensor(2688.0), 1e-9)
    s = s[torch.isfinite(s)]
    x, s = x.to(DEVICE), s.to(DEVICE)
    out = torch.empty(len(s), len(x), device=DEVICE)
    _divide_kernel[(len(s), triton.cdiv(len(x), 1024))](x, s, out, len(x), BLOCK=1024)
    expected = x[None, :] / s[:, None]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("name,granularity", [("sharq", "tensor"), ("sharq", "token"), ("sharq-mxfp4", "tensor")])
def test_kernel_over_the_whole_bf16_range(name, granularity, rng):
    """Magnitudes from bf16 subnormals to 1e38 in one tensor (subnormal quotients, MXFP4's subnormal block
    scale 2^-127) agree with the reference bit for bit."""
    m, k = 6, 512
    x = torch.randn(m, k, generator=rng)
    wide = torch.exp2(torch.randint(-133, 127, (m, k // 2), generator=rng).float())
    x[:, k // 2:] *= wide  # the first tiles stay moderate, the last ones span the range
    x = x.clamp(-3e38, 3e38).to(torch.bfloat16).to(DEVICE)  # finite: non-finite input has its own test
    x[1, :16] = x[1, :16].abs().clamp_max(1e-38) * 1e-2  # a block of subnormals
    recipe = sharq.get_recipe(name, scale_granularity=granularity)
    values, scale = prepare_dequantized(x, recipe)
    ref = recipe.prepare_activation(x)
    assert torch.equal(scale, ref.scale)
    assert torch.equal(values, ref.values)


@triton.jit
def _block_scale_kernel(amax_ptr, s_ptr, inv_ptr, n, FMT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s, inv = _block_scale(tl.load(amax_ptr + i, mask=i < n, other=0), FMT)
    tl.store(s_ptr + i, s, mask=i < n)
    tl.store(inv_ptr + i, inv, mask=i < n)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_block_scale_and_its_reciprocal_for_every_bf16_maximum(fmt, rng):
    """The kernel's block scale (amax/6 without a division, for NVFP4) and the reciprocal it multiplies by
    (hardware approximation + Newton on the GPU) against the reference quantizer, for every non-negative bf16
    block maximum, 2^16 random fp32 ones (the residual's), maxima next to rounding midpoints, and Inf/NaN."""
    bf16 = (torch.arange(0, 0x7F81, dtype=torch.int32) << 16)
    fp32 = torch.randint(0, 0x7F800000, (1 << 16,), generator=rng, dtype=torch.int32)
    # maxima within 8 fp32 steps of 6× a UE4M3 rounding midpoint, where an inexact amax / 6 would round wrongly
    mids = torch.tensor([(16 + 2 * j + 1) / 16 * 2.0**e for e in range(-6, 9) for j in range(8)]
                        + [(j + 0.5) / 512 for j in range(1, 8)])
    near = ((6 * mids).view(torch.int32)[:, None] + torch.arange(-8, 9, dtype=torch.int32)).flatten()
    bits = torch.cat([bf16, fp32, near, torch.tensor([0x7FC00000], dtype=torch.int32)])
    amax = bits.view(torch.float32)
    blocks = torch.zeros(len(amax), 32)
    blocks[:, 0] = amax
    ref = quantize_blocks(blocks, fmt, 32).block_scales()[:, 0]
    s, inv = torch.empty(len(bits), device=DEVICE), torch.empty(len(bits), device=DEVICE)
    _block_scale_kernel[(triton.cdiv(len(bits), 1024),)](bits.to(DEVICE), s, inv, len(bits),
                                                         FMT=_FMT[fmt], BLOCK=1024)
    assert torch.equal(s.cpu().isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.equal(s.cpu()[ok], ref[ok])
    assert torch.equal(inv.cpu()[ok], 1.0 / ref[ok])
