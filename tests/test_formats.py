import ml_dtypes as md
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sharq import formats as F


def _np(t):
    return t.numpy()


# --- E2M1 ---------------------------------------------------------------------------------------------------------
def test_e2m1_decode_all_codes_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    expected = codes.view(md.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_np(F.decode_e2m1(torch.from_numpy(codes))), expected)


def test_every_byte_unpacks_to_two_e2m1_values_low_nibble_first():
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    pair = F.unpack_nibbles(byte.reshape(256, 1))  # [256, 2]
    lo = (np.arange(256) & 0xF).astype(np.uint8).view(md.float4_e2m1fn).astype(np.float32)
    hi = (np.arange(256) >> 4).astype(np.uint8).view(md.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_np(F.decode_e2m1(pair[:, 0])), lo)
    np.testing.assert_array_equal(_np(F.decode_e2m1(pair[:, 1])), hi)
    assert torch.equal(F.pack_nibbles(pair).flatten(), byte)


TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("value,expected", TIES + [(-v, -e) for v, e in TIES])
def test_e2m1_ties_to_even(value, expected):
    code = F.encode_e2m1(torch.tensor([value]))
    assert F.decode_e2m1(code).item() == expected
    ref = np.array([value], np.float32).astype(md.float4_e2m1fn).view(np.uint8)
    assert code.item() == ref.item()


def test_e2m1_encode_matches_ml_dtypes_on_grid_and_random(rng):
    grid = np.arange(-6.25, 6.25 + 1e-9, 0.03125, dtype=np.float32)  # every tie and midpoint lies on it
    rand = (torch.randn(4096, generator=rng) * 3).numpy()
    for x in (grid, rand):
        x = np.clip(x, -6, 6).astype(np.float32)
        expected = x.astype(md.float4_e2m1fn).view(np.uint8)
        np.testing.assert_array_equal(_np(F.encode_e2m1(torch.from_numpy(x))), expected)


def test_e2m1_saturates_after_clamp_and_keeps_sign_of_zero():
    x = torch.tensor([6.0, 5.9, -6.0, 0.2, -0.2, -0.0])
    assert F.decode_e2m1(F.encode_e2m1(x)).tolist() == [6.0, 6.0, -6.0, 0.0, -0.0, -0.0]
    assert F.encode_e2m1(torch.tensor([-0.2])).item() == 0b1000  # -0 keeps its sign bit, dequantizes to 0


# --- UE4M3 --------------------------------------------------------------------------------------------------------
def test_ue4m3_decode_all_codes_matches_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    expected = codes.view(md.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(_np(F.decode_ue4m3(torch.from_numpy(codes))), expected)


def test_ue4m3_encode_matches_ml_dtypes_with_ties_and_subnormals(rng):
    values = np.arange(1, 127, dtype=np.uint8).view(md.float8_e4m3fn).astype(np.float64)  # 2^-9 ... 448
    midpoints = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # every tie, subnormal ones included
    rand = np.exp2(torch.empty(4096).uniform_(-9, np.log2(448), generator=rng).numpy()).astype(np.float32)
    for s in (values.astype(np.float32), midpoints, rand):
        expected = s.astype(md.float8_e4m3fn).view(np.uint8)
        np.testing.assert_array_equal(_np(F.encode_ue4m3(torch.from_numpy(s))), expected)


def test_ue4m3_saturates_and_keeps_non_finite_visible():
    s = torch.tensor([1e-12, 2.0**-10, 2.0**-9, 448.0, 460.0, 1e30, float("inf"), float("nan")])
    dec = F.decode_ue4m3(F.encode_ue4m3(s))
    assert dec[:6].tolist() == [2.0**-9, 2.0**-9, 2.0**-9, 448.0, 448.0, 448.0]
    assert torch.isnan(dec[6:]).all()


# --- E8M0 ---------------------------------------------------------------------------------------------------------
def test_e8m0_decode_all_codes_matches_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    expected = codes.view(md.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(_np(F.decode_e8m0(torch.from_numpy(codes))), expected)


def test_floor_log2_exact_including_subnormals(rng):
    x = np.concatenate([
        np.exp2(torch.empty(2048).uniform_(-149, 127, generator=rng).numpy().astype(np.float64)),
        np.exp2(np.arange(-149, 128, dtype=np.float64)),
    ]).astype(np.float32)
    x = x[x > 0]
    expected = np.frexp(x)[1] - 1
    np.testing.assert_array_equal(_np(F.floor_log2(torch.from_numpy(x))), expected)


# --- E6M2 and S1P2 (HiF4) -----------------------------------------------------------------------------------------
def test_e6m2_round_trips_every_finite_code():
    codes = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(F.encode_e6m2(F.decode_e6m2(codes)), codes)
    assert F.decode_e6m2(torch.tensor([0], dtype=torch.uint8)).item() == 2.0**-48
    assert F.decode_e6m2(torch.tensor([254], dtype=torch.uint8)).item() == F.E6M2_MAX


def test_e6m2_ties_to_even_mantissa_and_saturation():
    v = F.decode_e6m2(torch.arange(255, dtype=torch.int32).to(torch.uint8)).double()
    mid = ((v[:-1] + v[1:]) / 2).float()  # exact in fp32
    codes = F.encode_e6m2(mid).to(torch.int32)
    lower = torch.arange(254, dtype=torch.int32)
    expected = torch.where(lower % 2 == 0, lower, lower + 1)  # the even mantissa wins
    assert torch.equal(codes, expected)
    big = torch.tensor([1e30, float("inf"), 1e-30, 0.0])
    assert F.decode_e6m2(F.encode_e6m2(big[:1])).item() == F.E6M2_MAX
    assert F.encode_e6m2(big[1:2]).item() == F.E6M2_NAN
    assert F.decode_e6m2(F.encode_e6m2(big[2:])).tolist() == [2.0**-48, 2.0**-48]


def test_s1p2_grid_ties_and_saturation():
    x = torch.tensor([0.125, 0.375, 0.625, 1.625, 1.8, -0.125, -1.7, -9.0])
    assert F.decode_s1p2(F.encode_s1p2(x)).tolist() == [0.0, 0.5, 0.5, 1.5, 1.75, -0.0, -1.75, -1.75]


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_nibble_pack_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    assert torch.equal(F.unpack_nibbles(F.pack_nibbles(t)), t)
