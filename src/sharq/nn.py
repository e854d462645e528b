"""Modules that run quantized layers inside a model: SharQLinear (one nn.Linear) and SharQExperts (a fused MoE
experts block). Weights are prepared once; the activation is prepared per call by a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .backends import EagerPlan, GroupPlan, WeightLayout
from .functional import (
    check_finite,
    check_output_finite,
    get_backend,
    matmul,
    matmul_group,
    plan_handle,
    planned_group,
    planned_linear,
    prepare,
    resolve_backend,
    straight_through,
)
from .quant import QTensor, as_rows, dequantize_blocks, resolve_block
from .recipes import QActivation, QWeight, Recipe, get_recipe

_MAX_PLANS = 64  # eager launch plans a layer keeps (decode needs one per batch size; prefill one per prompt length)
_UNPLANNED = object()  # a shape whose eager plan is not made yet (None: the shape has none)


class SharedActivation:
    """Lets the layers of one block that read the same input (q/k/v in attention, gate/up in the MLP) prepare it
    once per call of the block, and, where their backend has a group plan (the packed backend at decode sizes),
    multiply it with all their weights in one launch: the first member called computes every member's output and
    the others take theirs.

    quantize_model opens and closes it around the block's forward (SharedBlockForward). In between, a member given
    the very tensor an earlier member prepared (same object, unchanged version) reuses that activation (or its
    output). Outside a block call (a layer run on its own) every layer prepares its own input; under torch.compile
    the members of a group with a group plan hand over their outputs in the trace (compiled_output), the others each
    prepare their own (each by one op running its eager plan, where its backend has them: SharQLinear.plannable).
    Nothing outlives the block call, so a later write to the tensor, even one that bypasses autograd's version
    counter, can never be missed."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.layers: list[SharQLinear] = []  # the members, as they are built (SharQLinear.__init__)
        self._group_plans: dict[tuple, GroupPlan | None] = {}
        self._open = False
        self._clear()
        self.plan_handle = plan_handle(self)  # what the compiled group op finds it by (functional.planned_group)

    def __getstate__(self):
        """Copies and pickles hold no plans (theirs name this group's tensors) and nothing of a block call."""
        state = dict(self.__dict__, _group_plans={}, _open=False)
        state.update(_x=None, _version=None, _act=None, _outputs={}, _served=0)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.plan_handle = plan_handle(self)

    def _clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._version: int | None = None
        self._act: QActivation | None = None
        self._outputs: dict[int, torch.Tensor] = {}  # a member's group_position -> its output from the group launch
        self._served = 0

    def open(self) -> None:
        """A call of the block begins."""
        self._open = True
        self._clear()

    def close(self) -> None:
        """A call of the block ended (also when its forward raised)."""
        self._open = False
        self._clear()

    def forget_plans(self) -> None:
        """A member's weight, bias or backend changed: group launches are worked out again."""
        self._group_plans = {}

    def _same_input(self, x: torch.Tensor) -> bool:
        """Whether x is the tensor this block call has seen (then it is served), else start over with x."""
        version = None if torch.is_inference(x) else x._version  # inference tensors have no version counter
        if self._x is x and self._version == version:
            return True
        self._clear()
        self._x, self._version = x, version
        return False

    def _release_if_done(self) -> None:
        self._served += 1
        if self._served == self.members:  # every member has it: release the memory now
            self._x, self._act, self._outputs = None, None, {}

    def get(self, x: torch.Tensor, prepare: Callable[[], QActivation]) -> QActivation:
        if not self._open or torch.compiler.is_compiling():
            return prepare()
        if not self._same_input(x) or self._act is None:
            self._act = prepare()
        act = self._act
        self._release_if_done()
        return act

    def output(self, layer: SharQLinear, x: torch.Tensor, plan: EagerPlan) -> torch.Tensor:
        """`layer`'s output [..., N] for x [..., K] by its eager plan: from the group launch where every member
        has an eager plan for x and their backend a group plan for them, else from the shared activation."""
        if not self._open:
            return plan(x)
        if self._same_input(x) and layer.group_position in self._outputs:
            y = self._outputs.pop(layer.group_position)
            self._release_if_done()
            return y
        group = self._group_plan(x) if not self._outputs else None
        if group is not None and group.prepare is not None and self._act is not None:
            group = None  # the input was prepared already (plainly): the members multiply it one by one
        if group is not None and group.forward is not None and self._act is None:
            ys = group.forward(x)  # one launch that prepares the activation itself
        else:
            if self._act is None:
                self._act = (plan.prepare if group is None or group.prepare is None else group.prepare)(x)
            if group is None:
                y = plan.matmul(self._act)
                self._release_if_done()
                return y
            ys = group.matmul(self._act)
        self._outputs = {i: out for i, out in enumerate(ys) if i != layer.group_position}
        self._release_if_done()
        return ys[layer.group_position]

    def _group_plan(self, x: torch.Tensor) -> GroupPlan | None:
        key = (x.shape, x.dtype, x.get_device())
        if key not in self._group_plans:
            layers = self.layers
            make = get_backend(layers[0].backend).group_plan
            same = all(m.backend == layers[0].backend and m.recipe.key == layers[0].recipe.key
                       and m.eager_plan(x) is not None for m in layers)
            self._group_plans[key] = None if make is None or len(layers) != self.members or not same else make(
                [m.forward_weight() for m in layers], [m.bias for m in layers], layers[0].recipe, x.shape[:-1],
                x.dtype, [m._layout for m in layers], x_dtype=x.dtype)
        return self._group_plans[key]

    def plan_tensors(self) -> list[torch.Tensor | None]:
        """Each member's codes, scales (its layout's, where it has one), weight scale and bias, in order: what the
        compiled group op is given (functional.planned_group)."""
        return [t for m in self.layers for t in (*(m._layout.tensors if m._layout is not None
                                                   else (m.weight_codes, m.weight_scales)), m.weight_scale, m.bias)]

    def planned_outputs(self, x2d: torch.Tensor) -> list[torch.Tensor] | None:
        """Every member's output for x2d [M, K] by the launches an eager block call makes (output): the group
        plan's, else each member's plan on the first member's activation; None where a member has no plan."""
        plans = [m.eager_plan(x2d) for m in self.layers]
        if len(plans) != self.members or any(p is None for p in plans):
            return None
        group = self._group_plan(x2d)
        if group is None:
            act = plans[0].prepare(x2d)
            return [p.matmul(act) for p in plans]
        if group.forward is not None:
            return group.forward(x2d)
        return group.matmul((group.prepare or plans[0].prepare)(x2d))

    def compiled_output(self, layer: SharQLinear, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile: `layer`'s output from the group's one custom op (functional.planned_group, which
        runs the members' eager plans and group plan where they may run them, SharQLinear.plannable; else
        functional.matmul_group on a prepared activation), called by the first member in the block call and taken
        by the others (the trace records the hand-over; the last member clears it, so nothing outlives the call);
        None outside a block call or where the members do not run as a group (a backend without a group plan,
        calibrated channels, layouts of the backend's own other than one kind of (codes, scales)). Unlike eagerly,
        an in-place write to x between members goes unseen here (a trace has no version counter); the model
        families quantize_model groups never write their block's input."""
        layers = self.layers
        # the members' weights: all canonical payloads, or all layouts of one kind made of (codes, scales)
        kinds = {None if m._layout is None else (m._layout.meta, len(m._layout.tensors)) for m in layers}
        if not self._open or len(layers) != self.members or get_backend(layer.backend).group_plan is None or any(
                m.backend != layer.backend or m.recipe.key != layer.recipe.key or m.channels is not None
                or m.in_features != layer.in_features for m in layers) or len(kinds) != 1 or (
                kinds.pop() or ("", 2))[1] != 2:
            return None
        if self._x is not x or not self._outputs:
            self._clear()
            if all(m.plannable(x) for m in layers):
                ys = planned_group(x2d, self.plan_tensors(), "" if layer._layout is None else layer._layout.meta,
                                   layer.recipe, layer.backend, self.plan_handle)
            else:
                ys = matmul_group(layer.prepare(x2d), [m.forward_weight() for m in layers], [m.bias for m in layers],
                                  x.dtype, layer.recipe, layer.backend, [m._layout for m in layers])
            self._x, self._outputs = x, dict(enumerate(ys))
        y = self._outputs[layer.group_position]
        self._release_if_done()
        return y


class SharedBlockForward:
    """A block's forward with its SharedActivation open around each call: what quantize_model sets as the block's
    `forward` attribute, which nn.Module's call takes in place of the class's forward. Forward hooks did the same,
    but a module with any hook takes nn.Module's slower call path: on an H100 the 64 blocks of an 8B-shaped model
    cost 0.8-1.1 ms more host time an eager decode step with no-op hooks than without (docs/PERF.md). `inner` is a
    forward the block had as an attribute before (an accelerate hook's), else the class's is called."""

    def __init__(self, block: nn.Module, shared: SharedActivation, inner: Callable | None = None) -> None:
        self.block, self.shared, self.inner = block, shared, inner

    def __call__(self, *args, **kwargs):
        shared = self.shared
        shared.open()
        try:
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.block).forward(self.block, *args, **kwargs)
        finally:
            shared.close()


def check_channel_stats(stats: torch.Tensor, in_features: int, name: str, weight_is_meta: bool = False) -> None:
    """A ValueError naming the layer unless `stats` are one layer's calibration statistics: a tensor of
    `in_features` finite, non-negative values (mean |x| per input channel, sharq.calibrate). Statistics on the meta
    device are placeholders for the structure a checkpoint fills, so only for a weight on the meta device too, and
    have only their shape to check (for a real weight they chose channels at random)."""
    if not isinstance(stats, torch.Tensor) or tuple(stats.shape) != (in_features,):
        got = f"shape {tuple(stats.shape)}" if isinstance(stats, torch.Tensor) else f"a {type(stats).__name__}"
        raise ValueError(f"{name}: calibration statistics: expected a tensor of {in_features} values (mean |x| per "
                         f"input channel, from sharq.calibrate), got {got}")
    if stats.is_meta:
        if not weight_is_meta:
            raise ValueError(f"{name}: calibration statistics are on the meta device: they hold no values")
        return
    check_finite(stats, name, "calibration statistics (mean |x| per channel)")
    negative = int((stats < 0).sum())
    if negative:
        raise ValueError(f"{name}: calibration statistics have {negative} negative value(s): a mean |x| is never "
                         "negative")


def _describe(fmt: str, block: int | None, recipe: str) -> str:
    """A weight format in words, for errors."""
    return f"{fmt} weights{f' in blocks of {block}' if block else ''} (recipe {recipe!r})"


def _refresh_after_load(layer: SharQLinear, _keys) -> None:
    """SharQLinear's load hook: a function of the module, not a lambda, so a quantized model pickles
    (torch.save(model))."""
    layer.refresh_values()


class SharQLinear(nn.Module):
    """A drop-in nn.Linear whose weight is quantized once and whose input is quantized on every call.

    The state (what a checkpoint stores, docs/FORMAT.md) is the packed payload: `weight_codes`, `weight_scales`
    (and HiF4's `weight_micro`), the output scale `weight_scale`, the bias and, for outlier-channels,
    `channels` and `dense_weight`. `weight_values`, the exact bf16 dequantization the simulating backends
    multiply, is derived from it, and held only while the layer's backend needs it: the packed backend reads the
    payload itself, so a layer on it holds 4.25–4.5 bits per weight. bf16 recipes store `weight_values` itself.

    `backend="auto"` is resolved for the device, shape and dtype of the layer, again whenever it moves or is cast
    (backends.resolve_backend): packed or triton on CUDA, reference elsewhere; a named backend runs where it
    runs and accepts the layer, auto's choice elsewhere; `model.cuda()` after quantizing on the CPU drops the
    bf16 Ŵ. A backend with a weight layout of its own (humming, opt-in) gets it once there,
    and the layer then holds that layout instead of the canonical payload: state_dict, saves, exports and moves
    turn it back into the canonical payload, exactly.

    The payload's dtypes are part of the format (PAYLOAD): `model.to(torch.bfloat16)` moves them but never casts
    them (a bf16 `weight_scale` would change every output); the bias follows the model's dtype. A backward pass
    gives the input the straight-through gradient of x·Ŵ_effᵀ (QWeight.effective); the weights are frozen."""

    PAYLOAD = ("weight_values", "weight_codes", "weight_scales", "weight_micro", "weight_scale", "channels",
               "dense_weight")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        recipe: Recipe,
        qweight: QWeight,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        shared: SharedActivation | None = None,
        strict: bool = False,
        name: str = "",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._run_weight: QWeight | None = None  # what forward multiplies, made once (forward_weight)
        self._plans: dict[tuple, EagerPlan | None] = {}  # eager launch plans by input shape, dtype, device
        self.in_features, self.out_features = in_features, out_features
        self.strict, self.name = strict, name or "SharQLinear"
        # the dtype the model computes in (what `model.to(dtype)` casts to): the payload's own dtypes never change
        self.dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
        self._layout: WeightLayout | None = None
        self.recipe = recipe
        recipe.key  # noqa: B018 - computed now, not while torch.compile traces the forward
        self.backend_choice = backend  # "auto" or a backend name; `backend` is what runs on the current device
        self.shared = shared
        if shared is not None:
            self.group_position = len(shared.layers)
            shared.layers.append(self)
        packed = qweight.packed
        self.register_buffer("weight_values", qweight.values, persistent=packed is None)
        self.register_buffer("weight_codes", None if packed is None else packed.codes)
        self.register_buffer("weight_scales", None if packed is None else packed.scales)
        self.register_buffer("weight_micro", None if packed is None else packed.micro)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("channels", qweight.channels)
        self.register_buffer("dense_weight", qweight.dense)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.plan_handle = plan_handle(self)  # what the compiled op finds it by (functional.planned_linear)
        self._configure()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: str | Recipe = "sharq",
        backend: str = "auto",
        channel_stats: torch.Tensor | None = None,
        shared: SharedActivation | None = None,
        strict: bool = False,
        name: str = "",
        **options,
    ) -> SharQLinear:
        """Prepare `linear`'s weight once. With strict=True, a non-finite weight (now) or input (per call) raises a
        ValueError naming the layer; without it, NaN/Inf flow on as NaN (SPEC §8). A weight on the meta device (the
        structure a checkpoint's payload then fills) has no values to check."""
        r = get_recipe(recipe, **options)
        if strict and not linear.weight.is_meta:
            check_finite(linear.weight, name or "SharQLinear", "weight")
        channels = None
        if r.needs_calibration and channel_stats is not None:
            check_channel_stats(channel_stats, linear.in_features, name or "SharQLinear", linear.weight.is_meta)
            channels = r.select_channels(channel_stats)
        with torch.no_grad():
            qweight = r.prepare_weight(linear.weight.detach(), channels)
        return cls(linear.in_features, linear.out_features, r, qweight, linear.bias, backend, shared, strict, name,
                   linear.weight.dtype)

    @property
    def packed(self) -> QTensor | None:
        """The canonical packed weight payload as a QTensor (None for bf16 weights); made from the backend's layout
        when the layer holds one."""
        r = self.recipe
        if self._layout is not None:
            codes, scales = get_backend(self.backend).from_layout(self._layout, r.weight_block)
        elif self.weight_codes is None:
            return None
        else:
            codes, scales = self.weight_codes, self.weight_scales
        return QTensor(codes, scales, r.weight_fmt, r.weight_block, (self.out_features, self.in_features),
                       micro=self.weight_micro)

    def __setattr__(self, name: str, value) -> None:
        if name in self.PAYLOAD or name in ("_layout", "bias", "backend", "recipe", "strict"):
            self._forget_runs()
        super().__setattr__(name, value)

    def __getstate__(self):
        """Copies and pickles hold no plans: a plan's launches name this layer's tensors, not the copy's."""
        state = super().__getstate__()
        state["_plans"] = {}
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.plan_handle = plan_handle(self)  # a copy's own

    def _forget_runs(self) -> None:
        """The weight forward multiplies and the eager launch plans are made anew (the payload, its layout, the
        bias, the backend or strictness changed)."""
        self.__dict__["_run_weight"] = None
        self.__dict__["_plans"] = {}
        if self.__dict__.get("shared") is not None:
            self.shared.forget_plans()

    def forward_weight(self) -> QWeight:
        """The weight as forward multiplies it (the backend's layout in place of the payload, if it has one), made
        once: an eager call then costs no attribute lookups of the payload (decode calls each layer per token).
        Made anew after any change of the payload or the layout (assignment, move, cast, load)."""
        w = self._run_weight
        if w is None:
            w = QWeight(self.weight_values, self.weight_scale, None if self._layout is not None else self.packed,
                        self.channels, self.dense_weight)
            if not torch.compiler.is_compiling():  # a trace builds it in the graph and keeps nothing
                self.__dict__["_run_weight"] = w
        return w

    @torch.no_grad()
    def _configure(self) -> None:
        """Resolve the backend for the layer's device, shape and dtype, and hold the weight the way it needs: the
        bf16 Ŵ (simulation), the canonical payload, or the backend's own layout in its place."""
        self._forget_runs()
        self.backend = resolve_backend(self.backend_choice, self.recipe, self.weight_scale.device,
                                       (self.out_features, self.in_features), self.dtype)
        if self.weight_codes is None:  # bf16 weights (Ŵ is the state itself), or already in the backend's layout
            return
        b = get_backend(self.backend)
        if not b.keeps_values:
            self.weight_values = None
        elif self.weight_values is None:
            self.weight_values = dequantize_blocks(self.packed).to(torch.bfloat16)
        if b.to_layout is not None and self.weight_scale.device.type != "meta":
            self._layout = b.to_layout(self.packed, self.weight_scale, self.bias)
            self.weight_codes = self.weight_scales = None

    @torch.no_grad()
    def _to_canonical(self) -> None:
        """Put the canonical payload back in place of the backend's layout (before a move, a cast or a load)."""
        if self._layout is not None:
            p = self.packed
            self._layout = None
            self.weight_codes, self.weight_scales = p.codes, p.scales

    @torch.no_grad()
    def refresh_values(self) -> None:
        """Derive what the payload determines again (after loading a state dict)."""
        if self.weight_codes is not None:
            self.weight_values = None
        self._configure()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight state the layer holds on its device: the packed payload (or the backend's layout of
        it), scales, bias; a derived bf16 Ŵ is not counted."""
        state = [t for n, t in self._buffers.items() if t is not None and n not in self._non_persistent_buffers_set]
        return sum(t.numel() * t.element_size() for t in state) + (self._layout.nbytes if self._layout else 0)

    @property
    def qweight(self) -> QWeight:
        """The layer's weight with its canonical payload."""
        return QWeight(self.weight_values, self.weight_scale, self.packed, self.channels, self.dense_weight)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, except that a dtype cast leaves the payload's dtypes alone (it still moves devices),
        and a backend's own weight layout is turned back into the payload first when the layer changes device or
        compute dtype (it is then configured anew for where it lands); otherwise the layout stays as it is."""
        device = self.weight_scale.device
        probe = fn(torch.empty(0, dtype=self.dtype, device=device))
        if probe.device != device or probe.dtype != self.dtype:
            self._to_canonical()
        self.dtype = probe.dtype
        before = {n: t for n, t in self._buffers.items() if n in self.PAYLOAD and t is not None}
        super()._apply(fn, recurse)
        for name, t in before.items():
            if self._buffers[name].dtype != t.dtype:
                self._buffers[name] = t.to(self._buffers[name].device)
        self._configure()
        return self

    def _weight_format(self) -> tuple[str, int | None, str]:
        """What the payload's codes and scales mean (the weight format and its block size), and the recipe's name."""
        r = self.recipe
        return r.weight_fmt, None if r.weight_fmt == "bf16" else resolve_block(r.weight_fmt, r.weight_block), r.name

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The state with the canonical payload, also while the layer holds a backend's layout (docs/FORMAT.md).
        The state dict's metadata records the weight format, which a load checks: payloads of two formats can have
        the same shapes and dtypes (NVFP4 and MXFP4 in blocks of 32), and would load as the wrong numbers."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout is not None:
            p = self.packed
            destination[prefix + "weight_codes"], destination[prefix + "weight_scales"] = p.codes, p.scales
        metadata = getattr(destination, "_metadata", {}).get(prefix[:-1])
        if metadata is not None:
            metadata["sharq_weight_format"] = self._weight_format()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuses a state dict whose metadata records another weight format (one without metadata, as read from a
        file, is checked by its shapes and dtypes alone: checkpoints carry their recipe in their config)."""
        saved, own = local_metadata.get("sharq_weight_format"), self._weight_format()
        if saved is not None and tuple(saved[:2]) != own[:2]:
            error_msgs.append(f"{self.name}: the state dict holds {_describe(*saved)}, this layer {_describe(*own)}: "
                              "quantize with the state dict's recipe to load it")
            return
        self._to_canonical()  # the payload's buffers take the loaded tensors; the load hook configures again
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def prepare(self, x2d: torch.Tensor, amax: torch.Tensor | None = None) -> QActivation:
        """The activation of x [M, K] (`amax`: the whole input's, when x2d is a K-slice of it; Recipe)."""
        return prepare(x2d, self.recipe, self.backend, self.channels, amax)

    def multiply(self, act: QActivation, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """α · act · Ŵᵀ + bias [M, N] in out_dtype: forward's second half, for layers that share one prepared
        activation (a serving engine's fused q/k/v) or add the bias elsewhere."""
        return matmul(act, self.forward_weight(), bias, out_dtype, self.recipe, self.backend, self._layout)

    def plan_tensors(self) -> list[torch.Tensor | None]:
        """The bf16 Ŵ, codes, scales, weight scale and bias (each where the layer holds it), then the layout's
        tensors: what the compiled op is given (functional.planned_linear)."""
        return [self.weight_values, self.weight_codes, self.weight_scales, self.weight_scale, self.bias,
                *(() if self._layout is None else self._layout.tensors)]

    def _may_plan(self, x: torch.Tensor) -> bool:
        """Whether the layer and a call on x allow an eager plan at all: no strict checks, no calibrated channels, a
        floating-point input of 16 bits or more (as_rows refuses the others) and no gradient to carry."""
        return (not self.strict and self.channels is None and x.is_floating_point() and x.element_size() >= 2
                and not (x.requires_grad and torch.is_grad_enabled()))

    def plannable(self, x: torch.Tensor) -> bool:
        """Whether a call on x may run the eager plan (what eager_plan asks of the call but the trace and x's
        layout), on the layer's device with a backend that has plans: under torch.compile such a call is one op
        running it (functional.planned_linear), so compiled and eager calls make the same launches."""
        return (self._may_plan(x) and x.device == self.weight_scale.device
                and get_backend(self.backend).eager_plan is not None)

    def eager_plan(self, x: torch.Tensor) -> EagerPlan | None:
        """The backend's launch plan for an eager call on x (EagerPlan), made at the first call of its shape, dtype
        and device; None where the call needs the general path: a trace, strict checks, a gradient to carry, an
        input that is not contiguous, not floating-point or not on the layer's device, calibrated channels, or a
        backend without one."""
        # what depends on the call alone is checked each call; what depends on the layer and x's shape, dtype and
        # device (strictness, channels, a floating-point x: _may_plan) once, when the plan for them is made (any
        # change of the layer's forgets its plans, _forget_runs)
        if torch.compiler.is_compiling() or not x.is_contiguous() or x.requires_grad and torch.is_grad_enabled():
            return None
        key = (x.shape, x.dtype, x.get_device())
        plans = self.__dict__["_plans"]
        plan = plans.get(key, _UNPLANNED)
        if plan is _UNPLANNED:
            if len(plans) >= _MAX_PLANS:  # prefill makes one per prompt length: keep the memory bounded
                plans.clear()
            make = get_backend(self.backend).eager_plan
            weight = self.forward_weight()
            plan = plans[key] = None if (make is None or x.device != weight.scale.device
                                         or not self._may_plan(x)) else make(
                weight, self.bias, self.recipe, x.shape[:-1], x.dtype, x.dtype, self._layout,
                own_input=self.shared is None)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        plan = self.eager_plan(x)
        if plan is not None:  # a plan reads x as it is and writes y [..., N]: no views to make per call
            return plan(x) if self.shared is None else self.shared.output(self, x, plan)
        weight = self.forward_weight()
        if x.device != weight.scale.device:
            raise ValueError(f"{self.name}: input is on {x.device} but the layer is on {weight.scale.device}")
        if self.strict:
            check_finite(x, self.name)
        x2d = as_rows(x)
        with torch.no_grad():
            y = None
            if torch.compiler.is_compiling():
                if self.shared is not None:
                    y = self.shared.compiled_output(self, x, x2d)
                if y is None and self.plannable(x):
                    y = planned_linear(x2d, self.plan_tensors(), "" if self._layout is None else self._layout.meta,
                                       self.recipe, self.backend, self.out_features, self.plan_handle)
            if y is None:
                act = self.prepare(x2d) if self.shared is None else self.shared.get(x, lambda: self.prepare(x2d))
                y = self.multiply(act, self.bias, x.dtype)
        y = straight_through(y, x2d, lambda: self.qweight.effective())
        if self.strict:
            check_output_finite(y, self.name)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}, "
                f"backend={self.backend}, bias={self.bias is not None}")


class SharQExperts(nn.Module):
    """A fused MoE experts block (transformers' 3-D `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] layout,
    as in Qwen3-MoE and Mixtral) with every expert's two linears quantized. Same forward contract as the block it
    replaces: (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]."""

    def __init__(self, experts: nn.Module, recipe: str | Recipe = "sharq", backend: str = "auto",
                 strict: bool = False, name: str = "experts", **options):
        super().__init__()
        r = get_recipe(recipe, **options)
        if r.needs_calibration:
            raise ValueError(f"recipe {r.name!r} needs per-linear calibration, which fused MoE experts do not have")
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_fn = experts.act_fn
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()
        for e in range(self.num_experts):
            gate_up = _linear_from(experts.gate_up_proj[e], getattr(experts, "gate_up_proj_bias", None), e)
            down = _linear_from(experts.down_proj[e], getattr(experts, "down_proj_bias", None), e)
            self.gate_up.append(SharQLinear.from_linear(gate_up, r, backend, strict=strict, name=f"{name}.{e}.gate_up"))
            self.down.append(SharQLinear.from_linear(down, r, backend, strict=strict, name=f"{name}.{e}.down"))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, expert: int) -> nn.Linear:
    """A throw-away nn.Linear view of one expert's weight, so experts go through the same preparation."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias[expert].detach(), requires_grad=False)
    return linear
