"""The scratch decode: the previous CUDA kernel (scratch/old_dequantize.py) against this tree's, and the Triton one,
graph-replayed over weight copies; bits compared."""
import torch
import old_dequantize
from bench_gemm import SHAPES, SHAPES_70B, copies, graph_ms, payload, ceilings
from sharq.kernels import cuda_dequantize, gemm
from sharq.kernels.placed import place_codes

caps = ceilings()
print(torch.cuda.get_device_name(), f"copy {caps['copy_GBps']:.0f} GB/s")
print("| K | N | recipe | old us | new us | new placed us | triton us | new GB/s (of copy) | old GB/s | same bits |")
for k, n in SHAPES + SHAPES_70B:
    for recipe in ("sharq", "sharq-plus"):
        p, sw, r = payload(recipe, n, k)
        nb = p.codes.numel() + p.scales.numel()
        ps = [(p.codes.clone(), p.scales.clone()) for _ in range(copies(nb))]
        w = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
        blk = p.block_size
        old = [old_dequantize.launcher(c, s, "nvfp4", blk, k) for c, s in ps]
        new = [cuda_dequantize.launcher(c, s, "nvfp4", blk, k) for c, s in ps]
        plc = [(place_codes(c), s) for c, s in ps[:copies(nb)]]
        newp = [cuda_dequantize.launcher(c, s, "nvfp4", blk, k, placed=True) for c, s in plc]
        tri = [gemm._dequantizer(c, s, "nvfp4", blk, k, bound=True, cuda=False) for c, s in ps]
        t_old = graph_ms([lambda f=f: f(w) for f in old])
        t_new = graph_ms([lambda f=f: f(w) for f in new])
        t_newp = graph_ms([lambda f=f: f(w) for f in newp])
        t_tri = graph_ms([lambda f=f: f(w) for f in tri])
        a = torch.empty_like(w); b = torch.empty_like(w)
        old[0](a); new[0](b)
        same = torch.equal(a.view(torch.int16), b.view(torch.int16))
        newp[0](b)
        same &= torch.equal(a.view(torch.int16), b.view(torch.int16))
        nbytes = nb + 2 * n * k
        gb = lambda t: nbytes / t / 1e6
        print(f"| {k} | {n} | {recipe} | {t_old*1e3:.1f} | {t_new*1e3:.1f} | {t_newp*1e3:.1f} | {t_tri*1e3:.1f} | "
              f"{gb(t_new):.0f} ({gb(t_new)/caps['copy_GBps']:.2f}) | {gb(t_old):.0f} | {same} |", flush=True)
        del ps, plc, old, new, newp, tri
        torch.cuda.empty_cache()
