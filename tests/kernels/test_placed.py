"""The placed code layout (kernels/placed.py): an exact permutation of each word's bits, and its device decode
(plain C, compiled here for the host) gives every code's bf16 bits, pairs in element order."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from sharq.kernels import placed


def _words(n: int, seed: int) -> np.ndarray:
    """Random words, and words holding every code in every position with the rest random."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)]
    for e in range(8):
        base = rng.integers(0, 1 << 32, 16, dtype=np.uint64).astype(np.uint32) & np.uint32(~(15 << 4 * e) & 0xFFFFFFFF)
        words.append(base | (np.arange(16, dtype=np.uint32) << np.uint32(4 * e)))
    return np.concatenate(words)


def _as_codes(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.copy().view(np.uint8)).reshape(-1, 8)


def test_placing_is_an_exact_permutation_of_each_words_bits():
    """Round trip on random payloads and on every byte value in every byte of a word; every bit lands somewhere
    else once (a permutation), and a word's codes stay in that word (a thread's 16 bytes keep their elements)."""
    codes = torch.randint(0, 256, (37, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(placed.unplace_codes(placed.place_codes(codes)), codes)
    every = torch.arange(256, dtype=torch.uint8).repeat_interleave(4).reshape(-1, 4)
    assert torch.equal(placed.unplace_codes(placed.place_codes(every)), every)
    assert not torch.equal(placed.place_codes(codes), codes)
    assert sorted(s for s, _ in placed.MOVES) == sorted(d for _, d in placed.MOVES) == list(range(32))
    single = torch.from_numpy((np.uint32(1) << np.arange(32, dtype=np.uint32)).view(np.uint8).copy()).reshape(-1, 4)
    moved = placed.place_codes(single).view(torch.int32).reshape(-1).numpy().view(np.uint32)
    assert sorted(int(v).bit_length() - 1 for v in moved) == list(range(32))


def test_bad_codes_are_refused():
    for bad in (torch.zeros(4, 6, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8),
                torch.zeros(4, 8, dtype=torch.int32)):
        with pytest.raises(ValueError, match="uint8 codes"):
            placed.place_codes(bad)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_the_device_decode_gives_every_codes_bf16_bits_in_element_order(tmp_path):
    """DECODE_SOURCE compiled for the host: pair p of a placed word is codes 2p (low half) and 2p + 1 (high half)
    of the canonical word, each as the bf16 bits the kernels' decode gives a code (sign at bit 15, magnitude bits
    at 6..8), on random words and every code in every place."""
    source = tmp_path / "decode.cpp"
    source.write_text("typedef unsigned int u32;\n#define __device__\n#define __forceinline__ inline\n"
                      + placed.DECODE_SOURCE
                      + 'extern "C" void decode(const u32* x, u32* out, int n) {\n'
                        "  for (int i = 0; i < n; ++i)\n"
                        "    for (int p = 0; p < 4; ++p) out[4 * i + p] = e2m1_placed(x[i], p);\n}\n")
    library = tmp_path / "decode.so"
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    decode = ctypes.CDLL(str(library)).decode
    words = _words(100_000, 7)
    placed_words = placed.place_codes(_as_codes(words)).reshape(-1).numpy().view(np.uint32)
    out = np.zeros(4 * words.size, dtype=np.uint32)
    decode(placed_words.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
           ctypes.c_int(words.size))
    nibbles = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    bits = ((nibbles & 8) << 12) | ((nibbles & 7) << 6)
    want = bits[:, 0::2] | (bits[:, 1::2] << 16)
    np.testing.assert_array_equal(out.reshape(-1, 4), want)
