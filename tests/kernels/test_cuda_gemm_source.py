"""The CUDA kernels' sources (kernels/cuda_gemm.py, kernels/cuda_wgmma.py, kernels/cuda_dequantize.py) compiled
on the CPU by NVRTC (kernels/nvrtc.py), for every launch the packed backend makes: a kernel change that does not
compile, or that spills where it did not, fails here rather than on the first GPU it meets. Needs NVRTC (the
nvidia-cuda-nvrtc package of the test extra), not a GPU."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sharq
from sharq.kernels import cuda_dequantize, cuda_gemm, cuda_wgmma, nvrtc

pytestmark = pytest.mark.skipif(not nvrtc.available(), reason="needs NVRTC (pip install nvidia-cuda-nvrtc)")
needs_nvdisasm = pytest.mark.skipif(nvrtc.nvdisasm() is None, reason="needs nvdisasm (pip install nvidia-cuda-nvdisasm)")

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),  # Llama-3.1-8B (K, N)
          (8192, 10240), (8192, 8192), (8192, 28672), (28672, 8192),  # Llama-3.1-70B
          (8192, 512), (16384, 256)]  # few rows: K split over blocks too
MS = [1, 4, 8, 9, 16, 17, 32, 33, 64]


@pytest.mark.parametrize("k,n", SHAPES)
def test_every_launch_the_backend_makes_compiles(k, n, monkeypatch):
    """choose_tile's launch at each M on this shape (an H200's 132 multiprocessors), with 32-element blocks into
    bf16 and 16-element blocks into fp16 with a bf16 bias and per-token scales, compiles for Hopper; up to 8
    tokens (batch-1 decode, where each warp needs its registers for loads in flight) it does not spill."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    done = set()
    for m in MS:
        t = cuda_gemm.choose_tile(m, n, k, None)
        for block, out, bias, per_token in [(32, torch.bfloat16, None, False),
                                            (16, torch.float16, torch.bfloat16, True)]:
            source = cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), block, cuda_gemm._OUT[out],
                                             cuda_gemm._BIAS[bias], per_token)
            if source in done:
                continue
            done.add(source)
            built = nvrtc.compile_cubin(source, "sm_90")
            assert 0 < built.registers <= 255 and built.cubin
            if m <= 8:
                assert built.spilled == 0, (m, t, block, built.registers, built.spilled)


@pytest.mark.parametrize("k,n", SHAPES)
def test_every_folded_launch_compiles_without_spills(k, n, monkeypatch):
    """The launches that prepare their activation themselves (kernels/cuda_activation.py), one layer's and a
    group's, at the decode sizes they take: the sharq recipe on every shape, the other cascades (one stage, no
    mask, dense-dense) on the first."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    names = ["sharq", "nvfp4", "sparse-only", "dense-dense"] if (k, n) == SHAPES[0] else ["sharq"]
    done = 0
    for name in names:
        for m in (1, 8):
            t = cuda_gemm.choose_tile(m, n, k, None)
            fold = cuda_gemm._fold(sharq.get_recipe(name), m, n, k, t)
            if fold is None:
                continue
            for group in (False, True):
                built = nvrtc.compile_cubin(cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), 16, 0, 0, False, group,
                                                                    fold), "sm_90")
                assert 0 < built.registers <= 255 and built.spilled == 0, (name, m, t, fold, built.registers)
                done += 1
    assert done > 0


@pytest.mark.parametrize("k,n", SHAPES)
def test_every_wgmma_launch_compiles_without_spills_in_one_block_a_multiprocessor(k, n):
    """The wgmma kernel's launches (an H200: sm_90a, 132 multiprocessors) compile without spilling, in registers
    that let a block of its threads fit a multiprocessor (65536 registers)."""
    for m in MS:
        t = cuda_wgmma.choose_tile(m, n, k, (9, 0), 132)
        if t is None:
            continue
        for block, out, bias, per_token in [(32, torch.bfloat16, None, False),
                                            (16, torch.float16, torch.float32, True)]:
            source = cuda_wgmma.kernel_source(t, block, cuda_gemm._OUT[out], cuda_gemm._BIAS[bias], per_token)
            built = nvrtc.compile_cubin(source, "sm_90a")
            assert built.spilled == 0 and built.registers * t.threads <= 65536, (m, t, built.registers)


@pytest.mark.parametrize("option", [{"stages": 2}, {"stages": 3}, {"slots": 6}, {"producers": 8},
                                    {"warpgroups": 1}, {"warpgroups": 1, "stages": 2}, {"warpgroups": 3}])
def test_the_wgmma_launch_options_compile_without_spills(option):
    """The options bench_gemm.py --wgmma-sweep times (chunks in flight, buffers, producer warps, warpgroups)."""
    t = cuda_wgmma.WgmmaTile(**option)
    built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 16, 0, 1, True), "sm_90a")
    assert built.spilled == 0 and built.registers * t.threads <= 65536, (t, built.registers)


def test_the_wgmma_kernel_takes_large_layers_at_17_to_64_tokens_on_hopper_alone():
    """Where it measured faster than the decode kernel (docs/PERF.md): 33-64 tokens of more than 2^24 weights (2^24
    where K >= N), 17-64 of more than 2^26; never off Hopper, never on N not a multiple of its 128 rows. Its K split
    depends on the shape alone (a token's output does not depend on the batch), counted on blocks of one
    warpgroup's 64 rows where K >= N."""
    def tile(m, n, k, capability=(9, 0)):
        return cuda_wgmma.choose_tile(m, n, k, capability, 132)

    def takes(n, k):
        return [m for m in range(1, 65) if tile(m, n, k)]

    for n, k in [(28672, 4096), (10240, 8192), (28672, 8192), (8192, 28672)]:
        assert takes(n, k) == list(range(17, 65)), (n, k)
    for n, k in [(6144, 4096), (8192, 8192), (4096, 14336)]:  # at most 2^26 weights
        assert takes(n, k) == list(range(33, 65)), (n, k)
    assert takes(4096, 4096) == list(range(33, 65))  # 2^24 weights, K >= N
    assert not any(tile(m, 8192, 2048) for m in range(1, 65))  # 2^24 weights, K < N: the decode kernel throughout
    assert tile(64, 6144 + 64, 4096) is None and tile(65, 6144, 4096).tokens > 64  # above 64: token tiles
    assert tile(64, 6144, 4096, (8, 0)) is None and tile(64, 6144, 4096, (10, 0)) is None
    assert {tile(m, 4096, 14336).splits for m in range(33, 65)} == {4}  # K >= N: 64 blocks of 64 rows, 112 chunks
    assert {tile(m, 6144, 4096).splits for m in range(33, 65)} == {4}  # K < N: 48 blocks of 128 rows, 32 chunks
    assert {tile(m, 4096, 4096).splits for m in range(33, 65)} == {4}  # 64 blocks of 64 rows (8 on 128 rows)
    assert tile(64, 28672, 4096).splits == 1


@pytest.mark.parametrize("option", [{"tokens": 128}, {"tokens": 128, "warpgroups": 1}, {"tokens": 128, "stages": 2},
                                    {"tokens": 64, "warpgroups": 1}])
def test_the_token_tile_options_compile_without_spills(option):
    """The token tiles above 64 tokens that bench_gemm.py --wide times and that do not spill (wider ones, whose
    producers hold two chunks of 24-32 token groups, do), as one layer's and as a group's kernel."""
    t = cuda_wgmma.WgmmaTile(**option)
    for group in (False, True):
        built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 32, 0, 1, True, group), "sm_90a")
        assert built.spilled == 0 and built.registers * t.threads <= 65536, (t, built.registers)


@pytest.mark.parametrize("option", [{}, {"tokens": 128}, {"tokens": 128, "slots": 6, "stages": 2},
                                    {"warpgroups": 1, "stages": 2}, {"warpgroups": 1}])
def test_the_bulk_copy_tiles_compile_without_spills(option):
    """The wgmma kernel fed by bulk copies of the tiled activation (bench_gemm.py --bulk times it), as one layer's
    and as a group's kernel, on canonical and placed codes."""
    for placed, group in [(False, False), (True, True)]:
        t = cuda_wgmma.WgmmaTile(**option, bulk=True, producers=1, placed=placed)
        built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 32, 0, 1, True, group), "sm_90a")
        assert built.spilled == 0 and built.registers * t.threads <= 65536, (t, built.registers)


def test_the_bulk_copies_take_the_launches_they_measured_faster_on_with_the_same_sums():
    """bulk_tile keeps the launch's K split (so its sums) and tokens: above 64 tokens the same tile with 2 chunks in
    flight; up to 64 one consumer warpgroup a block, with 2 chunks in flight where it has more than 2 and at most 3
    blocks a multiprocessor, else 4, and none for layers deeper than twice their width (down_proj) or staged
    launches."""
    def routed(m, k, n, sms=132):
        t = cuda_wgmma.choose_tile(m, n, k, (9, 0), sms)
        return t, cuda_wgmma.bulk_tile(t, n, k, sms)

    # every 8B and 70B shape the wgmma kernel takes up to 64 tokens but down_proj, which keeps its producer warps
    small = [(m, s) for m in (33, 48, 64) for s in SHAPES[:8] if s[0] <= 2 * s[1]]
    for m, (k, n) in small + [(25, (4096, 28672))]:
        t, b = routed(m, k, n)
        assert (b.bulk, b.producers, b.warpgroups, b.splits, b.tokens) == (True, 1, 1, t.splits, t.tokens)
        assert b.stages == (2 if 2 * 132 < n // 64 * t.splits <= 3 * 132 else 4)
    assert routed(48, 4096, 6144)[1].stages == 2 and routed(48, 8192, 10240)[1].stages == 2  # 384, 320 blocks
    assert routed(48, 4096, 28672)[1].stages == 4  # 448 blocks
    assert routed(48, 8192, 8192)[1].stages == 4 and routed(48, 4096, 4096)[1].stages == 4  # K >= N: 256 blocks
    assert routed(48, 4096, 6144, sms=114)[1].stages == 4  # 384 blocks > 3 x 114
    assert routed(64, 14336, 4096)[1] is None and routed(33, 28672, 8192)[1] is None
    for m, (k, n) in [(m, s) for m in (65, 256, 512) for s in SHAPES[:8]]:  # every 8B and 70B shape
        t, b = routed(m, k, n)
        assert b == replace(t, bulk=True, producers=1, stages=2)
    staged = cuda_wgmma.WgmmaTile(tokens=128, staged=True, slots=3, producers=8)
    assert cuda_wgmma.bulk_tile(staged, 4096, 4096, 132) is None


def test_the_tiled_activation_is_each_chunk_the_producers_buffer_image():
    """chunk_order places every (token, element) of a chunk once, where the producer warps put it (kernels'
    comments: pair i of elements 32 q + 8 v .. + 7 at k slots 2q, 2q + 1 of step 2v + (i >> 1), k half i & 1; a
    core matrix 8 tokens x 16 bytes); tiled_activation lays out tiles and chunks in order, the last tile padded."""
    for tokens, placed in [(64, False), (128, True), (8, False)]:
        order = cuda_wgmma.chunk_order(tokens, placed)
        assert sorted(order.flatten().tolist()) == list(range(tokens * 128))
        # token 9, element 32 * 2 + 8 * 1 + w: step 2 or 3, core matrix row 1 of token group 1, slot 4 or 5
        pairs = [(0, 4), (1, 5), (2, 6), (3, 7)] if not placed else [(0, 1), (2, 3), (4, 5), (6, 7)]
        for i, (lo, hi) in enumerate(pairs):
            at = (2 + (i >> 1)) * 16 * tokens + (i & 1) * 8 * tokens + 64 + 8 + 4
            if tokens > 9:
                assert order[9, 72 + lo] == at and order[9, 72 + hi] == at + 1
    g = torch.Generator().manual_seed(91)
    a = torch.randn(70, 256, generator=g).to(torch.bfloat16)
    tiled = cuda_wgmma.tiled_activation(a, 64, placed=False).view(2, 2, 64 * 128)
    order = cuda_wgmma.chunk_order(64, False)
    for tile, chunk in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        rows = a[64 * tile:64 * tile + 64, 128 * chunk:128 * chunk + 128]
        image = tiled[tile, chunk]
        assert torch.equal(image[order[:len(rows)]], rows)
        assert not image[order[len(rows):]].any()  # the tokens beyond M: zeros


STAGED = [{"tokens": 128, "staged": True, "slots": 3, "producers": 8},
          {"tokens": 128, "staged": True, "slots": 2, "producers": 8},
          {"tokens": 256, "staged": True, "slots": 2, "producers": 4},
          {"tokens": 128, "staged": True, "slots": 3, "producers": 4},
          {"tokens": 128, "staged": True, "slots": 3, "producers": 4, "warpgroups": 1},
          {"tokens": 64, "staged": True, "producers": 8}]


@pytest.mark.parametrize("option", STAGED)
@pytest.mark.parametrize("block", [16, 32])
def test_the_staged_tiles_compile_without_spills(option, block):
    """The staged kernel (the producers decode the weight into shared memory; bench_gemm.py --staged times it), as
    one layer's and as a group's kernel, with and without a K split: no spills, a block a multiprocessor."""
    for t in (cuda_wgmma.WgmmaTile(**option), cuda_wgmma.WgmmaTile(**option, splits=2)):
        for group in (False, True):
            built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, block, 0, 1, True, group), "sm_90a")
            assert built.spilled == 0 and built.registers * t.threads <= 65536, (t, group, built.registers)


def test_a_wgmma_tile_refuses_what_the_kernel_cannot_take():
    """wgmma's N is 8-256 in steps of 8; producer warps come in whole warpgroups that share the token groups evenly
    (staged: 1, 2 or 4 producer threads a weight row, the activation's 16-byte pieces shared evenly, and two
    buffers or more, since the consumers' MMAs read one while the producers fill another); the buffers fit a
    block's shared memory."""
    for bad in [{"tokens": 0}, {"tokens": 100}, {"tokens": 264}, {"producers": 6}, {"producers": 8, "tokens": 72},
                {"tokens": 256, "slots": 4}, {"staged": True, "slots": 1}, {"staged": True, "producers": 12},
                {"staged": True, "warpgroups": 3, "producers": 4, "slots": 3},
                {"staged": True, "tokens": 8, "producers": 8},
                {"staged": True, "tokens": 256, "slots": 3}]:
        with pytest.raises(ValueError, match="WgmmaTile"):
            cuda_wgmma.WgmmaTile(**bad)
    assert (cuda_wgmma.shared_bytes(cuda_wgmma.WgmmaTile(tokens=256, slots=3)) + cuda_wgmma.SCALE_TABLE_BYTES
            <= cuda_wgmma.SHARED_LIMIT)


def test_more_token_tiles_than_a_grid_holds_are_refused_before_anything_is_compiled():
    """A launch's token tiles are its grid's z, at most 65535 (reachable only with a tile given by hand)."""
    t = cuda_wgmma.WgmmaTile(tokens=8)
    with pytest.raises(ValueError, match="65535"):
        cuda_gemm._build(0, t, 8 * 65535 + 1, 128, 128, 32, 0, 0, False)


def test_token_tiles_take_65_to_wide_max_m_tokens_of_large_layers(monkeypatch):
    """Above 64 tokens the wgmma kernel takes layers of at least 2^24 weights in tiles of WIDE_TOKENS up to
    WIDE_MAX_M tokens (where it measured faster than decode + cuBLAS: 512 on the 8B shapes), none while that is 0; its
    K split keeps row blocks x token tiles x splits within one wave; never off Hopper."""
    def tile(m, n, k, capability=(9, 0)):
        return cuda_wgmma.choose_tile(m, n, k, capability, 132)

    assert tile(512, 4096, 4096).tokens == cuda_wgmma.WIDE_TOKENS and tile(513, 4096, 4096) is None
    monkeypatch.setattr(cuda_wgmma, "WIDE_MAX_M", 0)
    assert not any(tile(m, 6144, 4096) for m in (65, 128, 2048))
    monkeypatch.setattr(cuda_wgmma, "WIDE_MAX_M", 1024)
    monkeypatch.setattr(cuda_wgmma, "WIDE_TOKENS", 128)
    assert all(tile(m, 4096, 4096).tokens == 128 for m in (65, 300, 1024))
    assert tile(1025, 4096, 4096) is None and tile(300, 4096, 2048) is None  # 2^23 weights
    assert tile(300, 4096, 4096, (8, 0)) is None and tile(300, 4096 + 64, 4096) is None
    # 32 row blocks of 128 (14336 / 128 = 112 chunks): one token tile splits K in 4 (128 blocks), two and more
    # tiles in 2 while that keeps 132 blocks or fewer, then none
    assert [tile(m, 4096, 14336).splits for m in (128, 129, 256, 257, 640)] == [4, 2, 2, 1, 1]
    assert cuda_wgmma.token_tiles(257, tile(257, 4096, 14336)) == 3
    assert tile(128, 28672, 4096).splits == 1  # 224 row blocks: more than a wave already


def test_a_launch_starts_early_where_that_measured_faster(monkeypatch):
    """Programmatic launch on Hopper (docs/PERF.md): above 8 tokens, or on the register-staged kernel (up to 2^24
    weights) or two row tiles a warp (N >= 2 K); never on the one-row-tile cp.async ring at up to 8 tokens, which
    lost there (4096 x 6144 at 4 tokens 13.3 -> 16.1 µs, 28672 x 8192 at one 62.6 -> 98.9); never before Hopper."""
    monkeypatch.setattr(cuda_gemm, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    early = [(k, n) for k, n in SHAPES if cuda_gemm._programmatic(0, 4, n, k)]
    assert early == [(4096, 4096), (4096, 28672), (8192, 28672), (8192, 512), (16384, 256)]
    assert all(cuda_gemm._programmatic(0, m, n, k) for k, n in SHAPES for m in (9, 16, 33, 64))
    ring_one_row = [(k, n) for k, n in SHAPES if cuda_gemm.choose_tile(4, n, k, None).ring
                    and cuda_gemm.choose_tile(4, n, k, None).rt == 1]
    assert ring_one_row and not any(cuda_gemm._programmatic(0, m, n, k) for k, n in ring_one_row for m in range(1, 9))
    monkeypatch.setattr(cuda_gemm, "_capability", lambda device: (8, 0))
    assert not any(cuda_gemm._programmatic(0, m, n, k) for k, n in SHAPES for m in (1, 16, 64))


def test_registers_and_spills_read_from_the_cubin_are_ptxas_report():
    """compile_cubin reads them from the cubin's ELF (some NVRTC builds give no report); where the log has the
    report they agree, on a launch that spills (64 bytes with NVRTC 13.5) and one that does not."""
    for t, mt in [(cuda_gemm.CudaTile(2, 8, 1, 1, 0, direct=True), 8), (cuda_gemm.CudaTile(1, 8, 2), 1)]:
        built = nvrtc.compile_cubin(cuda_gemm.kernel_source(t, mt, 32, 0, 0, False), "sm_90")
        registers = re.search(r"Used (\d+) registers", built.log)
        frame = re.search(r"(\d+) bytes stack frame", built.log)
        if registers is None or frame is None:
            pytest.skip("this NVRTC gives no ptxas report to compare with")
        assert (built.registers, built.spilled) == (int(registers.group(1)), int(frame.group(1)))


def test_the_launch_options_compile_for_ampere_too():
    """The kernel needs bf16 MMA (sm_80); Hopper's programmatic-launch wait compiles away below sm_90."""
    for t, m in [(cuda_gemm.CudaTile(1, 8, 2), 1), (cuda_gemm.CudaTile(2, 4, 1, 2, 3, wn=2, direct=True), 64),
                 (cuda_gemm.CudaTile(1, 8, 2, min_blocks=3), 4)]:
        nvrtc.compile_cubin(cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), 16, 2, 3, True), "sm_80")


def test_a_source_that_does_not_compile_says_why():
    broken = cuda_gemm.kernel_source(cuda_gemm.CudaTile(), 1, 32, 0, 0, False).replace("lane = threadIdx.x", "lane = nothing", 1)
    with pytest.raises(RuntimeError, match="nothing"):
        nvrtc.compile_cubin(broken)


@needs_nvdisasm
@pytest.mark.parametrize("k,n", SHAPES[:4])
def test_the_batch_1_main_loop_stays_lean(k, n, monkeypatch):
    """The machine code of the batch-1 launch: its main loop (found by nvrtc.main_loop) has 8 HMMAs per 128-element
    chunk of each 16-row tile and at most 0.14 warp instructions per weight: 0.094-0.108 on these shapes with
    NVRTC 13.5 when last measured, 0.124-0.152 before the loops were thinned (at copy speed an H200
    multiprocessor has 0.12-0.13 instruction slots a weight, benchmarks/kernel_sass.py); the margin is for other
    compiler versions, not for a kernel change."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    t = cuda_gemm.choose_tile(1, n, k, None)
    built = nvrtc.compile_cubin(cuda_gemm.kernel_source(t, 1, 32, 0, 0, False))
    loop = nvrtc.main_loop(nvrtc.disassemble(built.cubin))
    assert loop.count("HMMA") >= 8 * t.rt and loop.count("HMMA") % (8 * t.rt) == 0
    assert len(loop) / nvrtc.weights_per_loop(loop, "HMMA", 8 * t.rt, 16 * t.rt) <= 0.14


@needs_nvdisasm
def test_the_staged_kernels_consumers_only_issue_mmas_and_its_producers_stay_lean():
    """The staged kernel's two loops apart (nvrtc.main_loop, one without the producers' stores): the consumers' has
    8 HGMMAs a chunk and nothing of the decode, at most 0.04 warp instructions a weight (0.031 with NVRTC 13.5:
    descriptors in uniform registers, where they were built per lane and moved over at 0.060), and the producers'
    one 16-byte store a code word, at most 0.15 warp instructions a weight of the block (0.129), so they issue less
    than the block's MMAs take at 128 tokens (a quarter of a cycle a weight)."""
    t = cuda_wgmma.WgmmaTile(**STAGED[0])
    sass = nvrtc.disassemble(nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 32, 0, 0, False), "sm_90a").cubin)
    consumers, producers = nvrtc.main_loop(sass, "HGMMA", exclude="STS"), nvrtc.main_loop(sass, "STS")
    assert consumers.count("HGMMA") % 8 == 0 and not {"HMUL2", "PRMT", "STS"} & set(consumers)
    assert len(consumers) / nvrtc.weights_per_loop(consumers, "HGMMA", 8, 16) <= 0.04
    words = 16 * t.rows // (t.producers * 32)  # a producer thread's code words a chunk
    assert t.producers * len(producers) / (producers.count("STS") / words) / (t.rows * 128) <= 0.15


def _loop_per_weight(source: str, arch: str, marker: str, per_chunk: int, rows: int, exclude: str | None = None):
    built = nvrtc.compile_cubin(source, arch)
    loop = nvrtc.main_loop(nvrtc.disassemble(built.cubin), marker, exclude)
    return built.spilled, len(loop) / nvrtc.weights_per_loop(loop, marker, per_chunk, rows)


@needs_nvdisasm
@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 16])
def test_placed_codes_take_a_fifth_fewer_instructions_in_the_decode_kernel(k, n, m, monkeypatch):
    """kernels/placed.py's layout in the batch-1 and 16-token launches: no spills, and at most 0.85 of the
    canonical layout's instructions a weight (0.77-0.78 with NVRTC 13.5: 9 instructions a word's decode instead
    of 13, and the activation's pairs with no byte permutes)."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    t, mt = cuda_gemm.choose_tile(m, n, k, None), cuda_gemm.n8_tiles(m)
    counts = [_loop_per_weight(cuda_gemm.kernel_source(replace(t, placed=placed), mt, 32, 0, 0, False), "sm_90",
                               "HMMA", 8 * t.rt * mt, 16 * t.rt) for placed in (False, True)]
    assert counts[1][0] == 0 and counts[1][1] <= 0.85 * counts[0][1], counts


@needs_nvdisasm
def test_placed_codes_take_fewer_instructions_in_the_wgmma_kernels_and_the_scratch_decode():
    """The same for the wgmma kernel's consumers (64 and 128 tokens; 0.81-0.83 with NVRTC 13.5), the staged
    kernel's producers (0.76) and the scratch decode's loop (0.74): each at most 0.9 of the canonical count, no
    spills, and the scratch decode within its registers."""
    for t in (cuda_wgmma.WgmmaTile(), cuda_wgmma.WgmmaTile(tokens=128)):
        counts = [_loop_per_weight(cuda_wgmma.kernel_source(replace(t, placed=placed), 32, 0, 0, False), "sm_90a",
                                   "HGMMA", 8, 16) for placed in (False, True)]
        assert counts[1][0] == 0 and counts[1][1] <= 0.9 * counts[0][1], (t, counts)
    t = cuda_wgmma.WgmmaTile(**STAGED[0])
    words = 16 * t.rows // (t.producers * 32)
    staged = []
    for placed in (False, True):
        built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(replace(t, placed=placed), 32, 0, 0, False), "sm_90a")
        loop = nvrtc.main_loop(nvrtc.disassemble(built.cubin), "STS")
        staged.append((built.spilled, len(loop) / (loop.count("STS") / words)))
    assert staged[1][0] == 0 and staged[1][1] <= 0.9 * staged[0][1], staged
    decode = []
    for placed in (False, True):
        built = nvrtc.compile_cubin(cuda_dequantize.kernel_source(32, placed), "sm_90")
        loop = nvrtc.main_loop(nvrtc.disassemble(built.cubin), "STG")
        decode.append((built.spilled, built.registers, len(loop) / loop.count("STG")))
    assert decode[1][0] == 0 and decode[1][1] <= 64 and decode[1][2] <= 0.9 * decode[0][2], decode


def test_the_variant_scripts_edits_still_apply_and_compile(monkeypatch):
    """benchmarks/wgmma_variants.py takes one cost out of a kernel at a time by editing its source: every edit is
    still there exactly once and every variant compiles, so a kernel change that moves those lines fails here
    rather than in the middle of a GPU run."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import wgmma_variants

    for kernel, (module, variants, _) in wgmma_variants.KERNELS.items():
        original = module._SOURCE
        for edits in variants.values():
            monkeypatch.setattr(module, "_SOURCE", wgmma_variants.edited(original, edits))
            if kernel == "wgmma":
                built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(cuda_wgmma.WgmmaTile(), 32, 0, 0, False),
                                            "sm_90a")
            else:
                built = nvrtc.compile_cubin(cuda_gemm.kernel_source(cuda_gemm.CudaTile(stages=2, direct=True), 1, 32,
                                                                    0, 0, False))
            assert built.cubin


@pytest.mark.parametrize("k,n", SHAPES)
def test_two_row_tile_ring_launches_fit_32_warps_a_multiprocessor(k, n, monkeypatch):
    """Up to 8 tokens the ring launches with two row tiles where N >= 2 K are capped so that 32 warps fit a
    multiprocessor (64 registers a thread: the whole grid of 4096 x 28672 in one wave); those of 8-warp layers at 8
    tokens are not. Neither spills, whatever the block size, output, bias and scales."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    for m in (1, 4, 8):
        t = cuda_gemm.choose_tile(m, n, k, None)
        if not (t.ring and t.rt == 2):
            continue
        assert t.min_blocks * t.wk == (32 if n >= 2 * k else 0), (m, t)
        for block, out, bias, per_token in [(32, torch.bfloat16, None, False),
                                            (16, torch.float16, torch.bfloat16, True)]:
            built = nvrtc.compile_cubin(cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), block, cuda_gemm._OUT[out],
                                                                cuda_gemm._BIAS[bias], per_token), "sm_90")
            assert built.registers * t.threads * max(t.min_blocks, 1) <= 65536 and built.spilled == 0, (m, t, block)


def test_the_weight_read_ceilings_kernels_compile_without_spills(monkeypatch):
    """benchmarks/weight_read.py's loads-only kernels, every variant it times, compile for Hopper and hold their
    loads in registers (a spill would time local memory, not the weight's read)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import weight_read

    sources = [weight_read.tile_source(*v) for v in weight_read.TILE_VARIANTS]
    sources += [weight_read.stream_source(unroll) for unroll, _ in weight_read.STREAM_VARIANTS]
    for source in dict.fromkeys(sources):
        built = nvrtc.compile_cubin(source, "sm_90")
        assert built.cubin and built.spilled == 0, source[:120]


GROUPS = {(4096, (4096, 1024, 1024)): MS, (4096, (14336, 14336)): [1, 4, 8, 17, 32, 33, 64],  # Llama-3.1-8B
          (8192, (8192, 1024, 1024)): MS, (8192, (28672, 28672)): [1, 4, 8]}  # -70B


@pytest.mark.parametrize("k,ns", GROUPS)
def test_every_group_launch_compiles_and_groups_where_it_measured_faster(k, ns, monkeypatch):
    """Llama-3.1-8B's and -70B's q/k/v and gate/up as one launch (an H200: sm_90a, 132 multiprocessors) at the
    token counts where that measured faster (cuda_gemm.group_tile): q/k/v always (k and v alone split K), gate/up
    up to 8 tokens and where the summed width takes the wgmma kernel while a layer alone would split K, or would
    not take it and is small enough (8B, not 70B). Every such launch compiles, without spills up to 8 tokens and
    on the wgmma kernel."""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(cuda_gemm, "_capability", lambda device: (9, 0))
    grouped = []
    for m in MS:
        t = cuda_gemm.group_tile(m, ns, k, None)
        if t is not None:
            grouped.append(m)
        if isinstance(t, cuda_wgmma.WgmmaTile):
            built = nvrtc.compile_cubin(cuda_wgmma.kernel_source(t, 32, 0, 0, False, group=True), "sm_90a")
            assert built.spilled == 0 and built.registers * t.threads <= 65536, (m, t, built.registers)
        elif t is not None:
            source = cuda_gemm.kernel_source(t, cuda_gemm.n8_tiles(m), 32, 0, 0, False, group=True)
            built = nvrtc.compile_cubin(source, "sm_90")
            assert 0 < built.registers <= 255 and (m > 8 or built.spilled == 0), (m, t, built.spilled)
    assert grouped == GROUPS[k, ns]


@pytest.mark.parametrize("k,ns", [*GROUPS, (4096, (4096, 4096, 4096)), (3072, (3072, 3072, 3072)),
                                  (2048, (2048, 512, 512)), (8192, (8192, 8192))])
def test_where_the_group_choice_changes_with_the_tokens_the_sums_do_not(k, ns, monkeypatch):
    """Batch invariance within the decode kernel's tokens: where a group launches at some M and its layers one by
    one at another, each layer alone adds its products in the group's order (same K partition), so a token's output
    is the same bits either way. (Llama-2-style q/k/v of equal widths: alone 8 warps split K, grouped 4, so they
    group at every M.)"""
    monkeypatch.setattr(cuda_gemm, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(cuda_gemm, "_capability", lambda device: (9, 0))
    decode = [m for m in range(1, cuda_gemm.MAX_M + 1)
              if not isinstance(cuda_gemm.group_tile(m, ns, k, None), cuda_wgmma.WgmmaTile)
              and cuda_wgmma.choose_tile(m, sum(ns), k, (9, 0), 132) is None]
    tiles = {m: cuda_gemm.group_tile(m, ns, k, None) for m in decode}
    grouped = [t for t in tiles.values() if t is not None]
    for m, t in tiles.items():
        if t is None:
            assert all(cuda_gemm._same_sums(cuda_gemm.choose_tile(m, w, k, None), g) for w in ns for g in grouped), m


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("block", [32, 16])
def test_the_weight_decode_compiles_without_spills(arch, block):
    """The scratch-weight decode (kernels/cuda_dequantize.py) on every GPU the CUDA kernels take, both block sizes:
    a streaming kernel that spilled would lose what it is for."""
    built = nvrtc.compile_cubin(cuda_dequantize.kernel_source(block), arch)
    assert 0 < built.registers <= 64 and built.spilled == 0 and built.cubin
