"""Check and time the fused prepare kernel and the triton SharQ layer on a CUDA GPU, in one run (docs/PERF.md).

    python benchmarks/bench_prepare.py [--quick] [--sweep] [--json results.json]
    python benchmarks/bench_prepare.py --small-m      # decode sizes: the default launch against its alternatives
    python benchmarks/bench_prepare.py --small-m-tiles  # 1-16 tokens: the default tile against a sweep of tiles

1. Checks, bit for bit: the kernel (dequantized and packed modes) against the reference on the GPU for every kernel
   recipe, and the GPU reference against the CPU reference.
2. Ceilings, measured here: copy bandwidth (a 1 GiB device copy) and the BF16 matrix rate (an 8192³ GEMM).
3. The grid (Llama-3.1-8B shapes, K ∈ {4096, 14336}, N ∈ {4096, 6144, 14336, 28672}, M ∈ {1, 16, 256, 2048,
   8192}), CUDA events, medians: a device copy of X, BF16 F.linear, the kernel alone (both modes), the SharQ layer
   (kernel + one BF16 GEMM + the α epilogue, each also timed alone) and the reference backend on the GPU.
   GPU times come from CUDA-graph replays, which leave out the host's launch cost; the eager times (plain calls)
   and the host time per call are reported beside them.
Bytes the kernel must move: X read twice (the amax pass and the main pass) and its outputs written once (the bf16
sum, or the packed payload). Floors: those bytes over the copy bandwidth; a layer's, its GEMM flops over the matrix
rate plus its kernel's bytes over the bandwidth.
--sweep times the kernel's tile shapes first (how the default in sharq/kernels/prepare.py was chosen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

import sharq
from sharq._format import format_table
from sharq.functional import get_backend
from sharq.kernels import prepare as kp
from sharq.kernels.epilogue import scale_and_bias_
from timing import median_ms, outlier_x  # benchmarks/timing.py, beside this script

KERNEL_RECIPES = ["nvfp4", "mxfp4", "sharq", "sharq-mxfp4", "sparse-only", "dense-dense"]


def graph_ms(fn, reps: int = 20, calls: int = 10) -> float:
    """GPU time alone: `calls` calls captured in one CUDA graph, replayed; ms per call (no Python launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, reps) / calls


def cpu_us(fn, calls: int = 200, sleep_gpu: bool = False) -> float:
    """Host time per call (launch overhead). sleep_gpu puts the GPU to sleep (~1 s) first, so the host never waits
    for it and the time is the host's alone."""
    fn()
    torch.cuda.synchronize()
    if sleep_gpu:
        torch.cuda._sleep(int(2e9))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def check() -> list[list[str]]:
    rows = []
    for name in KERNEL_RECIPES:
        recipe = sharq.get_recipe(name)
        for m, k in ((7, 4096), (33, 14336), (1, 8192), (5, 96 + 32), (300, 4096)):
            x = outlier_x(m, k, seed=m + k)
            ref = recipe.prepare_activation(x)
            values, scale = kp.prepare_dequantized(x, recipe)
            packed = kp.prepare_packed(x, recipe)
            same = torch.equal(values, ref.values) and torch.equal(scale, ref.scale)
            same_packed = torch.equal(packed.values, ref.values) and all(
                torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales)
                and (r.indices is None or torch.equal(g.indices, r.indices)) for g, r in zip(packed.parts, ref.parts))
            cpu = recipe.prepare_activation(x.cpu())
            same_cpu = torch.equal(cpu.values, ref.values.cpu()) and torch.equal(cpu.scale, ref.scale.cpu())
            rows.append([name, f"{m}x{k}", "bit-exact" if same else "MISMATCH",
                         "bit-exact" if same_packed else "MISMATCH", "bit-exact" if same_cpu else "MISMATCH"])
    return rows


def ceilings() -> dict:
    big = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB
    copy_ms = median_ms(lambda: big.clone(), 10)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ a, 10)
    return dict(copy_gbps=2 * 2 * (1 << 29) / copy_ms / 1e6, bf16_tflops=2 * 8192**3 / mm_ms / 1e9)


def packed_bytes(m: int, k: int, recipe) -> int:
    """The packed payload's bytes: codes (½ byte), scale codes (1 per block), 2-bit indices, fp32 sum."""
    out = 0
    for i, st in enumerate(recipe.stages):
        out += m * (k // 2 + k // st.block)
        if i == 0 and st.mask:
            out += m * k // 32
    return out + 4 * m * k


def sweep(recipe) -> list[list[str]]:
    rows = []
    for m, k in ((8192, 4096), (8192, 14336)):
        x = outlier_x(m, k)
        for bm in (8, 16, 32):
            for h in (4, 8, 16):
                for warps in (4, 8):
                    tile = dict(BM=bm, H=h, num_warps=warps)
                    try:
                        ms = graph_ms(lambda: kp._launch(x, recipe, torch.bfloat16, False, tile))
                    except Exception as e:  # a tile the compiler refuses (registers, shared memory)
                        rows.append([f"{m}x{k}", str(bm), str(h), str(warps), f"failed: {type(e).__name__}"])
                        continue
                    rows.append([f"{m}x{k}", str(bm), str(h), str(warps), f"{3 * 2 * m * k / ms / 1e6:.0f}"])
    return rows


def small_m() -> list[list[str]]:
    """Decode sizes (M <= 64): µs per call (CUDA-graph replay; X in L2, as after the previous layer) of the
    default launch, of each program finding the amax itself (self) or the separate amax pass (two launches), and
    of the 8 x 128 tile at every M; a device copy of X beside them (one launch's floor)."""
    recipe = sharq.get_recipe("sharq")
    rows = []
    for k in (4096, 14336):
        for m in (1, 2, 4, 8, 16, 32, 64):
            x = outlier_x(m, k)
            us = [1e3 * graph_ms(lambda: x.clone(), calls=20)]
            for tile, self_amax in ((None, None), (None, True), (None, False), (kp._TILE, None)):
                if self_amax and m * k > 4 * kp.SELF_AMAX_ELEMENTS:  # far past the rule: all rows re-read per program
                    us.append(None)
                    continue
                us.append(1e3 * graph_ms(lambda: kp._launch(x, recipe, torch.bfloat16, False, tile, self_amax),
                                         calls=20))
            rows.append([str(k), str(m)] + ["-" if v is None else f"{v:.2f}" for v in us])
    return rows


def small_m_tiles() -> list[list[str]]:
    """1-16 tokens: µs per call of the default launch against tiles of 1 or min(M, 8) rows × 64-256 columns and
    4 or 8 warps, each with every program finding the amax itself (where X is small enough) or the amax pass: the
    four fastest. What `_default_tile` at decode sizes rests on (a layer there is prepare + GEMM, docs/PERF.md)."""
    recipe = sharq.get_recipe("sharq")
    rows = []
    for k in (4096, 14336):
        for m in (1, 4, 8, 16):
            x = outlier_x(m, k)
            timed = {}
            for bm, h, warps in itertools.product(sorted({1, min(m, 8)}), (4, 8, 16), (4, 8)):
                for self_amax in (True, False) if m * k <= 4 * kp.SELF_AMAX_ELEMENTS else (False,):
                    tile = dict(BM=bm, H=h, num_warps=warps)
                    timed[f"{bm}x{16 * h} {warps}w {'self' if self_amax else 'pass'}"] = 1e3 * graph_ms(
                        lambda: kp._launch(x, recipe, torch.bfloat16, False, tile, self_amax), calls=20)
            default = 1e3 * graph_ms(lambda: kp._launch(x, recipe, torch.bfloat16, False), calls=20)
            best = sorted(timed.items(), key=lambda kv: kv[1])[:4]
            rows.append([str(k), str(m), f"{default:.2f}"] + [f"{name} {us:.2f}" for name, us in best])
    return rows


def bench(quick: bool, ceil: dict) -> list[dict]:
    ks = (4096, 14336)
    ns = (4096,) if quick else (4096, 6144, 14336, 28672)
    ms = (2048, 8192) if quick else (1, 16, 256, 2048, 8192)
    recipe = sharq.get_recipe("sharq")
    triton_backend, reference_backend = get_backend("triton"), get_backend("reference")
    bw = ceil["copy_gbps"] * 1e6  # bytes per ms
    rate = ceil["bf16_tflops"] * 1e9  # flops per ms
    out = []
    for k in ks:
        for m in ms:
            x = outlier_x(m, k)
            copy_ms = graph_ms(lambda: x.clone())
            kern = lambda: kp.prepare_dequantized(x, recipe, out_dtype=torch.bfloat16)  # noqa: E731
            kern_ms, kern_eager_ms, kern_cpu_us = graph_ms(kern), median_ms(kern), cpu_us(kern)
            packed_ms = graph_ms(lambda: kp.prepare_packed(x, recipe))
            values, scale = kp.prepare_dequantized(x, recipe, out_dtype=torch.bfloat16)
            moved = 3 * 2 * m * k  # X read twice (bf16), the bf16 sum written once
            moved_packed = 2 * 2 * m * k + packed_bytes(m, k, recipe)
            for n in ns:
                w = torch.randn(n, k, device="cuda") / k**0.5
                wb = w.to(torch.bfloat16)
                qw = recipe.prepare_weight(w)
                linear = lambda: F.linear(x, wb)  # noqa: E731
                layer = lambda: triton_backend.matmul(  # noqa: E731
                    triton_backend.prepare(x, recipe, None), qw, None, torch.bfloat16)
                linear_ms, linear_eager_ms = graph_ms(linear), median_ms(linear)
                y = values @ qw.values.T
                gemm_ms = graph_ms(lambda: values @ qw.values.T)
                alpha_ms = graph_ms(lambda: scale_and_bias_(y, scale, qw.scale))
                layer_ms, layer_eager_ms = graph_ms(layer), median_ms(layer)
                ref_ms = median_ms(lambda: reference_backend.matmul(
                    reference_backend.prepare(x, recipe, None), qw, None, torch.bfloat16), 3)
                flops = 2 * m * n * k
                out.append(dict(
                    k=k, n=n, m=m, copy_ms=copy_ms, copy_gbps=2 * 2 * m * k / copy_ms / 1e6,
                    kernel_ms=kern_ms, kernel_eager_ms=kern_eager_ms, kernel_cpu_us=kern_cpu_us,
                    kernel_gbps=moved / kern_ms / 1e6, kernel_floor_ms=moved / bw,
                    packed_ms=packed_ms, packed_gbps=moved_packed / packed_ms / 1e6,
                    packed_floor_ms=moved_packed / bw, bf16_linear_ms=linear_ms, bf16_linear_eager_ms=linear_eager_ms,
                    bf16_floor_ms=max(flops / rate, 2 * (m * k + n * k + m * n) / bw),
                    gemm_ms=gemm_ms, alpha_ms=alpha_ms, layer_ms=layer_ms, layer_eager_ms=layer_eager_ms,
                    layer_floor_ms=flops / rate + moved / bw,
                    reference_ms=ref_ms, layer_over_bf16=layer_ms / linear_ms,
                    layer_over_bf16_eager=layer_eager_ms / linear_eager_ms, reference_over_layer=ref_ms / layer_ms))
    return out


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(rows: list[dict]) -> str:
    """The kernel table (one row per X shape) and the layer table, as markdown (docs/PERF.md). "of copy" and
    "of floor" are the achieved fractions: the kernel's GB/s over the copy's, the floor's time over the layer's."""
    kernel_rows = {(r["k"], r["m"]): r for r in rows}.values()
    kernel = markdown_table(
        ["K", "M", "copy GB/s", "kernel ms", "floor ms", "kernel GB/s", "of copy", "eager ms", "host µs",
         "packed ms", "packed floor ms", "packed of copy"],
        [[str(r["k"]), str(r["m"]), f"{r['copy_gbps']:.0f}", f"{r['kernel_ms']:.4f}", f"{r['kernel_floor_ms']:.4f}",
          f"{r['kernel_gbps']:.0f}", f"{r['kernel_gbps'] / r['copy_gbps']:.2f}", f"{r['kernel_eager_ms']:.4f}",
          f"{r['kernel_cpu_us']:.0f}", f"{r['packed_ms']:.4f}", f"{r['packed_floor_ms']:.4f}",
          f"{r['packed_gbps'] / r['copy_gbps']:.2f}"] for r in kernel_rows])
    layer = markdown_table(
        ["K", "N", "M", "bf16 ms", "GEMM ms", "α ms", "kernel ms", "layer ms", "floor ms", "of floor", "layer/bf16",
         "eager layer/bf16", "ref ms", "ref/layer"],
        [[str(r["k"]), str(r["n"]), str(r["m"]), f"{r['bf16_linear_ms']:.4f}", f"{r['gemm_ms']:.4f}",
          f"{r['alpha_ms']:.4f}", f"{r['kernel_ms']:.4f}", f"{r['layer_ms']:.4f}", f"{r['layer_floor_ms']:.4f}",
          f"{r['layer_floor_ms'] / r['layer_ms']:.2f}", f"{r['layer_over_bf16']:.2f}",
          f"{r['layer_over_bf16_eager']:.2f}", f"{r['reference_ms']:.2f}", f"{r['reference_over_layer']:.1f}"]
         for r in rows])
    return ("GPU times are CUDA-graph replays (no host launch cost); 'eager' = plain calls, host cost included.\n\n"
            + kernel + "\n\n" + layer)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a reduced grid (N=4096, M in {2048, 8192})")
    p.add_argument("--sweep", action="store_true", help="time the kernel's tile shapes first")
    p.add_argument("--small-m", action="store_true", help="only the decode sizes (M <= 64) and their launch choices")
    p.add_argument("--small-m-tiles", action="store_true", help="only 1-16 tokens: the default tile against others")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--report", default=None, metavar="JSON", help="print the tables of a saved run and exit")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)["rows"]))
        return 0
    if not torch.cuda.is_available():
        print("bench_prepare needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", kp.triton.__version__)
    if args.small_m:
        print(format_table(["K", "M", "copy µs", "default µs", "self-amax µs", "amax pass µs", "8x128 tile µs"],
                           small_m()))
        return 0
    if args.small_m_tiles:
        print(format_table(["K", "M", "default µs", "fastest", "2nd", "3rd", "4th"], small_m_tiles()))
        return 0
    checks = check()
    print(format_table(["recipe", "shape", "dequantized", "packed", "GPU ref = CPU ref"], checks))
    ceil = ceilings()
    print(f"copy bandwidth {ceil['copy_gbps']:.0f} GB/s (1 GiB clone), bf16 GEMM {ceil['bf16_tflops']:.0f} TFLOP/s "
          "(8192³)")
    tiles = sweep(sharq.get_recipe("sharq")) if args.sweep else []
    if tiles:
        print(format_table(["M x K", "BM", "H", "warps", "kernel GB/s"], tiles))
    rows = bench(args.quick, ceil)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": kp.triton.__version__, "ceilings": ceil, "checks": checks, "tiles": tiles,
                       "rows": rows}, f, indent=1)
    return 0 if all(c == "bit-exact" for row in checks for c in row[2:]) else 1


if __name__ == "__main__":
    sys.exit(main())
