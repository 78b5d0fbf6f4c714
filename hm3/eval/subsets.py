"""Dynamic Average Reward (RMM): cheap, noisy rewards on data subsets, smoothed over episodes.

RMM scores each episode's candidate on only a fraction ``s`` (the data scale) of
the validation split, taking the next slice of a persistent, shuffled, cycling
iterator so that successive episodes see different examples and every example is
seen once per pass. The noise this adds is averaged out across episodes by
``r̃_i = a_i r̃_{i−1} + (1 − a_i) r_i`` with ``a_i = α·i/N``, restarted every
``round(1/s)`` episodes (about one pass over the split).

Both pieces are resumable: :meth:`state_dict` is plain JSON (store it as a run
store event) and passing it back as ``state`` continues exactly where the run
stopped.

Design choices where RMM's public code is silent (its smoothing is not in the released code):

* episodes are counted from 1; the first episode of each period resets, so
  ``r̃_1 = r_1``;
* ``a_i`` is capped at ``α`` once ``i > N`` so that a run extended past its
  planned episode count keeps a proper average;
* a subset that crosses a pass boundary takes the rest of the old pass and the
  head of the new one, skipping any example already in it, so every subset holds
  distinct examples; the examples skipped that way count as seen in the new pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hm3.errors import ConfigError, SplitTooSmallError


def subset_size(n_examples: int, scale: float) -> int:
    """Examples per subset for data scale ``scale``: ``max(1, round(scale·n))``."""
    if not 0.0 < scale <= 1.0:
        raise ConfigError(f"data scale must be in (0, 1], got {scale}")
    _check_split(n_examples)
    return max(1, round(scale * n_examples))


def reset_period(scale: float) -> int:
    """Episodes between DAR restarts: ``round(1/s)``, about one full pass over the split."""
    if not 0.0 < scale <= 1.0:
        raise ConfigError(f"data scale must be in (0, 1], got {scale}")
    return max(1, round(1.0 / scale))


def epoch_permutation(seed: int, epoch: int, n_examples: int) -> list[int]:
    """The order of pass ``epoch``: a permutation of ``range(n)`` from (seed, epoch) alone.

    Seeding each pass independently means the state needs no RNG internals: the
    seed, the pass number and the position fully determine what comes next.
    """
    rng = np.random.default_rng([seed, epoch])
    return [int(i) for i in rng.permutation(n_examples)]


def _check_split(n_examples: int) -> None:
    if n_examples < 1:
        raise SplitTooSmallError(f"the split has {n_examples} examples; a subset needs at least 1")


class CyclingSubsets:
    """Persistent shuffled cycling iterator over the example indices of one split."""

    def __init__(
        self,
        n_examples: int,
        scale: float | None,
        *,
        seed: int,
        size: int | None = None,
        state: dict[str, Any] | None = None,
    ):
        """Give either ``scale`` (fraction of the split per subset) or a fixed ``size``."""
        _check_split(n_examples)
        if (scale is None) == (size is None):
            raise ConfigError("give exactly one of a data scale and a fixed subset size")
        if size is not None and not 1 <= size <= n_examples:
            raise SplitTooSmallError(
                f"a subset of {size} examples was asked of a split of {n_examples} examples"
            )
        self.n_examples = n_examples
        self.size = size if size is not None else subset_size(n_examples, scale)  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0
        self.position = 0
        if state is not None:
            self._load(state)
        self._order = epoch_permutation(self.seed, self.epoch, n_examples)

    def next_subset(self) -> list[int]:
        """The next ``size`` distinct example indices, reshuffling when a pass ends."""
        if self.position == self.n_examples:
            self._start_epoch(self.epoch + 1)
        end = self.position + self.size
        subset = self._order[self.position : end]
        if end <= self.n_examples:
            self.position = end
            return subset
        # Crossing into a new pass: fill from its head, skipping examples already taken.
        taken = set(subset)
        self._start_epoch(self.epoch + 1)
        while len(subset) < self.size:
            index = self._order[self.position]
            self.position += 1
            if index not in taken:
                subset.append(index)
        return subset

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; ``CyclingSubsets(..., state=...)`` resumes from it exactly."""
        return {
            "n_examples": self.n_examples,
            "size": self.size,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = epoch_permutation(self.seed, epoch, self.n_examples)

    def _load(self, state: dict[str, Any]) -> None:
        expected = {"n_examples": self.n_examples, "size": self.size, "seed": self.seed}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"subset iterator state has {key}={state.get(key)!r} but this run has {key}={value!r}: "
                    "the split, data scale or seed changed since the state was saved"
                )
        epoch, position = state.get("epoch"), state.get("position")
        if (
            not isinstance(epoch, int)
            or epoch < 0
            or not isinstance(position, int)
            or not 0 <= position <= self.n_examples
        ):
            raise ConfigError(f"subset iterator state has an invalid epoch/position: {epoch!r}/{position!r}")
        self.epoch, self.position = epoch, position


class DynamicAverageReward:
    """RMM's smoothing of subset rewards: ``r̃_i = a_i r̃_{i−1} + (1 − a_i) r_i``, ``a_i = α·i/N``."""

    def __init__(
        self, *, alpha: float = 0.8, n_episodes: int, scale: float, state: dict[str, Any] | None = None
    ):
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"DAR alpha must be in [0, 1), got {alpha}")
        if n_episodes < 1:
            raise ConfigError(f"DAR needs at least 1 planned episode, got n_episodes={n_episodes}")
        self.alpha = alpha
        self.n_episodes = n_episodes
        self.scale = scale
        self.period = reset_period(scale)
        self.episode = 0  # episodes seen so far; the next update is episode + 1
        self.smoothed: float | None = None
        if state is not None:
            self._load(state)

    def weight(self, episode: int) -> float:
        """``a_i`` for 1-based episode ``i`` (capped at α past the planned N)."""
        return self.alpha * min(episode, self.n_episodes) / self.n_episodes

    def update(self, raw_reward: float) -> float:
        """Fold in one episode's raw reward and return the smoothed reward for it."""
        if not math.isfinite(raw_reward):
            raise ValueError(f"DAR got a non-finite reward {raw_reward} at episode {self.episode + 1}")
        self.episode += 1
        if self.smoothed is None or (self.episode - 1) % self.period == 0:
            self.smoothed = float(raw_reward)
        else:
            a = self.weight(self.episode)
            self.smoothed = a * self.smoothed + (1.0 - a) * float(raw_reward)
        return self.smoothed

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; ``DynamicAverageReward(..., state=...)`` resumes from it exactly."""
        return {
            "alpha": self.alpha,
            "n_episodes": self.n_episodes,
            "scale": self.scale,
            "episode": self.episode,
            "smoothed": self.smoothed,
        }

    def _load(self, state: dict[str, Any]) -> None:
        for key in ("alpha", "n_episodes", "scale"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"DAR state has {key}={state.get(key)!r} but this run has {key}={getattr(self, key)!r}"
                )
        self.episode = int(state["episode"])
        self.smoothed = None if state.get("smoothed") is None else float(state["smoothed"])
