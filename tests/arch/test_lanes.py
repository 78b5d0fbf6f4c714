"""Level 2's episodes scored together (one per evaluation worker): one session call per group of
episodes, in episode order, and the same episodes, scores and policy whatever the number of lanes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from hm3.arch.level2 import PathEvaluator, build_trainer
from hm3.arch.path import LayerPath
from hm3.arch.rl_config import Level2Config
from hm3.eval.session import PathCandidate, PoolLayout, Scored
from hm3.search.scoring import SplitPlan

torch.set_num_threads(1)

EXPERTS = ("e0", "e1")  # the pool: two experts and the frame, 3 layers each
LAYERS = 3
VALIDATION = SplitPlan("validation", {"a": list(range(20)), "b": list(range(20))})


class FakeSession:
    """An evaluation session that records every ``score_many`` call; a path's score depends on its hops
    and on the examples it is scored on (so a reward subset drawn out of order changes the scores)."""

    def __init__(self) -> None:
        self.validation = VALIDATION
        self.calls: list[list[tuple[tuple, SplitPlan]]] = []

    def pool_layout(self) -> PoolLayout:
        return PoolLayout(EXPERTS, LAYERS, None, "fake")

    def score_many(self, candidates: Sequence[PathCandidate], plan: SplitPlan | Sequence[SplitPlan]) -> list[Scored]:
        plans = list(plan) if not isinstance(plan, SplitPlan) else [plan] * len(candidates)
        self.calls.append([(c.path.hops, p) for c, p in zip(candidates, plans, strict=True)])
        return [Scored(None, self._scores(c.path, p)) for c, p in zip(candidates, plans, strict=True)]

    @staticmethod
    def _scores(path: LayerPath, plan: SplitPlan) -> np.ndarray:
        hops = sum((m + 1) * (layer + 2) for m, layer in path.hops)
        return np.array([(hops * 7 + sum(plan.indices[k])) % 11 / 10 for k in ("a", "b")])


def _train(config: Level2Config, lanes: int, episodes: int, lam: np.ndarray | None = None):
    session = FakeSession()
    evaluator = PathEvaluator(session, base=np.zeros(2), ideal=np.ones(2), dar=config.dar,
                              data_scale=config.data_scale, seed=3)
    trainer = build_trainer(pool_size=len(EXPERTS) + 1, num_layers=LAYERS, n_objectives=2,
                            layer_features=torch.randn(3, LAYERS, 4, generator=torch.Generator().manual_seed(1)),
                            config=config, scorer=evaluator.scorer_for(lambda _lam: "base"), lam=lam, seed=7,
                            lanes=lanes)
    records = trainer.train(episodes)
    return session, trainer, records


SMALL = {"epochs": 1, "gru_hidden": 8, "embed_dim": 4, "mlp_hidden": 8, "data_scale": 0.25}


def test_a_group_of_episodes_reaches_the_session_in_one_call_in_episode_order() -> None:
    """3 lanes, 6 episodes per update: every call holds 3 episodes' paths, in the order of the episodes,
    each on its own reward subset (drawn one after the other, as one lane draws them)."""
    config = Level2Config(episodes_per_update=6, **SMALL)
    session, _, records = _train(config, lanes=3, episodes=12)
    assert [len(c) for c in session.calls] == [3, 3, 3, 3]
    sent = [hops for call in session.calls for hops, _ in call]
    assert sent == [r["path"].hops for r in records]
    plans = [p for call in session.calls for _, p in call]
    assert len({tuple(p.indices["a"]) for p in plans}) > 1  # DAR: a subset per episode, not one per call

    one, _, _ = _train(config, lanes=1, episodes=12)
    assert [len(c) for c in one.calls] == [1] * 12
    assert [pair for call in one.calls for pair in call] == [pair for call in session.calls for pair in call]


@pytest.mark.parametrize("mode", ["hm3", "rmm"])
def test_lanes_change_neither_episodes_nor_scores_nor_policy(mode: str) -> None:
    """1, 2 and 4 lanes (4 does not divide the 6 episodes per update: its groups stop at each update) give
    the same episodes, rewards (DAR's running average included) and final policy; with transition scales,
    so an episode sends several variants."""
    extra = {"transition_scales": (0.5,)} if mode == "hm3" else {}
    config = (Level2Config(episodes_per_update=6, **SMALL, **extra) if mode == "hm3"
              else Level2Config.rmm_defaults(episodes_per_update=6, **SMALL))
    runs = {lanes: _train(config, lanes, episodes=14) for lanes in (1, 2, 4)}
    _, ref_trainer, ref = runs[1]
    assert runs[4][0].calls and max(len(c) for c in runs[4][0].calls) > 1
    for lanes in (2, 4):
        _, trainer, got = runs[lanes]
        assert [r["path"] for r in got] == [r["path"] for r in ref]
        assert [r["reward"] for r in got] == [r["reward"] for r in ref]
        assert all(np.array_equal(a["lam"], b["lam"]) for a, b in zip(got, ref, strict=True))
        for (name, a), b in zip(ref_trainer.policy.state_dict().items(), trainer.policy.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), (lanes, name)


def test_online_best_path_is_the_best_raw_reward_of_the_group() -> None:
    """With λ fixed, the best path kept across a group is the one with the highest raw reward (ties: the
    first episode), as when the episodes come one at a time."""
    config = Level2Config(episodes_per_update=4, **SMALL)
    lam = np.array([0.3, 0.7])
    _, trainer, records = _train(config, lanes=4, episodes=8, lam=lam)
    best = max(records, key=lambda r: r["raw_reward"])  # max keeps the first of equal ones
    assert trainer.best[0] == best["raw_reward"] and trainer.best[1] == best["path"]
