"""Level 2 over an evaluation session: path scoring with DAR rewards, policy building, the frame for λ.

The RL pieces (:mod:`hm3.arch.env`, :mod:`hm3.arch.policy`, :mod:`hm3.arch.ppo`) see paths and
reward vectors only; this module connects them to an evaluation session (:mod:`hm3.eval.session`),
which puts a path over the experts and a *frame* into its model and scores it through the run
store, so every score is committed and found there again when the same path recurs on the same
examples:

* :class:`PathEvaluator` -- scores of paths on the whole validation plan, and rewards on Dynamic
  Average Reward subsets of it (RMM), normalised by the HV protocol.
* :func:`merge_for_preference` -- HM3's per-λ choice of the level-1 merge: the evaluated level-1
  candidate solving the Tchebycheff subproblem ``min max_k λ_k (1 − f̂_k)`` (f̂ normalised so the
  ideal point is 1).
* :func:`build_trainer` -- env, λ-conditioned policy and PPO trainer, alike for the run's stages
  and for requests.

Scores are normalised by the HV protocol (base = 0, best expert = 1) before they enter a reward,
so β1 and λ mean the same on every model family ([design]). The pool (experts + frame) and the
policy's layer features φ(θ) are the session's (:mod:`hm3.arch.pools`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hm3.arch.env import EpisodeScorer, PathEnv, PathScorer, PendingPath
from hm3.arch.path import LayerPath
from hm3.arch.policy import PathPolicy
from hm3.arch.ppo import PPOTrainer
from hm3.arch.rl_config import Level2Config
from hm3.errors import ConfigError
from hm3.eval.session import PATH_KIND, EvaluationSession, FrameKey, PathCandidate
from hm3.eval.subsets import CyclingSubsets, subset_size
from hm3.search.pareto import normalise
from hm3.search.scoring import SplitPlan
from hm3.store import CandidateRef

__all__ = ["PATH_KIND", "FrameKey", "PathEvaluator", "build_trainer", "episode_lanes", "merge_for_preference",
           "path_from_recipe", "path_recipe", "small_reward_subsets"]
# Below this many examples per objective a DAR reward's noise (a 0/1 score's standard error is up to
# 0.5/sqrt(n)) exceeds the differences between paths measured on the zoo (docs/BENCHMARKS.md).
DAR_MIN_REWARD_EXAMPLES = 16


def small_reward_subsets(plan: SplitPlan, data_scale: float,
                         minimum: int = DAR_MIN_REWARD_EXAMPLES) -> dict[str, int]:
    """Objectives whose DAR reward subsets would hold fewer than ``minimum`` examples: name -> size.

    RMM's data scales (0.1, 0.01) assume datasets of thousands of examples; on a validation plan of
    a hundred they leave a handful of examples per reward, too few to tell paths apart.
    """
    sizes = {name: subset_size(len(idx), data_scale) for name, idx in plan.indices.items()}
    return {name: n for name, n in sizes.items() if n < minimum}


def merge_for_preference(lam: np.ndarray, candidates: Mapping[int, np.ndarray]) -> int:
    """The candidate id minimising ``max_k λ_k (1 − f̂_k)`` (normalised scores; ties: lowest id)."""
    if not candidates:
        raise ConfigError("no level-1 candidates to choose a merge from: run level 1 first")
    lam = np.asarray(lam, dtype=float)
    best = min(sorted(candidates), key=lambda cid: float(np.max(lam * (1.0 - candidates[cid]))))
    return int(best)


def build_trainer(
    *,
    pool_size: int,
    num_layers: int,
    n_objectives: int,
    layer_features: torch.Tensor,
    config: Level2Config,
    scorer: PathScorer | EpisodeScorer,
    lam: np.ndarray | None,
    seed: int,
    policy_state: Mapping[str, Any] | None = None,
    lanes: int = 1,
) -> PPOTrainer:
    """Env, λ-conditioned policy and PPO trainer over one pool, built alike by the run's stages and by
    requests. The policy's initial weights follow ``seed``, not the global RNG (a resumed run must
    equal an uninterrupted one); ``policy_state`` -- a pretrained policy -- replaces them. ``lanes``:
    episodes scored together (:func:`episode_lanes`)."""
    env = PathEnv(pool_size=pool_size, num_layers=num_layers, n_objectives=n_objectives, scorer=scorer,
                  config=config, lam=lam, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = PathPolicy(pool_size=pool_size, num_layers=num_layers, n_objectives=n_objectives,
                            layer_features=layer_features, config=config)
    if policy_state is not None:
        policy.load_state_dict(policy_state)
    return PPOTrainer(env, policy, config, seed=seed, lanes=lanes)


def episode_lanes(session: EvaluationSession) -> int:
    """Episodes level 2 scores together: one per worker of an executor session (they score in parallel),
    1 for a local one (its single model scores one path at a time anyway)."""
    from hm3.eval.parallel import ExecutorSession

    return session.executor.workers if isinstance(session, ExecutorSession) else 1


def path_recipe(path: LayerPath, frame: FrameKey, expert_refs: Sequence[str]) -> dict[str, Any]:
    """What the run store keys a path candidate by: hops, scales, pool experts and frame."""
    return PathCandidate(path, frame, tuple(expert_refs)).stored_recipe()


def path_from_recipe(recipe: Mapping[str, Any]) -> tuple[LayerPath, FrameKey]:
    candidate = PathCandidate.from_recipe(recipe)
    return candidate.path, candidate.frame


class _FrameScorer:
    """An :class:`~hm3.arch.env.EpisodeScorer` over a :class:`PathEvaluator`: each episode's frame is the
    one for its λ (sampled per episode offline), its reward subset the evaluator's next."""

    def __init__(self, evaluator: PathEvaluator, frame_for: Callable[[np.ndarray], FrameKey]):
        self.evaluator, self.frame_for = evaluator, frame_for

    def score_episodes(self, episodes: Sequence[PendingPath]) -> list[list[np.ndarray]]:
        return self.evaluator.reward_scores_batch([(e.variants, self.frame_for(e.lam)) for e in episodes])


class PathEvaluator:
    """Scores of paths through an evaluation session; rewards on DAR subsets of the validation plan."""

    def __init__(
        self,
        session: EvaluationSession,
        *,
        base: np.ndarray,
        ideal: np.ndarray,
        dar: bool,
        data_scale: float,
        seed: int,
        t_max: int | None = None,
        state: Mapping[str, Any] | None = None,
    ):
        layout = session.pool_layout()
        if layout.max_hops is not None and t_max is not None and t_max > layout.max_hops:
            raise ConfigError(
                f"with the {layout.backend} backend level 2 runs paths in an engine of the models' depth "
                f"({layout.max_hops} layers), so t_max must be <= {layout.max_hops}, got {t_max} (rmm: the longest "
                "path its step cap allows, Level2Config.max_path_hops); use the hf backend for longer paths"
            )
        self.session = session
        self.layout = layout
        self.base = np.asarray(base, dtype=float)
        self.ideal = np.asarray(ideal, dtype=float)
        self.dar = dar
        self.t_max = t_max
        self.validation: SplitPlan = session.validation
        self.subsets: dict[str, CyclingSubsets] | None = None
        if dar:
            self.subsets = {
                name: CyclingSubsets(
                    len(idx), data_scale, seed=seed + i,
                    state=None if state is None else state["subsets"][name],
                )
                for i, (name, idx) in enumerate(self.validation.indices.items())
            }
        self.evaluations = 0  # reward evaluations asked for (cache hits included)

    # --- scoring ----------------------------------------------------------------------------------

    def path_candidate(self, path: LayerPath, frame: FrameKey) -> PathCandidate:
        """The path over this run's pool, checked against ``t_max`` before anything is stored."""
        path.validate(self.layout.size, self.layout.num_layers, self.t_max)
        return PathCandidate(path, frame, self.layout.experts)

    def candidate(self, path: LayerPath, frame: FrameKey) -> CandidateRef:
        return self.session.store.add_candidate(self.path_candidate(path, frame).stored_recipe(), PATH_KIND)

    def raw_scores(self, path: LayerPath, frame: FrameKey, plan: SplitPlan) -> np.ndarray:
        """Scores on ``plan`` (from the store when already there)."""
        return self.session.score(self.path_candidate(path, frame), plan).scores

    def normalised(self, raw: np.ndarray) -> np.ndarray:
        return normalise(np.asarray(raw, dtype=float)[None], self.base, self.ideal)[0]

    def next_plan(self) -> SplitPlan:
        """The next DAR subsets (or the whole validation plan without DAR)."""
        if self.subsets is None:
            return self.validation
        indices = {
            name: [self.validation.indices[name][j] for j in self.subsets[name].next_subset()]
            for name in self.validation.indices
        }
        return SplitPlan(split=self.validation.split, indices=indices)

    def reward_scores_batch(self, episodes: Sequence[tuple[Sequence[LayerPath], FrameKey]]) -> list[list[np.ndarray]]:
        """Normalised scores of each episode's paths (variants of one path, on the *same* next reward subsets;
        the episodes' subsets drawn in the order given), all scored in one session call: in parallel on an
        executor's workers, each (path, subsets) once."""
        candidates, plans = [], []
        for paths, frame in episodes:
            plan = self.next_plan()
            for path in paths:
                candidates.append(self.path_candidate(path, frame))
                plans.append(plan)
        self.evaluations += len(candidates)
        scored = iter(self.session.score_many(candidates, plans))
        return [[self.normalised(next(scored).scores) for _ in paths] for paths, _ in episodes]

    def scorer_for(self, frame_for: Callable[[np.ndarray], FrameKey]) -> EpisodeScorer:
        """An episode scorer whose frame is ``frame_for`` the episode's λ."""
        return _FrameScorer(self, frame_for)

    # --- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        subsets = {} if self.subsets is None else {n: s.state_dict() for n, s in self.subsets.items()}
        return {"subsets": subsets, "evaluations": self.evaluations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.subsets is not None:
            for name, it in self.subsets.items():
                self.subsets[name] = CyclingSubsets(
                    it.n_examples, None, size=it.size, seed=it.seed, state=state["subsets"][name]
                )
        self.evaluations = int(state.get("evaluations", 0))
