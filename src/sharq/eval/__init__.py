"""Evaluation: perplexity, zero-shot tasks through lm-evaluation-harness, and the recipe comparison of `sharq eval`."""

from .zeroshot import as_lm_eval

__all__ = ["as_lm_eval"]
