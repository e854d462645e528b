"""The "packed" backend: real 4-bit inference with sharq's own Triton kernels. The weight lives only as its
canonical packed payload (4.25–4.5 bits per weight) and kernels/gemm.py decodes it in registers; for recipes
whose weights are NVFP4 or MXFP4 in blocks of 16/32 and whose activation cascade the fused kernel implements. It
runs every such recipe at every shape and dtype, and is what CPU CI runs in Triton's interpreter."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..recipes import QActivation, QWeight, Recipe
from . import Backend, EagerPlan, register, simulator


def supports(recipe: Recipe) -> bool:
    """NVFP4 weights only with NVFP4 activations: the small-M Triton kernel multiplies those in fp16, which holds
    an NVFP4 activation exactly, and another format's (an E8M0 scale's range) not."""
    from ..kernels.gemm import supports as gemm_supports
    from ..kernels.prepare import supports as prepare_supports

    return (gemm_supports(recipe.weight_fmt, recipe.weight_block) and prepare_supports(recipe)
            and (recipe.weight_fmt != "nvfp4" or all(s.fmt == "nvfp4" for s in recipe.stages)))


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout=None) -> torch.Tensor:
    """The kernel's bf16 activation times the packed Ŵ, decoded in registers (kernels/gemm.py)."""
    from ..kernels.gemm import packed_matmul

    p = qweight.packed
    return packed_matmul(act.values, p.codes, p.scales, p.fmt, p.block_size, act.scale, qweight.scale, bias,
                         out_dtype)


def eager_plan(qweight: QWeight, bias: torch.Tensor | None, recipe: Recipe, lead: tuple[int, ...],
               x_dtype: torch.dtype, out_dtype: torch.dtype) -> EagerPlan | None:
    """The fused prepare launch and the GEMM's, each worked out once, with packed_matmul's checks done here (the
    same kernels and launch shapes as prepare + matmul): at decode sizes where the CUDA GEMM runs the weight, and
    above SMALL_M tokens the decode into the scratch weight + cuBLAS (prefill, whose eager calls were host-bound).
    None in between (the Triton kernels at up to SMALL_M tokens, on weights the CUDA GEMM does not take)."""
    from ..kernels import cuda_gemm
    from ..kernels import gemm as kg
    from ..kernels import prepare as kp

    p, m = qweight.packed, math.prod(lead)
    if p is None or not kp.supports(recipe) or not p.codes.is_cuda:
        return None
    k = p.codes.shape[1] * 2
    if p.shape[1] != k or bias is not None and bias.device != p.codes.device:
        return None
    gemm = cuda_gemm.launcher(p.codes, p.scales, p.fmt, p.block_size, qweight.scale.reshape(-1), bias, lead,
                              recipe.tensor_scale_per_row, out_dtype)
    if gemm is None and m > kg.SMALL_M and kg.supports(p.fmt, p.block_size):
        gemm = kg.decoded_launcher(p.codes, p.scales, p.fmt, p.block_size, qweight.scale, bias, out_dtype, lead,
                                   recipe.tensor_scale_per_row)
    if gemm is None:
        return None
    run_prepare = kp.dequantized_launcher(recipe, m, k, x_dtype, p.codes.device)

    def prepare(x: torch.Tensor) -> QActivation:
        values, scale, _ = run_prepare(x)
        return QActivation((), values, scale)

    return EagerPlan(prepare, lambda act: gemm(act.values, act.scale))


def group_plan(qweights: list[QWeight], biases: list[torch.Tensor | None], recipe: Recipe, lead: tuple[int, ...],
               out_dtype: torch.dtype) -> Callable[[QActivation], list[torch.Tensor]] | None:
    """Layers that read one activation (q/k/v, gate/up) in one launch of the CUDA GEMM (cuda_gemm.group_launcher),
    where it runs them: fewer launches at decode sizes, and no K split over blocks for narrow layers (k/v)."""
    from ..kernels import cuda_gemm

    packed = [w.packed for w in qweights]
    if any(p is None or p.fmt != packed[0].fmt or p.block_size != packed[0].block_size for p in packed):
        return None
    run = cuda_gemm.group_launcher([(p.codes, p.scales, w.scale.reshape(-1)) for p, w in zip(packed, qweights)],
                                   biases, packed[0].fmt, packed[0].block_size, lead, recipe.tensor_scale_per_row,
                                   out_dtype)
    return None if run is None else lambda act: run(act.values, act.scale)


register("packed", Backend(simulator.prepare, matmul, supports, keeps_values=False, eager_plan=eager_plan,
                           group_plan=group_plan, runs_on=("cuda",), needs="triton",
                           install_hint="pip install 'sharq[gpu]' (or use backend='reference')"),
         auto_rank=1)
