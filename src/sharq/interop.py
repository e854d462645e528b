"""Interoperability: one loader for every model sharq reads, and compressed-tensors, the checkpoint format
llm-compressor writes and vLLM serves (docs/FORMAT.md, "compressed-tensors").

- `load` reads a quantized checkpoint, sharq's own (bit-identical to what was saved) or compressed-tensors NVFP4;
  `load_model` any model argument with its tokenizer (also the unquantized ones hf.load_pretrained reads).

- `export_compressed_tensors` writes a model sharq quantized with NVFP4 weights as an "nvfp4-pack-quantized"
  Hugging Face directory, by default with one weight global scale per group of layers vLLM fuses. transformers
  (with compressed-tensors installed) and vLLM load it and run its 4-bit weights with their own activations (bf16,
  or NVFP4 when `input_amax` is given), never SharQ's sparse + residual activations; sharq reads it back exactly
  as written (the model itself, bit for bit, with shared_global_scales=False).
- `load_compressed_tensors` builds a sharq model from any NVFP4 compressed-tensors checkpoint (llm-compressor's,
  or an export), keeping its codes and block scales exactly, and runs any sharq recipe with NVFP4 weights on top.

Neither needs the compressed-tensors package: the format is JSON plus safetensors, read and written here.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from . import formats as F
from .checkpoint import (
    DIGEST,
    WEIGHTS,
    CheckpointTensors,
    IntegrityError,
    check_tensors,
    checkpoint_digest,
    finish_loading,
    payload_names,
    saved_dtype,
    tied_names,
    unique_state,
    verify_digest,
    weight_files,
    write_atomically,
)
from .hf import load_pretrained, load_tokenizer, model_source
from .models import _LAYER, DENSE, FAMILIES, quantize_model, shared_input_groups, target_linears
from .nn import SharQExperts, SharQLinear
from .quant import NVFP4_TENSOR_DIVISOR, as_rows, finite_amax
from .recipes import QWeight, Recipe, get_recipe, list_recipes

QUANT_METHOD = "compressed-tensors"
FORMAT = "nvfp4-pack-quantized"
GROUP = 16  # NVFP4's group size in compressed-tensors and in vLLM's kernels
SHARQ_KEY = "sharq"  # the part of quantization_config that only sharq reads (compressed-tensors ignores it)
_FP4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": GROUP,
        "scale_dtype": "torch.float8_e4m3fn"}
WEIGHT_ARGS = {**_FP4, "dynamic": False}
INPUT_ARGS = {**_FP4, "dynamic": "local"}  # 16-element scales per call, the per-tensor scale calibrated
_SCALE_SIGN = 0x80
# a quantized layer's tensors in the checkpoint (the input scale belongs to its activation scheme, which sharq's
# recipe replaces)
_COMPRESSED = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


# --- loading anything ----------------------------------------------------------------------------------------------
def load(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         backend: str = "auto", *, recipe: str | Recipe | None = None, verify: bool = True,
         strict: bool | None = None, progress: bool = False, **options) -> nn.Module:
    """A quantized model from a sharq checkpoint (bit-identical to what was saved; it runs the recipe it was saved
    with: checkpoint.load) or from a compressed-tensors NVFP4 checkpoint (its 4-bit weights kept exactly, any sharq
    recipe with NVFP4 weights on top: load_compressed_tensors). verify=False skips the digest of a sharq checkpoint
    or export (for one that records none), never the checks of every value. The model is as strict
    (quantize_model's strict=) as the one saved or exported; strict=True or False overrides that."""
    if is_compressed_tensors(directory):
        return load_compressed_tensors(directory, recipe, dtype=dtype, device=device, backend=backend, verify=verify,
                                       strict=strict, **options)
    if recipe is not None or options:
        raise ValueError(f"{directory} is a sharq checkpoint: it runs the recipe it was saved with (no recipe or "
                         "options to give)")
    return checkpoint.load(directory, dtype, device, backend, verify=verify, strict=strict, progress=progress)


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint `load` reads (sharq's, or compressed-tensors NVFP4)."""
    return checkpoint.is_checkpoint(path) or is_compressed_tensors(path)


def load_model(spec: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
               backend: str = "auto", progress: bool = False):
    """(model, tokenizer) for any model argument: the embedded default model (None), a Hugging Face directory, a
    .gguf file, a sharq checkpoint or a compressed-tensors NVFP4 checkpoint (the quantized ones through `load`, the
    recipe they hold). The model is in eval mode on `device`, in `dtype`: by default float32 for an unquantized
    model, the dtype it was saved in for a quantized checkpoint."""
    source = model_source(spec)
    if not is_quantized_checkpoint(source):
        return load_pretrained(spec, dtype or torch.float32, device, progress=progress)
    tokenizer = load_tokenizer(source)
    return load(source, dtype, device, backend, progress=progress), tokenizer


# --- export --------------------------------------------------------------------------------------------------------
def export(model: nn.Module, directory: str | Path, format: str = "compressed-tensors", tokenizer=None,
           **options) -> Path:
    """Write a sharq-quantized model in another library's checkpoint format (`sharq.export`); `options` go to the
    format's writer. One format so far: "compressed-tensors" (export_compressed_tensors)."""
    writers = {"compressed-tensors": export_compressed_tensors}
    if format not in writers:
        raise ValueError(f"unknown export format {format!r}; known: {', '.join(writers)}")
    return writers[format](model, directory, tokenizer, **options)


def export_compressed_tensors(model: nn.Module, directory: str | Path, tokenizer=None, *,
                              input_amax: Mapping[str, float] | None = None, shared_global_scales: bool = True,
                              original_weights: Mapping[str, torch.Tensor] | None = None,
                              overwrite: bool = False) -> Path:
    """Write `model` (quantized by sharq with NVFP4 weights) as a compressed-tensors NVFP4 checkpoint, with a digest
    of its quantization_config and tensors that sharq checks on load (docs/FORMAT.md).

    vLLM runs q/k/v and gate/up as one layer each, with one weight global scale. With shared_global_scales (the
    default) every such group gets one, as llm-compressor writes them: the group's largest s_w, with which the
    group's other layers are quantized again. A quantized model holds no original weights, so they are quantized
    from their dequantized weights Ŵ·s_w (a second rounding), unless `original_weights` gives the unquantized
    weights {layer: W} the model was quantized from (taken before quantize_model: sharq export does this for a
    model it quantizes itself): each must quantize to the layer's weights, and is then quantized once more. The
    export is the model vLLM computes, and sharq reads back those weights. shared_global_scales=False writes every
    layer's own s_w: sharq and transformers read back the model bit for bit, but vLLM would scale a fused group's
    other layers wrongly (a warning says by how much).

    Weights only by default: the format's NVFP4 activation scheme needs a static per-tensor input scale, which
    sharq computes per call and so does not have. Pass `input_amax` (every quantized layer's calibrated input max,
    from `measure_input_amax(model, batches)`) to declare NVFP4 activations too. Atomic like sharq.save: a non-empty
    `directory` is refused unless overwrite=True, and then replaced only if it holds a compressed-tensors
    checkpoint."""
    recipe = _exportable_recipe(model)
    if original_weights is not None and not shared_global_scales:
        raise ValueError("original_weights are quantized again with a fused group's shared global scale: they have "
                         "no use with shared_global_scales=False")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SharQLinear)}
    if input_amax is not None and set(input_amax) != set(layers):
        missing = sorted(set(layers) - set(input_amax))
        raise ValueError(f"input_amax must give every quantized layer's input max; missing {len(missing)} "
                         f"(e.g. {missing[:2]}), unknown {sorted(set(input_amax) - set(layers))[:2]}")

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        tensors, exact_scales = _tensors(model, recipe, input_amax, shared_global_scales, original_weights)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = str(model.dtype).removeprefix("torch.")  # the dtype it holds, as save_pretrained records it
        q = _export_config(model, input_amax is not None, {**model.sharq_quantization, "weight_scale": exact_scales})
        signed, keys = _signed(q)
        q[SHARQ_KEY][DIGEST] = checkpoint_digest(signed, tensors, keys)
        config.quantization_config = q
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    out = write_atomically(Path(directory), write, overwrite=overwrite, replaceable=is_compressed_tensors,
                           kind="compressed-tensors checkpoint")
    if not shared_global_scales:
        _warn_unshared_global_scales(model, layers)
    return out


def _tensors(model: nn.Module, recipe: Recipe, input_amax: Mapping[str, float] | None, shared_global_scales: bool,
             original_weights: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The export's tensors (the unquantized ones as the model holds them, each quantized layer's in the format's
    names), and the s_w of the layers whose global scale does not give it back exactly."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SharQLinear)}
    for name, layer in layers.items():
        if not (torch.isfinite(layer.weight_scale) & (layer.weight_scale > 0)).all():
            raise ValueError(f"{name}: weight_scale {layer.weight_scale.item()} is not a positive finite number")
    weights = {name: layer.qweight for name, layer in layers.items()}
    if shared_global_scales:
        weights |= _with_shared_global_scales(model, layers, original_weights)
    payload = payload_names(model)
    tensors = {n: t for n, t in unique_state(model).items() if n not in payload}
    exact_scales: dict[str, float] = {}
    for name, layer in layers.items():
        packed, scales, g, exact = _to_compressed_tensors(name, layer.in_features, weights[name], recipe.weight_block)
        tensors |= {f"{name}.weight_packed": packed, f"{name}.weight_scale": scales,
                    f"{name}.weight_global_scale": g}
        if not exact:
            exact_scales[name] = weights[name].scale.item()
        if input_amax is not None:
            tensors[f"{name}.input_global_scale"] = _input_global_scale(name, input_amax[name])
    return tensors, exact_scales


def fused_groups(model: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """The layers among `names` that vLLM runs as one layer, with one weight global scale: q/k/v and gate/up of
    each decoder layer (the layers that read one input, named alike in every family sharq knows)."""
    family = FAMILIES.get(getattr(model.config, "model_type", None), DENSE)
    return [group for group in shared_input_groups(family, names) if len(group) > 1]


@torch.no_grad()
def _with_shared_global_scales(model: nn.Module, layers: Mapping[str, SharQLinear],
                               original_weights: Mapping[str, torch.Tensor] | None) -> dict[str, QWeight]:
    """The weights of each fused group's layers quantized again with the group's largest s_w (its smallest global
    scale, which llm-compressor gives the group: update_fused_layer_weight_global_scales), by their recipe's rules,
    from their original weights if given, else from Ŵ·s_w; a layer that has that s_w already is left out (kept as
    it is)."""
    weights = {}
    for group in fused_groups(model, layers):
        s_w = max((layers[name].weight_scale for name in group), key=float)
        for name in group:
            layer = layers[name]
            if not torch.equal(layer.weight_scale, s_w):
                source = (layer.qweight.effective() if original_weights is None
                          else _original_weight(name, layer, original_weights))
                weights[name] = layer.recipe.prepare_weight(source, tensor_scale=s_w)
    return weights


def _original_weight(name: str, layer: SharQLinear, original_weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """original_weights[name], checked to be what the layer was quantized from: it quantizes to the layer's
    weights."""
    if name not in original_weights:
        raise ValueError(f"original_weights has no weight for {name}, a layer whose global scale is shared")
    w = original_weights[name].detach().to(layer.weight_scale.device)
    own = layer.recipe.prepare_weight(w) if tuple(w.shape) == (layer.out_features, layer.in_features) else None
    if own is None or not (torch.equal(own.packed.codes, layer.weight_codes)
                           and torch.equal(own.packed.scales, layer.weight_scales)
                           and torch.equal(own.scale, layer.weight_scale)):
        raise ValueError(f"original_weights[{name!r}] {tuple(w.shape)} does not quantize to the layer's weights: it "
                         "is not the weight the layer was quantized from")
    return w


def exportable(recipe: Recipe) -> bool:
    """Whether compressed-tensors NVFP4 holds the recipe's weights: NVFP4 in blocks of a multiple of its group size,
    and nothing else (no bf16 outlier channels)."""
    return recipe.weight_fmt == "nvfp4" and not recipe.needs_calibration and recipe.weight_block % GROUP == 0


def exportable_recipes() -> list[str]:
    """The named recipes whose models export to compressed-tensors NVFP4."""
    return [name for name in list_recipes(compat=True) if exportable(get_recipe(name))]


def _exportable_recipe(model: nn.Module) -> Recipe:
    q = getattr(model, "sharq_quantization", None)
    if q is None:
        raise ValueError("this model was not quantized by sharq.quantize_model: nothing to export")
    r = Recipe.from_dict(q["recipe"])
    if not exportable(r):
        extra = ", bf16 outlier channels" if r.needs_calibration else ""
        raise ValueError(f"recipe {r.name!r} (weights {r.weight_fmt}, block {r.weight_block}{extra}) cannot be "
                         "written as compressed-tensors NVFP4, which holds NVFP4 weights in 16-element groups and "
                         f"nothing else: export a model quantized with {', '.join(exportable_recipes())}")
    if any(isinstance(m, SharQExperts) for m in model.modules()):
        raise ValueError("exporting fused MoE experts to compressed-tensors is not supported yet")
    return r


def global_scale(s_w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """compressed-tensors' weight_global_scale g for sharq's s_w, and whether fl(1/g) == s_w exactly.

    compressed-tensors divides by g where sharq multiplies by s_w. g = fl(1/s_w) is the only candidate: for 17 % of
    fp32 values (measured over a whole binade) no fp32 g has fl(1/g) == s_w, and the neighbours of fl(1/s_w)
    never do better; the export records those s_w in the config so sharq reads them back exactly."""
    s_w = s_w.detach().float().cpu().reshape(())
    one = torch.ones((), dtype=torch.float32)
    g = one / s_w
    return g.reshape(1), bool(one / g == s_w)


def _to_compressed_tensors(name: str, k: int, weight: QWeight, block: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(weight_packed, weight_scale, weight_global_scale, exact) of one layer's weight [N, K]: the same nibbles (both
    put the even element in the low nibble), each block scale repeated for every 16-element group of its block, K
    unpadded."""
    if k % GROUP:
        raise ValueError(f"{name}: in_features {k} is not a multiple of {GROUP}, which compressed-tensors' NVFP4 "
                         "needs")
    packed = weight.packed.codes[:, : k // 2].cpu().contiguous()
    scales = weight.packed.scales.repeat_interleave(block // GROUP, dim=1)[:, : k // GROUP]
    g, exact = global_scale(weight.scale)
    return packed, scales.cpu().contiguous().view(torch.float8_e4m3fn), g, exact


def _input_global_scale(name: str, amax: float) -> torch.Tensor:
    """compressed-tensors' static input_global_scale: 448·6 / amax, fp32, as llm-compressor computes it."""
    amax = torch.tensor(amax, dtype=torch.float32)
    if not (torch.isfinite(amax) and amax > 0):
        raise ValueError(f"input_amax[{name!r}] is {amax.item()}: an input scale needs a positive finite max")
    return (torch.full((), NVFP4_TENSOR_DIVISOR, dtype=torch.float32) / amax).reshape(1)


def _warn_unshared_global_scales(model: nn.Module, layers: Mapping[str, SharQLinear]) -> None:
    """vLLM runs each fused group with the largest global scale of its parts, which mis-scales the others."""
    ratios = [max(g) / min(g) for g in ([global_scale(layers[n].weight_scale)[0].item() for n in group]
                                        for group in fused_groups(model, layers))]
    unshared = [r for r in ratios if r != 1.0]
    if unshared:
        warnings.warn(f"{len(unshared)} of {len(ratios)} groups of layers that vLLM fuses (q/k/v, gate/up) have "
                      f"different weight global scales (ratio up to {max(unshared):.4g}): vLLM runs a fused layer "
                      "with the largest one, which scales the other parts' weights wrongly. transformers, "
                      "compressed-tensors and sharq read every layer's own scale; shared_global_scales=True gives "
                      "every group one.", UserWarning, stacklevel=3)


def _export_config(model: nn.Module, with_inputs: bool, sharq: dict) -> dict:
    """One config group: every nn.Linear is a target, and those sharq left unquantized (lm_head) are ignored."""
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    scheme = {"targets": ["Linear"], "weights": WEIGHT_ARGS, "input_activations": INPUT_ARGS if with_inputs else None,
              "output_activations": None, "format": FORMAT}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": ignore, "kv_cache_scheme": None, SHARQ_KEY: sharq}


def _signed(q: Mapping) -> tuple[dict, tuple[str, ...]]:
    """A sharq export's quantization_config as checkpoint_digest and verify_digest read it: every key, with the
    digest, which the export records in its sharq key, at the top level; and the keys the digest covers (every
    other one: the whole config)."""
    meta = dict(q[SHARQ_KEY])
    recorded = meta.pop(DIGEST, None)
    covered = {**q, SHARQ_KEY: meta}
    return {**covered, DIGEST: recorded}, tuple(covered)


@torch.no_grad()
def measure_input_amax(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """max |x| over the finite inputs of every quantized layer while `model` runs on `batches` of token ids: the
    calibration a compressed-tensors NVFP4 activation scheme needs (its per-tensor input scale is static)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SharQLinear)}
    amax = dict.fromkeys(layers, 0.0)

    def hook(name: str):
        def record(_module, args) -> None:
            amax[name] = max(amax[name], finite_amax(as_rows(args[0]), per_row=False).item())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return amax


# --- import --------------------------------------------------------------------------------------------------------
def is_compressed_tensors(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json has quant_method "compressed-tensors" (what sharq.load and
    `sharq eval --model` dispatch on)."""
    try:
        return _quantization_config(Path(path) / "config.json").get("quant_method") == QUANT_METHOD
    except (OSError, ValueError):
        return False


def _quantization_config(path: Path) -> dict:
    """config.json's quantization_config ({} when there is none)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) else {}


def read_compressed_tensors_config(directory: str | Path) -> dict:
    """The quantization_config of a compressed-tensors NVFP4 checkpoint, checked: every config group must store
    NVFP4 weights (4-bit float, symmetric, tensor_group, 16-element groups, static); nothing sharq cannot run
    (sparsity, transforms, KV-cache or output quantization) may be present. Anything else is a ValueError saying
    what the checkpoint holds."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    q = _quantization_config(path)
    if q.get("quant_method") != QUANT_METHOD:
        hint = ": it is a sharq checkpoint, load it with sharq.load" if q.get("quant_method") == "sharq" else ""
        raise ValueError(f"{path} is not a compressed-tensors checkpoint (quantization_config.quant_method is "
                         f"{q.get('quant_method')!r}){hint}")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(key):
            raise ValueError(f"{path}: the checkpoint has a {key}, which sharq cannot run")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{path}: quantization_config has no config_groups")
    for group, scheme in groups.items():
        scheme = scheme if isinstance(scheme, dict) else {}
        fmt, w = scheme.get("format") or q.get("format"), scheme.get("weights") or {}
        if fmt != FORMAT or any(w.get(k) != v for k, v in _FP4.items() if k != "scale_dtype") or w.get("dynamic"):
            raise ValueError(f"{path}: config group {group!r} stores {_describe(fmt, w)}; sharq imports "
                             f"compressed-tensors NVFP4 only (format {FORMAT!r}: 4-bit float weights, symmetric, "
                             f"strategy tensor_group, group_size {GROUP}, static)")
        if scheme.get("output_activations"):
            raise ValueError(f"{path}: config group {group!r} quantizes output activations, which sharq cannot run")
    return q


def _describe(fmt: str | None, w: Mapping) -> str:
    if not w:
        return f"format {fmt!r} without weight quantization"
    symmetric = "" if w.get("symmetric", True) else ", asymmetric"
    dynamic = ", dynamic" if w.get("dynamic") else ""
    return (f"format {fmt!r} weights: {w.get('num_bits')}-bit {w.get('type')}, strategy {w.get('strategy')}, "
            f"group_size {w.get('group_size')}{symmetric}{dynamic}")


def load_compressed_tensors(directory: str | Path, recipe: str | Recipe | None = None, *,
                            dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                            backend: str = "auto", verify: bool = True, strict: bool | None = None,
                            **options) -> nn.Module:
    """A sharq model from a compressed-tensors NVFP4 checkpoint, holding its 4-bit weights exactly: the codes and
    block scales as stored, s_w = fl(1/weight_global_scale) (or the exact s_w a sharq export recorded).

    A sharq export must match its digest (verify=False skips it, for an export that records none): an edited
    recipe or tensor is an IntegrityError. Every checkpoint's values are checked before any reaches the model: a
    tensor of the wrong dtype or shape, a negative or NaN block scale, a global scale g that is not a positive
    finite number or whose s_w = 1/g puts the layer's weights beyond fp32's range is an error naming the tensor.

    `recipe` (with `options`) is any sharq recipe with NVFP4 weights; its weight_block becomes 16, the checkpoint's
    group size, unless `options` sets one (a block of 32 or more needs equal scales within it). None: the recipe a
    sharq export recorded, else "sharq". The checkpoint's activation scheme (input_global_scale) is not used: the
    recipe quantizes activations. strict=None: strict as a sharq export recorded, else False. dtype=None: the dtype
    its config records (the one a sharq export was made in), else float32. The model is built on
    the meta device (nothing is initialized randomly) and is a normal sharq model: sharq.save writes it as a sharq
    checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    q = read_compressed_tensors_config(directory)
    meta = _sharq_metadata(q.get(SHARQ_KEY), directory)
    r = _import_recipe(recipe, meta, options)
    # read once, into memory (a tensor read is a view of the file): the digest and the checks cover what loads
    tensors = {name: t.clone() for name, t in CheckpointTensors(weight_files(directory)).items()}
    if meta is not None and verify:
        signed, keys = _signed(q)
        verify_digest(signed, tensors, str(directory), keys)
    quantized = sorted(n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed"))
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    dtype = dtype or saved_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target_modules = meta["target_modules"] if meta else _target_modules(model, quantized)
    share_inputs = meta["share_inputs"] if meta else True
    if strict is None:
        strict = meta["strict"] if meta else False
    quantize_model(model, r, backend=backend, target_modules=target_modules, share_inputs=share_inputs, strict=strict)
    _check_modules(model.sharq_quantization["modules"], quantized, directory)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, SharQLinear)}
    exact = meta["weight_scale"] if meta else {}
    state = {}
    for name in tensors:
        prefix, _, local = name.rpartition(".")
        if prefix not in layers or local not in _COMPRESSED:
            t = tensors[name]
            state[name] = t.to(dtype) if t.is_floating_point() else t
    for name, layer in layers.items():
        state |= {f"{name}.{k}": v for k, v in
                  _from_compressed_tensors(name, layer, tensors, r.weight_block, exact.get(name)).items()}
    check_tensors(model.state_dict(), {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}, payload_names(model),
                  tied_names(model), str(directory))
    model.load_state_dict(state, strict=False, assign=True)
    finish_loading(model, directory, state)  # ties, refuses what is unloaded, makes inv_freq, the generation config
    return model.to(device).eval()


def compressed_tensors_recipe(directory: str | Path, recipe: str | Recipe | None = None, **options) -> Recipe:
    """The recipe load_compressed_tensors(directory, recipe, **options) runs, checked from the config alone (so
    `sharq eval` refuses a recipe before any tensor is read)."""
    q = read_compressed_tensors_config(directory)
    return _import_recipe(recipe, _sharq_metadata(q.get(SHARQ_KEY), Path(directory)), options)


def _sharq_metadata(meta, directory: Path) -> dict | None:
    """The sharq key of an export, checked (None for checkpoints sharq did not write)."""
    if meta is None:
        return None
    where = f"{directory}: quantization_config.{SHARQ_KEY}"
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise ValueError(f"{where} must be an object with the recipe, got {meta!r}")
    targets, scales = meta.get("target_modules"), meta.get("weight_scale", {})
    if not (targets is None or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{where}.target_modules must be a list of names or null, got {targets!r}")
    for key in ("share_inputs", "strict"):
        if not isinstance(meta.get(key, False), bool):
            raise ValueError(f"{where}.{key} must be true or false")
    if not isinstance(scales, dict) or not all(isinstance(v, float) for v in scales.values()):
        raise ValueError(f"{where}.weight_scale must map layer names to numbers, got {scales!r}")
    try:
        Recipe.from_dict(meta["recipe"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {"recipe": meta["recipe"], "target_modules": targets, "share_inputs": meta.get("share_inputs", True),
            "strict": meta.get("strict", False), "weight_scale": scales}


def _import_recipe(recipe: str | Recipe | None, meta: dict | None, options: dict) -> Recipe:
    """The recipe run on a checkpoint's fixed NVFP4 weights. One with bf16 weights (bf16 itself, or any activations
    on bf16 weights) keeps its activations and takes the checkpoint's weights: the checkpoint holds no others, so
    "bf16" there is its 4-bit weights with bf16 activations, the row that says what its weights alone cost."""
    if recipe is None and meta is not None:
        r = get_recipe(Recipe.from_dict(meta["recipe"]), **options)
    else:
        r = get_recipe("sharq" if recipe is None else recipe, **options)
        if r.weight_fmt == "bf16" and not r.needs_calibration:
            on = "bf16 activations" if not r.stages else f"{r.name}'s activations"
            r = r.with_options(weight_fmt="nvfp4", weight_block=GROUP,
                               description=f"the checkpoint's NVFP4 weights, {on}")
        if r.weight_fmt == "nvfp4" and "weight_block" not in options:
            r = r.with_options(weight_block=GROUP)
    if r.weight_fmt != "nvfp4" or r.needs_calibration or r.weight_block % GROUP:
        raise ValueError(f"recipe {r.name!r} (weights {r.weight_fmt}, block {r.weight_block}"
                         f"{', calibrated outlier channels' if r.needs_calibration else ''}) cannot run on a "
                         "compressed-tensors NVFP4 checkpoint: choose a recipe with NVFP4 weights and a block that "
                         f"is a multiple of 16 ({', '.join(exportable_recipes())})")
    return r


def _target_modules(model: nn.Module, quantized: list[str]) -> list[str] | None:
    """quantize_model's target_modules for the checkpoint's quantized linears: None where they are the family's
    default (q/k/v and gate/up then share their prepared input), else their names inside a decoder layer."""
    if model.config.model_type in FAMILIES and sorted(target_linears(model)) == quantized:
        return None
    return sorted({m[2] for n in quantized if (m := _LAYER.match(n))})


def _check_modules(built: list[str], quantized: list[str], directory: Path) -> None:
    missing, extra = sorted(set(quantized) - set(built)), sorted(set(built) - set(quantized))
    if missing or extra:
        raise ValueError(f"{directory}: the checkpoint's quantized linears do not match a sharq structure (sharq "
                         "quantizes the same linears of every decoder layer, and no MoE experts or other modules): "
                         f"{len(missing)} quantized in the checkpoint but not in sharq's structure (e.g. "
                         f"{missing[:2]}), {len(extra)} in sharq's structure but not quantized in the checkpoint (e.g. "
                         f"{extra[:2]})")


def _from_compressed_tensors(name: str, layer: SharQLinear, tensors: Mapping[str, torch.Tensor], block: int,
                             exact_scale: float | None) -> dict[str, torch.Tensor]:
    """sharq's payload of one layer (weight_codes, weight_scales, weight_scale) from the checkpoint's, unchanged
    but for K's zero padding to the block and one scale per block of 16·f elements instead of f equal ones; every
    value checked first."""
    n, k = layer.out_features, layer.in_features
    if k % GROUP:
        raise ValueError(f"{name}: in_features {k} is not a multiple of {GROUP}")
    want = {"weight_packed": (torch.uint8, (n, k // 2)), "weight_scale": (torch.float8_e4m3fn, (n, k // GROUP)),
            "weight_global_scale": (torch.float32, None)}
    for local, (dtype, shape) in want.items():
        key = f"{name}.{local}"
        if key not in tensors:
            raise IntegrityError(f"{name}: the checkpoint has weight_packed but no {local}")
        found, found_shape = tensors[key].dtype, tuple(tensors[key].shape)
        if found != dtype or found_shape not in ([shape] if shape else [(), (1,)]):
            raise IntegrityError(f"{key} is {found} {found_shape}, expected {dtype} {shape or (1,)}")
    scales = tensors[f"{name}.weight_scale"].view(torch.uint8)
    nan = (scales & 0x7F) == F.UE4M3_NAN  # the magnitude bits, either sign
    if nan.any():
        raise ValueError(f"{name}.weight_scale holds {int(nan.sum())} NaN block scale(s) (byte 0x7F or 0xFF): "
                         "NVFP4 block scales are finite")
    if (scales & _SCALE_SIGN).any():
        raise ValueError(f"{name}.weight_scale holds negative scales; NVFP4 block scales are unsigned")
    g = tensors[f"{name}.weight_global_scale"].reshape(())
    if not (torch.isfinite(g) and g > 0):
        raise ValueError(f"{name}.weight_global_scale is {g.item()}: it must be a positive finite number")
    s_w = torch.ones((), dtype=torch.float32) / g
    if not torch.isfinite(s_w * NVFP4_TENSOR_DIVISOR):
        raise ValueError(f"{name}.weight_global_scale is {g.item():.9g}: s_w = 1/g = {s_w.item():.9g} puts the "
                         f"layer's largest weights (up to {NVFP4_TENSOR_DIVISOR:g}·s_w) beyond fp32's range")
    if exact_scale is not None:
        s_w = torch.tensor(exact_scale, dtype=torch.float32)
        if not torch.equal(global_scale(s_w)[0].reshape(()), g):
            raise ValueError(f"{name}: the s_w the sharq export recorded does not belong to its weight_global_scale: "
                             "the checkpoint was changed after export")
    kp = -(-k // block) * block
    codes = torch.nn.functional.pad(tensors[f"{name}.weight_packed"], (0, (kp - k) // 2))
    return {"weight_codes": codes, "weight_scales": _coarsen(name, scales, block // GROUP), "weight_scale": s_w}


def _coarsen(name: str, scales: torch.Tensor, f: int) -> torch.Tensor:
    """One scale per f consecutive 16-element scales, which must be equal (the last block may be partial: its
    padding has no scale of its own)."""
    n, m = scales.shape
    blocks = -(-m // f)
    grouped = torch.cat([scales, scales[:, -1:].expand(n, blocks * f - m)], dim=1).reshape(n, blocks, f)
    if not (grouped == grouped[..., :1]).all():
        raise ValueError(f"{name}: its 16-element scales differ within a {16 * f}-element block, so a recipe with "
                         f"weight_block {16 * f} cannot hold them; load it with weight_block=16")
    return grouped[..., 0].contiguous()

