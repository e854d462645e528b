"""The "packed" backend: real 4-bit inference with sharq's own kernels. The weight lives only as its packed payload
(4.25–4.5 bits per weight), decoded in registers by the CUDA kernels (kernels/cuda_gemm.py, cuda_wgmma.py) and
the Triton ones (kernels/gemm.py); for recipes whose weights are NVFP4 or MXFP4 in blocks of 16/32 and whose
activation cascade the fused kernel implements. It runs every such recipe at every shape and dtype, and is what
CPU CI runs in Triton's interpreter.

"packed-placed" is the same backend holding NVFP4 codes in kernels/placed.py's layout (each word's bits where the
decode wants them: 21–26 % fewer instructions a weight in the CUDA kernels' loops), made when a layer is built,
loaded or moved and put back for saves and exports (to_layout / from_layout). It is auto's first choice on CUDA
for the layers it takes (NVFP4 weights, K a multiple of 32; "packed" takes the rest): on an H200 its kernels take
2–12 % less time at 1–16 tokens (within 3 % at 64–256) and an 8B-shaped compiled decode is 4 % faster at batch 1
(docs/PERF.md, eighteenth run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ..quant import QTensor
from ..recipes import QActivation, QWeight, Recipe
from . import Backend, EagerPlan, GroupPlan, WeightLayout, register, simulator

PLACED = "placed"  # the layout's meta
# the decode kernel's launches prepare their activation themselves where they can (cuda_gemm.fold_launcher: one
# launch a layer where there were two) in eager calls, where each launch costs host time; inside a CUDA-graph
# capture (a graph replays its launches without host work) only with FOLD_IN_GRAPHS. Both read when a plan is
# made, so one process can time each way.
FOLD_PREPARE = True
FOLD_IN_GRAPHS = False


def supports(recipe: Recipe) -> bool:
    """NVFP4 weights only with NVFP4 activations: the small-M Triton kernel multiplies those in fp16, which holds
    an NVFP4 activation exactly, and another format's (an E8M0 scale's range) not."""
    from ..kernels.gemm import supports as gemm_supports
    from ..kernels.prepare import supports as prepare_supports

    return (gemm_supports(recipe.weight_fmt, recipe.weight_block) and prepare_supports(recipe)
            and (recipe.weight_fmt != "nvfp4" or all(s.fmt == "nvfp4" for s in recipe.stages)))


def _payload(qweight: QWeight, layout: WeightLayout | None) -> tuple[torch.Tensor, torch.Tensor, str, int, int, bool]:
    """(codes, scales, format, block, K, placed) of the weight: its canonical payload, or its placed layout."""
    if layout is None:
        p = qweight.packed
        return p.codes, p.scales, p.fmt, p.block_size, p.shape[1], False
    codes, scales = layout.tensors
    return codes, scales, "nvfp4", layout.shape[1] // scales.shape[1], layout.shape[1], True


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
           layout: WeightLayout | None = None) -> torch.Tensor:
    """The kernel's bf16 activation times the packed Ŵ, decoded in registers (kernels/gemm.py)."""
    from ..kernels.gemm import packed_matmul

    codes, scales, fmt, block, _, placed = _payload(qweight, layout)
    return packed_matmul(act.values, codes, scales, fmt, block, act.scale, qweight.scale, bias, out_dtype,
                         placed=placed)


def eager_plan(qweight: QWeight, bias: torch.Tensor | None, recipe: Recipe, lead: tuple[int, ...],
               x_dtype: torch.dtype, out_dtype: torch.dtype, layout: WeightLayout | None = None,
               own_input: bool = False) -> EagerPlan | None:
    """The fused prepare launch and the GEMM's, each worked out once, with packed_matmul's checks done here (the
    same kernels and launch shapes as prepare + matmul, the same bits): at decode sizes where the CUDA GEMM runs the
    weight, and above SMALL_M tokens the decode into the scratch weight + cuBLAS (prefill, whose eager calls were
    host-bound). None in between (the Triton kernels at up to SMALL_M tokens, on weights the CUDA GEMM does not
    take). With `own_input`, where the GEMM is a wgmma launch with a bulk-copy variant (cuda_wgmma.bulk_tile), the
    prepare writes the activation tiled and the GEMM takes it by bulk copies (cuda_gemm.bulk_launcher)."""
    from ..kernels import cuda_gemm
    from ..kernels import gemm as kg
    from ..kernels import prepare as kp

    if layout is None and qweight.packed is None or not kp.supports(recipe):
        return None
    codes, scales, fmt, block, k_logical, placed = _payload(qweight, layout)
    m, k = math.prod(lead), codes.shape[1] * 2
    if not codes.is_cuda or k_logical != k or bias is not None and bias.device != codes.device:
        return None
    sw, per_row, tiled = qweight.scale.reshape(-1), recipe.tensor_scale_per_row, None
    if own_input and (bulk := cuda_gemm.bulk_launcher(codes, scales, fmt, block, sw, bias, lead, per_row,
                                                      out_dtype, placed)):
        gemm, tokens = bulk
        tiled = (tokens, placed)
    else:
        gemm = cuda_gemm.launcher(codes, scales, fmt, block, sw, bias, lead, per_row, out_dtype, placed)
    if gemm is None and m > kg.SMALL_M and kg.supports(fmt, block):
        gemm = kg.decoded_launcher(codes, scales, fmt, block, qweight.scale, bias, out_dtype, lead, per_row, placed)
    if gemm is None:
        return None
    plan = EagerPlan(_prepare_launcher(recipe, m, k, x_dtype, codes.device, tiled),
                     lambda act: gemm(act.values, act.scale))
    folded = (cuda_gemm.fold_launcher(codes, scales, fmt, block, sw, bias, lead, recipe, out_dtype, placed)
              if FOLD_PREPARE and own_input and tiled is None and x_dtype == torch.bfloat16 else None)
    if folded is None:
        return plan
    return replace(plan, forward=_folded_forward(folded, lambda x: plan.matmul(plan.prepare(x))))


def _folded_forward(folded: Callable, unfolded: Callable) -> Callable:
    """A plan's forward: the folded launch, but the prepare's launch and the GEMM's (`unfolded`) for an input that
    is not 16-byte aligned (the fold reads x by 16 bytes) and, unless FOLD_IN_GRAPHS, inside a CUDA-graph capture,
    where a launch costs no host time and the prepare's already overlaps the GEMM's start: on an H100 the folds
    made an eager step 1-4 % faster, and in a graph the folded launch took 1.4-2.2 x the two launches' GPU time and
    a decode step 1.25 x as long (docs/PERF.md, thirty-eighth run)."""
    if FOLD_IN_GRAPHS:
        return lambda x: unfolded(x) if x.data_ptr() & 15 else folded(x)
    capturing = torch.cuda.is_current_stream_capturing
    return lambda x: unfolded(x) if x.data_ptr() & 15 or capturing() else folded(x)


def _prepare_launcher(recipe: Recipe, m: int, k: int, x_dtype: torch.dtype, device: torch.device,
                      tiled: tuple[int, bool] | None) -> Callable[[torch.Tensor], QActivation]:
    """x -> its QActivation by the fused prepare kernel's launch plan (`tiled`: in the wgmma kernel's layout)."""
    from ..kernels import prepare as kp

    run = kp.dequantized_launcher(recipe, m, k, x_dtype, device, tiled)

    def prepare(x: torch.Tensor) -> QActivation:
        values, scale, _ = run(x)
        return QActivation((), values, scale)

    return prepare


def group_plan(qweights: list[QWeight], biases: list[torch.Tensor | None], recipe: Recipe, lead: tuple[int, ...],
               out_dtype: torch.dtype, layouts: list[WeightLayout | None] | None = None,
               x_dtype: torch.dtype | None = None) -> GroupPlan | None:
    """Layers that read one activation (q/k/v, gate/up) in one launch of the CUDA GEMM (cuda_gemm.group_launcher),
    where it runs them: fewer launches at decode sizes, and no K split over blocks for narrow layers (k/v). With
    `x_dtype`, where the launch is a wgmma launch with a bulk-copy variant, the plan has its own prepare, which
    writes the activation tiled for the launch's bulk copies (cuda_gemm.bulk_group_launcher)."""
    from ..kernels import cuda_gemm

    layouts = layouts or [None] * len(qweights)
    if any(layout is None and w.packed is None for w, layout in zip(qweights, layouts)):
        return None
    weights = [_payload(w, layout) for w, layout in zip(qweights, layouts)]
    if len({(fmt, block, placed) for _, _, fmt, block, _, placed in weights}) != 1:
        return None
    _, _, fmt, block, k, placed = weights[0]
    args = ([(c, s, w.scale.reshape(-1)) for (c, s, *_), w in zip(weights, qweights)], biases, fmt, block, lead,
            recipe.tensor_scale_per_row, out_dtype, placed)
    bulk = cuda_gemm.bulk_group_launcher(*args) if x_dtype is not None else None
    if bulk is not None:
        run, tokens = bulk
        prepare = _prepare_launcher(recipe, math.prod(lead), k, x_dtype, weights[0][0].device, (tokens, placed))
        return GroupPlan(lambda act: run(act.values, act.scale), prepare)
    run = cuda_gemm.group_launcher(*args)
    if run is None:
        return None
    plan = GroupPlan(lambda act: run(act.values, act.scale))
    folded = (cuda_gemm.fold_group_launcher(*args[:5], recipe, out_dtype, placed)
              if FOLD_PREPARE and x_dtype == torch.bfloat16 else None)
    if folded is None:
        return plan
    prepare = _prepare_launcher(recipe, math.prod(lead), k, x_dtype, weights[0][0].device, None)
    return replace(plan, forward=_folded_forward(folded, lambda x: plan.matmul(prepare(x))))


def supports_placed(recipe: Recipe) -> bool:
    """The placed layout is NVFP4's."""
    return recipe.weight_fmt == "nvfp4" and supports(recipe)


def accepts_placed(n: int, k: int, dtype: torch.dtype) -> bool:
    """Layers whose K needs no padding to a block (a multiple of 32), so the layout's K is the layer's."""
    return k % 32 == 0


def to_layout(p: QTensor, sw: torch.Tensor, bias: torch.Tensor | None) -> WeightLayout:
    """The payload with its codes placed (kernels/placed.py); scales as they are."""
    from ..kernels.placed import place_codes

    return WeightLayout((place_codes(p.codes), p.scales), PLACED, (p.codes.shape[0], p.codes.shape[1] * 2))


def from_layout(layout: WeightLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical codes and scale codes back, exactly."""
    from ..kernels.placed import unplace_codes

    codes, scales = layout.tensors
    return unplace_codes(codes), scales


PACKED = Backend(simulator.prepare, matmul, supports, keeps_values=False, eager_plan=eager_plan,
                 group_plan=group_plan, runs_on=("cuda",), needs="triton",
                 install_hint="pip install 'sharq[gpu]' (or use backend='reference')")
register("packed", PACKED, auto_rank=1)
register("packed-placed", replace(PACKED, supports=supports_placed, accepts=accepts_placed, to_layout=to_layout,
                                  from_layout=from_layout), auto_rank=0)
