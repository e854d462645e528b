"""Quantized checkpoints: a Hugging Face-style directory with the packed payloads in safetensors (docs/FORMAT.md).

    config.json         the model's config plus a `quantization_config` block (quant_method "sharq", the format
                        version, the whole recipe, which modules are quantized)
    model.safetensors   every tensor of the quantized model's state: packed codes, scale codes and scales of the
                        quantized linears, and the unquantized tensors (embeddings, norms, lm_head), no pickle
    tokenizer files     when a tokenizer is given

`load` rebuilds the model from its config, gives it the same structure with `quantize_model`, checks every tensor's
name, dtype and shape against it, and loads the payloads: the outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .models import quantize_model, target_linears
from .recipes import Recipe

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def quantization_config(model: nn.Module) -> dict:
    q = getattr(model, "sharq_quantization", None)
    if q is None:
        raise ValueError("this model was not quantized by sharq.quantize_model: nothing to save as a sharq checkpoint")
    return {"quant_method": "sharq", "format_version": FORMAT_VERSION, **q}


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. lm_head = embed_tokens) stored once, under their first name."""
    tied = _tied_names(model)
    return {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items() if n not in tied}


def save(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write a sharq checkpoint of a model quantized with sharq.quantize_model."""
    from safetensors.torch import save_file

    qcfg = quantization_config(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_unique_state(model), str(out / WEIGHTS), metadata={"format": "pt", "quant_method": "sharq",
                                                                   "format_version": str(FORMAT_VERSION)})
    config = model.config.to_dict()
    config["quantization_config"] = {**qcfg, "weights_sha256": file_sha256(out / WEIGHTS)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory holding a sharq checkpoint (a config.json with quant_method "sharq")."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        q = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "sharq"


def read_quantization_config(directory: str | Path) -> dict:
    """The checkpoint's quantization_config, validated."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a sharq checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "sharq":
        raise ValueError(f"{path} has no sharq quantization_config (quant_method 'sharq')")
    if q.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: sharq checkpoint format version {q.get('format_version')!r} is not supported by "
                         f"this sharq (reads version {FORMAT_VERSION}); upgrade sharq")
    for key in ("recipe", "modules"):
        if key not in q:
            raise ValueError(f"{path}: quantization_config lacks {key!r}")
    return q


def quantize_like(model: nn.Module, q: dict, backend: str = "reference") -> nn.Module:
    """Give a freshly built (unquantized) model the structure a checkpoint's quantization_config describes, with
    placeholder payloads for the checkpoint's tensors to fill. Used by `load` and by the transformers integration."""
    recipe = Recipe.from_dict(q["recipe"])
    calibration = None
    if recipe.needs_calibration:  # only the channel count matters for the structure; the payload brings the rest
        calibration = {n: torch.zeros(m.in_features) for n, m in target_linears(model, q.get("target_modules")).items()}
    quantize_model(model, recipe, backend=backend, target_modules=q.get("target_modules"), calibration=calibration,
                   share_inputs=q.get("share_inputs", True))
    if sorted(model.sharq_quantization["modules"]) != sorted(q["modules"]):
        raise ValueError("the checkpoint's quantized modules do not match the model its config builds")
    return model


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_tensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file whose hash matches the config's (a flipped byte is an error, not a model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} are missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path} does not match the sha256 recorded in config.json: the file is corrupt or was "
                         "changed after saving")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         backend: str = "reference") -> nn.Module:
    """A model saved by `save`, with outputs bit-identical to the saved model's. Any mismatch between the files
    and the structure their config describes (missing, unexpected, mis-typed or mis-shaped tensors) is an error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    q = read_quantization_config(directory)
    Recipe.from_dict(q["recipe"])  # a bad recipe fails before the weights are read
    tensors = _read_tensors(directory / WEIGHTS, q.get("weights_sha256"))
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = quantize_like(AutoModelForCausalLM.from_config(config, dtype=dtype), q, backend)
    expected = model.state_dict()
    tied = {n for n in expected if n not in tensors and n in _tied_names(model)}
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint tensors do not match the model: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")
    for name, t in tensors.items():
        want = expected[name]
        if t.dtype != want.dtype or t.shape != want.shape:
            raise ValueError(f"{directory}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected {want.dtype} "
                             f"{tuple(want.shape)}")
    model.load_state_dict(tensors, strict=False)
    model.sharq_quantization = {k: v for k, v in q.items() if k not in ("quant_method", "format_version")}
    return model.to(device).eval()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (saved once)."""
    seen, tied = set(), set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied.add(name)
        seen.add(key)
    return tied
