"""`sharq` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import __version__
from .functional import simulate_linear
from .recipes import get_recipe, list_recipes


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def outlier_layer(seed: int, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random linear layer with LLM-like activations: Gaussian, 1/64 of the channels 10-60x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    channels = torch.randperm(k, generator=g)[: k // 64]
    x[:, channels] *= 10 + 50 * torch.rand(len(channels), generator=g)
    return x.to(torch.bfloat16), torch.randn(n, k, generator=g) / k**0.5


def cmd_demo(args: argparse.Namespace) -> int:
    x, w = outlier_layer(args.seed, args.tokens, args.k, args.n)
    exact = x.float() @ w.T
    rows = []
    for name in args.recipes.split(","):
        recipe = get_recipe(name)
        t0 = time.perf_counter()
        y = simulate_linear(x, w, recipe=recipe).float()
        ms = (time.perf_counter() - t0) * 1e3
        err = ((y - exact).norm() / exact.norm()).item()
        act = recipe.prepare_activation(x)
        act_err = ((act.values * act.scale - x.float()).norm() / x.float().norm()).item()
        rows.append([name, f"{err:.4f}", f"{-20 * math.log10(err):.1f}", f"{act_err:.4f}",
                     f"{recipe.activation_bits:g}", f"{recipe.weight_bits:g}", f"{ms:.0f}"])
    print(f"random layer: X [{args.tokens}, {args.k}] (1/64 outlier channels, 10-60x), W [{args.n}, {args.k}], "
          f"seed {args.seed}; error vs the unquantized layer")
    print(format_table(["recipe", "output rel. err", "SQNR dB", "activation rel. err", "act bits", "weight bits",
                        "ms (CPU ref.)"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharq", description=__doc__)
    p.add_argument("--version", action="version", version=f"sharq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="error of every recipe on an outlier-rich random layer")
    d.add_argument("--recipes", default=",".join(list_recipes()))
    d.add_argument("--tokens", type=int, default=256)
    d.add_argument("--k", type=int, default=2048)
    d.add_argument("--n", type=int, default=1024)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sharq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
