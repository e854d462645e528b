"""Check and time the packed 4-bit weight GEMM on a CUDA GPU against BF16 and FP8 cuBLAS, in one run (docs/PERF.md).

    python benchmarks/bench_gemm.py [--ms 1,4,16,64,256,2048,8192] [--sweep] [--json results.json]

1. Checks: packed_matmul against the exact product on the dequantized Ŵ (float64) within the fp32-accumulation
   bound, for both weight formats, at small and large M; every scale and element code decodes as quant.py does.
2. Ceilings, measured here: copy bandwidth (a 1 GiB device copy) and the BF16 matrix rate (an 8192³ GEMM).
3. The grid: Llama-3.1-8B linear shapes (K, N) ∈ {(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)} ×
   M: BF16 cuBLAS (F.linear), FP8 `torch._scaled_mm` (per-tensor scales, M ≥ 16), and per recipe the layer a
   model runs: the eager plan of a layer that reads its input alone, on the backend "auto" picks (what eager,
   graph-replayed and compiled calls launch: placed codes, bulk copies where routed), its GEMM alone (on the
   activation its prepare writes) and whole (prepare + GEMM; at decode M also with plain launches instead of
   programmatic dependent launch, kernels/launch.py), and the general path of strict and gradient calls
   (prepare + packed_matmul on canonical codes). GPU times
   are CUDA-graph replays of several calls, each on its own copy of the weights (together several times the L2,
   so every call streams its weight from memory, as in a model). Bytes for M ≤ 16: the weight (packed payload or
   bf16), X and Y; achieved GB/s against the copy bandwidth. FLOPs for M ≥ 2048: 2·M·N·K, against the matrix rate.
--sweep first times the small-M kernels' launch shapes at M ∈ {1, 2, 4, 16} (how gemm.choose_tile was chosen).
--crossover times only the MMA kernel against decode + cuBLAS at M = 16..64 (where gemm.SMALL_M belongs).
--decode times only the decode into the scratch weight (the CUDA kernel against the Triton one).
--staged times only the staged wgmma kernel (the weight decoded into shared memory) at 64-4096 tokens.
--placed times only the CUDA kernels on codes in the placed layout against canonical codes.
--ring times only the decode kernel's ring launches up to 8 tokens (how choose_tile's were chosen).
--bulk times only the wgmma kernel fed by bulk copies of a tiled activation against its producer warps.
--fold times only the decode kernel's launches that prepare their activation themselves against prepare + GEMM.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

import sharq
from sharq._format import format_table
from sharq.backends import EagerPlan, WeightLayout, available, get_backend, humming, packed, resolve_backend
from sharq.kernels import cublaslt, cuda_activation, cuda_dequantize, cuda_gemm, cuda_wgmma, gemm, launch
from sharq.kernels.placed import place_codes
from sharq.quant import QTensor, dequantize_blocks
from sharq.recipes import QWeight
from timing import median_ms, outlier_x  # benchmarks/timing.py, beside this script

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
SHAPES_70B = [(8192, 10240), (8192, 8192), (8192, 28672), (28672, 8192)]
L2_MULTIPLE = 4  # weight copies per timed graph: together at least this many times the L2


def graph_ms(fns: list, reps: int = 20) -> float:
    """GPU time per call: the calls fns[0](), fns[1](), ... captured in one CUDA graph, replayed; ms per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return median_ms(graph.replay, reps) / len(fns)


def copies(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-L2_MULTIPLE * l2 // max(nbytes, 1)))


def ceilings() -> dict:
    """Copy bandwidth from memory, copy bandwidth within the L2 (two 8 MiB buffers, well inside the H200's 50 MB:
    what the decode GEMM's repeated activation reads are up against above a few tokens, docs/PERF.md) and BF16
    GEMM throughput."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    copy_ms = median_ms(lambda: x.clone(), 10)
    src = torch.randn(1 << 22, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    l2_ms = graph_ms([lambda: dst.copy_(src)] * 50)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b, 10)
    return {"copy_GBps": 2 * x.numel() * 2 / copy_ms / 1e6, "l2_copy_GBps": 2 * src.numel() * 2 / l2_ms / 1e6,
            "bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def payload(recipe: str, n: int, k: int, seed: int = 1):
    """(packed QTensor, s_w, recipe) of a random [n, k] weight quantized by `recipe`, on the GPU."""
    r = sharq.get_recipe(recipe)
    g = torch.Generator(device="cuda").manual_seed(seed)
    qw = r.prepare_weight(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
    return qw.packed, qw.scale, r


def check(m: int, k: int, n: int, recipe: str) -> float:
    """Max error of packed_matmul over its fp32-accumulation bound (pass: <= 1)."""
    p, sw, r = payload(recipe, n, k)
    a = outlier_x(m, k, seed=m)
    sx = torch.rand(1, 1, device="cuda") + 0.5
    bias = torch.randn(n, device="cuda")
    y = gemm.packed_matmul(a, p.codes, p.scales, r.weight_fmt, r.weight_block, sx, sw, bias, torch.float32)
    w = dequantize_blocks(p).double()
    alpha = (sx * sw).double()
    exact = alpha * (a.double() @ w.T) + bias.double()
    bound = k * 2.0**-23 * alpha * (a.double().abs() @ w.abs().T) + 2.0**-24 * exact.abs() + 1e-30
    return float(((y.double() - exact).abs() / bound).max())


def check_codes() -> bool:
    codes = torch.arange(16, dtype=torch.uint8).repeat_interleave(2).reshape(1, 32)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).repeat(256, 1).cuda()
    scales = torch.arange(256, dtype=torch.uint8).reshape(256, 1).cuda()
    ok = True
    for fmt in ("nvfp4", "mxfp4"):
        got = gemm.dequantize_packed(packed, scales, fmt, 32, 32)
        want = dequantize_blocks(QTensor(packed, scales, fmt, 32, (256, 32))).to(torch.bfloat16)
        ok &= bool(torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()))
    return ok


def packed_layer(x: torch.Tensor, r, sw: torch.Tensor):
    """A packed layer's general call on x (the activation kernel, then packed_matmul) as a function of one weight
    copy (codes, scales): the path where a layer has no eager plan (strict or gradient calls), bf16 out."""
    prepare = get_backend("packed").prepare

    def layer(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a = prepare(x, r, None)
        return gemm.packed_matmul(a.values, c, s, r.weight_fmt, r.weight_block, a.scale, sw, None, torch.bfloat16)
    return layer


def layer_plans(p: QTensor, sw: torch.Tensor, r, m: int, n_copies: int) -> tuple[str, list[EagerPlan] | None]:
    """The backend "auto" gives an [N, K] layer of recipe r on this GPU, and its eager plans for m tokens of a
    layer that reads its input alone, one per copy of the weight (each copy in the backend's layout where it has
    one): the launches a model's eager, graph-replayed and compiled calls make for that layer. None for the plans
    where the backend has none at this size (then the model calls prepare + matmul)."""
    name = resolve_backend("auto", r, "cuda", tuple(p.shape), torch.bfloat16)
    b, plans = get_backend(name), []
    for _ in range(n_copies):
        q = replace(p, codes=p.codes.clone(), scales=p.scales.clone())
        layout = b.to_layout(q, sw, None) if b.to_layout is not None else None
        plan = None if b.eager_plan is None else b.eager_plan(QWeight(None, sw, q), None, r, (m,), torch.bfloat16,
                                                               torch.bfloat16, layout, own_input=True)
        if plan is None:
            return name, None
        held = (q, layout)  # a plan launches on its weight's pointers: the layer it belongs to holds the weight
        plans.append(EagerPlan(plan.prepare, lambda act, plan=plan, held=held: plan.matmul(act),
                               None if plan.forward is None else lambda x, plan=plan, held=held: plan.forward(x)))
    return name, plans


def route(m: int, n: int, kp: int) -> str:
    """Which kernel an own-input layer's plan runs for m tokens of an [n, kp] weight on this GPU."""
    device = torch.device("cuda")
    t = cuda_gemm._wgmma_tile(m, n, kp, device)
    if t is not None:
        b = cuda_gemm._bulk_tile(t, n, kp, device)
        return "wgmma, bulk copies" if b is not None else "wgmma"
    if m <= cuda_gemm.MAX_M:
        return "decode kernel"
    fused = cublaslt.scaled_matmul(m, n, kp, torch.bfloat16, False, None, device) is not None
    return "scratch + cuBLASLt" if fused else "scratch + cuBLAS + epilogue"


def time_shape(k: int, n: int, m: int, caps: dict, recipes: tuple[str, ...] = ("nvfp4", "sharq")) -> dict:
    """Every variant at one (K, N, M); ms from graph replays over rotating weight copies. A recipe's GEMM and
    layer are its eager plan's (what a model's own-input layer runs, in eager, graph and compiled calls: the
    backend auto picks, bulk copies where routed), "general" the prepare + packed_matmul path of strict and
    gradient calls."""
    x = outlier_x(m, k)
    row: dict = {"K": k, "N": n, "M": m, "route": route(m, n, k)}
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    ws = [w.clone() for _ in range(copies(w.numel() * 2))]
    row["bf16_ms"] = graph_ms([lambda w=w: F.linear(x, w) for w in ws])
    if m >= 16:  # _scaled_mm needs every dimension a multiple of 16
        w8 = [w.to(torch.float8_e4m3fn) for w in ws[: copies(w.numel())]]
        x8, one = x.to(torch.float8_e4m3fn), torch.ones((), device="cuda")
        row["fp8_ms"] = graph_ms([lambda w=w: torch._scaled_mm(x8, w.T, one, one, out_dtype=torch.bfloat16)
                                  for w in w8])
    del ws, w
    for recipe in recipes:
        p, sw, r = payload(recipe, n, k)
        nbytes = p.codes.numel() + p.scales.numel()
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(nbytes))]
        general = packed_layer(x, r, sw)
        row[f"{recipe}_general_layer_ms"] = graph_ms([lambda c=c, s=s: general(c, s) for c, s in ps])
        del ps
        backend, plans = layer_plans(p, sw, r, m, copies(nbytes))
        row[f"{recipe}_backend"] = backend
        if plans is None:  # no plan at this size: the model runs the general path
            row[f"{recipe}_layer_ms"] = row[f"{recipe}_general_layer_ms"]
        else:
            act = plans[0].prepare(x)
            row[f"{recipe}_gemm_ms"] = graph_ms([lambda pl=pl: pl.matmul(act) for pl in plans])
            row[f"{recipe}_layer_ms"] = graph_ms([lambda pl=pl: pl.matmul(pl.prepare(x)) for pl in plans])
            if m <= cuda_gemm.MAX_M:  # the same layer without programmatic dependent launch, for comparison
                launch.PROGRAMMATIC_LAUNCH = False
                try:
                    row[f"{recipe}_layer_plain_launch_ms"] = graph_ms([lambda pl=pl: pl.matmul(pl.prepare(x))
                                                                       for pl in plans])
                finally:
                    launch.PROGRAMMATIC_LAUNCH = True
        row[f"{recipe}_weight_bytes"] = nbytes + 4
        del plans
        if available("humming") and humming.supports(r) and humming.accepts(n, k, torch.bfloat16):
            row.update(time_humming(recipe, x, p, sw, r))
    torch.cuda.empty_cache()
    for key in [key for key in row if key.endswith("_ms")]:
        row[key.replace("_ms", "_x_bf16")] = row["bf16_ms"] / row[key]  # speed relative to BF16 cuBLAS
    if m <= 16:
        io = (m * k + m * n) * 2
        row["bf16_GBps"] = (n * k * 2 + io) / row["bf16_ms"] / 1e6
        for recipe in recipes:
            if f"{recipe}_gemm_ms" in row:
                row[f"{recipe}_gemm_GBps"] = (row[f"{recipe}_weight_bytes"] + io) / row[f"{recipe}_gemm_ms"] / 1e6
                row[f"{recipe}_gemm_of_copy"] = row[f"{recipe}_gemm_GBps"] / caps["copy_GBps"]
        row["bf16_of_copy"] = row["bf16_GBps"] / caps["copy_GBps"]
    if m >= 2048:
        flops = 2 * m * n * k
        for key in ("bf16", "sharq_gemm", "sharq_layer", "nvfp4_layer"):
            if f"{key}_ms" in row:
                row[f"{key}_TFLOPs"] = flops / row[f"{key}_ms"] / 1e9
        row["bf16_of_peak"] = row["bf16_TFLOPs"] / caps["bf16_TFLOPs"]
    return row


def time_humming(recipe: str, x: torch.Tensor, p: QTensor, sw: torch.Tensor, r) -> dict:
    """The humming backend on the same payload: its GEMM as sharq runs it (humming's default, stream-K) and in
    humming's batch-invariant mode (no split tiles: the fp32 bound), and its layer (prepare + GEMM)."""
    layout = humming.to_layout(p, sw, None)
    layouts = [WeightLayout(tuple(t.clone() for t in layout.tensors[:2]) + layout.tensors[2:], layout.meta,
                            layout.shape) for _ in range(copies(layout.nbytes))]
    prepare = get_backend("humming").prepare
    act = prepare(x, r, None)
    alpha = (act.scale.reshape(1) * sw.reshape(1)).float()
    qw = QWeight(None, sw, None)
    out = {f"{recipe}_humming_weight_bytes": layout.nbytes}
    for mode, compute in (("humming", None), ("humming_invariant", '{"use_batch_invariant": true}')):
        def gemm_only(lay, compute=compute):
            return humming._gemm(lay, act.values, alpha, compute)
        out[f"{recipe}_{mode}_gemm_ms"] = graph_ms([lambda lay=lay: gemm_only(lay) for lay in layouts])
    out[f"{recipe}_humming_layer_ms"] = graph_ms([lambda lay=lay: humming.matmul(prepare(x, r, None), qw, None,
                                                                                  torch.bfloat16, lay)
                                                  for lay in layouts])
    return out


def sweep(ms: tuple[int, ...] = (1, 2, 4, 16)) -> list[dict]:
    """The small-M launch shapes on every shape (sharq weights), GPU ms each: the MMA kernel's rows per tile and
    splits (4 warps, 3 stages) and, for M <= 4, the CUDA-core kernel's rows, K step and splits (4 warps, 1 stage);
    then warps and stages for the best of each kernel. How gemm.choose_tile and gemm.GEMV_M were chosen."""
    rows = []
    for (k, n), m in itertools.product(SHAPES, ms):
        p, sw, r = payload("sharq", n, k)
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(p.codes.numel()))]
        a = outlier_x(m, k)
        one = torch.ones(1, 1, device="cuda")

        def timed(t: gemm.Tile) -> float | None:
            try:
                return graph_ms([lambda c=c, s=s: gemm.packed_matmul(a, c, s, "nvfp4", 32, one, sw, None,
                                                                    torch.bfloat16, tile=t) for c, s in ps], reps=10)
            except Exception as e:  # noqa: BLE001 - a shape that does not compile (shared memory) is skipped
                print(f"  {t}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
                return None

        auto = gemm.choose_tile(m, n, k, a.device)
        results: dict = {}
        families = {"mma": [gemm.Tile(bn, max(16, auto.bm), 128, splits)
                            for bn, splits in itertools.product((64, 128, 256), (1, 2, 4, 8, 16))
                            if k // splits >= 256]}
        if m <= 4:
            families["gemv"] = [gemm.Tile(bn, 1, bk, splits, 4, 1, "gemv")
                                for bn, bk, splits in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8, 16))
                                if k // splits >= 2 * bk and bn * bk <= 128 * 256]
        best = {}
        for family, tiles in families.items():
            mine = {t: ms for t in dict.fromkeys(tiles) if (ms := timed(t)) is not None}
            top = min(mine, key=mine.get)
            for warps, stages in itertools.product((2, 4, 8) if family == "gemv" else (4, 8), (1, 2, 3)):
                t = gemm.Tile(top.bn, top.bm, top.bk, top.splits, warps, stages, top.kernel)
                if t not in mine and (ms := timed(t)) is not None:
                    mine[t] = ms
            best[family] = min(mine, key=mine.get)
            results.update(mine)
        if auto not in results and (ms := timed(auto)) is not None:
            results[auto] = ms
        row = {"K": k, "N": n, "M": m, "auto": str(auto), "auto_ms": results.get(auto),
               "all": {str(t): ms for t, ms in sorted(results.items(), key=lambda kv: kv[1])[:16]}}
        for family, t in best.items():
            row[f"best_{family}"], row[f"best_{family}_ms"] = str(t), results[t]
        rows.append(row)
        print(f"K={k} N={n} M={m}: " + "; ".join(f"best {f} {t} {results[t]:.4f} ms" for f, t in best.items())
              + f"; auto {auto} {results.get(auto)}", flush=True)
    return rows


def crossover(ms: tuple[int, ...] = (16, 24, 32, 48, 64)) -> list[dict]:
    """Where the packed MMA kernel should hand over to decode-to-scratch + cuBLAS (gemm.SMALL_M): both paths
    timed at each M on every shape (sharq weights and activations), BF16 cuBLAS beside them."""
    rows = []
    prepare = get_backend("packed").prepare
    for (k, n), m in itertools.product(SHAPES, ms):
        x = outlier_x(m, k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        ws = [w.clone() for _ in range(copies(w.numel() * 2))]
        row = {"K": k, "N": n, "M": m, "bf16_ms": graph_ms([lambda w=w: F.linear(x, w) for w in ws])}
        del ws, w
        p, sw, r = payload("sharq", n, k)
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(p.codes.numel() + p.scales.numel()))]
        act = prepare(x, r, None)
        sx, swf = act.scale.reshape(-1).float(), sw.reshape(-1).float()
        tile = gemm.choose_tile(m, n, p.codes.shape[1] * 2, x.device)
        row["mma_ms"] = graph_ms([lambda c=c, s=s: gemm.packed_matmul(act.values, c, s, r.weight_fmt, r.weight_block,
                                                                      act.scale, sw, None, torch.bfloat16, tile=tile)
                                  for c, s in ps])
        row["decoded_ms"] = graph_ms([lambda c=c, s=s: gemm.decoded_matmul(act.values, c, s, r.weight_fmt,
                                                                           r.weight_block, sx, swf, None,
                                                                           torch.bfloat16) for c, s in ps])
        row["tile"] = str(tile)
        del ps
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"K={k} N={n} M={m}: bf16 {1e3 * row['bf16_ms']:.1f} us, mma {1e3 * row['mma_ms']:.1f} us, "
              f"decoded {1e3 * row['decoded_ms']:.1f} us", flush=True)
    return rows


def sweep_tiles(m: int, n: int, auto: cuda_gemm.CudaTile) -> list[cuda_gemm.CudaTile]:
    """choose_tile's launch, then every variant cuda_sweep tries with its K partition (see there)."""
    return list(dict.fromkeys([auto] + [
        cuda_gemm.CudaTile(rt, auto.wk, 1 if ring or m > 8 else 2, auto.splits, ring, wn, direct, blocks)
        for rt, wn, ring, direct, blocks in itertools.product((1, 2), (1, 2), (0, 3), (False, True),
                                                             (0, 768 // (32 * auto.wk)))
        if (direct or m <= 32) and n % (16 * rt * wn) == 0 and (not blocks or m <= 8 and wn == 1)]))


@dataclass
class CudaCase:
    """One layer shape at m tokens, set up for timing the CUDA GEMMs: BF16 cuBLAS's time, the recipe's payload and
    enough copies of it to stream from memory (`copies`), and the activation its prepare kernel makes."""

    bf16_us: float
    p: QTensor
    sw: torch.Tensor
    r: sharq.Recipe
    ps: list
    act: object
    sx: torch.Tensor
    swf: torch.Tensor

    @classmethod
    def make(cls, recipe: str, k: int, n: int, m: int) -> CudaCase:
        x = outlier_x(m, k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        ws = [w.clone() for _ in range(copies(w.numel() * 2))]
        bf16_us = 1e3 * graph_ms([lambda w=w: F.linear(x, w) for w in ws])
        del ws, w
        p, sw, r = payload(recipe, n, k)
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(p.codes.numel() + p.scales.numel()))]
        act = get_backend("packed").prepare(x, r, None)
        return cls(bf16_us, p, sw, r, ps, act, act.scale.reshape(-1).float(), sw.reshape(-1).float())

    def output(self, tile, dtype: torch.dtype = torch.bfloat16, a: torch.Tensor | None = None, codes=None,
               scales=None) -> torch.Tensor:
        """cuda_gemm.nvfp4_mma with this tile (None: as packed_matmul dispatches) on the prepared activation."""
        return cuda_gemm.nvfp4_mma(self.act.values if a is None else a, self.p.codes if codes is None else codes,
                                   self.p.scales if scales is None else scales, self.r.weight_block, self.sx,
                                   self.swf, None, dtype, tile=tile)

    def cuda_us(self, tile, a: torch.Tensor | None = None) -> float:
        """GPU µs of output(tile) into bf16, over the payload's copies in one CUDA graph."""
        return 1e3 * graph_ms([lambda c=c, s=s: self.output(tile, a=a, codes=c, scales=s) for c, s in self.ps],
                              reps=10)


def best_of(time: Callable[[Any], float], tiles: dict, rounds: int = 2) -> dict:
    """GPU µs of each launch in `tiles` (name -> tile) by `time` (e.g. CudaCase.cuda_us), the best of `rounds`
    rounds, after two timings thrown away: the first timings after a set-up read up to 8 % slow (H100, the same
    tile timed twice in a row), which would favour whichever launch is timed last."""
    first = next(iter(tiles.values()))
    time(first)
    time(first)
    us: dict = {}
    for _ in range(rounds):
        for key, t in tiles.items():
            us[key] = min(us.get(key, math.inf), time(t))
    return us


def cuda_sweep(ms: tuple[int, ...] = (1, 4, 8, 16, 32, 64), recipes: tuple[str, ...] = ("sharq",)) -> list[dict]:
    """The CUDA kernel's launch shapes (kernels/cuda_gemm.py) on every shape at decode M (`recipes`' weights, bf16
    out), beside BF16 cuBLAS, the Triton kernel and (above 16 tokens) decode + cuBLAS; GPU µs each, plus the
    kernel's registers and local memory per thread (spills). How cuda_gemm.choose_tile was chosen. The K
    partition (warps per block that split K, splits over blocks) is choose_tile's, fixed by the layer's shape so
    that a token's output does not depend on the batch; the sweep varies the rest: row tiles per warp, row groups
    per block, register stages or the cp.async ring, the activation staged or read where used, and up to 8 tokens
    a register cap for 24 warps a multiprocessor (3 blocks of 8 warps, 6 of 4) instead of the default 16. For the
    best launch also the activation bytes its blocks read, and its time with every token reading one activation
    row (what the activation's traffic costs)."""
    rows = []
    for (k, n), m, recipe in itertools.product(SHAPES, ms, recipes):
        if (fmt := sharq.get_recipe(recipe).weight_fmt) != "nvfp4":
            raise ValueError(f"the CUDA kernel reads NVFP4 weights; recipe {recipe!r} has {fmt}")
        case = CudaCase.make(recipe, k, n, m)
        row: dict = {"K": k, "N": n, "M": m, "recipe": recipe, "bf16_us": case.bf16_us}
        p, sw, r, ps, act, sx, swf = case.p, case.sw, case.r, case.ps, case.act, case.sx, case.swf
        block = r.weight_block
        device = act.values.device
        tile = gemm.choose_tile(m, n, k, device)
        row["triton_us"] = 1e3 * graph_ms([lambda c=c, s=s: gemm.packed_matmul(
            act.values, c, s, "nvfp4", block, act.scale, sw, None, torch.bfloat16, tile=tile) for c, s in ps])
        if m > 16:
            row["decoded_us"] = 1e3 * graph_ms([lambda c=c, s=s: gemm.decoded_matmul(
                act.values, c, s, "nvfp4", block, sx, swf, None, torch.bfloat16) for c, s in ps])
        auto = cuda_gemm.choose_tile(m, n, k, device)
        tiles = sweep_tiles(m, n, auto)
        timed = {}
        for t in tiles:
            try:
                timed[t] = case.cuda_us(t)
            except Exception as e:  # noqa: BLE001 - a launch that does not compile or fit is reported, skipped
                print(f"  {t}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        best = min(timed, key=timed.get)
        row.update(auto=str(auto), auto_us=timed.get(auto), best=str(best), best_us=timed[best],
                   all={str(t): v for t, v in sorted(timed.items(), key=lambda kv: kv[1])})
        row["bytes"] = p.codes.numel() + p.scales.numel() + (m * k + m * n) * 2
        # every block reads the whole activation over its K range (from L2, or L1): once per 16·rt·wn weight rows
        row["best_activation_reads"] = n // (16 * best.rt * best.wn) * m * k * 2
        # the same launch with every token reading one activation row (row stride 0, the same work otherwise):
        # after the first read the activation comes from L1, so the gap to best_us is what its traffic costs
        row["best_us_one_activation_row"] = case.cuda_us(best, a=act.values[:1].expand(m, -1))
        row["best_regs"], row["best_local_bytes"] = kernel_resources(best, m, block)
        rows.append(row)
        print(f"K={k} N={n} M={m} {recipe}: bf16 {row['bf16_us']:.1f} us, triton {row['triton_us']:.1f}, decoded "
              f"{row.get('decoded_us', float('nan')):.1f}, cuda auto "
              f"{row['auto_us']} ({auto}), best {row['best_us']:.1f} ({best}); x bf16 "
              f"{row['bf16_us'] / row['best_us']:.2f}, {row['bytes'] / row['best_us'] / 1e3:.0f} GB/s; "
              f"{row['best_regs']} registers, {row['best_local_bytes']} B local; activation reads "
              f"{row['best_activation_reads'] / 1e6:.1f} MB, {row['best_us_one_activation_row']:.1f} us with "
              f"one activation row", flush=True)
        del ps, case
        torch.cuda.empty_cache()
    return rows


def wgmma_vs_decode(ms: tuple[int, ...] = (16, 17, 24, 32, 33, 48, 64)) -> list[dict]:
    """The CUDA GEMM as packed_matmul dispatches it (the wgmma kernel where cuda_wgmma.choose_tile takes the shape)
    against the decode kernel forced (cuda_gemm.choose_tile's launch), beside BF16 cuBLAS, on the 8B and 70B
    shapes: where the wgmma kernel takes over, and what it gains there (sharq weights, bf16 out)."""
    rows = []
    capability = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        case = CudaCase.make("sharq", k, n, m)
        row: dict = {"K": k, "N": n, "M": m, "bf16_us": case.bf16_us,
                     "wgmma": str(cuda_wgmma.choose_tile(m, n, k, capability, sms))}
        row["decode_kernel_us"] = case.cuda_us(cuda_gemm.choose_tile(m, n, k, case.act.values.device))
        row["dispatched_us"] = case.cuda_us(None)
        rows.append(row)
        print(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f} us, decode kernel {row['decode_kernel_us']:.1f}, "
              f"dispatched {row['dispatched_us']:.1f} ({row['wgmma']}); x bf16 "
              f"{row['bf16_us'] / row['dispatched_us']:.2f} (decode kernel "
              f"{row['bf16_us'] / row['decode_kernel_us']:.2f})", flush=True)
        del case
    return rows


def wgmma_sweep(ms: tuple[int, ...] = (25, 32, 33, 48, 64)) -> list[dict]:
    """The wgmma kernel's launch options (kernels/cuda_wgmma.py) where choose_tile takes the shape, on the 8B and 70B
    shapes: weight chunks in flight, activation buffers, producer warps, consumer warpgroups a block (1: two blocks
    a multiprocessor), each with choose_tile's K split for it (with_splits); GPU µs beside BF16 and the decode
    kernel, and each launch's largest difference from the decode kernel's fp32 output relative to its largest
    output (a launch that is wrong shows > 1e-5). How cuda_wgmma.choose_tile's defaults were chosen."""
    rows = []
    capability = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    options = [{}, {"stages": 2}, {"stages": 3}, {"slots": 6}, {"producers": 8}, {"warpgroups": 1},
               {"warpgroups": 1, "stages": 2}, {"warpgroups": 3}]
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        if cuda_wgmma.choose_tile(m, n, k, capability, sms) is None:
            continue
        case = CudaCase.make("sharq", k, n, m)
        row: dict = {"K": k, "N": n, "M": m, "bf16_us": case.bf16_us}
        decode_tile = cuda_gemm.choose_tile(m, n, k, case.act.values.device)
        want = case.output(decode_tile, torch.float32)
        row["decode_kernel_us"] = case.cuda_us(decode_tile)
        timed = {}
        for option in options:
            t = cuda_wgmma.WgmmaTile(**option)
            if n % t.rows:
                continue
            t = cuda_wgmma.with_splits(t, m, n, k, sms)
            error = ((case.output(t, torch.float32) - want).abs().max() / want.abs().max()).item()
            timed[str(t)] = (case.cuda_us(t), error)
        best = min((v for v in timed.items() if v[1][1] < 1e-5), key=lambda kv: kv[1][0])
        row.update(all=timed, best=best[0], best_us=best[1][0])
        rows.append(row)
        print(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f} us, decode kernel {row['decode_kernel_us']:.1f}, wgmma "
              + ", ".join(f"{key.removeprefix('WgmmaTile')} {us:.1f}" + (" WRONG" if err >= 1e-5 else "")
                          for key, (us, err) in timed.items()), flush=True)
        del case
    return rows


# the staged kernel's launch options (kernels/cuda_wgmma.py, WgmmaTile.staged), which --staged times
STAGED = [dict(tokens=128, staged=True, slots=3, producers=8), dict(tokens=128, staged=True, slots=2, producers=8),
          dict(tokens=128, staged=True, slots=3, producers=4), dict(tokens=256, staged=True, slots=2, producers=4),
          dict(tokens=128, staged=True, slots=3, producers=4, warpgroups=1), dict(tokens=64, staged=True, producers=8)]


def wide_sweep(ms: tuple[int, ...] = (96, 128, 192, 256, 384), wider: bool = False, staged: bool = False) -> list[dict]:
    """The wgmma kernel's token tiles above 64 tokens (kernels/cuda_wgmma.py) against what those sizes run otherwise
    (decode into the scratch weight + cuBLAS) and BF16 cuBLAS, on the 8B shapes (sharq weights, bf16 out): 64 or 128
    tokens a block (wgmma's N), K split over 1-8 blocks (and k_splits' choice); with `wider` (--wide-options) instead
    the launch options that measured slower (one consumer warpgroup, 192 and 256 tokens, 2 chunks in flight), and
    with `staged` (--staged) also the staged kernel's options, each with no K split and k_splits' choices (within
    one wave, and filling the GPU). GPU µs each, and each launch's largest difference from decode + cuBLAS's fp32
    output relative to its largest output (a launch that is wrong shows > 1e-5). How cuda_wgmma's WIDE_TOKENS and
    WIDE_MAX_M were chosen."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    options = [dict(tokens=64), dict(tokens=128), *(STAGED if staged else [])]
    if wider:
        options += [dict(tokens=128, warpgroups=1), dict(tokens=192, slots=3), dict(tokens=128, stages=2),
                    dict(tokens=256, warpgroups=1, slots=3, stages=2)]
    for (k, n), m in itertools.product(SHAPES, ms):
        case = CudaCase.make("sharq", k, n, m)
        a, block, sx, sw = case.act.values, case.r.weight_block, case.sx, case.swf
        row: dict = {"K": k, "N": n, "M": m, "bf16_us": case.bf16_us}
        want = gemm.decoded_matmul(a, case.p.codes, case.p.scales, "nvfp4", block, sx, sw, None, torch.float32)
        row["decoded_us"] = 1e3 * graph_ms([lambda c=c, s=s: gemm.decoded_matmul(
            a, c, s, "nvfp4", block, sx, sw, None, torch.bfloat16) for c, s in case.ps], reps=10)
        timed = {}
        for option in options:
            try:
                tile = cuda_wgmma.WgmmaTile(**option)
            except ValueError as e:
                print(f"  {option}: {e}", file=sys.stderr)
                continue
            if n % tile.rows:
                continue
            blocks = n // tile.rows * cuda_wgmma.token_tiles(m, tile)
            chosen = {cuda_wgmma.k_splits(blocks, k, sms, one_wave=True)}
            if staged:  # also the split that fills the GPU, as up to 64 tokens
                chosen.add(cuda_wgmma.k_splits(blocks, k, sms))
            for splits in sorted({1, *chosen, *(s for s in (2, 4, 8) if k // 128 // s >= 4 and not (wider or staged))}):
                t = replace(tile, splits=splits)
                try:
                    error = ((case.output(t, torch.float32) - want).abs().max() / want.abs().max()).item()
                    timed[str(t)] = (case.cuda_us(t), error)
                except Exception as e:  # noqa: BLE001 - a launch that does not compile or fit is reported, skipped
                    print(f"  {t}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        good = [kv for kv in timed.items() if kv[1][1] < 1e-5]
        best = min(good, key=lambda kv: kv[1][0]) if good else (None, (float("nan"), None))
        row.update(all=timed, best=best[0], best_us=best[1][0])
        rows.append(row)
        print(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f} us, decode + cuBLAS {row['decoded_us']:.1f} "
              f"(x bf16 {row['bf16_us'] / row['decoded_us']:.2f}), best wide {row['best_us']:.1f} (x bf16 "
              f"{row['bf16_us'] / row['best_us']:.2f}); "
              + ", ".join(f"{key.removeprefix('WgmmaTile')} {us:.1f}" + (" WRONG" if err >= 1e-5 else "")
                          for key, (us, err) in timed.items()), flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


def scratch_decode(ms: tuple[int, ...] = ()) -> list[dict]:
    """The decode into the bf16 scratch weight that decode + cuBLAS runs above the GEMM kernels' tokens: the CUDA
    kernel (kernels/cuda_dequantize.py) against the Triton one, on the 8B and 70B shapes, for 32- and 16-element
    blocks (sharq, sharq-plus), each over weight copies streamed from memory in one CUDA graph. GB/s counts the
    payload read and the bf16 written; the two outputs must be equal bit for bit. (`ms` is not used.)"""
    rows, copy = [], ceilings()["copy_GBps"]
    for (k, n), recipe in itertools.product(SHAPES + SHAPES_70B, ("sharq", "sharq-plus")):
        p, _, r = payload(recipe, n, k)
        nbytes = p.codes.numel() + p.scales.numel() + 2 * n * k
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(nbytes))]
        w = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        cuda = [(lambda run=cuda_dequantize.launcher(c, sc, "nvfp4", r.weight_block, k): run(w)) for c, sc in ps]
        triton = [(lambda run=gemm._dequantizer(c, sc, "nvfp4", r.weight_block, k, bound=False, cuda=False): run(w))
                  for c, sc in ps]
        cuda[0]()
        got = w.clone()
        triton[0]()
        row = {"K": k, "N": n, "recipe": recipe, "equal": torch.equal(got.view(torch.int16), w.view(torch.int16))}
        for name, fns in (("cuda", cuda), ("triton", triton)):
            us = 1e3 * graph_ms(fns)
            row[f"{name}_us"], row[f"{name}_GBps"] = us, nbytes / us / 1e3
        rows.append(row)
        print(f"K={k} N={n} {recipe}: CUDA {row['cuda_us']:.1f} us ({row['cuda_GBps']:.0f} GB/s, "
              f"{row['cuda_GBps'] / copy:.0%} of copy), Triton {row['triton_us']:.1f} us ({row['triton_GBps']:.0f} "
              f"GB/s, {row['triton_GBps'] / copy:.0%}); equal bits: {row['equal']}", flush=True)
        del ps
        torch.cuda.empty_cache()
    return rows


def placed_sweep(ms: tuple[int, ...] = (1, 16, 64, 128, 256, 2048)) -> list[dict]:
    """The CUDA kernels on codes in kernels/placed.py's layout against the same launches on canonical codes, on the
    8B shapes (sharq weights, bf16 out): at each M the launch the packed backend makes (decode kernel or wgmma
    kernel), from 128 tokens also the staged kernel (128- and 256-token tiles), and once per shape the decode into
    the scratch weight. GPU µs each over weight copies streamed from memory; each placed launch's output against
    the canonical one's (fp32 out, largest difference relative to the largest output: > 1e-5 is wrong) and the
    placed scratch decode's bits against the canonical one's. Whether the placed layout's fewer instructions a
    weight (docs/PERF.md) make the kernels faster, which decides whether it becomes the packed backend's layout."""
    rows = []
    capability = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for k, n in SHAPES:
        p, _, r = payload("sharq", n, k)
        placed_codes = place_codes(p.codes)
        w = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        copies_ = [(p.codes.clone(), placed_codes.clone(), p.scales.clone())
                   for _ in range(copies(p.codes.numel() + p.scales.numel() + 2 * n * k))]
        runs = {placed: [(lambda run=cuda_dequantize.launcher(c1 if placed else c0, sc, "nvfp4", r.weight_block, k,
                                                                placed=placed), w=w: run(w)) for c0, c1, sc in copies_]
                for placed in (False, True)}
        runs[False][0]()
        want = w.clone()
        runs[True][0]()
        row = {"K": k, "N": n, "kernel": "scratch decode", "equal": torch.equal(want.view(torch.int16),
                                                                                w.view(torch.int16))}
        row.update({f"{'placed' if placed else 'canonical'}_us": 1e3 * graph_ms(fns) for placed, fns in runs.items()})
        rows.append(row)
        print(f"K={k} N={n} scratch decode: canonical {row['canonical_us']:.1f} us, placed {row['placed_us']:.1f} "
              f"(x {row['canonical_us'] / row['placed_us']:.2f}); equal bits: {row['equal']}", flush=True)
        del copies_, runs, w, want
        for m in ms:
            case = CudaCase.make("sharq", k, n, m)
            placed_ps = [(place_codes(c), s) for c, s in case.ps]
            tiles = []
            wgmma = cuda_wgmma.choose_tile(m, n, k, capability, sms)
            if wgmma is not None:
                tiles.append(wgmma)
            elif m <= cuda_gemm.MAX_M:
                tiles.append(cuda_gemm.choose_tile(m, n, k, case.act.values.device))
            if m >= 128 and capability == (9, 0):
                for option in (STAGED[0], STAGED[3]):
                    tiles.append(cuda_wgmma.with_splits(cuda_wgmma.WgmmaTile(**option), m, n, k, sms))
            for tile in tiles:
                ptile = replace(tile, placed=True)
                want = case.output(tile, torch.float32)
                got = case.output(ptile, torch.float32, codes=placed_ps[0][0], scales=placed_ps[0][1])
                row = {"K": k, "N": n, "M": m, "kernel": str(tile), "bf16_us": case.bf16_us,
                       "error": ((got - want).abs().max() / want.abs().max()).item(),
                       "canonical_us": case.cuda_us(tile),
                       "placed_us": 1e3 * graph_ms([lambda c=c, sc=sc, case=case, t=ptile: case.output(
                           t, codes=c, scales=sc) for c, sc in placed_ps], reps=10)}
                rows.append(row)
                print(f"K={k} N={n} M={m} {row['kernel']}: canonical {row['canonical_us']:.1f} us (x bf16 "
                      f"{case.bf16_us / row['canonical_us']:.2f}), placed {row['placed_us']:.1f} (x bf16 "
                      f"{case.bf16_us / row['placed_us']:.2f})" + (" WRONG" if row["error"] > 1e-5 else ""),
                      flush=True)
            del case, placed_ps
            torch.cuda.empty_cache()
    return rows


GROUPS = [(4096, (4096, 1024, 1024)), (4096, (14336, 14336)),  # Llama-3.1-8B q/k/v, gate/up (K, layer widths)
          (8192, (8192, 1024, 1024)), (8192, (28672, 28672))]  # Llama-3.1-70B


@dataclass
class GroupCase:
    """Layers that read one activation (widths ns, K = k) at m tokens, set up for timing their CUDA GEMMs: the
    prepared activation and enough copies of the layers' payloads ((codes, scales, s_w) each) to stream from memory."""

    act: object
    sx: torch.Tensor
    block: int
    sets: list

    @classmethod
    def make(cls, recipe: str, k: int, ns: tuple[int, ...], m: int, x: torch.Tensor | None = None) -> GroupCase:
        r = sharq.get_recipe(recipe)
        layers = [payload(recipe, n, k, seed=i + 1)[:2] for i, n in enumerate(ns)]
        act = get_backend("packed").prepare(outlier_x(m, k) if x is None else x, r, None)
        sets = [[(p.codes.clone(), p.scales.clone(), sw.reshape(-1).float()) for p, sw in layers]
                for _ in range(copies(sum(p.codes.numel() + p.scales.numel() for p, _ in layers)))]
        return cls(act, act.scale.reshape(-1).float(), r.weight_block, sets)

    def alone(self, ws, tile=None) -> list[torch.Tensor]:
        """Each layer's own launch (its tile by the launch plan, or `tile`), bf16 out."""
        return [cuda_gemm.nvfp4_mma(self.act.values, c, s, self.block, self.sx, sw, None, torch.bfloat16, tile=tile)
                for c, s, sw in ws]

    def group(self, ws, tile=None) -> list[torch.Tensor] | None:
        """One group launch (cuda_gemm.group_tile's, or `tile`), bf16 out; None where there is none."""
        return cuda_gemm.nvfp4_mma_group(self.act.values, ws, [None] * len(ws), self.block, self.sx, torch.bfloat16,
                                         tile=tile)

    def us(self, launch, tile=None) -> float:
        """GPU µs of launch(ws, tile) (alone or group) over the payloads' copies in one CUDA graph."""
        return 1e3 * graph_ms([lambda ws=ws: launch(ws, tile) for ws in self.sets], reps=10)


def bf16_layers_us(ns: tuple[int, ...], k: int, x: torch.Tensor) -> float:
    """GPU µs of BF16 cuBLAS's products of x with layers [n, k] for each n in ns, one by one, over weight copies in
    one graph (the weights streamed from memory)."""
    w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n in ns]
    sets = [[t.clone() for t in w] for _ in range(copies(sum(t.numel() for t in w) * 2))]
    return 1e3 * graph_ms([lambda ws=ws: [F.linear(x, t) for t in ws] for ws in sets])


def groups(ms: tuple[int, ...] = (1, 4, 8, 16, 24, 32, 48, 64), recipe: str = "sharq") -> list[dict]:
    """Layers that read one activation (q/k/v, gate/up) launched one by one against one group launch
    (cuda_gemm.nvfp4_mma_group), GPU µs of all the layers' products, beside BF16 cuBLAS one by one and on the
    concatenated weight (what a model with fused projections would run); each over weight copies in one graph,
    and the group's outputs checked against the layers' own launches with its tile (bit for bit)."""
    rows = []
    for (k, ns), m in itertools.product(GROUPS, ms):
        x = outlier_x(m, k)
        bf16_alone = bf16_layers_us(ns, k, x)
        w = torch.randn(sum(ns), k, device="cuda", dtype=torch.bfloat16) / k**0.5
        cat = [w.clone() for _ in range(copies(w.numel() * 2))]
        del w
        bf16_fused = 1e3 * graph_ms([lambda t=t: F.linear(x, t) for t in cat])
        del cat
        case = GroupCase.make(recipe, k, ns, m, x)
        row = {"K": k, "N": list(ns), "M": m, "bf16_alone_us": bf16_alone, "bf16_fused_us": bf16_fused,
               "alone_us": case.us(case.alone)}
        if case.group(case.sets[0]) is not None:
            tile = cuda_gemm.group_tile(m, ns, k, x.device)
            row["group_equal"] = all(torch.equal(a, b) for a, b in zip(case.group(case.sets[0]),
                                                                       case.alone(case.sets[0], tile)))
            row["group_us"] = case.us(case.group)
        rows.append(row)
        print(f"K={k} N={'+'.join(map(str, ns))} M={m}: bf16 alone {bf16_alone:.1f} us, fused {bf16_fused:.1f}; "
              f"sharq alone {row['alone_us']:.1f}" + (f", group {row['group_us']:.1f} (equal: {row['group_equal']});"
                                                      f" group x bf16 alone {bf16_alone / row['group_us']:.2f}, "
                                                      f"x bf16 fused {bf16_fused / row['group_us']:.2f}"
                                                      if "group_us" in row else ", no group launch"), flush=True)
        del case
    return rows


def k_partition_sweep(ms: tuple[int, ...] = (1, 4, 8, 16, 24, 32)) -> list[dict]:
    """What choose_tile keeps fixed per shape (batch invariance), timed anyway: the decode kernel's launch with the K
    split over 4 or 8 warps a block (a register cap keeps its warps a multiprocessor), each with a ring of 3 or 4
    chunks where it rings and with the other number of row tiles up to 8 tokens, on the 8B and 70B shapes at every
    M the kernel takes; and the group launch (q/k/v, gate/up) at one token with a register cap of 3-8 blocks a
    multiprocessor (CudaTile.min_blocks); GPU µs, best of two rounds (`best_of`)."""
    rows = []
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        case = CudaCase.make("sharq", k, n, m)
        base = cuda_gemm.choose_tile(m, n, k, case.act.values.device)
        tiles = {"chosen": base}
        for wk in (4, 8):
            if (k // 128) // base.splits < wk:
                continue
            t = replace(base, wk=wk, min_blocks=base.min_blocks * base.wk // wk)
            tiles.update({f"wk{wk}_ring{ring}": replace(t, ring=ring) for ring in ((3, 4) if t.ring else (0,))})
            if m <= 8 and t.ring and n % 32 == 0:
                other = 3 - t.rt  # the other number of row tiles: capped to 32 warps a multiprocessor with two
                tiles[f"wk{wk}_rt{other}"] = replace(t, rt=other, ring=3, min_blocks=32 // wk if other == 2 else 0)
        us = best_of(case.cuda_us, tiles)
        rows.append({"K": k, "N": n, "M": m, "bf16_us": case.bf16_us, "us": us,
                     "tiles": {key: str(t) for key, t in tiles.items()}})
        fastest = min(us, key=us.get)
        print(f"K={k} N={n} M={m}: bf16 {case.bf16_us:.1f} us, chosen (wk={base.wk}) {us['chosen']:.1f}; "
              + ", ".join(f"{key} {v:.1f}" for key, v in us.items() if key != "chosen")
              + f"; fastest {fastest} x{us['chosen'] / us[fastest]:.2f}", flush=True)
        del case
    for k, ns in GROUPS:
        case = GroupCase.make("sharq", k, ns, 1)
        base = cuda_gemm.group_tile(1, ns, k, case.sx.device)
        capped = best_of(functools.partial(case.us, case.group),
                         {cap: replace(base, min_blocks=cap) for cap in (0, 3, 4, 6, 7, 8)})
        rows.append({"K": k, "N": list(ns), "M": 1, "group_min_blocks_us": capped})
        print(f"group K={k} N={'+'.join(map(str, ns))} M=1: "
              + ", ".join(f"cap {c} {v:.1f}" for c, v in capped.items()), flush=True)
        del case
    return rows


def programmatic(ms: tuple[int, ...] = (1, 4, 8, 12, 16, 32, 64)) -> list[dict]:
    """Where a CUDA GEMM should start early (cuda_gemm._programmatic): the layer (prepare + GEMM, or the group
    launch for q/k/v and gate/up) in a CUDA graph with plain launches, with the rule's choice, and programmatic
    everywhere, on the 8B and 70B shapes (sharq weights); GPU µs over weight copies."""
    prepare = get_backend("packed").prepare
    rule = cuda_gemm._programmatic
    modes = {"plain": (rule, False), "rule": (rule, True),
             "always": (lambda d, *_: cuda_gemm._capability(d) >= (9, 0), True)}

    def use(decide, allowed: bool) -> None:  # the launches are worked out again under the mode
        cuda_gemm._programmatic, launch.PROGRAMMATIC_LAUNCH = decide, allowed
        cuda_gemm._launch.cache_clear()
        cuda_gemm._group_launch.cache_clear()

    def timed(fns: list) -> dict:
        """Each mode's GPU µs, after two timings thrown away: on the largest shapes the first two after a set-up
        read up to 12 % slow (H200), whichever mode they time."""
        graph_ms(fns, reps=30)
        graph_ms(fns, reps=30)
        out = {}
        try:
            for mode, (decide, allowed) in modes.items():
                use(decide, allowed)
                out[f"{mode}_us"] = 1e3 * graph_ms(fns, reps=30)
        finally:
            use(rule, True)
        return out

    rows = []
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        p, sw, r = payload("sharq", n, k)
        layer = packed_layer(outlier_x(m, k), r, sw)
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(p.codes.numel() + p.scales.numel()))]
        rows.append({"K": k, "N": n, "M": m, "programmatic": rule(0, m, n, k),
                     **timed([lambda c=c, s=s: layer(c, s) for c, s in ps])})
        del ps
    r = sharq.get_recipe("sharq")
    for (k, ns), m in itertools.product(GROUPS, ms):
        x = outlier_x(m, k)
        case = GroupCase.make("sharq", k, ns, m, x)
        if case.group(case.sets[0]) is None:
            continue

        def group(ws, case=case, x=x):
            a = prepare(x, r, None)
            return cuda_gemm.nvfp4_mma_group(a.values, ws, [None] * len(ws), case.block, a.scale.reshape(-1).float(),
                                             torch.bfloat16)
        rows.append({"K": k, "N": list(ns), "M": m, "programmatic": rule(0, m, sum(ns), k),
                     **timed([lambda ws=ws: group(ws) for ws in case.sets])})
        del case
    for row in rows:
        print(f"K={row['K']} N={row['N']} M={row['M']} (rule: {'early' if row['programmatic'] else 'plain'}): "
              + ", ".join(f"{mode} {row[mode + '_us']:.2f}" for mode in modes), flush=True)
    return rows


def fold_sweep(ms: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """The decode kernel's launches that prepare their activation themselves (kernels/cuda_activation.py: one
    launch a layer) against the prepare kernel's launch + the GEMM's, as a model's plans make them (the backend
    "auto" gives, sharq weights): each 8B and 70B layer alone and each q/k/v and gate/up group, GPU µs over weight
    copies in one graph, beside BF16 cuBLAS; the folded outputs checked against the unfolded ones bit for bit.
    The plans fold inside the graphs too (packed.FOLD_IN_GRAPHS, on while they are made)."""
    in_graphs, packed.FOLD_IN_GRAPHS = packed.FOLD_IN_GRAPHS, True
    try:
        return _fold_rows(ms)
    finally:
        packed.FOLD_IN_GRAPHS = in_graphs


def _fold_rows(ms: tuple[int, ...]) -> list[dict]:
    r, rows = sharq.get_recipe("sharq"), []

    def row(what: dict, fold, plain, bf16: float) -> dict:
        equal = all(torch.equal(a, b) for a, b in zip(fold[0](), plain[0]()))
        out = {**what, "bf16_us": bf16, "unfolded_us": 1e3 * graph_ms(plain), "folded_us": 1e3 * graph_ms(fold),
               "equal": equal}
        print(f"K={out['K']} N={out['N']} M={out['M']}: bf16 {bf16:.2f} us, prepare + GEMM {out['unfolded_us']:.2f},"
              f" folded {out['folded_us']:.2f} (equal: {equal}); folded x unfolded "
              f"{out['unfolded_us'] / out['folded_us']:.2f}, x bf16 {bf16 / out['folded_us']:.2f}", flush=True)
        return out

    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        if m * k > cuda_activation.FOLD_ELEMENTS:
            continue
        p, sw, _ = payload("sharq", n, k)
        x = outlier_x(m, k)
        _, plans = layer_plans(p, sw, r, m, copies(p.codes.numel() + p.scales.numel()))
        if plans is None or plans[0].forward is None:
            continue
        rows.append(row({"K": k, "N": n, "M": m}, [lambda p=p: [p.forward(x)] for p in plans],
                        [lambda p=p: [p.matmul(p.prepare(x))] for p in plans], bf16_layers_us((n,), k, x)))
        del plans
    for (k, ns), m in itertools.product(GROUPS, ms):
        if m * k > cuda_activation.FOLD_ELEMENTS:
            continue
        x = outlier_x(m, k)
        layers = [payload("sharq", n, k, seed=i + 1)[:2] for i, n in enumerate(ns)]
        name = resolve_backend("auto", r, "cuda", (ns[0], k), torch.bfloat16)
        b, plans = get_backend(name), []
        for _ in range(copies(sum(q.codes.numel() + q.scales.numel() for q, _ in layers))):
            qs = [(replace(q, codes=q.codes.clone(), scales=q.scales.clone()), sw) for q, sw in layers]
            layouts = [b.to_layout(q, sw, None) if b.to_layout is not None else None for q, sw in qs]
            plan = packed.group_plan([QWeight(None, sw, q) for q, sw in qs], [None] * len(ns), r, (m,),
                                     torch.bfloat16, layouts, x_dtype=torch.bfloat16)
            if plan is None or plan.forward is None:
                break
            plans.append((plan, (qs, layouts)))
        if len(plans) < 2:
            continue
        prepare = packed._prepare_launcher(r, m, k, torch.bfloat16, x.device, None)
        rows.append(row({"K": k, "N": list(ns), "M": m}, [lambda p=p: p.forward(x) for p, _ in plans],
                        [lambda p=p: p.matmul(prepare(x)) for p, _ in plans], bf16_layers_us(ns, k, x)))
        del plans
    return rows


def kernel_resources(t, m: int, block: int = 32) -> tuple[int, int]:
    """Registers and local-memory bytes per thread of the CUDA kernel launched with tile t at M = m (bf16 out, no
    bias, `block`-element blocks): local memory above 0 means spills."""
    import ctypes

    k = cuda_gemm._kernel(torch.cuda.current_device(), t, cuda_gemm.n8_tiles(m), block, 0, 0, False)
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    out = []
    for attribute in (4, 3):  # CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        v = ctypes.c_int()
        libcuda.cuFuncGetAttribute(ctypes.byref(v), attribute, k.func)
        out.append(v.value)
    return out[0], out[1]


def ring_variants(n: int, auto: cuda_gemm.CudaTile) -> list[cuda_gemm.CudaTile]:
    """choose_tile's launch, then the ring launches around it: 3, 4, 6 or 8 chunks a warp, one or two row tiles,
    with and without a register cap for 32 warps a multiprocessor (8 chunks only capped); another warp count only
    uncapped at 3 and 4 chunks (it changes the K partition, so it would have to hold at every M)."""
    tiles = [auto]
    for wk, rt, ring, cap in itertools.product((4, 8), (1, 2), (3, 4, 6, 8), (False, True)):
        if n % (16 * rt) or ring == 8 and not cap or wk != auto.wk and (ring > 4 or cap):
            continue
        tiles.append(cuda_gemm.CudaTile(rt, wk, 1, auto.splits, ring, direct=True, min_blocks=32 // wk if cap else 0))
    return list(dict.fromkeys(tiles))


def blocks_per_multiprocessor(t: cuda_gemm.CudaTile, registers: int, shared: int) -> int:
    """Blocks a Hopper multiprocessor holds at once, estimated: 64K registers (allocated by 8 a thread), 228 KB of
    shared memory (1 KB of it reserved a block, plus the kernel's 1 KB scale table), 64 warps, 32 blocks."""
    return min(65536 // (-(-registers // 8) * 8 * t.threads), 233472 // (shared + 2048), 64 // (t.threads // 32), 32)


def ring_sweep(ms: tuple[int, ...] = (1, 4, 8)) -> list[dict]:
    """The decode kernel's ring launches at a few tokens on the 8B and 70B shapes (ring_variants; sharq weights,
    bf16 out): GPU µs (best of two rounds, `best_of`), GB/s of the payload, registers and local memory, blocks a
    multiprocessor and waves. How choose_tile's ring launches up to 8 tokens were chosen."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        case = CudaCase.make("sharq", k, n, m)
        auto = cuda_gemm.choose_tile(m, n, k, case.act.values.device)
        nbytes = case.p.codes.numel() + case.p.scales.numel()
        timed = []
        variants = ring_variants(n, auto)
        for t, us in zip(variants, best_of(case.cuda_us, dict(enumerate(variants))).values()):
            registers, local = kernel_resources(t, m, case.r.weight_block)
            per_sm = blocks_per_multiprocessor(t, registers, cuda_gemm._shared_bytes(t, cuda_gemm.n8_tiles(m),
                                                                                      case.r.weight_block))
            timed.append({"tile": str(t), "us": us, "GBps": nbytes / us / 1e3, "registers": registers,
                          "local_bytes": local, "blocks_per_sm": per_sm,
                          "waves": n // t.rows * t.splits / (per_sm * sms), "chosen": t == auto})
        timed.sort(key=lambda r: r["us"])
        chosen = next(r for r in timed if r["chosen"])
        print(f"K={k} N={n} M={m}: bf16 {case.bf16_us:.1f} us; chosen {chosen['us']:.1f} us", flush=True)
        for r in timed[:6]:
            print(f"   {r['us']:6.1f} us {r['GBps']:5.0f} GB/s x{case.bf16_us / r['us']:.2f} {r['registers']:3d} "
                  f"registers, {r['local_bytes']} B local, {r['blocks_per_sm']}/SM, {r['waves']:.2f} waves "
                  f"{r['tile'].replace('CudaTile', '')}", flush=True)
        rows.append({"K": k, "N": n, "M": m, "bf16_us": case.bf16_us, "variants": timed})
        del case
        torch.cuda.empty_cache()
    return rows


def bulk_sweep(ms: tuple[int, ...] = (33, 64, 128, 256, 512, 1024, 2048)) -> list[dict]:
    """The wgmma kernel with its activation tiled (cuda_wgmma.tiled_activation: each chunk one contiguous image of
    its shared buffer, filled by one bulk copy from one producer thread) against its launch today (producer warps
    loading and permuting the activation), on the 8B and 70B shapes at the M it takes (above WIDE_MAX_M, token
    tiles of WIDE_TOKENS as if it took them, against decode + cuBLAS): the same tile and K split, more buffers
    (slots), fewer chunks in flight (stages), one consumer warpgroup a block (with its own K split, and up to 64
    tokens with today's), and the launch cuda_wgmma.bulk_tile routes ("routed"); GPU µs, best of two rounds; every
    launch with today's K split checked bit for bit against today's (the producer warps' launch, which a plain
    activation runs), those with the one-warpgroup split against the bulk one-warpgroup launch. The GEMM alone (the
    tiling made outside the timing), then the layer: the prepare writing plain values +
    today's launch against the prepare writing the tiled ones + a bulk launch (2 chunks in flight; one consumer
    warpgroup with today's split and with its own; the routed one). Up to 64 tokens also the decode kernel (its own
    sums), and on the shapes it takes there (`--ms 17,24,32,48,64`) the wgmma launches as if choose_tile had picked
    the kernel; and today's launch with the one-warpgroup launch's own split (wg1_own_split: what a plain activation
    would run if that split were routed; checked against the bulk one-warpgroup launch bit for bit)."""
    from sharq.kernels import prepare as kp

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for (k, n), m in itertools.product(SHAPES + SHAPES_70B, ms):
        chosen = cuda_wgmma.choose_tile(m, n, k, (9, 0), sms)
        if chosen is None and m > cuda_wgmma.WIDE_MAX_M and n % 128 == 0:
            chosen = cuda_wgmma.with_splits(cuda_wgmma.WgmmaTile(tokens=cuda_wgmma.WIDE_TOKENS), m, n, k, sms)
        if chosen is None and m <= cuda_wgmma.TOKENS and n % 128 == 0:  # the decode kernel's: as if wgmma took it
            chosen = cuda_wgmma.with_splits(cuda_wgmma.WgmmaTile(), m, n, k, sms)
        if chosen is None:
            continue
        case = CudaCase.make("sharq", k, n, m)
        tiled = cuda_wgmma.tiled_activation(case.act.values, chosen.tokens, placed=False)
        bulk = replace(chosen, bulk=True, producers=1)
        tiles = {"today": (chosen, None), "bulk": (bulk, tiled), "bulk_slots6": (replace(bulk, slots=6), tiled),
                 "bulk_stages2": (replace(bulk, stages=2), tiled)}
        if chosen.tokens > 64:  # a chunk of 128 tokens is 32 KB: at most 6 buffers
            tiles["bulk_slots3"] = (replace(bulk, slots=3), tiled)
        # blocks of 64 rows, two a multiprocessor (3 buffers of 128 tokens), their K split as choose_tile's
        one = replace(bulk, warpgroups=1, slots=3 if chosen.tokens > 64 else bulk.slots)
        tiles["bulk_wg1"] = (cuda_wgmma.with_splits(one, m, n, k, sms), tiled)
        if m <= cuda_wgmma.TOKENS:  # the same launch with the producer warps: what a plain activation would run
            tiles["wg1"] = (replace(tiles["bulk_wg1"][0], bulk=False, producers=chosen.producers), None)
            # one consumer warpgroup with today's K split: today's sums (the split decides them, not the rows a block)
            tiles["bulk_wg1_split"] = (replace(one, splits=chosen.splits), tiled)
            tiles["bulk_wg1_split_stages2"] = (replace(one, splits=chosen.splits, stages=2), tiled)
            tiles["bulk_wg1_split_slots6"] = (replace(one, splits=chosen.splits, slots=6), tiled)
            # today's launch with the one-warpgroup launch's own split: what a plain activation would run if that
            # split were routed (the same sums as wg1's)
            tiles["wg1_own_split"] = (replace(chosen, splits=tiles["bulk_wg1"][0].splits), None)
        routed = cuda_wgmma.bulk_tile(chosen, n, k, sms)
        if routed is not None:  # what the packed backend runs (cuda_gemm.bulk_launcher)
            tiles["routed"] = (routed, tiled)
        decode_tile = cuda_gemm.choose_tile(m, n, k, case.act.values.device) if m <= cuda_gemm.MAX_M else None
        if decode_tile is not None:  # the decode kernel (other sums): what these sizes run where wgmma does not
            tiles["decode_kernel"] = (decode_tile, None)
        want = case.output(chosen)
        exact = {key: torch.equal(case.output(t, a=a)[:m], want) for key, (t, a) in tiles.items()  # today's sums
                 if key not in ("today", "decode_kernel") and t.splits == chosen.splits}
        if "wg1" in tiles:  # its own K split: against the bulk launch of the same tile, and two warpgroups with it
            own = case.output(tiles["bulk_wg1"][0], a=tiled)[:m]
            exact["wg1_as_bulk_wg1"] = torch.equal(case.output(tiles["wg1"][0]), own)
            exact["wg1_own_split_as_bulk_wg1"] = torch.equal(case.output(tiles["wg1_own_split"][0]), own)
        us = best_of(lambda ta, case=case: case.cuda_us(*ta), tiles)  # case bound: the loop deletes it below
        if m > cuda_wgmma.TOKENS:
            a, block = case.act.values, case.r.weight_block
            us["decoded"] = 1e3 * graph_ms([lambda c=c, s=s, case=case: gemm.decoded_matmul(
                a, c, s, "nvfp4", block, case.sx, case.swf, None, torch.bfloat16) for c, s in case.ps], reps=10)
        x, dev = outlier_x(m, k), case.act.values.device
        prepares = {False: kp.dequantized_launcher(case.r, m, k, x.dtype, dev),
                    True: kp.dequantized_launcher(case.r, m, k, x.dtype, dev, tiled=(chosen.tokens, False))}

        def layer_us(tile_tiled, case=case, x=x, prepares=prepares) -> float:
            tile, tiled_values = tile_tiled

            def one(c, s):
                values, scale, _ = prepares[tiled_values](x)
                cuda_gemm.nvfp4_mma(values, c, s, case.r.weight_block, scale.reshape(-1), case.swf, None,
                                    torch.bfloat16, tile=tile)
            return 1e3 * graph_ms([lambda c=c, s=s: one(c, s) for c, s in case.ps], reps=10)

        layered = {"today": (chosen, False), "bulk_stages2": (replace(bulk, stages=2), True)}
        if m <= cuda_wgmma.TOKENS:  # one consumer warpgroup with today's K split, and with its own (other sums)
            layered["bulk_wg1_split"] = (tiles["bulk_wg1_split"][0], True)
            layered["bulk_wg1"] = (tiles["bulk_wg1"][0], True)
            layered["wg1_own_split"] = (tiles["wg1_own_split"][0], False)
        if routed is not None:
            layered["routed"] = (routed, True)
        if decode_tile is not None:
            layered["decode_kernel"] = (decode_tile, False)
        layer = best_of(layer_us, layered)
        rows.append({"K": k, "N": n, "M": m, "bf16_us": case.bf16_us, "us": us, "exact": exact,
                     "layer_us": layer, "tiles": {key: str(t) for key, (t, _) in tiles.items()}})
        best_bulk = min(v for key, v in us.items() if key.startswith("bulk"))
        print(f"K={k} N={n} M={m}: bf16 {case.bf16_us:.1f} us, " + ", ".join(f"{key} {v:.1f}" for key, v in us.items())
              + f"; bulk x{us['today'] / best_bulk:.2f}; layer "
              + ", ".join(f"{key} {v:.1f}" for key, v in layer.items()) + "; exact "
              + ",".join(key for key, ok in exact.items() if ok)
              + (" MISMATCH" if not all(exact.values()) else ""), flush=True)
        del case, tiled
        torch.cuda.empty_cache()
    return rows


# the options that time one thing at token counts of their own and exit: (default token counts, function, the key of
# its rows in the results file, what the option times)
ONLY = {"wgmma": ((16, 17, 24, 32, 33, 48, 64), wgmma_vs_decode, "wgmma_vs_decode",
                  "the wgmma kernel against the decode kernel where it takes over (8B and 70B shapes)"),
        "wgmma_sweep": ((25, 32, 33, 48, 64), wgmma_sweep, "wgmma_sweep", "the wgmma kernel's launch options where it "
                        "takes over (how cuda_wgmma.choose_tile's defaults were chosen)"),
        "wide": ((96, 128, 192, 256, 384), wide_sweep, "wide_sweep", "the wgmma kernel's token tiles above 64 "
                 "tokens against decode + cuBLAS (how cuda_wgmma.WIDE_TOKENS and WIDE_MAX_M were chosen)"),
        "staged": ((64, 128, 256, 512, 2048, 4096), functools.partial(wide_sweep, staged=True), "staged_sweep",
                   "the staged wgmma kernel (the weight decoded into shared memory) against the token tiles and "
                   "decode + cuBLAS, 64-4096 tokens"),
        "groups": ((1, 4, 8, 16, 24, 32, 48, 64), groups, "groups", "layers that read one activation (q/k/v, "
                   "gate/up) launched one by one against one group launch (8B and 70B)"),
        "k_partition": ((1, 4, 8, 16, 24, 32), k_partition_sweep, "k_partition", "the decode kernel's K split over "
                        "warps (with its ring and row-tile options) and the group launch's register cap"),
        "programmatic": ((1, 4, 8, 12, 16, 32, 64), programmatic, "programmatic", "the layers with plain launches, "
                         "the programmatic-launch rule's choice and programmatic everywhere (8B and 70B)"),
        "decode": ((), scratch_decode, "scratch_decode", "the decode into the scratch weight, the CUDA kernel against "
                   "the Triton one (8B and 70B)"),
        "placed": ((1, 16, 64, 128, 256, 2048), placed_sweep, "placed_sweep", "the CUDA kernels on codes in the "
                   "placed layout (kernels/placed.py) against canonical codes (8B)"),
        "bulk": ((33, 64, 128, 256, 512, 1024, 2048), bulk_sweep, "bulk_sweep", "the wgmma kernel fed by bulk "
                 "copies of a tiled activation against its producer warps (8B and 70B)"),
        "ring": ((1, 4, 8), ring_sweep, "ring_sweep", "the decode kernel's ring launches up to 8 tokens: depth, row "
                 "tiles, warps, register cap (8B and 70B)"),
        "fold": ((1, 2, 4, 8), fold_sweep, "fold_sweep", "the decode kernel's launches that prepare their activation "
                 "themselves against prepare + GEMM (8B and 70B layers and groups)")}


def save(out: dict | list, path: str | None) -> None:
    """The results as JSON at `path` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,64,256,2048,8192")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--recipes", default="nvfp4,sharq", help="packed variants timed (nvfp4 and sharq always)")
    p.add_argument("--sweep-only", action="store_true", help="with --sweep: stop after the sweep")
    p.add_argument("--crossover", action="store_true", help="only the MMA kernel against decode + cuBLAS at "
                   "M = 16..64 (where gemm.SMALL_M belongs; then exit)")
    p.add_argument("--cuda-sweep", action="store_true", help="only the CUDA kernel's launch shapes at M <= 64 "
                   "(how cuda_gemm.choose_tile was chosen; then exit)")
    for mode, (*_, what) in ONLY.items():
        p.add_argument("--" + mode.replace("_", "-"), action="store_true", help=f"only {what} (then exit)")
    p.add_argument("--wide-options", action="store_true", help="with --wide: the token tiles' other launch options")
    p.add_argument("--sweep-recipes", default="sharq", help="with --cuda-sweep: the weights timed (NVFP4 recipes: "
                   "sharq has 32-element blocks, sharq-plus and nvfp4 16)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    only = next((mode for mode in ONLY if getattr(args, mode)), None)
    if only is not None:
        default, run, key, _ = ONLY[only]
        ms = default if args.ms == p.get_default("ms") else tuple(map(int, args.ms.split(",")))
        options = {"wider": True} if only == "wide" and args.wide_options else {}
        save({"device": torch.cuda.get_device_name(), "torch": torch.__version__, key: run(ms, **options)}, args.json)
        return 0
    if args.crossover or args.cuda_sweep:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "small_m": gemm.SMALL_M,
               "ceilings": ceilings()}
        out.update({"crossover": crossover()} if args.crossover else
                   {"cuda_sweep": cuda_sweep(tuple(int(m) for m in args.ms.split(",")),
                                             tuple(args.sweep_recipes.split(",")))})
        save(out, args.json)
        return 0
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    checked = ((1, 4096, 4096), (1, 14336, 1000), (16, 14336, 1024), (7, 4160, 336), (2048, 4096, 4096))
    out["checks"] = {f"{recipe} M={m} K={k} N={n}": check(m, k, n, recipe)
                     for recipe in ("sharq", "nvfp4", "mxfp4") for m, k, n in checked}
    out["codes_exact"] = check_codes()
    print("checks (error / fp32-accumulation bound, pass <= 1):",
          json.dumps({key: round(v, 3) for key, v in out["checks"].items()}), "codes exact:", out["codes_exact"])
    out["ceilings"] = caps = ceilings()
    print(f"ceilings: copy {caps['copy_GBps']:.0f} GB/s, within L2 {caps['l2_copy_GBps']:.0f} GB/s, bf16 GEMM "
          f"{caps['bf16_TFLOPs']:.0f} TFLOP/s")
    if args.sweep:
        out["sweep"] = sweep()
        if args.sweep_only:
            save(out, args.json)
            return 0
    recipes = tuple(dict.fromkeys(["nvfp4", "sharq", *args.recipes.split(",")]))
    out["rows"] = [time_shape(k, n, m, caps, recipes) for (k, n) in SHAPES for m in map(int, args.ms.split(","))]
    save(out, args.json)
    print(render(out))
    ok = out["codes_exact"] and all(v <= 1 for v in out["checks"].values())
    return 0 if ok else 1


def render(out: dict) -> str:
    f = lambda v, fmt=".4f": "" if v is None else format(v, fmt)  # noqa: E731
    headers = ["K", "N", "M", "sharq route", "bf16 ms", "fp8 ms", "nvfp4 GEMM ms", "sharq GEMM ms", "sharq layer ms",
               "plain launch", "GEMM × bf16", "layer × bf16", "general layer × bf16", "GB/s (of copy)",
               "TFLOP/s (of bf16)"]
    rows = []
    for r in out["rows"]:
        bw = f"{r['sharq_gemm_GBps']:.0f} ({r['sharq_gemm_of_copy']:.2f})" if "sharq_gemm_GBps" in r else ""
        fl = f"{r['sharq_layer_TFLOPs']:.0f} ({r['sharq_layer_TFLOPs'] / r['bf16_TFLOPs']:.2f})" \
            if "sharq_layer_TFLOPs" in r else ""
        rows.append([str(r["K"]), str(r["N"]), str(r["M"]), f"{r['route']} ({r['sharq_backend']})", f(r["bf16_ms"]),
                     f(r.get("fp8_ms")), f(r.get("nvfp4_gemm_ms")), f(r.get("sharq_gemm_ms")), f(r["sharq_layer_ms"]),
                     f(r.get("sharq_layer_plain_launch_ms")), f(r.get("sharq_gemm_x_bf16"), ".2f"),
                     f(r["sharq_layer_x_bf16"], ".2f"), f(r["sharq_general_layer_x_bf16"], ".2f"), bw, fl])
    extra = sorted({key[: -len("_layer_ms")] for r in out["rows"] for key in r
                    if key.endswith("_layer_ms") and not key.endswith("_general_layer_ms")} - {"nvfp4", "sharq"})
    for name in extra:  # further recipes, and humming's
        headers += [f"{name} GEMM × bf16", f"{name} layer × bf16"]
        for row, r in zip(rows, out["rows"]):
            row += [f(r.get(f"{name}_gemm_x_bf16"), ".2f"), f(r.get(f"{name}_layer_x_bf16"), ".2f")]
    caps = out["ceilings"]
    return (f"{out['device']}, torch {out['torch']}; copy {caps['copy_GBps']:.0f} GB/s, BF16 "
            f"{caps['bf16_TFLOPs']:.0f} TFLOP/s; CUDA-graph ms per call, weights streamed from memory; GEMM and "
            f"layer: the eager plan of a layer that reads its input alone (eager, graph and compiled calls), "
            f"general: prepare + packed_matmul (strict and gradient calls)\n" + format_table(headers, rows))


if __name__ == "__main__":
    sys.exit(main())
