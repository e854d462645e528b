"""Where a sharq layer's time goes above the wgmma kernel's tokens (scratch decode + cuBLAS): graph-replayed parts."""
import sys
import torch
import torch.nn.functional as F
from bench_gemm import SHAPES, copies, graph_ms, layer_plans, outlier_x, payload
from sharq.kernels import gemm
from sharq.kernels.epilogue import scale_and_bias_launcher

torch.backends.cuda.matmul.allow_tf32 = False
ms = tuple(map(int, sys.argv[1].split(","))) if len(sys.argv) > 1 else (512, 2048, 8192)
print(torch.cuda.get_device_name())
print("| K | N | M | bf16 | layer | prepare | decode | mm bf16 | mm fp32 out | epilogue | parts sum | layer x bf16 | mm/bf16 |")
for k, n in SHAPES:
    for m in ms:
        x = outlier_x(m, k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        ws = [w.clone() for _ in range(copies(w.numel() * 2))]
        bf16 = graph_ms([lambda w=w: F.linear(x, w) for w in ws])
        del ws
        p, sw, r = payload("sharq", n, k)
        nb = p.codes.numel() + p.scales.numel()
        name, plans = layer_plans(p, sw, r, m, copies(nb))
        layer = graph_ms([lambda pl=pl: pl.matmul(pl.prepare(x)) for pl in plans])
        prep = graph_ms([lambda: plans[0].prepare(x)])
        act = plans[0].prepare(x)
        scratch, wt = gemm._scratch_weight(n, k, x.device)
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(nb))]
        decs = [gemm._dequantizer(c, s, p.fmt, p.block_size, k, bound=True) for c, s in ps]
        dec = graph_ms([lambda d=d: d(scratch) for d in decs])
        mm = graph_ms([lambda: torch.mm(act.values, wt)])
        mm32 = graph_ms([lambda: torch.mm(act.values, wt, out_dtype=torch.float32)])
        y = torch.mm(act.values, wt)
        epi = scale_and_bias_launcher(m, n, sw, None, False)
        ep = graph_ms([lambda: epi(y, act.scale)])
        parts = prep + dec + mm + ep
        print(f"| {k} | {n} | {m} | {bf16*1e3:.1f} | {layer*1e3:.1f} | {prep*1e3:.1f} | {dec*1e3:.1f} | {mm*1e3:.1f} | "
              f"{mm32*1e3:.1f} | {ep*1e3:.1f} | {parts*1e3:.1f} | {bf16/layer:.2f} | {bf16/mm:.2f} | {name}", flush=True)
        del plans, ps, decs
        torch.cuda.empty_cache()
