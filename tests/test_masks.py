import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sharq import masks

from . import reference as ref

SPECS = [("pair-4:8", 2, 4, 2), ("2:4", 2, 4, 1), ("1:4", 1, 4, 1), ("3:8", 3, 8, 1), ("pair-2:8", 1, 4, 2)]

# Tie-heavy values: few distinct magnitudes, both signs.
tie_heavy = st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5])
any_finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=True)


def arrays(elements):
    return hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)), elements=elements)


@pytest.mark.parametrize("name,n,m,group", SPECS)
@settings(max_examples=60, deadline=None)
@given(x=st.one_of(arrays(tie_heavy), arrays(any_finite)))
def test_mask_keeps_n_of_m_ties_low_and_largest(name, n, m, group, x):
    spec = masks.parse_mask(name)
    assert (spec.n, spec.m, spec.group) == (n, m, group)
    t = torch.from_numpy(x)
    mask = masks.n_of_m_mask(t, n, m, group)
    np.testing.assert_array_equal(mask.numpy(), ref.n_of_m(x, n, m, group))
    chunk = m * group
    padded = np.pad(x, ((0, 0), (0, -x.shape[1] % chunk)))  # zero padding is what the mask sees beyond K
    full = masks.n_of_m_mask(torch.from_numpy(padded), n, m, group).numpy()
    np.testing.assert_array_equal(full[:, : x.shape[1]], mask.numpy())
    per_chunk = full.reshape(x.shape[0], -1, chunk)
    # exactly n units per chunk, the chunk's largest element among them
    assert (per_chunk.sum(-1) == n * group).all()
    vals = np.abs(padded).reshape(x.shape[0], -1, chunk)
    top = np.take_along_axis(per_chunk, vals.argmax(-1)[..., None], -1)
    assert top.all()


def test_all_zero_chunk_keeps_pairs_zero_and_one():
    mask = masks.pair_4of8(torch.zeros(1, 8))
    assert mask.tolist() == [[True, True, True, True, False, False, False, False]]
    assert masks.two_of_four(torch.zeros(1, 4)).tolist() == [[True, True, False, False]]


def test_pair_score_is_max_of_the_pair():
    x = torch.tensor([[0.1, 5.0, 3.0, 3.0, 4.9, 0.0, -6.0, 0.0]])
    # pair scores 5, 3, 4.9, 6 -> keep pairs 0 and 3
    assert masks.pair_4of8(x).tolist() == [[True, True, False, False, False, False, True, True]]


def test_nan_is_kept_and_count_stays_n():
    x = torch.tensor([[1.0, float("nan"), 3.0, 2.0]])
    mask = masks.two_of_four(x)
    assert mask.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("name", ["pair-4:8", "2:4"])
def test_compress_expand_round_trip(name, rng):
    spec = masks.parse_mask(name)
    for k in (8, 24, 37):
        x = torch.randn(5, k, generator=rng)
        values, idx = masks.compress(x, spec)
        assert values.shape == (5, -(-k // spec.chunk) * spec.n * spec.group)
        mask = masks.n_of_m_mask(x, spec.n, spec.m, spec.group)
        assert torch.equal(masks.expand(values, idx, spec, k), torch.where(mask, x, torch.zeros_like(x)))
        chunks = idx.shape[-2]
        assert torch.equal(masks.unpack_indices(masks.pack_indices(idx), chunks, spec.n), idx)
        assert (idx[..., 1:] > idx[..., :-1]).all()  # increasing order


def test_parse_mask_errors():
    for bad in ("pair-3:8", "4:2", "banana", "0:4"):
        with pytest.raises(ValueError):
            masks.parse_mask(bad)
    assert str(masks.parse_mask("pair-4:8")) == "pair-4:8"
    assert masks.parse_mask("pair-4:8").index_bits_per_element == 0.5


@settings(max_examples=100, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(0, 50)),
                    elements=st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), tie_heavy)),
       name=st.sampled_from(["pair-4:8", "2:4", "3:8"]))
def test_fuzz_masks_keep_exactly_n_and_keep_non_finite(x, name):
    spec = masks.parse_mask(name)
    t = torch.from_numpy(x)
    units = masks.kept_units(t, spec)
    assert units.shape == (x.shape[0], -(-x.shape[1] // spec.chunk), spec.n)
    assert (units[..., 1:] > units[..., :-1]).all()  # n distinct units, increasing
    mask = masks.n_of_m_mask(t, spec.n, spec.m, spec.group)
    assert mask.shape == t.shape
    # a NaN or an infinity is always kept, unless its chunk holds more of them than it keeps units
    chunk_bad = torch.nn.functional.pad(~torch.isfinite(t), (0, -x.shape[1] % spec.chunk))
    per_chunk = chunk_bad.unflatten(-1, (chunk_bad.shape[-1] // spec.chunk, spec.chunk)).sum(-1)
    few = (per_chunk <= spec.n).repeat_interleave(spec.chunk, -1)[:, : x.shape[1]]
    assert mask[~torch.isfinite(t) & few].all()
