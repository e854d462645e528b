"""Modules that run quantized layers inside a model: SharQLinear (one nn.Linear) and SharQExperts (a fused MoE
experts block). Weights are prepared once; the activation is prepared per call by a backend."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .functional import (
    check_finite,
    check_output_finite,
    get_backend,
    matmul,
    prepare,
    resolve_backend,
    straight_through,
)
from .quant import QTensor, as_rows, dequantize_blocks
from .recipes import QActivation, QWeight, Recipe, get_recipe


class SharedActivation:
    """Lets the layers of one block that read the same input (q/k/v in attention, gate/up in the MLP) prepare it
    once per call of the block.

    quantize_model hooks `open` and `close` around the block's forward. In between, a member given the very tensor
    an earlier member prepared (same object, unchanged version) reuses that activation. Outside a block call (a
    layer run on its own) and under torch.compile (which deduplicates the pure prepare op itself), every layer
    prepares its own input. Nothing outlives the block call, so a later write to the tensor, even one that
    bypasses autograd's version counter, can never be missed."""

    def __init__(self, members: int) -> None:
        self.members = members
        self._open = False
        self._clear()

    def _clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._version: int | None = None
        self._act: QActivation | None = None
        self._served = 0

    def open(self, _block: nn.Module, _args) -> None:
        """The block's forward pre-hook."""
        self._open = True
        self._clear()

    def close(self, _block: nn.Module, _args, _output) -> None:
        """The block's forward hook (always called, also when the forward raises)."""
        self._open = False
        self._clear()

    def get(self, x: torch.Tensor, prepare: Callable[[], QActivation]) -> QActivation:
        if not self._open or torch.compiler.is_compiling():
            return prepare()
        version = None if torch.is_inference(x) else x._version  # inference tensors have no version counter
        if self._x is not x or self._version != version:
            self._clear()
            self._x, self._version, self._act = x, version, prepare()
        self._served += 1
        act = self._act
        if self._served == self.members:  # every member has it: release the memory now
            self._x, self._act = None, None
        return act


def check_channel_stats(stats: torch.Tensor, in_features: int, name: str) -> None:
    """A ValueError naming the layer unless `stats` are one layer's calibration statistics: a tensor of
    `in_features` finite, non-negative values (mean |x| per input channel, sharq.calibrate). Statistics on the meta
    device (placeholders for the structure a checkpoint fills) have only their shape to check."""
    if not isinstance(stats, torch.Tensor) or tuple(stats.shape) != (in_features,):
        got = f"shape {tuple(stats.shape)}" if isinstance(stats, torch.Tensor) else f"a {type(stats).__name__}"
        raise ValueError(f"{name}: calibration statistics: expected a tensor of {in_features} values (mean |x| per "
                         f"input channel, from sharq.calibrate), got {got}")
    if stats.is_meta:
        return
    check_finite(stats, name, "calibration statistics (mean |x| per channel)")
    negative = int((stats < 0).sum())
    if negative:
        raise ValueError(f"{name}: calibration statistics have {negative} negative value(s): a mean |x| is never "
                         "negative")


class SharQLinear(nn.Module):
    """A drop-in nn.Linear whose weight is quantized once and whose input is quantized on every call.

    The state (what a checkpoint stores, docs/FORMAT.md) is the packed payload: `weight_codes`, `weight_scales`
    (and HiF4's `weight_micro`), the output scale `weight_scale`, the bias and, for outlier-channels,
    `channels` and `dense_weight`. `weight_values`, the exact bf16 dequantization the simulating backends
    multiply, is derived from it, and held only while the layer's backend needs it: the packed backend reads the
    payload itself, so a layer on it holds 4.25–4.5 bits per weight. bf16 recipes store `weight_values` itself.

    `backend="auto"` is resolved for the device the layer is on, again whenever it moves (functional.Backend):
    packed (or triton) on CUDA, reference elsewhere; `model.cuda()` after quantizing on the CPU drops the bf16 Ŵ.

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
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.strict, self.name = strict, name or "SharQLinear"
        self.recipe = recipe
        recipe.key  # noqa: B018 - computed now, not while torch.compile traces the forward
        self.backend_choice = backend  # "auto" or a backend name; `backend` is what runs on the current device
        self.shared = shared
        packed = qweight.packed
        self.register_buffer("weight_values", qweight.values, persistent=packed is None)
        self.register_buffer("weight_codes", None if packed is None else packed.codes)
        self.register_buffer("weight_scales", None if packed is None else packed.scales)
        self.register_buffer("weight_micro", None if packed is None else packed.micro)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("channels", qweight.channels)
        self.register_buffer("dense_weight", qweight.dense)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_values())
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
            check_channel_stats(channel_stats, linear.in_features, name or "SharQLinear")
            channels = r.select_channels(channel_stats)
        with torch.no_grad():
            qweight = r.prepare_weight(linear.weight.detach(), channels)
        return cls(linear.in_features, linear.out_features, r, qweight, linear.bias, backend, shared, strict, name)

    @property
    def packed(self) -> QTensor | None:
        """The packed weight payload as a QTensor (None for bf16 weights)."""
        if self.weight_codes is None:
            return None
        r = self.recipe
        return QTensor(self.weight_codes, self.weight_scales, r.weight_fmt, r.weight_block,
                       (self.out_features, self.in_features), micro=self.weight_micro)

    @torch.no_grad()
    def _configure(self) -> None:
        """Resolve the backend for the layer's device, and hold the bf16 Ŵ exactly when that backend needs it."""
        self.backend = resolve_backend(self.backend_choice, self.recipe, self.weight_scale.device)
        if self.packed is None:  # bf16 weights: Ŵ is the state itself
            return
        if not get_backend(self.backend).keeps_values:
            self.weight_values = None
        elif self.weight_values is None:
            self.weight_values = dequantize_blocks(self.packed).to(torch.bfloat16)

    @torch.no_grad()
    def refresh_values(self) -> None:
        """Derive what the payload determines again (after loading a state dict)."""
        if self.packed is not None:
            self.weight_values = None
        self._configure()

    @property
    def weight_bytes(self) -> int:
        """Bytes the layer's state holds (the packed payload, scales, bias; a derived bf16 Ŵ is not state)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def qweight(self) -> QWeight:
        return QWeight(self.weight_values, self.weight_scale, self.packed, self.channels, self.dense_weight)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply, except that a dtype cast leaves the payload's dtypes alone (it still moves devices)."""
        before = {n: t for n, t in self._buffers.items() if n in self.PAYLOAD and t is not None}
        super()._apply(fn, recurse)
        for name, t in before.items():
            if self._buffers[name].dtype != t.dtype:
                self._buffers[name] = t.to(self._buffers[name].device)
        self._configure()
        return self

    def prepare(self, x2d: torch.Tensor) -> QActivation:
        return prepare(x2d, self.recipe, self.backend, self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device != self.weight_scale.device:
            raise ValueError(f"{self.name}: input is on {x.device} but the layer is on {self.weight_scale.device}")
        if self.strict:
            check_finite(x, self.name)
        x2d = as_rows(x)
        with torch.no_grad():
            if self.shared is None:
                act = self.prepare(x2d)
            else:
                act = self.shared.get(x, lambda: self.prepare(x2d))
            y = matmul(act, self.qweight, self.bias, x.dtype, self.recipe, self.backend)
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
