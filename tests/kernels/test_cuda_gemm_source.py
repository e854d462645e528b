"""The CUDA GEMM's source (kernels/cuda_gemm.py) compiled on the CPU by NVRTC, for every launch the packed backend
makes: a kernel change that does not compile, or that spills where it did not, fails here rather than on the first
GPU it meets. Needs NVRTC (the nvidia-cuda-nvrtc package of the test extra), not a GPU."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from sharq.kernels import cuda_gemm

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),  # Llama-3.1-8B (K, N)
          (8192, 10240), (8192, 8192), (8192, 28672), (28672, 8192),  # Llama-3.1-70B
          (8192, 512), (16384, 256)]  # few rows: K split over blocks too
MS = [1, 4, 8, 9, 16, 17, 32, 33, 64]


@functools.cache
def _nvrtc() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for lib in sorted(Path(root).glob("**/libnvrtc.so*")):
            return ctypes.CDLL(str(lib))
    return None


pytestmark = pytest.mark.skipif(_nvrtc() is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")


def compile_log(source: str, arch: str) -> str:
    """NVRTC's log of compiling `source` for `arch` with ptxas' resource report; raises with the log on an error."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"sharq_nvfp4_mma.cu", 0, None, None) == 0
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if status != 0:
        raise AssertionError(f"NVRTC error {status} for {arch}:\n{log.value.decode()[-3000:]}")
    return log.value.decode()


def resources(log: str) -> tuple[int, int]:
    """(registers a thread, bytes spilled) from ptxas' report."""
    return (int(re.search(r"Used (\d+) registers", log).group(1)),
            int(re.search(r"(\d+) bytes spill stores", log).group(1)))


@pytest.mark.parametrize("k,n", SHAPES)
def test_every_launch_the_backend_makes_compiles(k, n, monkeypatch):
    """choose_tile's launch at each M on this shape (an H200's 132 multiprocessors), with 32-element blocks into
    bf16 and 16-element blocks into fp16 with a bf16 bias and per-token scales, compiles for Hopper; up to 8
    tokens (batch-1 decode, where each warp needs its registers for loads in flight) it does not spill."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    done = set()
    for m in MS:
        t = cuda_gemm.choose_tile(m, n, k, None)
        for block, out, bias, per_token in [(32, "bfloat16", None, False), (16, "float16", "bfloat16", True)]:
            source = cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), block, cuda_gemm._OUT[getattr(torch, out)],
                                             cuda_gemm._BIAS[bias and getattr(torch, bias)], per_token)
            if source in done:
                continue
            done.add(source)
            registers, spilled = resources(compile_log(source, "sm_90"))
            assert registers <= 255
            if m <= 8:
                assert spilled == 0, (m, t, block, registers, spilled)


def test_the_launch_options_compile_for_ampere_too():
    """The kernel needs bf16 MMA (sm_80); Hopper's programmatic-launch wait compiles away below sm_90."""
    for t, m in [(cuda_gemm.CudaTile(1, 8, 2), 1), (cuda_gemm.CudaTile(2, 4, 1, 2, 3, wn=2, direct=True), 64),
                 (cuda_gemm.CudaTile(1, 8, 2, min_blocks=3), 4)]:
        compile_log(cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), 16, 2, 3, True), "sm_80")
