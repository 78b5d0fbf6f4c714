"""What the three BO methods share: an initial design, GP surrogates, acquisition optimisation.

The initial design is a scrambled Sobol sequence over the unit cube unless the driver
passes ``initial_points`` (the run config's ``initial_design: preferences``, built by
:func:`hm3.search.level1.preference_design`): then the first ``n_init`` of those are
evaluated instead, and the surrogate takes over from there as usual.

Surrogates are botorch ``SingleTaskGP`` with a Matérn-5/2 ARD kernel (Gamma priors, as
botorch used by default before 0.12 and as DF-Merge uses) and ``Standardize`` on the
outcome; inputs are already in the unit cube, so no input transform is needed. The
acquisition optimiser uses few restarts and raw samples (``num_restarts=4``,
``raw_samples=128`` by default) so one step stays a few seconds on a CPU for d ≈ 6–12.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_matern_kernel_with_gamma_prior
from botorch.optim import optimize_acqf
from gpytorch.mlls import ExactMarginalLogLikelihood

from hm3.errors import ConfigError
from hm3.search.optimizers.base import DTYPE, Optimizer, require_unit_cube
from hm3.search.optimizers.random import sobol_points

#: Quasi-MC samples for the Monte-Carlo acquisition functions.
MC_SAMPLES = 64


def make_gp(X: torch.Tensor, y: torch.Tensor) -> SingleTaskGP:
    """The (unfitted) Matérn-5/2 GP hm3 uses for one objective column ``y`` (n × 1).

    A fitted model is rebuilt from its saved ``state_dict`` with this same constructor.
    """
    return SingleTaskGP(
        X,
        y,
        covar_module=get_matern_kernel_with_gamma_prior(ard_num_dims=X.shape[-1]),
        outcome_transform=Standardize(m=1),
    )


def fit_gp(X: torch.Tensor, y: torch.Tensor) -> SingleTaskGP:
    """A Matérn-5/2 GP fitted to one objective column ``y`` (n × 1) by marginal likelihood."""
    model = make_gp(X, y)
    with warnings.catch_warnings():
        # small designs routinely trigger botorch's "data not standardised"/conditioning notices
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def unit_bounds(d: int) -> torch.Tensor:
    return torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])


class BayesOptimizer(Optimizer):
    """An initial design of ``n_init`` points (Sobol or given), then one model-based step per ask."""

    def __init__(
        self,
        space_dim: int,
        n_objectives: int,
        *,
        seed: int,
        budget: int,
        default_n_init: int,
        **options: Any,
    ):
        self.n_init = int(options.pop("n_init", default_n_init))
        self.num_restarts = int(options.pop("num_restarts", 4))
        self.raw_samples = int(options.pop("raw_samples", 128))
        initial = options.pop("initial_points", None)
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        self.initial_points = None if initial is None else torch.as_tensor(initial, dtype=DTYPE)
        if self.n_init < 1:
            raise ConfigError(f"{self.name}: n_init must be >= 1, got {self.n_init}")
        if self.n_init >= budget:
            raise ConfigError(
                f"{self.name}: budget {budget} must exceed the initial design of n_init = {self.n_init} "
                "points (the budget counts the initial design)"
            )
        if self.initial_points is not None:
            ip = self.initial_points
            if ip.ndim != 2 or ip.shape[1] != space_dim or len(ip) < self.n_init:
                raise ConfigError(
                    f"{self.name}: initial_points must be at least n_init = {self.n_init} points of "
                    f"dimension {space_dim}, got shape {tuple(ip.shape)}"
                )
            require_unit_cube(ip, f"{self.name}: initial_points")

    def _ask(self, n: int) -> torch.Tensor:
        if self.n_evaluated < self.n_init:  # stop at the design's end: the model needs its results
            m = min(n, self.n_init - self.n_evaluated)
            if self.initial_points is not None:
                return self.initial_points[self.n_evaluated : self.n_evaluated + m].clone()
            return sobol_points(self.d, seed=self.seed, start=self.n_evaluated, n=m)
        return self._model_ask(n)

    def _model_ask(self, n: int) -> torch.Tensor:
        """``n`` points from the surrogate (called once the initial design is evaluated)."""
        raise NotImplementedError

    def maximise(self, acqf: AcquisitionFunction, q: int) -> torch.Tensor:
        """Maximise ``acqf`` over the unit cube (greedy sequential for q > 1)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates, _ = optimize_acqf(
                acqf,
                bounds=unit_bounds(self.d),
                q=q,
                num_restarts=self.num_restarts,
                raw_samples=self.raw_samples,
                sequential=q > 1,
                options={"batch_limit": 8, "maxiter": 100},
            )
        return candidates.detach()
