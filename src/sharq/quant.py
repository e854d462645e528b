"""Block quantizers (SPEC §2–§3): tensor -> packed QTensor -> dequantized tensor.

Layout: a tensor [..., K] is viewed as [M, K] (M = product of the leading dims), K is zero-padded to a multiple of
the block and cut back on dequantize. Codes are packed two per byte (even element in the low nibble), block
scales are stored as their 8-bit codes, the tensor scale (NVFP4's per-tensor or per-token fp32 scale; fp8's per-row
scale) as fp32.

Formats are one registry (FORMATS): an entry says what a format stores and how it quantizes. NVFP4 has three
entries that share the payload and differ in their numerics (SPEC §3.1): `nvfp4` (the SharQ paper's, SPEC §3),
`nvfp4-torchao` and `nvfp4-compressed-tensors` (bit for bit what those tools compute).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import formats as F

NVFP4_TENSOR_DIVISOR = 448.0 * 6.0  # 2688: largest UE4M3 scale times largest E2M1 element
TENSOR_SCALE_FLOOR = 1e-9
FP8_MAX = 448.0
# How an NVFP4 block scale is chosen (SPEC §11.1): "max" maps the block's max to 6 (SPEC §2); "four_over_six"
# also tries mapping it to 4; "search" also tries the UE4M3 neighbours of the "max" scale. Both keep the candidate
# with the least squared error of the block, the "max" scale on a tie.
SCALE_RULES = ("max", "four_over_six", "search")
# How a weight's NVFP4 tensor scale is chosen (SPEC §11.2): amax / 2688 (SPEC §3), or the multiple of it in
# TENSOR_SCALE_MULTIPLES with the least squared weight error.
TENSOR_SCALE_RULES = ("amax", "search")
TENSOR_SCALE_MULTIPLES = tuple(1 + j / 8 for j in range(8))  # one UE4M3 binade in the steps of its mantissa


@dataclass(frozen=True)
class NVFP4Numerics:
    """Where NVFP4 implementations round differently on the same input (SPEC §3, §3.1). They share the payload
    (E2M1 codes, UE4M3 block scales, one fp32 tensor scale); these choices decide its bits."""

    prescale_bf16: bool  # blocks see bf16(X / s) (SharQ); else X, the tensor scale folded into each block scale
    global_scale: bool  # store g = 2688 / amax, scale = g·(amax/6), elements x / (scale / g) (compressed-tensors);
    #                     else s = amax / 2688, scale = (amax/6) / s, elements x · ((1/s) / scale) (torchao, SharQ)
    block_scale_floor: float  # clamp before UE4M3 rounding: 2⁻⁹ (SharQ), 2⁻⁶ (torchao), 0 (compressed-tensors)
    zero_block_scale: float | None = None  # what replaces a block scale that rounded to 0 (compressed-tensors: 0.125)
    tensor_scale_floor: float = TENSOR_SCALE_FLOOR  # s >= this; with global_scale, g = 2688 / max(amax, tiny)
    input_dtype_scales: bool = False  # amax/6 and g computed in the input's dtype (compressed-tensors), not fp32
    signed_zero: bool = True  # an element exactly −0 after scaling gets code 0b1000; compressed-tensors writes 0
    scale_rule: str = "max"  # how a block scale is chosen (SCALE_RULES); only SPEC §3's numerics take another

    def __post_init__(self) -> None:
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.scale_rule != "max" and (not self.prescale_bf16 or self.global_scale):
            raise ValueError(f"scale_rule {self.scale_rule!r} is defined on SPEC §3's numerics (blocks of bf16(X/s)); "
                             "the tool variants of SPEC §3.1 reproduce a tool and take only 'max'")

    def scale_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype if self.input_dtype_scales else torch.float32


# SPEC §3: the SharQ paper's numerics.
SPEC_NUMERICS = NVFP4Numerics(prescale_bf16=True, global_scale=False, block_scale_floor=F.UE4M3_MIN)
# torchao prototype/mx_formats/nvfp4_tensor.py (nvfp4_quantize, per_tensor_amax_to_scale). torchao has no floor on
# s (an all-zero tensor gives 0/0 = NaN); 2⁻¹²⁰ keeps (1/s)/2⁻⁶ <= 2¹²⁶, finite, and is below every s it computes
# for amax >= 2·10⁻³³.
TORCHAO_NUMERICS = NVFP4Numerics(prescale_bf16=False, global_scale=False, block_scale_floor=2.0**-6,
                                 tensor_scale_floor=2.0**-120)
# compressed-tensors quantization/utils/helpers.py (generate_gparam, calculate_qparams) and lifecycle/forward.py
# (quantize), which llm-compressor uses to write NVFP4 checkpoints.
COMPRESSED_TENSORS_NUMERICS = NVFP4Numerics(prescale_bf16=False, global_scale=True, block_scale_floor=0.0,
                                            zero_block_scale=0.125, input_dtype_scales=True, signed_zero=False)


def _divide(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c, correctly rounded on every device. CUDA torch turns a division by a Python number into a
    multiplication by its rounded reciprocal, which can differ in the last bit; SPEC §3 divides."""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


# --- block quantizers on [M, nb, B] fp32 views -----------------------------------------------------------------
def block_squared_error(v: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """Σ (deq − v)² of each block [M, nb, B] quantized with the given UE4M3 scale codes [M, nb] (SPEC §2's element
    rounding), in fp32, summed pairwise in a fixed order (zero-padded to a power of two, then halves added), so
    every device and the reference compute the same bits and choose the same candidate."""
    s = F.decode_ue4m3(scale_codes).unsqueeze(-1)
    q = F.decode_e2m1(F.encode_e2m1((v * (1.0 / s)).clamp(-F.E2M1_MAX, F.E2M1_MAX)))
    e = (q * s - v).square()
    e = torch.nn.functional.pad(e, (0, (1 << (e.shape[-1] - 1).bit_length()) - e.shape[-1]))
    while e.shape[-1] > 1:
        e = e[..., : e.shape[-1] // 2] + e[..., e.shape[-1] // 2:]
    return e[..., 0]


def _scale_candidates(amax: torch.Tensor, codes: torch.Tensor, rule: str, floor: float) -> list[torch.Tensor]:
    """The UE4M3 scale codes `rule` chooses from, the "max" rule's codes first (SPEC §11.1)."""
    if rule == "four_over_six":
        return [codes, F.encode_ue4m3(amax * 0.25, floor)]  # amax/4: the block's max maps to 4
    if rule == "search":  # one UE4M3 step down and up (codes are monotone), within [floor, 448], NaN kept
        low, high = F.encode_ue4m3(torch.full((), floor)).item(), F.encode_ue4m3(torch.full((), F.UE4M3_MAX)).item()
        finite = codes != F.UE4M3_NAN
        return [codes, torch.where(finite & (codes > low), codes - 1, codes),
                torch.where(finite & (codes < high), codes + 1, codes)]
    return [codes]


def _least_error_scale(v: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """Per block, the candidate scale code with the least squared error; the earlier candidate on a tie (so a
    NaN block, whose errors are NaN, keeps the first)."""
    best = candidates[0]
    if len(candidates) == 1:
        return best
    best_err = block_squared_error(v, best)
    for c in candidates[1:]:
        err = block_squared_error(v, c)
        better = err < best_err
        best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
    return best


def _blocks_nvfp4(v: torch.Tensor, numerics: NVFP4Numerics, t: torch.Tensor | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, None]:
    """NVFP4 blocks with the tensor scale t ([1, 1] or [M, 1]; None: none) folded in as `numerics` orders it.
    Without t the reciprocal order is SPEC §2's: scale = amax/6, elements v · (1/scale). `dtype` is the input's.
    A scale rule other than "max" (SPEC §11.1; t is None there) then picks among candidate scales."""
    amax = v.abs().amax(-1).to(numerics.scale_dtype(dtype))
    a6 = _divide(amax, F.E2M1_MAX)
    one = torch.ones((), device=v.device)
    t = one if t is None else t
    scale = t * a6 if numerics.global_scale else a6 / t
    codes = F.encode_ue4m3(scale, numerics.block_scale_floor)
    if numerics.zero_block_scale is not None:
        codes = torch.where(codes == 0, F.encode_ue4m3(one * numerics.zero_block_scale), codes)
    codes = _least_error_scale(v, _scale_candidates(amax, codes, numerics.scale_rule, numerics.block_scale_floor))
    s = F.decode_ue4m3(codes)
    if numerics.global_scale:
        x = v / (s / t).unsqueeze(-1)
    else:
        x = v * ((1.0 / t) / s).unsqueeze(-1)
    elements = F.encode_e2m1(x.clamp(-F.E2M1_MAX, F.E2M1_MAX))
    if not numerics.signed_zero:  # compressed-tensors: value · torch.sign(value), and sign(−0) is +0
        elements = torch.where(x == 0, torch.zeros_like(elements), elements)
    return elements, codes, None


def _blocks_mxfp4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    amax = v.abs().amax(-1)
    exponent = torch.where(amax > 0, F.floor_log2(amax) - 2, torch.full_like(amax, -127, dtype=torch.int32))
    scale_codes = F.encode_e8m0_exponent(exponent, torch.isfinite(amax))
    inv = 1.0 / F.decode_e8m0(scale_codes)
    return F.encode_e2m1((v * inv.unsqueeze(-1)).clamp(-F.E2M1_MAX, F.E2M1_MAX)), scale_codes, None


def _hif4_shifts(e1_8: torch.Tensor, e1_16: torch.Tensor) -> torch.Tensor:
    """Per-element exponent shift E1_8 + E1_16 for a [M, nb] grid of 64-element units -> [M, nb, 64]."""
    shift = e1_8.repeat_interleave(2, dim=-1).to(torch.int32) + e1_16.to(torch.int32)  # per 4 elements
    return shift.repeat_interleave(4, dim=-1)


def _blocks_hif4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = v.abs()
    v16 = a.reshape(*a.shape[:-1], 16, 4).amax(-1)
    v8 = v16.reshape(*a.shape[:-1], 8, 2).amax(-1)
    scale_codes = F.encode_e6m2(_divide(v8.amax(-1), 7.0))
    s = F.decode_e6m2(scale_codes).unsqueeze(-1)
    e1_8 = (v8 / s) >= 4
    e1_16 = (v16 / s / torch.exp2(e1_8.repeat_interleave(2, dim=-1).float())) >= 2
    codes = F.encode_s1p2(v / s / torch.exp2(_hif4_shifts(e1_8, e1_16).float()))
    weights8 = 1 << torch.arange(8, device=v.device, dtype=torch.int32)
    bits8 = (e1_8.to(torch.int32) * weights8).sum(-1)
    bits16 = (e1_16.reshape(*e1_16.shape[:-1], 2, 8).to(torch.int32) * weights8).sum(-1)
    micro = torch.cat([bits8.unsqueeze(-1), bits16], dim=-1).to(torch.uint8)
    return codes, scale_codes, micro


# --- the format registry -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FormatInfo:
    """One format: what it stores (so storage costs follow from the format, not from a table per recipe), how its
    blocks are quantized and decoded, and for NVFP4 the numerics of its tensor scale. quant, recipes and the
    kernels read this entry; an NVFP4 variant is one more entry with other `numerics`."""

    default_block: int | None  # None: one scale per row (fp8)
    element_bits: int
    scale_bits_per_block: int
    quantize: Callable[[torch.Tensor], tuple] | None = None  # [M, nb, B] -> codes, scale codes, micro (not NVFP4)
    decode_elements: Callable[[torch.Tensor], torch.Tensor] | None = None
    decode_scales: Callable[[torch.Tensor], torch.Tensor] | None = None
    numerics: NVFP4Numerics | None = None  # NVFP4: the tensor scale and its arithmetic (_blocks_nvfp4)

    @property
    def tensor_scale(self) -> bool:
        """NVFP4's fp32 per-tensor (or per-token) scale."""
        return self.numerics is not None

    @property
    def folds_tensor_scale(self) -> bool:
        """The blocks see X itself and take the tensor scale into their arithmetic (the NVFP4 tools), instead of
        the pre-divided bf16(X / s) of SPEC §3."""
        return self.numerics is not None and not self.numerics.prescale_bf16


NVFP4 = FormatInfo(16, 4, 8, None, F.decode_e2m1, F.decode_ue4m3, SPEC_NUMERICS)
FORMATS: dict[str, FormatInfo] = {
    "nvfp4": NVFP4,
    "nvfp4-torchao": replace(NVFP4, numerics=TORCHAO_NUMERICS),
    "nvfp4-compressed-tensors": replace(NVFP4, numerics=COMPRESSED_TENSORS_NUMERICS),
    "mxfp4": FormatInfo(32, 4, 8, _blocks_mxfp4, F.decode_e2m1, F.decode_e8m0),
    "hif4": FormatInfo(64, 4, 32, _blocks_hif4, F.decode_s1p2, F.decode_e6m2),  # E6M2 + 8 + 16 micro bits per 64
    "fp8": FormatInfo(None, 8, 0),  # per-row fp32 scale, amortized over the row
}


def format_info(fmt: str) -> FormatInfo:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):  # TypeError: an unhashable fmt, such as a list of names
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: packed codes, block scale codes and the fp32 tensor scale, enough to dequantize."""

    codes: torch.Tensor  # uint8 [M, Kp/2] (4-bit formats, packed) or [M, K] (fp8 codes)
    scales: torch.Tensor  # uint8 [M, Kp/B] block scale codes (UE4M3, E8M0 or E6M2); empty for fp8
    fmt: str
    block_size: int | None
    shape: tuple[int, ...]  # the original shape [..., K]
    tensor_scale: torch.Tensor | None = None  # fp32 scalar or [M, 1]
    micro: torch.Tensor | None = None  # HiF4: uint8 [M, Kp/64, 3] = E1_8 bits, E1_16 bits (little endian)
    mask: str | None = None  # sparse payloads: the N:M pattern the codes obey
    indices: torch.Tensor | None = None  # sparse payloads: packed 2-bit unit indices (masks.pack_indices)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    def block_scales(self, block_size: int | None = None) -> torch.Tensor:
        """Decoded fp32 block scales [M, Kp/block_size]. A finer view of the same scales (e.g. the 16-element
        dense view of a 32-element weight payload) repeats each scale."""
        s = format_info(self.fmt).decode_scales(self.scales)
        if block_size is None or block_size == self.block_size:
            return s
        if self.block_size % block_size:
            raise ValueError(f"cannot view {self.block_size}-element scales with block {block_size}")
        return s.repeat_interleave(self.block_size // block_size, dim=-1)


# --- per-tensor scale ------------------------------------------------------------------------------------------
def finite_amax(x2d: torch.Tensor, per_row: bool) -> torch.Tensor:
    """max |x| over finite values (SPEC §8), as fp32 [1, 1] or [M, 1]; 0 where there is none. Finite in fp32, where
    the scales are computed: a float64 value beyond fp32's range is Inf there, and counts as one (its amax made every
    row's scale Inf)."""
    a = x2d.abs().float()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), device=x2d.device))
    if per_row:
        return a.amax(-1, keepdim=True) if a.shape[-1] else torch.zeros(a.shape[0], 1, device=a.device)
    return a.amax().reshape(1, 1) if a.numel() else torch.zeros(1, 1, device=a.device)


def _numerics(fmt: str) -> NVFP4Numerics:
    numerics = format_info(fmt).numerics
    if numerics is None:
        raise ValueError(f"{fmt} has no tensor scale")
    return numerics


def nvfp4_tensor_scale(x2d: torch.Tensor, per_row: bool = False, fmt: str = "nvfp4",
                       amax: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor scale `fmt` stores, over the whole tensor (paper) or per row (batch-invariant), from finite
    values: s = max(amax / 2688, floor) (SPEC §3; torchao), or compressed-tensors' g = 2688 / amax (SPEC §3.1).
    `amax` (finite_amax of a wider tensor x2d is a K-slice of) replaces x2d's own."""
    numerics = _numerics(fmt)
    amax = finite_amax(x2d, per_row) if amax is None else amax
    if numerics.global_scale:
        return _global_scale(amax.to(numerics.scale_dtype(x2d.dtype)))
    return torch.clamp_min(_divide(amax, NVFP4_TENSOR_DIVISOR), numerics.tensor_scale_floor)


def _global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' generate_gparam step for step: 2688 / max(amax, tiny) in amax's dtype (torch computes
    `c / t` as t.reciprocal() * c, two roundings), 1 where that is not finite; returned as fp32."""
    g = NVFP4_TENSOR_DIVISOR / amax.clamp(min=torch.finfo(amax.dtype).tiny)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).float()


def output_scale(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """The factor a product of `fmt` payloads is multiplied by: the stored s, or 1/g for a global scale."""
    return torch.reciprocal(t) if _numerics(fmt).global_scale else t


def apply_tensor_scale(x2d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Xs = bf16(X / s), returned as fp32 (exact)."""
    return (x2d.float() / s).to(torch.bfloat16).float()


def tensor_scaled_input(x2d: torch.Tensor, t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the blocks of `fmt` see, and the tensor scale left for their arithmetic: (bf16(X / s), None) in SPEC
    §3; (X, t) for the formats that fold t into each block scale (SPEC §3.1)."""
    if format_info(fmt).folds_tensor_scale:
        return x2d, t
    return apply_tensor_scale(x2d, t), None


MAX_BLOCK = 1024  # larger blocks are no longer block scaling; the bound also caps what padding can allocate


def resolve_block(fmt: str, block_size: int | None) -> int | None:
    """The block size `fmt` quantizes with (its default for None), validated: a positive even int up to MAX_BLOCK,
    64 for HiF4, None for fp8 (one scale per row)."""
    info = format_info(fmt)
    if info.default_block is None:
        if block_size is not None:
            raise ValueError(f"{fmt} uses one scale per row; block_size must be None")
        return None
    if block_size is None:
        return info.default_block
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    block_size = int(block_size)
    if fmt == "hif4" and block_size != 64:
        raise ValueError("hif4 units are 64 elements; block_size must be 64")
    if not 0 < block_size <= MAX_BLOCK or block_size % 2:
        raise ValueError(f"block_size must be an even number from 2 to {MAX_BLOCK}, got {block_size}")
    return block_size


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> contiguous [M, K] (M = product of the leading dims; 1-D input is one row; empty tensors stay
    empty). Contiguous, so a strided input takes the same GEMM path, and gives the same bits, as its copy."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor [..., K], got {type(x).__module__}.{type(x).__name__} (for a "
                        "numpy array: torch.from_numpy)")
    if x.dim() == 0:
        raise ValueError("expected a tensor [..., K], got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    if x.element_size() < 2:  # an 8-bit float output (it follows x) would saturate at 448 or round to 3 bits
        raise TypeError(f"expected a floating-point tensor of 16 bits or more, got {x.dtype}: cast it (x.float())")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def check_scale_rule(fmt: str, rule: str) -> None:
    """A block scale rule other than "max" is defined for SPEC §3's NVFP4 (SPEC §11.1); raise for anything else."""
    if rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {rule!r}")
    numerics = format_info(fmt).numerics
    if rule != "max" and numerics is None:
        raise ValueError(f"scale_rule {rule!r} chooses among UE4M3 block scales: it needs an NVFP4 format, not {fmt}")
    if numerics is not None:
        replace(numerics, scale_rule=rule)  # NVFP4Numerics checks that the numerics take the rule


def quantize_blocks(x2d: torch.Tensor, fmt: str, block_size: int | None = None,
                    tensor_scale: torch.Tensor | None = None, scale_rule: str = "max") -> QTensor:
    """Block-quantize [M, K]. SPEC §3's NVFP4 takes x2d already tensor-scaled (apply_tensor_scale); the NVFP4
    formats that fold the tensor scale into their block arithmetic take it here, and x2d in its own dtype
    (tensor_scaled_input gives both). The result has no tensor scale of its own, except fp8, whose per-row scale
    (its only scale) is in `tensor_scale`. `scale_rule` chooses NVFP4's block scales (SPEC §11.1); the payload
    is the format's either way."""
    b = resolve_block(fmt, block_size)
    check_scale_rule(fmt, scale_rule)
    info = format_info(fmt)
    if tensor_scale is not None and not info.folds_tensor_scale:
        raise ValueError(f"{fmt} blocks take no tensor scale (SPEC §3: divide first, apply_tensor_scale)")
    x = x2d.float()
    m, k = x.shape
    if b is None:  # fp8: per-row dynamic scale, E4M3 elements
        amax = x.abs().amax(-1, keepdim=True) if k else torch.zeros(m, 1, device=x.device)
        # the smallest normal fp32 floor keeps 1/s finite for subnormal rows
        s = _divide(amax, FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        s = torch.where(amax > 0, s, torch.ones_like(amax))
        s = torch.where(torch.isfinite(amax), s, torch.full_like(amax, float("nan")))
        codes = (x * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return QTensor(codes, torch.empty(m, 0, dtype=torch.uint8, device=x.device), fmt, None, (m, k), s)
    pad = -k % b
    v = torch.nn.functional.pad(x, (0, pad)).reshape(m, (k + pad) // b, b)
    if info.numerics is not None:
        numerics = info.numerics if scale_rule == "max" else replace(info.numerics, scale_rule=scale_rule)
        codes, scale_codes, micro = _blocks_nvfp4(v, numerics, tensor_scale, x2d.dtype)
    else:
        codes, scale_codes, micro = info.quantize(v)
    return QTensor(F.pack_nibbles(codes.flatten(-2)), scale_codes, fmt, b, (m, k), micro=micro)


def dequantize_blocks(q: QTensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Codes times block scales, [M, K] fp32. Without a tensor scale every NVFP4/MXFP4/HiF4 value is exactly
    representable in bf16. A tensor scale (the stored s or g) is folded into each block scale first, the order
    of the formats that fold it (SPEC §3.1)."""
    m, k = q.rows, q.shape[-1]
    if q.block_size is None:
        return q.codes.view(torch.float8_e4m3fn).float()
    info = format_info(q.fmt)
    elements = info.decode_elements(F.unpack_nibbles(q.codes)).reshape(m, q.scales.shape[-1], q.block_size)
    scale = q.block_scales()
    if tensor_scale is not None:
        scale = scale / tensor_scale if _numerics(q.fmt).global_scale else tensor_scale * scale
    scale = scale.unsqueeze(-1)
    if q.micro is not None:  # HiF4 micro-exponents
        bits8 = q.micro[..., 0:1].to(torch.int32)
        bits16 = q.micro[..., 1:2].to(torch.int32) | (q.micro[..., 2:3].to(torch.int32) << 8)
        bit = torch.arange(16, device=q.codes.device, dtype=torch.int32)
        e1_8 = (bits8 >> bit[:8]) & 1
        e1_16 = (bits16 >> bit) & 1
        scale = scale * torch.exp2(_hif4_shifts(e1_8, e1_16).float())
    return (elements * scale).flatten(-2)[:, :k]


# --- public API ------------------------------------------------------------------------------------------------
def search_tensor_scale(x2d: torch.Tensor, fmt: str = "nvfp4", block_size: int | None = None,
                        scale_rule: str = "max") -> torch.Tensor:
    """The tensor scale s = c · max(amax/2688, floor), c in TENSOR_SCALE_MULTIPLES, whose quantization has the least
    squared error Σ (s · deq(Q(bf16(X/s))) − X)² (SPEC §11.2; the first c on a tie, so never worse than c = 1).
    For weights, quantized once: len(TENSOR_SCALE_MULTIPLES) quantizations. Returns fp32 [1, 1]."""
    if format_info(fmt).folds_tensor_scale or not format_info(fmt).tensor_scale:
        raise ValueError(f"the tensor scale search is defined on SPEC §3's NVFP4, not {fmt}")
    s0 = nvfp4_tensor_scale(x2d, fmt=fmt)
    if x2d.is_meta:  # a loader's placeholder (checkpoint.build_on_meta): a scale's shape, no values to compare
        return s0
    x = x2d.float()
    best, best_err = s0, None
    for c in TENSOR_SCALE_MULTIPLES:
        s = s0 * c
        q = quantize_blocks(apply_tensor_scale(x2d, s), fmt, block_size, scale_rule=scale_rule)
        d = (dequantize_blocks(q) * s - x).double()
        err = (d * d).sum()
        if best_err is None or bool(err < best_err):
            best, best_err = s, err
    return best


def quantize(
    x: torch.Tensor, fmt: str, block_size: int | None = None, scale_granularity: str = "tensor", strict: bool = False,
    scale_rule: str = "max",
) -> QTensor:
    """Quantize x [..., K] along K. NVFP4 first divides by its fp32 tensor scale (one per tensor, or one per row
    with scale_granularity="token") and rounds to bf16, as SPEC §3 says; its variants nvfp4-torchao and
    nvfp4-compressed-tensors fold the tensor scale into the block scales instead, as those tools do (SPEC §3.1).
    `scale_rule` chooses NVFP4's block scales ("max", SPEC §2; "four_over_six" or "search", SPEC §11.1).

    A block holding NaN/Inf gets the NaN scale code and dequantizes to NaN; tensor scales are taken over finite
    values, so other blocks are unaffected. strict=True raises a ValueError instead."""
    x2d = as_rows(x)
    if strict and not bool(torch.isfinite(x2d).all()):
        bad = x2d.numel() - int(torch.isfinite(x2d).sum())
        raise ValueError(f"quantize: input has {bad} non-finite value(s) (NaN/Inf) out of {x2d.numel()}")
    if scale_granularity not in ("tensor", "token"):
        raise ValueError(f"scale_granularity must be 'tensor' or 'token', got {scale_granularity!r}")
    if scale_granularity == "token" and not format_info(fmt).tensor_scale:  # would be ignored, the input unchanged
        raise ValueError(f"scale_granularity='token' chooses NVFP4's tensor scale per row; {fmt} has no tensor scale")
    if format_info(fmt).tensor_scale:
        t = nvfp4_tensor_scale(x2d, scale_granularity == "token", fmt)
        v, folded = tensor_scaled_input(x2d, t, fmt)
        q = replace(quantize_blocks(v, fmt, block_size, folded, scale_rule), tensor_scale=t)
    else:
        q = quantize_blocks(x2d, fmt, block_size, scale_rule=scale_rule)
    return replace(q, shape=tuple(x.shape))


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to a tensor of the original shape: codes × block scales × tensor scale, in the format's order (SPEC
    §3 scales the product; the formats that fold the tensor scale scale each block scale first, SPEC §3.1)."""
    if q.tensor_scale is not None and format_info(q.fmt).folds_tensor_scale:
        v = dequantize_blocks(q, q.tensor_scale)
    else:
        v = dequantize_blocks(q)
        if q.tensor_scale is not None:
            v = v * q.tensor_scale
    return v.reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: str, block_size: int | None = None) -> torch.Tensor:
    """Quantize and dequantize in one step; the result has x's shape and dtype. Its gradient is the
    straight-through estimator's, the identity, in every format (as a quantized layer's input gets): rounding has a
    zero derivative almost everywhere, and the scales' derivative would send the whole gradient to each block's
    largest element."""
    with torch.no_grad():
        y = dequantize(quantize(x, fmt, block_size), dtype=x.dtype)
    return _StraightThrough.apply(x, y) if torch.is_grad_enabled() and x.requires_grad else y


class _StraightThrough(torch.autograd.Function):
    """y in the forward pass, the incoming gradient passed to x unchanged in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        return dy, None
