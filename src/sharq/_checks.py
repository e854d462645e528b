"""Argument checks the library's entry points share, so each problem is worded once."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TypeVar

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
