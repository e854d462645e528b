"""The kernels as built for a GPU, checked on this CPU machine in fresh processes without TRITON_INTERPRET: every
variant compiles for Hopper (sm_90) with Triton's bundled ptxas — the GPU build (inline PTX, native bf16
conversions) is not what the interpreter runs, so this is where CI sees its compile errors — and CPU tensors get a
clear error."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sharq.kernels import epilogue, gemm, prepare

def build(fn, args, const):
    sig = dict(args, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(args) if name != "M"}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))

args = [("x_ptr", "*bf16"), ("amax_ptr", "*i32"), ("scale_ptr", "*fp32"), ("out_ptr", "*bf16"), ("M", "i32"),
        ("K", "i32"), ("stride_xm", "i32"), ("stride_om", "i32"), ("codes1_ptr", "*u8"), ("scales1_ptr", "*u8"),
        ("idx_ptr", "*u8"), ("codes2_ptr", "*u8"), ("scales2_ptr", "*u8"), ("Kp1", "i32"), ("Kp2", "i32"),
        ("idx_bytes", "i32")]
for mask, packed, per_row, fmt, self_amax in itertools.product((0, 1, 2), (False, True), (False, True), (0, 1),
                                                              (False, True)):
    build(prepare._prepare_kernel, args, dict(
        PER_ROW=per_row, TENSOR_SCALE=fmt == 0, ROUND_INPUT=fmt == 1, MASK1=mask, BLOCK1=32 if mask == 2 else 16,
        TWO_STAGES=True, BLOCK2=16 if fmt == 0 else 32, FMT=fmt, BM=8, H=8, PACKED=packed,
        SELF_AMAX=self_amax and fmt == 0, AMAX_BM=8, AMAX_BK=512, KC=4096 if self_amax else 0,
        PDL=prepare._launch_dependents is not None and mask == 1,
        TILE=(64 if per_row else 128) if self_amax and not packed else 0, TILE_PLACED=fmt == 0))  # tiled values
for x_type in ("*fp32", "*fp16"):  # the amax's fp32 path (bf16 X takes its 16 bits), both passes
    build(prepare._prepare_kernel, [(n, x_type if n == "x_ptr" else t) for n, t in args], dict(
        PER_ROW=False, TENSOR_SCALE=True, ROUND_INPUT=True, MASK1=1, BLOCK1=16, TWO_STAGES=True, BLOCK2=16, FMT=0,
        BM=8, H=8, PACKED=False, SELF_AMAX=True, AMAX_BM=8, AMAX_BK=512, KC=3000, PDL=False, TILE=0,
        TILE_PLACED=False))
for x_type, per_row in itertools.product(("*bf16", "*fp32"), (False, True)):
    build(prepare._amax_kernel, [("x_ptr", x_type), ("amax_ptr", "*i32"), ("M", "i32"), ("K", "i32"),
                                 ("stride_xm", "i32")], dict(PER_ROW=per_row, BM=8, BK=512))
for ty, per_row, bias, splits in itertools.product(("*bf16", "*fp32"), (False, True), (False, True), (1, 4)):
    build(epilogue._epilogue_kernel, [("src_ptr", "*fp32" if splits > 1 else ty), ("y_ptr", ty), ("sx_ptr", "*fp32"),
                                      ("sw_ptr", "*fp32"), ("bias_ptr", "*bf16"), ("M", "i32"), ("N", "i32"),
                                      ("stride_split", "i32"), ("stride_sm", "i32"), ("stride_ym", "i32")],
          dict(SPLITS=splits, SX_PER_ROW=per_row, SW_PER_COL=False, HAS_BIAS=bias, BM=32, BN=256))
for ty, per_row, bias in itertools.product(("*bf16", "*fp32"), (False, True), (False, True)):
    build(epilogue._group_epilogue_kernel, [*[(f"src{i}", "*fp32") for i in range(3)],
                                            *[(f"y{i}", ty) for i in range(3)], ("sx_ptr", "*fp32"),
                                            *[(f"sw{i}", "*fp32") for i in range(3)],
                                            *[(f"bias{i}", "*bf16") for i in range(3)], ("M", "i32"),
                                            ("N0", "i32"), ("N1", "i32"), ("N2", "i32")],
          dict(SPLITS=4, SX_PER_ROW=per_row, SW_PER_COL=False, HAS_BIAS=bias, BM=32, BN=256))
gemm_args = [("a_ptr", "*bf16"), ("codes_ptr", "*u8"), ("scales_ptr", "*u8"), ("y_ptr", "*bf16"), ("sx_ptr", "*fp32"),
             ("sw_ptr", "*fp32"), ("bias_ptr", "*bf16"), ("M", "i32"), ("N", "i32"), ("K", "i32"), ("Kp", "i32"),
             ("stride_am", "i32"), ("stride_split", "i32"), ("stride_ym", "i32"), ("k_per_split", "i32")]
for fmt, block, split, bm in itertools.product((0, 1), (16, 32), (False, True), (16, 64)):
    args = [(n, "*fp32" if n == "y_ptr" and split else t) for n, t in gemm_args]
    build(gemm._packed_mm_kernel, args, dict(BLOCK=block, FMT=fmt, SPLIT=split, SX_PER_ROW=bm == 16,
                                             HAS_BIAS=True, BN=128, BM=bm, BK=128))
for fmt, block, split in itertools.product((0, 1), (16, 32), (False, True)):
    args = [(n, "*fp32" if n == "y_ptr" and split else t) for n, t in gemm_args]
    build(gemm._packed_gemv_kernel, args, dict(BLOCK=block, FMT=fmt, SPLIT=split, SX_PER_ROW=split,
                                               HAS_BIAS=True, BN=32, BK=256))
build(gemm._dequantize_kernel, [("codes_ptr", "*u8"), ("scales_ptr", "*u8"), ("w_ptr", "*bf16"), ("N", "i32"),
                                ("K", "i32"), ("Kp", "i32")], dict(BLOCK=32, FMT=0, BN=32, BK=256))
print("compiled")
"""


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_cpu_tensors_outside_the_interpreter_get_a_clear_error():
    """Without CUDA and without the interpreter, the kernels refuse CPU tensors with a message that says what to
    use instead (not a Triton driver error)."""
    script = r"""
import torch, sharq
from sharq.kernels.epilogue import scale_and_bias_
from sharq.kernels.prepare import prepare_dequantized
for call in (lambda: prepare_dequantized(torch.randn(2, 32), sharq.get_recipe("sharq")),
             lambda: scale_and_bias_(torch.randn(2, 8), torch.ones(1, 1), torch.ones(()))):
    try:
        call()
    except ValueError as e:
        print("ValueError:", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("ValueError:")]
    assert len(lines) == 2, done.stdout + done.stderr[-2000:]
    assert "backend='reference'" in lines[0] and "CUDA" in lines[1]
