"""Run code right after another library's module is imported, without importing it: how sharq registers with
transformers only when transformers' quantizer registry loads (importing it pulls torchao and takes seconds)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.abc alone would cost more than the rest of `import sharq`
    from collections.abc import Callable
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType


class _ThenCall:
    """A module's own loader, then `callback` once the module has run (a loader, as importlib.abc.Loader)."""

    def __init__(self, loader: Loader, callback: Callable[[], None]):
        self.loader, self.callback = loader, callback

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module sees its own loader (resources)
        self.loader.exec_module(module)
        self.callback()


class _AfterImport:
    """A finder of sys.meta_path (as importlib.abc.MetaPathFinder) that finds nothing itself: when `name` is about
    to be imported, it leaves sys.meta_path, asks the other finders for the module and wraps its loader so that
    `callback` runs after the module's code."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path, target=None) -> ModuleSpec | None:
        if fullname != self.name or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenCall(spec.loader, self.callback)
                return spec
        return None


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call `callback` once the module `name` is imported: now if it is, else right after its import, once. A
    module that is never imported (or not installed) costs nothing."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
