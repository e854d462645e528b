"""The "reference" backend: pure torch on any device, every recipe; the numerics every other backend is tested
against (SPEC §5)."""

from __future__ import annotations

import torch

from ..recipes import QActivation, QWeight, Recipe
from . import Backend, register


def prepare(x2d: torch.Tensor, recipe: Recipe, channels: torch.Tensor | None,
            amax: torch.Tensor | None = None) -> QActivation:
    return recipe.prepare_activation(x2d, channels, amax)


def quantized_matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference product α · (Σ deq(Qᵢ)) · Ŵᵀ + bias, α = s_x · s_w, as one fp32 GEMM; returns fp32
    [M, N]."""
    y = (act.values.float() @ qweight.values.float().T) * (act.scale * qweight.scale)  # [1,1] or [M,1] × [] or [N]
    if act.dense is not None:  # outlier channels, in bf16
        y = y + act.dense @ qweight.dense.float().T
    return y if bias is None else y + bias.float()


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout=None) -> torch.Tensor:
    return quantized_matmul(act, qweight, bias).to(out_dtype)


register("reference", Backend(prepare, matmul, lambda r: True, keeps_values=True))
