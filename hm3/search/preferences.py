"""Preference vectors λ on the probability simplex (HM3's "Preferences").

Shared by the Tchebycheff optimiser and the ``hm3-fixed`` baseline, so both draw
the *same* λs for the same seed: a fair comparison needs identical preferences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hm3.errors import ConfigError

#: How far a user's λ may sum from 1 (YAML decimals such as 0.1 + 0.2 + 0.7 are not exact).
SUM_TOLERANCE = 1e-6


def dirichlet_preferences(n: int, n_objectives: int, *, seed: int) -> torch.Tensor:
    """``n`` vectors λ ~ Dirichlet(1, …, 1) in float64, reproducible from ``seed`` alone.

    A local generator (not torch's global RNG) keeps the draw independent of whatever
    else ran before, which the resume-by-replay guarantee relies on.
    """
    if n < 1 or n_objectives < 1:
        raise ConfigError(
            f"need at least one preference vector and one objective, got n={n}, k={n_objectives}"
        )
    gen = torch.Generator().manual_seed(seed)
    # Dirichlet(1) = normalised i.i.d. Exp(1) draws
    e = -torch.log1p(-torch.rand(n, n_objectives, generator=gen, dtype=torch.float64))
    return e / e.sum(dim=1, keepdim=True)


def validate_preferences(lams: Sequence[Sequence[float]] | torch.Tensor, n_objectives: int) -> torch.Tensor:
    """Check user-given λs: each has one entry per objective, is non-negative and sums to 1."""
    rows = lams.tolist() if isinstance(lams, torch.Tensor) else [list(r) for r in lams]
    if not rows:
        raise ConfigError("preference vectors: the list is empty")
    for i, row in enumerate(rows):
        if len(row) != n_objectives:
            raise ConfigError(
                f"preference vector {i} {row} has {len(row)} entries; expected one per objective ({n_objectives})"
            )
        if any(not isinstance(v, (int, float)) or v != v or v < 0 for v in row):
            raise ConfigError(f"preference vector {i} {row} must hold non-negative numbers")
        if abs(sum(row) - 1.0) > SUM_TOLERANCE:
            raise ConfigError(f"preference vector {i} {row} sums to {sum(row):.6g}; it must sum to 1")
    return torch.tensor(rows, dtype=torch.float64)
