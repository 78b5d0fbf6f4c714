"""The level-2 search as a gymnasium environment: build a layer path hop by hop, get its reward at the end.

Two modes share one class (``config.mode``):

**hm3** (HM3's architecture MDP). ``action_space = Discrete(P·L + 1)`` for a pool of P models with
L layers each: action ``m·L + l`` appends hop (m, l) -- any model, any layer, repeats and reorders
allowed -- and the last action, :attr:`PathEnv.stop_action`, ends the path. STOP as the first
action ends the episode with ``rmm_back_penalty`` (−0.1) and no evaluation, as an empty RMM path does (a
path needs a hop; hm3's policies mask it, and a penalty rather than an exception keeps every action
of ``action_space`` valid, as gymnasium's contract and its env checker require). The path also ends
when it reaches T_max hops. Reward at the end: ``R = Σ_k λ_k f_k − β1·T``.

**rmm** (RMM's merging map). ``action_space = Discrete(P + 2)``: action ``i < P`` appends block k
(the current position) of model i and advances k; ``P`` skips (advances k); ``P + 1`` goes back
(k −= 1, so blocks can repeat). The episode ends at k == L, or after ``rmm_max_steps`` actions
(then the path so far is scored). Backing past k = 0, or ending with no block taken, ends the
episode with ``rmm_back_penalty`` and no evaluation. Reward otherwise ``R = Σ_k λ_k f_k`` (RMM's
mean accuracy is the uniform λ; it has no length term).

Observation (a ``gymnasium.spaces.Dict``), H = T_max (hm3) or rmm_max_steps (rmm):

* ``lam``: float32 [K], the episode's preference;
* ``models``, ``layers``: int64 [H], the hops so far in order, padded with -1 after ``length``;
* ``length``: Discrete(H + 1), the number of hops so far;
* rmm only -- ``counts``: float32 [L, P], times block l of model i was taken (RMM's state);
  ``position``: float32 [L + 1], one-hot of k (all zeros after backing past 0).

Rewards are 0 on non-final steps. At the final step the raw reward R is smoothed by RMM's Dynamic
Average Reward (one :class:`DynamicAverageReward` across all episodes of this env; its N is
:meth:`PathEnv.plan_episodes`, by default ``offline_episodes`` when λ is sampled and
``online_episodes`` when it is fixed) and the smoothed value is the step's reward; the info dict
holds ``path``, ``scores``, ``raw_reward``, ``reward``, ``evaluated`` and ``lam`` (and ``variants``,
the paths scored: more than 1 with ``transition_scales``, whose best variant is ``path``). [design] A
penalty ending (no evaluation) bypasses DAR: it carries no subset noise to average, and DAR's
period counts passes over the data, which only evaluations advance. HM3 spreads R over the steps;
that is the trainer's job (:mod:`hm3.arch.ppo`), so the env's rewards stay the plain episode reward.

λ: fixed when given (online fine-tuning), else drawn from Dirichlet(1) at every reset (offline
pretraining) by the env's ``np_random``; :meth:`state_dict` saves that generator and DAR so a
resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hm3.arch.path import LayerPath, scale_variants
from hm3.arch.rl_config import Level2Config
from hm3.errors import ConfigError
from hm3.eval.subsets import DynamicAverageReward
from hm3.extras import extra_imports

with extra_imports("rl", "level 2 (layer paths)"):
    import gymnasium as gym
    from gymnasium import spaces

PathScorer = Callable[[LayerPath], np.ndarray]
"""Scores f (one per objective, normalised: base model ≈ 0, best expert ≈ 1) of a complete path.

A scorer may also offer ``score_many(paths) -> list[np.ndarray]``, scoring several variants of one
path on the same examples (transition scales compare on one reward subset, not on successive ones)."""


@dataclass(frozen=True)
class PendingPath:
    """A finished episode's path awaiting its scores: the variants to score (the path first) and its λ."""

    path: LayerPath
    variants: tuple[LayerPath, ...]
    lam: np.ndarray


@runtime_checkable
class EpisodeScorer(Protocol):
    """A scorer of several finished episodes at once, each with its own λ (which may choose its frame).

    Each episode's variants are scored on one reward subset, the episodes' subsets drawn in the order
    given, so the scores equal those of scoring the episodes one after the other; a scorer backed by
    parallel workers scores them all in parallel."""

    def score_episodes(self, episodes: Sequence[PendingPath]) -> list[list[np.ndarray]]: ...


def score_variants(scorer: PathScorer, paths: list[LayerPath]) -> list[np.ndarray]:
    """Scores of ``paths`` by ``scorer``'s ``score_many`` when it has one, else one call per path."""
    many = getattr(scorer, "score_many", None)
    return list(many(paths)) if many is not None else [scorer(p) for p in paths]


def score_pending(scorer: PathScorer | EpisodeScorer, episodes: Sequence[PendingPath]) -> list[list[np.ndarray]]:
    """Scores of every variant of each of ``episodes``: in one call of an :class:`EpisodeScorer`, else
    episode by episode, in order."""
    if not episodes:
        return []
    if isinstance(scorer, EpisodeScorer):
        out = [list(scores) for scores in scorer.score_episodes(episodes)]
        if len(out) != len(episodes):
            raise ValueError(f"the path scorer returned scores of {len(out)} episodes for {len(episodes)}")
        return out
    return [score_variants(scorer, list(e.variants)) for e in episodes]


@dataclass
class PathState:
    """Where an episode stands: the hops so far and, in RMM mode, the block position k."""

    hops: list[tuple[int, int]] = field(default_factory=list)
    position: int = 0
    steps: int = 0
    done: bool = False
    backed_out: bool = False  # RMM: went back past block 0


class PathEnv(gym.Env):
    """Layer-path construction for one pool (module docstring has the exact semantics)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        *,
        pool_size: int,
        num_layers: int,
        n_objectives: int,
        scorer: PathScorer | EpisodeScorer,
        config: Level2Config,
        lam: np.ndarray | None = None,
        seed: int = 0,
    ):
        for name, value in (("pool_size", pool_size), ("num_layers", num_layers), ("n_objectives", n_objectives)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.pool_size, self.num_layers, self.n_objectives = pool_size, num_layers, n_objectives
        self.scorer = scorer
        self.config = config
        self.fixed_lam = None if lam is None else check_preference(lam, n_objectives)
        if config.mode == "hm3":
            self.horizon = config.resolved_t_max(num_layers)
            self.action_space = spaces.Discrete(pool_size * num_layers + 1)
        else:
            self.horizon = config.resolved_rmm_max_steps(num_layers)
            self.action_space = spaces.Discrete(pool_size + 2)
        self.observation_space = self._observation_space()
        self._np_random, _ = gym.utils.seeding.np_random(seed)
        planned = config.offline_episodes if lam is None else config.online_episodes
        self.dar = self._new_dar(planned)
        self.state = PathState(done=True)
        self.lam = self.fixed_lam if self.fixed_lam is not None else np.full(n_objectives, 1.0 / n_objectives)

    # --- action indices ---------------------------------------------------------------------------
    @property
    def stop_action(self) -> int:
        """HM3's STOP index (the last action)."""
        return self.pool_size * self.num_layers

    @property
    def skip_action(self) -> int:
        """RMM's skip index."""
        return self.pool_size

    @property
    def back_action(self) -> int:
        """RMM's back index."""
        return self.pool_size + 1

    def hop_action(self, model: int, layer: int) -> int:
        """HM3 action index of hop (model, layer)."""
        return model * self.num_layers + layer

    # --- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        if self.fixed_lam is None:
            self.lam = self.np_random.dirichlet(np.ones(self.n_objectives))
        self.state = PathState()
        return self.observe(self.state, self.lam), {"lam": self.lam.copy()}

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict]:
        if self.state.done:
            raise ValueError("the episode has ended: call reset() before step()")
        self.advance(self.state, action)
        obs = self.observe(self.state, self.lam)
        if not self.state.done:
            return obs, 0.0, False, False, {}
        info = self._finish()
        return obs, info["reward"], True, False, info

    # --- dynamics without scoring (shared with greedy rollouts) -----------------------------------
    def advance(self, state: PathState, action: int) -> None:
        """Apply ``action`` to ``state`` in place (no evaluation); sets ``state.done`` at the end."""
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or not self.action_space.contains(
            int(action)
        ):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        action = int(action)
        state.steps += 1
        if self.config.mode == "hm3":
            if action == self.stop_action:
                state.done = True  # with no hop yet, _finish ends it with the penalty
                return
            state.hops.append(divmod(action, self.num_layers))
            state.done = len(state.hops) >= self.horizon
            return
        if action < self.pool_size:
            state.hops.append((action, state.position))
            state.position += 1
        elif action == self.skip_action:
            state.position += 1
        else:
            state.position -= 1
        state.backed_out = state.position < 0
        state.done = state.backed_out or state.position == self.num_layers or state.steps >= self.horizon

    def observe(self, state: PathState, lam: np.ndarray) -> dict[str, Any]:
        """The observation of ``state`` under preference ``lam`` (module docstring)."""
        models = np.full(self.horizon, -1, dtype=np.int64)
        layers = np.full(self.horizon, -1, dtype=np.int64)
        for t, (m, layer) in enumerate(state.hops):
            models[t], layers[t] = m, layer
        obs: dict[str, Any] = {
            "lam": np.asarray(lam, dtype=np.float32),
            "models": models,
            "layers": layers,
            "length": len(state.hops),
        }
        if self.config.mode == "rmm":
            counts = np.zeros((self.num_layers, self.pool_size), dtype=np.float32)
            for m, layer in state.hops:
                counts[layer, m] += 1.0
            position = np.zeros(self.num_layers + 1, dtype=np.float32)
            if state.position >= 0:
                position[state.position] = 1.0
            obs["counts"], obs["position"] = counts, position
        return obs

    def blank_state(self) -> PathState:
        """A fresh episode state (for rollouts that must not touch the env's own episode)."""
        return PathState()

    # --- rewards ----------------------------------------------------------------------------------
    def plan_episodes(self, n: int) -> None:
        """Set DAR's planned episode count N (``a_i = α·i/N``), keeping its progress so far (no-op without DAR)."""
        if self.dar is None:
            return
        state = {**self.dar.state_dict(), "n_episodes": n}
        self.dar = self._new_dar(n, state)

    def raw_reward(self, scores: np.ndarray, length: int, lam: np.ndarray) -> float:
        """R = Σ λ_k f_k − β1·T (hm3) or Σ λ_k f_k (rmm)."""
        value = float(np.dot(lam, scores))
        return value - self.config.beta1 * length if self.config.mode == "hm3" else value

    def _finish(self) -> dict[str, Any]:
        pending = self.pending(self.state, self.lam)
        scores = None if pending is None else score_pending(self.scorer, [pending])[0]
        return self.settle(self.state, self.lam, pending, scores)

    def pending(self, state: PathState, lam: np.ndarray) -> PendingPath | None:
        """What a finished ``state`` needs scored (None: it ends with the penalty, unscored). With
        transition scales the path is scored plain and per scale value; the best is the episode's."""
        if state.backed_out or not state.hops:
            return None
        path = LayerPath(tuple(state.hops))
        return PendingPath(path, tuple(scale_variants(path, self.config.transition_scales)),
                           np.array(lam, dtype=np.float64))

    def settle(self, state: PathState, lam: np.ndarray, pending: PendingPath | None,
               scores: Sequence[np.ndarray] | None) -> dict[str, Any]:
        """The info of a finished episode given its variants' ``scores`` (from :meth:`pending`), its
        reward smoothed by DAR; finished episodes must be settled in the order they were run."""
        info: dict[str, Any] = {"path": LayerPath(tuple(state.hops)), "lam": np.array(lam, dtype=np.float64)}
        if pending is None:
            penalty = float(self.config.rmm_back_penalty)
            return {**info, "scores": None, "raw_reward": penalty, "reward": penalty, "evaluated": False}
        if scores is None or len(scores) != len(pending.variants):
            raise ValueError(f"expected scores of {len(pending.variants)} variant(s) of {pending.path.hops}")
        results = []
        for variant, raw_scores in zip(pending.variants, scores, strict=True):
            values = np.asarray(raw_scores, dtype=np.float64)
            if values.shape != (self.n_objectives,) or not np.all(np.isfinite(values)):
                raise ValueError(f"the path scorer returned {values!r} for {pending.path.hops}: expected "
                                 f"{self.n_objectives} finite scores")
            results.append((self.raw_reward(values, len(pending.path), info["lam"]), variant, values))
        raw, path, best = max(results, key=lambda r: r[0])  # ties: the first, the plain path
        reward = self.dar.update(raw) if self.dar is not None else raw
        return {**info, "path": path, "scores": best, "raw_reward": raw, "reward": reward, "evaluated": True,
                "variants": len(pending.variants)}

    def _new_dar(self, n_episodes: int, state: dict[str, Any] | None = None) -> DynamicAverageReward | None:
        if not self.config.dar:
            return None
        return DynamicAverageReward(
            alpha=self.config.dar_alpha, n_episodes=n_episodes, scale=self.config.data_scale, state=state
        )

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """λ generator and DAR state (between episodes), plain Python values."""
        return {
            "np_random": self.np_random.bit_generator.state,
            "dar": None if self.dar is None else self.dar.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken (the episode in progress is dropped)."""
        self.np_random.bit_generator.state = state["np_random"]
        if (state["dar"] is None) != (self.dar is None):
            raise ValueError("saved env state and this env disagree on whether DAR is on")
        if state["dar"] is not None:
            self.dar = self._new_dar(state["dar"]["n_episodes"], state["dar"])
        self.state = PathState(done=True)

    def _observation_space(self) -> spaces.Dict:
        h, p, n_layers = self.horizon, self.pool_size, self.num_layers
        space: dict[str, spaces.Space] = {
            "lam": spaces.Box(0.0, 1.0, (self.n_objectives,), np.float32),
            "models": spaces.Box(-1, p - 1, (h,), np.int64),
            "layers": spaces.Box(-1, n_layers - 1, (h,), np.int64),
            "length": spaces.Discrete(h + 1),
        }
        if self.config.mode == "rmm":
            space["counts"] = spaces.Box(0.0, float(h), (n_layers, p), np.float32)
            space["position"] = spaces.Box(0.0, 1.0, (n_layers + 1,), np.float32)
        return spaces.Dict(space)


def check_preference(lam: np.ndarray, n_objectives: int) -> np.ndarray:
    """A preference vector as float64 on the simplex (scaled to sum 1), refusing malformed ones (ConfigError).

    [design] Scaling to sum 1 keeps rewards of different requests on one scale and λ inside the
    observation space; HM3 draws its preferences from the simplex anyway.
    """
    arr = np.asarray(lam, dtype=np.float64)
    if arr.shape != (n_objectives,) or not np.all(np.isfinite(arr)) or np.any(arr < 0) or arr.sum() <= 0:
        raise ConfigError(f"preference λ={lam!r} must be {n_objectives} finite non-negative weights, not all 0")
    return arr / arr.sum()
