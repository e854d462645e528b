"""A per-layer weight policy under a fixed average bit budget, calibration-free: every decoder linear
gets the base recipe; the linears whose weights the base quantizes worst (relative squared error of Ŵ, from the
weights alone) get 8-bit weights instead, until the average weight bits reach the budget. A random choice of
linears at the same budget is the control: it says whether the ranking, not the extra bits, does the work.

    python benchmarks/layer_policy.py --budget 4.5 --out docs/results/smollm2_policy8k_cpu.json

Each row is one perplexity run on the screen's text (SPEC §9 windows), so the rows compare with
benchmarks/screen_accuracy.py's JSONs of the same --text and --max-tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

from sharq.eval.data import load_text
from sharq.eval.perplexity import perplexity, windows
from sharq.hf import bos_token, load_pretrained, tokenize
from sharq.models import quantize_model, target_linears
from sharq.nn import SharQLinear
from sharq.recipes import Recipe
from screen_accuracy import candidates  # benchmarks/screen_accuracy.py, beside this script

BASE = "sharq+w-4o6"  # the screen's sharq with four_over_six weight scales: 4.25 weight bits, 0.25 left to spend


def high_recipe(base: Recipe) -> Recipe:
    """The base's activations with fp8 (E4M3, per-channel) weights."""
    return base.with_options(name=f"{base.name}+fp8-weights", weight_fmt="fp8", weight_block=None,
                             weight_scale_rule="max")


def weight_errors(model: torch.nn.Module, recipe: Recipe) -> dict[str, tuple[float, int]]:
    """{linear: (Σ(Ŵ·s − W)² / ΣW², weights)} for the recipe's weight quantizer, from the weights alone."""
    out = {}
    for name, linear in target_linears(model).items():
        w = linear.weight.detach().float()
        err = (recipe.prepare_weight(w).effective() - w).square().sum() / w.square().sum()
        out[name] = (err.item(), w.numel())
    return out


def choose(errors: dict[str, tuple[float, int]], low_bits: float, high_bits: float, budget: float,
           order: list[str]) -> list[str]:
    """The longest prefix of `order` given high_bits whose weight-weighted average stays within `budget`."""
    total = sum(n for _, n in errors.values())
    spare = (budget - low_bits) * total  # bits to spend
    chosen = []
    for name in order:
        cost = (high_bits - low_bits) * errors[name][1]
        if cost > spare:
            break
        chosen.append(name)
        spare -= cost
    return chosen


def quantize_with_policy(model: torch.nn.Module, base: Recipe, high: Recipe, chosen: list[str]) -> torch.nn.Module:
    """Every linear on `base`, then the chosen ones again from their original weights on `high` (their input is
    prepared by their own call: same activation recipe, so the same numbers as the shared preparation)."""
    originals = {name: copy.deepcopy(target_linears(model)[name]) for name in chosen}
    quantize_model(model, base)
    for name, linear in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SharQLinear.from_linear(linear, high, name=name))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=4.5, help="average weight bits over the decoder linears")
    p.add_argument("--model", default=None, help="as sharq eval --model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", default="wikipedia")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="the random control's choice")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    base = candidates()[BASE]
    high = high_recipe(base)
    model, tokenizer = load_pretrained(a.model, torch.float32, "cpu")
    batches = windows(tokenize(load_text(a.text)[0], tokenizer), a.seqlen, a.max_tokens, bos_token(tokenizer))
    errors = weight_errors(model, base)
    by_error = sorted(errors, key=lambda n: errors[n][0], reverse=True)
    shuffled = list(errors)
    random.Random(a.seed).shuffle(shuffled)
    total = sum(n for _, n in errors.values())
    rows = []
    for policy, order in (("none", []), ("largest error", by_error), ("random", shuffled)):
        chosen = choose(errors, base.weight_bits, high.weight_bits, a.budget, order)
        bits = (base.weight_bits * total + (high.weight_bits - base.weight_bits)
                * sum(errors[n][1] for n in chosen)) / total
        t0 = time.perf_counter()
        quantized = quantize_with_policy(copy.deepcopy(model), base, high, chosen)
        ppl = perplexity(quantized, batches, progress=False).ppl
        rows.append({"policy": policy, "ppl": ppl, "weight_bits": bits, "activation_bits": base.activation_bits,
                     "fp8_linears": chosen, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{policy:14s} ppl {ppl:.4f}  weight bits {bits:.3f}  fp8 linears {len(chosen)}", flush=True)
    res = {"model": a.model or "SmolLM2-135M (embedded)", "text": a.text, "max_tokens": a.max_tokens, "seqlen": a.seqlen,
           "budget": a.budget, "seed": a.seed, "base": base.to_dict(), "high": high.to_dict(),
           "weight_errors": {n: e for n, (e, _) in errors.items()}, "torch": torch.__version__, "rows": rows}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
