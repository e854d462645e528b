"""The reference forward of one quantized linear layer (pure torch, any device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .quant import QTensor, as_rows
from .recipes import QActivation, QWeight, Recipe, get_recipe


@dataclass(frozen=True)
class Backend:
    """How a quantized layer runs: `prepare` turns x [M, K] into a prepared activation, `matmul` multiplies it with
    the prepared weight, adds the bias and returns the given dtype. "reference" is pure torch on any device;
    "triton" runs the fused kernels where the recipe allows (and the reference preparation elsewhere)."""

    prepare: Callable[[torch.Tensor, Recipe, torch.Tensor | None], QActivation]
    matmul: Callable[[QActivation, QWeight, torch.Tensor | None, torch.dtype], torch.Tensor]


def _prepare_reference(x2d: torch.Tensor, recipe: Recipe, channels: torch.Tensor | None) -> QActivation:
    return recipe.prepare_activation(x2d, channels)


def _prepare_triton(x2d: torch.Tensor, recipe: Recipe, channels: torch.Tensor | None) -> QActivation:
    from .kernels.prepare import prepare_dequantized, supports

    if channels is not None or not supports(recipe):
        return recipe.prepare_activation(x2d, channels)
    values, scale = prepare_dequantized(x2d, recipe, out_dtype=torch.bfloat16)
    return QActivation((), values, scale)


BACKENDS: dict[str, Backend] = {}  # filled below; more can be registered


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x [..., K] and weight [N, K] disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


def check_finite(t: torch.Tensor, where: str, what: str = "input") -> None:
    """strict mode: raise, naming the layer and the count, instead of letting NaN/Inf flow on (SPEC §8)."""
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        raise ValueError(f"{where}: {what} has {bad} non-finite value(s) (NaN/Inf) out of {t.numel()}")


def quantized_matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference product α · (Σ deq(Qᵢ)) · Ŵᵀ + bias, α = s_x · s_w, as one fp32 GEMM; returns fp32
    [M, N]."""
    y = (act.values.float() @ qweight.values.float().T) * (act.scale * qweight.scale)  # [1,1] or [M,1] × [] or [N]
    if act.dense is not None:  # outlier channels, in bf16
        y = y + act.dense @ qweight.dense.float().T
    return y if bias is None else y + bias.float()


def _matmul_reference(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype
                      ) -> torch.Tensor:
    return quantized_matmul(act, qweight, bias).to(out_dtype)


def _matmul_bf16(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype
                 ) -> torch.Tensor:
    """The fused kernel's bf16 activation times the exact bf16 Ŵ: one cuBLAS GEMM (fp32 accumulation, output in
    out_dtype), then α and the bias in one Triton pass over the output, in place."""
    if act.values.dtype != torch.bfloat16:  # a recipe the kernel does not implement: the reference preparation
        return _matmul_reference(act, qweight, bias, out_dtype)
    from .kernels.epilogue import scale_and_bias_

    if out_dtype == torch.float32 and act.values.is_cuda:
        y = torch.mm(act.values, qweight.values.T, out_dtype=torch.float32)
    else:
        y = (act.values @ qweight.values.T).to(out_dtype)
    return scale_and_bias_(y, act.scale, qweight.scale, bias)


def simulate_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str | Recipe = "sharq",
    channel_stats: torch.Tensor | None = None,
    strict: bool = False,
    backend: str = "reference",
) -> torch.Tensor:
    """Y = x·Wᵀ + b with weights and activations quantized by `recipe` (SPEC §5). x [..., K], weight [N, K];
    the output has x's leading shape and dtype. Calibrated recipes (outlier-channels) need `channel_stats`, a
    per-input-channel statistic [K] such as sharq.calibrate records.

    Non-finite values make the rows (tokens) and columns (output channels) they touch NaN, and change nothing
    else; with strict=True they raise a ValueError instead. backend="triton" runs the fused GPU kernel."""
    _check_inputs(x, weight, bias)
    if strict:
        check_finite(x, "simulate_linear")
        check_finite(weight, "simulate_linear", "weight")
    r = get_recipe(recipe)
    channels = r.select_channels(channel_stats) if channel_stats is not None else None
    b = get_backend(backend)
    y = b.matmul(b.prepare(as_rows(x), r, channels), r.prepare_weight(weight, channels), bias, x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def sharq_decompose(x: torch.Tensor, recipe: str | Recipe = "sharq") -> tuple[QTensor, QTensor, torch.Tensor]:
    """The two SharQ paths of x [..., K]: (Q(S) sparse backbone, Q(R) dense residual, activation scale s_x).

    deq(Q(S)) + deq(Q(R)), times s_x, is the activation the layer sees."""
    r = get_recipe(recipe)
    if len(r.stages) != 2 or r.stages[0].mask is None:
        raise ValueError(f"recipe {r.name!r} is not a sparse + residual recipe")
    act = r.prepare_activation(as_rows(x))
    sparse, residual = act.parts
    return sparse, residual, act.scale


BACKENDS.update(reference=Backend(_prepare_reference, _matmul_reference), triton=Backend(_prepare_triton, _matmul_bf16))
