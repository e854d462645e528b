"""The "triton" backend (backends/simulator.py) against the reference backend. On the CPU its kernels run in
Triton's interpreter."""

import pytest
import torch

import sharq

from ..conftest import outlier_activations

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", ["nvfp4", "sparse-only", "sharq", "dense-dense"])
def test_an_fp16_layer_scales_before_rounding_to_fp16(name, rng):
    """The unscaled product of the payloads (codes times block scales, up to 2688² a term) overflows fp16 where
    the output does not: an fp16 layer is the fp32 layer's output rounded to fp16, finite, and for a one-stage
    recipe the reference's bits (in the interpreter, whose GEMM is the reference's fp32 one)."""
    x = outlier_activations(rng, 6, 128).half().to(DEVICE)
    w = (torch.randn(24, 128, generator=rng) / 16).half().to(DEVICE)
    b = torch.randn(24, generator=rng).half().to(DEVICE)
    recipe = sharq.get_recipe(name)
    act, qw = recipe.prepare_activation(x), recipe.prepare_weight(w)
    assert (act.values.float() @ qw.values.float().T).abs().max() > torch.finfo(torch.float16).max
    got = sharq.simulate_linear(x, w, b, recipe=name, backend="triton")
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    wide = sharq.simulate_linear(x.float(), w.float(), b.float(), recipe=name, backend="triton")
    assert torch.equal(got, wide.half())
    if DEVICE == "cpu" and len(recipe.stages) == 1:
        assert torch.equal(sharq.simulate_linear(x, w, recipe=name, backend="triton"),
                           sharq.simulate_linear(x, w, recipe=name))
