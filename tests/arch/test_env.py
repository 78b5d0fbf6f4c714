"""PathEnv: gymnasium conformance, HM3 and RMM dynamics, rewards, DAR and resume."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from pydantic import ValidationError

from hm3.arch.env import PathEnv, PathState
from hm3.arch.path import LayerPath
from hm3.arch.rl_config import Level2Config
from hm3.errors import ConfigError


class CountingScorer:
    """Scores (hops / 10, first model / 10) and remembers every path it was asked about."""

    def __init__(self) -> None:
        self.calls: list[LayerPath] = []

    def __call__(self, path: LayerPath) -> np.ndarray:
        self.calls.append(path)
        return np.array([len(path) / 10, path.hops[0][0] / 10])


def make_env(mode: str = "hm3", *, lam=(0.7, 0.3), **overrides) -> tuple[PathEnv, CountingScorer]:
    scorer = CountingScorer()
    config = Level2Config(**{"mode": mode, "dar": False, **overrides})
    lam = None if lam is None else np.array(lam)
    return PathEnv(pool_size=3, num_layers=4, n_objectives=2, scorer=scorer, config=config, lam=lam), scorer


@pytest.mark.parametrize("mode", ["hm3", "rmm"])
def test_check_env(mode: str) -> None:
    env, _ = make_env(mode, lam=None, dar=True)
    check_env(env, skip_render_check=True)


def test_config_refuses_t_max_below_one() -> None:
    with pytest.raises(ValidationError, match="t_max must be >= 1"):
        Level2Config(t_max=0)
    with pytest.raises(ValidationError):
        Level2Config(unknown_key=1)
    assert Level2Config(t_max=5).resolved_t_max(12) == 5
    assert Level2Config().resolved_t_max(12) == 12
    assert Level2Config().resolved_rmm_max_steps(12) == 36


def test_hm3_hops_stop_and_reward() -> None:
    env, scorer = make_env(beta1=0.05)
    assert env.action_space.n == 3 * 4 + 1
    obs, _ = env.reset()
    assert obs["length"] == 0 and (obs["models"] == -1).all() and (obs["layers"] == -1).all()
    # STOP before any hop: the episode ends with the penalty and nothing is scored (no exception:
    # gymnasium's checker and random agents may take any action of the action space)
    _, reward, done, _, info = env.step(env.stop_action)
    assert done and not info["evaluated"] and reward == info["raw_reward"] == env.config.rmm_back_penalty
    assert scorer.calls == []
    env.reset()
    obs, reward, done, _, info = env.step(env.hop_action(2, 3))
    assert (reward, done, info) == (0.0, False, {})
    obs, *_ = env.step(env.hop_action(0, 3))  # repeats and reorders are allowed
    assert obs["length"] == 2 and list(obs["models"][:3]) == [2, 0, -1] and list(obs["layers"][:3]) == [3, 3, -1]
    obs, reward, done, truncated, info = env.step(env.stop_action)
    assert done and not truncated
    assert info["path"] == LayerPath(((2, 3), (0, 3)))
    expected = 0.7 * 0.2 + 0.3 * 0.2 - 0.05 * 2  # λ·f − β1·T
    assert info["raw_reward"] == pytest.approx(expected) and reward == pytest.approx(expected)
    assert scorer.calls == [info["path"]]
    with pytest.raises(ValueError, match="reset"):
        env.step(0)


def test_hm3_ends_at_t_max_and_refuses_bad_actions() -> None:
    env, scorer = make_env(t_max=2)
    env.reset()
    with pytest.raises(ValueError, match="not in"):
        env.step(env.action_space.n)
    env.step(env.hop_action(1, 1))
    _, _, done, _, info = env.step(env.hop_action(1, 2))
    assert done and info["path"].hops == ((1, 1), (1, 2)) and len(scorer.calls) == 1


def test_rmm_take_skip_back_and_counts() -> None:
    env, scorer = make_env("rmm", lam=(0.5, 0.5))
    assert env.action_space.n == 3 + 2
    obs, _ = env.reset()
    assert list(obs["position"]) == [1, 0, 0, 0, 0]
    env.step(2)  # block 0 of model 2, k -> 1
    env.step(env.skip_action)  # k -> 2
    env.step(env.back_action)  # k -> 1
    obs, *_ = env.step(0)  # block 1 of model 0, k -> 2
    assert obs["counts"][0, 2] == 1 and obs["counts"][1, 0] == 1 and obs["counts"].sum() == 2
    assert list(obs["position"]) == [0, 0, 1, 0, 0]
    env.step(env.back_action)  # k -> 1
    obs, *_ = env.step(0)  # block 1 of model 0 again
    assert obs["counts"][1, 0] == 2 and obs["length"] == 3
    env.step(1)  # block 2 of model 1, k -> 3
    _, reward, done, _, info = env.step(env.skip_action)  # k -> 4 = L: the end
    assert done and info["path"].hops == ((2, 0), (0, 1), (0, 1), (1, 2))
    assert reward == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)  # Σ λ f, no length term in RMM
    assert len(scorer.calls) == 1


def test_rmm_back_past_zero_is_penalised_without_evaluation() -> None:
    env, scorer = make_env("rmm")
    env.reset()
    obs, reward, done, _, info = env.step(env.back_action)
    assert done and reward == env.config.rmm_back_penalty == -0.1 and not info["evaluated"] and info["scores"] is None
    assert not obs["position"].any() and scorer.calls == []


def test_rmm_step_cap_scores_what_is_there_and_empty_paths_are_penalised() -> None:
    env, scorer = make_env("rmm", rmm_max_steps=3)
    env.reset()
    env.step(1)
    env.step(env.back_action)
    _, _, done, _, info = env.step(2)
    assert done and info["evaluated"] and info["path"].hops == ((1, 0), (2, 0))
    env.reset()
    for action in (env.skip_action, env.skip_action, env.skip_action):  # the cap ends it, no block taken
        _, reward, done, _, info = env.step(action)
    assert done and reward == env.config.rmm_back_penalty == -0.1 and not info["evaluated"] and len(scorer.calls) == 1


def test_dar_matches_its_formula() -> None:
    """r̃_i = a_i r̃_{i−1} + (1 − a_i) r_i, a_i = α·i/N, restarted every round(1/s) episodes."""
    rewards = [0.3, 0.9, 0.1, 0.5, 0.8, 0.2, 0.6, 0.4, 0.7, 0.0]
    scores = iter(rewards)
    config = Level2Config(dar=True, data_scale=0.25, dar_alpha=0.8, beta1=0.0)
    env = PathEnv(
        pool_size=2, num_layers=2, n_objectives=1, scorer=lambda p: np.array([next(scores)]), config=config,
        lam=np.array([1.0]),
    )
    env.plan_episodes(len(rewards))
    got_raw, got = [], []
    for _ in rewards:
        env.reset()
        env.step(0)
        *_, info = env.step(env.stop_action)
        got_raw.append(info["raw_reward"])
        got.append(info["reward"])
    expected, smoothed = [], None
    for i, r in enumerate(rewards, start=1):
        if (i - 1) % 4 == 0:
            smoothed = r
        else:
            a = 0.8 * i / len(rewards)
            smoothed = a * smoothed + (1 - a) * r
        expected.append(smoothed)
    assert got_raw == pytest.approx(rewards)
    assert got == pytest.approx(expected)
    assert got[1] != pytest.approx(rewards[1])  # smoothing did happen


def test_lambda_sampling_fixed_lambda_and_resume() -> None:
    env, _ = make_env(lam=None, dar=True)
    lams = [env.reset()[0]["lam"] for _ in range(3)]
    assert all(np.isclose(lam.sum(), 1.0, atol=1e-6) and (lam >= 0).all() for lam in lams)
    assert not np.allclose(lams[0], lams[1])
    env.reset()
    env.step(0)
    env.step(env.stop_action)
    saved = env.state_dict()
    after = [env.reset()[0]["lam"] for _ in range(2)]
    other, _ = make_env(lam=None, dar=True)
    other.load_state_dict(saved)
    assert other.dar.state_dict() == saved["dar"] and saved["dar"]["episode"] == 1
    assert np.array_equal([other.reset()[0]["lam"] for _ in range(2)], after)

    fixed, _ = make_env(lam=(2.0, 2.0))
    assert np.array_equal(fixed.reset()[0]["lam"], [0.5, 0.5])  # scaled onto the simplex
    with pytest.raises(ConfigError, match="preference"):
        make_env(lam=(1.0, -1.0))


def _most_hops(env: PathEnv, state: PathState, memo: dict) -> int:
    """The most hops any action sequence from ``state`` ends with (exhaustive search over the env's moves)."""
    if state.done:
        return len(state.hops)
    key = (state.position, state.steps, len(state.hops))
    if key not in memo:
        best = 0
        for action in (0, env.skip_action, env.back_action):
            nxt = PathState(hops=list(state.hops), position=state.position, steps=state.steps)
            env.advance(nxt, action)
            best = max(best, _most_hops(env, nxt, memo))
        memo[key] = best
    return memo[key]


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_rmm_longest_path_bound_is_what_take_skip_back_can_reach(num_layers: int) -> None:
    """Backing and taking again repeats blocks, so an RMM path can be longer than the models' depth: a
    fixed-depth engine needs the exact bound to refuse what it cannot run."""
    for steps in range(1, 3 * num_layers + 3):
        config = Level2Config(mode="rmm", dar=False, rmm_max_steps=steps)
        env = PathEnv(pool_size=1, num_layers=num_layers, n_objectives=1, scorer=CountingScorer(), config=config)
        assert config.max_path_hops(num_layers) == _most_hops(env, PathState(), {}), steps
    assert Level2Config(t_max=3).max_path_hops(num_layers) == 3
    assert Level2Config().max_path_hops(num_layers) == num_layers


def test_planning_episodes_without_dar_changes_nothing() -> None:
    env, _ = make_env()  # dar off
    env.plan_episodes(5)
    assert env.dar is None
