"""The decode GEMM's folded launches (kernels/cuda_activation.py: the launch prepares its own activation) against
the prepare kernel's launch followed by the GEMM's, bit for bit, on a GPU, and which launches fold (on any machine);
their sources compile on the CPU (NVRTC) in tests/kernels/test_cuda_gemm_source.py."""

from __future__ import annotations

import copy

import pytest
import torch

import sharq
from sharq.backends import packed
from sharq.kernels import cuda_activation, cuda_gemm
from sharq.kernels import prepare as kp

from .test_cuda_gemm import _payload

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not cuda_gemm.available(),
                               reason="needs a CUDA GPU and torch.cuda._compile_kernel")
FOLD_RECIPES = ["sharq", "nvfp4", "sparse-only", "dense-dense"]


def _x(m: int, k: int, seed: int, specials: bool = False) -> torch.Tensor:
    """Heavy-tailed bf16 rows with outlier channels; `specials`: NaN, ±Inf, ±0 and subnormals sprinkled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[:, torch.randint(0, k, (max(k // 64, 1),), generator=g)] *= 40.0
    if specials:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:8]
        pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38])
        flat[idx] = pool
    return x.to(torch.bfloat16).cuda()


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    mismatch = (got.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not mismatch.any(), f"{int(mismatch.sum())} of {want.numel()} differ, first at {mismatch.nonzero()[0]}"


def _unfolded(recipe, q, sw, bias, m: int, k: int):
    """x -> y by the prepare kernel's launch plan and the GEMM's: what a folded launch must give."""
    prepare = kp.dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device("cuda"))
    gemm = cuda_gemm.launcher(q.codes, q.scales, "nvfp4", q.block_size, sw, bias, (m,), False, torch.bfloat16)

    def run(x):
        values, scale, _ = prepare(x)
        return gemm(values, scale).clone()
    return run


def test_fold_for_takes_decode_sizes_of_recipes_with_one_tensor_scale():
    """Which launches fold (no GPU needed): up to FOLD_ELEMENTS bf16 elements in whole chunks of K, recipes with
    one tensor scale; a kernel source asked to fold another recipe's launch refuses."""
    sharq_recipe = sharq.get_recipe("sharq")
    fold = cuda_activation.fold_for(sharq_recipe, 8, 4096, 256)
    assert fold is not None and fold.blocks == 8 * 4096 // 8 // 256 and fold.two_stages and fold.mask == 1
    assert cuda_activation.fold_for(sharq_recipe, 9, 4096, 256) is None  # above FOLD_ELEMENTS
    assert cuda_activation.fold_for(sharq_recipe, 1, 4000, 256) is None  # K not whole chunks
    assert cuda_activation.fold_for(sharq.get_recipe("mxfp4"), 1, 4096, 256) is None  # no tensor scale
    assert cuda_activation.fold_for(sharq.get_recipe("sharq", scale_granularity="token"), 1, 4096, 256) is None
    with pytest.raises(ValueError, match="one tensor scale"):
        cuda_gemm.kernel_source(cuda_gemm.CudaTile(), 1, 16, 0, 0, True, False, fold)


@needs_gpu
@pytest.mark.parametrize("name", FOLD_RECIPES)
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (8, 4096, 4096), (3, 28672, 4096), (2, 4096, 14336),
                                   (1, 1024, 4096), (5, 256, 2048)])
def test_a_folded_launch_gives_the_prepare_and_gemms_bits(name, m, n, k):
    """Every fold recipe on decode shapes (one token to FOLD_ELEMENTS), with and without a bias, non-finite inputs
    included; three calls in a row (the ticket left zeroed by each launch for the next)."""
    recipe = sharq.get_recipe(name)
    q = _payload(n, k, 16, m * n + k)
    sw = torch.rand(1, device="cuda") + 0.5
    for bias in (None, torch.randn(n, device="cuda").to(torch.bfloat16)):
        folded = cuda_gemm.fold_launcher(q.codes, q.scales, "nvfp4", 16, sw, bias, (m,), recipe, torch.bfloat16)
        assert folded is not None
        want = _unfolded(recipe, q, sw, bias, m, k)
        for call in range(3):
            x = _x(m, k, 10 * m + call, specials=call == 2)
            _same_bits(folded(x), want(x))
    # a layer's input as a model gives it, [batch, 1, K]: the same launch reads its rows
    folded = cuda_gemm.fold_launcher(q.codes, q.scales, "nvfp4", 16, sw, None, (m, 1), recipe, torch.bfloat16)
    x = _x(m, k, 7)
    _same_bits(folded(x.view(m, 1, k)), _unfolded(recipe, q, sw, None, m, k)(x).view(m, 1, n))


@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("ns", [(4096, 1024, 1024), (14336, 14336)])
def test_a_folded_group_launch_gives_each_layers_bits(m, ns):
    """q/k/v- and gate/up-shaped groups (K = 4096): each layer's output is the prepare + group launch's (the group's
    tile, which may split K unlike a layer's own launch, so a layer's own launch may differ in the last bit)."""
    recipe, k = sharq.get_recipe("sharq"), 4096
    qs = [_payload(n, k, 16, n + i) for i, n in enumerate(ns)]
    sws = [torch.rand(1, device="cuda") + 0.5 for _ in ns]
    weights = [(q.codes, q.scales, sw) for q, sw in zip(qs, sws)]
    folded = cuda_gemm.fold_group_launcher(weights, [None] * len(ns), "nvfp4", 16, (m,), recipe, torch.bfloat16)
    if folded is None:
        assert cuda_gemm.group_tile(m, ns, k, torch.device("cuda")) is None  # no group launch at this size
        return
    prepare = kp.dequantized_launcher(recipe, m, k, torch.bfloat16, torch.device("cuda"))
    group = cuda_gemm.group_launcher(weights, [None] * len(ns), "nvfp4", 16, (m,), False, torch.bfloat16)
    for call in range(2):
        x = _x(m, k, m + call, specials=call == 1)
        values, scale, _ = prepare(x)
        for y, want in zip(folded(x), [w.clone() for w in group(values, scale)]):
            _same_bits(y, want)


@needs_gpu
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (8, 4096, 4096)])
def test_a_folded_launch_replays_in_a_cuda_graph(m, n, k):
    """Captured into two graphs (sharing the plan's buffer for graphs, no zeroing node), replayed in turn on new
    inputs, between eager calls (which keep their own buffer)."""
    recipe = sharq.get_recipe("sharq")
    q, sw = _payload(n, k, 16, 5), torch.rand(1, device="cuda") + 0.5
    folded = cuda_gemm.fold_launcher(q.codes, q.scales, "nvfp4", 16, sw, None, (m,), recipe, torch.bfloat16)
    want = _unfolded(recipe, q, sw, None, m, k)
    xs = [_x(m, k, 0), _x(m, k, 1)]
    folded(xs[0])  # compiled and its plan made outside the capture
    graphs, ys = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()], []
    for graph, x in zip(graphs, xs):
        with torch.cuda.graph(graph):
            ys.append(folded(x))
    for seed in range(2, 6):
        i = seed % 2
        xs[i].copy_(_x(m, k, seed))
        graphs[i].replay()
        _same_bits(ys[i], want(xs[i]))
        _same_bits(folded(_x(m, k, seed + 10)), want(_x(m, k, seed + 10)))


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 8])
def test_a_quantized_model_folds_its_decode_launches_with_the_same_logits(tokens, monkeypatch):
    """A Llama-shaped model on the packed backend: its own-input layers' plans and its groups' fold at decode
    sizes, and the logits (eager, and an input that is not 16-byte aligned) are the unfolded ones bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 256, (tokens, 1), device="cuda")
    models, logits = {}, {}
    for fold in (False, True):  # plans are made at a layer's first call, which reads the switch
        monkeypatch.setattr(packed, "FOLD_PREPARE", fold)
        models[fold] = sharq.quantize_model(copy.deepcopy(base), "sharq", device="cuda")
        with torch.no_grad():
            logits[fold] = models[fold](ids).logits
    o_proj = models[True].model.layers[0].self_attn.o_proj
    x = torch.randn(tokens, 1, o_proj.in_features, device="cuda").to(torch.bfloat16)
    assert o_proj.eager_plan(x).forward is not None
    assert models[False].model.layers[0].self_attn.o_proj.eager_plan(x).forward is None
    _same_bits(logits[True], logits[False])
    unaligned = torch.empty(x.numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].view_as(x).copy_(x)
    with torch.no_grad():
        _same_bits(o_proj(unaligned), models[False].model.layers[0].self_attn.o_proj(x))


@needs_gpu
@pytest.mark.parametrize("in_graphs", [False, True])
def test_a_plans_forward_folds_eagerly_and_in_a_graph_only_with_fold_in_graphs(in_graphs, monkeypatch):
    """packed.eager_plan's forward: the folded launch in eager calls; inside a CUDA-graph capture the prepare's
    and the GEMM's launches unless FOLD_IN_GRAPHS (then the fold, on the plan's buffer for graphs); the same bits
    each way, replayed on new inputs."""
    from sharq.nn import SharQLinear

    monkeypatch.setattr(packed, "FOLD_IN_GRAPHS", in_graphs)
    folds, real = [], cuda_gemm.fold_launcher

    def counted(*args, **kwargs):
        run = real(*args, **kwargs)
        return None if run is None else (lambda x: (folds.append(x.shape), run(x))[1])

    monkeypatch.setattr(cuda_gemm, "fold_launcher", counted)
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, bias=False).to(torch.bfloat16).cuda()
    layer = SharQLinear.from_linear(base, "sharq")
    x = _x(1, 4096, 0).view(1, 1, 4096)
    with torch.no_grad():
        want = layer(x).clone()
        assert len(folds) == 1  # the eager call folds
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        assert len(folds) == 1 + in_graphs
        for seed in range(1, 3):
            x.copy_(_x(1, 4096, seed).view(1, 1, 4096))
            graph.replay()
            want = layer(x)
            _same_bits(y, want)
