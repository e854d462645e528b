"""Host time per eager call of a quantized linear and of its pieces, 4096 x 4096 at M tokens (docs/PERF.md).

    python benchmarks/bench_host.py [--backend packed] [--m 1,512] [--profile out.txt]

Each piece is called 100 times while the GPU sleeps (~1 s), so the host never waits for the GPU and the launch
queue never fills: wall time over calls is the host's cost. Best of three. With --profile, cProfile of 150 layer
calls, by own time."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

import torch
import torch.nn.functional as F

from bench_prepare import cpu_us  # benchmarks/, beside this script
from sharq import nn as snn
from sharq.backends import get_backend
from sharq.kernels import prepare as kp
from sharq.recipes import QWeight


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="packed")
    p.add_argument("--recipe", default="sharq")
    p.add_argument("--m", default="1", help="comma-separated token counts (rows of the activation)")
    p.add_argument("--profile", default=None, help="cProfile of the layer at the first M, by own time")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_host needs a CUDA GPU", file=sys.stderr)
        return 2
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = snn.SharQLinear.from_linear(lin, args.recipe, backend=args.backend)
    recipe, backend = layer.recipe, get_backend(layer.backend)
    qweight = QWeight(layer.weight_values, layer.weight_scale, None if layer._layout else layer.packed)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.recipe} on {layer.backend}")
    for m in [int(v) for v in args.m.split(",")]:
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        x3 = x.view(1, m, 4096)  # as a model calls its linears: [batch, tokens, features]
        with torch.no_grad():
            act = layer.prepare(x)
            pieces = [("F.linear (bf16)", lambda: F.linear(x, lin.weight)),
                      ("torch.empty", lambda: torch.empty(m, 4096, device="cuda")),
                      ("prepare kernel launch (_launch)", lambda: kp._launch(x, recipe, torch.bfloat16, False)),
                      ("layer.prepare", lambda: layer.prepare(x)),
                      (f"{layer.backend} matmul", lambda: backend.matmul(act, qweight, None, torch.bfloat16,
                                                                         layer._layout)),
                      ("SharQLinear forward", lambda: layer(x)),
                      ("SharQLinear forward, x [1, M, K]", lambda: layer(x3))]
            for name, fn in pieces:
                print(f"M = {m:<5d} {name:34s} {min(cpu_us(fn, 100, sleep_gpu=True) for _ in range(3)):7.1f} µs")
    if args.profile:
        x = torch.randn(int(args.m.split(",")[0]), 4096, device="cuda", dtype=torch.bfloat16)
        profile = cProfile.Profile()
        with torch.no_grad():
            layer(x)
            torch.cuda._sleep(int(2e9))
            profile.enable()
            for _ in range(150):
                layer(x)
            profile.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        with open(args.profile, "w") as f:
            f.write(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
