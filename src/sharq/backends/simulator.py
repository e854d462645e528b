"""The "triton" backend, the simulator `sharq eval` uses on CUDA: the fused activation kernel (kernels/prepare.py)
where the recipe allows (the reference preparation elsewhere), one cuBLAS GEMM on the exact bf16 Ŵ, and α and the
bias in one Triton pass (kernels/epilogue.py). As large as the bf16 model.

What is exact: the activation payloads (every stage's codes, block scales and mask, and s_x) and Ŵ are the
reference's bit for bit. What is bounded: the GEMM reads the payloads' dequantized sum rounded once to bf16 (exact
for one stage; a two-stage sum such as sharq's or dense-dense's may need more than bf16's 8 significant bits), it
accumulates in its own order, and a bf16 layer's GEMM rounds its output before α. So the output is not the
reference's bit for bit: an fp32 layer's is within (2⁻⁸ + 2K·2⁻²⁴)·|α|·Σₖ|x̂ₖŵₖ| of it (docs/PERF.md, "The layer",
**Numerics**; tests/kernels/test_prepare.py)."""

from __future__ import annotations

import torch

from ..recipes import QActivation, QWeight, Recipe
from . import Backend, reference, register


def prepare(x2d: torch.Tensor, recipe: Recipe, channels: torch.Tensor | None,
            amax: torch.Tensor | None = None) -> QActivation:
    """The fused kernel's activation, the stages' dequantized sum rounded once to bf16 (exact for one stage), and
    s_x (exact); the reference preparation where the kernel does not implement the recipe."""
    from ..kernels.prepare import prepare_dequantized, supports

    if channels is not None or not supports(recipe):
        return recipe.prepare_activation(x2d, channels, amax)
    values, scale = prepare_dequantized(x2d, recipe, out_dtype=torch.bfloat16, amax=amax)
    return QActivation((), values, scale)


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout=None) -> torch.Tensor:
    """The fused kernel's bf16 activation times the exact bf16 Ŵ: one cuBLAS GEMM with fp32 accumulation, then α
    and the bias in one Triton pass over the output, in place. A bf16 layer's GEMM rounds its output to bf16; any
    other layer's stays fp32 until α is applied, as the reference's does, and is then rounded to out_dtype: the
    unscaled product (codes times block scales) can exceed fp16's range where the scaled output does not."""
    if act.values.dtype != torch.bfloat16:  # a recipe the kernel does not implement: the reference preparation
        return reference.matmul(act, qweight, bias, out_dtype)
    from ..kernels.epilogue import scale_and_bias_
    from ..kernels.gemm import product

    y = scale_and_bias_(product(act.values, qweight.values.T, out_dtype), act.scale, qweight.scale, bias)
    return y.to(out_dtype)


register("triton", Backend(prepare, matmul, lambda r: True, keeps_values=True, runs_on=("cuda",), needs="triton",
                           install_hint="pip install 'sharq[gpu]' (or use backend='reference')"), auto_rank=2)
