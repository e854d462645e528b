"""Kernel launches that cost the host little: an eager decode step runs every quantized linear once per token,
each two or three kernels, so a launch has to cost microseconds (docs/PERF.md, "host cost").

General-purpose launchers spend their time elsewhere: Triton's JIT binds and specializes every argument on every
call to find the compiled kernel, and torch's NVRTC launcher (`torch.cuda._compile_kernel`) opens the driver
library and builds ctypes objects for each argument on every call. Here:

- `launch_triton(fn, grid, args, constexprs)` keeps the compiled kernel a call resolves to, under a key holding
  everything its specialization can depend on (each tensor's dtype and 16-byte alignment, each integer's value,
  the constexprs, the device), and launches it directly on later calls. The first call of a key, calls under a
  launch hook (profilers) and Triton's interpreter take Triton's own path.
- `DriverKernel` launches a CUDA function (`CUfunction`) through `cuLaunchKernel`, its argument block built once
  per thread and refilled in place.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Sequence

import torch
import triton

from .common import INTERPRETED

_MAX_KERNELS = 4096  # compiled-kernel keys kept (a model has a few dozen: layer shapes x token counts)
_compiled: dict[tuple, tuple] = {}


_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # None before Triton 3.4: always Triton's path


def _hooks_set() -> bool:
    """Whether a launch hook is installed (a profiler): a callable, or a non-empty chain of them (newer Triton)."""
    if _RUNTIME is None:
        return True
    return any(h is not None and getattr(h, "calls", True) for h in (_RUNTIME.launch_enter_hook,
                                                                     _RUNTIME.launch_exit_hook))


class Constexprs(dict):
    """A kernel's constexprs and launch options (num_warps, ...), made once per variant by its caller, with the
    hashable form launch_triton's key needs computed then rather than on every launch. Not to be changed."""

    def __init__(self, **values):
        super().__init__(values)
        self.key = tuple(sorted(values.items()))


def _key(fn, device: int, constexpr_key: tuple, args: Sequence) -> tuple:
    """Everything a compiled kernel's specialization can depend on, flat (it is built on every eager call): an int
    as itself, a tensor as its dtype and whether it is 16-byte aligned, anything else as its type and value."""
    return (fn, device, constexpr_key, *[a if a.__class__ is int else (a.dtype, not a.data_ptr() & 15)
                                         if isinstance(a, torch.Tensor) else (type(a), a) for a in args])


def launch_triton(fn, grid: Sequence[int], args: Sequence, constexprs: Constexprs) -> None:
    """fn[grid](*args, **constexprs) for a @triton.jit fn whose parameters are `args` (tensors, ints, floats,
    bools) followed by the constexprs named in `constexprs`."""
    if INTERPRETED or _hooks_set():
        fn[tuple(grid)](*args, **constexprs)
        return
    device = torch.cuda.current_device()
    key = _key(fn, device, constexprs.key, args)
    hit = _compiled.get(key)
    if hit is None:
        kernel = fn[tuple(grid)](*args, **constexprs)
        names = fn.arg_names[len(args):]
        if kernel is not None and all(n in constexprs for n in names) and len(_compiled) < _MAX_KERNELS:
            _compiled[key] = (kernel, tuple(constexprs[n] for n in names))
        return
    kernel, tail = hit
    g = (*grid, 1, 1)
    kernel.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), kernel.function,
               kernel.packed_metadata, None, None, None, *args, *tail)


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


class DriverKernel:
    """A CUDA function launched through cuLaunchKernel: `n_ptrs` pointer arguments, then `n_ints` 32-bit int
    arguments (the order of the kernel's parameters). Each thread fills its own argument block, so launches from
    several threads do not race."""

    def __init__(self, handle: int, n_ptrs: int, n_ints: int):
        self.handle, self.n_ptrs, self.n_ints = handle, n_ptrs, n_ints
        self._local = threading.local()

    def _block(self):
        b = getattr(self._local, "block", None)
        if b is None:
            ptrs, ints = (ctypes.c_void_p * self.n_ptrs)(), (ctypes.c_int * self.n_ints)()
            p0, i0 = ctypes.addressof(ptrs), ctypes.addressof(ints)
            params = (ctypes.c_void_p * (self.n_ptrs + self.n_ints))(
                *[p0 + 8 * i for i in range(self.n_ptrs)], *[i0 + 4 * i for i in range(self.n_ints)])
            b = self._local.block = (ptrs, ints, params)
        return b

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int, stream: int,
                 ptrs: Sequence[int], ints: Sequence[int]) -> None:
        p, i, params = self._block()
        p[:] = ptrs
        i[:] = ints
        err = _driver().cuLaunchKernel(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                       shared_bytes, stream, params, None)
        if err:
            msg = ctypes.c_char_p()
            _driver().cuGetErrorString(err, ctypes.byref(msg))
            raise RuntimeError(f"cuLaunchKernel failed: {msg.value.decode() if msg.value else err}")
