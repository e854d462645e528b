"""A weight-code layout for the CUDA kernels' decode: each 32-bit word's eight E2M1 codes with their bits moved
where the decode into bf16 wants them, so a word decodes in 9 instructions instead of 13, its pairs already in
element order (elements 2p and 2p + 1 of the word), which spares the byte permutes that put the canonical decode's
pairs (elements i and i + 4) back in order.

The CUDA kernels decode a code by bit placement (kernels/cuda_source.py): its sign goes to bit 15 of a bf16 and
its three magnitude bits (m, e0, e1) to bits 6, 7 and 8, which is the code's value times 2^-126 (the block scale's
pair makes up the rest); a pair of codes fills a 32-bit word's bits {6, 7, 8, 15} and {22, 23, 24, 31}. Here the
word's pair p is stored rotated left by ROTATIONS[p] (its nibble bits in the order m, e0, e1, s), so the decode is
one rotate (funnel shift) and one mask per rotation: three rotations of that 8-bit pattern tile 24 of a word's
bits and no fourth fits what is left (an exhaustive search, docs/PERF.md sixteenth run), so pair 3 takes two
(e1 by 6, the rest by 14).

`place_codes` / `unplace_codes` turn a canonical payload (docs/FORMAT.md: element 2i in the low nibble of byte i)
into this layout and back, exactly; `DECODE_SOURCE` is the device function, generated from the same table, and is
plain C (compiled for the host by the CPU tests). The packed-placed backend (backends/packed.py) holds NVFP4 codes
in this layout; the kernels read it where they are asked to (`placed=True`), and `python benchmarks/bench_gemm.py
--placed` times it against the canonical codes."""

from __future__ import annotations

import torch

TARGET = (6, 7, 8, 15)  # where a code's bits (m, e0, e1, s) go in the low bf16 of a pair; +16 in the high one
ROTATIONS = ((0, 0, 0, 0), (4, 4, 4, 4), (10, 10, 10, 10), (14, 14, 6, 14))  # [pair][bit]: left rotation


def _moves() -> list[tuple[int, int]]:
    """(canonical bit, placed bit) of the 32 bits of a word: code e = 2p + h (h = 0 low, 1 high) at bits 4e..4e+3."""
    moves = []
    for p, rotation in enumerate(ROTATIONS):
        for h in (0, 1):
            for b, r in enumerate(rotation):
                moves.append((4 * (2 * p + h) + b, (TARGET[b] + 16 * h + r) % 32))
    assert sorted(d for _, d in moves) == list(range(32)), "the rotations must tile the word"
    return moves


MOVES = _moves()


def _permute_bits(codes: torch.Tensor, moves: list[tuple[int, int]]) -> torch.Tensor:
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 4:
        raise ValueError(f"expected uint8 codes [N, Kp/2] with Kp/2 a multiple of 4, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    words = codes.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(words)
    for src, dst in moves:
        out |= ((words >> src) & 1) << dst
    # each int64's low four bytes (little-endian, as the int32 view read them) are the word
    return out.view(torch.uint8).reshape(*words.shape, 8)[..., :4].reshape(codes.shape).contiguous()


def place_codes(codes: torch.Tensor) -> torch.Tensor:
    """A canonical payload's codes [N, Kp/2] (uint8) in the placed layout (a new tensor, same shape and device)."""
    return _permute_bits(codes, MOVES)


def unplace_codes(codes: torch.Tensor) -> torch.Tensor:
    """The canonical codes of placed ones: place_codes' inverse, exactly."""
    return _permute_bits(codes, [(d, s) for s, d in MOVES])


def _decode_source() -> str:
    """The device function: pair p of a placed word as bf16 bits (code times 2^-126 each), a rotate and a mask for
    each rotation the pair was stored with."""
    cases = []
    for p, rotation in enumerate(ROTATIONS):
        terms = []
        for r in sorted(set(rotation), key=rotation.index):
            mask = sum(1 << (TARGET[b] + 16 * h) for b, rb in enumerate(rotation) if rb == r for h in (0, 1))
            rotated = "x" if r == 0 else f"((x >> {r}) | (x << {32 - r}))"
            terms.append(f"({rotated} & 0x{mask:08X}u)")
        cases.append(f"p == {p} ? {' | '.join(terms)}")
    body = "\n       : ".join(cases[:-1]) + "\n       : " + cases[-1].split(" ? ", 1)[1]
    return ("// pair p (elements 2p, 2p + 1) of a word of placed codes (kernels/placed.py) as a bf16 pair: each code "
            "times 2^-126\n"
            "__device__ __forceinline__ u32 e2m1_placed(u32 x, int p) {\n"
            f"  return {body};\n}}\n")


DECODE_SOURCE = _decode_source()
