"""transformers integration: `AutoModelForCausalLM.from_pretrained(DIR)` loads a sharq checkpoint after
`import sharq` (registered under quant_method "sharq" with transformers' quantizer hooks).

transformers builds the model on the meta device, calls our hook to swap in SharQLinear modules (their packed
buffers are placeholders then), loads every tensor of model.safetensors into them by name (uint8 payloads keep
their dtype), and calls our second hook, which rebuilds the derived bf16 weights. Quantizing a dense model on the
fly through from_pretrained is not supported: use sharq.quantize_model.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import FORMAT_VERSION, file_sha256, quantize_like
from .nn import SharQLinear


class SharQConfig(QuantizationConfigMixin):
    """The `quantization_config` block of a sharq checkpoint (docs/FORMAT.md)."""

    def __init__(self, recipe: dict, modules: list[str], target_modules=None, share_inputs: bool = True,
                 format_version: int = FORMAT_VERSION, weights_sha256: str | None = None, **kwargs):
        if format_version != FORMAT_VERSION:
            raise ValueError(f"sharq checkpoint format version {format_version!r} is not supported by this sharq "
                             f"(reads version {FORMAT_VERSION})")
        self.quant_method = "sharq"
        self.format_version = format_version
        self.recipe = recipe
        self.modules = modules
        self.target_modules = target_modules
        self.share_inputs = share_inputs
        self.weights_sha256 = weights_sha256


class SharQHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized checkpoints only

    def _process_model_before_weight_loading(self, model, **kwargs):
        q = self.quantization_config
        files = kwargs.get("checkpoint_files") or []
        if q.weights_sha256 is not None and len(files) == 1 and file_sha256(Path(files[0])) != q.weights_sha256:
            raise ValueError(f"{files[0]} does not match the sha256 recorded in config.json: the file is corrupt or "
                             "was changed after saving")
        return quantize_like(model, q.to_dict())

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():  # transformers fills buffers directly: rebuild what derives from the payload
            if isinstance(m, SharQLinear):
                m.refresh_values()
        q = self.quantization_config
        model.sharq_quantization = {"recipe": q.recipe, "target_modules": q.target_modules,
                                    "share_inputs": q.share_inputs, "modules": q.modules}
        return model

    def is_serializable(self):
        return False  # one writer: sharq.save (it records the weights' hash)

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register once (transformers refuses a second registration of the same name)."""
    if "sharq" not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config("sharq")(SharQConfig)
        register_quantizer("sharq")(SharQHfQuantizer)
