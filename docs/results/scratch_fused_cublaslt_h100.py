"""The scratch path's layer and GEMM with the fused cuBLASLt product against cuBLAS + the epilogue, in turn."""
import torch
from sharq.kernels import cublaslt
import bench_gemm as b

lib = cublaslt._library
print(torch.cuda.get_device_name(), "cuBLASLt:", lib() is not None)
caps = {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0}
print("| K | N | M | bf16 us | epilogue: GEMM / layer us | fused: GEMM / layer us | layer x bf16 epilogue -> fused |")
for k, n in b.SHAPES + b.SHAPES_70B[:1]:
    for m in (2048, 8192):
        rows = {}
        for mode in ("epilogue", "fused", "epilogue2", "fused2"):
            cublaslt._library = lib if mode.startswith("fused") else (lambda: None)
            rows[mode] = b.time_shape(k, n, m, caps, ("sharq",))
        cublaslt._library = lib
        e = min(rows["epilogue"]["sharq_layer_ms"], rows["epilogue2"]["sharq_layer_ms"])
        f = min(rows["fused"]["sharq_layer_ms"], rows["fused2"]["sharq_layer_ms"])
        eg = min(rows["epilogue"]["sharq_gemm_ms"], rows["epilogue2"]["sharq_gemm_ms"])
        fg = min(rows["fused"]["sharq_gemm_ms"], rows["fused2"]["sharq_gemm_ms"])
        bf = min(r["bf16_ms"] for r in rows.values())
        print(f"| {k} | {n} | {m} | {bf*1e3:.1f} | {eg*1e3:.1f} / {e*1e3:.1f} | {fg*1e3:.1f} / {f*1e3:.1f} | "
              f"{bf/e:.2f} -> {bf/f:.2f} | {rows['fused']['route']}", flush=True)
