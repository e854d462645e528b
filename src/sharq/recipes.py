"""Recipes as data (SPEC §5–§6, DESIGN "one mechanism, many recipes").

Every activation recipe is a residual cascade: R₀ = Xs; for each stage, Qᵢ = quantize(maskᵢ(Rᵢ₋₁)),
Rᵢ = Rᵢ₋₁ − deq(Qᵢ); the activation is Σ deq(Qᵢ). nvfp4 is one dense stage, sharq is [pair-4:8 NVFP4/32,
dense NVFP4/16], dense-dense two dense stages, sparse-only one sparse stage. Weights are prepared once into one
payload that every stage shares, so a layer's output is α · (Σ deq(Qᵢ)) · Ŵᵀ with a single GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

import torch

from . import masks
from .quant import (
    TENSOR_SCALE_RULES,
    QTensor,
    check_scale_rule,
    dequantize_blocks,
    format_info,
    nvfp4_tensor_scale,
    output_scale,
    quantize_blocks,
    resolve_block,
    search_tensor_scale,
    tensor_scaled_input,
)

SCALE_GRANULARITIES = ("tensor", "token")


def _option(default):
    """A field beyond the paper's recipe (SPEC §11): left out of to_dict at its default, so a recipe without
    options serialises exactly as before (older sharq reads it, checkpoint configs stay the same)."""
    return field(default=default, metadata={"option": True})


def _as_dict(obj) -> dict:
    """A dataclass's fields, JSON-ready, without the options that are at their default."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if not (f.metadata.get("option") and getattr(obj, f.name) == f.default)}


@dataclass(frozen=True)
class Stage:
    """One step of the activation cascade: an optional N:M mask, then block quantization with a block scale
    rule ("max", SPEC §2; "four_over_six" or "search", SPEC §11.1)."""

    fmt: str
    block_size: int | None = None
    mask: str | None = None  # e.g. "pair-4:8", "2:4", "pair-l2-4:8"; None = dense
    scale_rule: str = _option("max")

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, str) or not (self.mask is None or isinstance(self.mask, str)):
            raise ValueError(f"a stage's fmt and mask are strings, got fmt={self.fmt!r}, mask={self.mask!r}")
        block = resolve_block(self.fmt, self.block_size)  # also checks the format
        if self.block_size is not None:  # a numpy integer as an int: the recipe goes into JSON configs
            object.__setattr__(self, "block_size", block)
        if self.mask is not None:
            if block is None:
                raise ValueError(f"{self.fmt} stages take no mask: they have one scale per row and no blocks for a "
                                 f"masked backbone (SPEC §6), got mask={self.mask!r}")
            masks.parse_mask(self.mask)
        check_scale_rule(self.fmt, self.scale_rule)

    @property
    def block(self) -> int | None:
        return format_info(self.fmt).default_block if self.block_size is None else self.block_size

    @property
    def bits_per_element(self) -> float:
        """Storage per element of the dense layout: kept elements, mask indices and block scales."""
        info = format_info(self.fmt)
        scale_bits = info.scale_bits_per_block / self.block if self.block else 0.0
        if self.mask is None:
            return info.element_bits + scale_bits
        spec = masks.parse_mask(self.mask)
        return spec.kept_fraction * info.element_bits + spec.index_bits_per_element + scale_bits


@dataclass(frozen=True)
class QWeight:
    """A weight prepared once: the exact dequantized payload (bf16, without the tensor scale; None where a backend
    reads the packed payload itself), the packed payload it came from, and the output scale it still needs
    (scalar s_w or fp8's per-channel [N])."""

    values: torch.Tensor | None  # bf16 [N, K], exact
    scale: torch.Tensor  # fp32 [] or [N]
    packed: QTensor | None
    channels: torch.Tensor | None = None  # outlier-channels: input channels kept in bf16 (int64 [c])
    dense: torch.Tensor | None = None  # outlier-channels: those columns of W, bf16 [N, c]

    @property
    def out_features(self) -> int:
        return self.values.shape[0] if self.values is not None else self.packed.shape[0]

    def effective(self) -> torch.Tensor:
        """The weight the layer multiplies by, fp32 [N, K]: Ŵ times its output scale, the bf16 outlier columns in
        place (what the straight-through gradient of a quantized layer uses)."""
        scale = self.scale.reshape(-1, 1) if self.scale.dim() else self.scale
        values = self.values if self.values is not None else dequantize_blocks(self.packed)
        w = values.float() * scale
        if self.channels is not None:
            w[:, self.channels] = self.dense.float()
        return w


@dataclass(frozen=True)
class QActivation:
    """An activation prepared per call: the packed stage payloads, their dequantized sum (fp32, without the
    activation scale) and the output scale s_x ([1, 1] or one per row): NVFP4's tensor scale, fp8's row scale, or
    1. Keeping s_x out of the values keeps the GEMM's operands small: the product is scaled once, at the end."""

    parts: tuple[QTensor, ...]
    values: torch.Tensor  # fp32 [M, K]
    scale: torch.Tensor  # fp32 [1, 1] or [M, 1]
    dense: torch.Tensor | None = None  # outlier-channels: the kept input channels, bf16-rounded, fp32 [M, c]


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe: the weight format and the activation cascade. Options are fields, so
    ``get_recipe("sharq", scale_granularity="token")`` is a recipe, not a code path."""

    name: str
    weight_fmt: str  # "bf16" or a format of quant.FORMATS
    weight_block: int | None
    stages: tuple[Stage, ...]  # empty: bf16 activations
    scale_granularity: str = "tensor"  # NVFP4 activation scale: per call (paper) or per token (batch-invariant)
    outlier_fraction: float = 0.0  # input channels kept in bf16, chosen by calibration (outlier-channels)
    description: str = field(default="", compare=False)
    weight_scale_rule: str = _option("max")  # the weight payload's block scales (SPEC §11.1)
    weight_tensor_scale_rule: str = _option("amax")  # s_w: amax/2688 (SPEC §3) or "search" (SPEC §11.2)

    def __post_init__(self) -> None:
        """Every field is checked here, so a recipe read from a file fails before anything is allocated."""
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise ValueError(f"a recipe's name and description are strings, got {self.name!r}, {self.description!r}")
        if not isinstance(self.stages, tuple) or not all(isinstance(s, Stage) for s in self.stages):
            raise ValueError(f"recipe {self.name!r}: stages must be a tuple of Stage, got {self.stages!r}")
        if any(s.block is None for s in self.stages) and len(self.stages) > 1:
            raise ValueError(f"recipe {self.name!r}: a stage with one scale per row (fp8) must be the only stage")
        folding = [s.fmt for s in self.stages if format_info(s.fmt).folds_tensor_scale]
        if folding and len(self.stages) > 1:
            raise ValueError(f"recipe {self.name!r}: {folding[0]} folds the tensor scale into its block scales, as "
                             "its tool does, and defines no residual cascade (SPEC §3.1): it must be the only stage")
        _check_residual_scales(self.name, self.stages)
        if self.scale_granularity not in SCALE_GRANULARITIES:
            raise ValueError(f"scale_granularity must be one of {SCALE_GRANULARITIES}, got {self.scale_granularity!r}")
        if self.scale_granularity != "tensor" and not self.uses_tensor_scale:
            raise ValueError(f"recipe {self.name!r}: scale_granularity={self.scale_granularity!r} chooses how NVFP4's "
                             "activation tensor scale is taken (SPEC §3), and this recipe's activations have none")
        if isinstance(self.outlier_fraction, bool) or not isinstance(self.outlier_fraction, (int, float)) \
                or not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be a number in [0, 1), got {self.outlier_fraction!r}")
        if self.weight_tensor_scale_rule not in TENSOR_SCALE_RULES:
            raise ValueError(f"weight_tensor_scale_rule must be one of {TENSOR_SCALE_RULES}, got "
                             f"{self.weight_tensor_scale_rule!r}")
        if self.weight_fmt == "bf16":
            if self.weight_block is not None:
                raise ValueError(f"recipe {self.name!r}: bf16 weights have no block size, got {self.weight_block!r}")
            if (self.weight_scale_rule, self.weight_tensor_scale_rule) != ("max", "amax"):
                raise ValueError(f"recipe {self.name!r}: bf16 weights have no scales to choose (weight_scale_rule "
                                 f"{self.weight_scale_rule!r}, weight_tensor_scale_rule "
                                 f"{self.weight_tensor_scale_rule!r})")
        elif not isinstance(self.weight_fmt, str):
            raise ValueError(f"recipe {self.name!r}: weight_fmt must be a string, got {self.weight_fmt!r}")
        else:
            block = resolve_block(self.weight_fmt, self.weight_block)
            if self.weight_block is not None:  # a numpy integer as an int: the recipe goes into JSON configs
                object.__setattr__(self, "weight_block", block)
            check_scale_rule(self.weight_fmt, self.weight_scale_rule)
            info = format_info(self.weight_fmt)
            if self.weight_tensor_scale_rule != "amax" and (not info.tensor_scale or info.folds_tensor_scale):
                raise ValueError(f"recipe {self.name!r}: the weight tensor scale search is defined on SPEC §3's "
                                 f"NVFP4, not {self.weight_fmt}")

    # --- costs ---
    @property
    def activation_bits(self) -> float:
        """Activation storage in bits per element, scales and mask metadata included (fp32 tensor scales,
        amortized over the tensor, are not counted)."""
        bits = sum(s.bits_per_element for s in self.stages) if self.stages else 16.0
        return (1 - self.outlier_fraction) * bits + self.outlier_fraction * 16.0

    @property
    def weight_bits(self) -> float:
        if self.weight_fmt == "bf16":
            return 16.0
        bits = Stage(self.weight_fmt, self.weight_block).bits_per_element
        return (1 - self.outlier_fraction) * bits + self.outlier_fraction * 16.0

    @property
    def needs_calibration(self) -> bool:
        return self.outlier_fraction > 0

    def select_channels(self, channel_stats: torch.Tensor) -> torch.Tensor:
        """The input channels to keep in bf16: the largest `outlier_fraction` (at least one) by calibration
        statistic (mean |x| per channel), in increasing channel order."""
        k = min(max(1, round(self.outlier_fraction * channel_stats.numel())), channel_stats.numel())
        return torch.topk(channel_stats.float(), k).indices.sort().values

    def _check_channels(self, channels: torch.Tensor | None) -> None:
        if self.needs_calibration and channels is None:
            raise ValueError(f"recipe {self.name!r} is calibrated: pass the outlier channels (Recipe.select_channels "
                             "of sharq.calibrate's statistics)")
        if channels is not None and not self.needs_calibration:
            raise ValueError(f"recipe {self.name!r} keeps no outlier channels (outlier_fraction=0)")

    @staticmethod
    def _split_channels(t: torch.Tensor, channels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t with the channels zeroed, the channels' columns) — or (t, None) without channels."""
        if channels is None:
            return t, None
        rest = t.clone()
        rest[:, channels] = 0
        return rest, t[:, channels]

    def check_amax(self, amax: torch.Tensor, rows: int) -> None:
        """A whole input's amax fits this recipe: fp8's row scale is taken inside its quantizer, over the slice
        alone (no slice of it can be prepared as part of the whole), and the shape follows the granularity."""
        if any(s.block is None for s in self.stages):
            raise ValueError(f"recipe {self.name!r}: fp8's per-row scale is taken over the activation it is given; "
                             "a K-slice of a wider input cannot be prepared with the whole row's amax")
        per_row = self.tensor_scale_per_row
        want = (rows, 1) if per_row else (1, 1)
        if tuple(amax.shape) != want:
            raise ValueError(f"recipe {self.name!r}: the whole input's amax must have shape {list(want)} "
                             f"({'per token' if per_row else 'per tensor'}), got {list(amax.shape)}")

    @property
    def uses_tensor_scale(self) -> bool:
        return bool(self.stages) and format_info(self.stages[0].fmt).tensor_scale

    @property
    def tensor_scale_per_row(self) -> bool:
        """Whether the activation's tensor scale is one per row ([M, 1], token granularity) rather than one."""
        return self.uses_tensor_scale and self.scale_granularity == "token"

    # --- weights, once ---
    def prepare_weight(self, weight: torch.Tensor, channels: torch.Tensor | None = None,
                       tensor_scale: torch.Tensor | None = None) -> QWeight:
        """Quantize a weight [N, K] once. `tensor_scale` (a scalar, as the format stores it: NVFP4's s) replaces the
        recipe's tensor scale rule: layers a serving engine runs as one layer share one (the compressed-tensors
        export)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        self._check_channels(channels)
        if weight.is_floating_point() and weight.element_size() < 2:  # fp8: exact in fp32, which every format reads
            weight = weight.float()
        if tensor_scale is not None and (self.weight_fmt == "bf16" or not format_info(self.weight_fmt).tensor_scale):
            raise ValueError(f"recipe {self.name!r}: {self.weight_fmt} weights have no tensor scale to give")
        if self.weight_fmt == "bf16":
            return QWeight(weight.to(torch.bfloat16), torch.ones((), dtype=torch.float32, device=weight.device), None)
        w, dense = self._split_channels(weight, channels)
        scale, folded = torch.ones((), dtype=torch.float32, device=w.device), None
        if format_info(self.weight_fmt).tensor_scale:
            if tensor_scale is not None:
                t = tensor_scale.detach().float().reshape(1, 1).to(w.device)
            elif self.weight_tensor_scale_rule == "search":
                t = search_tensor_scale(w, self.weight_fmt, self.weight_block, self.weight_scale_rule)
            else:
                t = nvfp4_tensor_scale(w, fmt=self.weight_fmt)
            scale = output_scale(t, self.weight_fmt).reshape(())
            w, folded = tensor_scaled_input(w, t, self.weight_fmt)
        packed = quantize_blocks(w, self.weight_fmt, self.weight_block, folded, self.weight_scale_rule)
        if packed.block_size is None:  # fp8: the per-channel scale moves to the output
            scale = packed.tensor_scale.reshape(-1)
        values = dequantize_blocks(packed).to(torch.bfloat16)
        if dense is None:
            return QWeight(values, scale, packed)
        return QWeight(values, scale, packed, channels, dense.to(torch.bfloat16))

    # --- activations, per call ---
    def prepare_activation(self, x2d: torch.Tensor, channels: torch.Tensor | None = None,
                           amax: torch.Tensor | None = None) -> QActivation:
        """Run the cascade on x [M, K]. Xs is the bf16-rounded scaled input (SPEC §3); later stages see the fp32
        residual of the earlier ones. A format that folds the tensor scale into its blocks (SPEC §3.1, the only
        stage) sees X itself. Outlier channels (calibrated recipes) bypass the cascade in bf16.

        `amax`: when x2d is a K-slice of a wider input (a row-parallel layer's shard under tensor parallelism), the
        finite max |x| of the whole input (quant.finite_amax: [1, 1], or [M, 1] per token), so that the slice is
        prepared exactly as its part of the whole (docs/MULTIGPU.md); blocks and masks are local to a slice cut at
        a multiple of the block. None: x2d's own."""
        if x2d.dim() != 2:
            raise ValueError(f"activation must be 2-D [M, K], got shape {tuple(x2d.shape)}")
        self._check_channels(channels)
        if amax is not None:
            self.check_amax(amax, x2d.shape[0])
        x2d, dense = self._split_channels(x2d, channels)
        if dense is not None:  # bf16, where a non-finite value is NaN, as in the quantized channels (SPEC §8)
            dense = dense.to(torch.bfloat16).float()
            dense = torch.where(torch.isfinite(dense), dense, torch.full((), float("nan"), device=dense.device))
        scale = torch.ones(1, 1, dtype=torch.float32, device=x2d.device)
        if not self.stages:
            return QActivation((), x2d.to(torch.bfloat16).float(), scale)
        folded = None
        if self.uses_tensor_scale:
            fmt = self.stages[0].fmt
            t = nvfp4_tensor_scale(x2d, self.scale_granularity == "token", fmt, amax)
            scale = output_scale(t, fmt)
            r, folded = tensor_scaled_input(x2d, t, fmt)
        else:
            r = x2d.to(torch.bfloat16).float()
        parts, total = [], None
        for stage in self.stages:
            q = quantize_stage(r, stage, folded)
            d = dequantize_blocks(q)
            if q.block_size is None:  # fp8 (always the only stage): its per-row scale is the activation scale
                scale = q.tensor_scale
            parts.append(q)
            total = d if total is None else total + d
            r = r - d
        return QActivation(tuple(parts), total, scale, dense)

    @functools.cached_property
    def key(self) -> str:
        """The recipe as canonical JSON: the string argument of the custom ops (computed once per recipe)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        """Every field, JSON-ready (the checkpoint's quantization_config stores it)."""
        d = _as_dict(self)
        d["stages"] = [_as_dict(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        try:
            fields = {**d, "stages": tuple(Stage(**s) for s in d["stages"])}
            if fields.get("scale_granularity") == "token" and not (
                    fields["stages"] and format_info(fields["stages"][0].fmt).tensor_scale):
                fields["scale_granularity"] = "tensor"  # stored by an earlier sharq, where it changed nothing
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a sharq recipe description: {e}") from None

    def with_options(self, **options) -> Recipe:
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown option(s) for recipe {self.name!r}: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **options)


def _check_residual_scales(name: str, stages: tuple[Stage, ...]) -> None:
    """A recipe takes its activation tensor scale from its first stage (SPEC §3), and a later stage quantizes the
    residual in those units with no tensor scale of its own (SPEC §11). SPEC defines an NVFP4 stage only on
    tensor-scaled input: after a first stage without one (MXFP4, HiF4) its UE4M3 block scales would see X's own
    magnitudes, saturating above 2688 and flushing small values to zero."""
    if stages and not format_info(stages[0].fmt).tensor_scale:
        later = [s.fmt for s in stages[1:] if format_info(s.fmt).tensor_scale]
        if later:
            raise ValueError(f"recipe {name!r}: its {later[0]} stage needs the tensor scale a recipe takes from its "
                             f"first stage (SPEC §3), and the first stage, {stages[0].fmt}, has none; put the "
                             f"{later[0]} stage first")


def quantize_stage(r: torch.Tensor, stage: Stage, tensor_scale: torch.Tensor | None = None) -> QTensor:
    """Mask (if any) then block-quantize on the dense layout; a sparse payload records its pattern and indices.
    `tensor_scale` goes to the formats that fold it into their blocks (quant.tensor_scaled_input)."""
    if stage.mask is None:
        return quantize_blocks(r, stage.fmt, stage.block_size, tensor_scale, stage.scale_rule)
    spec = masks.parse_mask(stage.mask)
    units = masks.kept_units(r, spec)
    sparse = torch.where(masks.units_to_mask(units, spec, r.shape[-1]), r, torch.zeros_like(r))
    q = quantize_blocks(sparse, stage.fmt, stage.block_size, tensor_scale, stage.scale_rule)
    indices = masks.pack_indices(units) if spec.m <= 4 else None
    return dataclasses.replace(q, mask=str(spec), indices=indices)


def _nvfp4(mask: str | None = None, block: int = 16) -> Stage:
    return Stage("nvfp4", block, mask)


def _backbone_plus_residual(name: str, fmt: str, mask: str, block: int, residual_block: int, note: str = "") -> Recipe:
    """A SharQ flavour: a sparse backbone and a dense residual in one format, weights in that format at `block`."""
    label = {"hif4": "HiF4"}.get(fmt, fmt.upper())
    description = f"{mask} sparse {label} backbone + dense {label} residual" + (f", {note}" if note else "")
    return Recipe(name, fmt, block, (Stage(fmt, block, mask), Stage(fmt, residual_block)), description=description)


_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("bf16", "bf16", None, (), description="no quantization (reference)"),
        Recipe("fp8", "fp8", None, (Stage("fp8"),), description="E4M3, per-channel weights, per-token activations"),
        Recipe("nvfp4", "nvfp4", 16, (_nvfp4(),), description="NVFP4 W4A4, B=16"),
        Recipe("mxfp4", "mxfp4", 32, (Stage("mxfp4", 32),), description="MXFP4 W4A4, B=32"),
        Recipe("hif4", "hif4", 64, (Stage("hif4", 64),), description="HiF4 W4A4, 64-element units"),
        _backbone_plus_residual("sharq", "nvfp4", "pair-4:8", 32, 16, "shared W32 weights"),
        _backbone_plus_residual("sharq-hif4", "hif4", "2:4", 64, 64),
        _backbone_plus_residual("sharq-mxfp4", "mxfp4", "pair-4:8", 32, 32),
        Recipe("sparse-only", "nvfp4", 32, (_nvfp4("pair-4:8", 32),), description="ablation: SharQ without residual"),
        Recipe("dense-dense", "nvfp4", 32, (_nvfp4(), _nvfp4()), description="ablation: two dense NVFP4 stages"),
        Recipe(
            "outlier-channels",
            "nvfp4",
            16,
            (_nvfp4("2:4"),),
            outlier_fraction=0.01,
            description="calibrated top-1% input channels in bf16, the rest 2:4 + NVFP4, no residual",
        ),
        # Beyond the paper (SPEC §11): SharQ's activations unchanged, the weights where its remaining gap
        # lives. Chosen on the SmolLM2-135M screen (docs/ACCURACY.md), calibration-free, 0.25 weight bits more.
        _backbone_plus_residual("sharq", "nvfp4", "pair-4:8", 32, 16).with_options(
            name="sharq-plus",
            weight_block=16,
            weight_scale_rule="four_over_six",
            description="sharq's activations (pair-4:8 NVFP4/32 backbone + dense NVFP4/16 residual) with W16 NVFP4 "
                        "weights, each block's scale amax/6 or amax/4, whichever errs less (SPEC §11.1): the screen "
                        "found the weights hold most of sharq's remaining gap (docs/ACCURACY.md)",
        ),
    )
}
# NVFP4 W4A4 exactly as another tool quantizes it (SPEC §3.1): to compare with checkpoints those tools write. Not
# part of the paper's comparison (SPEC §6), so list_recipes() names them only when asked.
_COMPAT_RECIPES: dict[str, Recipe] = {
    fmt: Recipe(fmt, fmt, 16, (Stage(fmt, 16),), description=f"NVFP4 W4A4, B=16, bit for bit as {tool} computes it")
    for fmt, tool in (("nvfp4-torchao", "torchao"), ("nvfp4-compressed-tensors", "compressed-tensors"))
}
_ALIASES = {"sharq-nvfp4": "sharq"}


def list_recipes(compat: bool = False) -> list[str]:
    """The recipes of SPEC §6 and sharq-plus (SPEC §11.5); with compat=True also those that reproduce another
    tool's NVFP4 (SPEC §3.1)."""
    return list(_RECIPES) + (list(_COMPAT_RECIPES) if compat else [])


def get_recipe(name: str | Recipe, /, **options) -> Recipe:
    """A registered recipe by name (``sharq-nvfp4`` is ``sharq``; ``nvfp4-torchao`` and
    ``nvfp4-compressed-tensors`` reproduce those tools, SPEC §3.1), with options such as
    ``scale_granularity="token"`` applied (``name="mine"`` renames it). A Recipe passes through (options still
    apply)."""
    if isinstance(name, Recipe):
        recipe = name
    elif not isinstance(name, str):
        raise ValueError(f"a recipe is a name (str) or a Recipe, got {type(name).__name__} {name!r}")
    else:
        recipe = _RECIPES.get(_ALIASES.get(name, name)) or _COMPAT_RECIPES.get(name)
        if recipe is None:
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(list_recipes(compat=True))}")
    return recipe.with_options(**options) if options else recipe
