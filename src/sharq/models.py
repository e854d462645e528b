"""Quantize the decoder linears of a Hugging Face causal LM (SPEC §7), and calibrate the recipes that need it.

What is quantized: q, k, v, o, gate, up, down of every decoder layer, and every expert of a fused MoE block.
What is not: embeddings, lm_head, norms, attention math, the MoE router. Families are described by data (which
module names to take and which of them read the same input), so a new family costs a line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from ._checks import check_count, position_limit
from ._format import plural
from .functional import check_backend, resolve_backend
from .hf import bos_token, tokenize
from .nn import SharedActivation, SharedBlockForward, SharQExperts, SharQLinear, check_channel_stats
from .quant import as_rows
from .recipes import Recipe, get_recipe


@dataclass(frozen=True)
class Family:
    """Which modules of a decoder layer to quantize, and which groups share their input."""

    linears: tuple[str, ...] = (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )
    shared_inputs: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
    )
    experts: str | None = None  # module name of a fused experts block inside the layer


DENSE = Family()
MOE = Family(experts="mlp.experts")  # dense layers of a MoE model (if any) still match the linears

FAMILIES: dict[str, Family] = {
    "llama": DENSE, "mistral": DENSE, "qwen2": DENSE, "qwen3": DENSE, "gemma3_text": DENSE, "gemma3": DENSE,
    "gemma2": DENSE, "gemma": DENSE, "qwen3_moe": MOE, "mixtral": MOE,
}

_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")

# Called with every model quantize_model returns. The transformers integration, which sits above this module,
# registers the hook that gives the model its `hf_quantizer`, so that save_pretrained writes a sharq checkpoint.
QUANTIZED_HOOKS: list[Callable[[nn.Module], None]] = []


T = TypeVar("T")


def with_progress(items: Iterable[T], enabled: bool, **bar) -> Iterable[T]:
    """`items`, under a tqdm bar on stderr when `enabled` (tqdm comes with the eval extra: quantizing needs only
    torch, so it is imported only for a bar). `bar` goes to tqdm (desc, total, unit)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, **bar)


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _family(model: nn.Module, target_modules: Sequence[str] | None) -> Family:
    if target_modules is not None:
        return Family(linears=tuple(target_modules), shared_inputs=())
    model_type = _model_type(model)
    if model_type not in FAMILIES:
        raise ValueError(
            f"sharq does not know the architecture {type(model).__name__} (model_type {model_type!r}); known: "
            f"{', '.join(sorted(FAMILIES))}. Pass target_modules=[...] (names inside a decoder layer, e.g. "
            "'self_attn.q_proj') to quantize it anyway.")
    return FAMILIES[model_type]


def decoder_layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, re.Match]]:
    """(full name, module, match of _LAYER) of the modules inside the language model's decoder layers: a
    multimodal model's vision tower has `layers.N` of its own, which SPEC §7 leaves unquantized."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    prefix = next((n + "." for n, m in model.named_modules() if m is decoder and n), "")
    for name, module in model.named_modules():
        if name.startswith(prefix) and (m := _LAYER.match(name)):
            yield name, module, m


def target_linears(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The decoder-layer linears that quantize_model replaces, by full module name."""
    family = _family(model, target_modules)
    return {name: module for name, module, m in decoder_layer_modules(model)
            if m[2] in family.linears and isinstance(module, nn.Linear)}


def shared_input_groups(family: Family, names: Iterable[str]) -> list[list[str]]:
    """The modules among `names` (full names) that read one input, by the family's shared_inputs: q/k/v and gate/up
    of each decoder layer, in the family's order."""
    names = set(names)
    return [[prefix + s for s in group if prefix + s in names] for group in family.shared_inputs
            for prefix in sorted({n[: -len(group[0])] for n in names if n.endswith(group[0])})]


def _common_parent(names: Sequence[str]) -> str:
    """The innermost module holding every one of `names` (e.g. 'model.layers.0.self_attn' for q/k/v)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError saying why it cannot be used here (an unknown name, CUDA on a
    machine without it or an index past its devices); sharq runs on the CPU and CUDA devices."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; expected cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has "
                             f"{plural(torch.cuda.device_count(), 'CUDA device')}")
    elif d.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r}; expected cpu, cuda or cuda:N")
    return d


def quantize_model(
    model: nn.Module,
    recipe: str | Recipe = "sharq",
    *,
    backend: str = "auto",
    target_modules: Sequence[str] | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
    share_inputs: bool = True,
    strict: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    **options,
) -> nn.Module:
    """Replace the decoder linears of `model` (in place) with SharQLinear modules running `recipe`; returns it.

    `options` go to the recipe (e.g. scale_granularity="token"). Calibrated recipes (outlier-channels) need
    `calibration`, the statistics of sharq.calibrate. `target_modules` overrides the family's module names for
    architectures sharq does not know. With share_inputs, q/k/v (and gate/up) prepare their common input once, and
    on the packed backend at decode sizes multiply it in one launch where that measured faster (nn.SharedActivation).
    strict=True raises a ValueError naming the layer when a weight or an input holds NaN/Inf (SPEC §8); the
    default lets them through as NaN so the problem stays visible. `backend="auto"` runs packed 4-bit kernels on
    CUDA where the recipe allows (functional.Backend).

    All or nothing: every argument is checked before the model is touched, and a failure on the way (a strict
    NaN weight in the last layer, running out of memory) leaves the model exactly as it was. A model is quantized
    once, with one recipe: a model sharq already quantized is refused.

    With `device`, each module to quantize is copied there (one at a time, decoder layer by decoder layer) and
    quantized on arrival, and the rest of the model follows at the end, so the device never holds more than the
    quantized layers plus one module in its original dtype: a model whose bf16 weights do not fit the GPU can be
    quantized onto it. Parameters on the meta device are allocated there and
    initialized as transformers initializes a new model (random weights: benchmarks of shapes that do not fit).
    progress=True shows a bar per quantized module (or decoder layer, with `device`) on stderr."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "compressed-tensors":
        raise ValueError("this model was loaded from a compressed-tensors checkpoint: quantizing its decompressed "
                         "weights again would change them; use sharq.load(directory, recipe=...), which keeps them")
    _check_unquantized(model)
    r = get_recipe(recipe, **options)
    for flag, value in (("share_inputs", share_inputs), ("strict", strict)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if device is not None:
        device = check_device(device)
        if is_dispatched(model):
            raise ValueError("this model is dispatched by accelerate (device_map): quantize_model quantizes each "
                             "layer where accelerate placed it; leave out device=")
        check_backend(backend, device)
    # an unknown backend, or one that cannot run the recipe, fails here
    resolve_backend(backend, r, device if device is not None else input_device(model))
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of names inside a decoder layer, e.g. "
                         f"[{target_modules!r}], not a string")
    family = _family(model, target_modules)
    linears = target_linears(model, target_modules)
    experts = [(n, m) for n, m, g in decoder_layer_modules(model) if family.experts and g[2] == family.experts]
    if not linears and not experts:
        raise ValueError(f"no module of {type(model).__name__} matches {list(family.linears)}")
    unmatched = sorted(set(family.linears) - {_LAYER.match(n)[2] for n in linears})
    if target_modules is not None and unmatched:
        raise ValueError(f"target_modules {unmatched} match no nn.Linear inside a decoder layer of "
                         f"{type(model).__name__}")
    if r.needs_calibration:
        _check_calibration(calibration, linears, r)

    groups: dict[str, SharedActivation] = {}
    blocks: list[tuple[nn.Module, SharedActivation]] = []
    if share_inputs and not r.needs_calibration:  # calibrated layers keep their own outlier channels: no sharing
        for members in shared_input_groups(family, linears):
            shared = SharedActivation(len(members))
            blocks.append((model.get_submodule(_common_parent(members)), shared))
            groups.update(dict.fromkeys(members, shared))

    def quantize_here(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            stats = calibration[name] if r.needs_calibration else None
            return SharQLinear.from_linear(module, r, backend, stats, groups.get(name), strict, name)
        return SharQExperts(module, r, backend, strict, name)

    def quantize(name: str, module: nn.Module) -> nn.Module:
        if hasattr(module, "_hf_hook"):
            return _quantize_dispatched(module, lambda: quantize_here(name, module), name)
        return quantize_here(name, module)

    targets = {**linears, **dict(experts)}
    desc = f"quantize {r.name}"
    restore = _restorer(model)
    try:
        if device is None:
            for name, module in with_progress(targets.items(), progress, desc=desc, total=len(targets),
                                              unit="module"):
                _set_module(model, name, quantize(name, module))
        else:  # each module is quantized from a copy on the device, the original kept for `restore`
            by_layer: dict[str, list[str]] = {}
            for name in targets:  # "model.layers.3.mlp.up_proj" belongs to "model.layers.3"
                by_layer.setdefault(name[: _LAYER.match(name).end(1)], []).append(name)
            for _, names in with_progress(by_layer.items(), progress, desc=desc, total=len(by_layer), unit="layer"):
                for name in names:
                    _set_module(model, name, quantize(name, _copy_onto(model, targets[name], device)))
            materialize(model, model, device)
    except BaseException:
        restore()
        raise
    for block, shared in blocks:
        block.forward = SharedBlockForward(block, shared, block.__dict__.get("forward"))
    model.sharq_quantization = {
        "recipe": r.to_dict(),
        "target_modules": list(target_modules) if target_modules is not None else None,
        "share_inputs": share_inputs,
        "modules": sorted(linears) + [n for n, _ in experts],
        "strict": strict,
    }
    for hook in QUANTIZED_HOOKS:
        hook(model)
    return model


def _check_unquantized(model: nn.Module) -> None:
    """A model is quantized once, with one recipe (the checkpoint's metadata describes one call)."""
    q = getattr(model, "sharq_quantization", None)
    if q is None and not any(isinstance(m, (SharQLinear, SharQExperts)) for m in model.modules()):
        return
    how = f"with recipe {q['recipe']['name']!r}" if q is not None else "(it holds sharq layers)"
    raise ValueError(f"this model is already quantized by sharq {how}: quantize_model quantizes an unquantized "
                     "model once, with one recipe for every layer it targets; to quantize other layers or use "
                     "another recipe, start again from the unquantized model")


def _check_calibration(calibration: Mapping[str, torch.Tensor] | None, linears: Mapping[str, nn.Linear],
                       recipe: Recipe) -> None:
    """Statistics for every targeted linear, each of the right shape and kind (nn.check_channel_stats)."""
    if calibration is None:
        raise ValueError(f"recipe {recipe.name!r} is calibrated: pass calibration=sharq.calibrate(model, texts, ...)")
    if not isinstance(calibration, Mapping):
        raise ValueError(f"calibration must map layer names to statistics (sharq.calibrate), got "
                         f"{type(calibration).__name__}")
    missing = sorted(set(linears) - set(calibration))
    if missing:
        raise ValueError(f"calibration has no statistics for {len(missing)} layer(s), e.g. {missing[0]}")
    for name, linear in linears.items():
        check_channel_stats(calibration[name], linear.in_features, name, linear.weight.is_meta)


def _restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts `model` back as it is now: every module's children, parameters and buffers, and every
    parameter's data and gradient (which moving a module replaces in place). References, nothing copied."""
    stores = [(store, dict(store)) for m in model.modules() for store in (m._modules, m._parameters, m._buffers)]
    params = [(p, p.data, p.grad) for p in model.parameters()]

    def restore() -> None:
        for store, saved in stores:
            store.clear()
            store.update(saved)
        for p, data, grad in params:
            p.data, p.grad = data, grad

    return restore


def _copy_onto(model: nn.Module, module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` on `device`, its meta tensors made there as `materialize` makes them; `module` itself is
    left as it is (a failed quantize_model must be able to give it back)."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:
            return t  # materialize replaces it in the copy
        return nn.Parameter(t.detach().to(device), t.requires_grad) if isinstance(t, nn.Parameter) else t.to(device)

    twin = copy.deepcopy(module, {id(t): moved(t) for t in (*module.parameters(), *module.buffers())})
    materialize(model, twin, device)
    return twin


def _quantize_dispatched(module: nn.Module, quantize: Callable[[], nn.Module], name: str) -> nn.Module:
    """A layer accelerate dispatched (device_map: an AlignDevicesHook on it), quantized where accelerate placed it:
    on its execution device, its weights loaded there first if they were offloaded (to CPU memory or disk). The
    new layer gets the same kind of hook: inputs moved to the execution device, outputs back where io_same_device
    says; an offloaded layer's payload is kept offloaded, in CPU memory (4.25–4.5 bits per weight instead of the
    16 it held there, or on disk), and moved to the execution device for each call, as accelerate does."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import align_module_device, has_offloaded_params, named_module_tensors

    hook = module._hf_hook
    if not isinstance(hook, AlignDevicesHook):
        raise ValueError(f"{name}: sharq quantizes models dispatched with a device_map (accelerate's "
                         f"AlignDevicesHook), not {type(hook).__name__}")
    offloaded = has_offloaded_params(module)
    with align_module_device(module):
        new = quantize()
    if offloaded:
        weights = {n: t.to("cpu") for n, t in named_module_tensors(new, include_buffers=True, recurse=True,
                                                                   remove_non_persistent=True)}
        add_hook_to_module(new, AlignDevicesHook(hook.execution_device, offload=True, weights_map=weights,
                                                 offload_buffers=True, place_submodules=True,
                                                 io_same_device=hook.io_same_device))
    else:
        add_hook_to_module(new, AlignDevicesHook(hook.execution_device, io_same_device=hook.io_same_device,
                                                 place_submodules=True))
    return new


def materialize(model: nn.Module, module: nn.Module, device: torch.device) -> None:
    """`module` on `device`: moved, and each tensor still on the meta device allocated there and filled by the
    model's own initializer (transformers' `_init_weights`), module by module. A module's other tensors are kept:
    they are flagged as initialized, which transformers' initializers respect (as in its from_pretrained), so a
    module that holds loaded weights beside a meta buffer (Gemma-3's scaled embedding) gets only the buffer made.
    A meta tensor that several modules share (tied weights) becomes one tensor they share: ties are kept as they
    are, never re-derived from the config (a model whose lm_head was untied stays untied)."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id of a meta tensor -> (it, what replaced it)
    for m in module.modules():
        meta = [(store, n) for store in (m._parameters, m._buffers) for n, t in store.items()
                if t is not None and t.is_meta]
        if not meta:
            continue
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise ValueError(f"{type(m).__name__} is on the meta device and {type(model).__name__} has no "
                             "_init_weights to fill it")
        from transformers.initialization import guard_torch_init_functions

        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if not t.is_meta:
                t._is_hf_initialized = True
        fresh = False
        for store, n in meta:
            old = store[n]
            if id(old) not in made:
                t = torch.empty_like(old, device=device)
                made[id(old)] = old, nn.Parameter(t, requires_grad=old.requires_grad) if store is m._parameters else t
                fresh = True
            store[n] = made[id(old)][1]
        if fresh:
            with torch.no_grad(), guard_torch_init_functions():
                init(m)
    module.to(device)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the execution device accelerate gave the model's top (a dispatched model,
    whose first parameter may be offloaded to meta), else the device of its first parameter."""
    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(model.parameters()).device


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model (a device_map: hooks that move tensors between devices)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict(), where each tensor accelerate offloaded (on the meta device between calls, the data in
    its hook's weights map, in CPU memory or on disk) is read from that map: what the model holds."""
    state = model.state_dict()
    for name, t in state.items():
        if t.is_meta:
            parts = name.split(".")
            for i in range(len(parts) - 1, -1, -1):  # the hook may sit on the tensor's module or an ancestor
                hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
                weights = getattr(hook, "weights_map", None)
                if weights is not None and (key := ".".join(parts[i:])) in weights:
                    state[name] = weights[key]
                    break
    return state


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as its device holds it: packed payloads (or a backend's own layout of them,
    SharQLinear.weight_bytes) and unquantized tensors, each storage counted once. Caches a backend derives from the
    payload (a bf16 Ŵ) are not counted."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, SharQLinear):
            total += m.weight_bytes
            continue
        state = [*m._parameters.values(), *(t for n, t in m._buffers.items() if n not in m._non_persistent_buffers_set)]
        for t in state:
            if t is None:
                continue
            key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def calibrate(
    model: nn.Module,
    texts: Iterable[str] | str,
    tokenizer,
    *,
    seqlen: int = 512,
    max_tokens: int = 16384,
    target_modules: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of every targeted linear, over up to `max_tokens` tokens of `texts` (one string is
    one text) run in windows of `seqlen` (at most the model's max_position_embeddings: positions past it were never
    trained). Calibrate the unquantized model. progress=True shows a bar per window on stderr."""
    seqlen, max_tokens = check_count("seqlen", seqlen), check_count("max_tokens", max_tokens, least=2)
    linears = target_linears(model, target_modules)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no unquantized linear to calibrate: calibrate the model "
                         "before sharq.quantize_model")
    limit = position_limit(getattr(model, "config", None))
    seqlen = min(seqlen, limit) if isinstance(limit, int) else seqlen
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs):
            x = as_rows(inputs[0].detach()).float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    text = texts if isinstance(texts, str) else "\n\n".join(texts)  # a string's characters are no texts
    ids = tokenize(text, tokenizer)[:max_tokens]
    if ids.numel() == 0:
        raise ValueError("calibration text is empty")
    bos = bos_token(tokenizer)  # every window starts as the model saw its texts start (as perplexity's windows do)
    body = max(seqlen - (bos is not None), 1)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = input_device(model)
    try:
        for start in with_progress(range(0, ids.numel(), body), progress, desc="calibrate", unit="window"):
            window = ids[start: start + body]
            window = window if bos is None else torch.cat([window.new_tensor([bos]), window])
            with torch.no_grad():  # statistics only: no graph kept for a backward
                model(window.unsqueeze(0).to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in linears if name in sums}
