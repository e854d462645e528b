"""Kernel launches that cost the host little: an eager decode step runs every quantized linear once per token,
each two or three kernels, so a launch has to cost microseconds (docs/PERF.md, "host cost").

General-purpose launchers spend their time elsewhere: Triton's JIT binds and specializes every argument on every
call to find the compiled kernel, and torch's NVRTC launcher (`torch.cuda._compile_kernel`) opens the driver
library and builds ctypes objects for each argument on every call. Here:

- `launch_triton(fn, grid, args, constexprs)` keeps the compiled kernel a call resolves to, under a key holding
  everything its specialization can depend on (each tensor's dtype and 16-byte alignment, each integer's value,
  the constexprs, the device), and launches it on later calls through the driver itself (below) where its
  parameters are plain pointers and 32-bit ints, else through Triton's launcher. The first call of a key, calls
  under a launch hook (profilers) and Triton's interpreter take Triton's own path. `TritonLaunch(..., bound=True)`
  is a launch plan's: it skips even the key once its kernel is resolved (its caller guarantees one
  specialization).
- `DriverKernel` launches a CUDA function (`CUfunction`) through `cuLaunchKernel`, its argument block built once
  per thread and refilled in place. The driver library is loaded with ctypes.PyDLL, which keeps the GIL over the
  few-µs call instead of releasing and re-taking it.
- `DriverKernel.fixed` is a launch plan's launch once its scratch tensors exist: the argument block filled once per
  thread and stream, each call writing only the pointers that change (its input, its output) before
  cuLaunchKernel. `FixedLaunches` keeps them per thread and stream.
- `plan_buffers` hands a plan the scratch tensors its kernels pass each other (an activation, K-split partials),
  made once per stream instead of allocated every call.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import triton

from .common import INTERPRETED

_MAX_KERNELS = 4096  # compiled-kernel keys kept (a model has a few dozen: layer shapes x token counts)
_compiled: dict[tuple, tuple] = {}
T = TypeVar("T")


_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # None before Triton 3.4: always Triton's path


def launch_hooks_set() -> bool:
    """Whether a launch hook is installed (a profiler): a callable, or a non-empty chain of them (newer Triton)."""
    if _RUNTIME is None:
        return True
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return (enter is not None and bool(getattr(enter, "calls", True))
            or leave is not None and bool(getattr(leave, "calls", True)))


class Constexprs(dict):
    """A kernel's constexprs and launch options (num_warps, ...), made once per variant by its caller, with the
    hashable form launch_triton's key needs computed then rather than on every launch. Not to be changed."""

    def __init__(self, **values):
        super().__init__(values)
        self.key = tuple(sorted(values.items()))


def stream_key(device: int) -> int:
    """The current CUDA stream's handle on `device` (0 under Triton's interpreter): what tells apart the streams
    that per-stream scratch tensors belong to."""
    return 0 if INTERPRETED else torch._C._cuda_getCurrentRawStream(device)


PLAN_BUFFER_BYTES = 1 << 20  # plan_buffers keeps a plan's tensors up to this size (32 tokens' activation at K = 14336)
PLAN_BUFFER_BUDGET = 1 << 28  # and up to this much in all on a device (an 8B model's decode keeps 54 MB at batch 32)
_kept_bytes: dict[int, int] = {}  # what the live plans keep, by device


def plan_buffers(make: Callable[[], T | None], nbytes: int, device: int) -> Callable[[], T | None]:
    """A launch plan's scratch tensors (what its kernels write and read within one call: the activation between
    the prepare and the GEMM, a K split's fp32 partials, the amax pass's words), `make`d at its first call on a
    CUDA stream and given back to its later calls there. A later call's kernels queue behind this call's on that
    stream, so they overwrite the tensors only once they have been read; a decode step, which calls each layer
    once a token, spares an allocation (a few µs of host) per tensor per call. Tensors of more than
    PLAN_BUFFER_BYTES (`nbytes` in all), or beyond PLAN_BUFFER_BUDGET kept on the device by the plans alive, are
    made anew each call, so the memory a model's plans keep stays bounded (prefill-sized plans keep none; many
    small shapes, e.g. an evaluation's batches, keep up to the budget). Streams are told apart by their handle
    (PyTorch's streams come from pools and are never destroyed); CUDA graphs captured on one stream share the
    tensors made there, so such graphs are replayed one after another (on one stream), as a decode loop does, not
    at once on several. A `make` that gives None (nothing to keep on this stream now) is asked again at the next
    call."""
    if nbytes > PLAN_BUFFER_BYTES:
        return make
    by_stream: dict[int, T] = {}
    kept = [0]  # bytes this plan keeps, given back to the budget when the plan is gone

    def get() -> T | None:
        stream = stream_key(device)
        buffers = by_stream.get(stream)
        if buffers is None:
            buffers = make()
            if buffers is not None and _kept_bytes.get(device, 0) + nbytes <= PLAN_BUFFER_BUDGET:
                by_stream[stream] = buffers
                kept[0] += nbytes
                _kept_bytes[device] = _kept_bytes.get(device, 0) + nbytes
        return buffers

    weakref.finalize(get, _give_back, device, kept)
    return get


def _give_back(device: int, kept: list[int]) -> None:
    _kept_bytes[device] -= kept[0]


def _key(fn, device: int, constexpr_key: tuple, args: Sequence) -> tuple:
    """Everything a compiled kernel's specialization can depend on, flat (it is built on every eager call): an int
    as itself, a tensor as its dtype and whether it is 16-byte aligned, anything else as its type and value."""
    return (fn, device, constexpr_key, *[a if a.__class__ is int else (a.dtype, not a.data_ptr() & 15)
                                         if isinstance(a, torch.Tensor) else (type(a), a) for a in args])


def launch_triton(fn, grid: Sequence[int], args: Sequence, constexprs: Constexprs) -> None:
    """fn[grid](*args, **constexprs) for a @triton.jit fn whose parameters are `args` (tensors, ints, floats,
    bools) followed by the constexprs named in `constexprs`."""
    if INTERPRETED or launch_hooks_set():
        fn[tuple(grid)](*args, **constexprs)
        return
    device = torch.cuda.current_device()
    key = _key(fn, device, constexprs.key, args)
    hit = _compiled.get(key)
    if hit is None:
        kernel = fn[tuple(grid)](*args, **constexprs)
        names = fn.arg_names[len(args):]
        if kernel is not None and all(n in constexprs for n in names) and len(_compiled) < _MAX_KERNELS:
            _compiled[key] = (kernel, tuple(constexprs[n] for n in names), _TritonDirect.of(kernel, len(args)))
        return
    kernel, tail, direct = hit
    g = (*grid, 1, 1)
    stream = torch._C._cuda_getCurrentRawStream(device)
    if direct is not None:
        if g[0] * g[1] * g[2]:  # Triton launches nothing on an empty grid; the driver would refuse it
            direct(g[:3], stream, args)
        return
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)


class TritonLaunch:
    """launch_triton(fn, grid, args, constexprs) as a callable of `args`, for calls whose grid and constexprs are
    fixed. `bound=True` is for a launch plan's calls, which all share one specialization (the same ints and
    dtypes, tensors aligned alike: its caller guarantees it, e.g. checking an outside input's alignment): once a
    call has resolved the compiled kernel, later calls launch it through the driver with no key to build, no
    lookup and no argument re-inspection (an eager decode step's linears each save microseconds). Calls under a
    launch hook, on another device, in the interpreter, or of a kernel the driver path does not take still go
    through launch_triton."""

    __slots__ = ("fn", "grid", "constexprs", "_grid3", "_direct", "_device")

    def __init__(self, fn, grid: Sequence[int], constexprs: Constexprs, bound: bool = False):
        self.fn, self.grid, self.constexprs = fn, tuple(grid), constexprs
        self._grid3 = (*self.grid, 1, 1)[:3]
        # False: always launch_triton (an empty grid launches nothing there; the driver would refuse it)
        self._direct = None if bound and not INTERPRETED and all(self.grid) else False
        self._device = -1

    def bound(self) -> TritonLaunch:
        """This launch, bound (a new object: for one caller whose calls share one specialization)."""
        return TritonLaunch(self.fn, self.grid, self.constexprs, bound=True)

    def __call__(self, args: Sequence) -> None:
        direct = self._direct
        if direct and self._device == torch.cuda.current_device() and not launch_hooks_set():
            direct(self._grid3, torch._C._cuda_getCurrentRawStream(self._device), args)
            return
        launch_triton(self.fn, self.grid, args, self.constexprs)
        if direct is None and not launch_hooks_set():  # resolved by that call (or an earlier one) where it can be
            self._device = torch.cuda.current_device()
            hit = _compiled.get(_key(self.fn, self._device, self.constexprs.key, args))
            if hit is not None:
                self._direct = hit[2] or False

    def fixed(self, args: Sequence, stream: int, varying: Sequence[int]) -> Callable[..., None] | None:
        """The launch of `args` on `stream` with all but the pointers args[i], i in `varying`, fixed (each call
        passes those, in order: DriverKernel.fixed), once a bound call has resolved the kernel to the driver's
        launch; else None."""
        direct = self._direct
        return direct.fixed(self._grid3, stream, args, varying) if direct else None


def ptx_entry_params(ptx: str) -> int:
    """How many parameters the (one) kernel entry of a PTX module takes."""
    entry = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError("no .entry in the PTX")
    return entry.group(1).count(".param")


class _TritonDirect:
    """A compiled Triton kernel launched by cuLaunchKernel: its parameters are the call's pointer and int
    arguments that the specialization kept (an int equal to 1, say, becomes a constant), in order, then the
    scratch pointers Triton appends (null: only kernels that need no scratch memory are taken)."""

    def __init__(self, kernel: DriverKernel, block: tuple[int, int, int], shared: int, ptr_args: tuple[int, ...],
                 int_args: tuple[int, ...], scratch: int):
        self.kernel, self.block, self.shared = kernel, block, shared
        self.ptr_args, self.int_args, self.nulls = ptr_args, int_args, [0] * scratch
        self._pick_ptrs, self._pick_ints = _picker(ptr_args), _picker(int_args)

    @classmethod
    def of(cls, kernel, n_args: int) -> _TritonDirect | None:
        """The direct launch of `kernel` (a CompiledKernel for calls of n_args arguments), or None where its
        parameters are not all pointers and i32 or it needs what only Triton's launcher sets up."""
        try:
            md, types = kernel.metadata, list(kernel.src.signature.values())
            if (not kernel.function or getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0)
                    or getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False)
                    or getattr(md, "launch_cooperative_grid", False) or len(types) < n_args
                    or any(t != "constexpr" for t in types[n_args:])):
                return None
            layout, ptr_args, int_args = [], [], []
            for i, t in enumerate(types[:n_args]):
                if t == "constexpr":
                    continue
                if t.startswith("*"):
                    layout.append("p")
                    ptr_args.append(i)
                elif t == "i32":
                    layout.append("i")
                    int_args.append(i)
                else:
                    return None
            scratch = ptx_entry_params(kernel.asm["ptx"]) - len(layout)
            if not 0 <= scratch <= 2:
                return None
            block = (32 * md.num_warps, 1, 1)
            return cls(DriverKernel(kernel.function, "".join(layout) + "p" * scratch), block, md.shared,
                       tuple(ptr_args), tuple(int_args), scratch)
        except Exception:  # noqa: BLE001 - another Triton's objects: its own launcher still works
            return None

    def fixed(self, grid: tuple[int, int, int], stream: int, args: Sequence, varying: Sequence[int]
              ) -> Callable[..., None] | None:
        """DriverKernel.fixed for these arguments, args[i] for i in `varying` passed by each call (None where one
        of them is not a pointer parameter)."""
        if any(i not in self.ptr_args for i in varying):
            return None
        return self.kernel.fixed(grid, self.block, self.shared, stream,
                                 [*map(_data_ptr, self._pick_ptrs(args)), *self.nulls], self._pick_ints(args),
                                 [self.ptr_args.index(i) for i in varying])

    def __call__(self, grid: tuple[int, int, int], stream: int, args: Sequence) -> None:
        ptrs = list(map(_data_ptr, self._pick_ptrs(args)))
        self.kernel(grid, self.block, self.shared, stream, ptrs + self.nulls if self.nulls else ptrs,
                    self._pick_ints(args))


_data_ptr = torch.Tensor.data_ptr


def _picker(indices: tuple[int, ...]) -> Callable[[Sequence], tuple]:
    """args -> (args[i] for i in indices) as a tuple, by one C call (operator.itemgetter) where it takes them."""
    if len(indices) >= 2:
        return operator.itemgetter(*indices)
    return (lambda args: (args[indices[0]],)) if indices else (lambda args: ())


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("value", ctypes.c_int64 * 8)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

PROGRAMMATIC_LAUNCH = True
"""Launch kernels built for it with programmatic dependent launch (Hopper and later) while a CUDA graph is
captured: the kernel may start while the one before it still runs, and waits for it (`griddepcontrol.wait`)
before it reads anything, so its launch and set-up overlap the prepare kernel (H200: 0.1-1.5 µs less a layer in
a graph). Eager launches stay plain: there it measured no faster at batch 1 and slower at batch 8 (docs/PERF.md).
False: plain launches everywhere (benchmarks compare the two)."""


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.PyDLL:
    lib = ctypes.PyDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    lib.cuLaunchKernel.restype = ctypes.c_int
    if hasattr(lib, "cuLaunchKernelEx"):  # CUDA 11.8 and later
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p]
        lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


class DriverKernel:
    """A CUDA function launched through cuLaunchKernel, its parameters given by `params`: one letter each, in
    order, "p" a pointer, "i" a 32-bit int. Each thread fills its own argument block, so launches from several
    threads do not race. `programmatic`: the kernel waits for its prior kernel itself (griddepcontrol), so it may
    be launched with programmatic dependent launch (see PROGRAMMATIC_LAUNCH)."""

    def __init__(self, handle: int, params: str, programmatic: bool = False):
        if set(params) - {"p", "i"}:
            raise ValueError(f"parameters are 'p' (pointer) or 'i' (int32), got {params!r}")
        self.handle, self.params = handle, params
        self.programmatic = programmatic and hasattr(_driver(), "cuLaunchKernelEx")
        self._launch = None  # the driver's cuLaunchKernel, looked up at the first launch
        self._local = threading.local()

    def _bind(self):
        self._launch = _driver().cuLaunchKernel
        return self._launch

    def _arrays(self) -> tuple:
        """(pointer values, int values, the parameter array pointing into them in parameter order)."""
        ptrs = (ctypes.c_void_p * self.params.count("p"))()
        ints = (ctypes.c_int * self.params.count("i"))()
        p0, i0, slots, n = ctypes.addressof(ptrs), ctypes.addressof(ints), [], {"p": 0, "i": 0}
        for kind in self.params:
            slots.append(p0 + 8 * n["p"] if kind == "p" else i0 + 4 * n["i"])
            n[kind] += 1
        return ptrs, ints, (ctypes.c_void_p * len(slots))(*slots)

    def _block(self):
        b = getattr(self._local, "block", None)
        if b is None:
            ptrs, ints, params = self._arrays()
            attr = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION)
            attr.value[0] = 1  # programmaticStreamSerializationAllowed
            config = _LaunchConfig(attrs=ctypes.pointer(attr), n_attrs=1)
            b = self._local.block = (ptrs, ints, params, config, attr)
        return b

    def fixed(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int, stream: int,
              ptrs: Sequence[int], ints: Sequence[int], slots: Sequence[int]) -> Callable[..., None]:
        """The launch __call__ makes of these arguments, with its argument block filled once: each call passes the
        pointers ptrs[i], i in `slots`, in that order, and the rest stay. For one thread (the block is its own)
        and `stream`. A programmatic kernel under a CUDA graph's capture takes __call__'s launch."""
        ptr_values, int_values, params = self._arrays()
        ptr_values[:], int_values[:] = ptrs, ints
        launch = _unprototyped(self._launch or self._bind())
        # cuLaunchKernel's arguments, fixed: pointers as c_void_p, the unsigned sizes as Python ints (a C int each)
        call = (ctypes.c_void_p(self.handle), *grid, *block, shared_bytes, ctypes.c_void_p(stream), params, None)
        programmatic, capturing = self.programmatic, torch._C._cuda_isCurrentStreamCapturing
        slots = tuple(slots)

        def run(*values: int) -> None:
            for slot, value in zip(slots, values):
                ptr_values[slot] = value
            if programmatic and PROGRAMMATIC_LAUNCH and capturing():
                self(grid, block, shared_bytes, stream, list(ptr_values), int_values)
                return
            err = launch(*call)
            if err:
                _check(err, lambda: launch(*call))

        return run

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int, stream: int,
                 ptrs: Sequence[int], ints: Sequence[int]) -> None:
        """Launch with the pointer arguments `ptrs` and the int arguments `ints`, each in parameter order."""
        p, i, params, config, _ = self._block()
        p[:] = ptrs
        i[:] = ints
        if self.programmatic and PROGRAMMATIC_LAUNCH and torch.cuda.is_current_stream_capturing():
            config.grid[:], config.block[:] = grid, block
            config.shared_bytes, config.stream = shared_bytes, stream
            err = _driver().cuLaunchKernelEx(ctypes.byref(config), self.handle, params, None)
            if err:
                _check(err, lambda: _driver().cuLaunchKernelEx(ctypes.byref(config), self.handle, params, None))
        else:
            launch = self._launch or self._bind()
            err = launch(self.handle, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_bytes, stream,
                         params, None)
            if err:
                _check(err, lambda: launch(self.handle, *grid, *block, shared_bytes, stream, params, None))


def _unprototyped(function) -> Callable[..., int]:
    """The C function `function` (a ctypes function pointer) called with no argument types declared, so ctypes
    converts nothing it is given, and with the GIL held (a launch only queues work): a fixed launch passes arguments
    already in their C form, and a call costs about 0.3 µs against 0.9 with the prototype's conversions (a C
    stand-in for the driver on a CPU); on an H100 an eager SharQLinear at one token took 1.4-5.1 µs less host time
    (`python benchmarks/bench_host.py --m 1,32`, docs/PERF.md)."""
    return ctypes.PYFUNCTYPE(ctypes.c_int)(ctypes.cast(function, ctypes.c_void_p).value)


_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT: the calling thread has no current context


def _check(err: int, relaunch: Callable[[], int]) -> None:
    """Raise for a launch that failed, unless it failed only for want of a current context in this thread: the CUDA
    runtime makes a device's primary context current in a thread at the thread's first runtime call that needs one,
    and a thread whose first CUDA work is a direct launch has made none. Then the current device's primary context
    is made current (the one torch's tensors and these kernels live in) and the launch made again."""
    if err == _INVALID_CONTEXT and _make_primary_context_current(torch._C._cuda_getDevice()):
        err = relaunch()
    if err:
        _raise(err)


def _make_primary_context_current(device: int) -> bool:
    """Whether `device`'s primary context could be made current in this thread (it stays alive: the runtime holds
    it, so the reference taken to find it is given back at once)."""
    lib = _driver()
    release = getattr(lib, "cuDevicePrimaryCtxRelease_v2", None) or lib.cuDevicePrimaryCtxRelease
    handle, context = ctypes.c_int(), ctypes.c_void_p()
    if lib.cuDeviceGet(ctypes.byref(handle), device) or lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle):
        return False
    try:
        return lib.cuCtxSetCurrent(context) == 0
    finally:
        release(handle)


def _raise(err: int) -> None:
    msg = ctypes.c_char_p()
    _driver().cuGetErrorString(err, ctypes.byref(msg))
    raise RuntimeError(f"cuLaunchKernel failed: {msg.value.decode() if msg.value else err}")


class FixedLaunches:
    """A launch plan's fixed launches (DriverKernel.fixed), one per thread and CUDA stream of its device, each
    with what its caller keeps beside it (the scratch tensors it points to). `get()` is None until `put` gave the
    current thread and stream one. Its caller launches them only while their device is current (the kernel is
    that device's)."""

    def __init__(self, device: int):
        self.device = device
        self._by_key: dict[tuple[int, int], object] = {}

    def get(self) -> object | None:
        return self._by_key.get((threading.get_ident(), torch._C._cuda_getCurrentRawStream(self.device)))

    def put(self, value: object) -> None:
        if len(self._by_key) < 64:  # a few threads and streams; a thread pool's churn keeps no more
            self._by_key[(threading.get_ident(), torch._C._cuda_getCurrentRawStream(self.device))] = value
