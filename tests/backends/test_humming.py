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


@pytest.mark.parametrize("recipe", ["sharq", "nvfp4", "sharq-plus"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 1024), (5, 576, 256), (16, 1536, 4096), (33, 4096, 512),
                                   (300, 1024, 256), (2048, 512, 640)])
def test_the_product_is_exact_up_to_accumulation_and_bf16_rounding(recipe, m, k, n, rng):
    packed, sw, r = _payload(rng, n, k, recipe)
    a = outlier_activations(rng, m, k).to(torch.bfloat16)
    sx = torch.rand(1, 1, generator=rng) + 0.01
    bias = torch.randn(n, generator=rng).to(torch.bfloat16) if m % 2 else None
    p = sharq.quant.QTensor(packed.codes.cuda(), packed.scales.cuda(), r.weight_fmt, r.weight_block, (n, k))
    layout = humming.to_layout(p, sw.cuda(), None if bias is None else bias.cuda())
    act = sharq.recipes.QActivation((), a.cuda(), sx.cuda())
    y = humming.matmul(act, sharq.recipes.QWeight(None, sw.cuda(), None), None, torch.bfloat16, layout).cpu()
    w = sharq.quant.dequantize_blocks(packed).double()
    alpha = (sx * sw).double()
    product = alpha * (a.double() @ w.T)
    exact = product + (0 if bias is None else bias.double())
    absolute = alpha * (a.double().abs() @ w.abs().T)
    # fp32 accumulation; bf16 roundings of the stream-K partial sums (each at most 2⁻⁹ of Σ|aŵ|; measured well
    # within two of them), of the product before the bias and of the output
    bound = k * 2.0**-23 * absolute + 2.0**-8 * absolute + 2.0**-8 * (exact.abs() + product.abs()) + 1e-30
    err = (y.double() - exact).abs()
    assert y.dtype == torch.bfloat16 and bool((err <= bound).all()), f"max excess {(err / bound).max().item():.3g}"


def test_a_model_on_humming_runs_and_saves_the_payload_it_was_quantized_to(tmp_path, rng):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()  # as sharq.load builds it
    on_cpu = sharq.quantize_model(model, "sharq")
    state = {n: t.clone() for n, t in on_cpu.state_dict().items()}
    gpu = on_cpu.cuda()
    layers = [m for m in gpu.modules() if isinstance(m, sharq.SharQLinear)]
    assert {m.backend for m in layers} == {"humming"} and all(m.weight_codes is None for m in layers)
    ids = torch.randint(0, 256, (2, 24), generator=rng).cuda()
    with torch.no_grad():
        logits = gpu(ids).logits
    assert torch.isfinite(logits).all()
    got = gpu.state_dict()
    assert all(torch.equal(got[n].cpu(), state[n]) for n in state)
    sharq.save(gpu, tmp_path / "ckpt")
    loaded = sharq.load(tmp_path / "ckpt", dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    back = gpu.cpu()
    assert all(m.backend == "reference" and m.weight_codes is not None for m in back.modules()
               if isinstance(m, sharq.SharQLinear))
