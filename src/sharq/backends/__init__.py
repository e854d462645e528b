"""Backends: how a quantized layer runs. The contract (Backend), the registry and the rule that picks one; each
backend is one module beside this file and one entry in the registry (register).

A backend turns x [M, K] into a prepared activation (`prepare`) and multiplies it with the layer's weight
(`matmul`). Checkpoints and exports always hold the canonical payload (docs/FORMAT.md); a backend may run from a
layout of its own (pre-shuffled codes, re-encoded scales), made once by `to_layout` when a layer is built, loaded or
moved, and turned back exactly by `from_layout` when the layer is saved or moved elsewhere, so every checkpoint runs
on every backend."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..quant import QTensor
from ..recipes import QActivation, Recipe


@dataclass(frozen=True)
class WeightLayout:
    """A weight in a backend's own layout: its tensors (on the layer's device), what else the backend needs to run
    them (`meta`, a string, so it can cross torch.compile's custom-op boundary) and the payload's shape [N, Kp]."""

    tensors: tuple[torch.Tensor, ...]
    meta: str
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass(frozen=True)
class EagerPlan:
    """An eager call's launches for inputs of one shape, dtype and device, worked out once per layer: decode calls
    every layer once per token, so what depends only on the layer and the shape (launch shapes, compiled kernels,
    checks, the output's shape) must not be redone per call. `prepare(x)` takes the layer's input x [..., K] as
    it comes (contiguous) and `matmul(act)` gives y [..., N]: they compute what the backend's prepare and matmul
    compute on x's rows, bit for bit, with no view made per call."""

    prepare: Callable[[torch.Tensor], QActivation]
    matmul: Callable[[QActivation], torch.Tensor]
    # x -> y in one launch, where the backend folds the prepare into its GEMM (the same bits): for a layer that
    # prepares its own input; prepare and matmul stay for callers that share one activation. The backend may
    # take prepare and matmul inside it where the fold does not pay (packed: inside a CUDA-graph capture)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] for the layer's input x: the folded launch where the plan has one, else matmul(prepare(x))."""
        return self.matmul(self.prepare(x)) if self.forward is None else self.forward(x)


@dataclass(frozen=True)
class GroupPlan:
    """One launch for layers that read one input (q/k/v, gate/up), worked out once: `matmul(act)` gives their
    outputs [..., N_i]; `prepare(x)`, where the plan has one, is the activation launch its matmul needs (the
    activation in a layout of the launch's own), else None: matmul takes any prepare's activation (a member's eager
    plan's). `forward(x)`, where the plan has one, gives the outputs from the layers' input in one launch that
    prepares the activation itself (the same bits as matmul on a prepared one)."""

    matmul: Callable[[QActivation], list[torch.Tensor]]
    prepare: Callable[[torch.Tensor], QActivation] | None = None
    forward: Callable[[torch.Tensor], list[torch.Tensor]] | None = None


@dataclass(frozen=True)
class Backend:
    """How a quantized layer runs.

    - `prepare(x2d, recipe, channels, amax)` -> QActivation; `amax`, when x2d is a K-slice of a wider input
      (tensor parallel), is the whole input's (Recipe.prepare_activation), None otherwise;
    - `matmul(act, qweight, bias, out_dtype, layout)` -> y [M, N] in out_dtype (α = s_x·s_w and the bias applied);
      `layout` is the backend's own weight (a WeightLayout) or None;
    - `supports(recipe)`: which recipes it runs; `accepts(out_features, in_features, dtype)`: which layer shapes
      and compute dtypes (a backend with a layout of its own may need whole tiles or a 16-bit model);
    - `keeps_values`: whether a layer must hold the exact bf16 Ŵ for it (simulation) or only a packed weight;
    - `to_layout(packed, scale, bias)` / `from_layout(layout, block)`: the canonical payload (a QTensor) to the
      backend's layout, and back to the canonical codes and scale codes, exactly (None: the backend reads the
      canonical payload);
    - `eager_plan(qweight, bias, recipe, lead, x_dtype, out_dtype, layout, own_input=False)` -> an EagerPlan for
      inputs [*lead, K] of x_dtype (contiguous, on the weight's device), or None where the backend has none for
      them (then prepare and matmul run); `layout` as matmul's. With `own_input` (the layer shares its input with
      no other) the plan's prepare feeds its matmul alone, so the two may agree on an activation layout of their
      own; otherwise its matmul takes any prepare's activation and its prepare gives one any matmul takes. A layer
      keeps its plans until its weight, bias or backend changes; under torch.compile a layer (or a group) whose
      backend has eager plans runs them by one custom op (functional.planned_linear, planned_group), so compiled
      and eager calls make the same launches;
    - `group_plan(qweights, biases, recipe, lead, out_dtype, layouts, x_dtype=None)` -> a GroupPlan for an
      activation of M = prod(lead) rows, giving the outputs [*lead, N_i] of several layers that read it (q/k/v,
      gate/up) from one launch, or None where the backend has none for them (then each layer multiplies on its
      own); `layouts` the layers' own weights (or Nones). With `x_dtype` (eager inputs of that dtype) the plan may
      bring its own prepare; without, its matmul takes a prepared activation."""

    prepare: Callable[[torch.Tensor, Recipe, torch.Tensor | None, torch.Tensor | None], QActivation]
    matmul: Callable[..., torch.Tensor]
    supports: Callable[[Recipe], bool]
    keeps_values: bool
    accepts: Callable[[int, int, torch.dtype], bool] = field(default=lambda n, k, dtype: True)
    to_layout: Callable[[QTensor, torch.Tensor, torch.Tensor | None], WeightLayout] | None = None
    from_layout: Callable[[WeightLayout, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    eager_plan: Callable[..., EagerPlan | None] | None = None
    group_plan: Callable[..., GroupPlan | None] | None = None
    runs_on: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on ("cuda" only: also in the interpreter)
    needs: str | None = None  # the package it imports, checked before any model work
    install_hint: str = ""


BACKENDS: dict[str, Backend] = {}
AUTO_RANK: dict[str, int] = {}  # the backends "auto" tries on CUDA, lower ranks first


def register(name: str, backend: Backend, auto_rank: int | None = None) -> None:
    """Add a backend; with `auto_rank`, "auto" considers it on CUDA (lower ranks first)."""
    BACKENDS[name] = backend
    if auto_rank is not None:
        AUTO_RANK[name] = auto_rank


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: auto, {', '.join(BACKENDS)}") from None


def available(name: str) -> bool:
    """Whether the package backend `name` needs is installed."""
    needs = get_backend(name).needs
    return needs is None or importlib.util.find_spec(needs) is not None


def resolve_backend(name: str, recipe: Recipe, device: torch.device | str, shape: tuple[int, int] | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """The backend a layer of `recipe` on `device` runs: for "auto" on CUDA the first by AUTO_RANK that is
    installed and runs the recipe (and, given the layer's shape [N, K] and compute dtype, accepts them), and
    reference elsewhere; a named backend (checked to support the recipe) wherever it runs and accepts the layer,
    and auto's choice for the layers and devices it does not take (humming's partial tiles, a model moved off
    the GPU)."""
    if name != "auto":
        b = get_backend(name)
        if not b.supports(recipe):
            raise ValueError(f"backend {name!r} does not run recipe {recipe.name!r} (weights {recipe.weight_fmt}"
                             f"/{recipe.weight_block}); use backend='auto'")
        if _runs_on(b, device) and (shape is None or b.accepts(shape[0], shape[1], dtype or torch.bfloat16)):
            return name
    if torch.device(device).type != "cuda":
        return "reference"
    for candidate in sorted(AUTO_RANK, key=AUTO_RANK.get):
        b = BACKENDS[candidate]
        if available(candidate) and b.supports(recipe) and (
                shape is None or b.accepts(shape[0], shape[1], dtype or torch.bfloat16)):
            return candidate
    return "reference"


def _runs_on(b: Backend, device: torch.device | str) -> bool:
    """Whether backend b runs on device's type (the Triton ones also anywhere under TRITON_INTERPRET=1)."""
    return torch.device(device).type in b.runs_on or (b.needs == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise a ValueError saying what is missing when backend `name` cannot run on `device` (checked before any
    model work): a backend's package, and CUDA (or Triton's interpreter, TRITON_INTERPRET=1, for the Triton
    ones)."""
    if name == "auto":
        return
    b = get_backend(name)
    if not available(name):
        raise ValueError(f"backend {name!r} needs the {b.needs} package: {b.install_hint}")
    if not _runs_on(b, device):
        raise ValueError(f"backend {name!r} runs on CUDA devices, not {device} (use backend='reference'"
                         + (", or TRITON_INTERPRET=1 to run its kernels in Triton's interpreter)"
                            if b.needs == "triton" else ")"))


def _builtin() -> None:
    from . import humming, packed, reference, simulator  # noqa: F401 - each registers itself


_builtin()

__all__ = ["AUTO_RANK", "BACKENDS", "Backend", "EagerPlan", "WeightLayout", "available", "check_backend",
           "get_backend", "register", "resolve_backend"]
