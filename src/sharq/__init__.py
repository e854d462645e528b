"""sharq: FP4 activation quantization with activation sparsity (SharQ, arXiv 2606.26587) for LLM inference.

The public names are imported on first use (PEP 562): `import sharq` loads neither torch nor transformers, so
the command line, which runs inside this package, answers --help and argument errors at once. The transformers
integration (from_pretrained of a sharq checkpoint, save_pretrained of a sharq model) registers itself when
transformers' quantizer registry is imported, whichever of the two comes first.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from ._import_hooks import after_import

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "NonFiniteLogits": "_checks",
    "QTensor": "quant",
    "Recipe": "recipes",
    "SharQLinear": "nn",
    "calibrate": "models",
    "dequantize": "quant",
    "export": "interop",
    "fake_quantize": "quant",
    "generate": "generate",
    "get_recipe": "recipes",
    "list_recipes": "recipes",
    "load": "interop",
    "load_model": "interop",
    "quantize": "quant",
    "quantize_model": "models",
    "save": "checkpoint",
    "sharq_decompose": "functional",
    "simulate_linear": "functional",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ._checks import NonFiniteLogits  # noqa: F401
    from .checkpoint import save  # noqa: F401
    from .functional import sharq_decompose, simulate_linear  # noqa: F401
    from .generate import generate  # noqa: F401
    from .interop import export, load, load_model  # noqa: F401
    from .models import calibrate, quantize_model  # noqa: F401
    from .nn import SharQLinear  # noqa: F401
    from .quant import QTensor, dequantize, fake_quantize, quantize  # noqa: F401
    from .recipes import Recipe, get_recipe, list_recipes  # noqa: F401


def __getattr__(name: str):
    """A public name, imported from its module on first use; else a submodule (sharq.models without importing it
    first, as when every module was imported eagerly)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    def __setattr__(self, name: str, value) -> None:
        """The import system binds every submodule it loads on its package: importing the module sharq.generate
        must not replace the function sharq.generate (nor any public name a module shares)."""
        if name in _EXPORTS and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_with_transformers() -> None:
    """Importing the integration registers it (when the integration's own import of transformers' quantizers is
    what calls this, the module is still running, and registers when it completes)."""
    importlib.import_module(f"{__name__}.integrations.transformers")


after_import("transformers.quantizers", _register_with_transformers)
