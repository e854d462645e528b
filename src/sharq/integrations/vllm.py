"""vLLM integration: a quantization method that serves sharq checkpoints with SharQ's own activations.

`pip install 'sharq[serve]'` installs vLLM and this plugin; vLLM calls `register` (the `vllm.general_plugins`
entry point in pyproject.toml) in every process it starts, and a checkpoint whose config.json says
`quantization_config.quant_method: "sharq"` then selects it: `vllm serve CHECKPOINT`, `vllm.LLM(model=CHECKPOINT)`.

- Load: before vLLM builds anything, the checkpoint gets the checks `sharq.load` runs (checkpoint.check_checkpoint:
  its digest, and every tensor's name, dtype and shape against the model its config builds); vLLM then loads the
  payload tensors under their checkpoint names (docs/FORMAT.md), and a layer that did not receive every tensor of
  every shard refuses to run. A recipe the plugin cannot serve, or a quantized MoE block, is refused naming it.
- Numerics: each vLLM linear holds one `SharQLinear` per checkpoint linear it fuses (q/k/v, gate/up): the input is
  prepared once (SharQLinear.prepare) and each shard multiplies it with its own payload and weight scale s_w
  (SharQLinear.multiply), on the reference backend on the CPU (bit for bit what `sharq.load` computes), on CUDA
  the packed backend's kernels, the triton backend where packed does not run the recipe.
- Tensor parallel: a row-parallel layer sees a K-slice of its input; its per-tensor (or per-token) activation
  amax is the max over the tensor-parallel group, so every rank prepares its slice as part of the whole input
  (docs/MULTIGPU.md). Slices must be whole blocks.

vLLM is imported here only: nothing else in sharq knows it. docs/SERVING.md says what is exact and what vLLM
computes itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter, PerTensorScaleParameter

from .. import masks
from ..backends import available, check_backend, get_backend
from ..checkpoint import IntegrityError, check_checkpoint, validate_quantization_config
from ..models import FAMILIES
from ..nn import SharQLinear
from ..quant import QTensor, as_rows, finite_amax
from ..recipes import QActivation, QWeight, Recipe

QUANT_METHOD = "sharq"
# the backends a served layer runs on CUDA, in order of preference (humming is left out: its outputs vary from call
# to call, it lays the bias out with the weight, and a row-parallel layer adds its bias on one rank only)
CUDA_BACKENDS = ("packed", "triton")


def register() -> None:
    """The `vllm.general_plugins` entry point: make quant_method "sharq" known to vLLM (every call after the first
    changes nothing)."""
    register_quantization_config(QUANT_METHOD)(SharQVllmConfig)


class SharQVllmConfig(QuantizationConfig):
    """The `quantization_config` of a sharq checkpoint (docs/FORMAT.md), as vLLM asks for it: which of its layers
    are quantized, and how."""

    def __init__(self, q: dict[str, Any]) -> None:
        super().__init__()
        self.recipe = serving_recipe(q, "the sharq quantization_config")
        self.modules = set(q["modules"])

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the packed and triton backends' kernels (bf16 tensor cores)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config is config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SharQVllmConfig:
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Check the checkpoint before vLLM builds the model (vLLM calls this once, with the model's path):
        sharq.load's checks, so that a damaged or edited checkpoint is an error, never a model with random
        weights."""
        directory = Path(model_name)
        if not directory.is_dir():
            raise ValueError(f"{model_name}: the sharq vLLM plugin serves a sharq checkpoint from a local directory "
                             "(it checks the checkpoint's digest and tensors first); download it, then give its path")
        q = check_checkpoint(directory)
        serving_recipe(q, str(directory))
        if set(q["modules"]) != self.modules:
            raise IntegrityError(f"{directory}: its quantization_config changed while vLLM read it")
        family = FAMILIES.get(getattr(hf_config, "model_type", None))
        experts = sorted(m for m in self.modules if family and family.experts and m.endswith(f".{family.experts}"))
        if experts:
            raise ValueError(f"{directory}: the sharq vLLM plugin does not run MoE experts yet ({len(experts)} "
                             f"quantized blocks, e.g. {experts[0]}); sharq.load runs the checkpoint with "
                             "transformers")

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Module names as vLLM's model names them (for architectures whose names differ from transformers')."""
        self.modules = set(hf_to_vllm_mapper.apply_list(sorted(self.modules)))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        """SharQ for a linear whose every checkpoint linear is quantized (a fused layer: all of its parts),
        vLLM's own for one the checkpoint left unquantized (lm_head, a router); a quantized module that vLLM does
        not build as a linear (MoE experts) is refused."""
        if isinstance(layer, LinearBase):
            parts = self.checkpoint_names(prefix)
            quantized = [p for p in parts if p in self.modules]
            if len(quantized) == len(parts):
                return SharQLinearMethod(self.recipe, prefix)
            if not quantized:
                return UnquantizedLinearMethod()
            raise ValueError(f"{prefix}: vLLM fuses {parts} into one layer, but the sharq checkpoint quantized only "
                             f"{quantized}")
        if prefix in self.modules:
            raise ValueError(f"{prefix}: the sharq checkpoint quantized this module, which vLLM builds as "
                             f"{type(layer).__name__}, not a linear layer: the sharq vLLM plugin does not run MoE "
                             "experts yet (sharq.load runs the checkpoint with transformers)")
        return None

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint linears a vLLM layer holds: its own name, or those of the layers it fuses
        (packed_modules_mapping, e.g. qkv_proj -> q_proj, k_proj, v_proj)."""
        parent, _, name = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(name)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]


def serving_recipe(q: dict[str, Any], where: str) -> Recipe:
    """The checkpoint's recipe, validated, if the plugin serves it; a ValueError naming it if not."""
    try:
        recipe = validate_quantization_config(q, where)
    except ValueError as e:
        name = q.get("recipe", {}).get("name") if isinstance(q.get("recipe"), dict) else None
        raise ValueError(f"sharq vLLM plugin: recipe {name!r} cannot be served: {e}") from None
    if recipe.needs_calibration:
        raise ValueError(f"sharq vLLM plugin: recipe {recipe.name!r} cannot be served: its calibrated bf16 input "
                         "channels are chosen per linear, and vLLM's fused q/k/v and gate/up layers prepare one "
                         "input for several linears")
    return recipe


def slice_unit(recipe: Recipe) -> int:
    """The K-slice a row-parallel shard may hold is a multiple of this: every block (weights and each stage) and
    every mask chunk lies inside one slice."""
    sizes = [recipe.weight_block or 1]
    for stage in recipe.stages:
        sizes.append(stage.block or 1)
        if stage.mask is not None:
            sizes.append(masks.parse_mask(stage.mask).chunk)
    return math.lcm(*sizes)


def serving_backend(recipe: Recipe, device: torch.device) -> str:
    """The reference backend on the CPU (the numerics sharq.load computes there); on CUDA the first of
    CUDA_BACKENDS that runs the recipe and is installed."""
    if device.type != "cuda":
        return "reference"
    for name in CUDA_BACKENDS:
        if get_backend(name).supports(recipe) and available(name):
            return name
    check_backend(CUDA_BACKENDS[-1], device)  # says what to install
    raise ValueError(f"no CUDA backend runs recipe {recipe.name!r}")


@register_weight_loader_v2_supported_method
class SharQLinearMethod(LinearMethodBase):
    """One vLLM linear layer (fused or not, column- or row-parallel) running a sharq recipe."""

    def __init__(self, recipe: Recipe, prefix: str) -> None:
        self.recipe, self.prefix = recipe, prefix

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        """The checkpoint's tensors of this layer (docs/FORMAT.md), each rank's part of them: vLLM's loaders
        concatenate a fused layer's parts along N (one weight scale per part) and cut a row-parallel layer's
        along K."""
        r, k = self.recipe, input_size_per_partition
        row_parallel = k != input_size
        if row_parallel:
            if any(s.block is None for s in r.stages):
                raise ValueError(f"{self.prefix}: recipe {r.name!r} cannot run tensor-parallel: its per-token fp8 "
                                 "scale is taken over the whole row inside the quantizer, and this layer holds a "
                                 f"slice of {k} of its {input_size} input features")
            unit = slice_unit(r)
            if k % unit:
                raise ValueError(f"{self.prefix}: tensor parallelism gives each rank {k} of its {input_size} input "
                                 f"features, not a multiple of {unit}, the blocks of recipe {r.name!r}: use a "
                                 "tensor-parallel size that cuts the input at whole blocks")
        n = sum(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        layer.sharq_loads = {}  # parameter name -> the shard ids loaded into it
        layer.sharq_amax_over_ranks = row_parallel and r.uses_tensor_scale
        tensors = {}
        if r.weight_fmt == "bf16":
            tensors["weight_values"] = torch.empty(n, k, dtype=torch.bfloat16)
        elif r.weight_block is None:  # fp8: one byte per weight, one scale per output channel
            tensors["weight_codes"] = torch.empty(n, k, dtype=torch.uint8)
            tensors["weight_scales"] = torch.empty(n, 0, dtype=torch.uint8)
        else:
            kp = -(-k // r.weight_block) * r.weight_block
            tensors["weight_codes"] = torch.empty(n, kp // 2, dtype=torch.uint8)
            tensors["weight_scales"] = torch.empty(n, kp // r.weight_block, dtype=torch.uint8)
            if r.weight_fmt == "hif4":
                tensors["weight_micro"] = torch.empty(n, kp // 64, 3, dtype=torch.uint8)
        for name, data in tensors.items():
            param = ModelWeightParameter(data=data, input_dim=1, output_dim=0,
                                         weight_loader=self._tracked(layer, name, loader))
            layer.register_parameter(name, param)
        if r.weight_block is None and r.weight_fmt != "bf16":
            scale = ChannelQuantScaleParameter(data=torch.empty(n, dtype=torch.float32), output_dim=0,
                                               weight_loader=self._tracked(layer, "weight_scale", loader))
        else:
            scale = PerTensorScaleParameter(data=torch.empty(len(output_partition_sizes), dtype=torch.float32),
                                            weight_loader=self._tracked(layer, "weight_scale", loader))
        layer.register_parameter("weight_scale", scale)
        layer.sharq_shapes = (list(output_partition_sizes), k)

    @staticmethod
    def _tracked(layer: nn.Module, name: str, loader):
        """vLLM's loader for one parameter, recording which shard (q/k/v, gate/up, or the one) it received."""
        def load(param, loaded_weight, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            layer.sharq_loads.setdefault(name, set()).add(shard)
            return loader(param, loaded_weight, *args, **kwargs)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Refuse a layer that did not receive every tensor of every shard (it would hold uninitialized memory),
        then give it one SharQLinear per shard on the backend that serves it, and drop the loaded tensors."""
        sizes, k = layer.sharq_shapes
        names = [n for n in ("weight_values", "weight_codes", "weight_scales", "weight_micro", "weight_scale")
                 if hasattr(layer, n)]
        for name in names:
            if len(layer.sharq_loads.get(name, ())) != len(sizes):
                got = len(layer.sharq_loads.get(name, ()))
                raise IntegrityError(f"{self.prefix}: the checkpoint gave {got} of the {len(sizes)} part(s) of "
                                     f"{name}: a layer with a missing tensor would run on uninitialized memory")
        r = self.recipe
        device = layer.weight_scale.device
        backend = serving_backend(r, device)
        shards, start = [], 0
        for i, rows in enumerate(sizes):
            part = slice(start, start + rows)
            start += rows
            scale = layer.weight_scale[part] if r.weight_block is None and r.weight_fmt != "bf16" \
                else layer.weight_scale[i]
            if r.weight_fmt == "bf16":
                qweight = QWeight(layer.weight_values[part].clone(), scale.clone(), None)
            else:
                micro = layer.weight_micro[part].clone() if hasattr(layer, "weight_micro") else None
                packed = QTensor(layer.weight_codes[part].clone(), layer.weight_scales[part].clone(), r.weight_fmt,
                                 r.weight_block, (rows, k), micro=micro)
                qweight = QWeight(None, scale.clone(), packed)
            shards.append(SharQLinear(k, rows, r, qweight, None, backend, name=f"{self.prefix}[{i}]",
                                      dtype=layer.params_dtype))
        for name in names:
            delattr(layer, name)
        del layer.sharq_loads, layer.sharq_shapes
        layer.sharq_shards = nn.ModuleList(shards)

    def prepare(self, layer: nn.Module, x2d: torch.Tensor) -> QActivation:
        """The layer's activation of x [M, K]; a row-parallel layer's x2d is a K-slice of the input, and its amax
        the max over the tensor-parallel group of each rank's: an all-gather of one float (or one per token)
        through vLLM's communicator, the one vLLM sets up on every platform and captures in CUDA graphs, then the
        max of the gathered values, which is exactly an all-reduce(max)."""
        amax = None
        if layer.sharq_amax_over_ranks:
            local = finite_amax(x2d, self.recipe.scale_granularity == "token")
            amax = tensor_model_parallel_all_gather(local, dim=-1).amax(-1, keepdim=True)
        return layer.sharq_shards[0].prepare(x2d, amax)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One prepared activation, each shard's product with its own payload and s_w, side by side."""
        act = self.prepare(layer, as_rows(x))
        ys, start = [], 0
        for shard in layer.sharq_shards:
            part = None if bias is None else bias[start:start + shard.out_features]
            start += shard.out_features
            ys.append(shard.multiply(act, part, x.dtype))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y.reshape(*x.shape[:-1], start)
