"""Check and time the fused prepare kernel on a CUDA GPU, in one run (the GPU issue's benchmark).

    python benchmarks/bench_prepare.py [--quick] [--json results.json]

Checks first (kernel vs reference, bit for bit, every kernel recipe), then times with CUDA events (medians):
a device copy of X (the bandwidth ceiling), BF16 F.linear, the kernel alone, the SharQ-sim linear (kernel + BF16
GEMM on the shared Ŵ) and the reference backend on the GPU. Achieved GB/s counts the bytes the kernel must move:
X read once (bf16) and the bf16 sum written once.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import sharq
from sharq._format import format_table
from sharq.kernels.prepare import prepare_dequantized

KERNEL_RECIPES = ["nvfp4", "mxfp4", "sharq", "sharq-mxfp4", "sparse-only", "dense-dense"]


def outlier_x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    ch = torch.randperm(k, device="cuda", generator=g)[: k // 64]
    x[:, ch] *= 10 + 50 * torch.rand(len(ch), device="cuda", generator=g)
    return x.to(torch.bfloat16)


def median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check() -> list[list[str]]:
    rows = []
    for name in KERNEL_RECIPES:
        for m, k in ((7, 4096), (33, 14336), (1, 8192), (5, 96 + 32)):
            recipe = sharq.get_recipe(name)
            x = outlier_x(m, k, seed=m + k)
            values, scale = prepare_dequantized(x, recipe)
            ref = recipe.prepare_activation(x)
            exact = torch.equal(values, ref.values) and torch.equal(scale, ref.scale)
            rows.append([name, f"{m}x{k}", "bit-exact" if exact else "MISMATCH"])
    return rows


def bench(quick: bool) -> list[dict]:
    ks = (4096, 14336)
    ns = (4096,) if quick else (4096, 6144, 14336, 28672)
    ms = (2048, 8192) if quick else (1, 16, 256, 2048, 8192)
    recipe = sharq.get_recipe("sharq")
    out = []
    for k in ks:
        for m in ms:
            x = outlier_x(m, k)
            copy_ms = median_ms(lambda: x.clone())
            kern_ms = median_ms(lambda: prepare_dequantized(x, recipe, out_dtype=torch.bfloat16))
            moved = 2 * x.numel() * 2  # read X (bf16) once, write the bf16 sum once
            for n in ns:
                w = torch.randn(n, k, device="cuda") / k**0.5
                wb = w.to(torch.bfloat16)
                linear_ms = median_ms(lambda: F.linear(x, wb))
                sim_ms = median_ms(lambda: sharq.simulate_linear(x, w, recipe=recipe, backend="triton"))
                qw = recipe.prepare_weight(w)
                sim_layer_ms = median_ms(lambda: sharq.functional.quantized_matmul(
                    sharq.functional.get_backend("triton").prepare(x, recipe, None), qw))
                ref_ms = median_ms(lambda: sharq.functional.quantized_matmul(recipe.prepare_activation(x), qw), 3) \
                    if m <= 2048 else float("nan")
                out.append(dict(k=k, n=n, m=m, copy_ms=copy_ms, kernel_ms=kern_ms,
                                kernel_gbps=moved / kern_ms / 1e6, copy_gbps=moved / copy_ms / 1e6,
                                bf16_linear_ms=linear_ms, sharq_layer_ms=sim_layer_ms, simulate_linear_ms=sim_ms,
                                reference_ms=ref_ms, layer_over_bf16=sim_layer_ms / linear_ms,
                                reference_over_layer=ref_ms / sim_layer_ms))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a reduced grid (N=4096, M in {2048, 8192})")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_prepare needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), torch.__version__)
    checks = check()
    print(format_table(["recipe", "shape", "kernel vs reference"], checks))
    rows = bench(args.quick)
    print(format_table(
        ["K", "N", "M", "copy GB/s", "kernel GB/s", "kernel/copy", "bf16 linear ms", "sharq layer ms",
         "layer/bf16", "reference ms", "ref/layer"],
        [[str(r["k"]), str(r["n"]), str(r["m"]), f"{r['copy_gbps']:.0f}", f"{r['kernel_gbps']:.0f}",
          f"{r['kernel_gbps'] / r['copy_gbps']:.2f}", f"{r['bf16_linear_ms']:.3f}", f"{r['sharq_layer_ms']:.3f}",
          f"{r['layer_over_bf16']:.2f}", f"{r['reference_ms']:.2f}", f"{r['reference_over_layer']:.1f}"]
         for r in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": checks,
                       "rows": rows}, f, indent=1)
    return 0 if all(c[2] == "bit-exact" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
