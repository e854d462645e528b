import copy
import dataclasses

import pytest
import torch
from torch import nn

import sharq
from sharq.backends import BACKENDS, EagerPlan, GroupPlan
from sharq.kernels import cuda_gemm, cuda_wgmma
from sharq.nn import SharedActivation, SharQLinear
from sharq.recipes import QActivation

from .conftest import hopper, outlier_activations, recording_plans


@pytest.mark.parametrize("name", [r for r in sharq.list_recipes() if r != "outlier-channels"])
def test_sharq_linear_equals_simulate_linear(name, rng):
    linear = nn.Linear(48, 24, bias=True)
    x = outlier_activations(rng, 10, 48).reshape(2, 5, 48)
    layer = SharQLinear.from_linear(linear, name)
    expected = sharq.simulate_linear(x, linear.weight.detach(), linear.bias.detach(), recipe=name)
    assert torch.equal(layer(x), expected)
    for dtype in (torch.float16, torch.bfloat16):
        assert layer(x.to(dtype)).dtype == dtype


def test_strict_names_the_layer_and_counts(rng):
    linear = nn.Linear(32, 8)
    layer = SharQLinear.from_linear(linear, "sharq", strict=True, name="model.layers.3.mlp.down_proj")
    x = torch.randn(4, 32, generator=rng)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj: input has 2 non-finite"):
        layer(x)
    lenient = SharQLinear.from_linear(linear, "sharq")
    y = lenient(x)
    assert torch.isnan(y[[1, 3]]).all() and torch.isfinite(y[[0, 2]]).all()
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer7: weight has 1 non-finite"):
        SharQLinear.from_linear(linear, "sharq", strict=True, name="layer7")


def test_strict_through_quantize_model_names_the_module(rng):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: weight has 1 non-finite"):
        sharq.quantize_model(model, "sharq", strict=True)


def test_bad_calibration_statistics_name_the_layer(rng):
    """from_linear with statistics of another layer's size, another shape or NaN: a ValueError naming the layer
    (statistics of the wrong size picked channels silently, or crashed inside the recipe)."""
    linear = nn.Linear(128, 8)
    for stats, message in [(torch.rand(100, generator=rng), r"128 values .*got shape \(100,\)"),
                           (torch.rand(168, generator=rng), r"128 values .*got shape \(168,\)"),
                           (torch.full((128,), float("nan")), "128 non-finite")]:
        with pytest.raises(ValueError, match=rf"^proj: calibration statistics.*{message}"):
            SharQLinear.from_linear(linear, "outlier-channels", channel_stats=stats, name="proj")


def test_device_mismatch_is_a_clear_error():
    layer = SharQLinear.from_linear(nn.Linear(16, 4), "nvfp4", name="proj")
    with pytest.raises(ValueError, match="proj: input is on meta but the layer is on cpu"):
        layer(torch.empty(2, 16, device="meta"))
    with pytest.raises(ValueError, match=r"proj: expected input \[\.\.\., 16\]"):
        layer(torch.randn(2, 15))
    with pytest.raises(ValueError, match="unknown backend"):
        SharQLinear.from_linear(nn.Linear(16, 4), "nvfp4", backend="cuda-magic")


def test_zero_dim_input_is_a_clear_error():
    layer = SharQLinear.from_linear(nn.Linear(16, 4), "sharq", name="proj")
    with pytest.raises(ValueError, match=r"proj: expected input \[\.\.\., 16\], got \(\)"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("backend", ["reference", "planned"])
def test_an_8_bit_float_input_is_a_clear_error(backend, monkeypatch):
    """The output takes the input's dtype, so an fp8 input gave an fp8 output, saturated at 448 (2892 came out as
    448) and rounded to 3 bits; NVFP4 recipes failed inside torch.isfinite. A TypeError now, by the eager plan's
    path too (a backend with plans, as the packed one on CUDA)."""
    monkeypatch.setitem(BACKENDS, "planned", recording_plans([]))
    for recipe in ("mxfp4", "sharq"):
        layer = SharQLinear.from_linear(nn.Linear(32, 6), recipe, backend=backend)
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            with torch.no_grad(), pytest.raises(TypeError, match="16 bits or more, got torch.float8"):
                layer(torch.ones(2, 32).to(dtype))


@pytest.mark.parametrize("name", ["sharq", "nvfp4", "mxfp4", "bf16"])
def test_an_fp8_weight_quantizes_as_its_exact_fp32_values(name, rng):
    """An fp8 checkpoint's linear (its weight in float8_e4m3fn) quantizes as the same weight in fp32, which holds it
    exactly; NVFP4 recipes failed inside torch.isfinite (not implemented for fp8)."""
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 64, generator=rng).to(torch.float8_e4m3fn).float())
    fp8 = nn.Linear(64, 16)
    fp8.weight = nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    fp8.bias = linear.bias
    x = outlier_activations(rng, 3, 64)
    with torch.no_grad():
        assert torch.equal(SharQLinear.from_linear(fp8, name)(x), SharQLinear.from_linear(linear, name)(x))


@pytest.mark.parametrize("name", sharq.list_recipes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_straight_through_gradient(name, dtype, rng):
    """The input's gradient is that of x·W_effᵀ, W_eff the layer's dequantized weight times its scale (outlier
    columns in bf16): checked against autograd through F.linear on W_eff."""
    linear = nn.Linear(48, 24, bias=True)
    stats = torch.rand(48, generator=rng) if name == "outlier-channels" else None
    layer = SharQLinear.from_linear(linear, name, channel_stats=stats)
    x = outlier_activations(rng, 10, 48).reshape(2, 5, 48).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 24, generator=rng).to(dtype)
    layer(x).backward(dy)
    want = x.detach().clone().float().requires_grad_()
    nn.functional.linear(want, layer.qweight.effective()).backward(dy.float())
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), want.grad, rtol=0, atol=0) if dtype == torch.float32 else \
        torch.testing.assert_close(x.grad, want.grad.to(dtype))
    cos = nn.functional.cosine_similarity(x.grad.float().flatten(), (dy.float() @ linear.weight.detach()).flatten(), 0)
    assert cos > 0.9  # and it is close to the gradient of the unquantized layer


def test_payload_keeps_its_dtypes_when_the_model_is_cast(rng):
    """model.to(bf16) casts the bias like any parameter but moves the payload unchanged, so a layer without bias
    computes the same bits after the cast (a bf16 weight_scale would change every output)."""
    for bias in (False, True):
        layer = SharQLinear.from_linear(nn.Linear(64, 8, bias=bias), "sharq")
        payload = {n: getattr(layer, n).clone() for n in ("weight_scale", "weight_values", "weight_codes")}
        x = outlier_activations(rng, 3, 64).to(torch.bfloat16)
        want = layer(x)
        layer.to(torch.bfloat16)
        for n, t in payload.items():
            assert getattr(layer, n).dtype == t.dtype and torch.equal(getattr(layer, n), t)
        if bias:
            assert layer.bias.dtype == torch.bfloat16
        else:
            assert torch.equal(layer(x), want)
        layer.half().float()
        assert torch.equal(layer.weight_scale, payload["weight_scale"])


@pytest.mark.parametrize("name", ["sharq", "fp8", "hif4", "outlier-channels"])
def test_torch_compile_is_bit_identical_to_eager(name, rng):
    """A layer is two opaque custom ops to torch.compile, so inductor cannot fuse away the bf16 roundings of
    SPEC §3 (it did: logits moved by 0.04). fullgraph=True: no graph break either; gradients compile too."""
    stats = torch.rand(64, generator=rng) if name == "outlier-channels" else None
    layer = SharQLinear.from_linear(nn.Linear(64, 32), name, channel_stats=stats)
    compiled = torch.compile(layer, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = outlier_activations(rng, 7, 64).to(dtype).requires_grad_()
        want = layer(x)
        (dx,) = torch.autograd.grad(want.sum(), x)
        got = compiled(x)
        assert torch.equal(got, want)
        assert torch.equal(torch.autograd.grad(got.sum(), x)[0], dx)


def test_under_torch_compile_a_layer_with_eager_plans_runs_its_plan_as_one_op(rng, monkeypatch):
    """Where the backend has eager plans, a compiled call is one custom op that runs the layer's eager plan (the
    launches an eager call makes, so the same bits); a copy has a handle of its own; the op given another layer's
    tensors under a handle (a graph traced on another model of the same structure) computes from the tensors it
    was given, not from the handle's plan; strict layers keep the two ops."""
    calls = []
    monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls))
    layer = SharQLinear.from_linear(nn.Linear(64, 32), "sharq", backend="planned")
    x = outlier_activations(rng, 5, 64)
    with torch.no_grad():
        want = layer(x)
    assert calls == [("prepare", 64), ("matmul", 32)]
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(x)
    assert calls[2:] == [("prepare", 64), ("matmul", 32)] and torch.equal(got, want)
    twin = copy.deepcopy(layer)
    assert twin.plan_handle != layer.plan_handle and sharq.functional._PLANNED[twin.plan_handle] is twin
    other = SharQLinear.from_linear(nn.Linear(64, 32), "sharq", backend="planned")
    calls.clear()
    values, codes, scales, weight_scale, bias = other.plan_tensors()
    y = torch.ops.sharq.planned_linear(x, values, codes, scales, weight_scale, bias, [], "", other.recipe.key,
                                       "planned", 32, layer.plan_handle)
    assert calls == [] and torch.equal(y, other.multiply(other.prepare(x), other.bias, x.dtype))
    strict = SharQLinear.from_linear(nn.Linear(64, 32), "sharq", backend="planned", strict=True)
    assert not strict.plannable(x) and layer.plannable(x) and not layer.plannable(x.requires_grad_())


def test_an_eager_plan_follows_the_layers_strictness_and_the_calls_gradient(rng, monkeypatch):
    """What a plan depends on is checked when it is made (strictness, a floating-point input) or at each call (a
    gradient to carry): a layer made strict after its plan was made checks its input (the general path), and one
    made lenient again runs the plan; a call carrying a gradient takes the general path in between."""
    calls = []
    monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls))
    layer = SharQLinear.from_linear(nn.Linear(64, 32), "sharq", backend="planned", name="q")
    x = outlier_activations(rng, 5, 64)
    bad = x.clone()
    bad[2, 3] = float("nan")
    with torch.no_grad():
        want = layer(x)
        assert len(calls) == 2 and layer.eager_plan(bad) is not None and layer.eager_plan(x.int()) is None
        layer.strict = True
        assert layer.eager_plan(x) is None
        with pytest.raises(ValueError, match=r"q: input has 1 non-finite"):
            layer(bad)
        assert torch.equal(layer(x), want) and len(calls) == 2  # the general path
        layer.strict = False
        assert torch.equal(layer(x), want) and len(calls) == 4
    assert layer.eager_plan(x.clone().requires_grad_()) is None
    assert torch.equal(layer(x.clone().requires_grad_()).detach(), want) and len(calls) == 4


def test_the_weight_forward_multiplies_follows_every_change_of_the_payload(rng):
    """The layer makes its forward weight once; assigning a payload tensor, loading a state dict and casting
    each make it anew, so the output is always that of the layer's current state."""
    x = outlier_activations(rng, 3, 64)
    layer = SharQLinear.from_linear(nn.Linear(64, 32, bias=False), "sharq")
    other = SharQLinear.from_linear(nn.Linear(64, 32, bias=False), "sharq")
    with torch.no_grad():
        y = layer(x)
        layer.weight_scale = layer.weight_scale * 2  # α = s_x·s_w doubles: exactly twice the output
        assert torch.equal(layer(x), 2 * y)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))
        layer.to(torch.float64), other.to(torch.float64)
        assert torch.equal(layer(x.double()), other(x.double()))


@pytest.mark.parametrize("saved,target", [("sharq", "mxfp4"), ("mxfp4", "sharq"), ("sharq-mxfp4", "sharq")])
def test_a_state_dict_of_another_weight_format_is_refused(saved, target, rng):
    """NVFP4 and MXFP4 payloads in blocks of 32 have the same shapes and dtypes: a state dict of one loaded into
    the other without a word and computed other numbers. The state dict's metadata names its weight format, and a
    load into another is an error naming the layer and both, the layer untouched; the same format loads, also
    under other activation options."""
    x = outlier_activations(rng, 3, 64)
    source = SharQLinear.from_linear(nn.Linear(64, 32), saved, name="q_proj")
    layer = SharQLinear.from_linear(nn.Linear(64, 32), target, name="q_proj")
    want = layer(x)
    with pytest.raises(RuntimeError, match=f"q_proj: the state dict holds .*recipe '{saved}'.*recipe '{target}'"):
        layer.load_state_dict(source.state_dict())
    assert torch.equal(layer(x), want)
    options = {"scale_granularity": "token"} if saved == "sharq" else {}
    twin = SharQLinear.from_linear(nn.Linear(64, 32), saved, **options)
    twin.load_state_dict(source.state_dict())
    assert torch.equal(twin.weight_codes, source.weight_codes) and torch.equal(twin.weight_scales, source.weight_scales)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("shape,bias,dtype,recipe,options", [
    ((1, 512), False, torch.bfloat16, "sharq", {}),
    ((2, 3, 512), True, torch.float16, "sharq", {}),
    ((32, 512), True, torch.bfloat16, "nvfp4", {}),
    ((7, 512), False, torch.float32, "sharq", {"scale_granularity": "token"}),
    ((1, 512), True, torch.bfloat16, "sharq-plus", {}),
    ((100, 512), True, torch.bfloat16, "sharq", {}),  # prefill sizes: the decode into the scratch weight + cuBLAS
    ((2, 70, 512), False, torch.float16, "sharq-plus", {}),
    ((130, 512), True, torch.float32, "sharq", {"scale_granularity": "token"}),
    ((80, 512), True, torch.bfloat16, "mxfp4", {}),
])
def test_the_eager_plan_computes_what_prepare_and_multiply_compute(shape, bias, dtype, recipe, options):
    """An eager call on the packed backend runs the layer's launch plan (at decode sizes the CUDA GEMM's, above
    them the decode into the scratch weight), which must give the general path's bits, and be made anew when the
    weight scale, the bias or the dtype change."""
    torch.manual_seed(len(shape) + shape[0])
    layer = SharQLinear.from_linear(nn.Linear(512, 256, bias=bias, device="cuda", dtype=dtype), recipe,
                                    backend="packed", **options)
    x = (torch.randn(*shape, device="cuda") * 3).to(dtype)

    def general():
        return layer.multiply(layer.prepare(x.reshape(-1, 512)), layer.bias, dtype).reshape(*shape[:-1], 256)

    with torch.no_grad():
        assert layer.eager_plan(x) is not None
        assert torch.equal(layer(x), general())
        y = layer(x)
        layer.weight_scale = layer.weight_scale * 2  # α doubles: so does the output, bias aside
        assert torch.equal(layer(x), general())
        if bias:
            layer.bias = torch.randn_like(layer.bias)
            assert torch.equal(layer(x), general()) and not torch.equal(layer(x), y)
        else:
            assert torch.equal(layer(x), 2 * y)


@cuda_only
def test_calls_the_plan_does_not_cover_take_the_general_path():
    layer = SharQLinear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), "sharq",
                                    backend="packed")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    assert layer.eager_plan(x) is not None
    above = torch.randn(cuda_gemm.MAX_M + 1, 512, device="cuda", dtype=torch.bfloat16)
    assert layer.eager_plan(above) is not None  # above the CUDA kernel's tokens: the decode into the scratch weight
    mx = SharQLinear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), "mxfp4", backend="packed")
    assert mx.eager_plan(x) is None  # MXFP4 weights at 4 tokens: the Triton kernels, by the general path
    assert mx.eager_plan(above) is not None
    assert layer.eager_plan(torch.randn(512, 4, device="cuda", dtype=torch.bfloat16).T) is None  # not contiguous
    assert layer.eager_plan(x.clone().requires_grad_()) is None  # a gradient to carry
    assert layer.eager_plan(x.to(torch.int32)) is None  # as_rows' TypeError, not a kernel's garbage
    with torch.no_grad():
        assert layer.eager_plan(x.clone().requires_grad_()) is not None
    layer.strict = True
    assert layer.eager_plan(x) is None


@cuda_only
def test_a_layer_keeps_a_bounded_number_of_eager_plans():
    """Prefill makes a plan per prompt length: a long-running server must not grow them without end."""
    from sharq import nn as sharq_nn

    layer = SharQLinear.from_linear(nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16), "sharq",
                                    backend="packed")
    with torch.no_grad():
        for m in range(1, sharq_nn._MAX_PLANS + 40):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(layer(x), layer.multiply(layer.prepare(x), layer.bias, torch.bfloat16))
    assert 0 < len(layer._plans) <= sharq_nn._MAX_PLANS


@hopper
@pytest.mark.parametrize("m,backend,options", [(150, "packed", {}), (300, "packed-placed", {}),
                                               (200, "packed", {"scale_granularity": "token"}),
                                               (40, "packed", {}), (64, "packed-placed", {})])
def test_a_large_layer_of_its_own_input_takes_the_bulk_copies_with_the_general_paths_bits(m, backend, options):
    """A layer the wgmma kernel takes (above 64 tokens its token tiles), sharing its input with no other, runs its
    bulk-copy variant: its plan's prepare writes the activation tiled (rows up to whole tiles) and the output is the
    general path's bit for bit (the same K split)."""
    torch.manual_seed(m)
    layer = SharQLinear.from_linear(nn.Linear(4096, 6144, bias=True, device="cuda", dtype=torch.bfloat16), "sharq",
                                    backend=backend, **options)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    tokens = 64 if m <= 64 else 128
    with torch.no_grad():
        plan = layer.eager_plan(x)
        assert plan.prepare(x).values.shape == (-(-m // tokens) * tokens, 4096)  # tiled
        assert torch.equal(layer(x), layer.multiply(layer.prepare(x), layer.bias, torch.bfloat16))


@hopper
@pytest.mark.parametrize("tokens", [150, 48])
def test_a_quantized_llama_takes_the_bulk_copies_for_its_groups_and_layers_with_the_same_logits(tokens, monkeypatch):
    """At 150 tokens (128-token tiles) and at 48 (64-token tiles, K split in four; 4096 × 4096 takes the wgmma
    kernel from 33 tokens, docs/PERF.md) of a model with 8B-wide layers every q/k/v and gate/up group and every
    o/down layer runs the bulk-copy variant of the wgmma kernel's token tiles (group plans with a prepare of their
    own); the logits are those with the producer warps bit for bit."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=4096, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    sharq.quantize_model(model, "sharq", backend="packed")
    ids = torch.randint(0, 256, (1, tokens), device="cuda")
    bulk = []

    def counted(made, name):  # the bulk-copy launches made, counted
        def make(*args):
            run = made(*args)
            if run is not None:
                bulk.append(name)
            return run
        return make

    for name in ("bulk_launcher", "bulk_group_launcher"):
        monkeypatch.setattr(cuda_gemm, name, counted(getattr(cuda_gemm, name), name))
    with torch.no_grad():
        tiled = model(ids).logits
        assert bulk.count("bulk_group_launcher") == 2 * config.num_hidden_layers
        assert bulk.count("bulk_launcher") == 2 * config.num_hidden_layers  # o_proj and down
        monkeypatch.setattr(cuda_wgmma, "bulk_tile", lambda *args: None)
        for layer in model.modules():
            if isinstance(layer, SharQLinear):
                layer._forget_runs()
        plain = model(ids).logits
    assert torch.equal(tiled, plain)


class _GroupMember:
    """What SharedActivation.output asks of a layer, with an eager plan that counts its calls."""

    def __init__(self, shared, w, counts, backend):
        self.in_features, self.weight, self.counts, self.backend, self.bias = w.shape[1], w, counts, backend, None
        self._layout = None
        self.recipe = sharq.get_recipe("nvfp4")
        self.group_position = len(shared.layers)
        shared.layers.append(self)

    def eager_plan(self, x):
        def prepare(x2d):
            self.counts["prepare"] += 1
            return QActivation((), x2d.clone(), torch.ones(1, 1))

        def matmul(act):
            self.counts["matmul"] += 1
            return act.values @ self.weight.T

        return EagerPlan(prepare, matmul)

    def forward_weight(self):
        return self.weight


def _group_backend(counts):
    def group_plan(weights, biases, recipe, lead, out_dtype, layouts, x_dtype=None):
        counts["plans"] += 1

        def run(act):
            counts["group"] += 1
            return [act.values @ w.T for w in weights]
        return GroupPlan(run)
    return dataclasses.replace(BACKENDS["reference"], group_plan=group_plan)


@pytest.mark.parametrize("grouped", [True, False])
def test_layers_that_read_one_input_prepare_it_once_and_multiply_in_one_group_launch(grouped, monkeypatch):
    """The first member called in a block call computes every member's output (one prepare, one group launch), in
    any order of calls; a new input tensor, or the same one written in place, starts over; outside a block call
    each layer runs on its own; without a group plan the members share the prepare alone."""
    counts = dict.fromkeys(["prepare", "matmul", "group", "plans"], 0)
    monkeypatch.setitem(BACKENDS, "group-test", _group_backend(counts) if grouped else BACKENDS["reference"])
    shared = SharedActivation(3)
    ws = [torch.randn(n, 16) for n in (8, 4, 4)]
    layers = [_GroupMember(shared, w, counts, "group-test") for w in ws]
    x = torch.randn(2, 16)

    def block(order, x):
        shared.open()
        try:
            return {i: shared.output(layers[i], x, layers[i].eager_plan(x)) for i in order}
        finally:
            shared.close()

    for order in ([0, 1, 2], [2, 0, 1]):
        ys = block(order, x)
        assert all(torch.equal(ys[i], x @ ws[i].T) for i in range(3))
    assert counts == ({"prepare": 2, "matmul": 0, "group": 2, "plans": 1} if grouped
                      else {"prepare": 2, "matmul": 6, "group": 0, "plans": 0})
    shared.open()
    y0 = shared.output(layers[0], x, layers[0].eager_plan(x))
    x.mul_(2)  # written in place between members: not served from before
    assert torch.equal(shared.output(layers[1], x, layers[1].eager_plan(x)), x @ ws[1].T)
    x2 = torch.randn(2, 16)  # another tensor: prepared again
    assert torch.equal(shared.output(layers[2], x2, layers[2].eager_plan(x2)), x2 @ ws[2].T)
    shared.close()
    assert torch.equal(y0, x @ ws[0].T / 2)
    before = dict(counts)
    assert torch.equal(shared.output(layers[1], x, layers[1].eager_plan(x)), x @ ws[1].T)  # outside a block call
    assert counts["prepare"] == before["prepare"] + 1 and counts["matmul"] == before["matmul"] + 1
    shared.forget_plans()  # a member changed: the group launch is worked out again
    block([0, 1, 2], x)
    assert counts["plans"] == (2 if grouped else 0)


@cuda_only
@pytest.mark.parametrize("tokens", [1, 8])
def test_a_quantized_llama_launches_q_k_v_and_gate_up_as_one_group_each(tokens, monkeypatch):
    """On the packed backend at decode sizes each decoder layer's q/k/v and gate/up run as one launch each
    (cuda_gemm's group launch), and the logits agree with the layers launched one by one (same kernels, K split
    by the group's width: equal up to the fp32 sums' order)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=4096, num_attention_heads=16,
                                      num_key_value_heads=4, num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(tokens)
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    sharq.quantize_model(model, "sharq", backend="packed")
    ids = torch.randint(0, 256, (1, tokens), device="cuda")
    launches = []
    group_run = cuda_gemm._group_run

    def counted(plan, *args, **kwargs):  # a group plan's launches, counted as they run
        run = group_run(plan, *args, **kwargs)
        return lambda a, sx: launches.append(len(plan.blocks)) or run(a, sx)

    monkeypatch.setattr(cuda_gemm, "_group_run", counted)
    with torch.no_grad():
        grouped = model(ids).logits.float()
        assert launches == [3, 2] * config.num_hidden_layers
        monkeypatch.setitem(BACKENDS, "packed", dataclasses.replace(BACKENDS["packed"], group_plan=None))
        for layer in model.modules():
            if isinstance(layer, SharQLinear):
                layer._forget_runs()
        alone = model(ids).logits.float()
    assert len(launches) == 2 * config.num_hidden_layers
    torch.testing.assert_close(grouped, alone, rtol=2e-2, atol=2e-2 * alone.abs().max().item())
