"""PPOTrainer: GAE and reward spreading, learning toy paths in both modes, λ-conditioning, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hm3.arch.env import PathEnv
from hm3.arch.path import LayerPath
from hm3.arch.policy import PathPolicy
from hm3.arch.ppo import PPOTrainer, gae, spread_rewards
from hm3.arch.rl_config import Level2Config

torch.set_num_threads(1)

A = ((2, 0), (0, 1), (1, 2))  # block-ordered, so reachable in RMM mode too
B = ((1, 0), (2, 1), (0, 2))


def match(path: LayerPath, target: tuple[tuple[int, int], ...]) -> float:
    """1 for the target path exactly; partial credit per matching hop, minus any surplus hops."""
    hits = sum(1 for t, hop in enumerate(path.hops) if t < len(target) and hop == target[t])
    return (hits - max(0, len(path) - len(target))) / len(target)


class Scorer:
    def __init__(self, *targets: tuple[tuple[int, int], ...]) -> None:
        self.targets, self.calls = targets, 0

    def __call__(self, path: LayerPath) -> np.ndarray:
        self.calls += 1
        return np.array([match(path, t) for t in self.targets])


def make(config: Level2Config, scorer: Scorer, lam: np.ndarray | None, seed: int = 0) -> PPOTrainer:
    torch.manual_seed(seed)
    k = len(scorer.targets)
    env = PathEnv(pool_size=3, num_layers=3, n_objectives=k, scorer=scorer, config=config, lam=lam, seed=seed)
    features = torch.Generator().manual_seed(1)
    policy = PathPolicy(
        pool_size=3, num_layers=3, n_objectives=k, layer_features=torch.randn(3, 3, 4, generator=features),
        config=config,
    )
    return PPOTrainer(env, policy, config, seed=seed)


def test_gae_and_reward_spreading_by_hand() -> None:
    assert spread_rewards(0.9, 3, "hm3") == pytest.approx([0.3, 0.3, 0.3])
    assert spread_rewards(0.9, 3, "rmm") == pytest.approx([0.0, 0.0, 0.9])
    rewards, values, g, lam = np.array([0.3, 0.3, 0.3]), np.array([0.5, 0.2, 0.1]), 0.9, 0.8
    d2 = 0.3 - 0.1
    d1 = 0.3 + g * 0.1 - 0.2
    d0 = 0.3 + g * 0.2 - 0.5
    expected = [d0 + g * lam * (d1 + g * lam * d2), d1 + g * lam * d2, d2]
    assert gae(rewards, values, g, lam) == pytest.approx(expected)
    # λ_GAE = 1 gives Monte-Carlo returns minus the baseline (RMM's estimator).
    assert gae(rewards, values, g, 1.0)[0] == pytest.approx(0.3 + g * 0.3 + g * g * 0.3 - 0.5)


@pytest.mark.slow
def test_hm3_ppo_finds_the_optimal_path() -> None:
    config = Level2Config(dar=False)
    trainer = make(config, Scorer(A), np.array([1.0]))
    updates = []
    records = trainer.train(1600, on_update=updates.append)
    assert trainer.greedy_path(np.array([1.0])).hops == A
    assert len(updates) == 1600 // config.episodes_per_update and updates[-1]["episode"] == 1600
    # Learning, not luck: the last episodes score far above the first ones.
    assert np.mean([r["raw_reward"] for r in records[-200:]]) > np.mean([r["raw_reward"] for r in records[:200]]) + 0.3
    best_raw, best_path, best_scores = trainer.best
    assert best_path.hops == A and best_raw == pytest.approx(1.0 - 0.01 * 3)
    assert best_raw == max(r["raw_reward"] for r in records) and best_scores == pytest.approx([1.0])


@pytest.mark.slow
def test_rmm_ppo_finds_the_optimal_path() -> None:
    config = Level2Config.rmm_defaults(dar=False)
    trainer = make(config, Scorer(A), np.array([1.0]))
    trainer.train(1200)
    assert trainer.greedy_path(np.array([1.0])).hops == A


@pytest.mark.slow
def test_lambda_conditioning_changes_the_path() -> None:
    """Objective 0 rewards path A, objective 1 path B; one offline-pretrained policy serves both."""
    config = Level2Config(dar=False)
    scorer = Scorer(A, B)
    trainer = make(config, scorer, None)
    trainer.train(1200)
    calls = scorer.calls
    assert trainer.greedy_path(np.array([1.0, 0.0])).hops == A
    assert trainer.greedy_path(np.array([0.0, 1.0])).hops == B
    assert scorer.calls == calls  # greedy rollouts never score


def test_resume_repeats_an_uninterrupted_run(tmp_path) -> None:
    """train(2n) == train(n), save, load into fresh objects, train(n); neither n nor 2n a multiple of the
    update size, so the first piece stops mid-batch and both runs end on a smaller last batch."""
    for config in (Level2Config(dar=True, episodes_per_update=4, epochs=2), Level2Config.rmm_defaults(epochs=2)):
        n = 5
        straight = make(config, Scorer(A, B), None)
        straight.env.plan_episodes(2 * n)
        expected = straight.train(2 * n)

        first = make(config, Scorer(A, B), None)
        first.env.plan_episodes(2 * n)
        got = first.train(n, ends_training=False)
        assert len(first.buffer) == 1  # episode 5 waits for its batch
        first.save(tmp_path / f"{config.mode}.pt")
        resumed = make(config, Scorer(A, B), None, seed=0)
        torch.manual_seed(123)  # a different global RNG state must not matter
        resumed.load(tmp_path / f"{config.mode}.pt")
        got += resumed.train(n)

        assert [r["path"] for r in got] == [r["path"] for r in expected]
        assert [r["reward"] for r in got] == [r["reward"] for r in expected]
        assert all(np.array_equal(a["lam"], b["lam"]) for a, b in zip(got, expected, strict=True))
        for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        assert resumed.updates == straight.updates == 3 and not resumed.buffer


def test_the_episodes_that_end_the_training_are_learned_from_in_a_smaller_last_batch() -> None:
    """10 episodes at 4 per update: updates after episodes 4, 8 and 10. The last update learns from
    episodes 9 and 10 alone: a trainer that collected those two from the same state and updated on them
    reaches the same policy; one that trained 8 and stopped does not."""
    config = Level2Config(dar=False, episodes_per_update=4, epochs=2)
    trainer = make(config, Scorer(A), np.array([1.0]))
    updates: list[dict] = []
    trainer.train(10, on_update=updates.append)
    assert [u["episode"] for u in updates] == [4, 8, 10] and not trainer.buffer

    stopped = make(config, Scorer(A), np.array([1.0]))
    stopped.train(8)
    assert stopped.updates == 2
    two_more = make(config, Scorer(A), np.array([1.0]))
    two_more.load_state_dict(stopped.state_dict())
    two_more.config = config.model_copy(update={"episodes_per_update": 2})  # a batch of exactly those two
    two_more.train(2)
    params = list(trainer.policy.state_dict().items())
    assert all(torch.equal(v, two_more.policy.state_dict()[k]) for k, v in params)
    assert not all(torch.equal(v, stopped.policy.state_dict()[k]) for k, v in params)


def test_frame_order_prior_gives_working_paths_where_a_random_start_gives_none() -> None:
    """A 12-layer toy in which, as in a real deep model, a path computes only near a layer order:
    each edit of the order (a skipped, repeated or reordered layer, or a missing one) costs a third
    of the scores. HM3 as published starts from random paths, which score 0; the frame-order prior
    starts from the frame's own order and explores by editing it, so its paths score from the start."""
    layers = 12

    def near_order(path: LayerPath) -> np.ndarray:
        hops = path.hops
        edits = sum(layer != (hops[t - 1][1] + 1 if t else 0) for t, (_, layer) in enumerate(hops))
        works = max(0.0, 1.0 - (edits + abs(len(hops) - layers)) / 3)
        return works * np.array([0.5 + 0.5 * sum(m == k for m, _ in hops) / len(hops) for k in range(2)])

    mean_reward = {}
    for prior in ("none", "frame-order"):
        config = Level2Config(dar=False, path_prior=prior, epsilon=0.03)
        torch.manual_seed(0)
        env = PathEnv(pool_size=3, num_layers=layers, n_objectives=2, scorer=near_order, config=config,
                      lam=np.array([1.0, 0.0]))
        features = torch.randn(3, layers, 4, generator=torch.Generator().manual_seed(1))
        policy = PathPolicy(pool_size=3, num_layers=layers, n_objectives=2, layer_features=features, config=config)
        records = PPOTrainer(env, policy, config).train(48)
        mean_reward[prior] = np.mean([r["raw_reward"] for r in records])
        working = sum(r["scores"] is not None and r["scores"][0] > 0 for r in records)
        if prior == "none":
            assert working == 0
        else:  # most: an ε-pick or a poorly fitted critic still breaks some (32 of 48 here)
            assert working >= 24
    assert mean_reward["frame-order"] > mean_reward["none"] + 0.2  # 0.14 against -0.12 (β1·T) here
