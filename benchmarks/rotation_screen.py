"""Would a Hadamard rotation help? Every decoder linear computes x·Wᵀ as (x·H)·(W·H)ᵀ, H block-diagonal
with orthonormal Hadamard blocks of `--block` (16: one NVFP4 weight block) on the input dimension, so the
unquantized model is unchanged; the recipe then quantizes the rotated weights and the rotated inputs. Rotations
(QuaRot, SpinQuant) spread outliers over a block before quantizing: calibration-free and cheap (a 16-point
butterfly per input block), but they also spread the activation outliers SharQ's sparse backbone is built on.

    python benchmarks/rotation_screen.py --out docs/results/smollm2_rotation8k_cpu.json none sharq-plus/w-only sharq-plus

Rows: `none` (bf16: the rotation alone, must give the bf16 perplexity) or any row of screen_accuracy.py (a
registered recipe, a candidate, `NAME/w-only`: its weights with bf16 activations, `NAME/a-only`). The text and windows are the screen's (benchmarks/screen_accuracy.py), so the rows
compare with its JSONs.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from sharq.eval.data import load_text
from sharq.eval.perplexity import perplexity, windows
from sharq.hf import bos_token, load_pretrained, tokenize
from sharq.models import target_linears
from sharq.nn import SharQLinear
from sharq.recipes import Recipe
from screen_accuracy import candidates, lookup  # benchmarks/screen_accuracy.py, beside this script


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block is a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotate_blocks(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """t·H with H block-diagonal (blocks h) over the last dimension."""
    b = h.shape[0]
    return (t.reshape(*t.shape[:-1], -1, b) @ h.to(t.dtype)).reshape(t.shape)


class RotatedInput(torch.nn.Module):
    """inner(x·H): with inner's weight stored as W·H, the product equals x·Wᵀ before quantization."""

    def __init__(self, inner: torch.nn.Module, h: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("h", h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(rotate_blocks(x, self.h))


def rotate_and_quantize(model: torch.nn.Module, recipe: Recipe | None, block: int) -> torch.nn.Module:
    h = hadamard(block)
    for name, linear in target_linears(model).items():
        rotated = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            rotated.weight.copy_(rotate_blocks(linear.weight, h))
            if linear.bias is not None:
                rotated.bias.copy_(linear.bias)
        inner = rotated if recipe is None else SharQLinear.from_linear(rotated, recipe, name=name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RotatedInput(inner, h))
    return model


def row_recipe(name: str) -> Recipe | None:
    """None for "none", else the screen's row of that name (a recipe, a candidate, NAME/w-only, NAME/a-only)."""
    return None if name == "none" else lookup(name, candidates())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--text", default="wikipedia")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    recipes = {name: row_recipe(name) for name in a.rows}  # a bad row name fails before the model loads
    model, tokenizer = load_pretrained(None, torch.float32, "cpu")
    batches = windows(tokenize(load_text(a.text)[0], tokenizer), 2048, a.max_tokens, bos_token(tokenizer))
    rows = []
    for name, recipe in recipes.items():
        ppl = perplexity(rotate_and_quantize(copy.deepcopy(model), recipe, a.block), batches, progress=False).ppl
        rows.append({"row": name, "ppl": ppl, "recipe": None if recipe is None else recipe.to_dict()})
        print(f"{name:22s} ppl {ppl:.4f}", flush=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"model": "SmolLM2-135M (embedded)", "text": a.text, "max_tokens": a.max_tokens, "seqlen": 2048,
                   "block": a.block, "torch": torch.__version__, "rows": rows}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
