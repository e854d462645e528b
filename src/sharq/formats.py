"""Element and scale formats: exact encode/decode (SPEC §1).

Every function here is a pure tensor -> tensor map on fp32 input that works on any device. Encoders round to
nearest, ties to even, and saturate; they never turn a non-finite input into a finite code where the format has a
NaN code (UE4M3, E8M0, E6M2). Codes are uint8.
"""

from __future__ import annotations

import torch

# --- E2M1 (FP4) -----------------------------------------------------------------------------------------------
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes; at a tie the value goes to the neighbour with the even index, so the
# comparison is ">" where the lower neighbour is even and ">=" where the upper one is.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> E2M1 codes (sign<<3 | magnitude index), RNE, saturating at ±6. NaN encodes as +0 (the caller's
    block scale carries NaN)."""
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i, m in enumerate(_E2M1_MIDPOINTS):
        idx += (a > m) if i % 2 == 0 else (a >= m)
    sign = (x < 0) | ((x == 0) & torch.signbit(x))
    return idx | (sign.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes -> fp32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


# --- S1P2 (HiF4 element: sign + 1 integer bit + 2 fraction bits) ------------------------------------------------
S1P2_MAX = 1.75


def encode_s1p2(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> S1P2 codes (sign<<3 | k, value k/4), RNE on the 0.25 grid, saturating at ±1.75."""
    k = torch.round(x.abs().clamp(max=S1P2_MAX) * 4).nan_to_num(0.0).to(torch.uint8)  # torch.round: half to even
    sign = (x < 0) | ((x == 0) & torch.signbit(x))
    return k | (sign.to(torch.uint8) << 3)


def decode_s1p2(codes: torch.Tensor) -> torch.Tensor:
    mag = (codes & 7).float() * 0.25
    return torch.where((codes & 8) != 0, -mag, mag)


# --- UE4M3 (FP8 E4M3 used unsigned as a block scale) -------------------------------------------------------------
UE4M3_MIN = 2.0**-9
UE4M3_MAX = 448.0
UE4M3_NAN = 0x7F


def encode_ue4m3(s: torch.Tensor, floor: float = UE4M3_MIN) -> torch.Tensor:
    """Positive fp32 scale -> UE4M3 code: clamp to [floor, 448], then RNE (torch's float8_e4m3fn conversion).
    The floor is 2⁻⁹ in SPEC §1; NVFP4 tools use others (torchao 2⁻⁶; none, 0, in compressed-tensors, where a scale
    below 2⁻¹⁰ rounds to code 0). A non-finite scale gives the NaN code."""
    clamped = s.clamp(floor, UE4M3_MAX)
    clamped = torch.where(torch.isfinite(s), clamped, torch.full_like(s, float("nan")))
    return clamped.to(torch.float8_e4m3fn).view(torch.uint8)


def decode_ue4m3(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn).float()


# --- E8M0 (power-of-two scale, OCP MX) ---------------------------------------------------------------------------
E8M0_NAN = 0xFF


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) for positive finite fp32 x (subnormals included), as int32."""
    _, e = torch.frexp(x)
    return e - 1


def encode_e8m0_exponent(exponent: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Unbiased int exponent -> E8M0 code (clamped to 2⁻¹²⁷…2¹²⁷); NaN code where `finite` is False."""
    code = (exponent.clamp(-127, 127) + 127).to(torch.uint8)
    return torch.where(finite, code, torch.full_like(code, E8M0_NAN))


def decode_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 code -> fp32 2^(code-127), built from its bit pattern so 2⁻¹²⁷ (an fp32 subnormal) is exact."""
    c = codes.to(torch.int32)
    bits = torch.where(c > 0, c << 23, torch.full_like(c, 1 << 22))
    value = bits.view(torch.float32)
    return torch.where(c == E8M0_NAN, torch.full_like(value, float("nan")), value)


# --- E6M2 (HiF4 unit scale: bias 48, exponents -48..15, no subnormals, 0xFF = NaN) -------------------------------
E6M2_BIAS = 48
E6M2_NAN = 0xFF
E6M2_MIN = 2.0**-48
E6M2_MAX = 2.0**15 * 1.5  # code 0xFE; 0xFF is NaN


def encode_e6m2(s: torch.Tensor) -> torch.Tensor:
    """Positive fp32 -> E6M2 code, RNE on two mantissa bits, exponent clamped to [-48, 15] (values below 2⁻⁴⁸
    become 2⁻⁴⁸, values above the largest finite saturate to it). Non-finite -> NaN code."""
    finite = torch.isfinite(s)
    safe = torch.where(finite & (s > 0), s, torch.ones_like(s))
    mant, e = torch.frexp(safe)  # safe = mant * 2^e, mant in [0.5, 1)
    r = torch.round(mant * 8).to(torch.int32)  # significand*4 in [4, 8], half to even
    carry = r == 8
    r = torch.where(carry, torch.full_like(r, 4), r)
    exp = e - 1 + carry.to(torch.int32)
    code = (exp + E6M2_BIAS) * 4 + (r - 4)
    code = torch.where(exp < -E6M2_BIAS, torch.zeros_like(code), code)  # below the range: the smallest scale
    code = torch.where(s > 0, code, torch.zeros_like(code))
    code = code.clamp(0, E6M2_NAN - 1).to(torch.uint8)  # above the range: saturate, never the NaN code
    return torch.where(finite, code, torch.full_like(code, E6M2_NAN))


def decode_e6m2(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    value = torch.ldexp(1.0 + (c & 3).float() / 4, ((c >> 2) - E6M2_BIAS).float())
    return torch.where(c == E6M2_NAN, torch.full_like(value, float("nan")), value)


# --- nibble packing ------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] 4-bit codes -> [..., n] bytes; the even-indexed element goes to the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
