"""``nsga2``: pymoo's NSGA-II driven in ask/tell mode.

pymoo asks for whole generations; this wrapper hands a generation out in as many
``ask`` calls as the caller likes (never past its end) and tells pymoo once every
member is scored. pymoo draws from its own generator seeded at set-up, so its state is a
function of the seed and the sequence of generations told: replaying the history
(:meth:`Optimizer.from_history`) re-runs those ask/tell rounds and lands in the same
state. A partially evaluated last generation is simply never told to pymoo.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from hm3.errors import ConfigError
from hm3.extras import extra_imports
from hm3.search.optimizers.base import DTYPE, Optimizer, OptimizerOptions

with extra_imports("search", "the nsga2 optimiser"):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.core.termination import NoTermination


class Nsga2(Optimizer):
    """NSGA-II with population ``pop_size`` (default 20); each offspring counts as one evaluation."""

    name = "nsga2"

    class Options(OptimizerOptions):
        pop_size: int = Field(20, ge=2, description="population (and generation) size")

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        pop_size = self.options.pop_size
        if budget < pop_size:
            raise ConfigError(f"nsga2: budget {budget} is smaller than one population (pop_size {pop_size})")
        self.pop_size = pop_size
        problem = Problem(n_var=space_dim, n_obj=n_objectives, xl=0.0, xu=1.0)
        self._algorithm = NSGA2(pop_size=pop_size)
        self._algorithm.setup(problem, termination=NoTermination(), seed=self.seed, verbose=False)
        self._generation: Population | None = None
        self._asked = 0  # members of the current generation handed out
        self._scores: list[np.ndarray] = []  # scores of the current generation, in order

    def _start_generation(self) -> None:
        self._generation = self._algorithm.ask()
        self._asked = 0
        self._scores = []

    def _ask(self, n: int) -> torch.Tensor:
        if self._generation is None:
            self._start_generation()
        assert self._generation is not None
        X = self._generation.get("X")[self._asked : self._asked + n]
        self._asked += len(X)
        return torch.as_tensor(np.asarray(X), dtype=DTYPE)

    def _observe(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        for x, y in zip(X.numpy(), Y.numpy(), strict=True):
            if self._generation is None:  # replaying a history: regenerate what was asked
                self._start_generation()
            assert self._generation is not None
            i = len(self._scores)
            expected = self._generation.get("X")[i]
            if not np.allclose(x, expected, rtol=0, atol=1e-12):
                raise ConfigError(
                    f"nsga2: evaluation {self.n_evaluated + i} does not match this seed/config's point; "
                    "the history comes from a different run"
                )
            self._scores.append(y)
            self._asked = max(self._asked, i + 1)
            if len(self._scores) == len(self._generation):
                self._generation.set("F", -np.stack(self._scores))  # pymoo minimises
                self._algorithm.tell(infills=self._generation)
                self._generation = None
