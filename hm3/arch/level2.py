"""Level 2 with real models: layer pools per preference, path scoring, policy pretraining and fine-tuning.

The RL pieces (:mod:`hm3.arch.env`, :mod:`hm3.arch.policy`, :mod:`hm3.arch.ppo`) see paths and
reward vectors only; this module connects them to models, evaluators and the run store:

* :class:`PoolSet` -- the K experts (rebuilt once from the level-1 merger's base + task vectors)
  plus a *frame*: the level-1 merge chosen for the preference at hand (a stored candidate id), or
  the base model (``"base"``) when level 2 runs alone. The frame is pool index K and supplies
  embeddings, final norm and LM head (:mod:`hm3.arch.path`).
* :class:`PathEvaluator` -- scores a path by pointing the hf backend at an in-memory path model
  (shared tensors, no copy), or by swapping the path's weights, padded to the models' depth with
  identity layers, into a vLLM engine (:func:`hm3.arch.path.path_state`), through :class:`~hm3.search.scoring.CandidateScorer`, so every score
  is committed to the run store and found there again when the same path recurs on the same
  examples. Rewards use Dynamic Average Reward subsets (RMM) of the validation plan.
* :func:`merge_for_preference` -- HM3's per-λ choice of the level-1 merge: the evaluated level-1
  candidate solving the Tchebycheff subproblem ``min max_k λ_k (1 − f̂_k)`` (f̂ normalised so the
  ideal point is 1).

Design choices ([design] in the docs):

* Scores are normalised by the HV protocol (base = 0, best expert = 1) before they enter a reward,
  so β1 and λ mean the same on every model family.
* φ(θ), the layer summary the policy sees, is per pool layer and per tensor: log RMS of the weight
  and log RMS of its difference from the base model's same layer, z-scored over the pool. During
  offline pretraining the frame changes with λ; its features are the mean over the candidate
  frames, so the policy's inputs stay fixed while λ (an input too) tells it which frame it has.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hm3.arch.env import PathEnv, PathScorer
from hm3.arch.path import LayerPath, LayerPool, build_path_model, path_state
from hm3.arch.policy import PathPolicy
from hm3.arch.ppo import PPOTrainer
from hm3.arch.rl_config import Level2Config
from hm3.errors import ConfigError
from hm3.eval.subsets import CyclingSubsets, subset_size
from hm3.search.pareto import normalise
from hm3.search.scoring import SplitPlan
from hm3.store import CandidateRef

PATH_KIND = "path"
FrameKey = int | str  # a level-1 candidate id, or "base"
# Below this many examples per objective a DAR reward's noise (a 0/1 score's standard error is up to
# 0.5/sqrt(n)) exceeds the differences between paths measured on the zoo (docs/BENCHMARKS.md).
DAR_MIN_REWARD_EXAMPLES = 16


def layer_features(
    states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor], num_layers: int
) -> torch.Tensor:
    """φ(θ) for every pool layer: ``[pool, layers, 2 × tensors-per-layer]``, z-scored over the pool."""
    from hm3.checkpoint.layers import layer_tensor_names

    names = list(reference)
    rows = []
    for state in states:
        per_layer = []
        for layer in range(num_layers):
            feats = []
            for name in sorted(layer_tensor_names(names, layer)):
                w, ref = state[name].float(), reference[name].float()
                feats.append(torch.log(w.pow(2).mean().sqrt() + 1e-8))
                feats.append(torch.log((w - ref).pow(2).mean().sqrt() + 1e-8))
            per_layer.append(torch.stack(feats))
        rows.append(torch.stack(per_layer))
    phi = torch.stack(rows)
    mean = phi.mean(dim=(0, 1), keepdim=True)
    std = phi.std(dim=(0, 1), keepdim=True).clamp_min(1e-6)
    return (phi - mean) / std


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


class PoolSet:
    """Experts' states (built once) and frames (merges or the base), assembled into layer pools."""

    def __init__(self, ctx: Any, *, cache_size: int = 2):
        self.ctx = ctx
        space = ctx.cfg.search_space
        self.expert_refs = list(space.models)
        self.experts = [ctx.reference_state(ref) for ref in self.expert_refs]
        self.config = dict(ctx.merger.config)
        self.num_layers = int(ctx.merger.num_layers)
        self._frames: OrderedDict[FrameKey, dict[str, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size

    @property
    def size(self) -> int:
        return len(self.experts) + 1

    def frame_state(self, key: FrameKey) -> dict[str, torch.Tensor]:
        if key == "base":
            return self.ctx.merger.base
        if key in self._frames:
            self._frames.move_to_end(key)
            return self._frames[key]
        _, recipe = self.ctx.store.candidate(int(key))
        state = self.ctx.merged_state(recipe)
        self._frames[key] = state
        while len(self._frames) > self.cache_size:
            self._frames.popitem(last=False)
        return state

    def pool(self, key: FrameKey) -> LayerPool:
        states = [*self.experts, self.frame_state(key)]
        names = [*self.expert_refs, f"frame {key}"]
        return LayerPool.from_states(states, [self.config] * len(states), names)

    def features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        """φ for experts + the mean over ``frames`` in the frame slot (module docstring)."""
        base = self.ctx.merger.base
        expert_phi = None
        frame_phis = []
        for key in frames:
            phi = layer_features([*self.experts, self.frame_state(key)], base, self.num_layers)
            expert_phi = phi[:-1] if expert_phi is None else expert_phi
            frame_phis.append(phi[-1])
        return torch.cat([expert_phi, torch.stack(frame_phis).mean(0, keepdim=True)])


def build_trainer(
    *,
    pool_size: int,
    num_layers: int,
    n_objectives: int,
    layer_features: torch.Tensor,
    config: Level2Config,
    scorer: PathScorer,
    lam: np.ndarray | None,
    seed: int,
    policy_state: Mapping[str, Any] | None = None,
) -> PPOTrainer:
    """Env, λ-conditioned policy and PPO trainer over one pool, built alike by the run's stages and by
    requests. The policy's initial weights follow ``seed``, not the global RNG (a resumed run must
    equal an uninterrupted one); ``policy_state`` -- a pretrained policy -- replaces them."""
    env = PathEnv(pool_size=pool_size, num_layers=num_layers, n_objectives=n_objectives, scorer=scorer,
                  config=config, lam=lam, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = PathPolicy(pool_size=pool_size, num_layers=num_layers, n_objectives=n_objectives,
                            layer_features=layer_features, config=config)
    if policy_state is not None:
        policy.load_state_dict(policy_state)
    return PPOTrainer(env, policy, config, seed=seed)


def path_recipe(path: LayerPath, frame: FrameKey, expert_refs: Sequence[str]) -> dict[str, Any]:
    """What the run store keys a path candidate by: hops, scales, pool experts and frame."""
    return {"path": path.to_json(), "experts": list(expert_refs), "frame": frame}


def path_from_recipe(recipe: Mapping[str, Any]) -> tuple[LayerPath, FrameKey]:
    data = recipe["path"]
    return LayerPath(hops=data["hops"], scales=data.get("scales")), recipe["frame"]


class _FrameScorer:
    """A path scorer with ``score_many`` (transition-scale variants on one subset), frame read per call."""

    def __init__(self, evaluator: PathEvaluator, frame_of: Callable[[], FrameKey]):
        self.evaluator, self.frame_of = evaluator, frame_of

    def __call__(self, path: LayerPath) -> np.ndarray:
        return self.evaluator.reward_scores(path, self.frame_of())

    def score_many(self, paths: Sequence[LayerPath]) -> list[np.ndarray]:
        return self.evaluator.reward_scores_many(paths, self.frame_of())


class PathEvaluator:
    """Scores of paths through the run's hf backend; rewards on DAR subsets of the validation plan."""

    def __init__(
        self,
        ctx: Any,
        pools: PoolSet,
        *,
        base: np.ndarray,
        ideal: np.ndarray,
        dar: bool,
        data_scale: float,
        seed: int,
        t_max: int | None = None,
        state: Mapping[str, Any] | None = None,
    ):
        # hf: each path becomes an in-memory path model (shared tensors). Other backends (vLLM) keep one
        # engine of the pool models' depth L and receive the path's weights padded with identity layers.
        self.in_memory = getattr(ctx.backend, "model", None) is not None
        if not self.in_memory and t_max is not None and t_max > pools.num_layers:
            raise ConfigError(
                f"with the {ctx.backend.name} backend level 2 runs paths in an engine of the models' depth "
                f"({pools.num_layers} layers), so t_max must be <= {pools.num_layers}, got {t_max}; use the hf "
                "backend for longer paths"
            )
        self.ctx = ctx
        self.pools = pools
        self.base = np.asarray(base, dtype=float)
        self.ideal = np.asarray(ideal, dtype=float)
        self.dar = dar
        self.t_max = t_max
        self.validation: SplitPlan = ctx.validation
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

    def candidate(self, path: LayerPath, frame: FrameKey) -> CandidateRef:
        return self.ctx.store.add_candidate(path_recipe(path, frame, self.pools.expert_refs), PATH_KIND)

    def install(self, path: LayerPath, frame: FrameKey) -> None:
        pool = self.pools.pool(frame)
        if self.in_memory:
            self.ctx.backend.model = build_path_model(pool, path, t_max=self.t_max)
        else:
            self.ctx.backend.load_state(path_state(pool, path, depth=self.pools.num_layers))

    def raw_scores(self, path: LayerPath, frame: FrameKey, plan: SplitPlan) -> np.ndarray:
        """Scores on ``plan`` (from the store when already there)."""
        cand = self.candidate(path, frame)
        return self.ctx.scorer.score(cand, lambda: self.install(path, frame), plan)

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

    def reward_scores(self, path: LayerPath, frame: FrameKey) -> np.ndarray:
        """Normalised scores of ``path`` on the next reward subsets."""
        self.evaluations += 1
        return self.normalised(self.raw_scores(path, frame, self.next_plan()))

    def reward_scores_many(self, paths: Sequence[LayerPath], frame: FrameKey) -> list[np.ndarray]:
        """Normalised scores of ``paths`` (variants of one path) on the *same* next reward subsets."""
        self.evaluations += len(paths)
        plan = self.next_plan()
        return [self.normalised(self.raw_scores(path, frame, plan)) for path in paths]

    def scorer_for(self, frame_of: Callable[[], FrameKey]) -> PathScorer:
        """A :data:`hm3.arch.env.PathScorer` whose frame is read at call time (it follows λ)."""
        return _FrameScorer(self, frame_of)

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
