"""Checks the library's entry points share, so each problem is worded once. Importing it imports no torch (the
CLI's help stays quick)."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def as_count(value) -> int | None:
    """value as an int if it is an integer (a numpy one too: operator.index), else None; a bool is no count."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(name: str, value, least: int = 1) -> int:
    """value as an int, or a ValueError naming `name` unless it is an integer >= least."""
    count = as_count(value)
    if count is None or count < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return count


def repeated(items: Sequence[T]) -> T | None:
    """The first item given a second time, else None (names that would run or count twice)."""
    return next((item for i, item in enumerate(items) if item in items[:i]), None)


def position_limit(config) -> int | None:
    """The max_position_embeddings of a transformers config's text model (a multimodal model's language model), or
    None where it sets none: positions past it were never trained."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


class NonFiniteLogits(ValueError):
    """A forward returned NaN or inf logits, so the tokens, perplexity or answers drawn from them mean nothing: a
    broken model (a NaN weight), or activations past the range of its dtype (float16 overflows at 65,504).
    `in_float32` says how to run the model in float32 (the CLI names its flag)."""

    def __init__(self, recipe: str | None, dtype: torch.dtype, in_float32: str = "run it in float32"):
        self.recipe, self.dtype = recipe, dtype
        overflow = str(dtype) == "torch.float16"  # no torch import here: the CLI's help stays quick
        cause = (f"its activations overflow float16, or the model is broken: {in_float32}" if overflow
                 else "the model is broken (its weights or activations are not finite)")
        whose = f"recipe {recipe!r}: the model's" if recipe else "the model's"
        super().__init__(f"{whose} logits are not finite (NaN or inf): {cause}")


def flag_non_finite(flag: torch.Tensor, logits: torch.Tensor) -> None:
    """Make `flag` (an fp32 scalar on the logits' device) NaN if any logit is NaN or inf, without waiting for the
    device: a NaN or inf logit makes the fp32 sum of all of them non-finite (finite logits would need to be near
    10^34 to overflow it), and adding that sum times zero keeps a finite flag 0 and turns it NaN otherwise. One pass,
    where isfinite over every logit took 25 times as long (a 2048-token window of SmolLM2 on 2 CPU cores)."""
    flag.add_(logits.sum(dtype=flag.dtype), alpha=0)
