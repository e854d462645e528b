"""What Hopper's warpgroup MMA reaches with the operands the wgmma GEMM uses (kernels/cuda_wgmma.py): m64nNk16 bf16
with A from registers (RS, as the GEMM) or shared memory (SS), B in shared memory without swizzle (the GEMM's core
matrices) or with the 128-byte swizzle, 1-3 warpgroups a block, one or two accumulators a warpgroup. Each
warpgroup runs 8 dependent steps per iteration on constant operands (no loads): the MMA's own ceiling.

    python benchmarks/wgmma_peak.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

_SOURCE = r"""
typedef unsigned int u32;
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ unsigned long long desc(u32 addr) {
#if SWIZZLE
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
       | (1ull << 62);
#else
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | ((unsigned long long)(NT * 16 >> 4) << 16)
       | ((unsigned long long)(128 >> 4) << 32);
#endif
}
MMA_FUNCTION
extern "C" __global__ void __launch_bounds__(WG * 128, 1) peak(float* out, int iters) {
  extern __shared__ __align__(1024) unsigned char smem[];
  for (int i = threadIdx.x; i < (2 * NT * 256 + 64 * 256) / 4; i += blockDim.x) ((u32*)smem)[i] = 0x3f803f80u;
  __syncthreads();
  const u32 b0 = smem_u32(smem), a0 = b0 + 2 * NT * 256;
  float acc[ACCS][NT / 2];
  for (int r = 0; r < ACCS; ++r)
    for (int i = 0; i < NT / 2; ++i) acc[r][i] = 0.f;
  const u32 a[4] = {0x3f803f80u ^ threadIdx.x, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#if SWIZZLE
      const u32 b = b0 + (j >> 2) * NT * 128 + (j & 3) * 32;
#else
      const u32 b = b0 + j * 2 * NT * 16;
#endif
#pragma unroll
      for (int r = 0; r < ACCS; ++r) mma(acc[r], a, desc(a0 + j * 32), desc(b));
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
  }
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  float s = 0.f;
  for (int r = 0; r < ACCS; ++r)
    for (int i = 0; i < NT / 2; ++i) s += acc[r][i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def mma_function(n: int, a_in_registers: bool) -> str:
    """wgmma m64{n}k16 into n / 2 fp32 registers a thread, A from registers or by descriptor."""
    nd = n // 2
    d = ",".join(f"%{i}" for i in range(nd))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    if a_in_registers:
        asm = (f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{d}}}, {{%{nd},%{nd + 1},%{nd + 2},'
               f'%{nd + 3}}}, %{nd + 4}, 1, 1, 1, 0;" : {outs} : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bd)')
    else:
        asm = (f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{d}}}, %{nd}, %{nd + 1}, 1, 1, 1, 0, 0;" '
               f': {outs} : "l"(ad), "l"(bd)')
    return (f"__device__ __forceinline__ void mma(float (&d)[{nd}], const u32 (&a)[4], unsigned long long ad, "
            f"unsigned long long bd) {{ asm volatile({asm}); }}\n")


def measure(n: int, warpgroups: int, a_in_registers: bool, swizzle: bool, accs: int, iters: int = 2000) -> dict:
    defines = dict(NT=n, WG=warpgroups, SWIZZLE=int(swizzle), ACCS=accs)
    source = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE.replace(
        "MMA_FUNCTION", mma_function(n, a_in_registers))
    major, minor = torch.cuda.get_device_capability()
    kernel = torch.cuda._compile_kernel(source, "peak", compute_capability=f"{major}{minor}a",
                                        nvcc_options=["-std=c++17"])
    shared = 2 * n * 256 + 64 * 256
    if shared >= 48 * 1024:
        kernel.set_shared_memory_config(shared)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks = sms * max(1, 3 // warpgroups)
    out = torch.empty(blocks * warpgroups * 128, device="cuda")
    launch = lambda: kernel((blocks, 1, 1), (warpgroups * 128, 1, 1), [out, iters], shared_mem=shared)  # noqa: E731
    launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    mmas_per_sm = blocks / sms * warpgroups * iters * 8 * accs
    return {"N": n, "warpgroups": warpgroups, "blocks_per_sm": blocks // sms, "A": "registers" if a_in_registers
            else "shared", "B": "128B swizzle" if swizzle else "no swizzle", "accumulators": accs,
            "TFLOPs": 2 * 64 * n * 16 * mmas_per_sm * sms / ms / 1e9, "us_per_mma_per_sm": 1e3 * ms / mmas_per_sm}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_peak needs a Hopper GPU (sm_90a)", file=sys.stderr)
        return 2
    rows = []
    for n, wg, rs, swz, accs in itertools.product((64, 128), (1, 2, 3), (True, False), (False, True), (1, 2)):
        if n == 128 and accs == 2 and wg == 3:
            continue  # does not fit the registers
        rows.append(measure(n, wg, rs, swz, accs))
        r = rows[-1]
        print(f"m64n{n}k16, {wg} warpgroup(s) x {r['blocks_per_sm']} block(s)/SM, A {r['A']}, B {r['B']}, "
              f"{accs} accumulator(s): {r['TFLOPs']:.0f} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
