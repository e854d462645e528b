import pytest
import torch
from torch import nn

import sharq
from sharq.nn import SharedActivation, SharQLinear

from .conftest import outlier_activations


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


def test_device_mismatch_is_a_clear_error():
    layer = SharQLinear.from_linear(nn.Linear(16, 4), "nvfp4", name="proj")
    with pytest.raises(ValueError, match="proj: input is on meta but the layer is on cpu"):
        layer(torch.empty(2, 16, device="meta"))
    with pytest.raises(ValueError, match=r"proj: expected input \[\.\.\., 16\]"):
        layer(torch.randn(2, 15))
    with pytest.raises(ValueError, match="unknown backend"):
        SharQLinear.from_linear(nn.Linear(16, 4), "nvfp4", backend="cuda-magic")


def test_shared_activation_is_released_and_recomputed_on_change(rng):
    shared = SharedActivation(2)
    calls = []
    prepare = lambda: calls.append(1) or object()  # noqa: E731
    x = torch.randn(3, 4, generator=rng)
    a = shared.get(0, x, prepare)
    assert shared.get(1, x, prepare) is a and len(calls) == 1
    assert shared._act is None  # every member served: nothing held
    shared.get(0, x, prepare)
    x.add_(1)  # modified in place: must not reuse
    shared.get(1, x, prepare)
    assert len(calls) == 3
