"""Kernel launches with little host work (kernels/launch.py): a launch straight to the compiled kernel computes
what Triton's own launcher computes, keeps specializations apart, and is safe from several threads."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from sharq.kernels import cuda_gemm, launch
from sharq.kernels.epilogue import _epilogue_kernel, reduce_scale_and_bias

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[2]


def test_a_launch_hook_sends_launches_through_triton(monkeypatch):
    """A profiler's launch hook must see every launch, so the direct path steps aside while one is installed."""
    if launch._RUNTIME is None:
        pytest.skip("this Triton has no launch hooks (every launch takes Triton's path)")
    assert not launch.launch_hooks_set()
    monkeypatch.setattr(launch._RUNTIME, "launch_enter_hook", lambda *args: None)
    assert launch.launch_hooks_set()


def test_the_key_tells_apart_what_a_specialization_depends_on():
    """Two calls share a compiled kernel only if dtypes, 16-byte alignments, integer values, bools, constexprs and
    the device agree."""
    storage = torch.empty(64)
    a, b, off = storage[:16], storage[16:32], storage[1:17]  # b is aligned too (64 bytes on), off is not
    key = launch._key(None, 0, ("BLOCK", 32), (a, 7, True, 0.5))
    assert key == launch._key(None, 0, ("BLOCK", 32), (b, 7, True, 0.5))
    for other in [launch._key(None, 0, ("BLOCK", 32), (off, 7, True, 0.5)),
                  launch._key(None, 0, ("BLOCK", 32), (a.double(), 7, True, 0.5)),
                  launch._key(None, 0, ("BLOCK", 32), (a, 8, True, 0.5)),
                  launch._key(None, 0, ("BLOCK", 32), (a, 7, 1, 0.5)),
                  launch._key(None, 0, ("BLOCK", 32), (a, 7, True, 0.25)),
                  launch._key(None, 0, ("BLOCK", 16), (a, 7, True, 0.5)),
                  launch._key(None, 1, ("BLOCK", 32), (a, 7, True, 0.5))]:
        assert other != key


def _scaled_copy(x_ptr, y_ptr, M, K, scale, FLAG, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < M * K) * scale, mask=(i < M * K) & FLAG)


def _check_mapping(m: int, scale, direct: str | None) -> None:
    jit = JITFunction(_scaled_copy)
    args = (torch.empty(8), torch.empty(8), m, 9, scale, True)
    types = ["*fp32", "*fp32"] + [triton.runtime.jit.mangle_type(a) for a in args[2:]]
    signature = dict(zip(jit.arg_names, types + ["constexpr"]))
    constexprs = {"BLOCK": 128, "FLAG": True} | ({"M": 1} if m == 1 else {})
    signature.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(jit, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    kernel.function = 1  # as if loaded onto a GPU
    got = launch._TritonDirect.of(kernel, len(args))
    if direct is None:
        assert got is None
        return
    params = launch.ptx_entry_params(kernel.asm["ptx"])
    assert got.kernel.params == direct + "p" * (params - len(direct)) and 0 <= params - len(direct) <= 2
    assert got.ptr_args == (0, 1) and got.int_args == tuple(i for i in (2, 3, 4) if i != 2 or m != 1)
    assert got.block == (32 * kernel.metadata.num_warps, 1, 1)


@pytest.mark.parametrize("m,scale,direct", [(1, 3, "pp" + "i" * 2), (5, 3, "pp" + "i" * 3), (5, 2.0, None),
                                            (5, 1 << 40, None)])
def test_a_compiled_kernel_maps_onto_the_driver_parameters_its_specialization_kept(m, scale, direct):
    """Compiled for sm_90 here (no GPU needed): the direct launch passes the pointer and i32 arguments Triton kept
    (M = 1 becomes a constant), in order, then as many null scratch pointers as the PTX entry has left; a float or
    a 64-bit int argument leaves the launch to Triton. In a fresh process: once a kernel has run in Triton's
    interpreter, the process's triton.language is patched for it and cannot compile (where the compiled kernel is
    not in Triton's cache already)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from tests.kernels.test_launch import _check_mapping; _check_mapping({m!r}, {scale!r}, {direct!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_driver_kernel_parameters_are_pointers_and_ints():
    with pytest.raises(ValueError, match="pointer"):
        launch.DriverKernel(0, "ppf")


def _stand_in_driver(monkeypatch, params: str = "pipp" + "ip", answers: list[int] | None = None,
                     **functions) -> list:
    """A driver whose cuLaunchKernel records (its scalar arguments, the values the parameter array points at) for
    a kernel of these parameters (by default the direct launches' below, scratch pointer last), returning success,
    or the codes in `answers` one launch at a time; `functions`: the driver's other functions. No GPU needed."""
    seen = []

    def fake_launch(handle, gx, gy, gz, bx, by, bz, shared, stream, params_array, extra):
        slots = ctypes.cast(params_array, ctypes.POINTER(ctypes.c_void_p))
        values = [ctypes.cast(slots[j], ctypes.POINTER(ctypes.c_uint64 if k == "p" else ctypes.c_int32))[0]
                  for j, k in enumerate(params)]
        seen.append(((handle, gx, gy, gz, bx, by, bz, shared, stream, extra), values))
        return answers.pop(0) if answers is not None else 0

    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7, *[ctypes.c_void_p] * 3)
    driver = types.SimpleNamespace(cuLaunchKernel=proto(fake_launch), **functions)
    monkeypatch.setattr(launch, "_driver", lambda: driver)
    return seen


def test_a_direct_launch_hands_the_driver_each_argument_in_its_parameter_slot(monkeypatch):
    """What cuLaunchKernel receives (read back by a stand-in driver, no GPU needed): the grid, block, shared bytes
    and stream as given, and a parameter array whose slots point at the call's pointers (a tensor's data_ptr, then
    the null scratch pointers Triton appends) and 32-bit ints, in the kernel's parameter order, call after call."""
    seen = _stand_in_driver(monkeypatch)
    # args as a kernel's call gives them: two tensors, ints (one the specialization dropped), a third tensor
    direct = launch._TritonDirect(launch.DriverKernel(7, "pipp" + "ip"), (128, 1, 1), 4096, (0, 3, 4), (1, 5), 1)
    for n in (3, 5):
        a, b, c = torch.empty(n), torch.empty(2 * n), torch.empty(1)
        direct((4, 2, 1), 99, (a, -n, 1, b, c, 1 << 30))
        assert seen[-1] == ((7, 4, 2, 1, 128, 1, 1, 4096, 99, None),
                            [a.data_ptr(), -n, b.data_ptr(), c.data_ptr(), 1 << 30, 0])


def test_a_fixed_launch_hands_the_driver_its_arguments_with_the_passed_pointers_in_their_slots(monkeypatch):
    """DriverKernel.fixed (through _TritonDirect.fixed, read back by a stand-in driver): each call hands the
    driver the fixed grid, block, shared bytes, stream and arguments, with the pointers it passes in the slots of
    the arguments named varying, call after call; other slots keep what the first call had. A varying argument
    that is not a pointer parameter has no fixed launch."""
    seen = _stand_in_driver(monkeypatch)
    direct = launch._TritonDirect(launch.DriverKernel(7, "pipp" + "ip"), (128, 1, 1), 4096, (0, 3, 4), (1, 5), 1)
    a, b, c = torch.empty(3), torch.empty(6), torch.empty(1)
    assert direct.fixed((4, 2, 1), 99, (a, -3, 1, b, c, 1 << 30), (1,)) is None  # args[1] is an int
    run = direct.fixed((4, 2, 1), 99, (a, -3, 1, b, c, 1 << 30), (4, 0))
    for n in (5, 2):
        x, y = torch.empty(n), torch.empty(2 * n)
        run(y.data_ptr(), x.data_ptr())
        assert seen[-1] == ((7, 4, 2, 1, 128, 1, 1, 4096, 99, None),
                            [x.data_ptr(), -3, b.data_ptr(), y.data_ptr(), 1 << 30, 0])
    assert len(seen) == 2


@pytest.mark.parametrize("how", ["call", "fixed"])
def test_a_launch_without_a_current_context_makes_the_devices_primary_one_current_and_launches_again(how,
                                                                                                     monkeypatch):
    """A thread whose first CUDA work is a direct launch has no current context (the driver answers 201,
    CUDA_ERROR_INVALID_CONTEXT): the current device's primary context is made current and the launch made again,
    once; a launch failing otherwise, or again, raises the driver's message (a stand-in driver, no GPU needed)."""
    answers, contexts = [], []

    def retain(context, device):
        ctypes.cast(context, ctypes.POINTER(ctypes.c_void_p))[0] = 0x5A
        return 0

    _stand_in_driver(
        monkeypatch, "pi", answers, cuDeviceGet=lambda handle, index: contexts.append(("get", index)) or 0,
        cuDevicePrimaryCtxRetain=lambda context, device: contexts.append("retain") or retain(context, device),
        cuCtxSetCurrent=lambda context: contexts.append(("current", context.value)) or 0,
        cuDevicePrimaryCtxRelease_v2=lambda device: contexts.append("release") or 0,
        cuGetErrorString=lambda err, msg: 0)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 3, raising=False)
    kernel = launch.DriverKernel(7, "pi")
    start = (kernel.fixed((1, 1, 1), (32, 1, 1), 0, 0, [0], [5], [0]) if how == "fixed"
             else lambda ptr: kernel((1, 1, 1), (32, 1, 1), 0, 0, [ptr], [5]))
    answers[:] = [201, 0]
    start(16)
    assert not answers and contexts == [("get", 3), "retain", ("current", 0x5A), "release"]
    answers[:] = [0]
    start(16)  # now current: one launch
    assert not answers and len(contexts) == 4
    for failing in ([201, 201], [700]):  # still no context; another error
        answers[:] = failing
        with pytest.raises(RuntimeError, match="cuLaunchKernel failed"):
            start(16)


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("biases", [(False, False, False), (True, False), (True, True, True)])
def test_the_cuda_gemms_runs_hand_the_driver_each_calls_pointers_in_their_slots(planned, biases, monkeypatch):
    """What the CUDA GEMM's runs (one layer, and a group of two or three) hand cuLaunchKernel, read back by a
    stand-in driver with the CUDA runtime's queries stubbed (no GPU needed): the weights' pointers, then the
    call's activation, outputs and scale, sx in place of a missing bias, in the kernels' parameter order, call
    after call: the general launch, and a plan's launch fixed after its first call."""
    for name, value in (("_cuda_getCurrentRawStream", lambda device: 0), ("_cuda_getDevice", lambda: 0),
                        ("_cuda_isCurrentStreamCapturing", lambda: False)):
        monkeypatch.setattr(torch._C, name, value, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    k, m, ns = 256, 2, (64, 16, 32)[: len(biases)]
    weights = [(torch.zeros(n, k // 2, dtype=torch.uint8), torch.zeros(n, k // 16, dtype=torch.uint8), torch.ones(1))
               for n in ns]
    bs = [torch.ones(n) if b else None for n, b in zip(ns, biases)]

    def gemm_launch(params):
        return cuda_gemm._Launch(launch.DriverKernel(0, params), 0, (4, 1, 1), (128, 1, 1), 0, 1, 32)

    seen = _stand_in_driver(monkeypatch, "p" * 7 + "i" * 5)
    codes, scales, sw = weights[0]
    one = cuda_gemm._single_run(gemm_launch("p" * 7 + "i" * 5), codes, scales, sw, bs[0], (m,), torch.bfloat16, True,
                                planned=planned)
    for _ in range(3):
        a, sx = torch.randn(m, k), torch.rand(m, 1)
        y = one(a, sx)
        assert seen[-1][1] == [codes.data_ptr(), scales.data_ptr(), a.data_ptr(), y.data_ptr(), sx.data_ptr(),
                               sw.data_ptr(), (bs[0] if biases[0] else sx).data_ptr(), m, ns[0], k, k, 32]
    seen = _stand_in_driver(monkeypatch, "p" * 17 + "i" * 9)
    plan = cuda_gemm._GroupLaunch(gemm_launch("p" * 17 + "i" * 9), tuple(n // 16 for n in ns))
    group = cuda_gemm._group_run(plan, weights, bs, (m,), torch.bfloat16, True, planned=planned)
    pad = [0] * (cuda_gemm.GROUP_MAX - len(ns))
    for _ in range(3):
        a, sx = torch.randn(m, k), torch.rand(m, 1)
        ys = group(a, sx)
        assert seen[-1][1][:17] == ([w[0].data_ptr() for w in weights] + pad + [w[1].data_ptr() for w in weights]
                                    + pad + [y.data_ptr() for y in ys] + pad + [w[2].data_ptr() for w in weights]
                                    + pad + [(b if b is not None else sx).data_ptr() for b in bs] + pad
                                    + [a.data_ptr(), sx.data_ptr()])
        assert seen[-1][1][17:20] == [m, k, k]


def _expected(partials, sx, sw, bias, out_dtype):
    y = partials.sum(0) * (sx.reshape(-1, 1) * sw.reshape(1, -1))
    return (y + bias.float() if bias is not None else y).to(out_dtype)


@cuda
@pytest.mark.parametrize("offset", [0, 1])  # 1: partials 4 bytes off 16-byte alignment, another specialization
def test_direct_launches_compute_what_triton_launches_compute(offset):
    g = torch.Generator(device="cuda").manual_seed(1234 + offset)
    before = {k for k in launch._compiled if k[0] is _epilogue_kernel}
    for call in range(3):  # the first call compiles (Triton's path), the later ones launch directly
        flat = torch.randn(3 * 5 * 300 + offset, device="cuda", generator=g)
        partials = flat[offset:].view(3, 5, 300)
        sx, sw = torch.rand(5, 1, device="cuda", generator=g) + 0.5, torch.rand(1, device="cuda", generator=g)
        bias = torch.randn(300, device="cuda", generator=g, dtype=torch.bfloat16)
        y = reduce_scale_and_bias(partials, sx, sw, bias, torch.float32)
        torch.testing.assert_close(y, _expected(partials, sx, sw, bias, torch.float32), rtol=2e-6, atol=1e-6)
    mine = {k for k in launch._compiled if k[0] is _epilogue_kernel} - before
    assert len(mine) == 1 and (torch.float32, offset == 0) in next(iter(mine))


def _bound_epilogue_args(g, device):
    y = torch.randn(7, 300, device=device, generator=g)
    sx, sw = torch.rand(7, 1, device=device, generator=g) + 0.5, torch.rand(1, device=device, generator=g)
    bias = torch.randn(300, device=device, generator=g)
    return (y, y.clone(), sx, sw, bias, 7, 300, 0, 300, 300), _expected(y[None], sx, sw, bias, torch.float32)


def test_a_bound_launch_computes_what_triton_computes_and_an_unbound_one_never_binds():
    """On every device (the interpreter here): a TritonLaunch is launch_triton as a callable of the arguments."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(7)
    flags = launch.Constexprs(SPLITS=1, SX_PER_ROW=True, SW_PER_COL=False, HAS_BIAS=True, BM=32, BN=256, num_warps=4)
    for bound in (False, True):
        run = launch.TritonLaunch(_epilogue_kernel, (1, 2), flags, bound=bound)
        for _ in range(3):
            args, want = _bound_epilogue_args(g, device)
            run(args)
            torch.testing.assert_close(args[1], want, rtol=2e-6, atol=1e-6)
        assert run._direct is False or (bound and device == "cuda")


@cuda
def test_a_fresh_threads_first_cuda_work_may_be_a_direct_launch():
    """A thread that has made no CUDA call has no current context; a resolved launch (straight to the driver) as
    its first CUDA work still runs, and computes what it computes in the main thread."""
    g = torch.Generator(device="cuda").manual_seed(9)
    flags = launch.Constexprs(SPLITS=1, SX_PER_ROW=True, SW_PER_COL=False, HAS_BIAS=True, BM=32, BN=256, num_warps=4)
    run = launch.TritonLaunch(_epilogue_kernel, (1, 2), flags, bound=True)
    run(_bound_epilogue_args(g, "cuda")[0])  # resolved
    args, want = _bound_epilogue_args(g, "cuda")
    torch.cuda.synchronize()
    failed = []

    def first_work():
        try:
            run(args)
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)

    worker = threading.Thread(target=first_work)
    worker.start()
    worker.join()
    assert not failed and isinstance(run._direct, launch._TritonDirect)
    torch.cuda.synchronize()
    torch.testing.assert_close(args[1], want, rtol=2e-6, atol=1e-6)


@cuda
def test_a_bound_launch_goes_to_the_driver_once_resolved_and_steps_aside_for_a_hook(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(8)
    flags = launch.Constexprs(SPLITS=1, SX_PER_ROW=True, SW_PER_COL=False, HAS_BIAS=True, BM=32, BN=256, num_warps=4)
    run = launch.TritonLaunch(_epilogue_kernel, (1, 2), flags, bound=True)
    args, want = _bound_epilogue_args(g, "cuda")
    run(args)
    assert isinstance(run._direct, launch._TritonDirect)  # resolved by its first call
    calls = []
    monkeypatch.setattr(launch, "launch_triton", lambda *a: calls.append(a))
    for hooked in (False, True):
        if hooked and launch._RUNTIME is not None:
            monkeypatch.setattr(launch._RUNTIME, "launch_enter_hook", lambda *a: None)
        args, want = _bound_epilogue_args(g, "cuda")
        run(args)
        if not hooked:  # straight to the driver: launch_triton is not called, the output is written
            torch.testing.assert_close(args[1], want, rtol=2e-6, atol=1e-6)
    assert len(calls) == (1 if launch._RUNTIME is not None else 0)


@cuda
@pytest.mark.skipif(not cuda_gemm.available(), reason="needs torch.cuda._compile_kernel")
def test_the_cuda_gemm_launched_from_several_threads_gives_each_its_own_product():
    g = torch.Generator().manual_seed(99)
    n, k = 512, 1024
    codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
    scales = torch.randint(0x20, 0x50, (n, k // 32), generator=g, dtype=torch.uint8).cuda()
    xs = [torch.randn(m, k, generator=g).to(torch.bfloat16).cuda() for m in (1, 2, 5, 8, 1, 3, 7, 4)]
    sx, sw = torch.ones(1, device="cuda"), torch.ones(1, device="cuda")
    alone = [cuda_gemm.nvfp4_mma(x, codes, scales, 32, sx, sw, None, torch.float32) for x in xs]
    torch.cuda.synchronize()
    together: list = [None] * len(xs)

    def work(i):
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(20):
                together[i] = cuda_gemm.nvfp4_mma(xs[i], codes, scales, 32, sx, sw, None, torch.float32)
            torch.cuda.current_stream().synchronize()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_plan_buffers_are_made_once_a_stream_and_only_while_small():
    """A plan's scratch tensors: the same ones call after call (on one stream), made at the first call; above
    PLAN_BUFFER_BYTES made anew every call."""
    made = []

    def make():
        made.append(torch.empty(4))
        return made[-1]

    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    get = launch.plan_buffers(make, 16, device)
    assert not made
    assert get() is get() is made[0] and len(made) == 1
    big = launch.plan_buffers(make, launch.PLAN_BUFFER_BYTES + 1, device)
    assert big() is not big() and len(made) == 3


def test_plan_buffers_keep_nothing_while_make_gives_none():
    """A `make` giving None (nothing to keep now, as an amax state inside a CUDA-graph capture) is asked again at
    the next call, and what it then makes is kept."""
    answers = [None, None, torch.empty(4)]
    get = launch.plan_buffers(lambda: answers.pop(0), 16, torch.cuda.current_device() if torch.cuda.is_available()
                              else 0)
    assert get() is None and get() is None
    kept = get()
    assert kept is not None and get() is kept and not answers


def test_plan_buffers_keep_up_to_the_devices_budget_while_their_plans_live(monkeypatch):
    """The plans alive on a device keep at most PLAN_BUFFER_BUDGET bytes in all; beyond it a plan makes its tensors
    each call, and a plan that is gone gives its share back."""
    import gc

    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    before = launch._kept_bytes.get(device, 0)
    monkeypatch.setattr(launch, "PLAN_BUFFER_BUDGET", before + 100)
    first = launch.plan_buffers(lambda: torch.empty(4), 60, device)
    assert first() is first() and launch._kept_bytes[device] == before + 60
    second = launch.plan_buffers(lambda: torch.empty(4), 60, device)
    assert second() is not second()  # over the budget: made anew each call
    del first
    gc.collect()
    assert launch._kept_bytes[device] == before
    third = launch.plan_buffers(lambda: torch.empty(4), 60, device)
    assert third() is third() and launch._kept_bytes[device] == before + 60


@cuda
def test_plan_buffers_give_each_stream_its_own_tensors():
    """Calls on another stream are not ordered after this stream's kernels, so they get tensors of their own."""
    get = launch.plan_buffers(lambda: torch.empty(4, device="cuda"), 16, torch.cuda.current_device())
    here = get()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        there = get()
        assert get() is there
    assert there is not here and get() is here
