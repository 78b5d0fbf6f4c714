"""``bo-mo``: multi-objective BO returning the whole front.

One GP per objective (``ModelListGP``) and qLogNoisyExpectedHypervolumeImprovement
(Ament et al. 2023), whose log-smoothing keeps a gradient even before any point beats
the reference — exactly the regime at the start of a merge search. The reference point
defaults to the origin, which is hm3's HV reference (the base model) when the driver
tells normalised scores (see :mod:`hm3.search.pareto`); the optimiser thus targets the
same quantity the benchmarks report.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from hm3.errors import ConfigError
from hm3.extras import extra_imports
from hm3.search.optimizers.base import DTYPE
from hm3.search.optimizers.bayes import (
    BayesOptimizer,
    BayesOptions,
    check_kernel_lock_once,
    fit_gp,
)

with extra_imports("search", "the bo-mo optimiser"):
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.models import ModelListGP
    from botorch.sampling import SobolQMCNormalSampler


class BoMo(BayesOptimizer):
    """ModelListGP + qLogNEHVI; Sobol initial design of ``2 (d + 1)`` points by default."""

    name = "bo-mo"

    class Options(BayesOptions):
        ref_point: list[float] | None = Field(None, description="hypervolume reference (default: the origin)")

    @classmethod
    def initial_design_size(cls, space_dim: int) -> int:
        return 2 * (space_dim + 1)

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        if n_objectives < 2:  # refused here, not at the first model step after the design is spent
            raise ConfigError(f"bo-mo: hypervolume improvement needs at least 2 objectives, got {n_objectives}; "
                              "for one objective use df-merge")
        ref = self.options.ref_point
        self.ref_point = (
            torch.zeros(n_objectives, dtype=DTYPE) if ref is None else torch.as_tensor(ref, dtype=DTYPE)
        )
        if self.ref_point.shape != (n_objectives,):
            raise ConfigError(f"bo-mo: ref_point needs {n_objectives} entries, got {ref!r}")

    def _model_ask(self, n: int) -> torch.Tensor:
        check_kernel_lock_once()  # qLogNEHVI loads botorch's fused kernel, which a killed build can block
        with self.seeded_torch():
            model = ModelListGP(*(fit_gp(self.X, self.Y[:, j : j + 1]) for j in range(self.k)))
            acqf = qLogNoisyExpectedHypervolumeImprovement(
                model=model,
                ref_point=self.ref_point.tolist(),
                X_baseline=self.X,
                sampler=SobolQMCNormalSampler(torch.Size([self.mc_samples]), seed=self.rng_seed(1) % 2**31),
                prune_baseline=True,
                X_pending=self.pending_points,
            )
            return self.maximise(acqf, q=n)
