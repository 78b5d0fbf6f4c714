"""The merge operators against their equations (hand-computed numbers) and against mergekit's own functions.

Hand-made examples pin the semantics (which entries TIES keeps, how signs are
elected, what normalisation divides by); the ``mergekit`` tests pin the numerics
to mergekit 0.1.5 on random tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from hm3.errors import ConfigError
from hm3.merge import ops
from tests.merge import reference as ref
from tests.merge.cases import gen, mergekit_params, random_models


def t(*rows) -> torch.Tensor:
    """float32 tensor from numbers (1-D) or lists (2-D)."""
    return torch.tensor(rows, dtype=torch.float32)


# --- task vector, linear, task arithmetic -------------------------------------------------------------------


def test_task_vector_is_difference():
    assert torch.equal(ops.task_vector(t(3.0, -1.0), t(1.0, 1.0)), t(2.0, -2.0))


def test_linear_normalized_and_not():
    thetas = [t(1.0, 2.0), t(3.0, 4.0)]
    assert torch.allclose(ops.linear(thetas, [1.0, 3.0]), t(2.5, 3.5))
    assert torch.allclose(ops.linear(thetas, [1.0, 3.0], normalize=False), t(10.0, 14.0))


def test_linear_keeps_half_dtype_and_refuses_zero_weight_sum():
    thetas = [t(1.0, 2.0).bfloat16(), t(3.0, 4.0).bfloat16()]
    out = ops.linear(thetas, [0.5, 0.5])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), t(2.0, 3.0))
    with pytest.raises(ConfigError, match="sum to 0"):
        ops.linear(thetas, [1.0, -1.0])


def test_linear_refuses_mismatched_lengths_and_says_why_a_zero_sum_cannot_be_normalised():
    with pytest.raises(ConfigError, match="thetas"):
        ops.linear([t(1.0), t(2.0)], [1.0])
    with pytest.raises(ConfigError, match="cannot be normalised; change the weights"):
        ops.linear([t(1.0), t(2.0)], [2.0, -2.0])


def test_linear_of_float64_models_is_computed_in_float64():
    """0.1 and 0.7 are not float32 numbers: accumulating, or holding the weights, in float32 would show at 1e-9."""
    thetas = [torch.tensor([1.0 + 1e-12, 3.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)]
    out = ops.linear(thetas, [0.1, 0.7], normalize=False)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.1 * (1.0 + 1e-12) + 0.7 * 2.0, 0.1 * 3.0 + 0.7 * -1.0]


def test_task_arithmetic_weights_lambda_and_normalize():
    base = t(1.0, 1.0)
    deltas = [t(1.0, -2.0), t(2.0, 2.0)]
    # Σ w τ = [0.5 + 0.5, -1 + 0.5] = [1, -0.5]
    assert torch.allclose(ops.task_arithmetic(base, deltas, [0.5, 0.25]), t(2.0, 0.5))
    assert torch.allclose(ops.task_arithmetic(base, deltas, [0.5, 0.25], lam=2.0), t(3.0, 0.0))
    normalized = ops.task_arithmetic(base, deltas, [0.5, 0.25], normalize=True, lam=2.0)
    assert torch.allclose(normalized, t(1.0 + 2.0 / 0.75, 1.0 - 1.0 / 0.75))
    # a zero weight sum cannot be normalised: mergekit divides by 1 instead
    zero_sum = ops.task_arithmetic(base, deltas, [1.0, -1.0], normalize=True)
    assert torch.allclose(zero_sum, t(0.0, -3.0))


def test_mismatched_model_counts_are_refused():
    with pytest.raises(ConfigError, match="deltas=2, weights=1"):
        ops.task_arithmetic(t(0.0), [t(1.0), t(2.0)], [1.0])


# --- TIES ---------------------------------------------------------------------------------------------------

TAU1 = t([1.0, -2.0, 3.0], [-4.0, 0.5, 0.0])
TAU2 = t([-3.0, 1.0, 2.0], [1.0, -0.5, 6.0])


def test_trim_keeps_top_k_by_magnitude():
    # density 0.5 of 6 entries: k = 3
    assert torch.equal(ops.trim(TAU1, 0.5), t([0.0, -2.0, 3.0], [-4.0, 0.0, 0.0]))
    assert torch.equal(ops.trim(TAU2, 0.5), t([-3.0, 0.0, 2.0], [0.0, 0.0, 6.0]))
    assert torch.equal(ops.trim(TAU1, 0.01), t([0.0, 0.0, 0.0], [-4.0, 0.0, 0.0]))  # k = max(1, 0)


@pytest.mark.parametrize("density", [1.0, 1.5])
def test_trim_density_at_least_one_is_identity(density):
    assert torch.equal(ops.trim(TAU1, density), TAU1)
    assert ops.magnitude_threshold(TAU1, density).all()


@pytest.mark.parametrize("density", [0.0, -0.1])
def test_trim_density_zero_or_less_is_zero(density):
    assert torch.equal(ops.trim(TAU1, density), torch.zeros_like(TAU1))
    assert not ops.magnitude_threshold(TAU1, density).any()


def test_trim_out_writes_into_buffer():
    out = torch.full((2, 3), 7.0)
    ops.trim(TAU1, 0.5, out=out)
    assert torch.equal(out, t([0.0, -2.0, 3.0], [-4.0, 0.0, 0.0]))


def test_threshold_ties_keep_exactly_k_lowest_indices_first():
    delta = t(3.0, -1.0, 1.0, 1.0, -2.0)
    # k = 3: 3 and -2 surely, then one of the three |1|: the lowest index
    assert ops.magnitude_threshold(delta, 0.6).tolist() == [True, True, False, False, True]
    assert ops.magnitude_threshold(torch.ones(10), 0.35).tolist() == [True] * 3 + [False] * 7
    assert (
        ops.magnitude_threshold(torch.ones(10, dtype=torch.float64), 0.35).tolist()
        == [True] * 3 + [False] * 7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.93])
def test_threshold_equals_full_sort(dtype, density):
    """The selection keeps exactly k entries, and every kept magnitude ≥ every dropped one."""
    g = gen(3)
    # magnitudes spanning many binades, with exact ties from the coarse dtypes
    delta = (torch.randn(301, 67, generator=g) * torch.exp(4 * torch.randn(301, 67, generator=g))).to(dtype)
    keep = ops.magnitude_threshold(delta, density)
    k = max(1, int(density * delta.numel()))
    mag = delta.abs().double()
    assert int(keep.sum()) == k
    assert mag[keep].min() >= mag[~keep].max()
    order = torch.argsort(mag.reshape(-1), descending=True, stable=True)
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[order[:k]] = True
    if dtype in (torch.float32, torch.float64):  # distinct magnitudes (almost surely): the same mask
        assert torch.unique(mag).numel() == mag.numel()
        assert torch.equal(keep.reshape(-1), expected)


def test_threshold_bucket_boundary_and_zeros():
    # k-th largest is the smallest key of its radix bucket, and half the entries are zero
    delta = torch.cat([torch.zeros(50), torch.tensor([2.0**-3] * 5), torch.tensor([2.0**-3 + 2.0**-20]) * 1])
    keep = ops.magnitude_threshold(delta, 6 / 56)
    assert keep[50:].all() and not keep[:50].any()
    keep = ops.magnitude_threshold(torch.zeros(8), 0.5)
    assert keep.tolist() == [True] * 4 + [False] * 4  # exactly k, even of zeros; trim still gives zeros


def test_threshold_of_non_contiguous_tensor():
    x = torch.randn(64, 48, generator=gen(4)).t()
    assert torch.equal(ops.magnitude_threshold(x, 0.3), ops.magnitude_threshold(x.contiguous(), 0.3))
    assert torch.equal(ops.trim(x, 0.3), ops.trim(x.contiguous(), 0.3))


def test_elect_sign_zero_sum_counts_as_plus():
    weighted = torch.stack([t(2.0, -1.0, 0.0), t(-2.0, -1.0, 0.0)])
    assert torch.equal(ops.elect_sign(weighted), t(1.0, -1.0, 1.0))


def test_disjoint_merge_zero_sum_and_zero_entries():
    deltas = [t(2.0, -1.0, 0.0), t(-2.0, -1.0, 0.0)]
    base = torch.zeros(3)
    # col 0: the sum is 0, so + is elected and only +2 agrees; col 1: both; col 2: nobody (divisor 0 -> 1)
    assert torch.equal(ops.ties(base, deltas, [1.0, 1.0], [1.0, 1.0], normalize=False), t(2.0, -2.0, 0.0))
    assert torch.equal(ops.ties(base, deltas, [1.0, 1.0], [1.0, 1.0], normalize=True), t(2.0, -1.0, 0.0))


def test_ties_by_hand_2x3():
    w = [1.0, 0.5]
    # trimmed (density 0.5): w τ1 = [[0,-2,3],[-4,0,0]], w τ2 = [[-1.5,0,1],[0,0,3]]
    # Σ = [[-1.5,-2,4],[-4,0,3]] -> γ = [[-,-,+],[-,+,+]]
    weighted = torch.stack([t([0.0, -2.0, 3.0], [-4.0, 0.0, 0.0]), t([-1.5, 0.0, 1.0], [0.0, 0.0, 3.0])])
    sign = ops.elect_sign(weighted)
    assert torch.equal(sign, t([-1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]))
    sums = t([-1.5, -2.0, 4.0], [-4.0, 0.0, 3.0])
    divisors = t([0.5, 1.0, 1.5], [1.0, 1.0, 0.5])  # agreeing weights; (1,1): nobody -> 1
    base = t([10.0, 10.0, 10.0], [0.0, 0.0, 0.0])
    assert torch.allclose(ops.ties(base, [TAU1, TAU2], w, [0.5, 0.5], normalize=False), base + sums)
    assert torch.allclose(ops.ties(base, [TAU1, TAU2], w, [0.5, 0.5]), base + sums / divisors)
    assert torch.allclose(ops.ties(base, [TAU1, TAU2], w, [0.5, 0.5], lam=0.5), base + 0.5 * sums / divisors)
    # the reference reads the same equations step by step
    assert torch.equal(ref.ties(base, [TAU1, TAU2], w, [0.5, 0.5], normalize=False).float(), base + sums)


def test_ties_does_not_modify_inputs_and_keeps_dtype():
    base = torch.zeros(2, 3, dtype=torch.bfloat16)
    d1, d2 = TAU1.bfloat16(), TAU2.bfloat16()
    c1, c2 = d1.clone(), d2.clone()
    out = ops.ties(base, [d1, d2], [1.0, 0.5], [0.5, 1.0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(d1, c1) and torch.equal(d2, c2)


# --- DARE ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tau() -> torch.Tensor:
    return torch.randn(400, 250, generator=gen(0))  # 100k entries


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
def test_dare_same_seed_same_output_different_seed_differs(tau, rescale):
    a = ops.dare(tau, 0.3, generator=gen(1), rescale=rescale)
    b = ops.dare(tau, 0.3, generator=gen(1), rescale=rescale)
    c = ops.dare(tau, 0.3, generator=gen(2), rescale=rescale)
    assert torch.equal(a, b)
    assert not torch.equal((a != 0), (c != 0))


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_kept_fraction_is_binomial(tau, density):
    kept = int((ops.dare(tau, density, generator=gen(5), rescale="none") != 0).sum())
    n = tau.numel()
    assert abs(kept - density * n) <= 5 * math.sqrt(n * density * (1 - density))


def test_dare_l1_rescale_preserves_norm(tau):
    out = ops.dare(tau, 0.3, generator=gen(7), rescale="l1")
    assert torch.isclose(out.abs().sum(), tau.abs().sum(), rtol=1e-5)
    kept = out != 0
    ratio = out[kept] / tau[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one common factor
    assert not torch.isclose(ratio[0], torch.tensor(1.0))


def test_dare_inverse_rescale_is_exact_one_over_density(tau):
    out = ops.dare(tau, 0.25, generator=gen(7), rescale="inverse")
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] / 0.25)
    none = ops.dare(tau, 0.25, generator=gen(7), rescale="none")
    assert torch.equal(none[kept], tau[kept]) and torch.equal(none != 0, kept)


def test_dare_inverse_is_unbiased():
    # E[τ̂] = τ: for constant τ = c the mean of τ̂ is c·(kept fraction)/density
    n, density, c = 200_000, 0.3, 0.7
    out = ops.dare(torch.full((n,), c), density, generator=gen(11), rescale="inverse")
    rel_sd = math.sqrt((1 - density) / (n * density))
    assert abs(float(out.mean()) / c - 1) <= 5 * rel_sd


def test_dare_edges_and_bad_mode(tau):
    assert ops.dare(tau, 1.0, generator=gen(0)) is tau
    assert torch.equal(ops.dare(tau, 0.0, generator=gen(0)), torch.zeros_like(tau))
    zeros = ops.dare(torch.zeros(100), 0.5, generator=gen(0), rescale="l1")  # norms below eps: no 0/0
    assert torch.equal(zeros, torch.zeros(100))
    half = ops.dare(tau.half(), 0.5, generator=gen(0))
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    with pytest.raises(ConfigError, match="'l2'"):
        ops.dare(tau, 0.5, generator=gen(0), rescale="l2")  # type: ignore[arg-type]


def test_dare_of_float64_task_vectors_is_computed_in_float64():
    tau64 = torch.randn(64, generator=gen(4), dtype=torch.float64) * (1 + 1e-12)
    draws = torch.rand(64, generator=gen(9), dtype=torch.float32)  # the draws dare makes: float32 U(0, 1)
    kept = torch.where(draws < 0.5, tau64, torch.zeros((), dtype=torch.float64))
    expected = kept * (tau64.abs().sum() / kept.abs().sum())
    out = ops.dare(tau64, 0.5, generator=gen(9), rescale="l1")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=0)  # float32 arithmetic would be off by ~1e-7


def test_a_dare_that_drops_every_entry_gives_zeros_not_nan():
    """‖kept‖₁ = 0 while ‖τ‖₁ > 0: the L1 rescale must be skipped (mergekit's eps rule), not divide by 0."""
    tau = t(0.5, -0.25, 1.0)
    assert torch.equal(ops.match_l1_(torch.zeros(3), tau), torch.zeros(3))
    for fn in (ops.dare, ops.dare_):
        out = fn(tau.clone(), 1e-9, generator=gen(0), rescale="l1")  # U < 1e-9: nothing is kept
        assert torch.equal(out, torch.zeros(3))


def test_dare_in_place_defaults_to_mergekits_l1_rescale(tau):
    x = tau[:40].clone()
    assert torch.equal(ops.dare_(x, 0.4, generator=gen(6)), ops.dare(tau[:40], 0.4, generator=gen(6), rescale="l1"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_dare_into_out_buffer_equals_fresh_result(tau, dtype, density):
    x = tau[:50].to(dtype)
    out = torch.full_like(x, 7.0)
    ops.dare(x, density, generator=gen(3), out=out)
    assert torch.equal(out, ops.dare(x, density, generator=gen(3)))
    assert torch.equal(ops.dare(x, 0.4, generator=gen(3)) != 0, ref.dare_mask(x.shape, 0.4, gen(3)) & (x != 0))


# --- Fisher-weighted merging --------------------------------------------------------------------------------

F1, F2 = t(1.0, 3.0), t(3.0, 1.0)


def test_fisher_merge_by_hand_and_uniform_fisher_is_weighted_average():
    thetas = [t(1.0, 2.0), t(3.0, 6.0)]
    assert torch.allclose(ops.fisher_merge(thetas, [F1, F2], [1.0, 1.0]), t(2.5, 3.0))
    assert torch.allclose(ops.fisher_merge(thetas, [F1, F2], [2.0, 1.0]), t(11 / 5, 18 / 7))
    ones = [torch.ones(2), torch.ones(2)]
    assert torch.allclose(ops.fisher_merge(thetas, ones, [2.0, 1.0]), ops.linear(thetas, [2.0, 1.0]))
    zeros = [torch.zeros(2), torch.zeros(2)]  # nobody sensitive: eps keeps the weighted average
    assert torch.allclose(ops.fisher_merge(thetas, zeros, [2.0, 1.0]), ops.linear(thetas, [2.0, 1.0]))


def test_df_merge_by_hand_and_identity_fisher_is_task_arithmetic():
    base, deltas, lam = t(0.0, 1.0), [t(1.0, 2.0), t(3.0, -2.0)], [0.5, 1.0]
    # M Σ F λ τ / Σ F = 2 · [0.5 + 9, 3 - 2] / [4, 4]
    assert torch.allclose(ops.df_merge(base, deltas, [F1, F2], lam), t(4.75, 1.5))
    ones = [torch.ones(2), torch.ones(2)]
    assert torch.allclose(ops.df_merge(base, deltas, ones, lam), ops.task_arithmetic(base, deltas, lam))


def test_fisher_importance_by_hand_and_mean_one():
    imp = ops.fisher_importance([F1, F2])
    assert torch.allclose(imp, torch.stack([t(0.5, 1.5), t(1.5, 0.5)]))
    big = ops.fisher_importance([torch.rand(50, generator=gen(k)) for k in range(3)])
    assert torch.allclose(big.mean(0), torch.ones(50))
    assert torch.equal(ops.fisher_importance([torch.ones(3)] * 3), torch.ones(3, 3))


def test_importance_weighted_task_arithmetic_is_df_merge():
    g = gen(2)
    base = torch.randn(40, generator=g)
    deltas = [torch.randn(40, generator=g) for _ in range(3)]
    fishers = [torch.rand(40, generator=g) ** 3 for _ in range(3)]
    lam = [0.3, 0.9, 0.5]
    imp = ops.fisher_importance(fishers)
    expected = ops.df_merge(base, deltas, fishers, lam)
    assert torch.allclose(ops.task_arithmetic(base, deltas, lam, importance=imp), expected, atol=1e-6)


def test_fisher_weighted_ties_by_hand():
    imp = ops.fisher_importance([F1, F2])  # [[0.5, 1.5], [1.5, 0.5]]
    deltas = [t(1.0, -1.0), t(1.0, 2.0)]
    # w I τ: [0.5, -1.5], [1.5, 1.0] -> γ = [+, -]; col 0 both agree, col 1 only model 1
    base = torch.zeros(2)
    out = ops.ties(base, deltas, [1.0, 1.0], [1.0, 1.0], normalize=False, importance=imp)
    assert torch.allclose(out, t(2.0, -1.5))
    out = ops.ties(base, deltas, [1.0, 1.0], [1.0, 1.0], importance=imp)
    assert torch.allclose(out, t(2.0 / 2.0, -1.5 / 1.5))


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_weighted_ties_with_uniform_fisher_is_ties(normalize):
    g = gen(6)
    base = torch.randn(30, 20, generator=g)
    deltas = [torch.randn(30, 20, generator=g) for _ in range(3)]
    w, rho = [0.7, 0.4, 1.1], [0.3, 0.5, 0.8]
    imp = ops.fisher_importance([torch.full((30, 20), 2.5)] * 3)
    plain = ops.ties(base, deltas, w, rho, normalize=normalize)
    assert torch.equal(ops.ties(base, deltas, w, rho, normalize=normalize, importance=imp), plain)


# --- mergekit as the oracle ---------------------------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_trim_equals_mergekit_magnitude(density):
    sparsify = pytest.importorskip("mergekit.sparsify")
    for seed in range(3):
        delta = torch.randn(53, 41, generator=gen(seed))
        assert torch.unique(delta.abs()).numel() == delta.numel()
        assert torch.equal(ops.trim(delta, density), sparsify.magnitude(delta, density))


@pytest.mark.mergekit
def test_elect_sign_equals_mergekit_get_mask():
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    weighted = torch.randn(4, 30, 20, generator=gen(8))
    weighted[weighted.abs() < 0.3] = 0  # sparse entries, as after trimming
    weighted[:, 0, :4] = torch.tensor([1.0, -1.0, 0.0, 0.0]).view(4, 1)  # a zero sum
    assert torch.equal(weighted.sign() == ops.elect_sign(weighted), gta.get_mask(weighted, method="sum"))


@pytest.mark.mergekit
@pytest.mark.parametrize(("normalize", "lam"), [(True, 1.0), (False, 1.0), (True, 0.6), (False, 1.3)])
def test_ties_task_arithmetic_linear_equal_mergekit(normalize, lam):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(seed=int(lam * 10) + normalize)
    deltas = [ops.task_vector(m, base) for m in models]
    w, rho = [0.6, 0.3, 0.9], [0.2, 0.5, 0.9]
    shared = {"normalize": normalize, "lambda": lam}

    mk_ties = api.merge_tensors(
        [base, *models], "ties", parameters=mergekit_params(w, rho, **shared), base_index=0
    )
    hm3_ties = ops.ties(base, deltas, w, rho, normalize=normalize, lam=lam)
    assert torch.equal(hm3_ties, mk_ties)  # bit-exact (the brief's bar: max abs diff <= 1e-6)

    mk_ta = api.merge_tensors(
        [base, *models], "task_arithmetic", parameters=mergekit_params(w, **shared), base_index=0
    )
    hm3_ta = ops.task_arithmetic(base, deltas, w, normalize=normalize, lam=lam)
    assert torch.equal(hm3_ta, mk_ta)

    mk_lin = api.merge_tensors(models, "linear", parameters={"weight": w, "normalize": normalize})
    assert torch.equal(ops.linear(models, w, normalize=normalize), mk_lin)


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_bit_exact_with_mergekit(dtype):
    """Same roundings as mergekit in half precision (TIES at density 1: tied magnitudes are common there)."""
    api = pytest.importorskip("mergekit.merge_methods")
    base32, models32 = random_models(seed=5)
    base, models = base32.to(dtype), [m.to(dtype) for m in models32]
    deltas = [ops.task_vector(m, base) for m in models]
    w = [0.6, 0.3, 0.9]
    for normalize, lam in [(False, 1.0), (True, 0.7)]:
        shared = {"normalize": normalize, "lambda": lam}
        ta = api.merge_tensors(
            [base, *models], "task_arithmetic", parameters=mergekit_params(w, **shared), base_index=0
        )
        assert torch.equal(ops.task_arithmetic(base, deltas, w, normalize=normalize, lam=lam), ta)
        params = mergekit_params(w, [1.0] * 3, **shared)
        ties = api.merge_tensors([base, *models], "ties", parameters=params, base_index=0)
        assert torch.equal(ops.ties(base, deltas, w, [1.0] * 3, normalize=normalize, lam=lam), ties)
    lin = api.merge_tensors(models, "linear", parameters={"weight": w})
    assert torch.equal(ops.linear(models, w), lin)


# --- edges that mutation testing found unchecked ------------------------------------------------------------


def test_masks_are_boolean_and_a_single_entry_is_kept():
    for density in (0.0, 0.5, 1.0):
        assert ops.magnitude_threshold(TAU1, density).dtype == torch.bool
    assert ops.magnitude_threshold(t(-3.0), 0.5).tolist() == [True]  # k = max(1, int(0.5)) = 1
    assert ops.magnitude_threshold(torch.zeros(0), 0.5).tolist() == []


def test_a_weight_sum_of_exactly_the_threshold_still_divides():
    """mergekit divides by Σw unless |Σw| < 1e-8: a sum of (float32) 1e-8 itself is a divisor."""
    w = float(torch.tensor(1e-8, dtype=torch.float32))
    out = ops.task_arithmetic(torch.zeros(2), [t(1.0, -2.0)], [w], normalize=True)
    assert torch.allclose(out, t(1.0, -2.0))


@pytest.mark.parametrize("fn", ["fisher_merge", "df_merge"])
def test_fisher_merges_compute_in_float32_and_return_the_models_dtype(fn):
    """Fisher values of 1e-8 underflow in float16: they are used in float32, the result cast back."""
    thetas = [t(1.0, 2.0).bfloat16(), t(3.0, 6.0).bfloat16()]
    fishers = [t(1e-8, 3e-8).half(), t(3e-8, 1e-8).half()]  # float16 subnormals, exact enough after upcast
    if fn == "fisher_merge":
        out = ops.fisher_merge(thetas, fishers, [1.0, 1.0])
        expected = ops.fisher_merge([x.float() for x in thetas], [f.float() for f in fishers], [1.0, 1.0])
    else:
        base = t(0.5, 0.5).bfloat16()
        out = ops.df_merge(base, thetas, fishers, [1.0, 0.5])
        expected = ops.df_merge(base.float(), [x.float() for x in thetas], [f.float() for f in fishers], [1.0, 0.5])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.bfloat16())
    imp = ops.fisher_importance(fishers)
    assert imp.dtype == torch.float32 and torch.allclose(imp.sum(0), torch.full((2,), 2.0))


def test_fisher_merges_refuse_mismatched_model_counts():
    one, two = [t(1.0)], [t(1.0), t(2.0)]
    for call, message in [
        (lambda: ops.fisher_merge(two, one, [1.0, 1.0]), "fishers=1"),
        (lambda: ops.fisher_merge(one, two, [1.0, 1.0]), "thetas=1"),
        (lambda: ops.fisher_merge(two, two, [1.0]), "weights=1"),
        (lambda: ops.df_merge(t(0.0), two, one, [1.0, 1.0]), "fishers=1"),
        (lambda: ops.df_merge(t(0.0), one, two, [1.0, 1.0]), "deltas=1"),
        (lambda: ops.df_merge(t(0.0), two, two, [1.0]), "coefficients=1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


def test_fisher_merges_keep_float64_models_in_float64():
    theta = torch.tensor([1.0 + 1e-12], dtype=torch.float64)  # 1.0 in float32
    fisher = [torch.ones(1)]
    assert abs(float(ops.fisher_merge([theta], fisher, [1.0])) - (1.0 + 1e-12)) < 1e-14
    base = torch.zeros(1, dtype=torch.float64)
    assert abs(float(ops.df_merge(base, [theta], fisher, [1.0])) - (1.0 + 1e-12)) < 1e-14
    assert ops.fisher_importance([torch.ones(1, dtype=torch.float64)] * 2).dtype == torch.float64
