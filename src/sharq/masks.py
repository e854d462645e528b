"""Input-adaptive N:M masks along the last dimension (SPEC §4), and compress/expand of the kept values.

All patterns are one mechanism: split K into chunks of ``m`` units of ``group`` adjacent elements, score each unit
by its largest |x|, keep the ``n`` best units; ties go to the lower unit index. pair-4:8 is (n=2, m=4, group=2),
2:4 is (n=2, m=4, group=1). The chunk's largest element is always kept. NaN scores rank highest, so a NaN is kept
(and stays visible downstream) and every chunk still keeps exactly ``n`` units.

Another unit score is an option of the spec (SPEC §11.3): ``pair-l2-4:8`` scores a pair by its squared L2 norm
a² + b², which keeps the pair carrying more energy even when it does not hold the chunk's largest element.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


_NAN_BITS = 0x7FC00000  # the canonical quiet NaN: ranks above +Inf (0x7F800000)
SCORES = ("max", "l2")  # a unit's score: its largest |x| (SPEC §4), or Σ x² over the unit (SPEC §11.3)


@dataclass(frozen=True)
class MaskSpec:
    n: int
    m: int
    group: int = 1
    score: str = "max"

    def __post_init__(self) -> None:
        if not (0 < self.n <= self.m) or self.group < 1:
            raise ValueError(f"invalid mask {self.n}:{self.m} with group {self.group}")
        if self.score not in SCORES:
            raise ValueError(f"unknown mask score {self.score!r}; known: {', '.join(SCORES)}")
        if self.score != "max" and self.group == 1:
            raise ValueError("an l2 score ranks single elements as max |x| does: use it with units of 2 or more")

    @property
    def chunk(self) -> int:
        """Elements per chunk (the K granularity of the mask)."""
        return self.m * self.group

    @property
    def kept_fraction(self) -> float:
        return self.n / self.m

    @property
    def index_bits_per_element(self) -> float:
        """Metadata cost: one ceil(log2 m)-bit unit index per kept unit."""
        return self.n * math.ceil(math.log2(self.m)) / self.chunk if self.m > 1 else 0.0

    def __str__(self) -> str:
        score = "" if self.score == "max" else f"{self.score}-"
        if self.group == 2:
            return f"pair-{score}{self.n * 2}:{self.m * 2}"
        return f"{score}{self.n}:{self.m}" + ("" if self.group == 1 else f"x{self.group}")


def parse_mask(spec: str | MaskSpec) -> MaskSpec:
    """'pair-4:8' -> pairs, 2 of 4 kept; '2:4' / 'N:M' -> scalar; 'N:MxG' -> units of G elements; a score after
    'pair-' or in front ('pair-l2-4:8', 'l2-2:4x4') scores units by Σ x² instead of max |x|."""
    if isinstance(spec, MaskSpec):
        return spec
    score = r"(?:(l2)-)?"
    if m := re.fullmatch(rf"pair-{score}(\d+):(\d+)", spec):
        n, total = int(m[2]), int(m[3])
        if n % 2 or total % 2:
            raise ValueError(f"pair mask {spec!r} needs even N and M")
        return MaskSpec(n // 2, total // 2, 2, m[1] or "max")
    if m := re.fullmatch(rf"{score}(\d+):(\d+)(?:x(\d+))?", spec):
        return MaskSpec(int(m[2]), int(m[3]), int(m[4] or 1), m[1] or "max")
    raise ValueError(f"unknown mask {spec!r}; expected 'pair-4:8', 'pair-l2-4:8', '2:4' or 'N:M'")


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def kept_units(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The kept unit indices of every chunk, [..., ceil(K/chunk), n] int64 in increasing order (K zero-padded)."""
    xp = _pad_to(x, spec.chunk)
    units = xp.unflatten(-1, (xp.shape[-1] // spec.chunk, spec.m, spec.group))
    score = unit_scores(units.float(), spec.score)  # [..., C, m], all >= 0 or NaN
    # Unique keys: non-negative floats order like their int32 bit patterns, NaN (one pattern) above +Inf above
    # every finite score, as the kernel orders them; the low digits break ties towards the lower unit index.
    bits = torch.where(score.isnan(), _NAN_BITS, score.view(torch.int32)).long()
    key = bits * spec.m + torch.arange(spec.m - 1, -1, -1, device=x.device)
    return key.topk(spec.n, dim=-1).indices.sort(dim=-1).values


def unit_scores(units: torch.Tensor, score: str) -> torch.Tensor:
    """[..., m, group] fp32 -> [..., m]: max |x| of each unit, or Σ x² added in element order (fp32; beyond
    |x| ≈ 1.8·10¹⁹ a square is +Inf and ties with other infinite scores, broken towards the lower unit)."""
    if score == "max":
        return units.abs().amax(-1)
    sq = units.square()
    total = sq[..., 0]
    for j in range(1, units.shape[-1]):
        total = total + sq[..., j]
    return total


def units_to_mask(units: torch.Tensor, spec: MaskSpec, k: int) -> torch.Tensor:
    """Kept unit indices [..., C, n] -> boolean element mask [..., k]."""
    keep = torch.zeros(*units.shape[:-1], spec.m, dtype=torch.bool, device=units.device)
    keep.scatter_(-1, units, True)
    return keep.repeat_interleave(spec.group, dim=-1).flatten(-2)[..., :k]


def n_of_m_mask(x: torch.Tensor, n: int, m: int, group: int = 1) -> torch.Tensor:
    """Boolean mask of x's shape keeping the n best of every m units of `group` elements along the last dim."""
    spec = MaskSpec(n, m, group)
    return units_to_mask(kept_units(x, spec), spec, x.shape[-1])


def pair_4of8(x: torch.Tensor) -> torch.Tensor:
    """SharQ-NVFP4's mask: keep the 2 best of 4 adjacent pairs in every 8 elements."""
    return n_of_m_mask(x, 2, 4, group=2)


def two_of_four(x: torch.Tensor) -> torch.Tensor:
    """Hopper's 2:4 pattern: keep the 2 largest |x| of every 4."""
    return n_of_m_mask(x, 2, 4)


def compress(x: torch.Tensor, spec: str | MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the selected units: (values [..., C*n*group], unit indices uint8 [..., C, n] in increasing order).

    K is zero-padded to the chunk; `expand` with the original K cuts it back."""
    spec = parse_mask(spec)
    idx = kept_units(x, spec)
    units = _pad_to(x, spec.chunk).reshape(*idx.shape[:-1], spec.m, spec.group)
    values = torch.gather(units, -2, idx.unsqueeze(-1).expand(*idx.shape, spec.group))
    return values.flatten(-3), idx.to(torch.uint8)


def expand(values: torch.Tensor, indices: torch.Tensor, spec: str | MaskSpec, k: int) -> torch.Tensor:
    """Inverse of `compress`: scatter the kept values back to a dense [..., k] tensor with zeros elsewhere."""
    spec = parse_mask(spec)
    lead, chunks = indices.shape[:-2], indices.shape[-2]
    units = values.reshape(*lead, chunks, spec.n, spec.group)
    dense = torch.zeros(*lead, chunks, spec.m, spec.group, dtype=values.dtype, device=values.device)
    dense.scatter_(-2, indices.long().unsqueeze(-1).expand_as(units), units)
    return dense.flatten(-3)[..., :k]


def pack_indices(indices: torch.Tensor) -> torch.Tensor:
    """2-bit unit indices (m <= 4) [..., C, n] -> bytes, four indices per byte, the first in the lowest bits."""
    flat = indices.flatten(-2)
    flat = _pad_to(flat, 4)
    q = flat.unflatten(-1, (flat.shape[-1] // 4, 4)).to(torch.uint8)
    return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)


def unpack_indices(packed: torch.Tensor, chunks: int, n: int) -> torch.Tensor:
    q = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(-2)
    return q[..., : chunks * n].reshape(*packed.shape[:-1], chunks, n)
