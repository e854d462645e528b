"""The options of SPEC §11 against a slow, independent restatement of that section in numpy + ml_dtypes
(block by block, every FP4/FP8 rounding done by ml_dtypes), plus the property each option exists for."""

import json

import ml_dtypes as md
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sharq
from sharq import formats as F
from sharq import masks
from sharq.quant import TENSOR_SCALE_MULTIPLES, dequantize_blocks, quantize_blocks, search_tensor_scale
from sharq.recipes import Recipe, Stage

from . import reference as ref
from .conftest import outlier_activations

f32 = np.float32
RULES = ("max", "four_over_six", "search")


# --- the reference: SPEC §11 written out ------------------------------------------------------------------------
def ue4m3_value(code: int) -> f32:
    return np.array([code], np.uint8).view(md.float8_e4m3fn).astype(f32)[0]


def pairwise_sum(e: np.ndarray) -> f32:
    """SPEC §11.1's order: zero-pad to a power of two, then add the second half onto the first until one is left."""
    e = np.concatenate([e.astype(f32), np.zeros((1 << (len(e) - 1).bit_length()) - len(e), f32)])
    while len(e) > 1:
        e = (e[: len(e) // 2] + e[len(e) // 2:]).astype(f32)
    return e[0]


def block_error(v: np.ndarray, s: f32) -> f32:
    _, q = ref.e2m1(v * (f32(1) / s))
    return pairwise_sum(np.square((q * s).astype(f32) - v))


def candidate_codes(v: np.ndarray, rule: str) -> list[int]:
    amax = f32(np.abs(v).max())
    c6 = int(ref.ue4m3(amax / f32(6))[0])
    if rule == "four_over_six":
        return [c6, int(ref.ue4m3(amax / f32(4))[0])]
    if rule == "search":
        return [c6, c6 - 1 if c6 > 1 else c6, c6 + 1 if c6 < 0x7E else c6]
    return [c6]


def rule_blocks(x: np.ndarray, b: int, rule: str):
    """Codes [M, Kp], scale codes [M, nb], dequantized [M, K], and each block's (errors of all candidates, chosen
    index), for an already tensor-scaled x."""
    m, k = x.shape
    codes, scodes, deq, errors = [], [], [], []
    for row in ref.blocks(np.asarray(x, f32), b):
        for v in row:
            cands = candidate_codes(v, rule)
            errs = [block_error(v, ue4m3_value(c)) for c in cands]
            best = min(range(len(cands)), key=lambda i: (errs[i], i))  # the first of the least
            s = ue4m3_value(cands[best])
            qc, qv = ref.e2m1(v * (f32(1) / s))
            codes.append(qc), scodes.append(cands[best]), deq.append(qv * s), errors.append((errs, best))
    return (np.array(codes).reshape(m, -1), np.array(scodes, np.uint8).reshape(m, -1),
            np.array(deq, f32).reshape(m, -1)[:, :k], errors)


def l2_mask(x: np.ndarray, n: int, m: int, group: int) -> np.ndarray:
    """SPEC §11.3: units scored by Σ x² (fp32, element order), the n best kept, ties to the lower unit; a NaN score
    ranks above every other (+Inf included)."""
    rows, k = x.shape
    chunk = m * group
    xp = np.pad(np.asarray(x, f32), ((0, 0), (0, -k % chunk)))
    mask = np.zeros_like(xp, bool)
    for r in range(rows):
        for c in range(0, xp.shape[1], chunk):
            units = xp[r, c: c + chunk].reshape(m, group)
            score = [f32(sum((u * u).astype(f32)[1:], start=(u * u).astype(f32)[0])) for u in units]
            for i in sorted(range(m), key=lambda i: (not np.isnan(score[i]), -np.nan_to_num(score[i], nan=0), i))[:n]:
                mask[r, c + i * group: c + (i + 1) * group] = True
    return mask[:, :k]


def scaled(x: np.ndarray, s: f32) -> np.ndarray:
    return (np.asarray(x, f32) / s).astype(md.bfloat16).astype(f32)


def _codes(q):
    return F.unpack_nibbles(q.codes).numpy()


def _data(rng, m, k):
    """Outlier-rich rows at spread magnitudes, with a few exact E2M1-grid values (ties between candidates)."""
    x = outlier_activations(rng, m, k, frac=0.1) * torch.exp2(torch.randint(-10, 8, (m, 1), generator=rng)).float()
    x[0, : min(k, 16)] = torch.tensor([6.0, 4.0, 3.0, -2.0, 1.5, 1.0, 0.5, 0.0] * 2)[: min(k, 16)]
    return x


# --- §11.1 block scale rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k", [16, 48, 17, 100])
def test_scale_rules_bit_exact_against_reference(rule, k, rng):
    x = _data(rng, 7, k)
    for b in (16, 32):
        q = quantize_blocks(x, "nvfp4", b, scale_rule=rule)
        codes, scales, deq, _ = rule_blocks(x.numpy(), b, rule)
        np.testing.assert_array_equal(_codes(q), codes)
        np.testing.assert_array_equal(q.scales.numpy(), scales)
        np.testing.assert_array_equal(dequantize_blocks(q).numpy(), deq)
        assert q.fmt == "nvfp4" and q.block_size == b  # the payload is NVFP4's: every decoder reads it


def test_max_rule_is_spec_section_2(rng):
    x = _data(rng, 5, 64)
    for b in (16, 32):
        codes, scales, deq = ref.nvfp4_blocks(x.numpy(), b)
        q = quantize_blocks(x, "nvfp4", b, scale_rule="max")
        np.testing.assert_array_equal(q.scales.numpy(), scales)
        np.testing.assert_array_equal(dequantize_blocks(q).numpy(), deq)


@pytest.mark.parametrize("rule", ["four_over_six", "search"])
def test_scale_rules_never_increase_a_blocks_error(rule, rng):
    """What the rules are for: per block, the chosen scale's squared error is the least of its candidates, so never
    above the max rule's (measured by the reference in fp32 pairwise and, independently, in float64); and somewhere
    it is strictly below."""
    x = _data(rng, 16, 256)
    _, _, deq_max, _ = rule_blocks(x.numpy(), 16, "max")
    _, _, deq, errors = rule_blocks(x.numpy(), 16, rule)
    for errs, best in errors:
        assert errs[best] == min(errs) and errs[best] <= errs[0]
    if rule == "four_over_six":
        assert all(len(errs) == 2 for errs, _ in errors)  # the error of 4/6 is min(E(amax/6), E(amax/4))
    e64 = lambda d: ((d.astype(np.float64) - x.numpy()) ** 2).reshape(16, -1, 16).sum(-1)  # noqa: E731
    assert (e64(deq) <= e64(deq_max) * (1 + 1e-5) + 1e-30).all()
    assert e64(deq).sum() < e64(deq_max).sum()
    assert any(best != 0 for _, best in errors)


def test_four_over_six_takes_four_when_the_grid_fits():
    """A block whose values sit on the grid of amax/4 (amax = 4·s): the 4-rule reproduces it exactly, the 6-rule
    cannot (its scale 4/6 rounds and 3.0 · (6/4) = 4.5 is no E2M1 value)."""
    x = torch.tensor([[4.0, 3.0, -1.0, 0.5] + [0.0] * 12])
    q6 = quantize_blocks(x, "nvfp4", 16)
    q = quantize_blocks(x, "nvfp4", 16, scale_rule="four_over_six")
    assert torch.equal(dequantize_blocks(q), x)
    assert not torch.equal(dequantize_blocks(q6), x)
    assert F.decode_ue4m3(q.scales).item() == 1.0


def test_search_neighbours_stay_in_range():
    """The UE4M3 neighbours are codes c−1 and c+1 within [2⁻⁹, 448]: a block at the floor or at 448 keeps its
    scale among the candidates; an all-zero block keeps the floor scale."""
    x = torch.zeros(3, 16)
    x[1, 0] = 2688.0  # scale 448 = code 0x7E, the largest
    x[2, 0] = 2.0**-12  # below the floor: code 1
    q = quantize_blocks(x, "nvfp4", 16, scale_rule="search")
    assert q.scales[:, 0].tolist() == [1, 0x7E, 1]
    assert torch.equal(dequantize_blocks(q)[1:2], dequantize_blocks(quantize_blocks(x, "nvfp4", 16))[1:2])


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 70)),
                    elements=st.one_of(st.floats(-3000, 3000, width=32),
                                       st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 6.0, 2.0**-9]))),
       rule=st.sampled_from(["four_over_six", "search"]))
def test_fuzz_rules_non_finite_blocks_become_nan_and_nothing_else_changes(x, rule):
    t = torch.from_numpy(x)
    y = dequantize_blocks(quantize_blocks(t, "nvfp4", 16, scale_rule=rule))
    bad = torch.nn.functional.pad(~torch.isfinite(t), (0, -t.shape[1] % 16)).reshape(t.shape[0], -1, 16).any(-1)
    bad = bad.repeat_interleave(16, -1)[:, : t.shape[1]]
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    clean = dequantize_blocks(quantize_blocks(torch.where(torch.isfinite(t), t, 0.0), "nvfp4", 16, scale_rule=rule))
    assert torch.equal(y[~bad], clean[~bad])


def test_public_quantize_takes_the_rule(rng):
    x = outlier_activations(rng, 6, 64)
    q = sharq.quantize(x, "nvfp4", scale_rule="four_over_six")
    s = ref.tensor_scale(x.numpy())
    _, scales, deq, _ = rule_blocks(scaled(x.numpy(), f32(s)), 16, "four_over_six")
    np.testing.assert_array_equal(q.scales.numpy(), scales)
    np.testing.assert_array_equal(sharq.dequantize(q).numpy(), deq * f32(s))


# --- §11.2 the weight tensor scale search --------------------------------------------------------------------------
def reference_tensor_scale(w: np.ndarray, b: int, rule: str) -> tuple[f32, np.ndarray]:
    s0 = f32(ref.tensor_scale(w))
    best = None
    for c in TENSOR_SCALE_MULTIPLES:
        s = f32(s0 * f32(c))
        deq = rule_blocks(scaled(w, s), b, rule)[2]
        err = np.sum(((deq * s).astype(f32).astype(np.float64) - w.astype(np.float64)) ** 2)
        if best is None or err < best[0]:
            best = (err, s, deq)
    return best[1], best[2]


@pytest.mark.parametrize("rule", ["max", "search"])
def test_tensor_scale_search_against_reference(rule, rng):
    w = torch.randn(12, 96, generator=rng) * torch.exp2(torch.randint(-3, 3, (12, 1), generator=rng))
    s, deq = reference_tensor_scale(w.numpy(), 32, rule)
    recipe = sharq.get_recipe("sharq", weight_tensor_scale_rule="search", weight_scale_rule=rule)
    qw = recipe.prepare_weight(w)
    assert qw.scale.item() == s
    np.testing.assert_array_equal(qw.values.float().numpy(), deq)
    assert search_tensor_scale(w, "nvfp4", 32, rule).item() == s


def test_tensor_scale_search_never_increases_the_weight_error(rng):
    w = torch.randn(64, 256, generator=rng)
    err = {}
    for rule in ("amax", "search"):
        qw = sharq.get_recipe("sharq", weight_tensor_scale_rule=rule).prepare_weight(w)
        err[rule] = ((qw.effective().double() - w.double()) ** 2).sum().item()
    assert err["search"] <= err["amax"]


# --- §11.3 the L2 pair mask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n,m,group", [("pair-l2-4:8", 2, 4, 2), ("pair-l2-2:8", 1, 4, 2), ("l2-2:4x4", 2, 4, 4)])
@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                    elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([0.0, 1.0, -1.0, 2.0]))))
def test_l2_mask_bit_exact_against_reference(name, n, m, group, x):
    spec = masks.parse_mask(name)
    assert (spec.n, spec.m, spec.group, spec.score) == (n, m, group, "l2") and str(spec) == name
    mask = masks.units_to_mask(masks.kept_units(torch.from_numpy(x), spec), spec, x.shape[1])
    np.testing.assert_array_equal(mask.numpy(), l2_mask(x, n, m, group))


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 24)),
                    elements=st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                       st.sampled_from([np.nan, np.inf, -np.inf, 2e19, -2e19, 1.0, 0.0]))))
def test_l2_mask_ranks_nan_then_infinite_scores_first(x):
    """SPEC §11.3 (as §4): a NaN score ranks above +Inf, so a NaN stays visible; squares beyond ~1.8·10¹⁹ are +Inf
    and tie, broken towards the lower pair."""
    spec = masks.parse_mask("pair-l2-4:8")
    mask = masks.units_to_mask(masks.kept_units(torch.from_numpy(x), spec), spec, x.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(mask.numpy(), l2_mask(x, 2, 4, 2))


def test_l2_mask_keeps_the_most_energy(rng):
    """What it is for: per chunk it keeps the pairs with the largest Σ x², so the backbone carries at least as
    much of the chunk's energy as pair-max's choice, and sometimes it drops the chunk's largest element."""
    x = torch.randn(64, 512, generator=rng)
    energy = lambda mask: torch.where(mask, x.double() ** 2, 0).reshape(64, -1, 8).sum(-1)  # noqa: E731
    spec = masks.parse_mask("pair-l2-4:8")
    l2 = masks.units_to_mask(masks.kept_units(x, spec), spec, 512)
    mx = masks.pair_4of8(x)
    assert (energy(l2) >= energy(mx) * (1 - 1e-6)).all()
    assert (energy(l2) > energy(mx)).any()
    chunk_max = x.abs().reshape(64, -1, 8).argmax(-1, keepdim=True)
    assert not torch.gather(l2.reshape(64, -1, 8), -1, chunk_max).all()


def test_pair_4of8_unchanged_by_the_score_option():
    spec = masks.parse_mask("pair-4:8")
    assert spec == masks.MaskSpec(2, 4, 2) and spec.score == "max" and str(spec) == "pair-4:8"
    for bad in ("pair-l1-4:8", "l2-2:4", "pair-l2-3:8"):
        with pytest.raises(ValueError):
            masks.parse_mask(bad)


# --- recipes: the options as data ---------------------------------------------------------------------------------
def reference_cascade(x: np.ndarray, stages: list[tuple]) -> np.ndarray:
    """SPEC §5's cascade with the options: (fmt nvfp4, block, mask, rule) per stage."""
    s = f32(ref.tensor_scale(x))
    r = scaled(x, s)
    total = np.zeros_like(r)
    for block, mask, rule in stages:
        v = r
        if mask:
            spec = masks.parse_mask(mask)
            keep = l2_mask(r, spec.n, spec.m, spec.group) if spec.score == "l2" else ref.n_of_m(r, spec.n, spec.m,
                                                                                                  spec.group)
            v = np.where(keep, r, f32(0))
        d = rule_blocks(v, block, rule)[2]
        total, r = total + d, r - d
    return total


OPTION_STAGES = [
    ((32, "pair-4:8", "four_over_six"), (16, None, "four_over_six")),
    ((32, "pair-4:8", "max"), (16, None, "search")),
    ((32, "pair-l2-4:8", "max"), (16, None, "max")),
    ((32, "pair-l2-4:8", "search"), (32, None, "four_over_six")),
]


@pytest.mark.parametrize("stages", OPTION_STAGES)
def test_option_cascades_match_the_reference(stages, rng):
    x = outlier_activations(rng, 9, 136)
    recipe = sharq.get_recipe("sharq", stages=tuple(Stage("nvfp4", b, mask, rule) for b, mask, rule in stages))
    act = recipe.prepare_activation(x)
    assert act.scale.item() == ref.tensor_scale(x.numpy())
    np.testing.assert_array_equal(act.values.numpy(), reference_cascade(x.numpy(), list(stages)))
    assert sharq.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_weight_rules_and_w16_against_reference(rng):
    w = torch.randn(10, 80, generator=rng)
    s = f32(ref.tensor_scale(w.numpy()))
    for block, rule in ((32, "search"), (32, "four_over_six"), (16, "max"), (16, "four_over_six")):
        recipe = sharq.get_recipe("sharq", weight_block=block, weight_scale_rule=rule)
        qw = recipe.prepare_weight(w)
        codes, scales, deq, _ = rule_blocks(scaled(w.numpy(), s), block, rule)
        assert qw.scale.item() == s and qw.packed.fmt == "nvfp4" and qw.packed.block_size == block
        np.testing.assert_array_equal(_codes(qw.packed), codes)
        np.testing.assert_array_equal(qw.packed.scales.numpy(), scales)
        np.testing.assert_array_equal(qw.values.float().numpy(), deq)


def test_w16_costs_a_quarter_bit_more():
    assert sharq.get_recipe("sharq").weight_bits == 4.25
    assert sharq.get_recipe("sharq", weight_block=16).weight_bits == 4.5
    assert sharq.get_recipe("sharq", weight_block=16).activation_bits == 7.25


def test_options_cost_no_bits():
    """Scale rules and the L2 score change values, not the payload: the bits are the paper recipe's."""
    base = sharq.get_recipe("sharq")
    for opts in ({"weight_scale_rule": "search"}, {"weight_tensor_scale_rule": "search"},
                 {"stages": (Stage("nvfp4", 32, "pair-l2-4:8", "four_over_six"), Stage("nvfp4", 16, None, "search"))}):
        r = base.with_options(**opts)
        assert (r.activation_bits, r.weight_bits) == (7.25, 4.25)


def test_registered_recipes_serialise_as_before():
    """Options at their default are left out of to_dict: every registered recipe has exactly the keys it had
    before the options existed (checkpoint configs and digests unchanged, older sharq reads them); sharq-plus, which
    is made of options, has theirs too."""
    for name in sharq.list_recipes(compat=True):
        d = sharq.get_recipe(name).to_dict()
        if name == "sharq-plus":
            assert d.pop("weight_scale_rule") == "four_over_six"
        assert set(d) == {"name", "weight_fmt", "weight_block", "stages", "scale_granularity", "outlier_fraction",
                          "description"}
        assert all(set(s) == {"fmt", "block_size", "mask"} for s in d["stages"])
    r = sharq.get_recipe("sharq", weight_scale_rule="search", weight_tensor_scale_rule="search",
                         stages=(Stage("nvfp4", 32, "pair-l2-4:8", "four_over_six"), Stage("nvfp4", 16)))
    d = r.to_dict()
    assert d["weight_scale_rule"] == "search" and d["weight_tensor_scale_rule"] == "search"
    assert d["stages"][0]["scale_rule"] == "four_over_six" and "scale_rule" not in d["stages"][1]
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r and r != sharq.get_recipe("sharq")


def test_bad_options_are_rejected():
    sharq_dict = sharq.get_recipe("sharq").to_dict()
    bad = [
        lambda: Stage("nvfp4", 16, scale_rule="median"),
        lambda: Stage("mxfp4", 32, scale_rule="four_over_six"),  # E8M0 scales: no UE4M3 candidates
        lambda: Stage("hif4", 64, scale_rule="search"),
        lambda: Stage("nvfp4-torchao", 16, scale_rule="search"),  # a tool's numerics stay the tool's
        lambda: Stage("nvfp4", 16, "l2-2:4"),  # L2 of one element is max |x|
        lambda: sharq.get_recipe("sharq", weight_scale_rule=["search"]),
        lambda: sharq.get_recipe("mxfp4", weight_scale_rule="search"),
        lambda: sharq.get_recipe("sharq", weight_tensor_scale_rule="mse"),
        lambda: sharq.get_recipe("mxfp4", weight_tensor_scale_rule="search"),
        lambda: sharq.get_recipe("sharq", weight_fmt="bf16", weight_block=None, weight_scale_rule="search"),
        lambda: Recipe.from_dict({**sharq_dict, "stages": [{"fmt": "nvfp4", "scale_rule": 4}]}),
        lambda: Recipe.from_dict({**sharq_dict, "weight_tensor_scale_rule": None}),
        lambda: quantize_blocks(torch.ones(2, 32), "mxfp4", scale_rule="search"),
        lambda: search_tensor_scale(torch.ones(2, 32), "mxfp4"),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


def test_options_run_through_simulate_linear(rng):
    """A recipe with every option is an ordinary recipe: one layer's output is α · (Σ deq) · Ŵᵀ."""
    x, w = outlier_activations(rng, 8, 96), torch.randn(16, 96, generator=rng)
    r = sharq.get_recipe("sharq", weight_scale_rule="search", weight_tensor_scale_rule="search",
                         stages=(Stage("nvfp4", 32, "pair-l2-4:8", "four_over_six"), Stage("nvfp4", 16, None, "search")))
    act, qw = r.prepare_activation(x), r.prepare_weight(w)
    expected = (act.values @ qw.values.float().T) * (act.scale * qw.scale)
    torch.testing.assert_close(sharq.simulate_linear(x, w, recipe=r), expected, rtol=0, atol=0)


# --- which backends run the options ---------------------------------------------------------------------------------
def test_fused_kernels_refuse_activation_options_and_take_weight_options():
    """The fused activation kernel implements SPEC §3–§5 only: a stage scale rule or the L2 mask sends a recipe to
    the reference preparation (and off the packed backend). The weight options change only the NVFP4 payload's
    values and s_w, so the packed GEMM reads them as they are."""
    pytest.importorskip("triton")
    from sharq.backends.packed import supports as _packed_supports
    from sharq.kernels.prepare import supports

    base = sharq.get_recipe("sharq")
    s1, s2 = base.stages
    activation_options = [
        base.with_options(stages=(Stage("nvfp4", 32, "pair-4:8", "four_over_six"), s2)),
        base.with_options(stages=(s1, Stage("nvfp4", 16, None, "search"))),
        base.with_options(stages=(Stage("nvfp4", 32, "pair-l2-4:8"), s2)),
        sharq.get_recipe("nvfp4", stages=(Stage("nvfp4", 16, None, "four_over_six"),)),
    ]
    for r in activation_options:
        assert not supports(r) and not _packed_supports(r)
    weight_options = [base.with_options(weight_scale_rule="four_over_six"),
                      base.with_options(weight_scale_rule="search", weight_tensor_scale_rule="search"),
                      base.with_options(weight_block=16)]
    for r in weight_options:
        assert supports(r) and _packed_supports(r)


# --- sharq-plus: the options the screen chose, as a named recipe (SPEC §11.5) ---------------------------------------
def test_sharq_plus_is_sharqs_activations_with_w16_four_over_six_weights():
    plus, paper = sharq.get_recipe("sharq-plus"), sharq.get_recipe("sharq")
    assert (plus.weight_fmt, plus.weight_block, plus.weight_scale_rule, plus.weight_tensor_scale_rule) == \
        ("nvfp4", 16, "four_over_six", "amax")
    assert plus.stages == paper.stages == (Stage("nvfp4", 32, "pair-4:8"), Stage("nvfp4", 16))
    assert (plus.scale_granularity, plus.outlier_fraction, plus.needs_calibration) == ("tensor", 0.0, False)
    assert (plus.activation_bits, plus.weight_bits) == (7.25, 4.5)
    assert "four" not in paper.description and "amax/4" in plus.description and plus.description
    # the paper's sharq is untouched: W32, §2's max rule, and plus differs from it in exactly the two weight fields
    assert (paper.weight_block, paper.weight_scale_rule, paper.weight_tensor_scale_rule) == (32, "max", "amax")
    assert paper.with_options(name="sharq-plus", weight_block=16, weight_scale_rule="four_over_six") == plus
    assert "sharq-plus" in sharq.list_recipes()


def test_sharq_plus_round_trips_through_to_dict():
    plus = sharq.get_recipe("sharq-plus")
    d = json.loads(json.dumps(plus.to_dict()))
    assert d["weight_block"] == 16 and d["weight_scale_rule"] == "four_over_six"
    assert "weight_tensor_scale_rule" not in d and all("scale_rule" not in s for s in d["stages"])  # at defaults
    back = Recipe.from_dict(d)
    assert back == plus and back.description == plus.description and back.key == plus.key


def test_sharq_plus_weight_payload_is_four_over_six_at_block_16(rng):
    """The weight payload is quantize_blocks(bf16(W/s_w), nvfp4, 16, four_over_six) (and SPEC §11.1's reference),
    with §3's s_w; per block its squared error is at most that of sharq with W16 weights (the max rule), and below
    it overall."""
    w = torch.randn(12, 160, generator=rng) * torch.rand(12, 1, generator=rng) * 3
    w[3, 17] = 9.0  # an outlier weight
    plus = sharq.get_recipe("sharq-plus").prepare_weight(w)
    w16 = sharq.get_recipe("sharq", weight_block=16).prepare_weight(w)
    s = f32(ref.tensor_scale(w.numpy()))
    assert plus.scale.item() == w16.scale.item() == s
    ws = torch.from_numpy(scaled(w.numpy(), s))
    q = quantize_blocks(ws, "nvfp4", 16, scale_rule="four_over_six")
    assert plus.packed.fmt == "nvfp4" and plus.packed.block_size == 16
    assert torch.equal(plus.packed.codes, q.codes) and torch.equal(plus.packed.scales, q.scales)
    assert torch.equal(plus.values, dequantize_blocks(q).to(torch.bfloat16))
    codes, scales, deq, _ = rule_blocks(ws.numpy(), 16, "four_over_six")
    np.testing.assert_array_equal(_codes(plus.packed), codes)
    np.testing.assert_array_equal(plus.packed.scales.numpy(), scales)
    np.testing.assert_array_equal(plus.values.float().numpy(), deq)

    def block_errors(qw):
        return (qw.values.double() - ws.double()).square().reshape(12, -1, 16).sum(-1)

    e_plus, e_max = block_errors(plus), block_errors(w16)
    assert (e_plus <= e_max * (1 + 1e-5) + 1e-30).all()
    assert e_plus.sum() < e_max.sum()


def test_sharq_plus_activations_are_sharqs(rng):
    x = outlier_activations(rng, 6, 128)
    a, b = sharq.get_recipe("sharq-plus").prepare_activation(x), sharq.get_recipe("sharq").prepare_activation(x)
    assert torch.equal(a.values, b.values) and torch.equal(a.scale, b.scale)
    assert all(torch.equal(p.codes, q.codes) and torch.equal(p.scales, q.scales) for p, q in zip(a.parts, b.parts))


def test_sharq_plus_runs_on_the_fused_kernels():
    """Its activations are SPEC §5's (the fused prepare kernel); its weights are an NVFP4 W16 payload, which the
    packed GEMM reads as it is."""
    pytest.importorskip("triton")
    from sharq.backends.packed import supports as _packed_supports
    from sharq.kernels.gemm import supports as gemm_supports
    from sharq.kernels.prepare import supports

    plus = sharq.get_recipe("sharq-plus")
    assert supports(plus) and gemm_supports("nvfp4", 16) and _packed_supports(plus)
