"""The reference forward of one quantized linear layer (pure torch, any device)."""

from __future__ import annotations

import torch

from .quant import QTensor, as_rows
from .recipes import QActivation, QWeight, Recipe, get_recipe


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
    """α · (Σ deq(Qᵢ)) · Ŵᵀ + bias with fp32 accumulation, α = s_x · s_w; returns fp32 [M, N]."""
    alpha = act.scale * qweight.scale  # [1,1] or [M,1], times [] or [N]
    y = (act.values @ qweight.values.float().T) * alpha
    if act.dense is not None:  # outlier channels, in bf16
        y = y + act.dense @ qweight.dense.float().T
    return y if bias is None else y + bias.float()


def simulate_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str | Recipe = "sharq",
    channel_stats: torch.Tensor | None = None,
    strict: bool = False,
) -> torch.Tensor:
    """Y = x·Wᵀ + b with weights and activations quantized by `recipe` (SPEC §5). x [..., K], weight [N, K];
    the output has x's leading shape and dtype. Calibrated recipes (outlier-channels) need `channel_stats`, a
    per-input-channel statistic [K] such as sharq.calibrate records.

    Non-finite values make the rows (tokens) and columns (output channels) they touch NaN, and change nothing
    else; with strict=True they raise a ValueError instead."""
    _check_inputs(x, weight, bias)
    if strict:
        check_finite(x, "simulate_linear")
        check_finite(weight, "simulate_linear", "weight")
    r = get_recipe(recipe)
    channels = r.select_channels(channel_stats) if channel_stats is not None else None
    act = r.prepare_activation(as_rows(x), channels)
    y = quantized_matmul(act, r.prepare_weight(weight, channels), bias)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def sharq_decompose(x: torch.Tensor, recipe: str | Recipe = "sharq") -> tuple[QTensor, QTensor, torch.Tensor]:
    """The two SharQ paths of x [..., K]: (Q(S) sparse backbone, Q(R) dense residual, activation scale s_x).

    deq(Q(S)) + deq(Q(R)), times s_x, is the activation the layer sees."""
    r = get_recipe(recipe)
    if len(r.stages) != 2 or r.stages[0].mask is None:
        raise ValueError(f"recipe {r.name!r} is not a sparse + residual recipe")
    act = r.prepare_activation(as_rows(x))
    sparse, residual = act.parts
    return sparse, residual, act.scale
