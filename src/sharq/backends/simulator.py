"""The "triton" backend, the exact simulator `sharq eval` uses on CUDA: the fused activation kernel
(kernels/prepare.py) where the recipe allows (the reference preparation elsewhere), one cuBLAS GEMM on the exact
bf16 Ŵ, and α and the bias in one Triton pass (kernels/epilogue.py). As large as the bf16 model."""

from __future__ import annotations

import torch

from ..recipes import QActivation, QWeight, Recipe
from . import Backend, reference, register


def prepare(x2d: torch.Tensor, recipe: Recipe, channels: torch.Tensor | None,
            amax: torch.Tensor | None = None) -> QActivation:
    """The fused kernel's bf16 activation (exact: SPEC §5) and s_x; the reference preparation where the kernel
    does not implement the recipe."""
    from ..kernels.prepare import prepare_dequantized, supports

    if channels is not None or not supports(recipe):
        return recipe.prepare_activation(x2d, channels, amax)
    values, scale = prepare_dequantized(x2d, recipe, out_dtype=torch.bfloat16, amax=amax)
    return QActivation((), values, scale)


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout=None) -> torch.Tensor:
    """The fused kernel's bf16 activation times the exact bf16 Ŵ: one cuBLAS GEMM (fp32 accumulation, output in
    out_dtype), then α and the bias in one Triton pass over the output, in place."""
    if act.values.dtype != torch.bfloat16:  # a recipe the kernel does not implement: the reference preparation
        return reference.matmul(act, qweight, bias, out_dtype)
    from ..kernels.epilogue import scale_and_bias_

    if out_dtype == torch.float32 and act.values.is_cuda:
        y = torch.mm(act.values, qweight.values.T, out_dtype=torch.float32)
    elif out_dtype == torch.float32:  # the CPU (Triton's interpreter) has no bf16 GEMM with an fp32 output: the
        # same in fp32 (bf16 products are exact there), not a bf16 output cast afterwards
        y = act.values.float() @ qweight.values.float().T
    else:
        y = (act.values @ qweight.values.T).to(out_dtype)
    return scale_and_bias_(y, act.scale, qweight.scale, bias)


register("triton", Backend(prepare, matmul, lambda r: True, keeps_values=True, runs_on=("cuda",), needs="triton",
                           install_hint="pip install 'sharq[gpu]' (or use backend='reference')"), auto_rank=2)
