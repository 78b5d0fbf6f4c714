"""Optimisers on synthetic objectives f_k(x) = −‖x − c_k‖² (known Pareto set: the segment c_1–c_2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hm3.errors import ConfigError
from hm3.search.optimizers import OPTIMIZERS, get_optimizer, run
from hm3.search.optimizers.bo_tcheby import tchebycheff
from hm3.search.pareto import non_dominated, protocol_hypervolume
from hm3.search.preferences import dirichlet_preferences

D = 3
CENTRES = torch.tensor([[0.2, 0.2, 0.2], [0.8, 0.8, 0.5]], dtype=torch.float64)
# hm3's protocol on this problem: "base" = the score at the far end of the Pareto segment, ideal = 0
BASE = -((CENTRES[0] - CENTRES[1]) ** 2).sum().repeat(2)
IDEAL = torch.zeros(2, dtype=torch.float64)


def raw_scores(X: torch.Tensor) -> torch.Tensor:
    return -((X[:, None, :] - CENTRES[None]) ** 2).sum(-1)


def normalised_scores(X: torch.Tensor) -> torch.Tensor:
    """What the driver tells the optimisers: base at 0, ideal at 1."""
    return (raw_scores(X) - BASE) / (IDEAL - BASE)


def _options(name: str, budget: int) -> dict:
    if name == "hm3-fixed":
        return {
            "points": torch.rand(budget, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        }
    if name == "nsga2":
        return {"pop_size": 4}
    if name in ("bo-mo", "bo-tcheby", "df-merge"):
        return {"n_init": 6, "num_restarts": 2, "raw_samples": 32} | (
            {"n_preferences": 2} if name == "bo-tcheby" else {}
        )
    return {}


def _make(name: str, *, budget: int, seed: int = 0):
    return get_optimizer(name)(D, 2, seed=seed, budget=budget, **_options(name, budget))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_registry_names_match_the_classes(name):
    assert get_optimizer(name).name == name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_budget_is_spent_exactly_and_points_stay_in_the_cube(name):
    opt = _make(name, budget=8)  # BO methods: 6 design points, then one batch of 2
    X, Y = run(opt, normalised_scores, batch_size=2)
    assert X.shape == (8, D) and Y.shape == (8, 2)
    assert bool(((X >= 0) & (X <= 1)).all())
    assert opt.remaining == 0
    with pytest.raises(RuntimeError, match="budget"):
        opt.ask()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_by_replay_gives_the_same_next_points(name):
    budget, done = 9, 6  # BO methods: the design is done, the first model-based step is compared
    uninterrupted = _make(name, budget=budget)
    run(uninterrupted, normalised_scores, budget=done)
    next_uninterrupted = uninterrupted.ask(1)

    kwargs = {"seed": 0, "budget": budget, **_options(name, budget)}
    resumed = get_optimizer(name).from_history(uninterrupted.X, uninterrupted.Y, D, 2, **kwargs)
    torch.manual_seed(12345)  # other code touching global RNGs must not matter
    np.random.seed(12345)
    assert resumed.n_evaluated == done and resumed.remaining == budget - done
    assert torch.equal(resumed.ask(1), next_uninterrupted)


def test_different_seeds_give_different_points():
    a = _make("random", budget=4, seed=0).ask(4)
    b = _make("random", budget=4, seed=1).ask(4)
    assert not torch.allclose(a, b)


def test_nsga2_runs_several_generations_in_ask_tell_mode():
    opt = get_optimizer("nsga2")(D, 2, seed=1, budget=30, pop_size=6)
    sizes = []
    while opt.remaining:
        X = opt.ask(4)  # never crosses a generation boundary
        sizes.append(len(X))
        opt.tell(X, normalised_scores(X))
    assert sizes[:4] == [4, 2, 4, 2] and sum(sizes) == 30
    assert opt._algorithm.n_gen >= 5  # pymoo was told four full generations


def test_nsga2_refuses_a_history_from_another_run():
    X = torch.rand(6, D, dtype=torch.float64)
    with pytest.raises(ConfigError, match="different run"):
        get_optimizer("nsga2").from_history(X, normalised_scores(X), D, 2, seed=0, budget=12, pop_size=6)


def test_tchebycheff_hand_cases():
    ideal = torch.tensor([1.0, 1.0])
    Y = torch.tensor([[0.5, 1.0], [1.0, 0.0], [0.8, 0.6]])
    lam = torch.tensor([0.25, 0.75])
    # max(0.25·0.5, 0.75·0) = 0.125; max(0, 0.75) = 0.75; max(0.05, 0.3) = 0.3
    assert tchebycheff(Y, lam, ideal).tolist() == pytest.approx([0.125, 0.75, 0.3])


def test_tchebycheff_never_ranks_a_dominating_point_worse():
    """A merge may beat the best expert (f̂ > z* = 1), and on an objective no expert beats the base, f̂ is in
    raw units and may pass 1 by far: scoring higher there must not make the subproblem's value worse."""
    ideal = torch.ones(2, dtype=torch.float64)
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64)
    at_ideal, beyond, far_beyond = torch.tensor([[1.0, 0.4], [1.5, 0.4], [3.0, 0.4]], dtype=torch.float64)
    values = tchebycheff(torch.stack([at_ideal, beyond, far_beyond]), lam, ideal)
    assert values[1] <= values[0] and values[2] <= values[1]
    # and the worse axis still decides: max(0.5·(1 − 1.5), 0.5·(1 − 0.4)) = 0.3
    assert values[1].item() == pytest.approx(0.3)


def test_tcheby_assigns_lambdas_round_robin_after_the_design():
    opt = get_optimizer("bo-tcheby")(D, 2, seed=4, budget=12, n_init=6, n_preferences=3)
    assert torch.equal(opt.preferences, dirichlet_preferences(3, 2, seed=4))
    assert [opt.preferences.tolist().index(opt.preference_of(i).tolist()) for i in range(6, 12)] == [
        0,
        1,
        2,
    ] * 2


def test_dirichlet_preferences_are_on_the_simplex_and_seeded():
    lam = dirichlet_preferences(50, 3, seed=0)
    assert bool((lam >= 0).all()) and torch.allclose(lam.sum(1), torch.ones(50, dtype=torch.float64))
    assert torch.equal(lam, dirichlet_preferences(50, 3, seed=0))


@pytest.mark.parametrize("name", ["bo-mo", "bo-tcheby", "df-merge"])
def test_bo_initial_design_uses_given_points_then_the_model(name):
    points = torch.rand(7, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opt = get_optimizer(name)(D, 2, seed=0, budget=9, **(_options(name, 9) | {"initial_points": points}))
    X, _ = run(opt, normalised_scores, batch_size=2)
    assert torch.equal(X[:6], points[:6])  # n_init = 6 of the 7 given, in order
    assert not any(torch.allclose(X[6], p) for p in points)  # then the surrogate's own choice


def test_df_merge_scalarises_with_given_weights():
    opt = get_optimizer("df-merge")(D, 2, seed=0, budget=12, weights=[0.25, 0.75])
    assert opt.n_init == 10
    assert opt.scalarise(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).tolist() == [0.25]


@pytest.mark.parametrize(
    ("name", "options", "budget", "message"),
    [
        ("bo-mo", {}, 8, "must exceed the initial design of n_init = 8"),
        ("df-merge", {"n_init": 10}, 10, "must exceed the initial design"),
        ("bo-tcheby", {"preferences": [[0.5, 0.3, 0.2]]}, 20, "3 entries; expected one per objective"),
        ("bo-tcheby", {"preferences": [[0.5, 0.6]]}, 20, "sums to 1.1"),
        ("bo-tcheby", {"n_preferences": 5}, 10, "need at least one BO step each"),
        ("df-merge", {"weights": [0.2, 0.2]}, 20, "sums to 0.4"),
        ("nsga2", {"pop_size": 20}, 10, "smaller than one population"),
        ("hm3-fixed", {"points": [[0.5, 0.5, 0.5]]}, 2, "exceeds the 1 fixed point"),
        ("bo-mo", {"n_init": 3, "initial_points": [[0.5, 0.5, 0.5]] * 2}, 8, "at least n_init = 3 points"),
        ("bo-mo", {"n_init": 1, "initial_points": [[0.5, 1.5, 0.5]]}, 8, "must lie in the unit cube"),
        ("random", {"colour": 1}, 5, "random: invalid optimiser options:\n  optimizer.options.colour: unknown key"),
        ("random", {"method": "halton"}, 5, "optimizer.options.method: Input should be 'sobol' or 'uniform'"),
        ("nsga2", {"pop_size": 1}, 10, "optimizer.options.pop_size: Input should be greater than or equal to 2"),
        ("bo-mo", {"n_init": "six"}, 10, "optimizer.options.n_init: Input should be a valid integer"),
        ("bo-tcheby", {"ideal": "high"}, 20, "optimizer.options.ideal: Input should be a valid list"),
        ("hm3-fixed", {"points": [[0.5], [0.5, 0.5]]}, 2, "optimizer.options.points: "),
        ("random", {}, 0, "budget must be >= 1"),
    ],
)
def test_config_errors(name, options, budget, message):
    with pytest.raises(ConfigError, match=message):
        get_optimizer(name)(D, 2, seed=0, budget=budget, **options)


def test_bo_mo_refuses_a_single_objective_before_any_evaluation():
    """qLogNEHVI needs two outcomes or more: with one, the first model step would fail after the design."""
    with pytest.raises(ConfigError, match="bo-mo: .*at least 2 objectives.*df-merge"):
        get_optimizer("bo-mo")(D, 1, seed=0, budget=12, n_init=6)


def test_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown optimizer 'cma-es'; known: bo-mo"):
        get_optimizer("cma-es")


def test_protocol_errors():
    opt = _make("random", budget=3)
    X = opt.ask(2)
    with pytest.raises(RuntimeError, match="pending"):
        opt.ask()
    with pytest.raises(ValueError, match="2 points but 1 score rows"):
        opt.tell(X, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        opt.tell(X, torch.full((2, 2), float("nan")))
    for narrow in (X.float(), X.numpy().astype("float32"), X.half()):  # a narrower copy of the asked points
        with pytest.raises(TypeError, match=r"tell\(\) got points as .*float(32|16).*pass them in float64"):
            opt.tell(narrow, torch.zeros(2, 2))
    opt.tell(X.tolist(), torch.zeros(2, 2))  # Python floats are float64: taken as they are


@pytest.mark.slow
def test_bo_mo_beats_random_in_hypervolume_at_equal_budget():
    budget, seeds = 14, (0, 1, 2)
    options = {"bo-mo": {"n_init": 6}, "random": {}}
    hv: dict[str, list[float]] = {name: [] for name in options}
    for name in hv:
        for seed in seeds:
            opt = get_optimizer(name)(D, 2, seed=seed, budget=budget, **options[name])
            X, _ = run(opt, normalised_scores)
            F = raw_scores(X).numpy()
            front = F[non_dominated(F)]
            hv[name].append(protocol_hypervolume(front, BASE.numpy(), IDEAL.numpy()))
    assert np.mean(hv["bo-mo"]) > np.mean(hv["random"]), hv


def test_a_stale_fused_kernel_build_lock_is_removed_and_a_young_one_waited_for(tmp_path, monkeypatch, caplog):
    """torch's cpp_extension lock left by a process killed while botorch built its kernel made every
    later run wait forever (as a kill -9 during a demo's first bo-mo step once left it)."""
    import logging
    import os
    import time

    import torch.utils.cpp_extension as cpp

    from hm3.search.optimizers.bayes import clear_stale_kernel_lock

    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    caplog.set_level(logging.INFO, logger="hm3")
    lock = tmp_path / "logei_fused_ext" / "lock"
    assert clear_stale_kernel_lock() is None  # no lock: nothing to do
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_kernel_lock() == lock and not lock.exists()
    assert "stale build lock" in caplog.text
    lock.touch()  # young: waited for until it counts as stale
    touched = lock.stat().st_mtime
    assert clear_stale_kernel_lock(stale_after=0.5, poll=0.1) == lock
    assert time.time() - touched >= 0.5  # from the lock's own time: a pause before the call does not count
    assert "waiting for botorch's fused-kernel build lock" in caplog.text


@pytest.mark.parametrize("name", ["bo-mo", "bo-tcheby", "df-merge"])
def test_mc_samples_sets_the_acquisition_samplers_size(name, monkeypatch):
    """The ``mc_samples`` option reaches every quasi-MC sampler the method builds (default 64)."""
    import importlib

    module = importlib.import_module(f"hm3.search.optimizers.{name.replace('-', '_')}")
    real, shapes = module.SobolQMCNormalSampler, []

    def spy(sample_shape, **kwargs):
        shapes.append(tuple(sample_shape))
        return real(sample_shape, **kwargs)

    monkeypatch.setattr(module, "SobolQMCNormalSampler", spy)
    for options, expected in (({}, 64), ({"mc_samples": 16}, 16)):
        shapes.clear()
        opt = get_optimizer(name)(D, 2, seed=0, budget=8, **(_options(name, 8) | options))
        run(opt, normalised_scores, budget=7)
        assert shapes and set(shapes) == {(expected,)}
    with pytest.raises(ConfigError, match="mc_samples"):
        get_optimizer(name)(D, 2, seed=0, budget=8, **(_options(name, 8) | {"mc_samples": 0}))
