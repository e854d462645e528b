"""The backend contract (sharq.backends): resolution, and a backend with a weight layout of its own — the layer
holds the layout instead of the canonical payload, and every way the state leaves the layer (state_dict, a move, a
cast, a load, a save) gives the canonical payload back bit for bit. Checked on the CPU with a toy layout backend
(rows reversed, scales transposed); humming's own layout on the GPU in test_humming.py."""

import pytest
import torch
import transformers

import sharq
from sharq import backends
from sharq.backends import Backend, WeightLayout, reference

from ..conftest import outlier_activations


def _to_layout(p, sw, bias):
    return WeightLayout((p.codes.flip(0).contiguous(), p.scales.T.contiguous()), "flipped", (p.shape[0],
                                                                                            p.codes.shape[1] * 2))


def _from_layout(layout, block):
    codes, scales = layout.tensors
    return codes.flip(0).contiguous(), scales.T.contiguous()


def _matmul(act, qweight, bias, out_dtype, layout):
    from sharq.quant import QTensor, dequantize_blocks

    codes, scales = _from_layout(layout, None)
    r = sharq.get_recipe("sharq")
    values = dequantize_blocks(QTensor(codes, scales, r.weight_fmt, r.weight_block, (codes.shape[0],
                                                                                      act.values.shape[1])))
    return reference.matmul(act, type(qweight)(values, qweight.scale, None), bias, out_dtype)


@pytest.fixture
def flipped(monkeypatch):
    """A registered toy backend whose layout is a permutation of the payload."""
    b = Backend(reference.prepare, _matmul, lambda r: r.name == "sharq", keeps_values=False, to_layout=_to_layout,
                from_layout=_from_layout)
    monkeypatch.setitem(backends.BACKENDS, "flipped", b)
    return "flipped"


def test_a_layer_holds_the_layout_and_gives_the_canonical_payload_back(flipped, rng):
    linear = torch.nn.Linear(96, 40)
    ref = sharq.SharQLinear.from_linear(linear, "sharq", backend="reference")
    layer = sharq.SharQLinear.from_linear(linear, "sharq", backend=flipped)
    assert layer.weight_codes is None and layer.weight_scales is None and layer.weight_values is None
    want = ref.state_dict()
    got = layer.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert layer.weight_bytes == ref.weight_bytes  # the toy layout is as large as the payload
    x = outlier_activations(rng, 5, 96)
    assert torch.equal(layer(x), ref(x))
    # a load goes into the canonical payload and is laid out again
    other = sharq.SharQLinear.from_linear(torch.nn.Linear(96, 40), "sharq", backend=flipped)
    other.load_state_dict(want)
    assert other.weight_codes is None and torch.equal(other(x), ref(x))
    # a cast keeps the payload exact and the layout; the canonical payload comes back for the state
    layer.to(torch.bfloat16)
    assert layer.weight_codes is None and layer.dtype == torch.bfloat16
    assert all(torch.equal(layer.state_dict()[n], want[n]) for n in want if n != "bias")
    assert torch.equal(layer.packed.codes, ref.weight_codes) and torch.equal(layer.packed.scales, ref.weight_scales)


def test_a_model_on_a_layout_backend_saves_and_loads_bit_identical(flipped, tmp_path, rng):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=rng)))
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (1, 12), generator=rng)
    model = sharq.quantize_model(base, "sharq", backend=flipped)
    assert all(m.weight_codes is None for m in model.modules() if isinstance(m, sharq.SharQLinear))
    with torch.no_grad():
        want = model(ids).logits
    sharq.save(model, tmp_path / "ckpt")
    loaded = sharq.load(tmp_path / "ckpt")  # on the CPU: the reference backend, from the canonical payload
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_auto_takes_the_first_installed_backend_that_runs_the_recipe_shape_and_dtype(monkeypatch):
    r = sharq.get_recipe("sharq")
    monkeypatch.setattr(backends, "available", lambda name: not name.startswith("packed"))
    assert backends.resolve_backend("auto", r, "cuda", (128, 64), torch.bfloat16) == "triton"
    monkeypatch.setattr(backends, "available", lambda name: True)
    # humming is installed and fits the layer, but its outputs vary from call to call: auto never takes it
    assert backends.resolve_backend("auto", r, "cuda", (128, 64), torch.bfloat16) == "packed-placed"
    assert backends.resolve_backend("auto", r, "cuda", (128, 48), torch.bfloat16) == "packed"  # K not a block's
    assert backends.resolve_backend("humming", r, "cuda", (128, 64), torch.bfloat16) == "humming"
    # a named backend leaves the layers and devices it does not take to auto's choice
    partial_tiles = backends.resolve_backend("humming", r, "cuda", (192, 64), torch.bfloat16)
    float32_out = backends.resolve_backend("humming", r, "cuda", (128, 64), torch.float32)  # humming writes bf16
    assert partial_tiles == float32_out == "packed-placed"
    assert backends.resolve_backend("humming", r, "cpu", (128, 64), torch.bfloat16) == "reference"
    token = sharq.get_recipe("sharq", scale_granularity="token")
    assert backends.resolve_backend("auto", token, "cuda", (128, 64), torch.bfloat16) == "packed-placed"
    assert backends.resolve_backend("auto", sharq.get_recipe("sharq-mxfp4"), "cuda", (128, 64)) == "packed"
    assert backends.resolve_backend("auto", sharq.get_recipe("hif4"), "cuda", (128, 64)) == "triton"
    assert backends.resolve_backend("auto", r, "cpu", (128, 64)) == "reference"


def test_check_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(backends, "available", lambda name: name != "humming")
    with pytest.raises(ValueError, match="backend 'humming' needs the humming package: pip install"):
        backends.check_backend("humming", "cuda")
    monkeypatch.setattr(backends, "available", lambda name: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA devices, not cpu"):
        backends.check_backend("humming", "cpu")
    backends.check_backend("reference", "cpu")


def test_a_move_that_changes_nothing_keeps_the_layout(flipped, monkeypatch):
    """model.to(its own device) (as quantize_model's last step does) leaves a laid-out layer alone: no round trip
    through the canonical payload; a cast of the compute dtype lays it out anew."""
    layer = sharq.SharQLinear.from_linear(torch.nn.Linear(64, 32), "sharq", backend=flipped)
    calls = []
    b = backends.BACKENDS[flipped]
    monkeypatch.setitem(backends.BACKENDS, flipped, type(b)(**{**b.__dict__, "from_layout": lambda *a: calls.append(
        1) or _from_layout(*a)}))
    layout = layer._layout
    layer.to("cpu")
    layer.float()
    assert layer._layout is layout and not calls
    layer.to(torch.bfloat16)
    assert layer._layout is not layout and calls


def test_the_packed_backend_refuses_nvfp4_weights_with_other_activations():
    """NVFP4 weights with MXFP4 activations (a recipe option) gave NaN on the packed backend: its small-M kernel
    multiplies NVFP4 weights in fp16, where an E8M0-scaled activation does not fit. It now refuses the recipe by
    name, and auto takes a backend that runs it."""
    packed = backends.get_backend("packed")
    mixed = sharq.get_recipe("mxfp4", weight_fmt="nvfp4", weight_block=16)
    assert not packed.supports(mixed)
    assert all(packed.supports(sharq.get_recipe(name)) for name in ("nvfp4", "sharq", "sharq-plus", "mxfp4",
                                                                     "sharq-mxfp4", "sparse-only", "dense-dense"))
    with pytest.raises(ValueError, match="backend 'packed' does not run recipe 'mxfp4'"):
        backends.resolve_backend("packed", mixed, "cuda", (64, 64), torch.bfloat16)
