"""CUDA sources compiled without a GPU: NVRTC from NVIDIA's `nvidia-cuda-nvrtc` package (the test extra), so CPU CI
checks that every launch of the CUDA GEMM compiles and what it costs in registers, and `benchmarks/kernel_sass.py`
reads its machine code. On a GPU the kernels are compiled through PyTorch (`torch.cuda._compile_kernel`) instead;
the source is the same."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@functools.cache
def _nvidia_file(pattern: str) -> Path | None:
    """The first file matching `pattern` under the installed `nvidia` packages (NVRTC, nvdisasm), or None."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for path in sorted(Path(root).glob(pattern)):
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = _nvidia_file("**/libnvrtc.so*")
    return None if path is None else ctypes.CDLL(str(path))


def available() -> bool:
    """Whether NVRTC is installed (pip install nvidia-cuda-nvrtc)."""
    return _library() is not None


def nvdisasm() -> Path | None:
    """NVIDIA's disassembler from the `nvidia-cuda-nvdisasm` package, or None."""
    return _nvidia_file("**/bin/nvdisasm")


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    registers: int  # a thread
    spilled: int  # bytes of local memory a thread uses: its stack frame, spills alone for a kernel without arrays
    log: str  # NVRTC's log (ptxas' report where this NVRTC gives one)


def compile_cubin(source: str, arch: str = "sm_90", name: str = "kernel.cu") -> Compiled:
    """`source` compiled by NVRTC for `arch` (C++17), with ptxas' resource report; a RuntimeError carries the
    compiler's log where it does not compile."""
    lib = _library()
    if lib is None:
        raise RuntimeError("NVRTC is not installed: pip install nvidia-cuda-nvrtc")
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, log))
        text = log.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"NVRTC could not compile {name} for {arch}:\n{text[-3000:]}")
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    resources = _resources(cubin.raw)
    return Compiled(cubin.raw, resources.get(_REGCOUNT, 0), resources.get(_FRAME_SIZE, 0), text)


_REGCOUNT, _FRAME_SIZE = 0x2F, 0x11  # attributes of the cubin's .nv.info section: registers, stack frame bytes


def _resources(cubin: bytes) -> dict[int, int]:
    """The (one) kernel's resource attributes from the cubin's `.nv.info` section, read from the ELF itself: the
    log's ptxas report is not given by every NVRTC build (one on an H200 machine gave an empty log). Records are
    (format, attribute, size, value); format 4 carries `size` bytes, here (symbol, value) as two u32."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    strings = headers[names][4]
    found: dict[int, int] = {}
    for name, _, _, _, offset, size, *_ in headers:
        if cubin[strings + name:cubin.index(b"\0", strings + name)] != b".nv.info":
            continue
        i = offset
        while i < offset + size:
            fmt, attribute = cubin[i], cubin[i + 1]
            if fmt == 4:
                length, = struct.unpack_from("<H", cubin, i + 2)
                if attribute in (_REGCOUNT, _FRAME_SIZE) and length == 8:
                    found[attribute] = struct.unpack_from("<I", cubin, i + 8)[0]
                i += 4 + length
            else:
                i += 2 if fmt == 1 else 4
    return found


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {lib.nvrtcGetErrorString(status).decode()}")


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> list[str]:
    """The SASS of a cubin, a line each (nvdisasm)."""
    tool = nvdisasm()
    if tool is None:
        raise RuntimeError("nvdisasm is not installed: pip install nvidia-cuda-nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-c", f.name], check=True, capture_output=True, text=True).stdout.splitlines()


def main_loop(sass: list[str], marker: str = "HMMA", exclude: str | None = None) -> list[str]:
    """The opcodes (without modifiers) of the loop, a backward branch's range, with the most `marker`
    instructions (and no `exclude` instruction, where given: one warp role's loop of a warp-specialized kernel):
    a GEMM's main loop."""
    labels: dict[str, int] = {}
    best: list[str] = []
    for i, line in enumerate(sass):
        if label := _LABEL.match(line.strip()):
            labels[label.group(1)] = i
        elif (branch := _BRANCH.search(line)) and branch.group(1) in labels:
            body = [op.group(1) for x in sass[labels[branch.group(1)]:i + 1] if (op := _INSTRUCTION.search(x))]
            if body.count(marker) > best.count(marker) and (exclude is None or exclude not in body):
                best = body
    return best


def weights_per_loop(loop: list[str], marker: str, per_chunk: int, rows: int) -> float:
    """The weights a warp's pass through a GEMM main loop (`main_loop`) streams: its `marker` MMAs, `per_chunk` of them
    for each 128-element chunk of the warp's `rows` weight rows. Its instructions over this: instructions a weight."""
    return loop.count(marker) / per_chunk * 128 * rows
