"""The "humming" backend: real 4-bit inference on humming-kernels (the vLLM project's JIT-compiled Marlin-class
mixed-input GEMMs, Apache-2.0, `pip install 'sharq[gpu]'`) — bf16 activations times E2M1 weights with UE4M3
group scales, decoded in registers and fed to the tensor cores, split over the multiprocessors (stream-K).

sharq's NVFP4 payload is ModelOpt's NVFP4 tensor layout (uint8 codes [N, K/2], low nibble first; UE4M3 scales
[N, K/16]; an fp32 tensor scale), so it goes in as it is: W32 blocks as W16 blocks with each scale repeated
(exact). humming re-lays the codes and scales for its kernel once (to_layout); that layout is a permutation of
the payload's nibbles and scale bytes, so from_layout recovers the canonical payload exactly (found by laying out
index-coded payloads, _positions). The activation is the fused kernel's (kernels/prepare.py), exact in bf16; α =
s_x · s_w goes in as the kernel's per-call tensor scale and the bias rides in the layout, so a layer is two
launches. Per-tensor activation scales only (per-token α has no slot); other layers use the "packed" backend.

Numerics: each product is exact and accumulates in fp32, but where stream-K cuts an output tile's K range into
slices over several multiprocessors (K > 1024), the slices add up through the bf16 output, one rounding of the
running sum each: |y − exact| stays within the fp32 bound plus (K/32)·2⁻⁹·|α|·Σ|a||ŵ| (measured: up to
2.3 × 2⁻⁸·|α|·Σ|a||ŵ|), and the result varies from call to call with the same input (the H200, 2026-12-02), so
a CUDA graph's tokens need not be the eager ones. humming's batch-invariant mode repeats its outputs and keeps
the fp32 bound but is 3–5 × slower at M ≤ 64 (docs/PERF.md). So humming is opt-in (backend="humming"), for
throughput at batch ≥ 8 and in prefill; "auto" takes the "packed" backend, which repeats its outputs bit for
bit and keeps the fp32 bound at every M.
"""

from __future__ import annotations

import functools

import torch

from ..quant import QTensor
from ..recipes import QActivation, QWeight, Recipe
from . import Backend, WeightLayout, packed, register, simulator

_NVFP4 = {"quant_method": "modelopt", "quant_algo": "nvfp4"}


def supports(recipe: Recipe) -> bool:
    """NVFP4 weights in blocks of 16 or 32, an activation the fused kernel prepares, and one activation scale per
    call (per-tensor granularity)."""
    return (recipe.weight_fmt == "nvfp4" and packed.supports(recipe)
            and not recipe.tensor_scale_per_row)


def accepts(n: int, k: int, dtype: torch.dtype) -> bool:
    """bf16 layers (the kernel writes bf16) whose N and K fill its tiles (128 output rows, 64 input columns)."""
    return dtype == torch.bfloat16 and n % 128 == 0 and k % 64 == 0


def _layer(codes: torch.Tensor, scales: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None):
    """humming's layer for a W16 payload, transformed to its kernel's layout on codes' device."""
    from humming.layer import HummingLayer

    n, kp = codes.shape[0], codes.shape[1] * 2
    with torch.cuda.device(codes.device):
        layer = HummingLayer(shape_n=n, shape_k=kp, weight_config=dict(_NVFP4), has_bias=bias is not None,
                             torch_dtype=torch.bfloat16)
        tensors = {"weight": codes, "weight_scale": scales.view(torch.float8_e4m3fn),
                   "weight_scale_2": sw.reshape(1).float()}
        if bias is not None:
            tensors["bias"] = bias.to(torch.bfloat16)
        layer.load_from_tensors(tensors)
        layer.to(codes.device)
        layer.transform()
    return layer


def _w16(p: QTensor) -> torch.Tensor:
    return p.scales if p.block_size == 16 else p.scales.repeat_interleave(2, dim=1)


def to_layout(p: QTensor, sw: torch.Tensor, bias: torch.Tensor | None) -> WeightLayout:
    layer = _layer(p.codes, _w16(p), sw, bias)
    empty = p.codes.new_empty(0)
    layout = WeightLayout((layer.weight.data, layer.weight_scale.data,
                           empty if bias is None else layer.bias.data, layer.locks), layer.humming_config.to_str(),
                          (p.codes.shape[0], p.codes.shape[1] * 2))
    x = torch.zeros(1, p.shape[1], dtype=torch.bfloat16, device=p.codes.device)
    _gemm(layout, x, torch.ones(1, device=x.device))  # compile now (once per shape and machine), not mid-decode
    return layout


@functools.lru_cache(maxsize=1)  # layers of one shape come one after another (4 bytes a weight, in host memory)
def _positions(n: int, kp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where humming's layout puts each nibble and each scale byte of an [n, kp] payload: index-coded payloads
    (4 bits of every nibble's index, 6 of every scale's, per pass) laid out on `device`, and the indices read
    back (kept on the CPU)."""
    nibbles, blocks = n * kp, n * kp // 16
    idx = torch.arange(nibbles, dtype=torch.int32, device=device)
    code_pos = torch.zeros(nibbles, dtype=torch.int32, device=device)
    scale_pos = torch.zeros(blocks, dtype=torch.int32, device=device)
    one = torch.ones(1, device=device)
    for shift in range(0, max(nibbles - 1, 1).bit_length(), 4):
        nib = ((idx >> shift) & 15).to(torch.uint8).view(n, kp)
        sidx = idx[:blocks] >> (shift // 4 * 6)
        scales = ((sidx & 63) + 0x20).to(torch.uint8).view(n, kp // 16)  # finite UE4M3 bytes
        layer = _layer((nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous(), scales, one, None)
        out = layer.weight.data.view(torch.uint8).flatten()
        code_pos |= torch.stack([out & 15, out >> 4], 1).flatten().to(torch.int32) << shift
        if shift // 4 * 6 < max(blocks - 1, 1).bit_length():
            scale_pos |= ((layer.weight_scale.data.view(torch.uint8).flatten().to(torch.int32) - 0x20) & 63) << (
                shift // 4 * 6)
    return code_pos.cpu(), scale_pos.cpu()


def from_layout(layout: WeightLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical codes [N, Kp/2] and scale codes [N, Kp/block] (uint8) of a layout made by to_layout."""
    n, kp = layout.shape
    weight, weight_scale = layout.tensors[:2]
    code_pos, scale_pos = _positions(n, kp, weight.device)
    raw = weight.view(torch.uint8).flatten()
    nibbles = torch.empty(n * kp, dtype=torch.uint8, device=weight.device)
    nibbles[code_pos.to(weight.device, torch.int64)] = torch.stack([raw & 15, raw >> 4], 1).flatten()
    nibbles = nibbles.view(n, kp)
    scales = torch.empty(n * kp // 16, dtype=torch.uint8, device=weight.device)
    scales[scale_pos.to(weight.device, torch.int64)] = weight_scale.view(torch.uint8).flatten()
    scales = scales.view(n, kp // 16)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous(), scales[:, :: block // 16].contiguous()


@functools.lru_cache(maxsize=None)
def _kernels(meta: str, compute: str | None, device: torch.device) -> torch.Tensor:
    """humming's launch table for a layer configuration on a device (its compiled kernels by M range): found once
    here, so a call is one launch of humming's C++ launcher, without re-resolving the configuration."""
    from humming.kernel.humming import HummingKernel

    return HummingKernel.prepare_kernels(meta, compute, None, device)


def _gemm(layout: WeightLayout, a: torch.Tensor, alpha: torch.Tensor, compute: str | None = None) -> torch.Tensor:
    """α · (a · Ŵᵀ) + the laid-out bias, bf16. `compute`: humming's compute configuration (JSON; None is its
    default, stream-K; '{"use_batch_invariant": true}' splits no tile, so the fp32 bound holds)."""
    from humming.ops.launcher import launch_kernel

    weight, weight_scale, bias, locks = layout.tensors
    return launch_kernel(configs=_kernels(layout.meta, compute, a.device), inputs=a, weight=weight,
                         weight_scale=weight_scale, weight_scale_2=alpha, bias=bias if bias.numel() else None,
                         locks=locks)


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout: WeightLayout | None = None) -> torch.Tensor:
    """α · (a · Ŵᵀ) + bias from humming's kernel (bf16 out: fp32 accumulation, α and the bias in fp32, one
    rounding); the bias is the one laid out with the weight."""
    if act.scale.numel() != 1:
        raise ValueError("the humming backend takes one activation scale per call (per-tensor granularity)")
    alpha = (act.scale.reshape(1) * qweight.scale.reshape(1)).float()
    y = _gemm(layout, act.values, alpha)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


# Not in "auto": its outputs vary from call to call (above), and sharq's default path repeats its outputs bit for
# bit (graph = eager, run = run); backend="humming" asks for it.
register("humming", Backend(simulator.prepare, matmul, supports, keeps_values=False, accepts=accepts,
                            to_layout=to_layout, from_layout=from_layout, runs_on=("cuda",), needs="humming",
                            install_hint="pip install 'sharq[gpu]' (humming-kernels)"))
