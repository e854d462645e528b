"""transformers integration (registered under quant_method "sharq" with transformers' quantizer hooks as soon as
both sharq and transformers' quantizer registry are imported, in either order: `import sharq` itself stays cheap):

- `AutoModelForCausalLM.from_pretrained(DIR)` loads a sharq checkpoint, as strictly as `sharq.load`: before any
  weight is read into the model, the checkpoint's digest is checked and every tensor's name, dtype and shape is
  compared with the structure its quantization_config builds (transformers itself would only warn about a missing
  tensor, leave it randomly initialized, and cast a mis-typed one).
- every model sharq quantizes carries the quantizer, so `model.save_pretrained(DIR)` (and `push_to_hub`) write a
  sharq checkpoint, digest included. `sharq.save` is the same writer, plus an atomic replace and the tokenizer.

Quantizing a dense model on the fly through from_pretrained is not supported: use sharq.quantize_model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import models
from ..checkpoint import (
    DEFINING_KEYS,
    DIGEST,
    FORMAT_VERSION,
    CheckpointTensors,
    check_tensors,
    checkpoint_digest,
    payload_names,
    quantization_config,
    quantize_like,
    tied_on_load,
    unique_state,
    validate_quantization_config,
    verify_digest,
)
from ..nn import SharQLinear


class SharQConfig(QuantizationConfigMixin):
    """The `quantization_config` block of a sharq checkpoint (docs/FORMAT.md). Its values are validated here, before
    transformers allocates the model."""

    def __init__(self, recipe: dict | None = None, modules: list[str] | None = None, target_modules=None,
                 share_inputs: bool = True, strict: bool = False, format_version: int = FORMAT_VERSION,
                 checkpoint_sha256: str | None = None, **kwargs):
        self.quant_method = "sharq"
        self.format_version = format_version
        self.recipe = recipe
        self.modules = modules
        self.target_modules = target_modules
        self.share_inputs = share_inputs
        self.strict = strict
        self.checkpoint_sha256 = checkpoint_sha256
        validate_quantization_config({**kwargs, **self.to_dict()}, "sharq quantization_config")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*DEFINING_KEYS, DIGEST)}


class SharQHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized checkpoints only

    def _process_model_before_weight_loading(self, model, **kwargs):
        q = self.quantization_config.to_dict()
        files = [Path(f) for f in kwargs.get("checkpoint_files") or []]
        where = str(files[0].parent) if files else "the checkpoint"
        tensors = CheckpointTensors(files)
        quantize_like(model, q)
        check_tensors(model.state_dict(), tensors.info, payload_names(model), tied_on_load(model), where)
        verify_digest(q, tensors, where)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():  # transformers fills buffers directly: rebuild what derives from the payload
            if isinstance(m, SharQLinear):
                m.refresh_values()
        return model

    def get_state_dict_and_metadata(self, model):
        """What save_pretrained writes: the state with tied tensors once, and the digest, recorded in the config
        before transformers writes config.json. The names stay the model's own (no conversion mapping to revert:
        save_pretrained would otherwise write some families' original checkpoint names, e.g. Mixtral's
        `block_sparse_moe`, which neither the digest nor the loaders know)."""
        model._weight_conversions = []
        state = unique_state(model)
        self.quantization_config.checkpoint_sha256 = checkpoint_digest(quantization_config(model), state)
        return state, {"quant_method": "sharq"}

    def update_weight_conversions(self, weight_conversions, model=None):  # earlier 5.x pass no model
        """A sharq checkpoint holds the quantized model's own state names (docs/FORMAT.md): nothing to convert."""
        return []

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach(model: nn.Module) -> None:
    """Give a model sharq just quantized the quantizer and config transformers consults when saving."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        return
    config = SharQConfig(**{k: v for k, v in quantization_config(model).items() if k != "quant_method"})
    model.config.quantization_config = config
    model.hf_quantizer = SharQHfQuantizer(config, pre_quantized=True)


def register() -> None:
    """Register once (transformers refuses a second registration of the same name)."""
    if "sharq" not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config("sharq")(SharQConfig)
        register_quantizer("sharq")(SharQHfQuantizer)
    if attach not in models.QUANTIZED_HOOKS:
        models.QUANTIZED_HOOKS.append(attach)


register()  # on import: sharq's package imports this module once transformers' quantizer registry is imported
