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

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from hm3.errors import ConfigError
from hm3.extras import extra_imports
from hm3.search.optimizers.base import DTYPE, Optimizer, OptimizerOptions, Points, require_unit_cube
from hm3.search.optimizers.random import sobol_points

with extra_imports("search", "the BO optimisers"):
    from botorch.acquisition import AcquisitionFunction
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from botorch.models.utils.gpytorch_modules import get_matern_kernel_with_gamma_prior
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

log = logging.getLogger(__name__)

#: Quasi-MC samples for the Monte-Carlo acquisition functions (the ``mc_samples`` option's default).
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


#: A build of botorch's fused qLogNEHVI kernel takes ~1 min on 2 cores; a build lock older than this
#: was left by a killed process.
STALE_BUILD_LOCK_SECONDS = 300.0
_kernel_lock_checked = False


def clear_stale_kernel_lock(*, stale_after: float = STALE_BUILD_LOCK_SECONDS, poll: float = 1.0) -> Path | None:
    """Remove the build lock of botorch's fused kernel if a killed process left it; the path if removed.

    botorch builds (or re-checks) its fused C++ kernel with torch's ``cpp_extension``, which holds a
    lock file in the build directory meanwhile. A process killed in that window (the first
    ``bo-mo`` step of a run: ~1 min whenever the kernel is rebuilt) leaves the file behind, and
    every later process then waits on it forever without a word. Here a young lock is waited for
    (another process may be building), saying so; one older than ``stale_after`` is removed.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private, so guarded

        lock = Path(_get_build_directory("logei_fused_ext", verbose=False)) / "lock"
    except Exception:  # noqa: BLE001 - a torch without this helper: nothing to check
        return None
    told = False
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the other process finished
            return None
        if age >= stale_after:
            lock.unlink(missing_ok=True)
            log.warning(f"removed a stale build lock of botorch's fused kernel ({age:.0f} s old, left by a "
                        f"killed process): {lock}")
            return lock
        if not told:
            log.info(f"waiting for botorch's fused-kernel build lock {lock} (another process is building; "
                     f"taken as stale after {stale_after:.0f} s)")
            told = True
        time.sleep(min(poll, stale_after - age))
    return None


def check_kernel_lock_once() -> None:
    """:func:`clear_stale_kernel_lock`, once per process (the first model-based ``bo-mo`` step)."""
    global _kernel_lock_checked
    if not _kernel_lock_checked:
        _kernel_lock_checked = True
        clear_stale_kernel_lock()


def unit_bounds(d: int) -> torch.Tensor:
    return torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])


class BayesOptions(OptimizerOptions):
    n_init: int | None = Field(None, ge=1, description="initial design size (None: the method's default)")
    num_restarts: int = Field(4, ge=1, description="restarts of the acquisition optimiser")
    raw_samples: int = Field(128, ge=1, description="raw samples that seed those restarts")
    # qLogNEHVI partitions the front under every sample, which dominates a step's time with 3+ objectives
    mc_samples: int = Field(MC_SAMPLES, ge=1, description="quasi-MC samples of the acquisition function")
    initial_points: Points | None = Field(None, description="the initial design (default: Sobol points)")


class BayesOptimizer(Optimizer):
    """An initial design of ``n_init`` points (Sobol or given), then one model-based step per ask."""

    Options = BayesOptions
    supports_async = True

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        opts = self.options
        self.n_init = opts.n_init if opts.n_init is not None else self.initial_design_size(space_dim)
        self.num_restarts, self.raw_samples = opts.num_restarts, opts.raw_samples
        self.mc_samples = opts.mc_samples
        self.initial_points = opts.initial_points
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

    @classmethod
    def initial_design_size(cls, space_dim: int) -> int:
        """The default ``n_init`` for a search space of ``space_dim`` dimensions (DF-Merge's 10)."""
        return 10

    def _ask(self, n: int) -> torch.Tensor:
        if self.n_evaluated < self.n_init:  # stop at the design's end: the model needs its results
            m = min(n, self.n_init - self.n_evaluated)
            if self.initial_points is not None:
                return self.initial_points[self.n_evaluated : self.n_evaluated + m].clone()
            return sobol_points(self.d, seed=self.seed, start=self.n_evaluated, n=m)
        return self._model_ask(n)

    def _ask_async(self, n: int) -> torch.Tensor:
        """The design's next points while it lasts; then the surrogate's, conditioned on the pending points
        (none until a first score is told: a GP needs one)."""
        if self.n_asked < self.n_init:
            m = min(n, self.n_init - self.n_asked)
            if self.initial_points is not None:
                return self.initial_points[self.n_asked : self.n_asked + m].clone()
            return sobol_points(self.d, seed=self.seed, start=self.n_asked, n=m)
        if not self.n_evaluated:
            return torch.empty(0, self.d, dtype=DTYPE)
        return self._model_ask(n)

    @property
    def pending_points(self) -> torch.Tensor | None:
        """The points being evaluated, for the acquisition's ``X_pending`` (None: none)."""
        return self.X_pending if len(self.X_pending) else None

    def _model_ask(self, n: int) -> torch.Tensor:
        """``n`` points from the surrogate (called once the initial design is evaluated), conditioned on
        :attr:`pending_points` in asynchronous mode."""
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
