"""``hm3-fixed``: no search — evaluate given points (HM3's parameter stage, coefficients = λ).

The driver builds the points with :meth:`hm3.search.space.SearchSpace.fixed_coefficients`
from N preference vectors (:func:`hm3.search.preferences.dirichlet_preferences`), so this
baseline spends its budget on exactly the λs the paper would merge with.
"""

from __future__ import annotations

from typing import Any

import torch

from hm3.errors import ConfigError
from hm3.search.optimizers.base import DTYPE, Optimizer, OptimizerOptions, Points, require_unit_cube


class Fixed(Optimizer):
    """Hands out ``points`` in order; the budget may not exceed their number."""

    name = "hm3-fixed"

    class Options(OptimizerOptions):
        points: Points | None = None

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        super().__init__(space_dim, n_objectives, seed=seed, budget=budget, **options)
        points = self.options.points
        if points is None:
            raise ConfigError(
                "hm3-fixed: needs the option 'points' (one unit-cube point per preference vector)"
            )
        self.points = torch.as_tensor(points, dtype=DTYPE).reshape(-1, space_dim) if len(points) else None
        if self.points is None or len(self.points) < budget:
            n = 0 if self.points is None else len(self.points)
            raise ConfigError(f"hm3-fixed: budget {budget} exceeds the {n} fixed point(s) given")
        require_unit_cube(self.points, "hm3-fixed: points")

    def _ask(self, n: int) -> torch.Tensor:
        return self.points[self.n_evaluated : self.n_evaluated + n].clone()

    def _observe(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        expected = self.points[self.n_evaluated : self.n_evaluated + len(X)]
        if not torch.allclose(X, expected, rtol=0, atol=1e-12):
            raise ConfigError("hm3-fixed: the told points are not the fixed points in order")
