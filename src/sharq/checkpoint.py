"""Quantized checkpoints: a Hugging Face-style directory with the packed payloads in safetensors (docs/FORMAT.md).

    config.json         the model's config plus a `quantization_config` block (quant_method "sharq", the format
                        version, the whole recipe, which modules are quantized, and `checkpoint_sha256`)
    model.safetensors   every tensor of the quantized model's state: packed codes, scale codes and scales of the
                        quantized linears, and the unquantized tensors (embeddings, norms, lm_head), no pickle
    tokenizer files     when a tokenizer is given

`checkpoint_sha256` covers the quantization config and every tensor's name, dtype, shape and bytes (the rest of
config.json, the architecture's hyperparameters, is trusted as in any Hugging Face checkpoint). Every reader
(`load` here, and `from_pretrained` through the transformers integration) checks each tensor's name, dtype and shape
against the structure the config builds, then the digest, before any payload reaches the model: a checkpoint loads
bit-identical to what was saved, or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .hf import PREVIOUS, temp_dir_beside, transformers_progress
from .models import materialize, model_state, quantize_model, target_linears
from .nn import SharQLinear
from .recipes import Recipe

FORMAT_VERSION = 2  # 1: the hash covered only model.safetensors (sharq 0.1)
FORMAT_1_KEYS = ("weights_sha256",)  # that hash's key
READS = (1, 2)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DIGEST = "checkpoint_sha256"
# The keys of quantization_config that define the model (the digest covers exactly these).
DEFINING_KEYS = ("quant_method", "format_version", "recipe", "target_modules", "share_inputs", "modules", "strict")
# Keys format 2 gained later, with the value a checkpoint without them means: at that value the digest leaves them out,
# so checkpoints written before them keep their digest.
LATER_KEYS = {"strict": False}


class IntegrityError(ValueError):
    """A checkpoint that is not what was saved: a digest mismatch, a missing digest, or tensors that do not fit."""


def quantization_config(model: nn.Module) -> dict:
    """The quantization_config block of a model sharq quantized (without its digest)."""
    q = getattr(model, "sharq_quantization", None)
    if q is None:
        raise ValueError("this model was not quantized by sharq.quantize_model: nothing to save as a sharq checkpoint")
    return {"quant_method": "sharq", "format_version": FORMAT_VERSION, **q}


def checkpoint_digest(qcfg: Mapping, tensors: Mapping[str, torch.Tensor], keys: Iterable[str] = DEFINING_KEYS) -> str:
    """sha256 of the defining keys of the quantization config (`keys`: a sharq checkpoint's by default) and of every
    tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(b"sharq checkpoint\n")
    defining = {k: qcfg.get(k, LATER_KEYS.get(k)) for k in keys}
    defining = {k: v for k, v in defining.items() if k not in LATER_KEYS or v != LATER_KEYS[k]}
    h.update(json.dumps(defining, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"\n{name}\n{str(t.dtype).removeprefix('torch.')}\n{list(tensors[name].shape)}\n".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. lm_head = embed_tokens) stored once, under their first name."""
    tied = tied_names(model)
    return {n: t.detach().contiguous().cpu() for n, t in model_state(model).items() if n not in tied}


def payload_names(model: nn.Module) -> set[str]:
    """State-dict names whose dtype is part of the format (SharQLinear.PAYLOAD): never cast on load."""
    return {f"{prefix}.{b}" for prefix, m in model.named_modules() if isinstance(m, SharQLinear)
            for b in SharQLinear.PAYLOAD}


# --- writing -------------------------------------------------------------------------------------------------------
def save(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False,
         progress: bool = False) -> Path:
    """Write a sharq checkpoint of a model quantized with sharq.quantize_model (progress=True: transformers' bar).

    Atomic: everything is written into a new directory beside `directory`, which then takes its place, so an
    interrupted save leaves any previous checkpoint intact. An existing file, a non-empty directory without
    overwrite=True, or a non-empty directory that is not a sharq checkpoint (overwrite only replaces those) is a
    FileExistsError."""
    quantization_config(model)

    def write(tmp: Path) -> None:
        with transformers_progress(progress):
            model.save_pretrained(tmp)  # the transformers integration makes this a sharq checkpoint, with its digest
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomically(Path(directory), write, overwrite=overwrite, replaceable=is_checkpoint,
                            kind="sharq checkpoint")


def write_atomically(out: Path, write: Callable[[Path], None], *, overwrite: bool,
                     replaceable: Callable[[Path], bool], kind: str) -> Path:
    """Run `write` on a new directory, which then takes the place of `out`, so an interrupted write leaves any
    previous directory intact. A file, or a non-empty directory without overwrite=True or that `replaceable`
    refuses, is a FileExistsError.

    The new directory lives in a temporary one beside `out`, `.NAME.tmp-*`, under the lock `.NAME.lock` (left
    behind, empty): the temporary directories of writers killed outright are deleted by the next write into `out`
    (hf.temp_dir_beside). Every file written gets 0666 & ~umask and every directory 0777 & ~umask, as open() and
    mkdir() make them (safetensors writes through a private 0600 temporary file)."""
    out = Path(os.path.abspath(out))  # "." and "..": the directory they name
    cwd = Path.cwd()
    if not out.name or out == cwd or out in cwd.parents:
        raise ValueError(f"{out} is the working directory or holds it: give the {kind} a directory of its own")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a {kind} directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite=True to replace it")
        if not replaceable(out):
            raise FileExistsError(f"{out} is not a {kind}: overwrite=True replaces only those")
    out.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    with temp_dir_beside(out.parent / f".{out.name}.lock", out.parent / f".{out.name}.tmp-", out) as work:
        new, previous = work / out.name, work / PREVIOUS
        new.mkdir()  # 0777 & ~umask: a directory to share, not the temporary directory's private 0700
        write(new)
        for path in new.rglob("*"):
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        try:
            if out.exists():  # moved aside, and deleted with `work` only once `new` is in place
                os.replace(out, previous)
            os.replace(new, out)
        except BaseException:  # put back (a writer killed here outright: the next write into `out` puts it back)
            if previous.is_dir() and not out.exists():
                os.replace(previous, out)
            raise
    return out


# --- reading -------------------------------------------------------------------------------------------------------
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
    """The checkpoint's quantization_config, validated (validate_quantization_config)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a sharq checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "sharq":
        raise ValueError(f"{path} has no sharq quantization_config (quant_method 'sharq')")
    validate_quantization_config(q, str(path))
    return q


def validate_quantization_config(q: Mapping, where: str) -> Recipe:
    """Check every value of a quantization_config (types, the recipe's formats and block sizes) before anything
    is allocated; returns its recipe."""
    if q.get("format_version") not in READS:
        raise ValueError(f"{where}: sharq checkpoint format version {q.get('format_version')!r} is not supported by "
                         f"this sharq (reads versions {', '.join(map(str, READS))}); upgrade sharq")
    unknown = sorted(set(q) - {*DEFINING_KEYS, DIGEST, *(FORMAT_1_KEYS if q["format_version"] == 1 else ())})
    if unknown:  # a key a later sharq defines the model by: this one would compute another model
        raise ValueError(f"{where}: quantization_config has keys this sharq does not know ({', '.join(unknown)}): "
                         "written by a later sharq? upgrade sharq")
    for key in ("recipe", "modules"):
        if q.get(key) is None:
            raise ValueError(f"{where}: quantization_config lacks {key!r}")
    if not isinstance(q["recipe"], dict):
        raise ValueError(f"{where}: quantization_config's recipe must be an object, got {q['recipe']!r}")
    for key in ("modules", "target_modules"):
        value = q.get(key)
        if not (value is None and key == "target_modules") and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where}: quantization_config's {key} must be a list of module names, got {value!r}")
    for key in ("share_inputs", "strict"):
        if not isinstance(q.get(key, False), bool):
            raise ValueError(f"{where}: quantization_config's {key} must be true or false")
    try:
        return Recipe.from_dict(q["recipe"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def verify_digest(q: Mapping, tensors: Mapping[str, torch.Tensor], where: str,
                  keys: Iterable[str] = DEFINING_KEYS) -> None:
    """The digest recorded in the config (its `checkpoint_sha256`) must match the config's `keys` and the tensors."""
    recorded = q.get(DIGEST)
    if recorded is None:
        hint = (" (format 1, sharq 0.1: its hash covered only the weights file; re-save it with sharq.save)"
                if q.get("format_version") == 1 else "")
        raise IntegrityError(f"{where} records no {DIGEST}{hint}: nothing proves it is the model that was saved. "
                             "Load it anyway with sharq.load(..., verify=False)")
    if checkpoint_digest(q, tensors, keys) != recorded:
        raise IntegrityError(f"{where}: the tensors and quantization_config do not match the {DIGEST} recorded in "
                             "config.json: the checkpoint is corrupt or was changed after saving")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, else the shards its index lists (transformers'
    order, so that sharq.load and from_pretrained read the same files where a directory holds both)."""
    index = directory / WEIGHTS_INDEX
    if index.is_file() and not (directory / WEIGHTS).is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        return [directory / s for s in shards]
    return [directory / WEIGHTS]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint's safetensors files, read one at a time on access (the headers up front, each
    file opened once), so hashing a checkpoint never holds a second copy of it. A tensor read is a view of the
    file's memory map, which a later write to the file would change: copy what is kept. A truncated or corrupt file
    is a ValueError, a missing one a FileNotFoundError."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self._file: dict[str, Path] = {}
        self._open: dict[Path, safe_open] = {}
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}  # name -> (dtype, shape), from the headers
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint weights {path} are missing")
            try:
                f = self._open[path] = safe_open(str(path), "pt")
                for name in f.keys():
                    if name in self._file:
                        raise IntegrityError(f"{path} repeats tensor {name} of {self._file[name]}")
                    header = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                    if dtype is None:
                        raise IntegrityError(f"{path}: tensor {name} has an unsupported dtype {header.get_dtype()}")
                    self._file[name], self.info[name] = path, (dtype, tuple(header.get_shape()))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open[self._file[name]].get_tensor(name)

    def __iter__(self):
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def check_tensors(expected: Mapping[str, torch.Tensor], found: Mapping[str, tuple[torch.dtype, tuple]],
                  payload: set[str], tied: set[str], where: str) -> None:
    """Names, dtypes and shapes of a checkpoint's tensors (`found`: name -> (dtype, shape)) against the model its
    config builds. Payload tensors keep their exact dtype; the unquantized floating tensors (embeddings, norms,
    biases) may come in another floating dtype and are cast to the model's, as transformers does."""
    missing = sorted(set(expected) - set(found) - tied)
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise IntegrityError(f"{where}: checkpoint tensors do not match the model: {len(missing)} missing (e.g. "
                             f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for name, (dtype, shape) in found.items():
        want = expected[name]
        castable = name not in payload and dtype.is_floating_point and want.dtype.is_floating_point
        if tuple(shape) != tuple(want.shape) or (dtype != want.dtype and not castable):
            raise IntegrityError(f"{where}: tensor {name} is {dtype} {tuple(shape)}, expected {want.dtype} "
                                 f"{tuple(want.shape)}")


def quantize_like(model: nn.Module, q: Mapping, backend: str = "auto", strict: bool | None = None) -> nn.Module:
    """Give a freshly built (unquantized) model the structure a checkpoint's quantization_config describes, with
    placeholder payloads for the checkpoint's tensors to fill. Used by `load` and by the transformers integration.
    strict=None: the checkpoint's strict mode (False where it records none)."""
    recipe = Recipe.from_dict(q["recipe"])
    calibration = None
    if recipe.needs_calibration:  # only the channel count matters for the structure; the payload brings the rest
        calibration = {n: torch.zeros(m.in_features) for n, m in target_linears(model, q.get("target_modules")).items()}
    quantize_model(model, recipe, backend=backend, target_modules=q.get("target_modules"), calibration=calibration,
                   share_inputs=q.get("share_inputs", True),
                   strict=q.get("strict", LATER_KEYS["strict"]) if strict is None else strict)
    if sorted(model.sharq_quantization["modules"]) != sorted(q["modules"]):
        raise IntegrityError("the checkpoint's quantized modules do not match the model its config builds")
    return model


def load(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         backend: str = "auto", *, verify: bool = True, strict: bool | None = None, progress: bool = False
         ) -> nn.Module:
    """A model saved by `save` (or by save_pretrained of a sharq model), with outputs bit-identical to the saved
    model's (in the dtype it was saved in; `dtype` casts its unquantized tensors to another). Every tensor's name,
    dtype and shape is checked against the structure the config describes, then the digest (verify=False skips
    it, for checkpoints that record none): any mismatch is an error, before any tensor reaches the model. The
    model is as strict (quantize_model's strict=) as the one saved; strict=True or False overrides that.

    The model is built on the meta device and takes the checkpoint's tensors as they are read, so nothing is
    initialized or quantized only to be overwritten; what a checkpoint does not hold is made afterwards
    (finish_loading). progress=True shows the three steps (read and verify, build, fill) on stderr."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    q = read_quantization_config(directory)
    tensors = CheckpointTensors(weight_files(directory))
    with tqdm(total=3, desc=f"load {directory.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("read")
        # read once, into the model's own memory (a tensor read is a view of the file): the digest covers what loads
        state = {name: t.clone() for name, t in tensors.items()}
        bar.update()
        bar.set_postfix_str("build")
        model = build_on_meta(directory, q, dtype, backend, strict)
        expected, payload = model.state_dict(), payload_names(model)
        # the structure first, so a missing, extra or reshaped tensor is named; then the digest over every byte
        check_tensors(expected, tensors.info, payload, tied_on_load(model), str(directory))
        if verify:
            verify_digest(q, state, str(directory))
        bar.update()
        bar.set_postfix_str("fill")
        model.load_state_dict({n: t if n in payload else t.to(expected[n].dtype) for n, t in state.items()},
                              strict=False, assign=True)
        finish_loading(model, directory, state)
        bar.update()
    return model.to(device).eval()


def build_on_meta(directory: Path, q: Mapping, dtype: torch.dtype | None, backend: str = "auto",
                  strict: bool | None = None) -> nn.Module:
    """The model a checkpoint's config.json and quantization_config describe, on the meta device: sharq's layers
    with placeholder payloads, nothing allocated or initialized (dtype None: the one it was saved in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return quantize_like(AutoModelForCausalLM.from_config(config, dtype=dtype or saved_dtype(config)), q,
                             backend, strict)


def saved_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config records (transformers writes the model's there), float32 where it records
    none or no floating-point one."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def check_checkpoint(directory: str | Path) -> dict:
    """The checks `load` runs before any tensor reaches a model, for a reader that then loads the tensors itself
    (the vLLM integration): the quantization config, the digest over the tensors the files hold, and every
    tensor's name, dtype and shape against the model the config builds. Returns the quantization config."""
    directory = Path(directory)
    q = read_quantization_config(directory)
    tensors = CheckpointTensors(weight_files(directory))
    model = build_on_meta(directory, q, torch.float32)
    check_tensors(model.state_dict(), tensors.info, payload_names(model), tied_on_load(model), str(directory))
    verify_digest(q, tensors, str(directory))
    return q


def finish_loading(model: nn.Module, directory: Path, loaded: Iterable[str]) -> None:
    """Complete a model built on the meta device once it holds a checkpoint's tensors (`loaded`, by
    load_state_dict with assign=True), as from_pretrained does: tie the weights the checkpoint lacks to those it
    holds (a checkpoint holding both of a tied pair, e.g. an lm_head trained apart from the embeddings, keeps
    both), refuse a state tensor still unloaded (it would be initialized at random), make on the CPU what no
    checkpoint holds (non-persistent buffers such as RoPE's inv_freq; SharQLinear's bf16 Ŵ comes from its load
    hook), and take the checkpoint's generation config (its stop tokens and sampling defaults)."""
    from transformers import GenerationConfig

    model.tie_weights(missing_keys=set(model.state_dict()) - set(loaded))
    unloaded = [n for n, t in model.state_dict().items() if t.is_meta]
    if unloaded:
        raise IntegrityError(f"{directory}: {len(unloaded)} tensor(s) of the model were not loaded, e.g. "
                             f"{unloaded[0]}")
    materialize(model, model, torch.device("cpu"))
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (saved once). Meta tensors have no storage address
    (every one reads 0), so there sharing is being the same tensor, as tied parameters are."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def tied_on_load(model: nn.Module) -> set[str]:
    """The names a checkpoint may lack because the model ties them after loading: tied_names, and those transformers
    declares tied (`all_tied_weights_keys`), which from_pretrained ties only once the weights are in."""
    return tied_names(model) | set(getattr(model, "all_tied_weights_keys", None) or ())
