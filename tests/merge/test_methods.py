"""The merge methods production runs (the registry of ``hm3.merge.methods``, which the streaming engine
and the in-memory merger call per tensor) against the readable references of ``tests/merge/reference.py``
and against mergekit; DARE against what it promises in expectation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from hm3.merge.methods import MERGE_METHODS, TensorInputs, get_method
from tests.merge import reference as ref
from tests.merge.cases import gen, mergekit_params, random_models

SHAPE = (37, 29)
WEIGHTS = [0.6, -0.3, 0.9]
POSITIVE_WEIGHTS = [0.6, 0.3, 0.9]  # for divisors (normalize, Fisher): mixed signs can cancel them to ~0
DENSITIES = [0.2, 0.5, 0.9]


def weights_for(normalize: bool) -> list[float]:
    """Signed weights where nothing divides by their sum; positive ones where float32 rounding of a
    near-cancelled divisor would be amplified past any fair tolerance."""
    return POSITIVE_WEIGHTS if normalize else WEIGHTS


def run_method(
    name: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    *,
    fishers: Sequence[torch.Tensor] | None = None,
    seeds: Sequence[int] | None = None,
    deltas: Sequence[torch.Tensor] | None = None,
    per_model: dict[str, Sequence[Any]] | None = None,
    **params: Any,
) -> torch.Tensor:
    """One tensor merged by the registered method ``name``, its unset parameters at their defaults.

    ``weights``, ``densities`` and ``per_model`` give per-model parameters (one value per tensor)."""
    method = get_method(name)
    given = dict(per_model or {}) | {k: v for k, v in (("weight", weights), ("density", densities)) if v is not None}
    model_params = [{p.name: given[p.name][k] if p.name in given else p.default for p in method.model_params}
                    for k in range(len(tensors))]
    seeds = list(range(len(tensors))) if seeds is None else list(seeds)
    return method.fn(TensorInputs(
        name="t",
        base=base,
        tensors=list(tensors),
        model_params=model_params,
        params={p.name: p.default for p in method.params} | params,
        fishers=fishers,
        generators=(lambda k: gen(seeds[k])) if method.uses_randomness else None,
        deltas=deltas,
    ))


def random_fishers(seed: int, count: int = 3, shape=SHAPE) -> list[torch.Tensor]:
    g = gen(seed)
    return [torch.rand(*shape, generator=g) ** 3 for _ in range(count)]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A float32 kernel against a float64 reference: equal up to a few float32 roundings."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-7)


def test_every_registered_method_has_a_reference_here():
    """A method added to the registry without a reference would go untested by this file."""
    assert set(MERGE_METHODS) == {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "fisher",
                                  "df_merge", "slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear", "nuslerp", "sce", "karcher", "passthrough", "multislerp",
                                  "nearswap", "ram", "ramplus_tl", "arcee_fusion"}


# --- production kernels against the references ------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_reference(normalize):
    _, models = random_models(0)
    close(run_method("linear", None, models, WEIGHTS, normalize=normalize), ref.linear(models, WEIGHTS, normalize))


@pytest.mark.parametrize(("normalize", "lam", "fisher"), [(False, 1.0, False), (True, 0.7, False),
                                                          (False, 1.3, True), (True, 1.0, True)])
def test_task_arithmetic_equals_reference(normalize, lam, fisher):
    base, models = random_models(1)
    fishers = random_fishers(2) if fisher else None
    w = weights_for(normalize)
    out = run_method("task_arithmetic", base, models, w, fishers=fishers, normalize=normalize, **{"lambda": lam})
    close(out, ref.task_arithmetic(base, [m - base for m in models], w, normalize, lam, fishers))


@pytest.mark.parametrize(("normalize", "lam", "fisher"), [(True, 1.0, False), (False, 1.0, False),
                                                          (True, 0.6, True), (False, 1.3, True)])
def test_ties_equals_reference(normalize, lam, fisher):
    base, models = random_models(3)
    fishers = random_fishers(4) if fisher else None
    w = weights_for(normalize)
    out = run_method("ties", base, models, w, DENSITIES, fishers=fishers, normalize=normalize, **{"lambda": lam})
    expected = ref.ties(base, [m - base for m in models], w, DENSITIES, normalize, lam, fishers)
    close(out, expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_rescale_matches_each_trimmed_task_vector_to_its_l1_norm(normalize):
    """mergekit's ``rescale: true`` on ties (and hm3's ``rescale_mode: l1``); a random-drop mode is refused."""
    base, models = random_models(13)
    w = weights_for(normalize)
    expected = ref.ties(base, [m - base for m in models], w, DENSITIES, normalize, 1.0, None, rescale=True)
    close(run_method("ties", base, models, w, DENSITIES, normalize=normalize, rescale=True), expected)
    close(run_method("ties", base, models, w, DENSITIES, normalize=normalize, rescale_mode="l1"), expected)
    assert not torch.allclose(run_method("ties", base, models, w, DENSITIES, normalize=normalize).double(), expected)
    from hm3.errors import ConfigError

    with pytest.raises(ConfigError, match="ties: rescale_mode 'inverse'"):
        run_method("ties", base, models, w, DENSITIES, rescale_mode="inverse")


def _masks(deltas: Sequence[torch.Tensor], densities: Sequence[float], seeds: Sequence[int]) -> list[torch.Tensor]:
    return [ref.dare_mask(d.shape, rho, gen(s)) for d, rho, s in zip(deltas, densities, seeds, strict=True)]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize(("rescale_mode", "normalize", "fisher"), [
    ("l1", False, False), ("inverse", False, False), ("none", True, False), ("l1", True, True), ("inverse", False, True),
])
def test_dare_methods_equal_reference_with_the_masks_of_their_seeds(method, rescale_mode, normalize, fisher):
    base, models = random_models(5)
    deltas = [m - base for m in models]
    seeds = [11, 12, 13]
    fishers = random_fishers(6) if fisher else None
    w = weights_for(normalize)
    out = run_method(method, base, models, w, DENSITIES, fishers=fishers, seeds=seeds,
                     rescale_mode=rescale_mode, normalize=normalize, **{"lambda": 0.8})
    oracle = ref.dare_ties if method == "dare_ties" else ref.dare_linear
    expected = oracle(base, deltas, w, DENSITIES, _masks(deltas, DENSITIES, seeds), rescale_mode,
                      normalize=normalize, lam=0.8, fishers=fishers)
    close(out, expected)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_mergekit_rescale_flag_maps_to_l1_and_none(method):
    base, models = random_models(7)
    deltas = [m - base for m in models]
    masks = _masks(deltas, DENSITIES, [0, 1, 2])
    oracle = ref.dare_ties if method == "dare_ties" else ref.dare_linear
    for flag, mode in ((True, "l1"), (False, "none")):
        out = run_method(method, base, models, WEIGHTS, DENSITIES, rescale=flag)
        close(out, oracle(base, deltas, WEIGHTS, DENSITIES, masks, mode))


def test_precomputed_task_vectors_are_the_ones_merged():
    """The in-memory merger hands methods task vectors it computed once (``TensorInputs.deltas``): the
    merge is of those, not of ``tensors - base`` again (here they differ on purpose)."""
    base, models = random_models(10)
    given = [2.0 * (m - base) for m in models]
    fishers = random_fishers(11)
    close(run_method("task_arithmetic", base, models, WEIGHTS, deltas=given),
          ref.task_arithmetic(base, given, WEIGHTS, False, 1.0, None))
    close(run_method("ties", base, models, POSITIVE_WEIGHTS, DENSITIES, deltas=given),
          ref.ties(base, given, POSITIVE_WEIGHTS, DENSITIES, True, 1.0, None))
    close(run_method("df_merge", base, models, WEIGHTS, fishers=fishers, deltas=given),
          ref.df_merge(base, given, fishers, WEIGHTS))
    # DARE draws the same masks from the same seeds, and its merge is linear in the task vectors
    doubled = run_method("dare_linear", base, models, WEIGHTS, DENSITIES, deltas=given) - base
    torch.testing.assert_close(doubled, 2.0 * (run_method("dare_linear", base, models, WEIGHTS, DENSITIES) - base),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("method", "per_model"), [
    ("dare_ties", None), ("dare_linear", None), ("breadcrumbs", {"gamma": [0.05, 0.2, 0.0]}),
    ("breadcrumbs_ties", {"gamma": [0.05, 0.2, 0.0]}), ("della", {"epsilon": [0.1, 0.15, 0.05]}),
    ("della_linear", {"epsilon": [0.1, 0.15, 0.05]}),
])
def test_sparsifying_methods_refuse_task_vectors_that_do_not_match_the_models(method, per_model):
    """Two task vectors for three models' parameters: an error, never a merge that silently drops a model."""
    base, models = random_models(12)
    with pytest.raises(ValueError, match="zip"):
        run_method(method, base, models, WEIGHTS, [0.3, 0.5, 0.7], per_model=per_model,
                   deltas=[m - base for m in models[:2]])


def test_fisher_merge_and_df_merge_equal_reference():
    base, models = random_models(8)
    fishers = random_fishers(9)
    close(run_method("fisher", None, models, POSITIVE_WEIGHTS, fishers=fishers),
          ref.fisher_merge(models, fishers, POSITIVE_WEIGHTS))
    close(run_method("df_merge", base, models, WEIGHTS, fishers=fishers),
          ref.df_merge(base, [m - base for m in models], fishers, WEIGHTS))


def _pair(seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors at a clear angle (not parallel), as two fine-tunes of one base are."""
    base, (other,) = random_models(seed, count=1, shape=shape)
    return base, other


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_slerp_equals_reference(t):
    base, other = _pair(20)
    out = run_method("slerp", base, [other], t=t)
    close(out, ref.slerp(t, base, other))
    assert out.dtype == base.dtype


@pytest.mark.parametrize("case", ["parallel", "antiparallel", "zero", "tiny", "orthogonal"])
def test_slerp_special_angles_equal_reference(case):
    """Nearly (anti)parallel tensors take the linear branch; a tensor of norm ≤ 1e-8 is not normalised (so a
    tiny multiple of the base counts as orthogonal to it, not parallel)."""
    base, other = _pair(21)
    noise = torch.randn(SHAPE, generator=gen(22)) * 1e-5
    partner = {"parallel": 2.0 * base + noise, "antiparallel": -0.5 * base + noise, "zero": torch.zeros(SHAPE),
               "tiny": 1e-9 * base, "orthogonal": other - (other * base).sum() / (base * base).sum() * base}[case]
    close(run_method("slerp", base, [partner], t=0.3), ref.slerp(0.3, base, partner))
    close(run_method("slerp", partner, [base], t=0.3), ref.slerp(0.3, partner, base))  # either end


def test_slerp_keeps_norms_of_unit_tensors_and_halves_the_angle():
    """The geometry itself: between unit tensors at angle Ω, t = ½ is a unit tensor at Ω/2 from both ends."""
    base, other = _pair(23)
    a, b = base / base.norm(), other / other.norm()
    mid = run_method("slerp", a, [b], t=0.5).double()
    omega = torch.acos((a.double() * b.double()).sum())
    assert abs(float(mid.norm()) - 1.0) < 1e-6
    for end in (a, b):
        assert abs(float(torch.acos((mid * end.double()).sum().clamp(-1, 1))) - float(omega) / 2) < 1e-4


def correlated_models(seed: int, count: int = 3, shape=SHAPE, scale: float = 0.01) -> tuple[torch.Tensor,
                                                                                             list[torch.Tensor]]:
    """Fine-tunes that share part of their task vector (cosines near ½ between them), as Model Stock expects."""
    g = gen(seed)
    base = torch.randn(*shape, generator=g) * 0.02
    shared = torch.randn(*shape, generator=g) * scale
    return base, [base + shared + torch.randn(*shape, generator=g) * scale for _ in range(count)]


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize(("count", "shape", "scale"), [(2, SHAPE, 0.01), (3, SHAPE, 0.01), (4, (53,), 0.01),
                                                       (3, (4, 5, 6), 0.01), (3, SHAPE, 1e-5)])
def test_model_stock_equals_reference(filter_wise, count, shape, scale):
    """scale 1e-5: task vectors so small that the product of their norms is below 1e-6, which mergekit
    divides by instead (the cosines shrink, and with them t)."""
    base, models = correlated_models(25, count, shape, scale)
    out = run_method("model_stock", base, models, filter_wise=filter_wise)
    close(out, ref.model_stock(base, models, filter_wise))
    assert out.dtype == base.dtype


def test_model_stock_interpolates_by_the_angle_and_keeps_the_base_when_singular():
    """Orthogonal task vectors (cos φ = 0) give t = 0, the base; identical ones (cos φ = 1) t = 1, their mean;
    opposite ones (1 + (N−1) cos φ = 0) the base too, instead of dividing by zero."""
    base, (m1, m2) = random_models(26, count=2)
    tau = m1 - base
    orthogonal = m2 - base - ((m2 - base) * tau).sum() / (tau * tau).sum() * tau
    torch.testing.assert_close(run_method("model_stock", base, [m1, base + orthogonal]), base, rtol=0, atol=1e-7)
    torch.testing.assert_close(run_method("model_stock", base, [m1, m1]), m1, rtol=0, atol=1e-7)
    assert torch.equal(run_method("model_stock", base, [m1, base - tau]), base)


GAMMAS = [0.05, 0.2, 0.0]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("rescale", "normalize", "lam"), [(False, False, 1.0), (True, False, 0.7), (False, True, 1.3)])
def test_breadcrumbs_equal_reference(method, rescale, normalize, lam):
    base, models = random_models(28)
    w = weights_for(normalize)
    out = run_method(method, base, models, w, DENSITIES, per_model={"gamma": GAMMAS}, rescale=rescale,
                     normalize=normalize, **{"lambda": lam})
    expected = ref.breadcrumbs(base, [m - base for m in models], w, DENSITIES, GAMMAS, rescale,
                               consensus=method == "breadcrumbs_ties", normalize=normalize, lam=lam)
    close(out, expected)


@pytest.mark.parametrize(("density", "gamma", "kept_ranks"), [
    (0.3, 0.1, (10, 40)),  # drop the 10 largest, keep the next 30, drop the 60 smallest
    (0.9, 0.2, (10, 100)),  # ρ + γ > 1: the density wins, only 10 are dropped from the top
    (0.5, 0.0, (0, 50)),  # γ = 0: TIES' trim
    (0.0, 0.3, (0, 0)),  # nothing kept
    (1.0, 0.3, (0, 100)),  # ρ = 1 keeps everything, whatever γ
])
def test_breadcrumbs_mask_keeps_the_band_below_the_outliers(density, gamma, kept_ranks):
    """Magnitudes 1..100 in random order: the kept entries are exactly those of rank (largest first)
    kept_ranks[0] + 1 .. kept_ranks[1]."""
    from hm3.merge import ops

    magnitudes = torch.randperm(100, generator=gen(29)).double() + 1
    signs = torch.where(torch.rand(100, generator=gen(30)) < 0.5, -1.0, 1.0).double()
    delta = (magnitudes * signs).float().reshape(10, 10)
    keep = ops.breadcrumbs_mask(delta, density, gamma)
    low, high = kept_ranks
    assert torch.equal(keep.reshape(-1), (magnitudes <= 100 - low) & (magnitudes > 100 - high))
    assert torch.equal(keep, ref.breadcrumbs_mask(delta, density, gamma))


EPSILONS = [0.1, 0.15, 0.05]
DELLA_DENSITIES = [0.3, 0.5, 0.7]  # ρ ± ε inside (0, 1)


def _della_masks(deltas, densities, epsilons, seeds) -> list[torch.Tensor]:
    return [ref.della_mask(d, rho, eps, gen(s)) for d, rho, eps, s in zip(deltas, densities, epsilons, seeds, strict=True)]


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("rescale_mode", "normalize"), [("l1", None), ("inverse", False), ("none", True)])
def test_della_methods_equal_reference_with_the_masks_of_their_seeds(method, rescale_mode, normalize):
    base, models = random_models(32)
    deltas = [m - base for m in models]
    seeds = [41, 42, 43]
    normalize = (method == "della") if normalize is None else normalize  # None: the method's default
    w = weights_for(normalize)
    out = run_method(method, base, models, w, DELLA_DENSITIES, per_model={"epsilon": EPSILONS}, seeds=seeds,
                     rescale_mode=rescale_mode, normalize=normalize, **{"lambda": 0.8})
    masks = _della_masks(deltas, DELLA_DENSITIES, EPSILONS, seeds)
    expected = ref.della_merge(base, deltas, w, DELLA_DENSITIES, EPSILONS, masks, rescale_mode,
                               consensus=method == "della", normalize=normalize, lam=0.8)
    close(out, expected)


@pytest.mark.parametrize("shape", [(6, 50), (300,), (5, 1), (3, 4, 7)])
def test_della_probabilities_ramp_from_density_minus_to_plus_epsilon_by_magnitude_within_each_row(shape):
    from hm3.merge import ops

    delta = torch.randn(shape, generator=gen(33))
    p = ops.della_probabilities(delta, 0.4, 0.1)
    close(p, ref.della_probabilities(delta, 0.4, 0.1))
    rows = p.reshape(1, -1) if delta.dim() < 2 else p
    if rows.shape[1] > 1:
        assert torch.allclose(rows.amin(1), torch.tensor(0.3)) and torch.allclose(rows.amax(1), torch.tensor(0.5))
    close(rows.double().mean(1), torch.full(rows.mean(1).shape, 0.4, dtype=torch.float64))  # the mean is the density


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_della_ranks_order_ties_by_index_and_extreme_magnitudes_by_size(dtype):
    """The ranks behind DELLA's ramp (on the CPU a 2-D float tensor is ranked by one numpy sort of 64-bit keys):
    equal magnitudes (zeros, -0.0, repeats) rank in index order, and subnormals, the largest finite value and
    everything between rank by size, as the reference's stable sort ranks them."""
    from hm3.merge import ops

    tiny, huge = torch.finfo(dtype).smallest_normal / 4, torch.finfo(dtype).max
    row = [0.0, -0.0, 1.5, -1.5, tiny, -tiny, huge, -huge, 0.25, 1.5, 0.0, -2.0, 3.0, tiny, 0.5, -0.25]
    delta = torch.tensor([row, row[::-1], [v * 0.5 for v in row]], dtype=dtype)
    delta = torch.cat([delta, torch.randn(5, len(row), generator=gen(4)).to(dtype)])
    close(ops.della_probabilities(delta, 0.4, 0.1), ref.della_probabilities(delta.double(), 0.4, 0.1))
    reference_ranks = torch.argsort(torch.argsort(delta.double().abs(), dim=1, stable=True), dim=1, stable=True)
    assert torch.equal(ops._row_ranks(delta), reference_ranks)
    stacked = torch.stack([delta, delta.flip(1)], dim=2)  # 3-D: ranked along axis 1 by torch's stable sort
    assert torch.equal(ops._row_ranks(stacked)[..., 0], reference_ranks)
    many_ties = torch.zeros(2, 5000, dtype=dtype)  # long rows of equal magnitudes: where an unstable sort reorders
    many_ties[:, ::7] = 1.0
    expected = torch.argsort(torch.argsort(many_ties.abs(), dim=1, stable=True), dim=1, stable=True)
    assert torch.equal(ops._row_ranks(many_ties), expected)
    assert torch.equal(ops._row_ranks(many_ties.unsqueeze(2))[..., 0], expected)


def test_della_ranks_a_cpu_matrix_of_floats_without_torchs_argsort(monkeypatch):
    """The numpy key sort is the one that ranks a float32 matrix on the CPU (torch's argsort took 4x longer)."""
    from hm3.merge import ops

    def argsort(*args, **kwargs):
        raise AssertionError("torch.argsort used for a CPU float32 matrix")

    monkeypatch.setattr(ops.torch, "argsort", argsort)
    ranks = ops._row_ranks(torch.tensor([[3.0, -1.0, 2.0, 0.0]]))
    assert ranks.tolist() == [[3, 1, 2, 0]]


def test_della_with_epsilon_zero_is_dare_on_the_same_draws():
    base, models = random_models(34)
    for rescale_mode in ("l1", "inverse", "none"):
        della = run_method("della_linear", base, models, WEIGHTS, DENSITIES, per_model={"epsilon": [0.0] * 3},
                           rescale_mode=rescale_mode)
        assert torch.equal(della, run_method("dare_linear", base, models, WEIGHTS, DENSITIES, rescale_mode=rescale_mode))


def test_della_keeps_each_entry_with_its_probability():
    """One model, no rescale: over the entries of each magnitude decile, the kept fraction is the mean
    probability of that decile (within 5 standard deviations), rising from ρ − ε to ρ + ε."""
    base, (model,) = random_models(35, count=1, shape=(1, 40000))
    rho, eps = 0.5, 0.3
    out = run_method("della_linear", base, [model], [1.0], [rho], per_model={"epsilon": [eps]}, rescale_mode="none")
    kept = ((out - base) != 0).reshape(-1)
    order = torch.argsort((model - base).abs().reshape(-1))
    fractions = []
    for decile in order.chunk(10):
        expected = float(ref.della_probabilities(model - base, rho, eps).reshape(-1)[decile].mean())
        n = decile.numel()
        fraction = float(kept[decile].double().mean())
        assert abs(fraction - expected) <= 5 * math.sqrt(expected * (1 - expected) / n)
        fractions.append(fraction)
    assert fractions[0] < 0.3 and fractions[-1] > 0.7


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_reproducible_by_seed(method):
    base, models = random_models(36)
    runs = [run_method(method, base, models, POSITIVE_WEIGHTS, DELLA_DENSITIES, per_model={"epsilon": EPSILONS}, seeds=s)
            for s in ([1, 2, 3], [1, 2, 3], [1, 2, 4])]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_the_mean_of_many_della_seeds_is_the_undropped_merge():
    """E[m_i / p_i] = 1, so with the paper's inverse rescale the mean della_linear merge is task arithmetic."""
    base, models = random_models(37, count=3, shape=(20, 20))
    runs, rho = 600, DELLA_DENSITIES
    total = torch.zeros_like(base, dtype=torch.float64)
    for s in range(runs):
        total += run_method("della_linear", base, models, WEIGHTS, rho, per_model={"epsilon": EPSILONS},
                            seeds=[1000 * s + k for k in range(3)], rescale_mode="inverse").double() - base
    deltas = [(m - base).double() for m in models]
    undropped = sum(wk * d for wk, d in zip(WEIGHTS, deltas, strict=True))
    ps = [ref.della_probabilities(m - base, r, e) for m, r, e in zip(models, rho, EPSILONS, strict=True)]
    sd = torch.sqrt(sum(wk**2 * d**2 * (1 - p) / p for wk, d, p in zip(WEIGHTS, deltas, ps, strict=True)) / runs)
    assert ((total / runs - undropped).abs() <= 5 * sd + 1e-7).all()


def test_della_refuses_probabilities_outside_zero_one():
    from hm3.errors import ConfigError

    base, models = random_models(38)
    with pytest.raises(ConfigError, match=r"^della: density ± epsilon must lie strictly between 0 and 1; "
                                          r"got density 0.9, epsilon 0.15$"):
        run_method("della", base, models, WEIGHTS, [0.5, 0.9, 0.5])
    from hm3.merge.ops import della_problem

    assert della_problem(0.5, 0.5) is not None and della_problem(0.25, 0.25) is not None  # p = 0 or 1: refused
    assert della_problem(0.5, 0.4999) is None and della_problem(0.3, 0.0) is None
    # density 1 and 0 keep and drop everything whatever epsilon, as in mergekit
    close(run_method("della_linear", base, models, WEIGHTS, [1.0, 0.0, 1.0], per_model={"epsilon": [0.9] * 3}),
          ref.task_arithmetic(base, [models[0] - base, 0 * base, models[2] - base], WEIGHTS))


NUSLERP_LAYOUTS = [(True, False), (False, False), (False, True)]  # (nuslerp_flatten, nuslerp_row_wise)


@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_LAYOUTS)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [SHAPE, (41,), (3, 5, 7)])
def test_nuslerp_equals_reference(flatten, row_wise, with_base, shape):
    base, models = random_models(40, count=2, shape=shape)
    w = [0.7, 0.4]
    out = run_method("nuslerp", base if with_base else None, models, w, nuslerp_flatten=flatten,
                     nuslerp_row_wise=row_wise)
    close(out, ref.nuslerp(base if with_base else None, models, w, flatten, row_wise))


def test_nuslerp_weights_set_t_and_colinear_rows_are_linear():
    """t = w_2 / (w_1 + w_2): weights (1, 0) give the first model, (0, 1) the second, a zero sum t = ½; a row
    whose two vectors are parallel is interpolated linearly (the spherical formula would divide by sin 0)."""
    base, (m1, m2) = random_models(41, count=2)
    for w, expected in (([1.0, 0.0], m1), ([0.0, 2.0], m2)):
        torch.testing.assert_close(run_method("nuslerp", None, [m1, m2], w), expected, rtol=1e-5, atol=1e-7)
    close(run_method("nuslerp", None, [m1, m2], [0.3, -0.3]), ref.nuslerp(None, [m1, m2], [1.0, 1.0]))
    parallel = m1.clone()
    parallel[0] = 3 * m1[0]  # row 0 of the pair is colinear, the other rows are not
    out = run_method("nuslerp", None, [m1, parallel], [1.0, 3.0], nuslerp_flatten=False)
    torch.testing.assert_close(out[0], 0.25 * m1[0] + 0.75 * parallel[0])
    close(out, ref.nuslerp(None, [m1, parallel], [1.0, 3.0], flatten=False))
    unchanged = m1.clone()
    unchanged[2] = base[2]  # a row the fine-tune left alone: a zero task vector, normalised by 1e-7, not by 0
    out = run_method("nuslerp", base, [unchanged, m2], [1.0, 1.0], nuslerp_flatten=False)
    assert torch.isfinite(out).all()
    close(out, ref.nuslerp(base, [unchanged, m2], [1.0, 1.0], flatten=False))


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("scale", [0.01, 1e-4])  # 1e-4: mean squares sum below 1e-6, so the weights are 1/M
def test_sce_equals_reference(select_topk, scale):
    """The first rows are left alone by every fine-tune: zero variance, not counted in select_topk's share."""
    base, models = correlated_models(43, 3, SHAPE, scale)
    for m in models:
        m[:10] = base[:10]
    close(run_method("sce", base, models, select_topk=select_topk),
          ref.sce(base, [m - base for m in models], select_topk))


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    """Where only one model agrees with the elected sign its value is kept whole; where both agree they are
    averaged with weights proportional to their mean squares."""
    base = torch.zeros(5)
    t1, t2 = torch.tensor([3.0, 0.0, -1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0, 0.0, 4.0])
    # mean squares 14/5 and 21/5: w = (0.4, 0.6); entry 2: Σ τ = +1 elects +, only model 2 agrees;
    # entry 3: nobody moved; entry 4: both agree, 0.4·2 + 0.6·4
    out = run_method("sce", base, [base + t1, base + t2])
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0, 2.0, 0.0, 3.2]))


def spread_models(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    """Tensors at wide angles to each other (independent directions, different norms)."""
    g = gen(seed)
    return [torch.randn(*shape, generator=g) * (0.5 + k) for k in range(count)]


def karcher_case(case: str, seed: int) -> list[torch.Tensor]:
    """with_zero / with_tiny: a tensor of norm 0 or 1e-7 ≤ tol has no direction, but its norm still counts in
    the mean norm; antipodal: the directions' mean is 0, so the iteration starts from the first direction."""
    if case == "fine_tunes":
        return random_models(seed, count=3)[1]
    if case == "one":
        return spread_models(seed, 1)
    if case == "all_zero":
        return [torch.zeros(SHAPE)] * 2
    if case == "antipodal":  # float64: in float32 the Ω/sin Ω at Ω ≈ π amplifies rounding (in mergekit too)
        (a,) = spread_models(seed, 1)
        return [a.double(), -2 * a.double()]
    models = spread_models(seed, 3)
    if case == "with_zero":
        models.append(torch.zeros(SHAPE))
    if case == "with_tiny":
        models.append(torch.full(SHAPE, 1e-7 / math.sqrt(models[0].numel())))
    return models


@pytest.mark.parametrize(("case", "max_iter"), [("fine_tunes", 10), ("spread", 10), ("spread", 0), ("spread", 2),
                                                ("with_zero", 10), ("with_tiny", 10), ("antipodal", 10), ("one", 10),
                                                ("all_zero", 10)])
def test_karcher_equals_reference(case, max_iter):
    models = karcher_case(case, 46)
    # entries of order 1 here (0.02 elsewhere): float32 rounding is 1e-7 of them, hence atol 1e-6
    torch.testing.assert_close(run_method("karcher", None, models, max_iter=max_iter).double(),
                               ref.karcher(models, max_iter), rtol=1e-5, atol=1e-6)


def test_karcher_of_two_tensors_is_the_slerp_midpoint_at_their_mean_norm():
    """On the sphere the Karcher mean of two points is the midpoint of the arc between them."""
    a, b = spread_models(47, 2)
    out = run_method("karcher", None, [a, b], max_iter=50, tol=1e-7).double()
    direction = ref.slerp(0.5, a / a.norm(), b / b.norm())
    expected = (a.norm() + b.norm()).double() / 2 * direction / direction.norm()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.5, -2.0, 0])
def test_passthrough_is_its_one_tensor_times_its_scale(scale):
    _, (model, *_) = random_models(50)
    out = run_method("passthrough", None, [model], per_model={"scale": [scale]})
    assert torch.equal(out, model if scale is None else model * scale)
    assert get_method("passthrough").model_param("scale").check("x") == "must be a number, got 'x'"
    assert get_method("passthrough").model_param("scale").check(None) is None


# --- the references against mergekit ---------------------------------------------------------------------


@pytest.mark.mergekit
@pytest.mark.parametrize("scale", [None, 0.37, 3.0])
def test_passthrough_equals_mergekit(scale):
    api = pytest.importorskip("mergekit.merge_methods")
    _, (model, *_) = random_models(51)
    expected = api.merge_tensors([model], "passthrough", parameters={"scale": scale})
    assert torch.equal(run_method("passthrough", None, [model], per_model={"scale": [scale]}), expected)


@pytest.mark.mergekit
@pytest.mark.parametrize(("normalize", "lam"), [(True, 1.0), (False, 0.7)])
def test_references_equal_mergekit(normalize, lam):
    """The oracle is itself right: mergekit's linear, task arithmetic and TIES give its numbers."""
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(10)
    deltas = [m - base for m in models]
    w = POSITIVE_WEIGHTS
    shared = {"normalize": normalize, "lambda": lam}
    mk = api.merge_tensors([base, *models], "ties", parameters=mergekit_params(w, DENSITIES, **shared), base_index=0)
    close(mk, ref.ties(base, deltas, w, DENSITIES, normalize, lam))
    mk = api.merge_tensors([base, *models], "ties", parameters=mergekit_params(w, DENSITIES, rescale=True, **shared),
                           base_index=0)
    close(mk, ref.ties(base, deltas, w, DENSITIES, normalize, lam, rescale=True))
    mk = api.merge_tensors([base, *models], "task_arithmetic", parameters=mergekit_params(w, **shared), base_index=0)
    close(mk, ref.task_arithmetic(base, deltas, w, normalize, lam))
    mk = api.merge_tensors(models, "linear", parameters={"weight": w, "normalize": normalize})
    close(mk, ref.linear(models, w, normalize))


@pytest.mark.mergekit
def test_reference_mask_is_mergekit_get_mask():
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    weighted = torch.randn(4, 30, 20, generator=gen(8))
    weighted[weighted.abs() < 0.3] = 0  # sparse entries, as after trimming
    weighted[:, 0, :4] = torch.tensor([1.0, -1.0, 0.0, 0.0]).view(4, 1)  # a zero sum: + is elected
    assert torch.equal(ref.get_mask(weighted), gta.get_mask(weighted, method="sum"))


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize(("rescale", "normalize"), [(True, False), (False, False), (True, True)])
def test_dare_methods_equal_mergekit_given_the_same_masks(monkeypatch, method, rescale, normalize):
    """mergekit draws its DARE masks with torch.bernoulli; it is served the masks hm3's seeds draw."""
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(21)
    deltas = [m - base for m in models]
    w, seeds = POSITIVE_WEIGHTS, [31, 32, 33]
    served = iter(_masks(deltas, DENSITIES, seeds))
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: next(served).to(p.dtype))
    params = mergekit_params(w, DENSITIES, normalize=normalize, rescale=rescale)
    expected = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    assert next(served, None) is None  # mergekit consumed exactly one mask per model
    monkeypatch.undo()
    out = run_method(method, base, models, w, DENSITIES, seeds=seeds, normalize=normalize, rescale=rescale)
    assert (out - expected).abs().max() <= 1e-6


@pytest.mark.mergekit
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp_equals_mergekit(t, base_index):
    """The base is the t = 0 end wherever it sits among mergekit's inputs."""
    api = pytest.importorskip("mergekit.merge_methods")
    base, other = _pair(24)
    inputs = [base, other] if base_index == 0 else [other, base]
    expected = api.merge_tensors(inputs, "slerp", parameters={"t": t}, base_index=base_index)
    assert (run_method("slerp", base, [other], t=t) - expected).abs().max() <= 1e-6
    close(expected, ref.slerp(t, base, other))


@pytest.mark.mergekit
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize(("count", "shape"), [(2, SHAPE), (3, SHAPE), (3, (53,))])
def test_model_stock_equals_mergekit(filter_wise, count, shape):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = correlated_models(27, count, shape)
    expected = api.merge_tensors([base, *models], "model_stock", parameters={"filter_wise": filter_wise}, base_index=0)
    assert (run_method("model_stock", base, models, filter_wise=filter_wise) - expected).abs().max() <= 1e-6
    close(expected, ref.model_stock(base, models, filter_wise))


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("rescale", "normalize"), [(False, False), (True, True)])
def test_breadcrumbs_equal_mergekit(method, rescale, normalize):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(31)
    params = mergekit_params(POSITIVE_WEIGHTS, DENSITIES, rescale=rescale, normalize=normalize, **{"lambda": 0.9})
    params["gamma"] = {k + 1: g for k, g in enumerate(GAMMAS)}
    expected = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    out = run_method(method, base, models, POSITIVE_WEIGHTS, DENSITIES, per_model={"gamma": GAMMAS}, rescale=rescale,
                     normalize=normalize, **{"lambda": 0.9})
    assert (out - expected).abs().max() <= 1e-6
    close(expected, ref.breadcrumbs(base, [m - base for m in models], POSITIVE_WEIGHTS, DENSITIES, GAMMAS, rescale,
                                    consensus=method == "breadcrumbs_ties", normalize=normalize, lam=0.9))


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("rescale", "normalize"), [(True, None), (False, True), (True, False)])
def test_della_equals_mergekit_given_the_same_masks(monkeypatch, method, rescale, normalize):
    """mergekit draws DELLA's masks with torch.bernoulli(p): its p are checked against the reference's, and
    it is served the masks hm3's seeds draw."""
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(39)
    deltas = [m - base for m in models]
    seeds = [51, 52, 53]
    normalize = (method == "della") if normalize is None else normalize
    served = iter(_della_masks(deltas, DELLA_DENSITIES, EPSILONS, seeds))
    asked = []

    def bernoulli(p, *args, **kwargs):
        asked.append(p.clone())
        return next(served).to(p.dtype).reshape(p.shape)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    params = mergekit_params(POSITIVE_WEIGHTS, DELLA_DENSITIES, normalize=normalize, rescale=rescale)
    params["epsilon"] = {k + 1: e for k, e in enumerate(EPSILONS)}
    expected = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    monkeypatch.undo()
    assert next(served, None) is None  # one mask per model
    for p, d, rho, eps in zip(asked, deltas, DELLA_DENSITIES, EPSILONS, strict=True):
        close(p.reshape(d.shape), ref.della_probabilities(d, rho, eps))
    out = run_method(method, base, models, POSITIVE_WEIGHTS, DELLA_DENSITIES, per_model={"epsilon": EPSILONS}, seeds=seeds,
                     normalize=normalize, rescale=rescale)
    assert (out - expected).abs().max() <= 1e-6


@pytest.mark.mergekit
@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_LAYOUTS)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_equals_mergekit(flatten, row_wise, with_base):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(42, count=2)
    w = [0.35, 0.9]
    params = {"weight": {1: w[0], 2: w[1]}, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    if with_base:
        expected = api.merge_tensors([base, *models], "nuslerp", parameters=params, base_index=0)
    else:
        params["weight"] = {0: w[0], 1: w[1]}
        expected = api.merge_tensors(models, "nuslerp", parameters=params)
    out = run_method("nuslerp", base if with_base else None, models, w, nuslerp_flatten=flatten,
                     nuslerp_row_wise=row_wise)
    assert (out - expected).abs().max() <= 1e-6
    close(expected, ref.nuslerp(base if with_base else None, models, w, flatten, row_wise))


@pytest.mark.mergekit
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
@pytest.mark.parametrize("scale", [0.01, 1e-4])
def test_sce_equals_mergekit(select_topk, scale):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = correlated_models(44, 3, SHAPE, scale)
    expected = api.merge_tensors([base, *models], "sce", parameters={"select_topk": select_topk}, base_index=0)
    assert (run_method("sce", base, models, select_topk=select_topk) - expected).abs().max() <= 1e-6
    close(expected, ref.sce(base, [m - base for m in models], select_topk))


@pytest.mark.mergekit
@pytest.mark.parametrize(("case", "max_iter", "tol"), [("fine_tunes", 10, 1e-5), ("spread", 10, 1e-5),
                                                       ("spread", 3, 1e-3), ("with_zero", 10, 1e-5),
                                                       ("with_tiny", 10, 1e-5)])
def test_karcher_equals_mergekit(case, max_iter, tol):
    api = pytest.importorskip("mergekit.merge_methods")
    models = karcher_case(case, 49)
    expected = api.merge_tensors(models, "karcher", parameters={"max_iter": max_iter, "tol": tol})
    assert (run_method("karcher", None, models, max_iter=max_iter, tol=tol) - expected).abs().max() <= 1e-6
    torch.testing.assert_close(expected.double(), ref.karcher(models, max_iter, tol), rtol=1e-5, atol=1e-6)


@pytest.mark.mergekit
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_multislerp_equals_mergekit(with_base, normalize_weights, count):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = random_models(50, count=count)
    w = [0.6, 0.25, 0.4][:count]
    params = {"weight": {k + int(with_base): x for k, x in enumerate(w)}, "normalize_weights": normalize_weights}
    if with_base:
        expected = api.merge_tensors([base, *models], "multislerp", parameters=params, base_index=0)
    else:
        expected = api.merge_tensors(models, "multislerp", parameters=params)
    out = run_method("multislerp", base if with_base else None, models, w, normalize_weights=normalize_weights)
    assert torch.equal(out, expected)  # bit for bit: the same steps in the same order
    close(expected, ref.multislerp(base if with_base else None, models, w, normalize_weights))


@pytest.mark.mergekit
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.05, 10.0])
def test_nearswap_equals_mergekit(t):
    api = pytest.importorskip("mergekit.merge_methods")
    base, (other,) = random_models(51, count=1)
    other = torch.where(torch.arange(other.numel()).reshape(other.shape) % 5 == 0, base, other)  # some Δ = 0
    expected = api.merge_tensors([base, other], "nearswap", parameters={"t": t}, base_index=0)
    out = run_method("nearswap", base, [other], t=t)
    assert (out - expected).abs().max() <= 1e-6
    close(expected, ref.nearswap(t, base, other))


def ram_case(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Three task vectors that each leave about half their entries at the base (some within ε of it), so
    entries are changed by no model, by one, or by several."""
    base, models = random_models(seed)
    g = gen(seed + 1)
    out = []
    for m in models:
        keep = torch.rand(m.shape, generator=g) < 0.5
        near = torch.rand(m.shape, generator=g) < 0.1
        out.append(torch.where(keep, m, torch.where(near, base + 1e-6, base)))
    return base, out


@pytest.mark.mergekit
@pytest.mark.parametrize(("method", "params"), [("ram", {}), ("ram", {"epsilon": 0.01}), ("ramplus_tl", {}),
                                                ("ramplus_tl", {"r": 0.5, "alpha": 0.6, "epsilon": 1e-3})])
def test_ram_equals_mergekit(method, params):
    api = pytest.importorskip("mergekit.merge_methods")
    base, models = ram_case(52)
    expected = api.merge_tensors([base, *models], method, parameters=params, base_index=0)
    assert (run_method(method, base, models, **params) - expected).abs().max() <= 1e-6
    options = {"epsilon": params.get("epsilon", 1e-5)}
    if method == "ramplus_tl":
        options |= {"r": params.get("r", 0.1), "alpha": params.get("alpha", 0.2)}
    close(expected, ref.ram(base, [m - base for m in models], **options))


@pytest.mark.parametrize("method", ["multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_the_new_methods_in_bfloat16_and_float64(method):
    """bfloat16 inputs: the spherical, swap and fusion methods compute in float32 and return bfloat16, the float32
    result rounded once (multislerp without a base here: with one, its task vectors are bfloat16 differences, as
    nuslerp's); RAM computes in the inputs' dtype as mergekit does (RAM+ too, until its float32 factors
    promote). float64 inputs stay float64: the reference's values to float64 precision, but for RAM+'s
    factors, float32 as mergekit's."""
    base, models = ram_case(55)
    models = models[:1] if method in ("nearswap", "arcee_fusion") else models
    params = {"t": 0.001} if method == "nearswap" else {}  # on the order of |Δ|: shares strictly inside (0, 1)
    weights = [0.6, 0.3, 0.5] if method == "multislerp" else None
    if method == "multislerp":
        half = run_method(method, None, [m.bfloat16() for m in models], weights)
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, run_method(method, None, [m.bfloat16().float() for m in models], weights).bfloat16())
    half = run_method(method, base.bfloat16(), [m.bfloat16() for m in models], weights, **params)
    assert half.dtype == torch.bfloat16
    if method in ("ram", "ramplus_tl"):
        api = pytest.importorskip("mergekit.merge_methods")
        expected = api.merge_tensors([base.bfloat16(), *(m.bfloat16() for m in models)], method, parameters={},
                                     base_index=0)
        assert torch.equal(half, expected.to(torch.bfloat16))
    elif method != "multislerp":
        upcast = run_method(method, base.bfloat16().float(), [m.bfloat16().float() for m in models], weights, **params)
        assert torch.equal(half, upcast.to(torch.bfloat16))
    wide = run_method(method, base.double(), [m.double() for m in models], weights, **params)
    assert wide.dtype == torch.float64
    deltas = [m.double() - base.double() for m in models]
    expected = {"multislerp": lambda: ref.multislerp(base, models, weights),
                "nearswap": lambda: ref.nearswap(0.001, base, models[0]),
                "arcee_fusion": lambda: ref.arcee_fusion(base, models[0]),
                "ram": lambda: ref.ram(base, deltas),
                "ramplus_tl": lambda: ref.ram(base, deltas, r=0.1, alpha=0.2)}[method]()
    tolerance = 1e-6 if method == "ramplus_tl" else 1e-12
    torch.testing.assert_close(wide, expected, rtol=tolerance, atol=1e-12)


def test_dare_ties_over_models_of_another_dtype_than_the_base_merges_as_over_the_same_values():
    """Models in bfloat16 over a float32 base take the per-model path that keeps torch's promotion (the task
    vectors are float32): the same masks and the same tensor, bit for bit, as the models given in float32."""
    base, models = random_models(56)
    half = [m.bfloat16() for m in models]
    mixed = run_method("dare_ties", base, half, WEIGHTS, DENSITIES, seeds=[3, 4, 5])
    same = run_method("dare_ties", base, [m.float() for m in half], WEIGHTS, DENSITIES, seeds=[3, 4, 5])
    assert mixed.dtype == torch.float32 and torch.equal(mixed, same)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_sign_merges_over_a_bfloat16_base_keep_the_float32_task_vectors(method):
    """float32 experts over a bfloat16 base: their task vectors are float32 (torch's promotion), and the sign
    merge keeps them so, rounding once to the base's dtype at the end; the same as over the base's values given
    in float32 (weights exact in bfloat16, which the weights are rounded to)."""
    base, models = random_models(59)
    weights, densities = [0.5, 0.75, 0.25], [0.5, 0.5, 0.5]
    half = run_method(method, base.bfloat16(), models, weights, densities, seeds=[1, 2, 3])
    wide = run_method(method, base.bfloat16().float(), models, weights, densities, seeds=[1, 2, 3])
    assert half.dtype == torch.bfloat16 and torch.equal(half, wide.bfloat16())


@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "df_merge"])
def test_task_vector_methods_over_a_bfloat16_base_return_bfloat16(method):
    """float32 models over a bfloat16 base: float32 task vectors, merged, added to the base and written in the
    base's dtype (as every method with a base returns)."""
    base, models = random_models(57, count=2)
    fishers = [torch.rand(SHAPE, generator=gen(58)) + 0.1 for _ in models] if method == "df_merge" else None
    out = run_method(method, base.bfloat16(), models, [0.4, 0.7], fishers=fishers)
    assert out.dtype == torch.bfloat16


def test_multislerp_refuses_weights_that_do_not_match_its_models():
    from hm3.errors import ConfigError
    from hm3.merge import ops

    with pytest.raises(ConfigError, match="disagree on the number of models"):
        ops.multislerp([torch.ones(2), torch.zeros(2)], [1.0], normalize_weights=True, eps=1e-8)
    with pytest.raises(ConfigError, match="disagree on the number of models"):
        ops.multislerp([torch.ones(2)], [1.0, 2.0], normalize_weights=True, eps=1e-8)


def test_ramplus_by_hand():
    """Model 1 changed entries 0-3 alone and entry 4 with model 2: ρ_1 = 1/4; model 2 changed entry 5 alone and
    entry 4: ρ_2 = 1; model 3 changed nothing (ρ = 0). With r = 1, α = 2: λ = 1.25, 2, 1; entry 4 takes the mean."""
    base = torch.zeros(6)
    m1 = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.25, 0.0])
    m2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.75, 0.5])
    out = run_method("ramplus_tl", base, [m1, m2, base.clone()], r=1.0, alpha=2.0)
    assert torch.equal(out, torch.tensor([0.625, 0.625, 0.625, 0.625, 0.5, 1.0]))
    # an entry exactly at ε is unchanged (> ε counts): with ε = 0.25, model 1's entry 4 drops out
    out = run_method("ram", base, [m1, m2], epsilon=0.25)
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.75, 0.5]))


def test_ram_by_hand():
    """Entry 0 changed by model 1 alone, entry 1 by both, entry 2 by neither beyond ε. RAM+: model 1 changed
    one entry alone and one shared (ρ = 1, capped at α), model 2 none alone (ρ = 1 / ε, capped)."""
    base = torch.zeros(3)
    m1, m2 = torch.tensor([0.4, 0.2, 1e-6]), torch.tensor([0.0, 0.6, -1e-6])
    torch.testing.assert_close(run_method("ram", base, [m1, m2]), torch.tensor([0.4, 0.4, 0.0]))
    torch.testing.assert_close(run_method("ramplus_tl", base, [m1, m2], r=0.5, alpha=0.2),
                               torch.tensor([0.4 * 1.1, 0.4, 0.0]))
    torch.testing.assert_close(run_method("ramplus_tl", base, [m1, m2], r=0.5, alpha=2.0),
                               torch.tensor([0.4 * 1.5, 0.4, 0.0]))



def test_ram_over_a_bfloat16_base_returns_the_bases_dtype():
    """Float32 task vectors over a bfloat16 base: the sum is computed in float32 and the merged tensor is the
    base's dtype, which the output's layout holds for it (a float32 tensor stopped the merge's writer)."""
    from hm3.merge import ops

    base = torch.zeros(3, dtype=torch.bfloat16)
    out = ops.ram(base, [torch.tensor([0.4, 0.2, 0.0]), torch.tensor([0.0, 0.6, 0.0])], epsilon=1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([0.4, 0.4, 0.0]).to(torch.bfloat16))

@pytest.mark.mergekit
@pytest.mark.parametrize("shape", [SHAPE, (7,), (3, 4, 5)])
def test_arcee_fusion_equals_mergekit(shape):
    api = pytest.importorskip("mergekit.merge_methods")
    base, (other,) = random_models(53, count=1, shape=shape)
    expected = api.merge_tensors([base, other], "arcee_fusion", parameters={}, base_index=0)
    out = run_method("arcee_fusion", base, [other])
    assert (out - expected).abs().max() <= 1e-6
    taken = out != base
    assert 0 < int(taken.sum()) < base.numel() or base.numel() < 10  # some changes taken, not all
    torch.testing.assert_close(out.double(), ref.arcee_fusion(base, other), rtol=0, atol=1e-7)


def test_arcee_fusion_takes_exact_quantiles_of_a_tensor_larger_than_mergekits_sample():
    """Over 1M entries mergekit samples them (unseeded); hm3's threshold is the exact one, read off the whole
    sorted tensor at mergekit's indices."""
    from hm3.merge import ops

    importance = torch.rand(1100, 1000, generator=gen(54)) ** 3
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(torch.tensor(f) * (n - 1))] for f in (0.25, 0.5, 0.75))
    assert torch.equal(ops.fusion_threshold(importance), median + 1.5 * (q3 - q1))


def test_arcee_fusion_by_hand():
    """One row: the KL factor is a common scale, so the change kept is the one whose |Δ| is an outlier among
    the row's |Δ| (fence = median + 1.5 IQR of 0, 0, 0, 0.1, 2 → 0 + 1.5 · 0.1)."""
    base = torch.zeros(1, 5)
    other = torch.tensor([[0.0, 0.0, 0.0, 0.1, 2.0]])
    assert torch.equal(run_method("arcee_fusion", base, [other]), torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0]]))
    # a change exactly at the fence (1.5 · IQR of 0, 0, 0, 1, 1.5 = 1.5) is taken
    at_fence = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.5]])
    assert torch.equal(run_method("arcee_fusion", base, [at_fence]), torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.5]]))


def test_multislerp_by_hand():
    """Two orthogonal directions: the result points along their weighted mean, at the weighted mean norm."""
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    direction = torch.tensor([0.75, 0.25]) / torch.tensor([0.75, 0.25]).norm()
    torch.testing.assert_close(run_method("multislerp", None, [a, b], [0.75, 0.25]), 2.5 * direction)
    torch.testing.assert_close(run_method("multislerp", None, [a, b], [1.5, 0.5], normalize_weights=False),
                               5.0 * direction)
    base = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(run_method("multislerp", base, [a + base, b + base], [3.0, 1.0]),
                               base + 2.5 * direction)


def test_multislerp_without_a_mean_direction():
    """Opposite directions whose weights balance: two models are mixed linearly, three are refused naming the
    tensor; zero vectors (a tensor no model changed) give zero; one model is returned as it is."""
    from hm3.errors import ConfigError

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])
    torch.testing.assert_close(run_method("multislerp", None, [a, b], [1.0, 1.0]), torch.tensor([-1.0, 0.0]))
    mixed = run_method("multislerp", None, [a.bfloat16(), b.bfloat16()], [1.0, 1.0])
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, torch.tensor([-1.0, 0.0], dtype=torch.bfloat16))
    # a weight of 0 on the only direction: none is left, and the linear mix gives the zero model its whole weight
    assert torch.equal(run_method("multislerp", None, [a, torch.zeros(2)], [0.0, 1.0]), torch.zeros(2))
    with pytest.raises(ConfigError, match="^tensor 't': multislerp: the weighted mean of the models' directions has "
                                          r"norm 0, below eps 1e-08 \(models pointing in opposite directions with "
                                          "weights that balance out, or an eps not small against the vectors' norms"
                                          r"\), so there is no direction to interpolate around; change the weights or eps$"):
        run_method("multislerp", None, [a, b, torch.zeros(2)], [1.0, 1.0, 1.0])
    base = torch.tensor([0.5, 2.0])
    assert torch.equal(run_method("multislerp", base, [base, base, base], [1.0, 2.0, 1.0]), base)
    assert run_method("multislerp", base, [a], [0.3]) is a


def test_nearswap_by_hand():
    base = torch.zeros(4)
    other = torch.tensor([0.001, 0.5, -2.0, 0.0])
    torch.testing.assert_close(run_method("nearswap", base, [other], t=0.1), torch.tensor([0.001, 0.1, -0.1, 0.0]))
    assert torch.equal(run_method("nearswap", base, [other], t=-1.0), base)  # a negative t keeps the base
    half = run_method("nearswap", base.double(), [other.double()], t=0.1).dtype
    assert half == torch.float64


# --- DARE in expectation --------------------------------------------------------------------------------------


def test_dare_keeps_each_entry_with_probability_density():
    """One model, weight 1, no rescale: the merge's task vector is m ⊙ τ, m ~ Bernoulli(ρ) per entry."""
    base, (model,) = random_models(12, count=1, shape=(300, 300))
    for rho in (0.1, 0.5, 0.9):
        out = run_method("dare_linear", base, [model], [1.0], [rho], rescale_mode="none")
        kept = (out - base) != 0
        n = kept.numel()
        assert abs(int(kept.sum()) - rho * n) <= 5 * math.sqrt(n * rho * (1 - rho))
        assert torch.equal((out - base)[kept], (model - base)[kept])  # kept entries unscaled


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_rescales_the_kept_entries(method):
    base, (model,) = random_models(13, count=1, shape=(200, 100))
    tau = (model - base).double()
    inverse = (run_method(method, base, [model], [1.0], [0.25], rescale_mode="inverse") - base).double()
    kept = inverse != 0
    torch.testing.assert_close(inverse[kept], tau[kept] / 0.25, rtol=1e-5, atol=1e-7)
    l1 = (run_method(method, base, [model], [1.0], [0.25], rescale_mode="l1") - base).double()
    assert torch.equal(l1 != 0, kept)  # the same seed, the same mask
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
    ratio = l1[kept] / tau[kept]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=0)  # one common factor


@pytest.mark.parametrize(("method", "count"), [("dare_linear", 3), ("dare_ties", 1)])
def test_the_mean_of_many_seeds_is_the_undropped_merge(method, count):
    """E[m/ρ] = 1, so over many seeds the mean DARE merge (inverse rescale) is the merge without dropping:
    task arithmetic for dare_linear, and for dare_ties with one model (its sign election then never drops)."""
    base, models = random_models(14, count=count, shape=(20, 20))
    w, rho = WEIGHTS[:count], DENSITIES[:count]
    runs = 600
    total = torch.zeros_like(base, dtype=torch.float64)
    for s in range(runs):
        seeds = [1000 * s + k for k in range(count)]
        total += run_method(method, base, models, w, rho, seeds=seeds, rescale_mode="inverse").double() - base
    mean = total / runs
    deltas = [(m - base).double() for m in models]
    undropped = sum(wk * d for wk, d in zip(w, deltas, strict=True))
    # per entry: Var = Σ_k w_k² τ_k² (1 − ρ_k)/ρ_k per draw, divided by the number of runs
    sd = torch.sqrt(sum(wk**2 * d**2 * (1 - r) / r for wk, d, r in zip(w, deltas, rho, strict=True)) / runs)
    assert ((mean - undropped).abs() <= 5 * sd + 1e-7).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_weighted_dare_ties_with_uniform_fisher_is_dare_ties(normalize):
    """I_k = 1 when every F_k is equal: the Fisher-weighted variant's exact limit."""
    base, models = random_models(15)
    uniform = [torch.full(SHAPE, 2.5)] * 3
    plain = run_method("dare_ties", base, models, WEIGHTS, DENSITIES, normalize=normalize)
    assert torch.equal(run_method("dare_ties", base, models, WEIGHTS, DENSITIES, fishers=uniform,
                                  normalize=normalize), plain)


# --- the registry: parameter checks, defaults and flags -------------------------------------------------------


@pytest.mark.parametrize(("check", "value", "problem"), [
    ("weight", 10.0, None), ("weight", -10, None), ("weight", 10.5, "must lie in [-10, 10], got 10.5"),
    ("weight", -10.01, "must lie in [-10, 10], got -10.01"), ("weight", True, "must be a number, got True"),
    ("weight", "1", "must be a number, got '1'"),
    ("density", 0.0, None), ("density", 1, None), ("density", 1.01, "must lie in [0, 1], got 1.01"),
    ("density", -0.1, "must lie in [0, 1], got -0.1"), ("density", False, "must be a number, got False"),
    ("density", None, "must be a number, got None"),
    ("normalize", False, None), ("normalize", 1, "must be true or false, got 1"),
    ("lambda", 0, None), ("lambda", -2.5, None), ("lambda", True, "must be a number, got True"),
    ("lambda", "x", "must be a number, got 'x'"),
    ("rescale_mode", "inverse", None), ("rescale_mode", "l2", "must be one of l1, inverse, none, got 'l2'"),
    ("fisher", "f.safetensors", None), ("fisher", "", "must be a path to a safetensors file, got ''"),
    ("fisher", 3, "must be a path to a safetensors file, got 3"),
])
def test_parameter_checks_accept_the_range_and_say_what_is_wrong(check, value, problem):
    method = get_method("dare_ties")
    spec = method.param(check) or method.model_param(check)
    assert spec is not None and spec.check(value) == problem


@pytest.mark.parametrize(("check", "value", "problem"), [
    ("max_iter", 0, None), ("max_iter", 3, None), ("max_iter", -1, "must be a whole number ≥ 0, got -1"),
    ("max_iter", 2.0, "must be a whole number ≥ 0, got 2.0"), ("max_iter", True, "must be a whole number ≥ 0, got True"),
    ("tol", 1e-9, None), ("tol", 0.5, None), ("tol", 0, "must be > 0, got 0"), ("tol", -1e-5, "must be > 0, got -1e-05"),
    ("tol", "x", "must be a number, got 'x'"),
])
def test_karcher_checks_its_iteration_count_and_tolerance(check, value, problem):
    assert get_method("karcher").param(check).check(value) == problem


def test_defaults_and_flags_are_mergekits():
    """mergekit 0.1.5's defaults: a mergekit config means the same in hm3."""
    defaults = {name: {p.name: p.default for p in (*m.params, *m.model_params)} for name, m in MERGE_METHODS.items()}
    assert defaults["linear"] == {"normalize": True, "weight": None}
    assert defaults["ties"] | {"fisher": None} == {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False,
                                                   "rescale_mode": None, "weight": None, "density": 1.0, "fisher": None}
    assert defaults["dare_ties"]["normalize"] is False and defaults["dare_ties"]["rescale"] is True
    assert defaults["dare_linear"]["normalize"] is False and defaults["dare_linear"]["rescale"] is True
    assert defaults["task_arithmetic"]["normalize"] is False and "density" not in defaults["task_arithmetic"]
    assert {n for n, m in MERGE_METHODS.items() if m.uses_randomness} == {"dare_ties", "dare_linear", "della",
                                                                          "della_linear"}
    assert {n for n, m in MERGE_METHODS.items() if m.requires_fisher} == {"fisher", "df_merge"}
    assert {n for n, m in MERGE_METHODS.items() if m.supports_fisher} == {"task_arithmetic", "ties", "dare_ties",
                                                                         "dare_linear", "fisher", "df_merge"}
    assert {n for n, m in MERGE_METHODS.items() if not m.needs_base} == {"linear", "fisher", "nuslerp", "karcher",
                                                                         "passthrough", "multislerp"}
    assert defaults["karcher"] == {"max_iter": 10, "tol": 1e-5}
    assert {n for n, m in MERGE_METHODS.items() if m.optional_base} == {"nuslerp", "multislerp"}
    assert defaults["multislerp"] == {"normalize_weights": True, "eps": 1e-8, "weight": None}
    assert defaults["nearswap"] == {"t": None} and get_method("nearswap").param("t").required
    assert defaults["arcee_fusion"] == {}
    assert defaults["ram"] == {"epsilon": 1e-5} and defaults["ramplus_tl"] == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert defaults["nuslerp"] == {"nuslerp_flatten": True, "nuslerp_row_wise": False, "weight": None}
    assert {n: m.mergekit_name for n, m in MERGE_METHODS.items() if m.mergekit_name != n} == {"fisher": None,
                                                                                            "df_merge": None}
    assert defaults["slerp"] == {"t": None} and get_method("slerp").param("t").required
    assert {n: (m.min_models, m.max_models) for n, m in MERGE_METHODS.items() if m.max_models or m.min_models > 1} \
        == {"slerp": (1, 1), "model_stock": (2, None), "nuslerp": (2, 2), "passthrough": (1, 1), "nearswap": (1, 1),
            "arcee_fusion": (1, 1)}
    assert defaults["passthrough"] == {"scale": None}  # no scale: the tensor itself, not a product with 1
    assert defaults["model_stock"] == {"filter_wise": False}
    assert defaults["sce"] == {"select_topk": 1.0, "int8_mask": False}
    gta = {"lambda": 1.0, "int8_mask": False, "weight": None, "density": 1.0}
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        assert defaults[name] == gta | {"normalize": False, "rescale": False, "gamma": 0.01}
    assert defaults["della"] == gta | {"normalize": True, "rescale": True, "rescale_mode": None, "epsilon": 0.15}
    assert defaults["della_linear"] == defaults["della"] | {"normalize": False}
    assert {n for n, m in MERGE_METHODS.items() if m.check_model is not None} == {"della", "della_linear"}
    assert [p.name for p in MERGE_METHODS["ties"].model_params if p.required] == ["weight"]
    assert [p.name for p in (*MERGE_METHODS["ties"].params, *MERGE_METHODS["ties"].model_params)
            if p.hm3_only] == ["rescale_mode", "fisher"]
    assert get_method("ties").param("density") is None and get_method("ties").model_param("normalize") is None
    assert "TIES" in get_method("ties").doc
    assert all(m.name == name for name, m in MERGE_METHODS.items())  # a method knows the name it is found by


def test_unknown_and_twice_registered_methods_are_refused():
    from hm3.errors import ConfigError
    from hm3.merge.methods import all_parameter_names, merge_method

    with pytest.raises(ConfigError, match="^unknown merge_method 'frankenmerge'; known methods: arcee_fusion, breadcrumbs, "
                                          "breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, df_merge, "
                                          "fisher, karcher, linear, model_stock, multislerp, nearswap, nuslerp, "
                                          "passthrough, ram, ramplus_tl, sce, "
                                          "slerp, task_arithmetic, ties$"):
        get_method("frankenmerge")
    with pytest.raises(RuntimeError, match="^merge method 'ties' registered twice$"):
        merge_method("ties", needs_base=True, params=(), model_params=())(lambda x: x.base)
    assert all_parameter_names() == {"weight", "density", "fisher", "normalize", "rescale", "lambda", "int8_mask",
                                     "rescale_mode", "t", "filter_wise", "gamma", "epsilon", "nuslerp_flatten",
                                     "nuslerp_row_wise", "select_topk", "max_iter", "tol", "scale",
                                     "normalize_weights", "eps", "r", "alpha"}


@pytest.mark.parametrize(("key", "value", "written"), [("normalize", 0, "0"), ("rescale", "1", "'1'"),
                                                       ("int8_mask", "true", "'true'"), ("normalize", 1.0, "1.0")])
def test_a_switch_given_as_a_number_or_a_string_is_refused_as_written(key, value, written):
    """Switches are not read by a number type (mergekit would take ``normalize: 0`` as false): the refusal names the
    value as the recipe wrote it, not as a number it was read into."""
    from hm3.config import parse_merge_config
    from hm3.errors import ConfigError
    from hm3.merge.plan import resolve_jobs

    config = parse_merge_config({"merge_method": "dare_ties", "base_model": "b", "parameters": {key: value},
                                 "models": [{"model": f"m{i}", "parameters": {"weight": 1.0, "density": 0.5}}
                                            for i in range(2)]})
    with pytest.raises(ConfigError, match=rf"parameter '{key}' \(tensor w\) must be true or false, got {written}$"):
        resolve_jobs(config, get_method("dare_ties"), tensor_names=["w"], num_layers=1, input_refs=["m0", "m1"])
