"""The optimiser interface shared by every level-1 search method.

Contract (identical for all methods, so benchmarks compare like with like):

* the search space is the unit cube ``[0, 1]^d``; scores are MAXIMISED, one column per
  objective (the driver normalises them with :func:`hm3.search.pareto.normalise`, so by
  default the base model sits at 0 and the ideal point at 1);
* ``budget`` = number of candidate evaluations, initial design included; ``ask`` never
  hands out a point beyond it;
* protocol: ``X = ask(n)`` → evaluate → ``tell(X, Y)``; one batch in flight at a time;
* asynchronous protocol (methods with ``supports_async``): ``ask_async(n)`` hands out points while
  others are still being evaluated (:attr:`Optimizer.X_pending`), and each is told when its score
  arrives, in whatever order; BO conditions its next point on the pending ones (botorch's
  ``X_pending``), so a worker that finishes early gets a new candidate at once;
* **resume by replay**: an optimiser's state is a pure function of its constructor
  arguments and the ``(x, y)`` history. Each ask derives its randomness from
  ``(seed, evaluations so far)`` (:meth:`Optimizer.rng_seed`), never from a long-lived RNG,
  so after a crash ``from_history(...)`` followed by ``ask`` yields exactly the points an
  uninterrupted run would have asked next.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BeforeValidator, ConfigDict, ValidationError

from hm3.config_model import ConfigModel
from hm3.errors import ConfigError, invalid_config

DTYPE = torch.float64


def _as_points(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=DTYPE)


#: Points given as an option (an initial design, fixed points): any nested sequence or tensor, as float64.
Points = Annotated[torch.Tensor, BeforeValidator(_as_points)]


class OptimizerOptions(ConfigModel):
    """The ``optimizer.options`` of a run config; each optimiser declares its own as ``Options``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)


def require_unit_cube(points: torch.Tensor, what: str) -> None:
    """Refuse given points (fixed points, an initial design) outside ``[0, 1]^d``, naming them."""
    if ((points < 0) | (points > 1)).any():
        raise ConfigError(f"{what} must lie in the unit cube")


class Optimizer(ABC):
    """Ask/tell optimiser over the unit cube with exact budget accounting."""

    #: Registry name (``bo-mo``, ``random``, …).
    name: ClassVar[str]
    #: The options this optimiser accepts (unknown ones and wrong types are refused, naming them).
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions
    #: Whether :meth:`ask_async` works: the method can propose while points are pending and be told
    #: them in any order.
    supports_async: ClassVar[bool] = False

    def __init__(self, space_dim: int, n_objectives: int, *, seed: int, budget: int, **options: Any):
        if space_dim < 1:
            raise ConfigError(f"{self.name}: the search space has no dimension (d = {space_dim})")
        if n_objectives < 1:
            raise ConfigError(f"{self.name}: need at least one objective, got {n_objectives}")
        if budget < 1:
            raise ConfigError(f"{self.name}: budget must be >= 1 evaluation, got {budget}")
        self.options = self.parse_options(options)
        self.d = space_dim
        self.k = n_objectives
        self.seed = int(seed)
        self.budget = int(budget)
        self.X = torch.empty(0, space_dim, dtype=DTYPE)
        self.Y = torch.empty(0, n_objectives, dtype=DTYPE)
        self._pending = 0
        #: Points handed out by :meth:`ask_async` (or :meth:`mark_pending`) and not yet told.
        self.X_pending = torch.empty(0, space_dim, dtype=DTYPE)

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> OptimizerOptions:
        """``options`` validated by :attr:`Options`; problems become one :class:`ConfigError`."""
        try:
            return cls.Options.model_validate(options)
        except ValidationError as err:
            raise invalid_config(err, cls.name, "optimiser options", prefix="optimizer.options.") from None

    # --- bookkeeping ------------------------------------------------------------------------------

    @property
    def n_evaluated(self) -> int:
        return len(self.X)

    @property
    def remaining(self) -> int:
        """Evaluations still allowed (points asked but not yet told count as spent)."""
        return self.budget - self.n_evaluated - self._pending

    def rng_seed(self, salt: int = 0) -> int:
        """Seed for the next ask: a hash of (seed, evaluations so far, salt) — what makes replay exact."""
        digest = hashlib.sha256(f"{self.seed}:{self.n_evaluated}:{salt}".encode()).digest()
        return int.from_bytes(digest[:7], "little")

    @contextmanager
    def seeded_torch(self, salt: int = 0) -> Iterator[None]:
        """Run botorch/gpytorch code (which draws from torch's global RNG) under :meth:`rng_seed`."""
        with torch.random.fork_rng():
            torch.manual_seed(self.rng_seed(salt))
            yield

    # --- protocol ---------------------------------------------------------------------------------

    def ask(self, n: int = 1) -> torch.Tensor:
        """Up to ``n`` new points (``m × d``, in the unit cube), ``1 <= m <= n``.

        Generational methods may return fewer than ``n`` at a generation boundary.
        """
        if self._pending:
            raise RuntimeError(
                f"{self.name}: tell() the {self._pending} pending point(s) before asking again"
            )
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
        if self.remaining < 1:
            raise RuntimeError(f"{self.name}: budget of {self.budget} evaluations exhausted")
        X = self._ask(min(n, self.remaining)).to(DTYPE).clamp(0.0, 1.0)
        if X.dim() != 2 or X.shape[1] != self.d or not 1 <= len(X) <= min(n, self.remaining):
            raise RuntimeError(
                f"{self.name}: internal error, asked {n} points, produced shape {tuple(X.shape)}"
            )
        self._pending = len(X)
        return X

    def ask_async(self, n: int = 1) -> torch.Tensor:
        """Up to ``n`` new points while :attr:`X_pending` are still being evaluated (``m × d``,
        ``0 <= m <= n``: none when the method must see a pending result first, or the budget is spent).

        Each returned point is pending until told; :meth:`tell` accepts pending points in any order.
        """
        if not self.supports_async:
            raise RuntimeError(f"{self.name}: proposes in batches only (no ask_async)")
        if n < 1:
            raise ValueError(f"ask_async(n) needs n >= 1, got {n}")
        if self.remaining < 1:
            return torch.empty(0, self.d, dtype=DTYPE)
        X = self._ask_async(min(n, self.remaining)).to(DTYPE).clamp(0.0, 1.0).reshape(-1, self.d)
        if len(X) > min(n, self.remaining):
            raise RuntimeError(f"{self.name}: internal error, asked {n} points, produced {len(X)}")
        self.mark_pending(X)
        return X

    def mark_pending(self, X: torch.Tensor) -> None:
        """Count ``X`` as handed out and not yet told (a resumed asynchronous run's candidates in flight)."""
        X = torch.as_tensor(X, dtype=DTYPE).reshape(-1, self.d)
        self.X_pending = torch.cat([self.X_pending, X])
        self._pending += len(X)

    @property
    def n_asked(self) -> int:
        """Points handed out so far: told and pending (the index of the next point of a sequence)."""
        return self.n_evaluated + len(self.X_pending)

    def tell(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Record evaluated points (the pending batch, or any history when replaying).

        Points given in a float type narrower than float64 are refused, not upcast: a
        float32 copy of an asked point differs from it in the last bits, and a BO
        optimiser told that copy asks different points next (a resumed run once
        diverged from the uninterrupted one that way).
        """
        dtype = getattr(X, "dtype", None)
        if dtype is not None and _is_narrow_float(dtype):
            raise TypeError(
                f"{self.name}: tell() got points as {dtype}; pass them in float64 (as ask() returns "
                "them): a narrower copy changes what a BO optimiser asks next"
            )
        X = torch.as_tensor(X, dtype=DTYPE).reshape(-1, self.d)
        Y = torch.as_tensor(Y, dtype=DTYPE).reshape(-1, self.k)
        if len(X) != len(Y):
            raise ValueError(f"{self.name}: tell() got {len(X)} points but {len(Y)} score rows")
        if not torch.isfinite(Y).all():
            raise ValueError(f"{self.name}: scores hold NaN or Inf")
        if self.n_evaluated + len(X) > self.budget:
            raise RuntimeError(
                f"{self.name}: telling {len(X)} more points would exceed the budget of {self.budget}"
            )
        self._observe(X, Y)
        self.X = torch.cat([self.X, X])
        self.Y = torch.cat([self.Y, Y])
        self._pending = max(0, self._pending - len(X))
        for x in X:  # an asynchronous point told: no longer pending
            hit = (self.X_pending == x).all(dim=1).nonzero()
            if len(hit):
                keep = torch.ones(len(self.X_pending), dtype=torch.bool)
                keep[hit[0, 0]] = False
                self.X_pending = self.X_pending[keep]

    @classmethod
    def from_history(
        cls, X: torch.Tensor, Y: torch.Tensor, space_dim: int, n_objectives: int, **kwargs: Any
    ) -> Optimizer:
        """Rebuild an optimiser after a crash: construct it as before, then replay every evaluation."""
        opt = cls(space_dim, n_objectives, **kwargs)
        if len(X):
            opt.tell(X, Y)
        return opt

    # --- what each method supplies ------------------------------------------------------------------

    @abstractmethod
    def _ask(self, n: int) -> torch.Tensor:
        """``m × d`` points, ``1 <= m <= n``; deterministic given the history (use ``rng_seed``)."""

    def _ask_async(self, n: int) -> torch.Tensor:
        """``m × d`` points, ``0 <= m <= n``, given the history and :attr:`X_pending` (``supports_async``)."""
        raise NotImplementedError

    def _observe(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Hook for methods with state beyond the history (called before X, Y are appended)."""
        return None


def run(
    optimizer: Optimizer,
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    budget: int | None = None,
    *,
    batch_size: int = 1,
    on_result: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spend ``budget`` evaluations (default: all that remain) and return every ``(X, Y)``.

    ``evaluate`` maps an ``m × d`` batch to ``m × k`` maximised scores; ``on_result`` sees
    each told batch (the driver commits it to the run store there).
    """
    target = optimizer.n_evaluated + (optimizer.remaining if budget is None else budget)
    if target > optimizer.budget:
        raise ConfigError(
            f"run budget {budget} exceeds the optimiser's remaining {optimizer.remaining} evaluations"
        )
    while optimizer.n_evaluated < target:
        X = optimizer.ask(min(batch_size, target - optimizer.n_evaluated))
        Y = torch.as_tensor(evaluate(X), dtype=DTYPE).reshape(len(X), optimizer.k)
        optimizer.tell(X, Y)
        if on_result is not None:
            on_result(X, Y)
    return optimizer.X, optimizer.Y


def _is_narrow_float(dtype: Any) -> bool:
    """True for torch or numpy floating dtypes of fewer than 64 bits."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point and torch.finfo(dtype).bits < 64
    kind, size = getattr(dtype, "kind", ""), getattr(dtype, "itemsize", 8)
    return kind == "f" and size < 8
