"""The packed NVFP4 weight decoded into a bf16 [N, K] buffer by a CUDA kernel: the scratch weight cuBLAS multiplies
above the GEMM kernels' tokens (kernels/gemm.py's decode + cuBLAS, prefill), in place of the Triton decode where it
runs.

The decode is memory-bound (0.53 bytes read and 2 written a weight). A thread takes one 32-bit word of codes (8
elements) at a time, UNROLL words in flight, each step's words consecutive across the block's threads, so a warp's
loads are 128 contiguous bytes and its stores 512 (16 bytes a thread); the word's block scale code is looked up in a
table of all 256 codes. The decode is the GEMM kernels' (kernels/cuda_source.py: bit placement, one bf16x2 multiply
by the scale, then one by 2^8 for the 2^-8 the placement leaves, exact) with the pairs (elements i, i + 4) put back
in order by byte permutes (placed codes, kernels/placed.py, decode in order). The previous kernel took 32 elements
a thread and stored its 64 bytes as four 16-byte stores 64 bytes apart across a warp: on an H100 it moved 1.45 TB/s
(49 % of copy bandwidth) on 4096 x 6144 (docs/PERF.md, twenty-sixth run). Every value is the exact code x scale,
so the buffer is the Triton kernel's bit for bit, and NaN where a scale code is NaN (the multiply's canonical NaN:
its payload bits may differ from the Triton kernel's)."""

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
UNROLL = 4  # words a thread has in flight
BLOCKS_PER_MULTIPROCESSOR = 8  # a grid-stride loop over the words: 2048 threads a multiprocessor
_broken: list[str] = []  # why the kernel could not be compiled here (then the Triton decode runs)

_SOURCE = r"""
// word i: elements 8 i .. 8 i + 7 of the payload read as one row-major run (K = Kp, a multiple of 32, so a block
// of 16 or 32 elements never spans two rows and the scale codes are one run too)
extern "C" __global__ void __launch_bounds__(256) sharq_nvfp4_dequantize(
    const u32* __restrict__ codes, const u8* __restrict__ scales, U4* __restrict__ w, int words) {
  __shared__ u32 scale_table[256];
  build_scale_table(scale_table);
  __syncthreads();
  const long step = (long)gridDim.x * blockDim.x * UNROLL;
  for (long base = (long)blockIdx.x * blockDim.x * UNROLL + threadIdx.x; base < words; base += step) {
    u32 c[UNROLL], s[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const long i = base + j * blockDim.x;
      if (i < words) {
        c[j] = ld_stream(codes + i);
        s[j] = __ldg(scales + i / (BLOCK / 8));
      }
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const long i = base + j * blockDim.x;
      if (i < words) {
        const u32 sc = scale_table[s[j]];
        u32 p[4];  // p[q]: pair q (decode_pair), exact code times scale
#pragma unroll
        for (int q = 0; q < 4; ++q) p[q] = mul_bf16x2(mul_bf16x2(decode_pair(c[j], q), sc), 0x43804380u);
        w[i] = in_order(p[0], p[1], p[2], p[3]);
      }
    }
  }
}
"""


def kernel_source(block: int, placed: bool = False) -> str:
    """The kernel's CUDA source for block-`block` scales, reading canonical codes or placed ones (kernels/placed.py)."""
    return f"#define BLOCK {block}\n#define PLACED {int(placed)}\n#define UNROLL {UNROLL}\n" + DEVICE_HELPERS + _SOURCE


def fits(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int, k: int) -> bool:
    """Whether the kernel decodes this payload into [N, k]: NVFP4 in blocks of 16 or 32, k the payload's whole K,
    contiguous codes and scales (the codes 4-byte aligned: it loads a word at a time), on a GPU with bf16 math
    where the CUDA kernels compile."""
    n = codes.shape[0]
    return (not INTERPRETED and not _broken and codes.is_cuda and fmt == "nvfp4" and block in (16, 32)
            and k == codes.shape[1] * 2 and k % 32 == 0 and 0 < n * k // 8 < 2**31 and codes.is_contiguous()
            and scales.is_contiguous() and codes.data_ptr() % 4 == 0
            and cuda_gemm._capability(codes.device) >= (8, 0) and cuda_gemm.available())


@functools.lru_cache(maxsize=64)
def _launch(device: int, words: int, block: int, placed: bool = False) -> cuda_gemm._Launch:
    """The launch for `words` 8-element words, its kernel compiled (once per block size, layout and device)."""
    kernel = cuda_gemm._compile(device, kernel_source(block, placed), 0, NAME)
    blocks = min(-(-words // (UNROLL * THREADS)), BLOCKS_PER_MULTIPROCESSOR * cuda_gemm._multiprocessors(
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
    words = codes.shape[0] * k // 8
    try:
        plan = _launch(codes.get_device(), words, block, placed)
    except Exception as e:  # noqa: BLE001 - no NVRTC / headers here: the Triton decode runs instead
        cuda_gemm.compile_failed(_broken, e, "the CUDA weight decode", "using the Triton decode", stacklevel=3)
        return None
    weight = (codes.data_ptr(), scales.data_ptr())

    def run(w: torch.Tensor) -> None:
        plan.start((*weight, w.data_ptr()), (words,))

    return run
