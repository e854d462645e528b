"""α·(a·Ŵᵀ) + bias in one cuBLASLt call, α = s_x·s_w read from device memory: the product of the scratch path
(kernels/gemm.py's decode + cuBLAS, above the CUDA kernels' tokens) without a pass of its own for α and the bias.

torch's matmuls take α only as a host number, and s_x is found on the GPU per call, so that path multiplied in
bf16 and ran an epilogue kernel over the output afterwards (kernels/epilogue.py): one more read and write of y
(on an H100 at 2048 tokens 11-91 µs of a 138-809 µs layer, docs/PERF.md twenty-sixth run), and y rounded twice.
cuBLASLt takes α by device pointer (CUBLASLT_POINTER_MODE_DEVICE) and adds a bias vector in its epilogue
(CUBLASLT_EPILOGUE_BIAS), so y = α·acc + bias is rounded once, as the CUDA GEMM kernels round it. The library is
the one torch itself loaded (found among the process's mapped files), called through ctypes; where it is not
there, or a call is one it does not take (α per token, a bias of another dtype than y, an fp16 y, for which
cuBLASLt has no product of bf16 operands), the caller keeps the epilogue. Enum values and the heuristic result's
layout are cublasLt.h's (CUDA 12 and 13)."""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .common import INTERPRETED

_DTYPE = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 14}  # cudaDataType
_COMPUTE_32F = 68  # cublasComputeType_t
_DESC_POINTER_MODE, _DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER, _DESC_BIAS_DATA_TYPE = (
    2, 3, 4, 7, 8, 26)  # cublasLtMatmulDescAttributes_t
_POINTER_MODE_DEVICE, _OP_N, _OP_T, _EPILOGUE_DEFAULT, _EPILOGUE_BIAS = 1, 0, 1, 1, 4
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t; the alignments are 5-8 (A, B, C, D)
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)
ALIGNMENT = 16  # bytes every operand's address must be a multiple of (asked of the heuristic)


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """torch's cuBLASLt, or None (no CUDA, not Linux, or not loaded)."""
    if INTERPRETED or not torch.cuda.is_available():
        return None
    path = _mapped("libcublasLt.so")
    if path is None:  # torch loads cuBLAS at its first matmul
        torch.mm(torch.ones(1, 1, device="cuda"), torch.ones(1, 1, device="cuda"))
        path = _mapped("libcublasLt.so")
    if path is None:
        return None
    try:
        return _bind(ctypes.CDLL(path))
    except (OSError, AttributeError):  # not a cuBLASLt with these functions
        return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with the argument and result types of the functions called here."""
    p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    pp = ctypes.POINTER(p)
    for name, args in {"cublasLtCreate": [pp], "cublasLtMatmulDescCreate": [pp, i, i],
                       "cublasLtMatmulDescSetAttribute": [p, i, p, z],
                       "cublasLtMatrixLayoutCreate": [pp, i, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
                       "cublasLtMatmulPreferenceCreate": [pp], "cublasLtMatmulPreferenceSetAttribute": [p, i, p, z],
                       "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i,
                                                          ctypes.POINTER(_HeuristicResult), ctypes.POINTER(i)],
                       "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, z, p],
                       "cublasLtMatmulDescDestroy": [p], "cublasLtMatrixLayoutDestroy": [p],
                       "cublasLtMatmulPreferenceDestroy": [p]}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _mapped(name: str) -> str | None:
    """The path of a library of this name the process has loaded (Linux), else None."""
    try:
        with open("/proc/self/maps") as maps:
            return next((line.split()[-1] for line in maps if name in line), None)
    except OSError:
        return None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@functools.cache
def _handle(device: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(_library().cublasLtCreate(ctypes.byref(handle)), "create")
    return handle


def _set(fn, obj: ctypes.c_void_p, attr: int, value: ctypes._SimpleCData) -> None:
    _check(fn(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


class ScaledMatmul:
    """y [M, N] = α·(a [M, K] · w [N, K]ᵀ) + bias for one shape, out dtype and bias dtype on one device: the
    descriptors and the algorithm worked out once; a call sets the bias pointer, multiplies s_x·s_w into a fresh
    α and makes one cublasLtMatmul on the current stream (no workspace: calls on several streams share nothing)."""

    def __init__(self, m: int, n: int, k: int, out_dtype: torch.dtype, bias: bool, device: int):
        self.lib = lib = _library()
        self.device, self.bias = device, bias
        self.lock = threading.Lock()  # the bias pointer is the descriptor's: set and used under it
        self.desc, layouts, pref = ctypes.c_void_p(), [ctypes.c_void_p() for _ in range(3)], ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _DTYPE[torch.float32]), "desc")
        for attr, value in ((_DESC_POINTER_MODE, _POINTER_MODE_DEVICE), (_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N),
                            (_DESC_EPILOGUE, _EPILOGUE_BIAS if bias else _EPILOGUE_DEFAULT)):
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, attr, ctypes.c_int32(value))
        if bias:
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_DATA_TYPE,
                 ctypes.c_int32(_DTYPE[out_dtype]))
        # column-major: yᵀ [N, M] = (w as [K, N])ᵀ · (a as [K, M]), every leading dimension the row length
        for layout, (dtype, rows, cols) in zip(layouts, ((torch.bfloat16, k, n), (torch.bfloat16, k, m),
                                                         (out_dtype, n, m))):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _DTYPE[dtype], rows, cols, rows), "layout")
        self.w_desc, self.a_desc, self.y_desc = layouts
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(0))
        for attr in _PREF_MIN_ALIGNMENT:
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr, ctypes.c_uint32(ALIGNMENT))
        result, found = _HeuristicResult(), ctypes.c_int(0)
        try:
            with torch.cuda.device(device):
                _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(device), self.desc, self.w_desc, self.a_desc,
                                                          self.y_desc, self.y_desc, pref, 1, ctypes.byref(result),
                                                          ctypes.byref(found)), "heuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        if found.value < 1 or result.state != 0:
            raise RuntimeError("cuBLASLt has no algorithm for this product")
        self.algo, self.zero = result, torch.zeros(1, device=torch.device("cuda", device))

    def __del__(self) -> None:
        for layout in (getattr(self, name, None) for name in ("w_desc", "a_desc", "y_desc")):
            if layout:
                self.lib.cublasLtMatrixLayoutDestroy(layout)
        if self.desc:
            self.lib.cublasLtMatmulDescDestroy(self.desc)

    def __call__(self, a: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        if self.device != torch.cuda.current_device():  # a model spread over GPUs: launch in this one's context
            with torch.cuda.device(self.device):
                return self(a, w, sx, sw, bias, out)
        lib = self.lib
        alpha = torch.mul(sx.reshape(1), sw.reshape(1))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with self.lock:
            if self.bias:
                _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_POINTER,
                     ctypes.c_void_p(bias.data_ptr()))
            _check(lib.cublasLtMatmul(_handle(self.device), self.desc, alpha.data_ptr(), w.data_ptr(), self.w_desc,
                                      a.data_ptr(), self.a_desc, self.zero.data_ptr(), out.data_ptr(), self.y_desc,
                                      out.data_ptr(), self.y_desc, ctypes.byref(self.algo.algo), None, 0, stream),
                   "matmul")
        return out


_PRODUCTS: dict[tuple, ScaledMatmul | None] = {}  # by shape, out dtype, bias, device; None: cuBLASLt has none
_MAX_PRODUCTS = 256


def _matmul(m: int, n: int, k: int, out_dtype: torch.dtype, bias: bool, device: int) -> ScaledMatmul | None:
    """The product for this shape, made outside CUDA graph captures only (its β = 0 is written by a kernel, which a
    capture would only record): during a capture a shape not made yet gets None (the epilogue path) this once."""
    key = (m, n, k, out_dtype, bias, device)
    if key not in _PRODUCTS:
        if torch.cuda.is_current_stream_capturing():
            return None
        if len(_PRODUCTS) >= _MAX_PRODUCTS:  # prefill makes one per prompt length: keep the memory bounded
            _PRODUCTS.clear()
        try:
            _PRODUCTS[key] = ScaledMatmul(m, n, k, out_dtype, bias, device)
        except (RuntimeError, OSError, AttributeError):
            _PRODUCTS[key] = None
    return _PRODUCTS[key]


def scaled_matmul(m: int, n: int, k: int, out_dtype: torch.dtype, sx_rows: bool, bias: torch.Tensor | None,
                  device: torch.device) -> ScaledMatmul | None:
    """The fused product for a bf16 [m, k] activation and a bf16 [n, k] weight on `device`, or None where it does
    not apply: no cuBLASLt here, α per token (`sx_rows`), a bias of another dtype than the output or not aligned,
    or no algorithm for the shape and output dtype (fp16: on an H100 the heuristic finds none). The operands'
    addresses must be ALIGNMENT-byte aligned and their rows contiguous (the scratch weight and fresh tensors are)."""
    if sx_rows or out_dtype not in _DTYPE or device.type != "cuda" or _library() is None:
        return None
    if bias is not None and (bias.dtype != out_dtype or bias.data_ptr() % ALIGNMENT or not bias.is_contiguous()):
        return None
    return _matmul(m, n, k, out_dtype, bias is not None, device.index if device.index is not None else
                   torch.cuda.current_device())
