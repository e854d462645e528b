"""Why prefill keeps decode + cuBLAS: a Triton GEMM that decodes the NVFP4 payload in its main loop, against
decode into a bf16 scratch weight + cuBLAS (gemm.decoded_matmul, what the packed backend runs above SMALL_M) and
BF16 cuBLAS, on three 8B shapes at 128-2048 tokens (sharq weights, W32). Three variants of one kernel, each at the
best of a few launch shapes:

- "decode in loop": each K step loads its codes and scales, places the nibbles into bf16 bits and multiplies them
  by the block scale · 2^118 in one bf16x2 FMA (exact: kernels/cuda_gemm.py decodes the same way), then tl.dot;
- "prefetched": the same, the next step's codes and scales loaded before this step's decode (Triton's pipeliner
  stages only the loads that feed tl.dot directly);
- "bf16 weight": the same loop reading a bf16 weight (no decode): what Triton's own pipeline reaches here.

Outputs of the decoding variants are checked against decoded_matmul (1 % of the largest output; the kernels skip
α and the bias, which would cost the same in all). GPU time over weight copies in one CUDA graph
(bench_gemm.py's timing). Needs a CUDA GPU with bf16 MMA (sm_80+):

    python benchmarks/fused_prefill_variants.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench_gemm import copies, graph_ms, payload, save  # benchmarks/, beside this script
from timing import outlier_x
from sharq.backends import get_backend
from sharq.kernels import gemm
from sharq.kernels.gemm import _E2M1_FP16_ASM, _scale_value

# the nibbles of a byte quad placed into bf16 bits (value · 2^-126): gemm's fp16 placement, shifted for bf16
_E2M1_BF16_LOW = tl.constexpr(_E2M1_FP16_ASM.format(m=6, s=12).replace("0x0E000E00", "0x01C001C0"))
_E2M1_BF16_HIGH = tl.constexpr(_E2M1_FP16_ASM.format(m=2, s=8).replace("0x0E000E00", "0x01C001C0"))
_MUL_BF16X2 = tl.constexpr("{ .reg .b32 z; mov.b32 z, 0x80008000; fma.rn.bf16x2 $0, $1, $2, z; }")
VARIANTS = {0: "decode in loop", 1: "prefetched", 2: "bf16 weight"}
TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3)]
SHAPES = ((4096, 6144), (4096, 28672), (14336, 4096))


@triton.jit
def _decode(c, s, BN: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
    """Ŵ · 2^-8 [BN, BK] in bf16 from codes [BN, BK/2] and UE4M3 scale codes [BN, BK/BLOCK]."""
    g = (_scale_value(s.to(tl.int32), 0) * 3.3230699894622897e35).to(tl.bfloat16)  # 2^118
    lo = tl.inline_asm_elementwise(_E2M1_BF16_LOW, "=r,=r,r", [c], dtype=tl.bfloat16, is_pure=True, pack=4)
    hi = tl.inline_asm_elementwise(_E2M1_BF16_HIGH, "=r,=r,r", [c], dtype=tl.bfloat16, is_pure=True, pack=4)
    w = tl.reshape(tl.join(lo, hi), (BN, BK // BLOCK, BLOCK))  # element 2i is the low nibble
    w = tl.inline_asm_elementwise(_MUL_BF16X2, "=r,r,r", [w, tl.broadcast_to(g[:, :, None], (BN, BK // BLOCK, BLOCK))],
                                  dtype=tl.bfloat16, is_pure=True, pack=2)
    return tl.reshape(w, (BN, BK))


@triton.jit
def _variant_kernel(a_ptr, codes_ptr, scales_ptr, w_ptr, y_ptr, M, N, K, BLOCK: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, VARIANT: tl.constexpr,
                    STAGES: tl.constexpr):
    """y = A · Ŵᵀ (bf16) for K a multiple of BK; GROUP_M token tiles per weight tile in turn."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rows = rn[:, None].to(tl.int64)
    m_ok, n_ok = (rm < M)[:, None], (rn < N)[:, None]
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + tl.arange(0, BK)[None, :]
    c_ptrs = codes_ptr + rows * (K // 2) + tl.arange(0, BK // 2)[None, :]
    s_ptrs = scales_ptr + rows * (K // BLOCK) + tl.arange(0, BK // BLOCK)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if VARIANT == 1:
        c = tl.load(c_ptrs, mask=n_ok, other=0)
        s = tl.load(s_ptrs, mask=n_ok, other=0)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            a = tl.load(a_ptrs + k0, mask=m_ok, other=0.0)
            more = k0 + BK < K
            c_next = tl.load(c_ptrs + (k0 + BK) // 2, mask=n_ok & more, other=0)
            s_next = tl.load(s_ptrs + (k0 + BK) // BLOCK, mask=n_ok & more, other=0)
            acc = tl.dot(a, tl.trans(_decode(c, s, BN, BK, BLOCK)), acc)
            c, s = c_next, s_next
    else:
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            a = tl.load(a_ptrs + k0, mask=m_ok, other=0.0)
            if VARIANT == 0:
                c = tl.load(c_ptrs + k0 // 2, mask=n_ok, other=0)
                s = tl.load(s_ptrs + k0 // BLOCK, mask=n_ok, other=0)
                w = _decode(c, s, BN, BK, BLOCK)
            else:
                w = tl.load(w_ptr + rows * K + k0 + tl.arange(0, BK)[None, :], mask=n_ok, other=0.0)
            acc = tl.dot(a, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], (acc * 256.0).to(tl.bfloat16), mask=m_ok & (rn < N)[None, :])


def time_variant(variant: int, tile: tuple, act: torch.Tensor, weights: list, y: torch.Tensor, block: int,
                 want: torch.Tensor | None) -> float | None:
    """µs per call of one variant at one launch shape over the weight copies ((codes, scales) or a bf16 weight);
    None where the output is wrong."""
    (m, k), n = act.shape, y.shape[1]
    bm, bn, bk, warps, stages = tile
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)

    def run(w):
        codes, scales, wb = (w[0], w[1], w[0]) if variant != 2 else (y, y, w)
        _variant_kernel[grid](act, codes, scales, wb, y, m, n, k, BLOCK=block, BM=bm, BN=bn, BK=bk, GROUP_M=8, VARIANT=variant, STAGES=stages,
                              num_warps=warps)

    run(weights[0])
    if want is not None and (y.float() - want).abs().max().item() > 1e-2 * want.abs().max().item():
        return None
    return 1e3 * graph_ms([lambda w=w: run(w) for w in weights], reps=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="128,512,2048")
    ap.add_argument("--json")
    args = ap.parse_args()
    prepare = get_backend("packed").prepare
    rows = []
    print(f"{'K':>5} {'N':>5} {'M':>5} {'BF16 µs':>8} {'decode+cuBLAS':>14} | " + " | ".join(VARIANTS.values()))
    for (k, n), m in itertools.product(SHAPES, [int(v) for v in args.ms.split(",")]):
        x = outlier_x(m, k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        bf16_weights = [w.clone() for _ in range(copies(w.numel() * 2))]
        bf16_us = 1e3 * graph_ms([lambda w=w: F.linear(x, w) for w in bf16_weights])
        p, sw, r = payload("sharq", n, k)
        act = prepare(x, r, None).values
        one = torch.ones(1, device="cuda")
        packed = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(p.codes.numel() + p.scales.numel()))]
        decoded_us = 1e3 * graph_ms([lambda c=c, s=s: gemm.decoded_matmul(act, c, s, "nvfp4", r.weight_block, one,
                                                                            one, None, torch.bfloat16)
                                     for c, s in packed], reps=10)
        want = gemm.decoded_matmul(act, p.codes, p.scales, "nvfp4", r.weight_block, one, one, None,
                                   torch.bfloat16).float()
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        row = {"K": k, "N": n, "M": m, "bf16_us": bf16_us, "decoded_us": decoded_us}
        for variant, name in VARIANTS.items():
            times = {}
            for tile in TILES:
                us = time_variant(variant, tile, act, bf16_weights if variant == 2 else packed, y, r.weight_block,
                                  None if variant == 2 else want)
                if us is not None:
                    times[tile] = us
            best = min(times, key=times.get) if times else None
            row[name] = {"us": times.get(best), "tile": best}
        rows.append(row)
        print(f"{k:>5} {n:>5} {m:>5} {bf16_us:8.1f} {decoded_us:7.1f} ({bf16_us / decoded_us:.2f}x) | " + " | ".join(
            f"{row[v]['us']:7.1f} ({bf16_us / row[v]['us']:.2f}x) {row[v]['tile']}" if row[v]["us"] else "-"
            for v in VARIANTS.values()), flush=True)
        del bf16_weights, packed
        torch.cuda.empty_cache()
    save({"fused_prefill_variants": rows}, args.json)


if __name__ == "__main__":
    main()
