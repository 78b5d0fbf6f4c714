"""``df-merge``: single-objective BO over the coefficients, as DF-Merge (Lee et al., 2025).

DF-Merge fits a Matérn-5/2 GP to the mean validation score and picks points by expected
improvement after 10 random initial points. hm3 uses log-EI (numerically robust, same
maximiser up to EI's ``xi``) and a scrambled Sobol design instead of uniform draws -- or, when
the driver's ``initial_design`` is ``auto`` and the weight bounds hold [0, 1] (the default), its
preference design (weights λ ~ Dirichlet(1), :func:`hm3.search.level1.preference_design`), as
for every BO method; ``initial_design: sobol`` keeps the space-filling start.
The objective is the λ-weighted sum of the scores told, which the driver normalises by the HV
protocol (base 0, best expert 1): uniform λ is DF-Merge's mean taken on that scale, so each task
counts by its gain over the base relative to its best expert, not by its raw accuracy.
Fisher weighting is not the optimiser's business: it lives in the search space
(``fisher: true``, ``df_merge: true``) and the driver's Fisher cache.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from hm3.extras import extra_imports
from hm3.search.optimizers.base import DTYPE
from hm3.search.optimizers.bayes import BayesOptimizer, BayesOptions, fit_gp
from hm3.search.preferences import validate_preferences

with extra_imports("search", "the df-merge optimiser"):
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.sampling import SobolQMCNormalSampler


class DfMerge(BayesOptimizer):
    """GP + log-EI on ``Σ_k w_k f_k``; 10 initial points by default."""

    name = "df-merge"

    class Options(BayesOptions):
        weights: list[float] | None = Field(None, description="the objective weights w (default: uniform)")

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        weights = self.options.weights
        if weights is None:
            self.weights = torch.full((n_objectives,), 1.0 / n_objectives, dtype=DTYPE)
        else:
            self.weights = validate_preferences([weights], n_objectives)[0]

    def scalarise(self, Y: torch.Tensor) -> torch.Tensor:
        return Y @ self.weights

    def _model_ask(self, n: int) -> torch.Tensor:
        target = self.scalarise(self.Y).unsqueeze(-1)
        with self.seeded_torch():
            acqf = qLogExpectedImprovement(
                model=fit_gp(self.X, target),
                best_f=target.max(),
                sampler=SobolQMCNormalSampler(torch.Size([self.mc_samples]), seed=self.rng_seed(1) % 2**31),
                X_pending=self.pending_points,
            )
            return self.maximise(acqf, q=n)
