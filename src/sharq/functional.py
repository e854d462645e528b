"""The forward of one quantized linear layer as models run it: the custom ops torch.compile sees, the
straight-through gradient, and `simulate_linear`. The backends themselves are in backends/."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import weakref
from collections.abc import Callable

import torch

from .backends import BACKENDS, WeightLayout, check_backend, get_backend, resolve_backend  # noqa: F401 - re-exported
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


def check_output_finite(y: torch.Tensor, where: str) -> None:
    """strict mode, after the layer: with finite inputs, a non-finite output means the result overflowed (the
    output dtype's range, or bf16's for recipes that round the input to bf16 unscaled; SPEC §8)."""
    bad = y.numel() - int(torch.isfinite(y).sum())
    if bad:
        raise ValueError(f"{where}: output has {bad} non-finite value(s) out of {y.numel()} although input and "
                         f"weight are finite: the result overflows {y.dtype} (or the input overflows bf16)")


# --- custom ops: what torch.compile sees ---------------------------------------------------------------------------
# The numerics depend on exact fp32 and bf16 roundings that inductor would fuse away (SPEC §3: bf16(X / s)). Under
# torch.compile a layer is two opaque ops, so compiled and eager runs compute the same bits; in eager mode the same
# functions are called directly, without the dispatcher's cost.
@functools.lru_cache(maxsize=256)
def _recipe(recipe_json: str) -> Recipe:
    return Recipe.from_dict(json.loads(recipe_json))


# (named sharq::prepare until its fake gave the packed backend's bf16 values as fp32: inductor then planned a
# buffer of twice their size on their storage; the new name keeps graphs cached with the old fake from being reused)
@torch.library.custom_op("sharq::prepare_activation", mutates_args=())
def _prepare_op(x2d: torch.Tensor, recipe: str, backend: str, channels: torch.Tensor | None,
                amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act = get_backend(backend).prepare(x2d, _recipe(recipe), channels, amax)
    dense = act.dense if act.dense is not None else x2d.new_empty(x2d.shape[0], 0, dtype=torch.float32)
    return act.values, act.scale, dense


@_prepare_op.register_fake
def _(x2d, recipe, backend, channels, amax):
    from .backends import simulator

    r = _recipe(recipe)
    # the fused kernel's bf16 values: the backends that prepare with it (triton, packed), where it runs the recipe;
    # a dtype other than the real op's would have inductor plan the buffer wrong
    from_kernel = get_backend(backend).prepare is simulator.prepare and channels is None and _kernel_supports(r)
    values = x2d.new_empty(x2d.shape, dtype=torch.bfloat16 if from_kernel else torch.float32)
    per_row = r.tensor_scale_per_row or any(s.block is None for s in r.stages)
    scale = x2d.new_empty((x2d.shape[0] if per_row else 1, 1), dtype=torch.float32)
    dense = x2d.new_empty((x2d.shape[0], 0 if channels is None else channels.numel()), dtype=torch.float32)
    return values, scale, dense


def _kernel_supports(recipe: Recipe) -> bool:
    from .kernels.prepare import supports

    return supports(recipe)


@torch.library.custom_op("sharq::matmul", mutates_args=())
def _matmul_op(values: torch.Tensor, scale: torch.Tensor, dense: torch.Tensor, weight_values: torch.Tensor | None,
               weight_codes: torch.Tensor | None, weight_scales: torch.Tensor | None, weight_scale: torch.Tensor,
               dense_weight: torch.Tensor | None, bias: torch.Tensor | None, layout: list[torch.Tensor],
               layout_meta: str, recipe: str, backend: str, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    r = _recipe(recipe)
    packed = None
    if weight_codes is not None:
        packed = QTensor(weight_codes, weight_scales, r.weight_fmt, r.weight_block, (n, values.shape[1]))
    act = QActivation((), values, scale, dense if dense_weight is not None else None)
    qweight = QWeight(weight_values, weight_scale, packed, None, dense_weight)
    return get_backend(backend).matmul(act, qweight, bias, out_dtype,
                                       WeightLayout(tuple(layout), layout_meta, (n, values.shape[1])) if layout
                                       else None)


@_matmul_op.register_fake
def _(values, scale, dense, weight_values, weight_codes, weight_scales, weight_scale, dense_weight, bias, layout,
      layout_meta, recipe, backend, n, out_dtype):
    return values.new_empty((values.shape[0], n), dtype=out_dtype)


@torch.library.custom_op("sharq::matmul_group", mutates_args=())
def _matmul_group_op(values: torch.Tensor, scale: torch.Tensor, codes: list[torch.Tensor],
                     scales: list[torch.Tensor], weight_scales: list[torch.Tensor],
                     biases: list[torch.Tensor | None], recipe: str, backend: str,
                     out_dtype: torch.dtype, layout_meta: str) -> list[torch.Tensor]:
    r, b = _recipe(recipe), get_backend(backend)
    act = QActivation((), values, scale)
    k = values.shape[1]
    if layout_meta:  # (codes, scales) of each layer's layout
        layouts = [WeightLayout((c, s), layout_meta, (c.shape[0], c.shape[1] * 2)) for c, s in zip(codes, scales)]
        qweights = [QWeight(None, s_w, None) for s_w in weight_scales]
    else:
        layouts = [None] * len(codes)
        qweights = [QWeight(None, s_w, QTensor(c, s, r.weight_fmt, r.weight_block, (c.shape[0], k)))
                    for c, s, s_w in zip(codes, scales, weight_scales)]
    plan = b.group_plan(qweights, biases, r, (values.shape[0],), out_dtype, layouts)
    if plan is not None:
        return plan.matmul(act)
    return [b.matmul(act, w, bias, out_dtype, layout) for w, bias, layout in zip(qweights, biases, layouts)]


@_matmul_group_op.register_fake
def _(values, scale, codes, scales, weight_scales, biases, recipe, backend, out_dtype, layout_meta):
    return [values.new_empty((values.shape[0], c.shape[0]), dtype=out_dtype) for c in codes]


# --- planned ops: a layer's eager launch plan under torch.compile ---------------------------------------------------
# Where the backend has eager plans, a compiled layer (or a group of layers that read one input) is one op that runs
# the plan the eager call runs, so compiled and eager calls make the same launches, including those whose
# activation layout belongs to the launch (the wgmma kernel's bulk copies). The op finds its layer by a handle (an
# int the trace holds as a constant) and is given the layer's weight tensors too: where the handle's layer no
# longer holds them (a graph traced on another model of the same structure), it runs prepare + matmul on the tensors
# it was given, which is what the plan computes, bit for bit (EagerPlan).
_PLANNED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def plan_handle(owner) -> int:
    """A new handle for `owner` (a layer, or the shared activation of a group): what the planned ops look it up by.
    Copies get handles of their own (their __setstate__), so a handle always names one object."""
    handle = next(_handles)
    _PLANNED[handle] = owner
    return handle


def _holds(tensors: list[torch.Tensor | None], given: list[torch.Tensor | None]) -> bool:
    """Whether the owner's weight tensors are the ones the op was given (same memory and shape)."""
    return len(tensors) == len(given) and all(
        (a is None) == (b is None) and (a is None or (a.data_ptr() == b.data_ptr() and a.shape == b.shape))
        for a, b in zip(tensors, given))


@torch.library.custom_op("sharq::planned_linear", mutates_args=())
def _planned_linear_op(x2d: torch.Tensor, weight_values: torch.Tensor | None, weight_codes: torch.Tensor | None,
                       weight_scales: torch.Tensor | None, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                       layout: list[torch.Tensor], layout_meta: str, recipe: str, backend: str, n: int,
                       handle: int) -> torch.Tensor:
    x2d = x2d.contiguous()
    layer = _PLANNED.get(handle)
    given = [weight_values, weight_codes, weight_scales, weight_scale, bias, *layout]
    if layer is not None and _holds(layer.plan_tensors(), given):
        plan = layer.eager_plan(x2d)
        if plan is not None:
            return plan(x2d)
    act = get_backend(backend).prepare(x2d, _recipe(recipe), None, None)
    return _matmul_op(act.values, act.scale, x2d.new_empty(x2d.shape[0], 0), weight_values, weight_codes,
                      weight_scales, weight_scale, None, bias, layout, layout_meta, recipe, backend, n, x2d.dtype)


@_planned_linear_op.register_fake
def _(x2d, weight_values, weight_codes, weight_scales, weight_scale, bias, layout, layout_meta, recipe, backend, n,
      handle):
    return x2d.new_empty((x2d.shape[0], n))


@torch.library.custom_op("sharq::planned_group", mutates_args=())
def _planned_group_op(x2d: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor],
                      weight_scales: list[torch.Tensor], biases: list[torch.Tensor | None], recipe: str, backend: str,
                      layout_meta: str, handle: int) -> list[torch.Tensor]:
    x2d = x2d.contiguous()
    shared = _PLANNED.get(handle)
    given = [t for member in zip(codes, scales, weight_scales, biases) for t in member]
    if shared is not None and _holds(shared.plan_tensors(), given):
        ys = shared.planned_outputs(x2d)
        if ys is not None:
            return ys
    act = get_backend(backend).prepare(x2d, _recipe(recipe), None, None)
    return _matmul_group_op(act.values, act.scale, codes, scales, weight_scales, biases, recipe, backend, x2d.dtype,
                            layout_meta)


@_planned_group_op.register_fake
def _(x2d, codes, scales, weight_scales, biases, recipe, backend, layout_meta, handle):
    return [x2d.new_empty((x2d.shape[0], c.shape[0])) for c in codes]


def planned_linear(x2d: torch.Tensor, tensors: list[torch.Tensor | None], layout_meta: str, recipe: Recipe,
                   backend: str, n: int, handle: int) -> torch.Tensor:
    """Under torch.compile: a layer's output [M, N] for x2d [M, K] by its eager plan, as one custom op; `tensors`
    its plan_tensors() (bf16 Ŵ, codes, scales, weight scale, bias, then its layout's tensors), `handle` its
    plan_handle."""
    values, codes, scales, weight_scale, bias, *layout = tensors
    return torch.ops.sharq.planned_linear(x2d, values, codes, scales, weight_scale, bias, layout, layout_meta,
                                          recipe.key, backend, n, handle)


def planned_group(x2d: torch.Tensor, tensors: list[torch.Tensor | None], layout_meta: str, recipe: Recipe,
                  backend: str, handle: int) -> list[torch.Tensor]:
    """Under torch.compile: the outputs of the layers that read x2d (a SharedActivation's) by their eager plans and
    group plan, as one custom op; `tensors` the group's plan_tensors() (codes, scales, weight scale, bias of each
    layer, codes and scales from its layout where it has one)."""
    codes, scales, weight_scales, biases = (tensors[i::4] for i in range(4))
    return torch.ops.sharq.planned_group(x2d, codes, scales, weight_scales, biases, recipe.key, backend, layout_meta,
                                         handle)


def matmul_group(act: QActivation, qweights: list[QWeight], biases: list[torch.Tensor | None],
                 out_dtype: torch.dtype, recipe: Recipe, backend: str,
                 layouts: list[WeightLayout | None] | None = None) -> list[torch.Tensor]:
    """The outputs of layers that read one activation (q/k/v, gate/up) with packed weights, from one launch where
    `backend`'s group plan has one (else one per layer): what SharedActivation.compiled_output calls once per group
    under torch.compile, as one custom op (the group plan gets the packed weights alone, or the layers' layouts of
    two tensors each, codes and scales, of one kind)."""
    if layouts and layouts[0] is not None:
        codes, scales = [layout.tensors[0] for layout in layouts], [layout.tensors[1] for layout in layouts]
        meta = layouts[0].meta
    else:
        codes, scales, meta = [w.packed.codes for w in qweights], [w.packed.scales for w in qweights], ""
    return torch.ops.sharq.matmul_group(act.values, act.scale, codes, scales, [w.scale for w in qweights], biases,
                                        recipe.key, backend, out_dtype, meta)


def prepare(x2d: torch.Tensor, recipe: Recipe, backend: str, channels: torch.Tensor | None = None,
            amax: torch.Tensor | None = None) -> QActivation:
    """The activation of x [M, K] as `backend` prepares it for `recipe`; `amax`: the whole input's, when x2d is a
    K-slice of it (Recipe.prepare_activation)."""
    if torch.compiler.is_compiling():
        values, scale, dense = torch.ops.sharq.prepare_activation(x2d, recipe.key, backend, channels, amax)
        return QActivation((), values, scale, dense if channels is not None else None)
    return get_backend(backend).prepare(x2d, recipe, channels, amax)


def matmul(act: QActivation, qweight: QWeight, bias: torch.Tensor | None, out_dtype: torch.dtype, recipe: Recipe,
           backend: str, layout: WeightLayout | None = None) -> torch.Tensor:
    """α · act · Ŵᵀ + bias [M, N] in out_dtype, as `backend` computes it (from its own weight layout, if any)."""
    if torch.compiler.is_compiling():
        dense = act.dense if act.dense is not None else act.values.new_empty(act.values.shape[0], 0)
        p = qweight.packed
        return torch.ops.sharq.matmul(act.values, act.scale, dense, qweight.values, None if p is None else p.codes,
                                      None if p is None else p.scales, qweight.scale, qweight.dense, bias,
                                      [] if layout is None else list(layout.tensors),
                                      "" if layout is None else layout.meta, recipe.key, backend,
                                      qweight.out_features if layout is None else layout.shape[0], out_dtype)
    return get_backend(backend).matmul(act, qweight, bias, out_dtype, layout)


# --- gradients -----------------------------------------------------------------------------------------------------
class _StraightThrough(torch.autograd.Function):
    """The quantized output y in the forward; in the backward, the gradients of x·Wᵀ + b (a straight-through
    estimator: the quantizers count as the identity). W is a tensor or a function that makes it on demand."""

    @staticmethod
    def forward(ctx, y, x, weight, weight_fn, bias):
        ctx.save_for_backward(x, weight)
        ctx.weight_fn, ctx.bias_dtype = weight_fn, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        w = weight if ctx.weight_fn is None else ctx.weight_fn()
        dx = (dy.float() @ w.float()).to(x.dtype) if ctx.needs_input_grad[1] else None
        dw = (dy.float().T @ x.float()).to(weight.dtype) if ctx.needs_input_grad[2] else None
        db = dy.float().sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[4] else None
        return None, dx, dw, None, db


def straight_through(y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | Callable[[], torch.Tensor],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (computed without autograd) carrying the straight-through gradient of x·Wᵀ + b to whichever of x, weight
    and bias require one. `weight` may be a function returning W (a layer's dequantized weight, made only when a
    backward runs). Without any gradient to carry, y itself."""
    params = (x2d, weight if isinstance(weight, torch.Tensor) else None, bias)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in params):
        return y
    if isinstance(weight, torch.Tensor):
        return _StraightThrough.apply(y, x2d, weight, None, bias)
    return _StraightThrough.apply(y, x2d, None, weight, bias)


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
    else; with strict=True they raise a ValueError instead, as does a result that overflows. backend="triton" runs
    the fused GPU kernel. Gradients (to x, weight and bias) are the straight-through ones of x·Wᵀ + b."""
    _check_inputs(x, weight, bias)
    if strict:
        check_finite(x, "simulate_linear")
        check_finite(weight, "simulate_linear", "weight")
    r = get_recipe(recipe)
    x2d = as_rows(x)
    with torch.no_grad():
        channels = r.select_channels(channel_stats) if channel_stats is not None else None
        act = prepare(x2d, r, backend, channels)
        qweight = r.prepare_weight(weight.detach(), channels)
        b = get_backend(backend)
        layout = b.to_layout(qweight.packed, qweight.scale, bias) if b.to_layout is not None else None
        y = matmul(act, qweight, bias, x.dtype, r, backend, layout)
    y = straight_through(y, x2d, weight, bias)
    if strict:
        check_output_finite(y, "simulate_linear")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def sharq_decompose(x: torch.Tensor, recipe: str | Recipe = "sharq") -> tuple[QTensor, QTensor, torch.Tensor]:
    """The two SharQ paths of x [..., K]: (Q(S) sparse backbone, Q(R) dense residual, activation scale s_x).

    deq(Q(S)) + deq(Q(R)), times s_x, is the activation the layer sees: both payloads dequantize to x's shape, and
    s_x ([..., 1] per token, else one value) broadcasts against it."""
    r = get_recipe(recipe)
    if len(r.stages) != 2 or r.stages[0].mask is None:
        raise ValueError(f"recipe {r.name!r} is not a sparse + residual recipe")
    act = r.prepare_activation(as_rows(x))
    sparse, residual = (dataclasses.replace(q, shape=tuple(x.shape)) for q in act.parts)
    lead = x.shape[:-1] if r.tensor_scale_per_row else (1,) * (x.dim() - 1)
    return sparse, residual, act.scale.reshape(*lead, 1)
