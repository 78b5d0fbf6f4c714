"""Properties of the merge math that hold for any shapes, densities and weights (hypothesis draws them).

Entries and weights are small multiples of 1/8 wherever a property claims exact equality: sums of such
numbers are exact in float32 in any order, so a permutation of the models cannot change a rounding
(and with it an elected sign) and a failure is the kernel's, not float arithmetic's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hm3.merge import ops
from tests.merge.test_methods import run_method

PROPERTY = settings()  # the profile's example count (tests/conftest.py)

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
eighths = st.integers(-16, 16).map(lambda i: i / 8)
positive_weights = st.integers(1, 16).map(lambda i: i / 8)
densities = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.8, 1.0])


MODEL_COUNTS = st.integers(1, 4)


@st.composite
def models(draw, count: st.SearchStrategy[int] = MODEL_COUNTS):
    """(base, model tensors) of one drawn shape, every entry a multiple of 1/8."""
    shape = draw(shapes)
    n = int(torch.Size(shape).numel())
    k = draw(count)
    values = draw(st.lists(st.lists(eighths, min_size=n, max_size=n), min_size=k + 1, max_size=k + 1))
    tensors = [torch.tensor(v, dtype=torch.float32).reshape(shape) for v in values]
    return tensors[0], tensors[1:]


def _deltas(base: torch.Tensor, thetas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t - base for t in thetas]


@PROPERTY
@given(models(count=st.just(1)), st.floats(0.05, 4.0), st.booleans(), st.floats(0.25, 2.0))
def test_ties_at_density_one_with_one_model_is_task_arithmetic(data, weight, normalize, lam):
    """One model has no sign conflict and density 1 trims nothing: TIES is then plain task arithmetic."""
    base, (theta,) = data
    deltas = _deltas(base, [theta])
    ties = ops.ties(base, deltas, [weight], [1.0], normalize=normalize, lam=lam)
    torch.testing.assert_close(ties, ops.task_arithmetic(base, deltas, [weight], normalize=normalize, lam=lam))


@PROPERTY
@given(models(), st.data(), st.floats(0.01, 100.0))
def test_normalised_merges_are_invariant_to_scaling_all_weights(data, draw, factor):
    """With normalize, only the weights' proportions matter (linear, task arithmetic and TIES)."""
    base, thetas = data
    weights = draw.draw(st.lists(positive_weights, min_size=len(thetas), max_size=len(thetas)))
    rho = draw.draw(st.lists(densities, min_size=len(thetas), max_size=len(thetas)))
    scaled = [w * factor for w in weights]
    deltas = _deltas(base, thetas)
    # TIES elects each entry's sign from Σ w_k τ_k: where that sum is exactly 0 (a tie such as
    # 1·(-0.5) + 1·1.5 + 2·(-0.5)), rounding of the scaled weights decides it, scaled or not
    trimmed = [ops.trim(d, r) for d, r in zip(deltas, rho, strict=True)]
    tally = sum(w * t for w, t in zip(weights, trimmed, strict=True))
    kept = torch.stack([t != 0 for t in trimmed]).any(0)
    assume(bool((tally[kept].abs() > 1e-6).all()))
    torch.testing.assert_close(ops.linear(thetas, scaled), ops.linear(thetas, weights))
    torch.testing.assert_close(ops.task_arithmetic(base, deltas, scaled, normalize=True),
                               ops.task_arithmetic(base, deltas, weights, normalize=True))
    torch.testing.assert_close(ops.ties(base, deltas, scaled, rho, normalize=True),
                               ops.ties(base, deltas, weights, rho, normalize=True))


@PROPERTY
@given(models(count=st.integers(2, 4)), st.data(),
       st.sampled_from(["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]), st.booleans())
def test_merges_are_invariant_to_the_order_of_the_models(data, draw, method, normalize):
    """Listing the models in another order (each with its weight, density and DARE seed) merges the same."""
    base, thetas = data
    m = len(thetas)
    weights = draw.draw(st.lists(positive_weights, min_size=m, max_size=m))
    rho = draw.draw(st.lists(densities, min_size=m, max_size=m))
    seeds = draw.draw(st.lists(st.integers(0, 2**31), min_size=m, max_size=m, unique=True))
    order = draw.draw(st.permutations(range(m)))
    kwargs = {"normalize": normalize, "rescale_mode": "inverse"} if method.startswith("dare") else {
        "normalize": normalize}
    base_arg = None if method == "linear" else base

    def merged(idx: Sequence[int]) -> torch.Tensor:
        return run_method(method, base_arg, [thetas[i] for i in idx], [weights[i] for i in idx],
                          [rho[i] for i in idx], seeds=[seeds[i] for i in idx], **kwargs)

    torch.testing.assert_close(merged(order), merged(range(m)), rtol=1e-6, atol=1e-6)


@PROPERTY
@given(models(count=st.integers(2, 4)), st.data(), st.sampled_from(["ram", "ramplus_tl", "multislerp"]))
def test_merges_without_sign_election_are_invariant_to_the_order_of_the_models(data, draw, method):
    """RAM (each entry: the mean of the changes above ε), RAM+ (its per-model factors follow the models) and
    Multi-SLERP (a weighted mean of directions) do not depend on the order the models are listed in."""
    from hm3.errors import ConfigError

    base, thetas = data
    m = len(thetas)
    weights = draw.draw(st.lists(positive_weights, min_size=m, max_size=m)) if method == "multislerp" else None
    order = draw.draw(st.permutations(range(m)))

    def merged(idx: Sequence[int]) -> torch.Tensor:
        return run_method(method, base, [thetas[i] for i in idx], None if weights is None else [weights[i] for i in idx])

    try:
        expected = merged(range(m))
    except ConfigError:  # multislerp: directions that cancel out (refused in any order)
        assume(False)
    torch.testing.assert_close(merged(order), expected, rtol=1e-5, atol=1e-6)


@PROPERTY
@given(models(count=st.integers(2, 4)), st.data(), st.floats(0.01, 100.0))
def test_multislerp_with_normalised_weights_is_invariant_to_scaling_them(data, draw, factor):
    from hm3.errors import ConfigError

    base, thetas = data
    weights = draw.draw(st.lists(positive_weights, min_size=len(thetas), max_size=len(thetas)))
    try:
        expected = run_method("multislerp", base, thetas, weights)
    except ConfigError:
        assume(False)
    torch.testing.assert_close(run_method("multislerp", base, thetas, [w * factor for w in weights]), expected,
                               rtol=1e-5, atol=1e-6)


@PROPERTY
@given(models(count=st.integers(1, 3)), st.data(), st.sampled_from(["fisher", "df_merge"]))
def test_fisher_merges_are_invariant_to_the_order_of_the_models(data, draw, method):
    base, thetas = data
    m = len(thetas)
    weights = draw.draw(st.lists(positive_weights, min_size=m, max_size=m))
    fishers = [torch.tensor(draw.draw(st.lists(st.integers(0, 16), min_size=base.numel(), max_size=base.numel())),
                            dtype=torch.float32).reshape(base.shape) / 8 for _ in range(m)]
    order = draw.draw(st.permutations(range(m)))
    base_arg = None if method == "fisher" else base

    def merged(idx: Sequence[int]) -> torch.Tensor:
        return run_method(method, base_arg, [thetas[i] for i in idx], [weights[i] for i in idx],
                          fishers=[fishers[i] for i in idx])

    torch.testing.assert_close(merged(order), merged(range(m)), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(models(count=st.integers(1, 3)), st.data(), st.sampled_from(["dare_linear", "dare_ties"]))
def test_dare_in_expectation_is_the_undropped_merge(data, draw, method):
    """E[m/ρ] = 1 per entry, so the mean over seeds of a DARE merge (inverse rescale) is the merge without
    dropping: task arithmetic; for DARE-TIES with one model too (no sign conflict can drop anything).

    The drawn entries are tiled to 4096, so that besides each entry's deviation (which only catches a gross
    error) the deviations summed in the direction of the undropped merge catch a bias of ~1%."""
    base, thetas = data
    if method == "dare_ties":
        thetas = thetas[:1]
    tiles = -(-4096 // base.numel())
    base, thetas = base.reshape(-1).repeat(tiles), [t.reshape(-1).repeat(tiles) for t in thetas]
    m = len(thetas)
    weights = draw.draw(st.lists(positive_weights, min_size=m, max_size=m))
    rho = draw.draw(st.lists(st.sampled_from([0.3, 0.5, 0.8]), min_size=m, max_size=m))
    runs = 200
    total = torch.zeros(base.shape, dtype=torch.float64)
    for s in range(runs):
        merged = run_method(method, base, thetas, weights, rho, seeds=[m * s + k for k in range(m)],
                            rescale_mode="inverse")
        total += merged.double() - base.double()
    deviation = total / runs - sum(w * d.double() for w, d in zip(weights, _deltas(base, thetas), strict=True))
    # the mean of `runs` draws of Σ_k w_k m_k τ_k / ρ_k has variance Σ_k w_k² τ_k² (1 − ρ_k)/ρ_k / runs
    variance = sum(w**2 * d.double() ** 2 * (1 - r) / r
                   for w, d, r in zip(weights, _deltas(base, thetas), rho, strict=True)) / runs
    assert (deviation.abs() <= 5.5 * variance.sqrt() + 1e-6).all()
    direction = torch.sign(sum(w * d.double() for w, d in zip(weights, _deltas(base, thetas), strict=True)))
    assert abs(float((direction * deviation).sum())) <= 5.5 * float(variance.sum().sqrt()) + 1e-6
