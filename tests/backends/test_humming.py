"""The humming backend (humming-kernels' mixed-input GEMM on sharq's NVFP4 payload), on a CUDA GPU with the
package installed: its layout turns back into the canonical payload exactly, its product is the exact product on
the dequantized Ŵ within the fp32-accumulation bound plus bf16's rounding of its stream-K partial sums and of the
output, and a model on it saves the payload it was quantized to."""

import pytest
import torch
import transformers

import sharq
from sharq.backends import available, humming

from ..conftest import outlier_activations
from ..kernels.test_gemm import _payload

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and available("humming")),
                                reason="needs a CUDA GPU and humming-kernels")


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4"])
@pytest.mark.parametrize("n,k", [(128, 128), (256, 576), (1024, 4096), (4096, 1536)])
def test_the_layout_gives_the_canonical_payload_back_exactly(recipe, n, k, rng):
    packed, sw, r = _payload(rng, n, k, recipe)
    p = sharq.quant.QTensor(packed.codes.cuda(), packed.scales.cuda(), r.weight_fmt, r.weight_block, (n, k))
    layout = humming.to_layout(p, sw.cuda(), None)
    codes, scales = humming.from_layout(layout, r.weight_block)
    assert torch.equal(codes.cpu(), packed.codes) and torch.equal(scales.cpu(), packed.scales)


INVARIANT = '{"use_batch_invariant": true}'


@pytest.mark.parametrize("mode", ["stream-k", "batch-invariant"])
@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "sharq-plus"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 1024), (5, 576, 256), (16, 1536, 4096), (33, 4096, 512),
                                   (300, 1024, 256), (2048, 512, 640)])
def test_the_product_is_exact_up_to_accumulation_and_bf16_rounding(mode, recipe, m, k, n, rng):
    """Against the exact product on the dequantized Ŵ. Batch-invariant mode (no split tiles) keeps the
    fp32-accumulation bound: a single wrong code or scale would exceed it. humming's default, stream-K, cuts an
    output tile's K range into slices (at most K/32: its K step for 16-bit activations is at least 32) that add
    up through the bf16 output, one rounding of the running sum each (2⁻⁹ of at most Σ|aŵ|): measured up to
    2.3 × 2⁻⁸·Σ|aŵ| beyond the fp32 bound (M = 33, K = 4096), so that bound is the one it can be held to."""
    packed, sw, r = _payload(rng, n, k, recipe)
    a = outlier_activations(rng, m, k).to(torch.bfloat16)
    sx = torch.rand(1, 1, generator=rng) + 0.01
    bias = torch.randn(n, generator=rng).to(torch.bfloat16) if m % 2 else None
    p = sharq.quant.QTensor(packed.codes.cuda(), packed.scales.cuda(), r.weight_fmt, r.weight_block, (n, k))
    layout = humming.to_layout(p, sw.cuda(), None if bias is None else bias.cuda())
    if mode == "stream-k":  # the backend's own call
        act = sharq.recipes.QActivation((), a.cuda(), sx.cuda())
        y = humming.matmul(act, sharq.recipes.QWeight(None, sw.cuda(), None), None, torch.bfloat16, layout).cpu()
    else:
        y = humming._gemm(layout, a.cuda(), (sx * sw).reshape(1).float().cuda(), INVARIANT).cpu()
    w = sharq.quant.dequantize_blocks(packed).double()
    alpha = (sx * sw).double()
    product = alpha * (a.double() @ w.T)
    exact = product + (0 if bias is None else bias.double())
    absolute = alpha * (a.double().abs() @ w.abs().T)
    slices = -(-k // 32) if mode == "stream-k" else 0
    # fp32 accumulation, the slices' roundings, bf16's rounding of the product before the bias and of the output
    bound = (k * 2.0**-23 + slices * 2.0**-9) * absolute + 2.0**-8 * (exact.abs() + product.abs()) + 1e-30
    err = (y.double() - exact).abs()
    assert y.dtype == torch.bfloat16 and bool((err <= bound).all()), f"max excess {(err / bound).max().item():.3g}"


def test_a_model_on_humming_runs_and_saves_the_payload_it_was_quantized_to(tmp_path, rng):
    """backend="humming" (opt-in) loads a checkpoint into humming's layout and saves the canonical payload back;
    a layer it does not take falls back to auto's choice, and so does the model moved off the GPU."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()  # as sharq.load builds it
    on_cpu = sharq.quantize_model(model, "sharq")
    state = {n: t.clone() for n, t in on_cpu.state_dict().items()}
    ids = torch.randint(0, 256, (2, 24), generator=rng)
    with torch.no_grad():
        cpu_logits = on_cpu(ids).logits
    sharq.save(on_cpu, tmp_path / "cpu")
    gpu = sharq.load(tmp_path / "cpu", dtype=torch.bfloat16, device="cuda", backend="humming")
    layers = [m for m in gpu.modules() if isinstance(m, sharq.SharQLinear)]
    assert {m.backend for m in layers} == {"humming"} and all(m.weight_codes is None for m in layers)
    with torch.no_grad():
        logits = gpu(ids.cuda()).logits
    assert torch.isfinite(logits).all()
    got = gpu.state_dict()
    assert all(torch.equal(got[n].cpu(), state[n]) for n in state)
    sharq.save(gpu, tmp_path / "ckpt")
    loaded = sharq.load(tmp_path / "ckpt", dtype=torch.bfloat16, device="cuda", backend="humming")
    with torch.no_grad():  # K ≤ 1024: humming splits no tile, so its outputs repeat
        assert torch.equal(loaded(ids.cuda()).logits, logits)
        assert torch.equal(sharq.load(tmp_path / "ckpt", dtype=torch.bfloat16)(ids).logits, cpu_logits)
    back = gpu.cpu()
    assert all(m.backend == "reference" and m.weight_codes is not None for m in back.modules()
               if isinstance(m, sharq.SharQLinear))
