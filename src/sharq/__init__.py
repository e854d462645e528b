"""sharq: FP4 activation quantization with activation sparsity (SharQ, arXiv 2606.26587) for LLM inference."""

__version__ = "0.1.0"

import importlib.util

from .checkpoint import save
from .functional import sharq_decompose, simulate_linear
from .generate import generate
from .interop import export, load, load_model
from .models import calibrate, quantize_model
from .nn import SharQLinear
from .quant import QTensor, dequantize, fake_quantize, quantize
from .recipes import Recipe, get_recipe, list_recipes

if importlib.util.find_spec("transformers") is not None:  # from_pretrained(DIR) then loads sharq checkpoints
    from .integrations import register as _register

    _register()

__all__ = [
    "QTensor",
    "Recipe",
    "SharQLinear",
    "calibrate",
    "dequantize",
    "export",
    "fake_quantize",
    "generate",
    "get_recipe",
    "list_recipes",
    "load",
    "load_model",
    "quantize",
    "quantize_model",
    "save",
    "sharq_decompose",
    "simulate_linear",
]
