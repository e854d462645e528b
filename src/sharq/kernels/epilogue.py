"""The SharQ layer's epilogue in one pass over the GEMM output: y = (Σ_s partial_s)·α + bias, α = s_x·s_w.

cuBLAS (through torch) takes α only as a host number, and a torch elementwise op with the broadcast device
α runs far below bandwidth (its operands are not all contiguous, so it does not vectorize): on the H200 it cost
up to a third of a layer. α is s_x (one value or one per row) times s_w (one value or one per output column);
y·α + bias is one fused multiply-add in fp32, rounded once to the output's dtype. The same pass sums the fp32
partial products of a split-K GEMM (kernels/gemm.py) before scaling them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .common import cast_rne, flat_f32, require_cuda
from .launch import Constexprs, TritonLaunch, launch_triton

_BM, _BN = 32, 256  # rows x columns an epilogue program takes: the kernels' tile, and so their grids


@triton.jit
def _epilogue_tile(src_ptr, y_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, pid_n, stride_split, stride_sm, stride_ym,
                   SPLITS: tl.constexpr, SX_PER_ROW: tl.constexpr, SW_PER_COL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    src = src_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :]
    y = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    for s in range(1, SPLITS):  # split-K partials, summed in split order
        y += tl.load(src + s * stride_split, mask=inside, other=0.0)
    sx = tl.load(sx_ptr + rows, mask=rows < M, other=1.0)[:, None] if SX_PER_ROW else tl.load(sx_ptr)
    sw = tl.load(sw_ptr + cols, mask=cols < N, other=1.0)[None, :] if SW_PER_COL else tl.load(sw_ptr)
    alpha = sx * sw
    if HAS_BIAS:
        y = tl.fma(y, alpha, tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :])
    else:
        y = y * alpha
    ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(ptrs, cast_rne(y, y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _epilogue_kernel(src_ptr, y_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, stride_split, stride_sm, stride_ym,
                     SPLITS: tl.constexpr, SX_PER_ROW: tl.constexpr, SW_PER_COL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    _epilogue_tile(src_ptr, y_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, tl.program_id(1), stride_split, stride_sm,
                   stride_ym, SPLITS, SX_PER_ROW, SW_PER_COL, HAS_BIAS, BM, BN)


@triton.jit
def _group_epilogue_kernel(src0, src1, src2, y0, y1, y2, sx_ptr, sw0, sw1, sw2, bias0, bias1, bias2, M, N0, N1, N2,
                           SPLITS: tl.constexpr, SX_PER_ROW: tl.constexpr, SW_PER_COL: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # up to three layers' split-K partials ([SPLITS, M, N_i], contiguous) into their outputs [M, N_i] in one launch:
    # the column blocks of layer 0, then of layer 1, then of layer 2 (a layer of N_i = 0 has none)
    pid = tl.program_id(1)
    blocks0 = tl.cdiv(N0, BN)
    blocks1 = tl.cdiv(N1, BN)
    if pid < blocks0:
        _epilogue_tile(src0, y0, sx_ptr, sw0, bias0, M, N0, pid, M * N0, N0, N0, SPLITS, SX_PER_ROW, SW_PER_COL,
                       HAS_BIAS, BM, BN)
    elif pid < blocks0 + blocks1:
        _epilogue_tile(src1, y1, sx_ptr, sw1, bias1, M, N1, pid - blocks0, M * N1, N1, N1, SPLITS, SX_PER_ROW,
                       SW_PER_COL, HAS_BIAS, BM, BN)
    else:
        _epilogue_tile(src2, y2, sx_ptr, sw2, bias2, M, N2, pid - blocks0 - blocks1, M * N2, N2, N2, SPLITS,
                       SX_PER_ROW, SW_PER_COL, HAS_BIAS, BM, BN)


def _launch(src: torch.Tensor, y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
            splits: int) -> torch.Tensor:
    m, n = y.shape
    if y.stride(-1) != 1 or src.stride(-1) != 1:
        raise ValueError("the epilogue needs rows with unit stride")
    if m and n:
        sx, sw = flat_f32(sx), flat_f32(sw)
        launch_triton(_epilogue_kernel, (triton.cdiv(m, _BM), triton.cdiv(n, _BN)),
                      (src, y, sx, sw, bias if bias is not None else sx, m, n, src.stride(0) if splits > 1 else 0,
                       src.stride(-2), y.stride(0)),
                      _constexprs(splits, sx.numel() > 1, sw.numel() > 1, bias is not None))
    return y


@functools.lru_cache(maxsize=None)
def _constexprs(splits: int, sx_per_row: bool, sw_per_col: bool, has_bias: bool) -> Constexprs:
    return Constexprs(SPLITS=splits, SX_PER_ROW=sx_per_row, SW_PER_COL=sw_per_col, HAS_BIAS=has_bias, BM=_BM,
                      BN=_BN, num_warps=4)


def scale_and_bias_(y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """y [M, N] (bf16 or fp32, rows contiguous) ← y·(s_x·s_w) + bias, in place; returns y. s_x is [1, 1] or
    [M, 1], s_w [] / [1] or [N], bias [N] or None."""
    require_cuda(y, "scale_and_bias_", "it is the triton backend's epilogue")
    return _launch(y, y, sx, sw, bias, 1)


def scale_and_bias_launcher(m: int, n: int, sw: torch.Tensor, bias: torch.Tensor | None, sx_per_row: bool,
                            bound: bool = True) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """scale_and_bias_ for one layer's outputs [m, n] (contiguous) with its s_w (one value) and bias, worked out
    once: an eager layer's plan, whose caller guarantees a fresh output and s_x ([m, 1] if `sx_per_row`, else
    [1, 1]; fp32, contiguous). Returns (y, sx) -> y, its launch bound (TritonLaunch) unless `bound` is False (one
    call's)."""
    sw = flat_f32(sw)
    launch = TritonLaunch(_epilogue_kernel, (triton.cdiv(m, _BM), triton.cdiv(n, _BN)),
                          _constexprs(1, sx_per_row and m > 1, False, bias is not None), bound=bound)
    b = bias if bias is not None else sw

    def run(y: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        launch((y, y, sx, sw, b, m, n, 0, n, n))
        return y

    return run


def reduce_scale_and_bias(partials: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """(Σ_s partials[s])·(s_x·s_w) + bias in out_dtype, partials fp32 [S, M, N] (a split-K GEMM's)."""
    require_cuda(partials, "reduce_scale_and_bias", "it is the packed backend's epilogue")
    y = torch.empty(partials.shape[1:], dtype=out_dtype, device=partials.device)
    return _launch(partials, y, sx, sw, bias, partials.shape[0])


def reduce_scale_and_bias_launcher(splits: int, shapes: Sequence[tuple[int, ...]], sws: Sequence[torch.Tensor],
                                   biases: Sequence[torch.Tensor | None], sx_per_row: bool, out_dtype: torch.dtype,
                                   device: torch.device) -> Callable[[Sequence[torch.Tensor], torch.Tensor],
                                                                     list[torch.Tensor]]:
    """reduce_scale_and_bias for the 1-3 layers of one launch plan (a layer, or a group launch's layers, as q/k/v),
    worked out once, in one bound launch (TritonLaunch) whatever the number of layers: an eager plan's K-split
    epilogue, with no per-call checks. Each layer's y has shape shapes[i] ([*lead, N_i]) in out_dtype; its s_w is
    one value, the biases are all present or all None. The plan's calls pass its fp32 partials ([S, M, N_i] each,
    contiguous, M = prod(lead)) and s_x (fp32, contiguous; [M, 1] if `sx_per_row`, else [1, 1]) and get [y_i],
    each the bits reduce_scale_and_bias would give that layer alone."""
    if not 1 <= len(shapes) <= 3 or len({s[:-1] for s in shapes}) != 1 or not len(sws) == len(biases) == len(shapes):
        raise ValueError("reduce_scale_and_bias_launcher takes 1-3 layers of one [*lead], with an s_w and a bias "
                         "(or None) each")
    if len({b is None for b in biases}) != 1:
        raise ValueError("the group epilogue needs a bias for every layer or none")
    m, ns, pad = math.prod(shapes[0][:-1]), [s[-1] for s in shapes], 3 - len(shapes)
    sws = [flat_f32(sw) for sw in sws]
    grid = (triton.cdiv(m, _BM), sum(triton.cdiv(n, _BN) for n in ns))
    launch = TritonLaunch(_group_epilogue_kernel, grid,
                          _constexprs(splits, sx_per_row and m > 1, False, biases[0] is not None), bound=True)
    tail = (*sws, *sws[:1] * pad, *[sws[0] if b is None else b for b in biases], *sws[:1] * pad, m, *ns, *[0] * pad)

    def run(partials: Sequence[torch.Tensor], sx: torch.Tensor) -> list[torch.Tensor]:
        ys = [torch.empty(shape, dtype=out_dtype, device=device) for shape in shapes]
        if all(grid):
            launch((*partials, *partials[:1] * pad, *ys, *ys[:1] * pad, sx, *tail))
        return ys

    return run
