"""``random``: scrambled Sobol (default) or uniform sampling — the floor any search must beat.

The i-th point depends only on (seed, i): Sobol is fast-forwarded to the number of
evaluations so far, so resuming replays nothing and continues the same sequence.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.quasirandom import SobolEngine

from hm3.search.optimizers.base import DTYPE, Optimizer, OptimizerOptions


def sobol_points(d: int, *, seed: int, start: int, n: int) -> torch.Tensor:
    """Points ``start … start+n-1`` of the scrambled Sobol sequence of ``seed`` (float64)."""
    engine = SobolEngine(d, scramble=True, seed=seed)
    if start:
        engine.fast_forward(start)
    return engine.draw(n, dtype=DTYPE)


class RandomSearch(Optimizer):
    """Space-filling random search."""

    name = "random"

    class Options(OptimizerOptions):
        method: Literal["sobol", "uniform"] = "sobol"

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        self.method = self.options.method

    supports_async = True

    def _ask(self, n: int) -> torch.Tensor:
        if self.method == "sobol":
            return sobol_points(self.d, seed=self.seed, start=self.n_evaluated, n=n)
        gen = torch.Generator().manual_seed(self.rng_seed())
        return torch.rand(n, self.d, generator=gen, dtype=DTYPE)

    def _ask_async(self, n: int) -> torch.Tensor:
        # the next points of the sequence: those pending are handed out already
        if self.method == "sobol":
            return sobol_points(self.d, seed=self.seed, start=self.n_asked, n=n)
        gen = torch.Generator().manual_seed(self.rng_seed(salt=len(self.X_pending)))
        return torch.rand(n, self.d, generator=gen, dtype=DTYPE)
