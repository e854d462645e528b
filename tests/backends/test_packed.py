"""The packed backend's placed variant ("packed-placed", backends/packed.py): layers hold their NVFP4 codes in
kernels/placed.py's layout alone, compute what the packed backend computes, and give the canonical payload back.
On the CPU the kernels run in Triton's interpreter (the Triton kernels read the codes put back); on a GPU the
CUDA kernels read the placed codes themselves."""

import copy

import pytest
import torch
from torch import nn

import sharq
from sharq.kernels import gemm
from sharq.nn import SharQLinear

from ..conftest import outlier_activations

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bit for bit against the packed backend where both run the Triton kernels (on the CPU, in the interpreter); on a
# GPU the CUDA kernels add the placed pairs in another order (the last test)
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels in Triton's interpreter")


def _pair(linear: nn.Linear, recipe: str = "sharq") -> tuple[SharQLinear, SharQLinear]:
    """The same linear on the packed backend and on its placed variant."""
    return (SharQLinear.from_linear(copy.deepcopy(linear), recipe, backend="packed"),
            SharQLinear.from_linear(copy.deepcopy(linear), recipe, backend="packed-placed"))


@interpreter_only
def test_a_placed_layer_holds_the_layout_alone_and_computes_the_packed_backends_bits(rng):
    """The layer keeps the placed codes instead of the payload; its state dict is the packed layer's, bit for
    bit; its outputs are the packed layer's at decode sizes and above SMALL_M (the decode into the scratch
    weight), a bias included."""
    packed, placed = _pair(nn.Linear(128, 64))
    assert placed.backend == "packed-placed" and placed.weight_codes is None and placed._layout.meta == "placed"
    assert not torch.equal(placed._layout.tensors[0], packed.weight_codes)
    want, got = packed.state_dict(), placed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        for m in (1, 5, gemm.SMALL_M + 3):
            x = outlier_activations(rng, m, 128)
            assert torch.equal(placed(x), packed(x)), m


def test_placed_refuses_mxfp4_and_leaves_padded_layers_to_auto():
    """The placed layout is NVFP4's: MXFP4 weights are refused by name; a layer whose K needs padding to its
    block (K not a multiple of 32) is left to auto's choice, as a backend's `accepts` says."""
    with pytest.raises(ValueError, match="does not run recipe"):
        SharQLinear.from_linear(nn.Linear(64, 16), "mxfp4", backend="packed-placed")
    layer = SharQLinear.from_linear(nn.Linear(48, 16), "sharq", backend="packed-placed")
    assert layer.backend != "packed-placed" and layer._layout is None


@interpreter_only
def test_a_placed_model_compiles_saves_and_loads_bit_identical(rng, tmp_path):
    """A small Llama on packed-placed: its logits are the packed backend's, compiled too (q/k/v and gate/up through
    the group custom op with their layouts), and a save and load gives them back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    packed, placed = copy.deepcopy(model), copy.deepcopy(model)
    sharq.quantize_model(packed, "sharq", backend="packed")
    sharq.quantize_model(placed, "sharq", backend="packed-placed")
    ids = torch.randint(0, 64, (1, 5), generator=rng)
    with torch.no_grad():
        want = packed(ids).logits
        assert torch.equal(placed(ids).logits, want)
        compiled = torch.compile(packed, fullgraph=True)(ids).logits  # inductor's own ops round their way
        assert torch.equal(torch.compile(placed, fullgraph=True)(ids).logits, compiled)
    sharq.save(placed, tmp_path / "placed")
    loaded = sharq.load(tmp_path / "placed", backend="packed-placed")
    assert {m._layout.meta for m in loaded.modules() if isinstance(m, SharQLinear)} == {"placed"}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


@cuda_only
@pytest.mark.parametrize("m", [1, 16, 40, 100])
@pytest.mark.parametrize("recipe", ["sharq", "sharq-plus"])
def test_on_a_gpu_the_placed_kernels_agree_with_the_packed_ones(m, recipe):
    """The CUDA kernels read the placed codes themselves (decode kernel, wgmma kernel, the scratch decode above
    their tokens): the eager plan gives the general path's bits, and the output agrees with the packed backend's
    to the fp32 sums' order (the pairs of K the MMAs add first differ between the layouts)."""
    torch.manual_seed(m)
    packed, placed = _pair(nn.Linear(4096, 6144, device="cuda", dtype=torch.bfloat16), recipe)
    x = (torch.randn(m, 4096, device="cuda") * 3).to(torch.bfloat16)
    with torch.no_grad():
        assert placed.eager_plan(x) is not None
        got = placed(x)
        assert torch.equal(got, placed.multiply(placed.prepare(x), placed.bias, torch.bfloat16))
        want = packed(x).float()
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
