"""What a zoo is made of: model dimensions, training schedule, seed — and the hash that names a build.

Two zoos built with the same spec hash *on the same kind of CPU* hold the same
weights (training is seeded, with a fixed thread count), so a directory whose
``zoo.json`` carries the hash is reused instead of rebuilt. Across CPUs the
float kernels differ and so do the weights and scores: the micro zoo built on
2026-11-24 (AMD EPYC, AVX2) scored differently from the one session 2 measured,
under the same hash. ``zoo.json`` records the scores of the build at hand.
``ZOO_FORMAT`` is part of the hash: bump it whenever the tasks or the training
code change what a spec produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from hm3.errors import ConfigError

ZOO_FORMAT = 3
ZOO_SIZES = ("micro", "small")


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo's weights and its reported scores."""

    size: str
    seed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    batch_size: int
    replay_fraction: float  # share of an expert's fine-tuning batches drawn from the other tasks
    eval_examples: int  # validation/test examples per task behind the reported score matrices

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hash(self) -> str:
        """16 hex digits of sha256 over the spec and ZOO_FORMAT (stable across runs and machines)."""
        blob = json.dumps({"format": ZOO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What was measured (ZOO_FORMAT 3, validation scores on 200 examples, experiments in the issue-3 report):
# head_dim is 32 in both sizes (vLLM's CPU attention has no 16). Neither size meets the whole quality
# bar. The micro settings are the closest of ~40 variants tried: seed 0 misses on code (the best TIES
# merge keeps 41% of its gain) and translation (expert margin 0.17); seed 1 misses on translation only
# (its base already scores 0.92 chrF). In these 64-wide two-layer models a TIES merge behaves like an
# average of the experts, so it keeps half of a gain only where the other experts (through replay) gain
# some too, while the margin needs them to gain little; replay 0.25-0.35 trades one against the other,
# distilled replay (the base's own answers) keeps the margins but merges keep only 20-30%; lower lr,
# SGD, more layers, width 96/128 and other task variants did not do better, and results swing between
# seeds and small task changes. ``small`` is wider (128) and trains a translation it saturates
# (base 0.97 chrF: no translation margin). Step cost: 64-wide micro 37 ms (1 thread), 25 ms (2 threads)
# on a quiet machine; 128-wide 2-layer ~100 ms (1 thread).
_SIZE_SETTINGS: dict[str, dict[str, Any]] = {
    "micro": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, base_steps=600,
                  base_lr=3e-3, expert_steps=250, expert_lr=1e-3, batch_size=64, replay_fraction=0.35,
                  eval_examples=200),
    "small": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, base_steps=600,
                  base_lr=2e-3, expert_steps=250, expert_lr=7e-4, batch_size=64, replay_fraction=0.35,
                  eval_examples=200),
}


def zoo_spec(size: str = "micro", seed: int = 0, **overrides: Any) -> ZooSpec:
    """The spec of a ``size`` zoo; ``overrides`` replace single settings (for experiments and tests)."""
    if size not in _SIZE_SETTINGS:
        raise ConfigError(f"unknown zoo size {size!r}; sizes: {', '.join(ZOO_SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"zoo seed must be a non-negative integer, got {seed!r}")
    settings = {**_SIZE_SETTINGS[size], **overrides}
    unknown = set(settings) - set(ZooSpec.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown zoo spec setting(s): {', '.join(sorted(unknown))}")
    return ZooSpec(size=size, seed=seed, **settings)
