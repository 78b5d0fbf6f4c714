"""PPO-clip with GAE for the level-2 search, both modes, resumable to the bit.

Why hand-written rather than stable-baselines3:

* **hm3 mode** -- the log-prob PPO needs is that of the Gaussian proto-action while the env runs a
  *different*, discrete action chosen by the critic among the proto-action's neighbours
  (Wolpertinger), so the critic sits inside action selection; the buffer must hold the
  proto-action, not the env action. HM3 also spreads the final reward as R/T over the steps, which
  is only known once the episode ends. SB3's ``PPO`` ties the stored action to the env action and
  takes rewards as the env emits them; expressing this would mean replacing its policy, its
  rollout collection and its buffer, i.e. all of PPO but the loss.
* **rmm mode** -- SB3 could express the policy (MultiInputPolicy over counts, position and λ), but
  not the schedule or the resume: SB3 collects ``n_steps`` *transitions* per update and cuts
  episodes at rollout boundaries (bootstrapping across them), whereas RMM updates every N whole
  episodes and its episodes vary in length (skip/back); and a loaded SB3 model restarts with
  ``env.reset()`` (``_last_obs is None`` in ``_setup_learn``) and saves no RNG state, so "train
  2n" and "train n, save, load, train n" differ. The driver checkpoints after every update and
  must resume exactly, so both modes share this trainer (one interface, one checkpoint format).

What it does per update (``episodes_per_update`` whole episodes, or the fewer that end the training;
full batch, ``epochs`` passes):
per-step rewards are R/n on each of the episode's n decisions (hm3; n = T hops, plus one if the
path ended with STOP, so the rewards sum to R) or R at the last step (rmm); GAE(γ, λ_GAE) with
V = 0 after the terminal step; advantages standardised; loss
``−L_clip + c1·(L_V + L_Q) − c2·H`` (+ ``prior_kl``·KL to the frame-order prior, when set), where
L_Q (hm3 only) regresses the path-value head on the episode's raw scores and length T/T_max for
every visited non-empty prefix and for the complete path (see :mod:`hm3.arch.policy`). Adam with
the critic heads at ``lr_value``, the rest at ``lr_policy``.

The trainer draws all its randomness from its own ``torch.Generator`` and the env's ``np_random``;
:meth:`PPOTrainer.state_dict` holds both, the policy, Adam, the counters, the best path and any
episodes collected since the last update, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.arch.env import PathEnv, PathState, check_preference, score_pending
from hm3.arch.path import LayerPath
from hm3.arch.policy import PathPolicy, collate
from hm3.arch.rl_config import Level2Config
from hm3.atomic import atomic_open


@dataclass
class Episode:
    """One collected episode: the states the policy acted in and what it stored, and the outcome."""

    observations: list[dict[str, Any]] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    final_observation: dict[str, Any] | None = None
    reward: float = 0.0  # the env's final (DAR-smoothed) reward
    evaluated: bool = True
    outcome: np.ndarray | None = None  # raw scores and T / T_max: the path-value head's target (hm3)


def spread_rewards(reward: float, n_steps: int, mode: str) -> np.ndarray:
    """Per-step rewards of an episode with final reward R: R/n each (hm3) or R at the end (rmm)."""
    if mode == "hm3":
        return np.full(n_steps, reward / n_steps)
    out = np.zeros(n_steps)
    out[-1] = reward
    return out


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """Generalised advantage estimates of one terminated episode (value 0 after its last step)."""
    advantages = np.zeros(len(rewards))
    running, next_value = 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
        next_value = values[t]
    return advantages


class PPOTrainer:
    """Collects episodes from a :class:`PathEnv` with a :class:`PathPolicy` and updates it by PPO."""

    def __init__(self, env: PathEnv, policy: PathPolicy, config: Level2Config, *, seed: int = 0, lanes: int = 1):
        if env.config.mode != config.mode or policy.mode != config.mode:
            raise ValueError(
                f"mode mismatch: trainer {config.mode!r}, env {env.config.mode!r}, policy {policy.mode!r}"
            )
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.env, self.policy, self.config = env, policy, config
        self.lanes = lanes  # episodes whose paths are scored together (the evaluation workers)
        self.rng = torch.Generator().manual_seed(seed)
        self._optimizer: torch.optim.Adam | None = None
        self.episode = 0
        self.updates = 0
        self.buffer: list[Episode] = []
        self.best: tuple[float, LayerPath, np.ndarray] | None = None

    @property
    def optimizer(self) -> torch.optim.Adam:
        """Adam over the actor (lr_policy) and the critic (lr_value), made on first use: constructing
        one imports torch._dynamo (~1.7 s), which a budget-0 request, that only rolls out the
        pretrained policy, never needs."""
        if self._optimizer is None:
            critic = self.policy.critic_parameters()
            critic_ids = {id(p) for p in critic}
            rest = [p for p in self.policy.parameters() if id(p) not in critic_ids]
            self._optimizer = torch.optim.Adam(
                [{"params": rest, "lr": self.config.lr_policy}, {"params": critic, "lr": self.config.lr_value}]
            )
        return self._optimizer

    # --- training ---------------------------------------------------------------------------------
    def train(self, episodes: int, *, on_update: Callable[[dict], None] | None = None,
              ends_training: bool = True) -> list[dict]:
        """Run ``episodes`` more episodes, updating every ``episodes_per_update``; per-episode records.

        Episodes are collected in groups of up to ``lanes`` (:meth:`_collect_group`), a group never
        crossing an update, so the episodes, their scores and the policy do not depend on ``lanes``.
        ``self.best`` keeps the best evaluated path by raw reward when the env's λ is fixed (online).

        When these episodes end the training (``ends_training``, the default), a last batch smaller than
        ``episodes_per_update`` is learned from as well: its paths were scored, and leaving them in the
        buffer would pay for evaluations the policy never sees (100 episodes at 8 per update: 4). RMM's
        code drops them [design]. A caller that trains in pieces passes False for all but the last, so
        the updates fall where one call's would.
        """
        records = []
        left = episodes
        while left > 0:
            group = min(self.lanes, left, self.config.episodes_per_update - len(self.buffer))
            left -= group
            for episode, info in self._collect_group(group):
                self.episode += 1
                records.append(
                    {
                        "episode": self.episode,
                        "lam": info["lam"],
                        "path": info["path"],
                        "scores": info["scores"],
                        "raw_reward": info["raw_reward"],
                        "reward": info["reward"],
                    }
                )
                if self.env.fixed_lam is not None and info["evaluated"] and (
                    self.best is None or info["raw_reward"] > self.best[0]
                ):
                    self.best = (info["raw_reward"], info["path"], info["scores"])
                self.buffer.append(episode)
            if len(self.buffer) >= self.config.episodes_per_update or (ends_training and left == 0 and self.buffer):
                stats = self._update()
                if on_update is not None:
                    on_update(stats)
        return records

    def _collect_group(self, n: int) -> list[tuple[Episode, dict[str, Any]]]:
        """``n`` episodes rolled out one after the other with the (unchanged) policy, then their paths
        scored in one call (in parallel on an executor's workers) and settled in episode order.

        [design] Why this equals collecting them one at a time: nothing an episode's actions draw on
        depends on an earlier episode's score -- the policy changes only at updates, λ comes from the
        env's generator and the actions from the trainer's, both drawn in episode order -- and the
        scorer draws each episode's reward subset, and the env's DAR averages the rewards, in episode
        order. Stepping the ``n`` episodes side by side instead would interleave the draws, so the
        episodes would depend on ``n``."""
        rolled = [self._rollout() for _ in range(n)]
        pending = [self.env.pending(state, lam) for _, state, lam in rolled]
        scored = iter(score_pending(self.env.scorer, [p for p in pending if p is not None]))
        out = []
        for (episode, state, lam), waiting in zip(rolled, pending, strict=True):
            info = self.env.settle(state, lam, waiting, None if waiting is None else next(scored))
            episode.reward, episode.evaluated = float(info["reward"]), info["evaluated"]
            if info["evaluated"]:
                length = len(info["path"]) / self.env.horizon
                episode.outcome = np.append(info["scores"], length).astype(np.float32)
            out.append((episode, info))
        return out

    def _rollout(self) -> tuple[Episode, PathState, np.ndarray]:
        """One episode's actions up to its end, unscored: the episode, its final state and its λ."""
        episode = Episode()
        obs, _ = self.env.reset()
        state, lam = self.env.state, self.env.lam.copy()
        while not state.done:
            action, stored = self.policy.act(obs, deterministic=False, rng=self.rng)
            episode.observations.append(obs)
            episode.samples.append(stored["sample"])
            episode.logps.append(stored["logp"])
            episode.values.append(stored["value"])
            self.env.advance(state, action)
            obs = self.env.observe(state, lam)
        episode.final_observation = obs
        self.env.state = PathState(done=True)  # the env's episode is over: step() needs a reset
        return episode, state, lam

    def _update(self) -> dict[str, Any]:
        cfg = self.config
        batch = collate([o for ep in self.buffer for o in ep.observations])
        samples = torch.as_tensor(np.stack([s for ep in self.buffer for s in ep.samples]))
        logp_old = torch.tensor([lp for ep in self.buffer for lp in ep.logps], dtype=torch.float32)
        advantages, returns = [], []
        for ep in self.buffer:
            values = np.asarray(ep.values)
            adv = gae(spread_rewards(ep.reward, len(values), cfg.mode), values, cfg.gamma, cfg.gae_lambda)
            advantages.append(adv)
            returns.append(adv + values)
        adv_t = torch.tensor(np.concatenate(advantages), dtype=torch.float32)
        if cfg.normalize_advantages and len(adv_t) > 1:
            adv_t = (adv_t - adv_t.mean()) / (adv_t.std() + 1e-8)
        ret_t = torch.tensor(np.concatenate(returns), dtype=torch.float32)
        if cfg.mode == "hm3":  # path-outcome targets: every non-empty prefix and every complete path
            outcomes = torch.as_tensor(np.stack([ep.outcome for ep in self.buffer]))
            steps = torch.tensor([len(ep.observations) for ep in self.buffer])
            prefix_target = outcomes.repeat_interleave(steps, dim=0)
            prefix_mask = batch["length"] > 0
            complete = collate([ep.final_observation for ep in self.buffer])

        for _ in range(cfg.epochs):
            out = self.policy.evaluate(batch, samples)
            ratio = torch.exp(out["logp"] - logp_old)
            clipped = torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip)
            policy_loss = -torch.min(ratio * adv_t, clipped * adv_t).mean()
            value_loss = ((out["value"] - ret_t) ** 2).mean()
            if cfg.mode == "hm3":
                errors = torch.cat(
                    [
                        (out["path_outcome"] - prefix_target)[prefix_mask],
                        self.policy.complete_path_outcome(complete) - outcomes,
                    ]
                )
                value_loss = value_loss + (errors**2).mean()
            entropy = out["entropy"].mean()
            loss = policy_loss + cfg.c1 * value_loss - cfg.c2 * entropy
            if cfg.path_prior != "none":
                loss = loss + cfg.prior_kl * out["prior_kl"].mean()
            self.optimizer.zero_grad()
            loss.backward()
            # Clip actor and critic apart: a large proto-action gradient must not shrink the critic's step.
            for group in self.optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
            self.optimizer.step()

        with torch.no_grad():
            log_ratio = out["logp"].detach() - logp_old
            stats = {
                "update": self.updates + 1,
                "episode": self.episode,
                "policy_loss": float(policy_loss),
                "value_loss": float(value_loss),
                "entropy": float(entropy),
                "approx_kl": float(((ratio.detach() - 1) - log_ratio).mean()),
                "clip_fraction": float(((ratio.detach() - 1).abs() > cfg.clip).float().mean()),
                "mean_reward": float(np.mean([ep.reward for ep in self.buffer])),
            }
        self.updates += 1
        self.buffer = []
        return stats

    # --- inference --------------------------------------------------------------------------------
    def greedy_path(self, lam: np.ndarray) -> LayerPath:
        """The deterministic policy's path for ``lam`` (proto = mean, no ε), built without scoring.

        In rmm mode the result is empty if the policy backs past block 0 or takes no block.
        """
        lam = check_preference(lam, self.env.n_objectives)
        state = self.env.blank_state()
        while not state.done:
            action, _ = self.policy.act(self.env.observe(state, lam), deterministic=True)
            self.env.advance(state, action)
        return LayerPath(tuple(state.hops)) if not state.backed_out else LayerPath(())

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly; loadable with ``weights_only=True``."""
        best = None
        if self.best is not None:
            raw, path, scores = self.best
            best = {"raw_reward": raw, "hops": [list(h) for h in path.hops], "scores": scores.tolist()}
            if path.scales is not None:  # transition scales searched per path (hm3.arch.env)
                best["scales"] = list(path.scales)
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "episode": self.episode,
            "updates": self.updates,
            "env": self.env.state_dict(),
            "best": best,
            "buffer": [_episode_to_tensors(ep) for ep in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.episode, self.updates = int(state["episode"]), int(state["updates"])
        self.env.load_state_dict(state["env"])
        best = state["best"]
        self.best = (
            None
            if best is None
            else (best["raw_reward"], LayerPath(tuple(map(tuple, best["hops"])), best.get("scales")),
                  np.asarray(best["scores"]))
        )
        self.buffer = [_episode_from_tensors(d) for d in state["buffer"]]

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` atomically (temp file in the same directory, then rename)."""
        with atomic_open(path, "wb") as f:
            torch.save(self.state_dict(), f)
        return Path(path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, weights_only=True))


def _episode_to_tensors(ep: Episode) -> dict[str, Any]:
    return {
        "observations": collate(ep.observations),
        "samples": torch.as_tensor(np.stack(ep.samples)),
        "logps": list(ep.logps),
        "values": list(ep.values),
        "final_observation": collate([ep.final_observation]),
        "reward": ep.reward,
        "evaluated": ep.evaluated,
        "outcome": None if ep.outcome is None else torch.as_tensor(ep.outcome),
    }


def _uncollate(batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    return [{k: v[i].numpy() for k, v in batch.items()} for i in range(n)]


def _episode_from_tensors(d: dict[str, Any]) -> Episode:
    return Episode(
        observations=_uncollate(d["observations"]),
        samples=list(d["samples"].numpy()),
        logps=list(d["logps"]),
        values=list(d["values"]),
        final_observation=_uncollate(d["final_observation"])[0],
        reward=float(d["reward"]),
        evaluated=bool(d["evaluated"]),
        outcome=None if d["outcome"] is None else d["outcome"].numpy(),
    )
