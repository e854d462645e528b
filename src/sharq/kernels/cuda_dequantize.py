"""The packed NVFP4 weight decoded into a bf16 [N, K] buffer by a CUDA kernel: the scratch weight cuBLAS multiplies
above the GEMM kernels' tokens (kernels/gemm.py's decode + cuBLAS, prefill), in place of the Triton decode where it
runs.

The decode is memory-bound (0.53 bytes read and 2 written a weight), and the Triton kernel moved 2.5-2.8 TB/s on an
H200 (61-67 % of copy bandwidth, docs/PERF.md). Here a thread takes a 32-element group of a row at a time (one
16-byte load of codes, its one or two scale codes), decodes it the GEMM kernels' way (kernels/cuda_source.py: bit
placement, the block scale from a table of all 256 codes, one bf16x2 multiply; then one by 2^8 for the 2^-8 the
placement leaves, exact), puts the pairs (elements i, i + 4) back in order with two byte permutes a pair of pairs
(placed codes, kernels/placed.py, decode in order) and stores 64 bytes in four 16-byte stores, two groups in
flight a thread. Every value is the exact code × scale, so the buffer is the Triton kernel's bit for bit, and NaN
where a scale code is NaN (the multiply's canonical NaN: its payload bits may differ from the Triton kernel's)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import cuda_gemm
from .common import INTERPRETED
from .cuda_source import DEVICE_HELPERS
from .launch import DriverKernel

NAME = "sharq_nvfp4_dequantize"
THREADS = 256
BLOCKS_PER_MULTIPROCESSOR = 8  # a grid-stride loop over the groups: 2048 threads a multiprocessor, 64 KB in flight
_broken: list[str] = []  # why the kernel could not be compiled here (then the Triton decode runs)

_SOURCE = r"""
__device__ __forceinline__ void dequantize_group(const u32* table, const U4& c, u32 scale_codes, U4* out) {
  u32 sc[2];
  row_scale_pairs(table, scale_codes, sc);
#pragma unroll
  for (int v = 0; v < 4; ++v) {  // elements 8 v .. 8 v + 7
    const u32 x = word(c, v);
    u32 p[4];  // p[i]: pair i (decode_pair), exact code times scale
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = mul_bf16x2(mul_bf16x2(decode_pair(x, i), sc[v >> 1]), 0x43804380u);
    out[v] = in_order(p[0], p[1], p[2], p[3]);
  }
}
__device__ __forceinline__ u32 group_scales(const u8* scales, int i) {
#if BLOCK == 32
  return scales[i];
#else
  return ((const u16*)scales)[i];
#endif
}
// group i: elements 32 i .. 32 i + 31 of the payload read as one row-major run (K = Kp), which they are
extern "C" __global__ void __launch_bounds__(256) sharq_nvfp4_dequantize(
    const U4* __restrict__ codes, const u8* __restrict__ scales, U4* __restrict__ w, int groups) {
  __shared__ u32 scale_table[256];
  build_scale_table(scale_table);
  __syncthreads();
  const int stride = gridDim.x * blockDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += 2 * stride) {
    const int j = i + stride;
    const U4 c0 = ld_stream(codes + i);
    const u32 s0 = group_scales(scales, i);
    if (j < groups) {
      const U4 c1 = ld_stream(codes + j);
      const u32 s1 = group_scales(scales, j);
      dequantize_group(scale_table, c0, s0, w + 4 * (long)i);
      dequantize_group(scale_table, c1, s1, w + 4 * (long)j);
    } else {
      dequantize_group(scale_table, c0, s0, w + 4 * (long)i);
    }
  }
}
"""


def kernel_source(block: int, placed: bool = False) -> str:
    """The kernel's CUDA source for block-`block` scales, reading canonical codes or placed ones (kernels/placed.py)."""
    return f"#define BLOCK {block}\n#define PLACED {int(placed)}\n" + DEVICE_HELPERS + _SOURCE


def fits(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, k: int) -> bool:
    """Whether the kernel decodes this payload into [N, k]: NVFP4 in blocks of 16 or 32, k the payload's whole K,
    contiguous and 16-byte aligned codes (scales 2-byte aligned for 16-element blocks), on a GPU with bf16 math
    where the CUDA kernels compile."""
    n = codes.shape[0]
    return (not INTERPRETED and not _broken and codes.is_cuda and fmt == "nvfp4" and block in (16, 32)
            and k == codes.shape[1] * 2 and k % 32 == 0 and 0 < n * k // 32 < 2**31 and codes.is_contiguous()
            and scales.is_contiguous() and codes.data_ptr() % 16 == 0 and scales.data_ptr() % 2 == 0
            and cuda_gemm._capability(codes.device) >= (8, 0) and cuda_gemm.available())


@functools.lru_cache(maxsize=64)
def _launch(device: int, groups: int, block: int, placed: bool = False) -> cuda_gemm._Launch:
    """The launch for `groups` 32-element groups, its kernel compiled (once per block size, layout and device)."""
    kernel = cuda_gemm._compile(device, kernel_source(block, placed), 0, NAME)
    blocks = min(-(-groups // (2 * THREADS)), BLOCKS_PER_MULTIPROCESSOR * cuda_gemm._multiprocessors(
        torch.device("cuda", device)))
    return cuda_gemm._Launch(DriverKernel(kernel.func.value, "pppi"), device, (blocks, 1, 1), (THREADS, 1, 1), 0,
                             1, 0)


def launcher(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, k: int, placed: bool = False
             ) -> Callable[[torch.Tensor], None] | None:
    """w -> None, decoding the payload into w (bf16 [N, k], contiguous, 16-byte aligned), worked out once; None
    where the kernel does not take the payload or cannot be compiled here (then the Triton decode runs; a warning
    says why, once). `placed`: the codes are in kernels/placed.py's layout."""
    if not fits(codes, scales, fmt, block, k):
        return None
    groups = codes.shape[0] * k // 32
    try:
        plan = _launch(codes.get_device(), groups, block, placed)
    except Exception as e:  # noqa: BLE001 - no NVRTC / headers here: the Triton decode runs instead
        cuda_gemm.compile_failed(_broken, e, "the CUDA weight decode", "using the Triton decode", stacklevel=3)
        return None
    weight = (codes.data_ptr(), scales.data_ptr())

    def run(w: torch.Tensor) -> None:
        plan.start((*weight, w.data_ptr()), (groups,))

    return run
