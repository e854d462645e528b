"""The "packed" backend: real 4-bit inference with sharq's own Triton kernels. The weight lives only as its
canonical packed payload (4.25–4.5 bits per weight) and kernels/gemm.py decodes it in registers; for recipes
whose weights are NVFP4 or MXFP4 in blocks of 16/32 and whose activation cascade the fused kernel implements. It
runs every such recipe at every shape and dtype, and is what CPU CI runs in Triton's interpreter."""

from __future__ import annotations

import torch

from ..recipes import QActivation, QWeight, Recipe
from . import Backend, register, simulator


def supports(recipe: Recipe) -> bool:
    from ..kernels.gemm import supports as gemm_supports
    from ..kernels.prepare import supports as prepare_supports

    return gemm_supports(recipe.weight_fmt, recipe.weight_block) and prepare_supports(recipe)


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout=None) -> torch.Tensor:
    """The kernel's bf16 activation times the packed Ŵ, decoded in registers (kernels/gemm.py)."""
    from ..kernels.gemm import packed_matmul

    p = qweight.packed
    return packed_matmul(act.values, p.codes, p.scales, p.fmt, p.block_size, act.scale, qweight.scale, bias,
                         out_dtype)


register("packed", Backend(simulator.prepare, matmul, supports, keeps_values=False, runs_on=("cuda",),
                           needs="triton", install_hint="pip install 'sharq[gpu]' (or use backend='reference')"),
         auto_rank=1)
